//! `AutoencoderKL` (diffusers), the SD VAE that maps 512x512 photos to 4x64x64 latents.
//! Written here rather than taken from candle-transformers because MCLD needs the posterior's
//! mean and log-variance separately (reference latents use the mean, training samples with its
//! own noise), which candle's version keeps private. The VAE is frozen in MCLD, so candle's
//! fused GroupNorm/softmax (no backward pass) are fine here.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::layers::conv2d;
use crate::ops::conv::Conv2d;
use serde::Deserialize;

use crate::ops::attention::{attention_bf16, merge_heads, split_heads};
use crate::ops::linear::Linear;
use crate::ops::norm::GroupNorm;
use crate::{Error, Result};

fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_three() -> usize {
    3
}
fn default_latent() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_layers() -> usize {
    1
}

/// diffusers' `vae/config.json`; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl Config {
    /// Parses a diffusers config.json; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&s).map_err(|e| Error::config(path, e.to_string()))
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(s).map_err(|e| Error::msg(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(m));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "act_fn {:?} is not supported (only silu)",
                self.act_fn
            ));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return bad(format!("down block type {t:?} is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return bad(format!("up block type {t:?} is not supported"));
            }
        }
        for (name, n) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if n != 0 && n != self.block_out_channels.len() {
                return bad(format!(
                    "{name} has {n} entries but block_out_channels has {}",
                    self.block_out_channels.len()
                ));
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "{c} channels are not divisible by norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}

const EPS: f64 = 1e-6;

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    Ok(conv2d(cin, cout, k, cfg, vb)?)
}

fn group_norm(vb: VarBuilder, groups: usize, c: usize) -> Result<GroupNorm> {
    // Loaded with `get` (not candle's hinted init) so a missing tensor is an error.
    let w = vb.get(c, "weight")?;
    let b = vb.get(c, "bias")?;
    Ok(GroupNorm::new(w, b, c, groups, EPS)?)
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, cin)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(vb.pp("norm2"), groups, cout)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        let skip = match &self.shortcut {
            Some(c) => x.apply(c)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// Single-head spatial self-attention of the mid block.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

/// A linear layer that old checkpoints store as a 1x1 conv (C, C, 1, 1).
fn linear_maybe_conv(vb: VarBuilder, c: usize) -> Result<Linear> {
    let w = vb.get_unchecked("weight")?;
    let w = match w.dims() {
        [a, b] if *a == c && *b == c => w,
        [a, b, 1, 1] if *a == c && *b == c => w.reshape((c, c))?,
        d => {
            return Err(Error::msg(format!(
                "{}.weight has shape {d:?}, expected [{c}, {c}]",
                vb.prefix()
            )))
        }
    };
    let b = vb.get(c, "bias")?;
    // A bf16 weight under an f32 builder is the CPU bf16 mode's (`weights::bf16_matmul_weights`).
    let w = if w.dtype() == DType::BF16 && vb.dtype() == DType::F32 {
        w
    } else {
        w.to_dtype(vb.dtype())?
    };
    Ok(Linear::new(w, Some(b)))
}

impl AttentionBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        // diffusers renamed query/key/value/proj_attn to to_q/to_k/to_v/to_out.0; accept both.
        let names = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            norm: group_norm(vb.pp("group_norm"), groups, c)?,
            q: linear_maybe_conv(vb.pp(names[0]), c)?,
            k: linear_maybe_conv(vb.pp(names[1]), c)?,
            v: linear_maybe_conv(vb.pp(names[2]), c)?,
            out: linear_maybe_conv(vb.pp(names[3]), c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = split_heads(&t.apply(&self.q)?, 1)?;
        let k = split_heads(&t.apply(&self.k)?, 1)?;
        let v = split_heads(&t.apply(&self.v)?, 1)?;
        let o =
            merge_heads(&attention_bf16(&q, &k, &v, self.q.is_bf16_mixed())?)?.apply(&self.out)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResnetBlock,
    attn: Option<AttentionBlock>,
    res1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, with_attn: bool) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(vb.pp("resnets.0"), c, c, groups)?,
            attn: if with_attn {
                Some(AttentionBlock::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            res1: ResnetBlock::new(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.res1.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct Stage {
    resnets: Vec<ResnetBlock>,
    /// Downsampler (stride-2 conv after asymmetric padding) or upsampler (nearest 2x + conv).
    resample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    stages: Vec<Stage>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut stages = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        bvb.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < ch.len() {
                Some(conv(bvb.pp("downsamplers.0.conv"), cout, cout, 3, 2, 0)?)
            } else {
                None
            };
            stages.push(Stage { resnets, resample });
            cin = cout;
        }
        let last = *ch.last().unwrap();
        Ok(Self {
            conv_in,
            stages,
            mid: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            norm_out: group_norm(vb.pp("conv_norm_out"), g, last)?,
            conv_out: conv(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.apply(&self.conv_in)?;
        for s in &self.stages {
            for r in &s.resnets {
                x = r.forward(&x)?;
            }
            if let Some(d) = &s.resample {
                // diffusers pads right/bottom by one before the unpadded stride-2 conv.
                x = x.pad_with_zeros(D::Minus1, 0, 1)?;
                x = x.pad_with_zeros(D::Minus2, 0, 1)?.apply(d)?;
            }
        }
        let x = self.mid.forward(&x)?;
        Ok(self.norm_out.forward_silu(&x)?.apply(&self.conv_out)?)
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    stages: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?;
        let mut stages = Vec::new();
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::new(
                        bvb.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < rev.len() {
                Some(conv(bvb.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?)
            } else {
                None
            };
            stages.push(Stage { resnets, resample });
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            stages,
            norm_out: group_norm(vb.pp("conv_norm_out"), g, first)?,
            conv_out: conv(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid.forward(&z.apply(&self.conv_in)?)?;
        for s in &self.stages {
            for r in &s.resnets {
                x = r.forward(&x)?;
            }
            if let Some(u) = &s.resample {
                let (_, _, h, w) = x.dims4()?;
                x = x.upsample_nearest2d(2 * h, 2 * w)?.apply(u)?;
            }
        }
        Ok(self.norm_out.forward_silu(&x)?.apply(&self.conv_out)?)
    }
}

/// The KL autoencoder: `encode` gives the Gaussian posterior, `decode` maps latents to images.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: Config,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    /// Loads `diffusion_pytorch_model.safetensors`-style files; errors name the file.
    pub fn load(files: &[&Path], cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let (vb, shown) = crate::weights::mmap_safetensors(files, dtype, device)?;
        Self::new(vb, cfg).map_err(|e| Error::weights(&shown, e.to_string()))
    }

    /// Images in [-1, 1], (B, C, H, W) -> posterior (mean, logvar), logvar clamped to
    /// [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4().map_err(|_| {
            Error::msg(format!(
                "VAE encode: expected (B, C, H, W), got {:?}",
                x.dims()
            ))
        })?;
        if c != self.config.in_channels {
            return Err(Error::msg(format!(
                "VAE encode: input has {c} channels, the model expects {}",
                self.config.in_channels
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::msg("VAE encode: empty image"));
        }
        let mut p = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            p = p.apply(q)?;
        }
        let l = self.config.latent_channels;
        let mean = p.narrow(1, 0, l)?;
        let logvar = p.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// `latent_dist.sample()` with caller-supplied standard normal noise: mean + std * noise.
    pub fn sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean + std.mul(noise)?)?)
    }

    /// Latents (B, latent_channels, h, w), unscaled -> raw decoder output (about [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let c = z
            .dims4()
            .map_err(|_| {
                Error::msg(format!(
                    "VAE decode: expected (B, C, h, w), got {:?}",
                    z.dims()
                ))
            })?
            .1;
        if c != self.config.latent_channels {
            return Err(Error::msg(format!(
                "VAE decode: latents have {c} channels, the model expects {}",
                self.config.latent_channels
            )));
        }
        let z = match &self.post_quant_conv {
            Some(p) => z.apply(p)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
