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

/// Scaled dot-product attention on (B, heads, Tq, d) x (B, heads, Tk, d); softmax from
/// primitives (differentiable), computed in f32 for half-precision inputs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let d = q.dim(D::Minus1)? as f64;
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * (1.0 / d.sqrt()))?;
    let scores = if dtype == DType::F64 {
        scores
    } else {
        scores.to_dtype(DType::F32)?
    };
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
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
