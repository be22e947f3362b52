//! MCLD's pose guider: a small conv encoder that turns the target IUV image (in [0, 1]) into a
//! feature map the size of the denoising UNet's `conv_in` output, added to it.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Output channels: the UNet's `block_out_channels[0]` (320 for SD-1.5).
    pub conditioning_embedding_channels: usize,
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    #[serde(default = "default_blocks")]
    pub block_out_channels: Vec<usize>,
}

fn three() -> usize {
    3
}
fn default_blocks() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl Config {
    /// MCLD's: (16, 32, 96, 256) -> 320.
    pub fn mcld() -> Self {
        Self {
            conditioning_embedding_channels: 320,
            conditioning_channels: 3,
            block_out_channels: default_blocks(),
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

fn conv3(vb: VarBuilder, cin: usize, cout: usize, stride: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, 3, cfg, vb)?)
}

impl PoseGuider {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        if ch.is_empty() {
            return Err(Error::msg(
                "pose guider config: block_out_channels must not be empty",
            ));
        }
        let conv_in = conv3(vb.pp("conv_in"), cfg.conditioning_channels, ch[0], 1)?;
        let mut blocks = Vec::with_capacity(2 * (ch.len() - 1));
        for i in 0..ch.len() - 1 {
            blocks.push(conv3(vb.pp(format!("blocks.{}", 2 * i)), ch[i], ch[i], 1)?);
            blocks.push(conv3(
                vb.pp(format!("blocks.{}", 2 * i + 1)),
                ch[i],
                ch[i + 1],
                2,
            )?);
        }
        let conv_out = conv3(
            vb.pp("conv_out"),
            ch[ch.len() - 1],
            cfg.conditioning_embedding_channels,
            1,
        )?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
            in_channels: cfg.conditioning_channels,
        })
    }

    /// `pose`: (B, 3, H, W) in [0, 1] (the IUV image as float / 255).
    pub fn forward(&self, pose: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = pose.dims4()?;
        if c != self.in_channels {
            return Err(Error::msg(format!(
                "pose guider expects {} input channels, got {c} (shape {:?})",
                self.in_channels,
                pose.dims()
            )));
        }
        let mut x = self.conv_in.forward(pose)?.silu()?;
        for b in &self.blocks {
            x = b.forward(&x)?.silu()?;
        }
        Ok(self.conv_out.forward(&x)?)
    }
}
