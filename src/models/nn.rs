//! Small building blocks shared by the networks. LayerNorm and softmax are written from
//! primitives on purpose: candle's fused versions have no backward pass (see shared/GPU.md), and
//! the same modules are trained.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dimension, built from primitives so gradients flow.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Affine LayerNorm with `weight` and `bias` (torch's `nn.LayerNorm(dim)`).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(vb.get(dim, "weight")?),
            bias: Some(vb.get(dim, "bias")?),
            eps,
        })
    }

    /// LayerNorm without learned parameters (`elementwise_affine=False`).
    pub fn plain(eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) =
            super::fused::layer_norm(x, self.eps, self.weight.as_ref(), self.bias.as_ref())?
        {
            return Ok(y);
        }
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            let tracked = x.track_op() || w.track_op() || b.track_op();
            if tracked && crate::ops::enabled() {
                if let Some(y) = crate::ops::norm_grad::layer_norm(x, self.eps, w, b)? {
                    return Ok(y);
                }
            }
        }
        let dtype = x.dtype();
        // Statistics in f32 at least: f16/bf16 means over 1280 channels lose too much.
        let xf = if dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }
}

/// GroupNorm over (B, C, ...) with per-channel weight and bias: candle's module, or one fused
/// CPU pass (with the SiLU that usually follows) where no gradient is needed.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let composed =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            composed,
        })
    }

    /// `silu(group_norm(x))`, the resnet blocks' pre-activation.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => candle_nn::ops::silu(&self.composed.forward(x)?),
        }
    }

    /// The fused inference kernel, or with gradient tracking the custom op of
    /// `ops::norm_grad`; `None` where neither applies.
    fn fused(&self, x: &Tensor, act: bool) -> Result<Option<Tensor>> {
        let (w, b) = (&self.weight, &self.bias);
        if let Some(y) = super::fused::group_norm(x, self.groups, self.eps, w, b, act)? {
            return Ok(Some(y));
        }
        let tracked = x.track_op() || w.track_op() || b.track_op();
        if tracked && crate::ops::enabled() {
            return crate::ops::norm_grad::group_norm(x, self.groups, self.eps, w, b, act);
        }
        Ok(None)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.composed.forward(x),
        }
    }
}

/// candle_nn's `group_norm` constructor (weight defaults to ones and bias to zeros where the
/// builder initialises), as [`GroupNorm`].
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, channels, groups, eps)
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
/// of `cpu_attention` instead, and f32 or f64 on the CPU with gradients the custom op of
/// `ops::attention_grad` (its backward pass recomputes the probabilities block by block).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_bf16(q, k, v, false)
}

/// [`attention`]; with `bf16`, f32 CPU inputs multiply as bf16 with f32 accumulation where the
/// CPU can (the layers pass whether their weights are in the CPU bf16 mode).
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, bf16: bool) -> Result<Tensor> {
    if let Some(out) = super::cpu_attention::attention(q, k, v, bf16)? {
        return Ok(out);
    }
    // With gradient tracking: our op, whose backward pass keeps no score matrix.
    if (q.track_op() || k.track_op() || v.track_op()) && crate::ops::enabled() {
        if let Some(out) = crate::ops::attention_grad::attention(q, k, v)? {
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
