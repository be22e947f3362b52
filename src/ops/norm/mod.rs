//! The norms of every network: LayerNorm from primitives (candle's fused one has no backward
//! pass, see shared/GPU.md, and the same modules are trained) and GroupNorm(+SiLU), each taking
//! the one-pass kernels of [`fused`] where no gradient is needed and, on the CPU with gradient
//! tracking, the custom ops of [`grad`] (fused backward passes); tracked CUDA tensors take
//! `ops::cuda::norm` (the same backward in tensor ops).

use candle_core::{DType, Module, Result, Tensor, D};

pub mod fused;
pub mod grad;

/// LayerNorm over the last dimension, built from primitives so gradients flow.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Affine LayerNorm (torch's `nn.LayerNorm(dim)`).
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight: Some(weight),
            bias: Some(bias),
            eps,
        }
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
        if let Some(y) = fused::layer_norm(x, self.eps, self.weight.as_ref(), self.bias.as_ref())? {
            return Ok(y);
        }
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            let tracked = x.track_op() || w.track_op() || b.track_op();
            if tracked && super::train_ops_enabled() {
                if let Some(y) = grad::layer_norm(x, self.eps, w, b)? {
                    return Ok(y);
                }
                #[cfg(feature = "cuda")]
                if let Some(y) = super::cuda::norm::layer_norm(x, self.eps, w, b)? {
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

    /// The fused inference kernel, or with gradient tracking the custom op of [`grad`]; `None`
    /// where neither applies.
    fn fused(&self, x: &Tensor, act: bool) -> Result<Option<Tensor>> {
        let (w, b) = (&self.weight, &self.bias);
        if let Some(y) = fused::group_norm(x, self.groups, self.eps, w, b, act)? {
            return Ok(Some(y));
        }
        let tracked = x.track_op() || w.track_op() || b.track_op();
        if tracked && super::train_ops_enabled() {
            #[cfg(feature = "cuda")]
            if x.device().is_cuda() {
                return super::cuda::norm::group_norm(x, self.groups, self.eps, w, b, act);
            }
            return grad::group_norm(x, self.groups, self.eps, w, b, act);
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
