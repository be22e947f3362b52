//! Timestep embedding, written to match diffusers' `get_timestep_embedding` + `TimestepEmbedding`.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::linear;
use crate::ops::linear::Linear;
use crate::Result;

/// Sinusoidal timestep features, computed in f32 as diffusers does (its fixtures depend on the
/// exact f32 rounding of `t * freq` at large t).
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let dev = timesteps.device();
    let half = dim / 2;
    let t = timesteps.to_dtype(DType::F32)?.flatten_all()?;
    let exponent = Tensor::arange(0u32, half as u32, dev)?.to_dtype(DType::F32)?;
    let exponent = ((exponent * -(10000f64.ln()))? / (half as f64 - freq_shift))?;
    let freqs = exponent.exp()?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        Ok(emb.pad_with_zeros(1, 0, 1)?)
    } else {
        Ok(emb)
    }
}

/// `time_embedding`: linear -> SiLU -> linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(x)?.silu()?;
        Ok(self.linear_2.forward(&h)?)
    }
}
