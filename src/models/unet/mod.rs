//! diffusers' `UNet2DConditionModel` (SD-1.5 layout) in MCLD's two roles (SPEC §3):
//! the reference UNet, whose forward returns the bank of self-attention inputs, and the
//! denoising UNet, which reads that bank, adds pose features after `conv_in`, routes face tokens
//! through IP-adapter cross-attention and takes one context per stage. Every per-call input is
//! an argument; the model holds no state between calls.

mod attention;
mod blocks;
mod config;
mod embeddings;
mod recompute;
mod resnet;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::group_norm;
use crate::ops::norm::GroupNorm;

use crate::ops::conv::Conv2d;
use crate::ops::recompute::Tape;

pub use attention::IpAdapter;
use attention::{RunCtx, TransformerSpec};
use blocks::{BlockCommon, DownBlock, MidBlock, UpBlock};
pub use config::{Config, PerBlock};
pub use embeddings::timestep_features;
use embeddings::TimestepEmbedding;
use resnet::conv;
pub use resnet::nearest_resize;

use crate::{Error, Result};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BankGuidance {
    /// Every sample attends to [own, bank].
    AllSamples,
    /// Classifier-free guidance batch [uncond, cond]: the first half uses plain
    /// self-attention, the second half reads the bank (MCLD's uc_mask fallback).
    UncondFirstHalf,
    /// One flag per sample: `true` ignores the bank (plain self-attention), as training's
    /// per-sample reference dropout needs.
    Ignore(Vec<bool>),
}

impl BankGuidance {
    /// The per-sample "ignore the bank" mask for a batch of `b`.
    pub fn mask(&self, b: usize) -> Result<Vec<bool>> {
        match self {
            BankGuidance::AllSamples => Ok(vec![false; b]),
            BankGuidance::UncondFirstHalf => {
                if !b.is_multiple_of(2) {
                    return Err(Error::msg(format!(
                        "classifier-free guidance batch must be even, got {b}"
                    )));
                }
                Ok((0..b).map(|i| i < b / 2).collect())
            }
            BankGuidance::Ignore(m) => {
                if m.len() != b {
                    return Err(Error::msg(format!(
                        "bank mask has {} flags for a batch of {b}",
                        m.len()
                    )));
                }
                Ok(m.clone())
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BankMode<'a> {
    /// Per sample: `true` ignores the bank.
    pub ignore: &'a [bool],
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
                group_norm(
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
        self.reference_pass(sample, timesteps, context, None)
    }

    /// Denoising role: stage contexts, optional pose features and reference bank.
    pub fn forward_denoise(&self, inp: &DenoiseInput) -> Result<Tensor> {
        self.denoise_pass(inp, None)
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
        self.reference_pass(sample, timesteps, context, Some(tape))
    }

    /// [`UNet2DConditionModel::forward_denoise`] with every block a checkpointed segment.
    pub fn forward_denoise_checkpointed<'s>(
        &'s self,
        tape: &Tape<'s>,
        inp: &DenoiseInput,
    ) -> Result<Tensor> {
        self.denoise_pass(inp, Some(tape))
    }

    fn reference_pass<'s>(
        &'s self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        tape: Option<&Tape<'s>>,
    ) -> Result<ReferenceBank> {
        let ctx = StageContexts::uniform(context);
        let mut entries = Vec::new();
        let mut run = RunCtx {
            record: Some(&mut entries),
            bank: None,
        };
        self.run(sample, timesteps, &ctx, None, &mut run, None, false, tape)?;
        Ok(ReferenceBank { entries })
    }

    fn denoise_pass<'s>(&'s self, inp: &DenoiseInput, tape: Option<&Tape<'s>>) -> Result<Tensor> {
        let ignore = inp.guidance.mask(inp.sample.dim(0)?)?;
        let mode = BankMode {
            ignore: &ignore,
            fp16_round: inp.bank_fp16_round,
        };
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
            tape,
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

        // Under a tape, what the blocks share enters it once (`Tape::enter`): the face
        // projector behind all three contexts is then pushed back once per step, not once per
        // context.
        let (temb, mut h, entry_ctx) = match tape {
            Some(tape) => {
                let outs = tape.enter(vec![
                    temb,
                    h,
                    ctx.down.clone(),
                    ctx.mid.clone(),
                    ctx.up.clone(),
                ])?;
                let [temb, h, down, mid, up] = <[Tensor; 5]>::try_from(outs)
                    .map_err(|_| Error::msg("UNet entry segment: five outputs expected"))?;
                (temb, h, Some(StageContexts { down, mid, up }))
            }
            None => (temb, h, None),
        };
        let ctx = entry_ctx.as_ref().unwrap_or(ctx);

        let mut skips = vec![h.clone()];
        for (i, blk) in self.down_blocks.iter().enumerate() {
            let (o, s) = match tape {
                None => blk.forward(&h, &temb, &ctx.down, run)?,
                Some(tape) => {
                    let inputs = vec![h.clone(), temb.clone(), ctx.down.clone()];
                    recompute::block(tape, run, &format!("down_blocks.{i}."), inputs, |x, r| {
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
                recompute::block(tape, run, "mid_block.", inputs, |x, r| {
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
            // The denoising UNet's last block keeps its graph: its recomputation would be the
            // first thing the backward pass does, with nothing freed in between, so it would
            // cost time and save no memory.
            let last_of_denoise = head && i + 1 == self.up_blocks.len();
            h = match tape {
                Some(tape) if !last_of_denoise => {
                    let mut inputs = vec![h.clone(), temb.clone(), ctx.up.clone()];
                    inputs.extend(skips.split_off(skips.len() - k));
                    recompute::block(
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
                _ => blk.forward(&h, &mut skips, &temb, &ctx.up, run, up_size)?,
            };
            dbg(format!("up_blocks.{i}"), &h);
        }

        match (&self.conv_norm_out, head) {
            (Some((norm, conv_out)), true) => {
                let y = conv_out.forward(&norm.forward_silu(&h)?)?;
                Ok(Some(y))
            }
            _ => Ok(None),
        }
    }
}
