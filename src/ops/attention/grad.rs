//! Scaled dot-product attention as a candle custom op with a memory-efficient backward pass,
//! for training on the CPU (self-attention with the reference bank, cross- and IP-attention all
//! come through here).
//!
//! candle's composed attention keeps the scores and the probabilities of every head for the
//! backward pass (two n x n matrices per head, plus the softmax's temporaries) and walks them
//! several times through memory. Here the forward pass keeps only its output and each query
//! row's log-sum-exp; the backward pass goes over blocks of query rows (their scores fit in the
//! cache), recomputes the block's probabilities from those statistics and forms
//! `dV += P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = dS K / sqrt(d)` and
//! `dK += dS^T Q / sqrt(d)`, as FlashAttention-2 does. Heads run in parallel. In f32 the
//! forward pass is the inference kernel's (`super::cpu`, packed; bf16 operands inside the
//! autocast scope) plus the statistics; the backward pass and f64 (what the tests check against
//! finite differences) go through the `gemm` crate.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::autocast::Products;
use crate::ops::elem::Elem;
use crate::ops::host::{zeroed, SharedOut};
use crate::ops::packed_gemm::{self, Kind};

/// Scores per block: about 512 KiB of f32, inside a core's L2.
const BLOCK_SCORES: usize = 1 << 17;

/// Element strides of a (B, heads, T, d) operand whose rows are dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Strides {
    batch: usize,
    head: usize,
    row: usize,
}

impl Strides {
    fn of(stride: &[usize]) -> Self {
        Self {
            batch: stride[0],
            head: stride[1],
            row: stride[2],
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    bh: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    /// Offset of row `r` of head `bh` (batch-major) in an operand with strides `st`.
    fn at(&self, st: Strides, bh: usize, r: usize) -> usize {
        bh / self.heads * st.batch + bh % self.heads * st.head + r * st.row
    }

    /// Offset of row `r` of head `bh` in the (B, Tq, heads, dv) output.
    fn out_at(&self, bh: usize, r: usize) -> usize {
        (bh / self.heads * self.tq + r) * self.heads * self.dv + bh % self.heads * self.dv
    }

    fn rows_per_block(&self) -> usize {
        (BLOCK_SCORES / self.tk.max(1)).clamp(1, self.tq.max(1))
    }

    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

/// `c (m x n, row stride ldc) (+)= beta * a b` on this thread; operands as (pointer, row
/// stride, column stride).
///
/// # Safety
/// The operands span what their strides say; `c` is not touched by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm1<T: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a.0,
        a.2 as isize,
        a.1 as isize,
        b.0,
        b.2 as isize,
        b.1 as isize,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Lanes of the row reductions: one chain of additions waits on each addition's latency (and
/// cannot be reordered by the compiler); sixteen independent ones vectorise.
const LANES: usize = 16;

fn row_sum<T: Elem>(row: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a += b;
        }
    }
    let s = acc.iter().fold(T::zero(), |a, &b| a + b);
    rest.iter().fold(s, |a, &b| a + b)
}

fn row_max<T: Elem>(row: &[T]) -> T {
    let max = |a: T, b: T| if b > a { b } else { a };
    let mut acc = [T::from_f64(f64::NEG_INFINITY); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a = max(*a, b);
        }
    }
    let m = acc
        .iter()
        .fold(T::from_f64(f64::NEG_INFINITY), |a, &b| max(a, b));
    rest.iter().fold(m, |a, &b| max(a, b))
}

/// The forward pass: the output in (B, Tq, heads, dv) and each query row's log-sum-exp of the
/// scaled scores, batch-major by head.
fn forward<T: Elem>(
    s: &Dims,
    (q, qs): (&[T], Strides),
    (k, ks): (&[T], Strides),
    (v, vs): (&[T], Strides),
) -> (Vec<T>, Vec<f64>) {
    let mut out = zeroed(s.bh * s.tq * s.dv, T::zero());
    let mut lse = zeroed(s.bh * s.tq, 0f64);
    let rows = s.rows_per_block();
    let blocks = s.tq.div_ceil(rows);
    let scale = T::from_f64(s.scale());
    let dst = SharedOut::new(&mut out);
    let lse_dst = SharedOut::new(&mut lse);
    (0..s.bh * blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<T>, task| {
            let (head, blk) = (task / blocks, task % blocks);
            let r0 = blk * rows;
            let n = rows.min(s.tq - r0);
            // SAFETY: this task's rows of the statistics, written by it alone.
            let lse_blk =
                unsafe { std::slice::from_raw_parts_mut(lse_dst.get().add(head * s.tq + r0), n) };
            scores.resize(n * s.tk, T::zero());
            // SAFETY: the operands are the inputs' rows of this head at their strides; the
            // output rows r0..r0+n of this head's columns belong to this task alone.
            unsafe {
                gemm1(
                    (n, s.tk, s.d),
                    scores.as_mut_ptr(),
                    s.tk,
                    false,
                    (q.as_ptr().add(s.at(qs, head, r0)), qs.row, 1),
                    (k.as_ptr().add(s.at(ks, head, 0)), 1, ks.row),
                    scale,
                );
            }
            let mut inv = Vec::with_capacity(n);
            for (i, row) in scores.chunks_exact_mut(s.tk).enumerate() {
                let m = row_max(row);
                T::exp_shifted(row, m);
                let l = row_sum(row);
                lse_blk[i] = m.to_f64() + l.to_f64().ln();
                inv.push(T::from_f64(1.0) / l);
            }
            unsafe {
                let o = dst.get().add(s.out_at(head, r0));
                gemm1(
                    (n, s.dv, s.tk),
                    o,
                    s.heads * s.dv,
                    false,
                    (scores.as_ptr(), s.tk, 1),
                    (v.as_ptr().add(s.at(vs, head, 0)), vs.row, 1),
                    T::from_f64(1.0),
                );
                for (i, &f) in inv.iter().enumerate() {
                    let row = std::slice::from_raw_parts_mut(o.add(i * s.heads * s.dv), s.dv);
                    for x in row {
                        *x *= f;
                    }
                }
            }
        });
    (out, lse)
}

/// The gradients of q, k, v (each (B, heads, T, d), contiguous) from the output gradient `dout`
/// and the forward pass's output `out` (both (B, Tq, heads, dv), contiguous) and statistics.
#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    s: &Dims,
    (q, qs): (&[T], Strides),
    (k, ks): (&[T], Strides),
    (v, vs): (&[T], Strides),
    out: &[T],
    dout: &[T],
    lse: &[f64],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dq = zeroed(s.bh * s.tq * s.d, T::zero());
    let mut dk = zeroed(s.bh * s.tk * s.d, T::zero());
    let mut dv = zeroed(s.bh * s.tk * s.dv, T::zero());
    let rows = s.rows_per_block();
    let scale = T::from_f64(s.scale());
    let one = T::from_f64(1.0);
    let ld_out = s.heads * s.dv;
    dq.par_chunks_mut(s.tq * s.d)
        .zip(dk.par_chunks_mut(s.tk * s.d))
        .zip(dv.par_chunks_mut(s.tk * s.dv))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, dp): &mut (Vec<T>, Vec<T>), (head, ((dq_h, dk_h), dv_h))| {
                // rowsum(dO * O) per query row: the softmax backward's correction.
                let delta: Vec<T> = (0..s.tq)
                    .map(|r| {
                        let o = &out[s.out_at(head, r)..][..s.dv];
                        let g = &dout[s.out_at(head, r)..][..s.dv];
                        o.iter().zip(g).fold(T::zero(), |a, (&x, &y)| a + x * y)
                    })
                    .collect();
                let kp = k[s.at(ks, head, 0)..].as_ptr();
                let vp = v[s.at(vs, head, 0)..].as_ptr();
                let mut r0 = 0;
                while r0 < s.tq {
                    let n = rows.min(s.tq - r0);
                    p.resize(n * s.tk, T::zero());
                    dp.resize(n * s.tk, T::zero());
                    let qp = q[s.at(qs, head, r0)..].as_ptr();
                    let gp = dout[s.out_at(head, r0)..].as_ptr();
                    // SAFETY: every operand is a block of this head's rows at its strides;
                    // the destinations are this task's own buffers.
                    unsafe {
                        // The block's probabilities from the saved statistics.
                        gemm1(
                            (n, s.tk, s.d),
                            p.as_mut_ptr(),
                            s.tk,
                            false,
                            (qp, qs.row, 1),
                            (kp, 1, ks.row),
                            scale,
                        );
                        for (i, row) in p.chunks_exact_mut(s.tk).enumerate() {
                            T::exp_shifted(row, T::from_f64(lse[head * s.tq + r0 + i]));
                        }
                        // dV += P^T dO
                        gemm1(
                            (s.tk, s.dv, n),
                            dv_h.as_mut_ptr(),
                            s.dv,
                            true,
                            (p.as_ptr(), 1, s.tk),
                            (gp, ld_out, 1),
                            one,
                        );
                        // dP = dO V^T, then dS = P * (dP - delta) in its place.
                        gemm1(
                            (n, s.tk, s.dv),
                            dp.as_mut_ptr(),
                            s.tk,
                            false,
                            (gp, ld_out, 1),
                            (vp, 1, vs.row),
                            one,
                        );
                    }
                    for (i, (dsr, pr)) in dp
                        .chunks_exact_mut(s.tk)
                        .zip(p.chunks_exact(s.tk))
                        .enumerate()
                    {
                        let dl = delta[r0 + i];
                        for (x, &pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - dl);
                        }
                    }
                    unsafe {
                        // dQ = dS K * scale
                        gemm1(
                            (n, s.d, s.tk),
                            dq_h.as_mut_ptr().add(r0 * s.d),
                            s.d,
                            false,
                            (dp.as_ptr(), s.tk, 1),
                            (kp, ks.row, 1),
                            scale,
                        );
                        // dK += dS^T Q * scale
                        gemm1(
                            (s.tk, s.d, n),
                            dk_h.as_mut_ptr(),
                            s.d,
                            true,
                            (dp.as_ptr(), 1, s.tk),
                            (qp, qs.row, 1),
                            scale,
                        );
                    }
                    r0 += n;
                }
            },
        );
    (dq, dk, dv)
}

/// The operand kind of the packed kernel for `products`, where the CPU has it.
fn packed_kind(products: Products) -> Option<Kind> {
    match products {
        Products::Bf16 if packed_gemm::available() => Some(Kind::Bf16Pairs),
        _ if packed_gemm::available_f32() => Some(Kind::F32),
        _ => None,
    }
}

/// A CPU operand's data from its start offset, with its strides.
fn view<'a, T: Elem>(
    st: &'a candle_core::Storage,
    l: &Layout,
) -> candle_core::Result<(&'a [T], Strides)> {
    match st {
        candle_core::Storage::Cpu(c) => Ok((
            &T::cpu_storage_as_slice(c)?[l.start_offset()..],
            Strides::of(l.stride()),
        )),
        _ => candle_core::bail!("attention op: expected CPU tensors"),
    }
}

/// The op: shapes, how it multiplies, and the row statistics its forward pass leaves for its
/// backward pass.
struct AttnOp {
    dims: Dims,
    /// The packed kernel's operand kind for the f32 forward pass (from the autocast scope when
    /// the op was built), `None` for the `gemm` crate.
    packed: Option<Kind>,
    /// Log-sum-exp of each query row's scaled scores (B, heads, Tq).
    lse: Mutex<Vec<f64>>,
}

impl AttnOp {
    fn fwd_t<T: Elem>(
        &self,
        a: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let view = |i: usize| -> candle_core::Result<(&[T], Strides)> {
            let (st, l) = a[i];
            let data = &T::cpu_storage_as_slice(st)?[l.start_offset()..];
            Ok((data, Strides::of(l.stride())))
        };
        let (out, lse) = forward(&self.dims, view(0)?, view(1)?, view(2)?);
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("attention op: lock"))? = lse;
        let s = &self.dims;
        let shape = Shape::from((s.bh / s.heads, s.tq, s.heads, s.dv));
        Ok((T::to_cpu_storage_owned(out), shape))
    }

    /// [`AttnOp::fwd_t`] for f32 on the packed kernel (`self.packed`).
    fn fwd_packed(
        &self,
        kind: Kind,
        a: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = &self.dims;
        let data = |i: usize| -> candle_core::Result<&[f32]> {
            let (st, l) = a[i];
            Ok(&st.as_slice::<f32>()?[l.start_offset()..])
        };
        let st = |i: usize| {
            let x = Strides::of(a[i].1.stride());
            [x.batch, x.head, x.row]
        };
        let (out, lse) = super::cpu::packed_forward(
            kind,
            (s.bh, s.heads, s.tq, s.tk, s.d, s.dv),
            [st(0), st(1), st(2)],
            (data(0)?, data(1)?, data(2)?),
        )
        .map_err(candle_core::Error::wrap)?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("attention op: lock"))? = lse;
        let shape = Shape::from((s.bh / s.heads, s.tq, s.heads, s.dv));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd_t<T: Elem>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("attention op: lock"))?;
        if lse.len() != self.dims.bh * self.dims.tq {
            candle_core::bail!("attention op: backward without the forward pass's statistics");
        }
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (so, lo) = res.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (dq, dk, dv) = backward(
            &self.dims,
            view(&sq, lq)?,
            view(&sk, lk)?,
            view(&sv, lv)?,
            view(&so, lo)?.0,
            view(&sg, lg)?.0,
            &lse,
        );
        let dev = q.device();
        let s = &self.dims;
        let b = s.bh / s.heads;
        let t = |data: Vec<T>, rows: usize, w: usize, arg: &Tensor| {
            if arg.track_op() {
                Tensor::from_vec(data, (b, s.heads, rows, w), dev).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((
            t(dq, s.tq, s.d, q)?,
            t(dk, s.tk, s.d, k)?,
            t(dv, s.tk, s.dv, v)?,
        ))
    }
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "mcld-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for l in [l1, l2, l3] {
            if l.stride()[3] != 1 {
                candle_core::bail!("attention op: rows must be dense");
            }
        }
        let a = [(s1, l1), (s2, l2), (s3, l3)];
        match (s1.dtype(), self.packed) {
            (DType::F32, Some(kind)) => self.fwd_packed(kind, a),
            (DType::F32, None) => self.fwd_t::<f32>(a),
            (DType::F64, _) => self.fwd_t::<f64>(a),
            (dt, _) => candle_core::bail!("attention op: no kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The backward pass stays on the `gemm` crate in f32 whatever the forward multiplied
        // with: its products are one head wide, and packing each block's probabilities and
        // score gradients for the packed kernel cost more than it saved (README, issue #24).
        match q.dtype() {
            DType::F32 => self.bwd_t::<f32>(q, k, v, res, grad),
            DType::F64 => self.bwd_t::<f64>(q, k, v, res, grad),
            dt => candle_core::bail!("attention op: no kernel for {dt:?}"),
        }
    }
}

/// `softmax(q k^T / sqrt(d)) v` for (B, H, Tq, d) x (B, H, Tk, d) x (B, H, Tk, dv) f32 or f64
/// CPU tensors, as the custom op; `None` where that does not hold.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    let applies = matches!(dtype, DType::F32 | DType::F64)
        && [q, k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype && t.rank() == 4);
    if !applies {
        return Ok(None);
    }
    let Some((b, h, tq, tk, d, dv)) = super::qkv_dims(q, k, v)? else {
        return Ok(None);
    };
    let op = AttnOp {
        dims: Dims {
            heads: h,
            bh: b * h,
            tq,
            tk,
            d,
            dv,
        },
        lse: Mutex::new(Vec::new()),
        packed: packed_kind(Products::current()),
    };
    let out =
        super::dense_rows(q)?.apply_op3(&super::dense_rows(k)?, &super::dense_rows(v)?, op)?;
    Ok(Some(out.transpose(1, 2)?))
}
