//! `mcld bench train`: MCLD's training step on the full trainable set (two SD-1.5 UNets, pose
//! guider, 1280-wide projector) with seeded random weights, timed phase by phase.
//!
//! The frozen encoders (VAE, CLIP) are not part of the step being measured: their outputs enter
//! as random latents and embeddings of the right shapes, as they would from the data loader.
//! `--width half` halves every UNet channel count (four times fewer UNet weights), for machines
//! where the full set, its gradients and AdamW's moments (about 27 GB in f32) do not fit.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{cpu_seconds, peak_rss_bytes};
use crate::models::mcld::Mcld;
use crate::ops::recompute::Tape;
use crate::pipeline::mcld::Precision;
use crate::presets::Size;
use crate::scheduler::ddim::{DdimConfig, DdimScheduler, PredictionType, TimestepSpacing};
use crate::train::step::adamw::{AdamW, AdamWConfig};
use crate::train::step::loss::{denoise_loss, reference_bank, LossInputs, LossOptions};
use crate::train::step::params::{is_trainable, Params};
use crate::train::step::trainer::randn;
use crate::weights::random::RandomWeights;
use crate::{Error, Result};

/// UNet channel widths of the benched networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Full,
    Half,
}

/// Whether a benched step ends with the optimizer update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    Adamw,
    None,
}

#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Square image size (latents are size / 8; MCLD trains at 512).
    pub size: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// UNet channel widths: full (SD-1.5) or half.
    pub width: Width,
    /// Include the AdamW update (with grad-norm clipping) or stop after the backward pass.
    pub optimizer: Optimizer,
    /// Recompute each UNet block in the backward pass instead of keeping its activations.
    pub grad_checkpointing: bool,
    /// Untimed warm-up steps.
    pub warmup: usize,
    pub seed: u64,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

#[derive(Default)]
struct Times {
    reference: f64,
    denoise: f64,
    backward: f64,
    optimizer: f64,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn run(args: &TrainBench) -> Result<()> {
    let (device, dtype) = (args.device.clone(), args.dtype);
    if args.size == 0 || !args.size.is_multiple_of(8) || args.batch_size == 0 {
        return Err(Error::msg(
            "bench train: --size must be a positive multiple of 8 and --batch-size positive",
        ));
    }
    let cfg = crate::presets::mcld(match args.width {
        Width::Full => Size::Full,
        Width::Half => Size::Half,
    })?;
    let rw = RandomWeights::new(args.seed).recording();
    Mcld::new(rw.clone().var_builder(DType::F32, &Device::Cpu), &cfg)?;
    let params = Params::new(rw.recorded(), is_trainable, &device)?;
    drop(rw);
    // Moments only where the optimizer runs (torch allocates its state at the first step): two
    // more copies of the trainable set would otherwise sit in the measured peak.
    let mut opt = match args.optimizer {
        Optimizer::Adamw => Some(AdamW::new(AdamWConfig::default(), params.trainable())?),
        Optimizer::None => None,
    };
    let prec = Precision::new(&device, dtype);
    println!(
        "bench train: {} trainable tensors ({:.1} M values), {} frozen; {}x{} images, batch {}, \
         width {:?}, {}, checkpointing {}, optimizer {:?}, device {:?}",
        params.trainable().len(),
        params.trainable_elems() as f64 / 1e6,
        params.frozen().len(),
        args.size,
        args.size,
        args.batch_size,
        args.width,
        prec.describe_training(),
        args.grad_checkpointing,
        args.optimizer,
        device
    );

    let sc = DdimConfig {
        beta_schedule: crate::scheduler::ddim::BetaSchedule::ScaledLinear,
        rescale_betas_zero_snr: true,
        timestep_spacing: TimestepSpacing::Trailing,
        prediction_type: PredictionType::VPrediction,
        ..Default::default()
    };
    let scheduler = DdimScheduler::new(sc)?;

    let b = args.batch_size;
    let h = args.size / 8;
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(1));
    let mut r = |d: &[usize]| randn(&mut rng, d, &device);
    let latents = r(&[b, 4, h, h])?;
    let noise = r(&[b, 4, h, h])?;
    let ref_latents = r(&[b, 4, h, h])?;
    let clip_src = r(&[b, 1, cfg.unet.cross_attention_dim])?;
    let clip_tex = r(&[b, 1, cfg.unet.cross_attention_dim])?;
    let face = r(&[b, 1, cfg.image_proj.embedding_dim])?;
    let pose = (r(&[b, 3, args.size, args.size])?.abs()?.clamp(0f32, 1f32))?;
    let t: Vec<i64> = (0..b as i64).map(|i| (137 + 311 * i) % 1000).collect();
    let timesteps = Tensor::from_vec(t, b, &device)?;
    let inp = LossInputs {
        latents: &latents,
        noise: &noise,
        timesteps: &timesteps,
        ref_latents: Some(&ref_latents),
        clip_src: &clip_src,
        clip_tex: &clip_tex,
        face_emb: &face,
        pose: &pose,
    };

    let mut total = Times::default();
    let mut total_cpu = Times::default();
    let cpu_now = || cpu_seconds().unwrap_or(f64::NAN);
    let mut losses = Vec::new();
    for step in 0..args.warmup + args.steps {
        let mut times = Times::default();
        let mut cpu = Times::default();
        let (vb, scope) = params.var_builder_for(&prec)?;
        let nets = Mcld::new(vb, &cfg)?;
        let tape = Tape::new();
        let ckpt = args.grad_checkpointing.then_some(&tape);
        let (t0, c0) = (Instant::now(), cpu_now());
        let bank = reference_bank(&nets, &inp, ckpt)?;
        sync(&device)?;
        times.reference = t0.elapsed().as_secs_f64();
        cpu.reference = cpu_now() - c0;
        let (t0, c0) = (Instant::now(), cpu_now());
        let out = denoise_loss(
            &nets,
            &scheduler,
            &inp,
            bank.as_ref(),
            LossOptions::default(),
            ckpt,
        )?;
        let loss = out.loss.to_scalar::<f32>()?;
        times.denoise = t0.elapsed().as_secs_f64();
        cpu.denoise = cpu_now() - c0;
        drop(bank);
        let (t0, c0) = (Instant::now(), cpu_now());
        let store = match ckpt {
            Some(tp) => tp.backward(&out.loss)?,
            None => out.loss.backward()?,
        };
        drop(out);
        let grads = params
            .gradients(&scope, &store)?
            .into_iter()
            .zip(params.trainable())
            .map(|(g, (_, v))| match g {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        drop(store);
        sync(&device)?;
        times.backward = t0.elapsed().as_secs_f64();
        cpu.backward = cpu_now() - c0;
        let (t0, c0) = (Instant::now(), cpu_now());
        if let Some(opt) = opt.as_mut() {
            opt.step(params.trainable(), &grads, 1e-5)?;
            sync(&device)?;
        }
        times.optimizer = t0.elapsed().as_secs_f64();
        cpu.optimizer = cpu_now() - c0;
        drop(grads);
        if !loss.is_finite() {
            return Err(Error::msg(format!(
                "bench train: step {step} loss is {loss}"
            )));
        }
        let timed = step >= args.warmup;
        println!(
            "{} step {step}: reference UNet {:.2} s, denoising UNet + loss {:.2} s, backward {:.2} s, \
             optimizer {:.2} s, loss {loss:.4}; CPU time {:.2} | {:.2} | {:.2} | {:.2} s",
            if timed { "timed " } else { "warm-up" },
            times.reference,
            times.denoise,
            times.backward,
            times.optimizer,
            cpu.reference,
            cpu.denoise,
            cpu.backward,
            cpu.optimizer
        );
        if timed {
            total.reference += times.reference;
            total.denoise += times.denoise;
            total.backward += times.backward;
            total.optimizer += times.optimizer;
            total_cpu.reference += cpu.reference;
            total_cpu.denoise += cpu.denoise;
            total_cpu.backward += cpu.backward;
            total_cpu.optimizer += cpu.optimizer;
            losses.push(loss);
        }
    }
    let n = args.steps.max(1) as f64;
    let per_step = (total.reference + total.denoise + total.backward + total.optimizer) / n;
    println!(
        "per step (mean of {}): reference UNet {:.2} s | denoising UNet + loss {:.2} s | backward {:.2} s | optimizer {:.2} s | total {:.2} s = {:.3} steps/s, {:.3} samples/s",
        args.steps,
        total.reference / n,
        total.denoise / n,
        total.backward / n,
        total.optimizer / n,
        per_step,
        1.0 / per_step,
        b as f64 / per_step
    );
    let cpu_step =
        (total_cpu.reference + total_cpu.denoise + total_cpu.backward + total_cpu.optimizer) / n;
    println!(
        "CPU time per step (all threads): reference UNet {:.2} s | denoising UNet + loss {:.2} s | backward {:.2} s | optimizer {:.2} s | total {:.2} s",
        total_cpu.reference / n,
        total_cpu.denoise / n,
        total_cpu.backward / n,
        total_cpu.optimizer / n,
        cpu_step
    );
    match peak_rss_bytes() {
        Some(p) => println!("peak RSS {:.2} GiB", gib(p)),
        None => println!("peak RSS: not reported by this OS"),
    }
    if device.is_cuda() {
        super::pipeline::print_gpu_peak(&device, super::pipeline::gpu_used_bytes());
    }
    Ok(())
}
