//! The whole inference pipeline (SPEC §5) as one value: loading every network, turning pair
//! inputs into network inputs exactly as the reference's data loader does, sampling, decoding.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::sampler::{decode, denoise, Conditioning, VAE_SCALE};
use super::weight_files::PipelineFiles;
use crate::config::{InferenceConfig, TrainConfig};
use crate::data::PairInputs;
use crate::imageops::{pil_resize_rgb, Filter, U8Image};
use crate::models::clip::{self, ClipVisionModelWithProjection};
use crate::models::mcld::{Mcld, McldConfig};
use crate::models::vae::AutoencoderKL;
use crate::models::{resampler, unet, vae};
use crate::presets::tree::RandomPipeline;
use crate::presets::Size;
use crate::scheduler::ddim::DdimScheduler;
use crate::weights::{prefixed_var_builder, StrictWeights};
use crate::{Error, Result};

/// The image size the networks run at (the reference squashes every input to it).
pub const IMAGE_SIZE: usize = 512;

pub struct McldPipeline {
    pub nets: Mcld,
    pub vae: AutoencoderKL,
    pub image_encoder: ClipVisionModelWithProjection,
    pub scheduler: DdimScheduler,
    pub guidance_scale: f64,
    pub device: Device,
    /// The dtype the networks compute in (see [`Precision`]).
    pub dtype: DType,
    pub precision: Precision,
    pub size: usize,
}

/// How a requested precision runs on a device: the dtype the networks compute in, and the
/// dtype their weights are rounded through first (when that differs).
///
/// candle 0.11.1's CPU matmul has no bf16 kernel. On CPUs with AVX-512 BF16, `bf16` keeps
/// activations in f32 and runs every matmul, convolution and attention product with bf16
/// operands and f32 accumulation (`ops::packed_gemm`), weights stored in bf16 (as PyTorch's
/// CPU bf16 accumulates); elsewhere it means bf16-rounded weights with f32 arithmetic. f16 runs
/// natively everywhere, bf16 natively on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub compute: DType,
    pub round_weights: Option<DType>,
    /// Matmul and convolution weights in bf16 through `ops::packed_gemm` (CPU with AVX-512 BF16);
    /// training keeps the rounding only, since these kernels have no backward pass.
    pub bf16_matmuls: bool,
    /// What the user should know about this choice on this device, if anything.
    pub caveat: Option<&'static str>,
}

impl Precision {
    pub fn new(device: &Device, requested: DType) -> Self {
        if requested == DType::BF16 && device.is_cpu() {
            Self {
                compute: DType::F32,
                round_weights: Some(DType::BF16),
                bf16_matmuls: crate::ops::packed_gemm::available(),
                caveat: None,
            }
        } else {
            // candle 0.11.1 asks cuDNN for f16 accumulation in f16 convolutions (PyTorch asks
            // for f32); its bf16 convolutions and all its half matmuls accumulate in f32.
            let caveat = (requested == DType::F16 && device.is_cuda()).then_some(
                "f16 convolutions accumulate in f16 on candle's cuDNN path; bf16 accumulates in f32",
            );
            Self {
                compute: requested,
                round_weights: None,
                bf16_matmuls: false,
                caveat,
            }
        }
    }

    /// One line for logs: what actually runs.
    pub fn describe(&self) -> String {
        let what = match self.round_weights {
            Some(r) if self.bf16_matmuls => format!(
                "{r:?} weights; matmuls, convolutions and attention on {r:?} operands with \
                 f32 accumulation (AVX-512 BF16); activations {:?}",
                self.compute
            ),
            Some(r) => format!(
                "{r:?} weights computed in {:?} (no {r:?} matmul on this device)",
                self.compute
            ),
            None => format!("{:?}", self.compute),
        };
        match self.caveat {
            Some(c) => format!("{what} ({c})"),
            None => what,
        }
    }

    /// The builder the networks load from: `vb` itself, or in the bf16-matmul mode its view
    /// with matmul and convolution weights in bf16.
    pub fn var_builder(&self, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        if self.bf16_matmuls {
            crate::weights::bf16::bf16_matmul_weights(vb)
        } else {
            vb
        }
    }

    /// Rounds floating-point tensors through `round_weights` (others are left alone).
    pub fn round(&self, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let Some(r) = self.round_weights else {
            return Ok(tensors);
        };
        tensors
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(r)?.to_dtype(t.dtype())?
                } else {
                    t
                };
                Ok((k, t))
            })
            .collect()
    }

    fn weights(&self, w: StrictWeights) -> Result<StrictWeights> {
        if self.round_weights.is_none() {
            return Ok(w);
        }
        Ok(w.with_tensors(self.round(w.tensors().clone())?))
    }
}

/// The four networks from one set of tensors per part (`Mcld::PARTS` prefixes), each set
/// checked strictly against its own source: from checkpoint files for inference, from the
/// trainer's current weights for validation. `ucfg` is the UNet config both UNets share.
pub fn build_nets(
    parts: Vec<(&'static str, StrictWeights)>,
    ucfg: unet::Config,
    prec: &Precision,
    device: &Device,
) -> Result<Mcld> {
    let parts = parts
        .into_iter()
        .map(|(p, w)| Ok((p, prec.weights(w)?)))
        .collect::<Result<Vec<_>>>()?;
    let (_, proj) = parts
        .iter()
        .find(|(p, _)| *p == Mcld::IMAGE_PROJ)
        .ok_or_else(|| Error::msg("no image projector weights"))?;
    let rs_cfg = resampler::Config::from_weights(proj.tensors(), "", proj.source())?;
    let dtype = prec.compute;
    let nets = Mcld::new(
        prec.var_builder(prefixed_var_builder(
            parts
                .iter()
                .map(|(p, w)| (*p, w.var_builder(dtype, device))),
            dtype,
            device,
        )),
        &McldConfig::new(ucfg, rs_cfg),
    )?;
    for (_, w) in &parts {
        w.finish()?;
        if let Some(msg) = w.warning() {
            eprintln!("warning: {msg}");
        }
    }
    Ok(nets)
}

impl McldPipeline {
    /// Loads the released (or our own) checkpoints plus the base models named by the config.
    /// `dtype` is the requested precision; see [`Precision`] for what runs on each device.
    pub fn load(
        files: &PipelineFiles,
        infer: &InferenceConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let prec = Precision::new(device, dtype);
        let dtype = prec.compute;
        let ucfg = unet::Config::from_json_file(&files.unet_config)?;
        // One file per part, each checked against its own file: a missing tensor or a wrong
        // shape is an error naming that file; unexpected keys are a warning, as the reference
        // loads `denoising_unet` with `strict=False`.
        let parts = [
            (Mcld::REFERENCE_UNET, &files.reference_unet),
            (Mcld::DENOISING_UNET, &files.denoising_unet),
            (Mcld::POSE_GUIDER, &files.pose_guider),
            (Mcld::IMAGE_PROJ, &files.image_proj),
        ]
        .into_iter()
        .map(|(p, path)| Ok((p, StrictWeights::from_file(path)?.unexpected_warns())))
        .collect::<Result<Vec<_>>>()?;
        let nets = build_nets(parts, ucfg, &prec, device)?;
        let vdir = crate::weights::ModelDir::open(&files.vae_dir)?;
        let vcfg: vae::Config = vdir.config()?;
        let vae = {
            let w = prec.weights(vdir.strict()?)?;
            let m = AutoencoderKL::new(prec.var_builder(w.var_builder(dtype, device)), &vcfg)?;
            w.finish()?;
            m
        };
        let edir = crate::weights::ModelDir::open(&files.image_encoder_dir)?;
        let ecfg = clip::Config::from_file(&edir.config)?;
        let image_encoder = {
            // The encoder folder may hold the text tower too (full CLIP checkpoints).
            let w = prec.weights(edir.strict()?)?.allow_unused([
                "text_model.",
                "text_projection.",
                "logit_scale",
            ]);
            let m = ClipVisionModelWithProjection::new(
                prec.var_builder(w.var_builder(dtype, device)),
                &ecfg,
            )?;
            w.finish()?;
            m
        };
        let mut scheduler = DdimScheduler::from_config_kwargs(&infer.noise_scheduler_kwargs)?;
        scheduler.set_timesteps(infer.num_inference_steps)?;
        Ok(Self {
            nets,
            vae,
            image_encoder,
            scheduler,
            guidance_scale: infer.guidance_scale,
            device: device.clone(),
            dtype,
            precision: prec,
            size: IMAGE_SIZE,
        })
    }

    /// Loads from a checkpoint folder and a training config (as `mcld test` does).
    pub fn from_config(
        ckpt_dir: &Path,
        cfg_path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = TrainConfig::load(cfg_path)?;
        let files = PipelineFiles::resolve(ckpt_dir, &cfg)?;
        let infer = InferenceConfig::load(&cfg.inference_config)?;
        for n in infer.notes() {
            eprintln!("note: {n} ({})", cfg.inference_config.display());
        }
        Self::load(&files, &infer, device, dtype)
    }

    /// Every network of the pipeline at full size with seeded random weights (`mcld bench
    /// pipeline`, `mcld serve --random-weights`); `steps` DDIM steps at
    /// `size` x `size`.
    pub fn random(
        device: &Device,
        dtype: DType,
        steps: usize,
        size: usize,
        seed: u64,
    ) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(64) {
            return Err(Error::msg(format!(
                "--size {size}: must be a positive multiple of 64 (VAE /8, UNet /8 again)"
            )));
        }
        let prec = Precision::new(device, dtype);
        // Rounding random weights through bf16 changes nothing measurable in a timing run; where
        // the CPU multiplies in bf16, the weights go through the same bf16 view as real ones.
        let dt = prec.compute;
        let set = RandomPipeline::new(Size::Full, seed)?;
        let nets = Mcld::new(
            prec.var_builder(set.mcld_var_builder(dt, device)),
            &set.mcld,
        )?;
        let vae = AutoencoderKL::new(
            prec.var_builder(set.vae_weights().var_builder(dt, device)),
            &set.vae,
        )?;
        let image_encoder = ClipVisionModelWithProjection::new(
            prec.var_builder(set.clip_weights().var_builder(dt, device)),
            &set.clip,
        )?;
        let infer: crate::config::InferenceConfig = crate::config::INFERENCE_YAML.parse()?;
        let mut scheduler = DdimScheduler::from_config_kwargs(&infer.noise_scheduler_kwargs)?;
        scheduler.set_timesteps(steps)?;
        Ok(Self {
            nets,
            vae,
            image_encoder,
            scheduler,
            guidance_scale: infer.guidance_scale,
            device: device.clone(),
            dtype: dt,
            precision: prec,
            size,
        })
    }

    fn squash(&self, img: &RgbImage) -> Result<RgbImage> {
        if img.width() as usize == self.size && img.height() as usize == self.size {
            return Ok(img.clone());
        }
        pil_resize_rgb(img, (self.size, self.size), Filter::Bicubic)
    }

    /// HWC u8 -> (3, H, W) f32 in [0, 1].
    fn to_unit(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let t = Tensor::from_vec(
            img.as_raw().clone(),
            (h as usize, w as usize, 3),
            &Device::Cpu,
        )?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
        Ok((t / 255.0)?)
    }

    /// Network inputs of a batch, as the reference's loader builds them: source, texture and
    /// pose squashed to 512x512 with Pillow bicubic; CLIP preprocessing of the squashed source
    /// and texture; texture in [-1, 1] through the VAE (posterior mean x 0.18215); pose / 255.
    pub fn condition(&self, batch: &[PairInputs]) -> Result<Conditioning> {
        let mut src_clip = Vec::new();
        let mut tex_clip = Vec::new();
        let mut tex = Vec::new();
        let mut pose = Vec::new();
        let mut face = Vec::new();
        let pre = clip::Preprocess::default();
        for p in batch {
            let s = self.squash(&p.source)?;
            let t = self.squash(&p.texture)?;
            src_clip.push(pre.apply(&U8Image::from_rgb(&s), &Device::Cpu)?);
            tex_clip.push(pre.apply(&U8Image::from_rgb(&t), &Device::Cpu)?);
            tex.push(((self.to_unit(&t)? * 2.0)? - 1.0)?);
            pose.push(self.to_unit(&self.squash(&p.pose)?)?);
            if p.face.len() != 512 {
                return Err(Error::msg(format!(
                    "pair {}: face embedding has {} values, expected 512",
                    p.pair.out_name(),
                    p.face.len()
                )));
            }
            face.push(Tensor::from_vec(p.face.clone(), (1, 512), &Device::Cpu)?);
        }
        let dev = &self.device;
        let dt = self.dtype;
        let stack = |v: &[Tensor]| -> Result<Tensor> {
            Ok(Tensor::stack(v, 0)?.to_device(dev)?.to_dtype(dt)?)
        };
        let clip_src = self
            .image_encoder
            .forward(&stack(&src_clip)?)?
            .image_embeds
            .unsqueeze(1)?;
        let clip_tex = self
            .image_encoder
            .forward(&stack(&tex_clip)?)?
            .image_embeds
            .unsqueeze(1)?;
        let (mean, _) = self.vae.encode(&stack(&tex)?)?;
        Ok(Conditioning {
            clip_src,
            clip_tex,
            face: stack(&face)?,
            ref_latents: (mean * VAE_SCALE)?,
            pose: stack(&pose)?,
        })
    }

    /// Seeded initial noise for a batch (the same seed gives the same images); f32 whatever the
    /// networks' dtype, as the sampler keeps its latents in f32.
    pub fn noise(&self, batch: usize, seed: u64) -> Result<Tensor> {
        use rand::{rngs::StdRng, SeedableRng};
        use rand_distr::{Distribution, StandardNormal};
        let h = self.size / 8;
        // Drawn on the CPU from a seeded generator, so a seed gives the same noise everywhere.
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..batch * 4 * h * h)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let n = Tensor::from_vec(v, (batch, 4, h, h), &Device::Cpu)?;
        Ok(n.to_device(&self.device)?)
    }

    /// Initial noise with one seed per sample: sample j is `noise(1, seeds[j])`, whatever else
    /// shares its batch.
    pub fn noise_per_sample(&self, seeds: &[u64]) -> Result<Tensor> {
        let parts = seeds
            .iter()
            .map(|s| self.noise(1, *s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Generates one (3, 512, 512) image in [0, 1] per input pair, the batch's noise drawn
    /// from one seed.
    pub fn generate(&self, batch: &[PairInputs], seed: u64) -> Result<Vec<Tensor>> {
        self.generate_with(batch, seed, &SampleOptions::default(), &mut NoProgress)
    }

    /// [`McldPipeline::generate`] with the config's step count and guidance overridable and
    /// each phase reported to `progress` (which can stop the run by returning an error).
    pub fn generate_with(
        &self,
        batch: &[PairInputs],
        seed: u64,
        opts: &SampleOptions,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Tensor>> {
        let noise = self.noise(batch.len(), seed)?;
        let scheduler = match opts.steps {
            Some(n) if n != self.scheduler.timesteps().len() => {
                let mut s = self.scheduler.clone();
                s.set_timesteps(n)?;
                std::borrow::Cow::Owned(s)
            }
            _ => std::borrow::Cow::Borrowed(&self.scheduler),
        };
        let guidance = opts.guidance.unwrap_or(self.guidance_scale);
        progress.phase(Phase::Condition)?;
        let cond = self.condition(batch)?;
        progress.phase(Phase::Sample)?;
        let (latents, _) = denoise(&self.nets, &scheduler, &cond, &noise, guidance, |i, n| {
            progress.step(i, n)
        })?;
        progress.phase(Phase::Decode)?;
        let img = decode(&self.vae, &latents, self.dtype)?.to_device(&Device::Cpu)?;
        (0..batch.len()).map(|i| Ok(img.get(i)?)).collect()
    }

    /// Like [`McldPipeline::generate`] with each pair's noise from its own seed.
    pub fn generate_per_sample(&self, batch: &[PairInputs], seeds: &[u64]) -> Result<Vec<Tensor>> {
        if seeds.len() != batch.len() {
            return Err(Error::msg(format!(
                "{} seeds for {} pairs",
                seeds.len(),
                batch.len()
            )));
        }
        let noise = self.noise_per_sample(seeds)?;
        self.generate_from(batch, &noise)
    }

    fn generate_from(&self, batch: &[PairInputs], noise: &Tensor) -> Result<Vec<Tensor>> {
        let cond = self.condition(batch)?;
        let (latents, _) = denoise(
            &self.nets,
            &self.scheduler,
            &cond,
            noise,
            self.guidance_scale,
            |_, _| Ok(()),
        )?;
        let img = decode(&self.vae, &latents, self.dtype)?.to_device(&Device::Cpu)?;
        (0..batch.len()).map(|i| Ok(img.get(i)?)).collect()
    }
}

/// Per-call overrides of the inference config (`mcld infer --steps/--guidance`, `mcld serve`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleOptions {
    /// DDIM steps instead of the config's `num_inference_steps`.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale instead of the config's.
    pub guidance: Option<f64>,
}

/// Where a generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// CLIP, VAE encode of the texture.
    Condition,
    /// The DDIM loop (then [`Progress::step`] per step).
    Sample,
    Decode,
}

/// Hears about a generation's progress; an error returned stops it at that point.
pub trait Progress {
    fn phase(&mut self, _phase: Phase) -> Result<()> {
        Ok(())
    }
    /// Step `i` of `n` (from 1) is done.
    fn step(&mut self, _i: usize, _n: usize) -> Result<()> {
        Ok(())
    }
}

/// Ignores progress.
pub struct NoProgress;

impl Progress for NoProgress {}

/// `mcld test`'s generator: pair number i of the test list gets its noise from seed + i, so
/// its image does not depend on the batch size, on resumption or on `--shard` (with batch size
/// 1 it is the earlier rule, one seed per batch advanced per batch, on a fresh run without a
/// skipped pair).
pub struct SeededGenerator<'a> {
    pub pipeline: &'a McldPipeline,
    pub seed: u64,
}

impl super::testset::Generator for SeededGenerator<'_> {
    fn generate(&mut self, batch: &[PairInputs], positions: &[usize]) -> Result<Vec<Tensor>> {
        let seeds: Vec<u64> = positions
            .iter()
            .map(|p| self.seed.wrapping_add(*p as u64))
            .collect();
        self.pipeline.generate_per_sample(batch, &seeds)
    }
}
