//! MCLD's pose guider (SPEC §3): a small conv stack that turns the target DensePose IUV image into
//! features added to the denoising UNet's `conv_in` output.
//!
//! MCLD runs it through `InflatedConv3d` on (B, C, 1, H, W); that is a per-frame Conv2d, so
//! the 4-D version here has the same weights and the same keys.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::conv::Conv2d;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `PoseGuider` constructor arguments; unknown keys (`_class_name`) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Output width: the UNet's `block_out_channels[0]` (320 for SD-1.5).
    pub conditioning_embedding_channels: usize,
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
}

fn default_conditioning_channels() -> usize {
    3
}

/// MCLD's channel plan (the class default is (16, 32, 64, 128); MCLD passes these).
fn default_block_out_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl Config {
    /// The class defaults (train.py with `pose_guider_pretrain: false`): (16, 32, 64, 128).
    pub fn class_default(unet_channels: usize) -> Self {
        Self {
            conditioning_embedding_channels: unet_channels,
            conditioning_channels: default_conditioning_channels(),
            block_out_channels: vec![16, 32, 64, 128],
        }
    }

    /// The configuration MCLD trains with, for a UNet whose first block has `unet_channels`.
    pub fn mcld(unet_channels: usize) -> Self {
        Self {
            conditioning_embedding_channels: unet_channels,
            conditioning_channels: default_conditioning_channels(),
            block_out_channels: default_block_out_channels(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoseGuider {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
    in_channels: usize,
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, stride: usize, name: &str) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    crate::models::layers::conv2d(cin, cout, 3, cfg, vb.pp(name))
        .map_err(|e| Error::msg(format!("pose guider: {e}")))
}

impl PoseGuider {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        if ch.is_empty() || cfg.conditioning_channels == 0 {
            return Err(Error::msg(
                "pose guider: block_out_channels and conditioning_channels must be non-empty",
            ));
        }
        // MCLD names the first conv `conv_in1` when the input is not 3-channel.
        let name = if cfg.conditioning_channels == 3 {
            "conv_in"
        } else {
            "conv_in1"
        };
        let conv_in = conv(vb.clone(), cfg.conditioning_channels, ch[0], 1, name)?;
        let vbb = vb.pp("blocks");
        let mut blocks = Vec::with_capacity(2 * (ch.len() - 1));
        for (i, w) in ch.windows(2).enumerate() {
            blocks.push(conv(vbb.clone(), w[0], w[0], 1, &(2 * i).to_string())?);
            blocks.push(conv(vbb.clone(), w[0], w[1], 2, &(2 * i + 1).to_string())?);
        }
        let last = *ch.last().unwrap_or(&ch[0]);
        let conv_out = conv(vb, last, cfg.conditioning_embedding_channels, 1, "conv_out")?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
            in_channels: cfg.conditioning_channels,
        })
    }

    /// Features of a float image in [0, 1], (B, C, H, W) -> (B, out, H / 8, W / 8) (rounded up
    /// at each stride-2 conv).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != self.in_channels {
            return Err(Error::msg(format!(
                "pose guider: expected a (B, {}, H, W) pose image, got shape {dims:?}",
                self.in_channels
            )));
        }
        let mut h = candle_nn::ops::silu(&self.conv_in.forward(x)?)?;
        for b in &self.blocks {
            h = candle_nn::ops::silu(&b.forward(&h)?)?;
        }
        Ok(self.conv_out.forward(&h)?)
    }

    /// Features of a uint8 IUV image, scaled to [0, 1] as torchvision's `ToTensor` does
    /// (a true division by 255), then cast to `dtype`.
    pub fn forward_u8(&self, iuv: &Tensor, dtype: DType) -> Result<Tensor> {
        if iuv.dtype() != DType::U8 {
            return Err(Error::msg(format!(
                "pose guider: forward_u8 expects a uint8 IUV image, got {:?}",
                iuv.dtype()
            )));
        }
        let x = iuv.to_dtype(DType::F32)?;
        let s = Tensor::new(255f32, x.device())?;
        let x = x.broadcast_div(&s)?.to_dtype(dtype)?;
        self.forward(&x)
    }
}
