//! Scaled dot-product attention for training on CUDA: blocks of query rows in candle tensor
//! ops (cuBLAS products and candle's CUDA kernels on a GPU), with the memory bound of the CPU
//! op in `ops::attention::grad`.
//!
//! The forward pass goes over blocks of query rows (all heads at once, at most a given number
//! of scores per block), keeps the output and each row's log-sum-exp, and nothing n x n. The
//! backward pass goes over the same blocks, recomputes the probabilities from the saved
//! statistics (`P = exp(S - lse)`) and forms `dV += P^T dO`, `dS = P * (dO V^T - rowsum(dO *
//! O))`, `dQ = dS K / sqrt(d)`, `dK += dS^T Q / sqrt(d)`. Products run in the inputs' dtype
//! (tensor cores with f32 accumulation for f16/bf16), scores, statistics and the key/value
//! gradient sums in f32 (f64 for f64).
//!
//! Nothing here is CUDA-specific but the op's `cuda_fwd`, so the same code runs on the CPU,
//! where the tests check it against the CPU op; the networks take it for CUDA tensors only.
//! The forward pass is computed before the custom op is applied, which adopts the finished
//! output and ties it to q, k and v for autograd (`adopt`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::super::attention::{qkv_dims, ATTENTION_CHUNK_ELEMS};
use super::adopt::Precomputed;

/// The dtype of scores and statistics for inputs of `dt`.
fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Query rows per block so that a block's scores (B x heads x rows x Tk) stay within
/// `max_scores`.
fn rows_per_block(bh: usize, tq: usize, tk: usize, max_scores: usize) -> usize {
    (max_scores / (bh * tk).max(1)).clamp(1, tq.max(1))
}

/// Row blocks `(start, len)` of `tq` rows.
fn blocks(tq: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tq)
        .step_by(rows.max(1))
        .map(move |r| (r, rows.min(tq - r)))
}

/// The forward pass on detached contiguous (B, H, T, d) tensors: the output (B, H, Tq, dv) in
/// the inputs' dtype and each query row's log-sum-exp of the scaled scores (B, H, Tq, 1).
fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: usize,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (dt, st) = (q.dtype(), stat_dtype(q.dtype()));
    let kt = k.t()?;
    let tq = q.dim(2)?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (r0, n) in blocks(tq, rows) {
        let qb = q.narrow(2, r0, n)?.contiguous()?;
        let s = (qb.matmul(&kt)?.to_dtype(st)? * scale)?;
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        drop(s);
        let l = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&l)?;
        drop(e);
        outs.push(p.to_dtype(dt)?.matmul(v)?);
        lses.push((m + l.log()?)?);
    }
    let cat = |mut ts: Vec<Tensor>| {
        if ts.len() == 1 {
            Ok(ts.remove(0))
        } else {
            Tensor::cat(&ts, 2)
        }
    };
    Ok((cat(outs)?, cat(lses)?))
}

/// The gradients of q, k, v (each only when `want` says so) from the output gradient `dout`,
/// the output `out` and the statistics `lse` of the forward pass; all detached, contiguous.
#[allow(clippy::too_many_arguments)]
fn backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    rows: usize,
    scale: f64,
    want: [bool; 3],
) -> candle_core::Result<[Option<Tensor>; 3]> {
    let (dt, st) = (q.dtype(), stat_dtype(q.dtype()));
    let (kt, vt) = (k.t()?, v.t()?);
    let tq = q.dim(2)?;
    let mut dqs = Vec::new();
    let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
    let add = |acc: &mut Option<Tensor>, t: Tensor| -> candle_core::Result<()> {
        let t = t.to_dtype(st)?;
        *acc = Some(match acc.take() {
            Some(a) => (a + t)?,
            None => t,
        });
        Ok(())
    };
    for (r0, n) in blocks(tq, rows) {
        let qb = q.narrow(2, r0, n)?.contiguous()?;
        let gb = dout.narrow(2, r0, n)?.contiguous()?;
        let ob = out.narrow(2, r0, n)?;
        let lb = lse.narrow(2, r0, n)?;
        // The block's probabilities from the saved statistics.
        let p = (qb.matmul(&kt)?.to_dtype(st)? * scale)?
            .broadcast_sub(&lb)?
            .exp()?;
        if want[2] {
            add(&mut dv, p.to_dtype(dt)?.t()?.matmul(&gb)?)?;
        }
        if !(want[0] || want[1]) {
            continue;
        }
        // rowsum(dO * O): the softmax backward's correction.
        let delta = (gb.to_dtype(st)? * ob.to_dtype(st)?)?.sum_keepdim(D::Minus1)?;
        let dp = gb.matmul(&vt)?.to_dtype(st)?;
        let ds = ((p * dp.broadcast_sub(&delta)?)? * scale)?.to_dtype(dt)?;
        if want[0] {
            dqs.push(ds.matmul(k)?);
        }
        if want[1] {
            add(&mut dk, ds.t()?.matmul(&qb)?)?;
        }
    }
    let dq = match dqs.len() {
        0 => None,
        1 => dqs.pop(),
        _ => Some(Tensor::cat(&dqs, 2)?),
    };
    let back = |t: Option<Tensor>| t.map(|t| t.to_dtype(dt)).transpose();
    Ok([dq, back(dk)?, back(dv)?])
}

/// The op on (q, k, v): the forward pass's output until the op adopts it, and the row
/// statistics for the backward pass.
struct BlockedAttn {
    rows: usize,
    scale: f64,
    out: Precomputed,
    lse: Tensor,
}

impl CustomOp3 for BlockedAttn {
    fn name(&self) -> &'static str {
        "mcld-blocked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = |t: &Tensor| t.detach().contiguous();
        let [dq, dk, dv] = backward(
            (&d(q)?, &d(k)?, &d(v)?),
            &d(res)?,
            &self.lse,
            &d(grad)?,
            self.rows,
            self.scale,
            [q.track_op(), k.track_op(), v.track_op()],
        )?;
        Ok((dq, dk, dv))
    }
}

/// `softmax(q k^T / sqrt(d)) v` for (B, H, Tq, d) x (B, H, Tk, d) x (B, H, Tk, dv) float tensors
/// on any one device, blocks of at most `max_scores` scores, as the custom op with the blocked
/// backward pass; `None` where the shapes do not fit together.
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_scores: usize,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    let applies = matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
        && [q, k, v]
            .iter()
            .all(|t| t.rank() == 4 && t.dtype() == dtype && t.device().same_device(q.device()));
    if !applies {
        return Ok(None);
    }
    let Some((b, h, tq, tk, d, _)) = qkv_dims(q, k, v)? else {
        return Ok(None);
    };
    let rows = rows_per_block(b * h, tq, tk, max_scores);
    let scale = 1.0 / (d as f64).sqrt();
    let dd = |t: &Tensor| t.detach().contiguous();
    let (out, lse) = forward(&dd(q)?, &dd(k)?, &dd(v)?, rows, scale)?;
    let op = BlockedAttn {
        rows,
        scale,
        out: Precomputed::new(out),
        lse,
    };
    Ok(Some(q.apply_op3(k, v, op)?))
}

/// [`attention_blocked`] for CUDA tensors (the training path's attention on a GPU), blocks of
/// at most `ATTENTION_CHUNK_ELEMS` scores; `None` for other devices.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !q.device().is_cuda() {
        return Ok(None);
    }
    attention_blocked(q, k, v, ATTENTION_CHUNK_ELEMS)
}
