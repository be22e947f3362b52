//! The MCLD training step (`TrainStep`): frozen VAE and CLIP, the trainable network set, the
//! random draws of the reference's `train.py`, loss scaling for f16, AdamW.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::adamw::{AdamW, AdamWConfig};
use super::api::{Grads, Net, StepRngs, StepStats, TrainBatch, TrainStep};
use super::loss::{mcld_loss, LossInputs, LossOptions, LossOutputs};
use super::params::Params;
use super::scaler::LossScaler;
use crate::models::clip::ClipVisionModelWithProjection;
use crate::models::mcld::{Mcld, McldConfig};
use crate::models::vae::AutoencoderKL;
use crate::ops::recompute::Tape;
use crate::pipeline::mcld::Precision;
use crate::pipeline::sampler::VAE_SCALE;
use crate::scheduler::ddim::DdimScheduler;
use crate::{Error, Result};

/// The step's knobs (the reference's config keys where it has them).
#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    pub nets: McldConfig,
    pub adamw: AdamWConfig,
    /// Probability that a step is unconditional (`uncond_ratio`).
    pub uncond_ratio: f64,
    /// Probability that the source CLIP input is zeroed, independently (train.py: 0.1).
    pub src_drop_ratio: f64,
    /// Per-sample-per-channel offset noise (`noise_offset`).
    pub noise_offset: f64,
    /// Min-SNR gamma (`snr_gamma`).
    pub snr_gamma: f64,
    /// Factor on the N(0, clip_std) noise added to the source CLIP embedding (train.py: 0.05).
    pub clip_noise: f64,
    /// Compute dtype of the trained networks (master weights and AdamW stay f32); bf16 on
    /// the CPU means bf16-rounded weights with f32 arithmetic (see `Precision`).
    pub dtype: DType,
    /// Recompute each UNet block in the backward pass instead of keeping its activations
    /// (`solver.gradient_checkpointing`).
    pub gradient_checkpointing: bool,
}

impl StepConfig {
    pub fn mcld(nets: McldConfig, dtype: DType) -> Self {
        Self {
            nets,
            adamw: AdamWConfig::default(),
            uncond_ratio: 0.1,
            src_drop_ratio: 0.1,
            noise_offset: 0.05,
            snr_gamma: 5.0,
            clip_noise: 0.05,
            dtype,
            gradient_checkpointing: false,
        }
    }
}

/// Frozen encoders whose outputs carry no graph.
pub struct FrozenEncoders {
    pub vae: AutoencoderKL,
    pub image_encoder: ClipVisionModelWithProjection,
    /// Their compute dtype.
    pub dtype: DType,
}

pub struct McldTrainer {
    pub cfg: StepConfig,
    pub params: Params,
    pub opt: AdamW,
    /// `None` for a step fed with encoded inputs only ([`McldTrainer::step_inputs`]).
    pub encoders: Option<FrozenEncoders>,
    pub scheduler: DdimScheduler,
    /// Per-dimension std of CLIP image embeddings, (D,); with the encoders.
    pub clip_std: Option<Tensor>,
    pub scaler: Option<LossScaler>,
    /// Training steps taken, skipped f16 steps included (the loop's position).
    pub steps_taken: u64,
}

/// Standard normal values drawn on the host from `rng` (device-independent draws).
pub fn randn(rng: &mut StdRng, dims: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_device(device)?)
}

/// The step-level decisions of one micro-batch (train.py lines 614 and 649: Python's
/// `random`, seeded alike on every rank). Both are always drawn, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDraws {
    /// Unconditional step: the reference UNet is skipped and both CLIP inputs are zeroed.
    pub uncond: bool,
    /// The source CLIP input is zeroed.
    pub drop_src: bool,
}

impl StepDraws {
    /// Draws from the generator all ranks share.
    pub fn draw(shared: &mut StdRng, uncond_ratio: f64, src_drop_ratio: f64) -> Self {
        let uncond = shared.random::<f64>() < uncond_ratio;
        let drop_src = shared.random::<f64>() < src_drop_ratio;
        Self { uncond, drop_src }
    }
}

/// What one forward and backward pass gives: the loss outputs (detached) and the gradients.
pub struct StepResult {
    pub outputs: LossOutputs,
    pub grads: Grads,
}

impl McldTrainer {
    pub fn new(
        cfg: StepConfig,
        params: Params,
        encoders: FrozenEncoders,
        scheduler: DdimScheduler,
        clip_std: Tensor,
    ) -> Result<Self> {
        let clip_std = clip_std
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(params.device())?;
        let mut t = Self::without_encoders(cfg, params, scheduler)?;
        t.encoders = Some(encoders);
        t.clip_std = Some(clip_std);
        Ok(t)
    }

    /// A step without VAE and CLIP: it takes encoded inputs ([`McldTrainer::step_inputs`]), as
    /// the parity fixtures give them.
    pub fn without_encoders(
        cfg: StepConfig,
        params: Params,
        scheduler: DdimScheduler,
    ) -> Result<Self> {
        let opt = AdamW::new(cfg.adamw, params.trainable())?;
        let scaler = (cfg.dtype == DType::F16).then(LossScaler::default);
        Ok(Self {
            cfg,
            params,
            opt,
            encoders: None,
            scheduler,
            clip_std: None,
            scaler,
            steps_taken: 0,
        })
    }

    fn device(&self) -> &Device {
        self.params.device()
    }

    fn encoders(&self) -> Result<&FrozenEncoders> {
        self.encoders
            .as_ref()
            .ok_or_else(|| Error::msg("this training step was built without VAE and CLIP"))
    }

    /// VAE posterior sample x 0.18215 of images in [-1, 1], in f32.
    fn latents(&self, images: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
        let e = self.encoders()?;
        let x = images.to_device(self.device())?.to_dtype(e.dtype)?;
        let (mean, logvar) = e.vae.encode(&x)?;
        let mean = mean.to_dtype(DType::F32)?;
        let logvar = logvar.to_dtype(DType::F32)?;
        let eps = randn(rng, mean.dims(), self.device())?;
        Ok((AutoencoderKL::sample(&mean, &logvar, &eps)? * VAE_SCALE)?.detach())
    }

    /// CLIP image embeddings (B, 1, D) in f32; `zero` encodes an all-zero pixel tensor, as the
    /// reference does for dropped conditions.
    fn clip(&self, pixels: &Tensor, zero: bool) -> Result<Tensor> {
        let e = self.encoders()?;
        let x = pixels.to_device(self.device())?.to_dtype(e.dtype)?;
        let x = if zero { x.zeros_like()? } else { x };
        let emb = e.image_encoder.forward(&x)?.image_embeds;
        Ok(emb.to_dtype(DType::F32)?.unsqueeze(1)?.detach())
    }

    /// The random draws of one step, in a fixed order, then the loss inputs.
    fn draw(&self, batch: &TrainBatch, rngs: &mut StepRngs) -> Result<Drawn> {
        let dev = self.device().clone();
        let d = StepDraws::draw(
            &mut rngs.shared,
            self.cfg.uncond_ratio,
            self.cfg.src_drop_ratio,
        );
        let rng = &mut rngs.local;
        let latents = self.latents(&batch.target, rng)?;
        let (b, c, h, w) = latents.dims4()?;
        let noise = randn(rng, &[b, c, h, w], &dev)?;
        let offset = randn(rng, &[b, c, 1, 1], &dev)?;
        let noise = (noise + offset.broadcast_as((b, c, h, w))? * self.cfg.noise_offset)?;
        let n_train = self.scheduler.config().num_train_timesteps as i64;
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..n_train)).collect();
        let timesteps = Tensor::from_vec(t, b, &dev)?;
        let ref_latents = if d.uncond {
            None
        } else {
            Some(self.latents(&batch.texture, rng)?)
        };
        let clip_src = self.clip(&batch.clip_src, d.uncond || d.drop_src)?;
        let clip_tex = self.clip(&batch.clip_tex, d.uncond)?;
        let dim = clip_src.dim(2)?;
        let clip_std = self
            .clip_std
            .as_ref()
            .ok_or_else(|| Error::msg("this training step was built without clip_std"))?;
        if clip_std.elem_count() != dim {
            return Err(Error::msg(format!(
                "clip_std has {} values, the image encoder gives {dim}",
                clip_std.elem_count()
            )));
        }
        let jitter = randn(rng, &[b, 1, dim], &dev)?.broadcast_mul(clip_std)?;
        let clip_src = (clip_src + (jitter * self.cfg.clip_noise)?)?;
        Ok(Drawn {
            latents,
            noise,
            timesteps,
            ref_latents,
            clip_src,
            clip_tex,
            face: batch.face.to_device(&dev)?.to_dtype(DType::F32)?,
            pose: batch.pose.to_device(&dev)?.to_dtype(DType::F32)?,
        })
    }

    /// Loss and f32 gradients (unscaled) of every trainable tensor for fixed loss inputs. A
    /// tensor the graph did not reach gets zeros and `has_grad` false (torch: grad None).
    pub fn step_inputs(&self, inp: &LossInputs, samples: usize) -> Result<StepResult> {
        let prec = Precision::new(self.device(), self.cfg.dtype);
        // The scope covers the forward and the backward pass (recomputed segments included).
        let (vb, scope) = self.params.var_builder_for(&prec)?;
        let nets = Mcld::new(vb, &self.cfg.nets)?;
        let opts = LossOptions {
            snr_gamma: self.cfg.snr_gamma,
            bank_fp16_round: true,
        };
        let tape = Tape::new();
        let ckpt = self.cfg.gradient_checkpointing.then_some(&tape);
        let out = mcld_loss(&nets, &self.scheduler, inp, opts, ckpt)?;
        let loss = out.loss.to_scalar::<f32>()? as f64;
        let scale = self.scaler.as_ref().map(|s| s.scale).unwrap_or(1.0);
        let root = if scale != 1.0 {
            (&out.loss * scale)?
        } else {
            out.loss.clone()
        };
        let store = match ckpt {
            Some(t) => t.backward(&root)?,
            None => root.backward()?,
        };
        let grads = self.params.gradients(&scope, &store)?;
        drop(store);
        let has_grad: Vec<bool> = grads.iter().map(Option::is_some).collect();
        let tensors = grads
            .into_iter()
            .zip(self.params.trainable())
            .map(|(g, (_, v))| {
                let g = match g {
                    Some(g) => g,
                    None => v.as_tensor().zeros_like()?,
                };
                Ok(if scale != 1.0 { (g / scale)? } else { g })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = LossOutputs {
            loss: out.loss.detach(),
            loss_per_sample: out.loss_per_sample.detach(),
            model_pred: out.model_pred.detach(),
            target: out.target.detach(),
            noisy_latents: out.noisy_latents.detach(),
            weights: out.weights.detach(),
            face_mask: out.face_mask.detach(),
        };
        Ok(StepResult {
            outputs,
            grads: Grads {
                tensors,
                has_grad,
                loss,
                samples,
            },
        })
    }

    /// Loss and gradients for fixed loss inputs (see [`McldTrainer::step_inputs`]).
    pub fn loss_grads(&self, inp: &LossInputs) -> Result<(f64, Vec<Tensor>)> {
        let r = self.step_inputs(inp, inp.latents.dim(0)?)?;
        Ok((r.grads.loss, r.grads.tensors))
    }
}

struct Drawn {
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    ref_latents: Option<Tensor>,
    clip_src: Tensor,
    clip_tex: Tensor,
    face: Tensor,
    pose: Tensor,
}

impl TrainStep for McldTrainer {
    fn grads(&mut self, batch: &TrainBatch, rngs: &mut StepRngs) -> Result<Grads> {
        let d = self.draw(batch, rngs)?;
        let inp = LossInputs {
            latents: &d.latents,
            noise: &d.noise,
            timesteps: &d.timesteps,
            ref_latents: d.ref_latents.as_ref(),
            clip_src: &d.clip_src,
            clip_tex: &d.clip_tex,
            face_emb: &d.face,
            pose: &d.pose,
        };
        Ok(self.step_inputs(&inp, batch.len())?.grads)
    }

    fn apply(&mut self, grads: &Grads, lr: f64) -> Result<StepStats> {
        let finite = all_finite(&grads.tensors)?;
        if let Some(s) = self.scaler.as_mut() {
            if !finite {
                // torch's GradScaler skips optimizer.step(): no update, no step counts.
                s.update(false);
                self.steps_taken += 1;
                return Ok(StepStats {
                    loss: grads.loss,
                    grad_norm: f64::INFINITY,
                    lr,
                    skipped: true,
                    loss_scale: Some(s.scale),
                });
            }
            s.update(true);
        } else if !finite {
            return Err(Error::msg(format!(
                "step {}: non-finite gradients (loss {})",
                self.steps_taken + 1,
                grads.loss
            )));
        }
        let flags = grads.flags();
        let norm = self
            .opt
            .step_masked(self.params.trainable(), &grads.tensors, &flags, lr)?;
        self.steps_taken += 1;
        Ok(StepStats {
            loss: grads.loss,
            grad_norm: norm,
            lr,
            skipped: false,
            loss_scale: self.scaler.as_ref().map(|s| s.scale),
        })
    }

    fn step_count(&self) -> u64 {
        self.steps_taken
    }

    fn updates_applied(&self) -> u64 {
        self.opt.step
    }

    fn weights(&self, net: Net) -> Result<HashMap<String, Tensor>> {
        Ok(self.params.with_prefix(net_prefix(net)))
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        super::state::save(
            dir,
            &self.params,
            &self.opt,
            self.steps_taken,
            self.scaler.as_ref(),
        )
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        self.steps_taken =
            super::state::load(dir, &self.params, &mut self.opt, self.scaler.as_mut())?;
        Ok(())
    }
}

/// The composite-name prefix of a network.
pub fn net_prefix(net: Net) -> &'static str {
    match net {
        Net::ReferenceUnet => "reference_unet.",
        Net::DenoisingUnet => "denoising_unet.",
        Net::PoseGuider => "pose_guider.",
        Net::ImageProj => "image_proj.",
    }
}

/// Whether every gradient is finite (checked on the host, one scalar per tensor: candle's
/// `max` skips NaNs).
pub fn all_finite(grads: &[Tensor]) -> Result<bool> {
    for g in grads {
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !s.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}
