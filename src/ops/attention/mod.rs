//! The one attention entry point of every network: the fused CPU kernel ([`cpu`]) where it
//! applies (f32 CPU tensors without gradient tracking), the custom op of [`grad`] on the CPU with
//! gradient tracking (its backward pass recomputes the probabilities block by block), its
//! tensor-op form in `ops::cuda::attention` for tracked CUDA tensors, else the
//! generic path from candle's primitives, sliced over query rows so large self-attentions never
//! hold all their scores.

use candle_core::{DType, Result, Tensor, D};

pub mod cpu;
pub mod grad;

/// (B, heads, Tq, Tk, d, dv).
pub(crate) type QkvDims = (usize, usize, usize, usize, usize, usize);

/// The [`QkvDims`] of rank-4 q, k, v that fit together, else `None` (the generic path then
/// reports the mismatch in candle's words).
pub(crate) fn qkv_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<QkvDims>> {
    let (b, h, tq, d) = q.dims4()?;
    let (kb, kh, tk, kd) = k.dims4()?;
    let (vb, vh, vt, dv) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vt) != (b, h, tk) || tk == 0 || d == 0 {
        return Ok(None);
    }
    Ok(Some((b, h, tq, tk, d, dv)))
}

/// `t` itself when its last dimension is dense (heads are read where they lie, from the split
/// projections' views), else a contiguous copy.
pub(crate) fn dense_rows(t: &Tensor) -> Result<Tensor> {
    if t.stride()[3] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Score elements (B x heads x query rows x keys) materialised at once by [`attention`]: 2^26
/// f32 values are 256 MiB, so SD-1.5's 4096-token self-attention runs in a few slices instead of
/// holding gigabytes of scores and softmax temporaries.
pub const ATTENTION_CHUNK_ELEMS: usize = 1 << 26;

/// Scaled dot-product attention on (B, heads, Tq, d) x (B, heads, Tk, d), computed in f32 for
/// half-precision inputs. Query rows are processed in slices of at most
/// [`ATTENTION_CHUNK_ELEMS`] scores (each row's result is independent of the slicing). Without
/// gradient tracking the fused softmax is used; with it, the softmax from primitives, because
/// the fused one has no backward pass. f32 on the CPU without gradients takes the fused kernel
/// of [`cpu`] instead, and f32 or f64 on the CPU with gradients the custom op of [`grad`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_bf16(q, k, v, false)
}

/// [`attention`]; with `bf16`, f32 CPU inputs multiply as bf16 with f32 accumulation where the
/// CPU can (the layers pass whether their weights are in the CPU bf16 mode).
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, bf16: bool) -> Result<Tensor> {
    if let Some(out) = cpu::attention(q, k, v, bf16)? {
        return Ok(out);
    }
    if (q.track_op() || k.track_op() || v.track_op()) && super::train_ops_enabled() {
        if let Some(out) = grad::attention(q, k, v)? {
            return Ok(out);
        }
        #[cfg(feature = "cuda")]
        if let Some(out) = super::cuda::attention::attention(q, k, v)? {
            return Ok(out);
        }
    }
    attention_chunked(q, k, v, ATTENTION_CHUNK_ELEMS)
}

/// [`attention`] with an explicit score budget (tests use small ones to exercise the slicing).
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, max_elems: usize) -> Result<Tensor> {
    let (b, h, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let per_row = (b * h * tk).max(1);
    let rows = (max_elems / per_row).clamp(1, tq.max(1));
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let grads = q.track_op() || k.track_op() || v.track_op();
    if rows >= tq {
        return attention_rows(&q.contiguous()?, &kt, &v, grads);
    }
    let mut outs = Vec::with_capacity(tq.div_ceil(rows));
    let mut start = 0;
    while start < tq {
        let n = rows.min(tq - start);
        let qs = q.narrow(2, start, n)?.contiguous()?;
        outs.push(attention_rows(&qs, &kt, &v, grads)?);
        start += n;
    }
    Tensor::cat(&outs, 2)
}

/// softmax(q k^T / sqrt(d)) v for one slice of query rows; `kt` is k transposed, contiguous.
fn attention_rows(q: &Tensor, kt: &Tensor, v: &Tensor, grads: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let d = q.dim(D::Minus1)? as f64;
    let scores = (q.matmul(kt)? * (1.0 / d.sqrt()))?;
    let scores = if dtype == DType::F64 {
        scores
    } else {
        scores.to_dtype(DType::F32)?
    };
    let probs = if grads {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs.to_dtype(dtype)?.matmul(v)
}

/// (B, T, heads*d) -> (B, heads, T, d)
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?.transpose(1, 2)
}

/// (B, heads, T, d) -> (B, T, heads*d)
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}
