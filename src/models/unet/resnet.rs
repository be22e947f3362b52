//! ResnetBlock2D and the resampling convolutions of the SD UNet.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::layers::group_norm;
use crate::ops::norm::GroupNorm;

use crate::models::layers::conv2d;
use crate::ops::conv::Conv2d;

use crate::models::layers::linear;
use crate::ops::linear::Linear;
use crate::Result;

/// 3x3 (or `k`x`k`) convolution with "same" padding, the UNet's default.
pub fn conv(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    Ok(conv2d(cin, cout, k, cfg, vb)?)
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and output scale 1.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1)?,
            time_emb_proj: linear(temb, cout, vb.pp("time_emb_proj"))?,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1)?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// `Downsample2D` with a conv: stride 2; padding 0 means diffusers' asymmetric (0,1,0,1) pad.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, ch: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(ch, ch, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// Nearest-neighbour resize with torch's index rule (`floor(dst * in / out)`), written with
/// `index_select` so that its backward pass accumulates correctly (candle's
/// `upsample_nearest2d` backward does not, see shared/GPU.md).
pub fn nearest_resize(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let idx = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let scale = n_in as f32 / n_out as f32;
        let v: Vec<u32> = (0..n_out)
            .map(|i| ((i as f32 * scale) as usize).min(n_in - 1) as u32)
            .collect();
        Ok(Tensor::new(v, x.device())?)
    };
    let x = if ih == h {
        x.clone()
    } else {
        x.index_select(&idx(ih, h)?, 2)?
    };
    let x = if iw == w {
        x
    } else {
        x.index_select(&idx(iw, w)?, 3)?
    };
    Ok(x)
}

/// `Upsample2D`: nearest resize to an explicit size (2x, or the skip's size for odd inputs),
/// then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, ch: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), ch, ch, 3, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        let x = nearest_resize(x, size.0, size.1)?;
        Ok(self.conv.forward(&x)?)
    }
}
