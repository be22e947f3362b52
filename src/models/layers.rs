//! The layers of the networks built from a `VarBuilder`: the state dict's names (`weight`,
//! `bias`) and the initialisation of fresh training weights live here, the arithmetic in `ops`.

use candle_core::Result;
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::conv::Conv2d;
use crate::ops::linear::Linear;
use crate::ops::norm::{GroupNorm, LayerNorm};

/// `candle_nn::linear` as our `Linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// `candle_nn::linear_no_bias` as our `Linear`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}

/// `candle_nn::conv2d` as our `Conv2d`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    candle_nn::conv2d(cin, cout, k, cfg, vb).map(Conv2d::from)
}

/// candle_nn's `group_norm` constructor (weight defaults to ones and bias to zeros where the
/// builder initialises), as our [`GroupNorm`].
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, channels, groups, eps)
}

/// Affine LayerNorm over `dim` (torch's `nn.LayerNorm(dim)`).
pub fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(dim, "weight")?,
        vb.get(dim, "bias")?,
        eps,
    ))
}
