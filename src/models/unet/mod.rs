//! diffusers' `UNet2DConditionModel` (SD-1.5 layout) in MCLD's two roles (SPEC §3):
//! the reference UNet, whose forward returns the bank of self-attention inputs, and the
//! denoising UNet, which reads that bank, adds pose features after `conv_in`, routes face tokens
//! through IP-adapter cross-attention and takes one context per stage. Every per-call input is
//! an argument; the model holds no state between calls.

mod attention;
mod blocks;
mod ckpt;
mod embeddings;
mod resnet;

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};

use crate::models::checkpoint::Tape;
use crate::models::conv::Conv2d;
use serde::{Deserialize, Serialize};

pub use attention::IpAdapter;
use attention::{RunCtx, TransformerSpec};
use blocks::{BlockCommon, DownBlock, MidBlock, UpBlock};
pub use embeddings::timestep_features;
use embeddings::TimestepEmbedding;
use resnet::conv;
pub use resnet::nearest_resize;

use crate::{Error, Result};

/// A value diffusers accepts either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i],
        }
    }
    fn check_len(&self, key: &str, n: usize) -> Result<()> {
        match self {
            PerBlock::Many(v) if v.len() != n => Err(Error::msg(format!(
                "UNet config: {key} has {} entries, block_out_channels has {n}",
                v.len()
            ))),
            _ => Ok(()),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_three() -> usize {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock {
    PerBlock::One(2)
}
fn d_tlayers() -> PerBlock {
    PerBlock::One(1)
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// The keys of diffusers' `UNet2DConditionModel` `config.json` this model uses (others are
/// ignored), with diffusers' defaults. `attention_head_dim` is the head COUNT in SD-1.x
/// configs, as diffusers interprets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Accepted for completeness: attention scores are always taken in f32 here.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

impl Config {
    /// SD-1.5's UNet config (cross_attention_dim 768).
    pub fn sd15() -> Self {
        Self {
            cross_attention_dim: 768,
            ..Self::default()
        }
    }

    /// Parses a diffusers `config.json` and validates it; errors name the file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Config = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not a UNet2DConditionModel config: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::config(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Head count of block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// Rejects configs this implementation cannot honour and inconsistent widths, naming the
    /// key and the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("UNet config: {m}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("down_block_types: unsupported block {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("up_block_types: unsupported block {t:?}"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return bad(format!(
                "mid_block_type {:?} unsupported (only UNetMidBlock2DCrossAttn)",
                self.mid_block_type
            ));
        }
        self.layers_per_block.check_len("layers_per_block", n)?;
        self.transformer_layers_per_block
            .check_len("transformer_layers_per_block", n)?;
        self.attention_head_dim.check_len("attention_head_dim", n)?;
        if let Some(h) = &self.num_attention_heads {
            h.check_len("num_attention_heads", n)?;
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return bad("norm_num_groups is 0".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % g != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups = {g}"
                ));
            }
            let h = self.heads(i);
            let key = if self.num_attention_heads.is_some() {
                "num_attention_heads"
            } else {
                "attention_head_dim"
            };
            if h == 0 || c % h != 0 {
                return bad(format!(
                    "{key} = {h} (head count) does not divide block_out_channels[{i}] = {c}"
                ));
            }
        }
        match &self.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(v) if v.iter().all(|x| x == false) => {}
            v => return bad(format!("only_cross_attention = {v} is not supported")),
        }
        if self.dual_cross_attention {
            return bad("dual_cross_attention = true is not supported".into());
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "act_fn = {:?} is not supported (silu)",
                self.act_fn
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return bad(format!(
                "resnet_time_scale_shift = {:?} is not supported (default)",
                self.resnet_time_scale_shift
            ));
        }
        if self.time_embedding_type != "positional" {
            return bad(format!(
                "time_embedding_type = {:?} is not supported (positional)",
                self.time_embedding_type
            ));
        }
        for (key, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
        ] {
            if set {
                return bad(format!("{key} is set; only null is supported"));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad(format!(
                "conv_in_kernel = {} / conv_out_kernel = {} must be odd",
                self.conv_in_kernel, self.conv_out_kernel
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.cross_attention_dim == 0 {
            return bad(
                "in_channels, out_channels and cross_attention_dim must be positive".into(),
            );
        }
        Ok(())
    }
}

/// What a UNet instance is built with, beyond its config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetOptions {
    /// Build `conv_norm_out`/`conv_out`. The reference UNet has none (its output is unused and
    /// the released `reference_unet.pth` lacks the keys).
    pub conv_out: bool,
    /// IP-adapter projections in every cross-attention (denoising UNet).
    pub ip: Option<IpAdapter>,
}

impl Default for UNetOptions {
    fn default() -> Self {
        Self {
            conv_out: true,
            ip: None,
        }
    }
}

/// The reference UNet's record: the norm1 output entering each transformer block's
/// self-attention, shape (B, H*W, C), keyed by block name, in execution order.
#[derive(Debug, Clone, Default)]
pub struct ReferenceBank {
    pub entries: Vec<(String, Tensor)>,
}

impl ReferenceBank {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Which samples of the batch read the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankGuidance {
    /// Every sample attends to [own, bank].
    AllSamples,
    /// Classifier-free guidance batch [uncond, cond]: the first half uses plain
    /// self-attention, the second half reads the bank (MCLD's uc_mask fallback).
    UncondFirstHalf,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BankMode {
    /// Leading samples that ignore the bank.
    pub plain: usize,
    pub fp16_round: bool,
}

/// One context per UNet stage (MCLD: down [src, face], mid [src, tex, face], up [tex, face]).
#[derive(Debug, Clone)]
pub struct StageContexts {
    pub down: Tensor,
    pub mid: Tensor,
    pub up: Tensor,
}

impl StageContexts {
    /// The same context everywhere (a plain UNet).
    pub fn uniform(ctx: &Tensor) -> Self {
        Self {
            down: ctx.clone(),
            mid: ctx.clone(),
            up: ctx.clone(),
        }
    }
}

/// Inputs of the denoising forward.
#[derive(Debug, Clone)]
pub struct DenoiseInput<'a> {
    pub sample: &'a Tensor,
    /// One per sample (or one for all), any numeric dtype.
    pub timesteps: &'a Tensor,
    pub contexts: &'a StageContexts,
    /// Pose guider output, added to the `conv_in` output.
    pub pose_features: Option<&'a Tensor>,
    pub bank: Option<&'a ReferenceBank>,
    pub guidance: BankGuidance,
    /// Round the bank to f16 before reading it, as MCLD does (default true).
    pub bank_fp16_round: bool,
}

impl<'a> DenoiseInput<'a> {
    pub fn new(sample: &'a Tensor, timesteps: &'a Tensor, contexts: &'a StageContexts) -> Self {
        Self {
            sample,
            timesteps,
            contexts,
            pose_features: None,
            bank: None,
            guidance: BankGuidance::AllSamples,
            bank_fp16_round: true,
        }
    }
}

/// `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    cfg: Config,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: Option<(GroupNorm, Conv2d)>,
}

impl UNet2DConditionModel {
    /// A plain UNet with all weights of the diffusers state dict.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::new_with_options(vb, cfg, &UNetOptions::default())
    }

    /// MCLD's reference UNet: no `conv_norm_out`/`conv_out`.
    pub fn new_reference(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let opts = UNetOptions {
            conv_out: false,
            ip: None,
        };
        Self::new_with_options(vb, cfg, &opts)
    }

    /// MCLD's denoising UNet: IP-adapter cross-attention (`...attn2.processor.to_k_ip.weight`).
    pub fn new_denoising(vb: VarBuilder, cfg: &Config, ip: IpAdapter) -> Result<Self> {
        let opts = UNetOptions {
            conv_out: true,
            ip: Some(ip),
        };
        Self::new_with_options(vb, cfg, &opts)
    }

    pub fn new_with_options(vb: VarBuilder, cfg: &Config, opts: &UNetOptions) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let common = BlockCommon {
            temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            output_scale_factor: cfg.resnet_out_scale_factor,
        };
        let spec = |i: usize, c: usize| TransformerSpec {
            channels: c,
            heads: cfg.heads(i),
            ctx_dim: cfg.cross_attention_dim,
            groups: cfg.norm_num_groups,
            layers: cfg.transformer_layers_per_block.get(i),
            linear_proj: cfg.use_linear_projection,
            ip: opts.ip,
        };
        let conv_in = conv(
            vb.pp("conv_in"),
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            1,
        )?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let cin = out;
            out = ch[i];
            let name = format!("down_blocks.{i}");
            let s = spec(i, out);
            let attn = (ty == "CrossAttnDownBlock2D").then_some(&s);
            let down = (i + 1 < n).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(
                vb.pp(&name),
                &name,
                cin,
                out,
                cfg.layers_per_block.get(i),
                &common,
                attn,
                down,
            )?);
        }

        let mid_common = BlockCommon {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..common
        };
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            ch[n - 1],
            &mid_common,
            &spec(n - 1, ch[n - 1]),
            1,
        )?;
        let common = BlockCommon {
            output_scale_factor: cfg.resnet_out_scale_factor,
            ..mid_common
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out = ch[n - 1];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let r = n - 1 - i;
            let prev = out;
            out = ch[r];
            let cin = ch[r.saturating_sub(1)];
            let name = format!("up_blocks.{i}");
            let s = spec(r, out);
            let attn = (ty == "CrossAttnUpBlock2D").then_some(&s);
            up_blocks.push(UpBlock::new(
                vb.pp(&name),
                &name,
                cin,
                prev,
                out,
                cfg.layers_per_block.get(r) + 1,
                &common,
                attn,
                i + 1 < n,
            )?);
        }

        let conv_norm_out = if opts.conv_out {
            Some((
                candle_nn::group_norm(
                    cfg.norm_num_groups,
                    ch[0],
                    cfg.norm_eps,
                    vb.pp("conv_norm_out"),
                )?,
                conv(
                    vb.pp("conv_out"),
                    ch[0],
                    cfg.out_channels,
                    cfg.conv_out_kernel,
                    1,
                )?,
            ))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Plain forward: sample (B, C, H, W), timesteps (B) or (1), context (B, T, D).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        let ctx = StageContexts::uniform(context);
        let mut run = RunCtx {
            record: None,
            bank: None,
        };
        self.run(sample, timesteps, &ctx, None, &mut run, None, true, None)?
            .ok_or_else(|| Error::msg("UNet built without conv_out cannot produce a sample"))
    }

    /// Plain forward that also returns named intermediates ("time_emb", "conv_in",
    /// "down_blocks.i", "mid_block", "up_blocks.i") for parity checks.
    pub fn forward_with_debug(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let ctx = StageContexts::uniform(context);
        let mut run = RunCtx {
            record: None,
            bank: None,
        };
        let mut dbg = Vec::new();
        let out = self
            .run(
                sample,
                timesteps,
                &ctx,
                None,
                &mut run,
                Some(&mut dbg),
                true,
                None,
            )?
            .ok_or_else(|| Error::msg("UNet built without conv_out cannot produce a sample"))?;
        Ok((out, dbg))
    }

    /// Reference role: runs the UNet (without its output head) and returns the bank.
    pub fn forward_reference(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<ReferenceBank> {
        let ctx = StageContexts::uniform(context);
        let mut entries = Vec::new();
        let mut run = RunCtx {
            record: Some(&mut entries),
            bank: None,
        };
        self.run(sample, timesteps, &ctx, None, &mut run, None, false, None)?;
        Ok(ReferenceBank { entries })
    }

    /// Denoising role: stage contexts, optional pose features and reference bank.
    pub fn forward_denoise(&self, inp: &DenoiseInput) -> Result<Tensor> {
        let mode = self.bank_mode(inp)?;
        let mut run = RunCtx {
            record: None,
            bank: inp.bank.map(|bk| (bk, mode)),
        };
        self.run(
            inp.sample,
            inp.timesteps,
            inp.contexts,
            inp.pose_features,
            &mut run,
            None,
            true,
            None,
        )?
        .ok_or_else(|| Error::msg("UNet built without conv_out cannot produce a sample"))
    }

    fn bank_mode(&self, inp: &DenoiseInput) -> Result<BankMode> {
        let b = inp.sample.dim(0)?;
        let plain = match inp.guidance {
            BankGuidance::AllSamples => 0,
            BankGuidance::UncondFirstHalf => {
                if b % 2 != 0 {
                    return Err(Error::msg(format!(
                        "classifier-free guidance batch must be even, got {b}"
                    )));
                }
                b / 2
            }
        };
        Ok(BankMode {
            plain,
            fp16_round: inp.bank_fp16_round,
        })
    }

    /// [`UNet2DConditionModel::forward_reference`] with every block a checkpointed segment of
    /// `tape` (the bank entries it returns are the tape's output leaves).
    pub fn forward_reference_checkpointed<'s>(
        &'s self,
        tape: &Tape<'s>,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<ReferenceBank> {
        let ctx = StageContexts::uniform(context);
        let mut entries = Vec::new();
        let mut run = RunCtx {
            record: Some(&mut entries),
            bank: None,
        };
        self.run(
            sample,
            timesteps,
            &ctx,
            None,
            &mut run,
            None,
            false,
            Some(tape),
        )?;
        Ok(ReferenceBank { entries })
    }

    /// [`UNet2DConditionModel::forward_denoise`] with every block a checkpointed segment.
    pub fn forward_denoise_checkpointed<'s>(
        &'s self,
        tape: &Tape<'s>,
        inp: &DenoiseInput,
    ) -> Result<Tensor> {
        let mode = self.bank_mode(inp)?;
        let mut run = RunCtx {
            record: None,
            bank: inp.bank.map(|bk| (bk, mode)),
        };
        self.run(
            inp.sample,
            inp.timesteps,
            inp.contexts,
            inp.pose_features,
            &mut run,
            None,
            true,
            Some(tape),
        )?
        .ok_or_else(|| Error::msg("UNet built without conv_out cannot produce a sample"))
    }

    fn check_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &StageContexts,
    ) -> Result<Tensor> {
        let dims = sample.dims();
        if dims.len() != 4 || dims[1] != self.cfg.in_channels {
            return Err(Error::msg(format!(
                "UNet sample must be (B, {}, H, W), got {dims:?}",
                self.cfg.in_channels
            )));
        }
        let b = dims[0];
        let nt = timesteps.elem_count();
        let t = timesteps.flatten_all()?;
        let t = if nt == b {
            t
        } else if nt == 1 {
            t.broadcast_as(b)?.contiguous()?
        } else {
            return Err(Error::msg(format!(
                "UNet timesteps: {nt} values for a batch of {b}"
            )));
        };
        for (stage, c) in [("down", &ctx.down), ("mid", &ctx.mid), ("up", &ctx.up)] {
            let cd = c.dims();
            if cd.len() != 3 || cd[0] != b || cd[2] != self.cfg.cross_attention_dim {
                return Err(Error::msg(format!(
                    "UNet {stage} context must be ({b}, T, {}), got {cd:?}",
                    self.cfg.cross_attention_dim
                )));
            }
        }
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    fn run<'s>(
        &'s self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &StageContexts,
        pose: Option<&Tensor>,
        run: &mut RunCtx,
        mut debug: Option<&mut Vec<(String, Tensor)>>,
        head: bool,
        tape: Option<&Tape<'s>>,
    ) -> Result<Option<Tensor>> {
        let t = self.check_inputs(sample, timesteps, ctx)?;
        let mut dbg = |name: String, x: &Tensor| {
            if let Some(d) = debug.as_deref_mut() {
                d.push((name, x.clone()));
            }
        };
        let c0 = self.cfg.block_out_channels[0];
        let t_feat = timestep_features(&t, c0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)?
            .to_dtype(sample.dtype())?;
        let temb = self.time_embedding.forward(&t_feat)?;
        dbg("time_emb".into(), &temb);

        let x = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&x)?;
        dbg("conv_in".into(), &h);
        if let Some(p) = pose {
            if p.dims() != h.dims() {
                return Err(Error::msg(format!(
                    "pose features must match the conv_in output {:?}, got {:?}",
                    h.dims(),
                    p.dims()
                )));
            }
            h = (h + p.to_dtype(sample.dtype())?)?;
        }

        let mut skips = vec![h.clone()];
        for (i, blk) in self.down_blocks.iter().enumerate() {
            let (o, s) = match tape {
                None => blk.forward(&h, &temb, &ctx.down, run)?,
                Some(tape) => {
                    let inputs = vec![h.clone(), temb.clone(), ctx.down.clone()];
                    ckpt::block(tape, run, &format!("down_blocks.{i}."), inputs, |x, r| {
                        blk.forward(&x[0], &x[1], &x[2], r)
                    })?
                }
            };
            h = o;
            skips.extend(s);
            dbg(format!("down_blocks.{i}"), &h);
        }
        h = match tape {
            None => self.mid_block.forward(&h, &temb, &ctx.mid, run)?,
            Some(tape) => {
                let mid = &self.mid_block;
                let inputs = vec![h.clone(), temb.clone(), ctx.mid.clone()];
                ckpt::block(tape, run, "mid_block.", inputs, |x, r| {
                    Ok((mid.forward(&x[0], &x[1], &x[2], r)?, Vec::new()))
                })?
                .0
            }
        };
        dbg("mid_block".into(), &h);

        for (i, blk) in self.up_blocks.iter().enumerate() {
            let k = blk.num_skips();
            if skips.len() < k {
                return Err(Error::msg("UNet up blocks need more skip connections"));
            }
            // diffusers' upsample_size: the spatial size of the next skip, which makes odd
            // sizes come back exactly.
            let up_size = if skips.len() > k {
                let (_, _, sh, sw) = skips[skips.len() - k - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            h = match tape {
                None => blk.forward(&h, &mut skips, &temb, &ctx.up, run, up_size)?,
                Some(tape) => {
                    let mut inputs = vec![h.clone(), temb.clone(), ctx.up.clone()];
                    inputs.extend(skips.split_off(skips.len() - k));
                    ckpt::block(
                        tape,
                        run,
                        &format!("up_blocks.{i}."),
                        inputs,
                        move |x, r| {
                            let mut sk = x[3..].to_vec();
                            Ok((
                                blk.forward(&x[0], &mut sk, &x[1], &x[2], r, up_size)?,
                                Vec::new(),
                            ))
                        },
                    )?
                    .0
                }
            };
            dbg(format!("up_blocks.{i}"), &h);
        }

        match (&self.conv_norm_out, head) {
            (Some((norm, conv_out)), true) => {
                let y = conv_out.forward(&norm.forward(&h)?.silu()?)?;
                Ok(Some(y))
            }
            _ => Ok(None),
        }
    }
}
