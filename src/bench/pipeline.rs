//! `mcld bench pipeline`: the MCLD pipeline at SD-1.5 size with random weights.
//!
//! Every network is built at its released size (SD-1.5 UNet twice, the reference one without
//! `conv_norm_out`/`conv_out`, the denoising one with `to_k_ip`/`to_v_ip`; pose guider; the
//! 1280-wide face projector; sd-vae-ft-mse; the CLIP ViT-L/14 image encoder of
//! sd-image-variations-diffusers, whose 768-d embedding matches the UNets' cross-attention
//! width) with seeded random weights ([`McldPipeline::random`]), then whole batches are timed
//! phase by phase.
//!
//! GPU memory: the CUDA memory pool's high-water marks (`device::gpu_memory_peak`), a true peak
//! over the whole run, weights included, as PyTorch's `max_memory_allocated`. Where the driver
//! has no pools, the largest `nvidia-smi` sample taken between phases stands in.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::data::{Pair, PairInputs};
use crate::pipeline::mcld::McldPipeline;
use crate::pipeline::sampler;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct PipelineBench {
    /// Images to time (after the warm-up batch).
    pub images: usize,
    /// DDIM steps per image (MCLD uses 20).
    pub steps: usize,
    /// Square image size the networks run at (MCLD: 512; a multiple of 64).
    pub size: usize,
    /// Pairs per forward pass (the loop runs twice that for guidance).
    pub batch_size: usize,
    /// Untimed warm-up batches before timing (0 skips it; useful on a slow CPU).
    pub warmup: usize,
    /// Seed of the random weights and noise.
    pub seed: u64,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
}

/// The built-in sample as a batch of `n` identical pairs (timings do not depend on content).
fn sample_batch(n: usize, seed: u64) -> Result<Vec<PairInputs>> {
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let photo = crate::pipeline::demo::sample_photo().to_rgb8();
    let (w, h) = photo.dimensions();
    let src_pose = crate::pipeline::demo::synthetic_pose(w, h, false);
    let pose = crate::pipeline::demo::synthetic_pose(w, h, true);
    let assets = crate::person::texture::TextureAssets::builtin()?;
    let texture = crate::person::texture::texture_map(&photo, &src_pose, &assets)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let face: Vec<f32> = (0..512).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok((0..n)
        .map(|i| PairInputs {
            pair: Pair {
                from: format!("bench{i}.png"),
                to: "pose.png".into(),
            },
            source: photo.clone(),
            target: photo.clone(),
            pose: pose.clone(),
            texture: texture.clone(),
            face: face.clone(),
            face_missing: false,
        })
        .collect())
}

/// This process's GPU memory in bytes according to `nvidia-smi`, when it answers.
pub(crate) fn gpu_used_bytes() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let pid = std::process::id();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut it = l.split(',').map(str::trim);
        let p: u32 = it.next()?.parse().ok()?;
        let mib: u64 = it.next()?.parse().ok()?;
        (p == pid).then_some(mib * 1024 * 1024)
    })
}

/// The run's peak GPU memory: the pool's high-water marks where the driver keeps them, else
/// the largest `fallback` sample (nvidia-smi between phases, which misses peaks inside one).
pub(crate) fn print_gpu_peak(device: &Device, fallback: Option<u64>) {
    match (crate::device::gpu_memory_peak(device), fallback) {
        (Some(p), _) => println!(
            "peak GPU memory {:.2} GiB allocated, {:.2} GiB reserved (CUDA pool high-water marks)",
            gib(p.used),
            gib(p.reserved)
        ),
        (None, Some(b)) => println!(
            "peak GPU memory {:.2} GiB (nvidia-smi samples only: peaks between them are missed)",
            gib(b)
        ),
        (None, None) => {
            println!("peak GPU memory: not reported (no pool statistics, no nvidia-smi)")
        }
    }
}

/// Seconds of each phase for one batch, plus whether everything stayed finite.
#[derive(Debug, Default, Clone)]
struct Phases {
    condition: f64,
    prepare: f64,
    denoise: f64,
    decode: f64,
    finite: bool,
    latent_absmax: f32,
}

impl Phases {
    fn total(&self) -> f64 {
        self.condition + self.prepare + self.denoise + self.decode
    }
}

/// Largest |x| and whether every value is finite, on the host: candle's `max` reductions skip
/// NaNs (CUDA's `fmaxf`, and the CPU's comparisons past the first element).
fn absmax(t: &Tensor) -> Result<(f32, bool)> {
    let v = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    Ok((max, v.iter().all(|x| x.is_finite())))
}

/// Runs one batch phase by phase; `gpu_peak` collects nvidia-smi samples on CUDA.
fn run_batch(
    p: &McldPipeline,
    batch: &[PairInputs],
    seed: u64,
    gpu_peak: &mut Option<u64>,
) -> Result<Phases> {
    let dev = &p.device;
    let mut sample_gpu = || {
        if dev.is_cuda() {
            if let Some(b) = gpu_used_bytes() {
                *gpu_peak = Some(gpu_peak.unwrap_or(0).max(b));
            }
        }
    };
    let mut ph = Phases::default();
    let t = Instant::now();
    let cond = p.condition(batch)?;
    dev.synchronize()?;
    ph.condition = t.elapsed().as_secs_f64();
    sample_gpu();
    let t = Instant::now();
    let prep = sampler::prepare(&p.nets, &cond, p.guidance_scale)?;
    dev.synchronize()?;
    ph.prepare = t.elapsed().as_secs_f64();
    sample_gpu();
    let noise = p.noise(batch.len(), seed)?;
    let t = Instant::now();
    let (latents, _) = sampler::sample(
        &p.nets,
        &p.scheduler,
        &prep,
        &noise,
        p.guidance_scale,
        |_, _| Ok(()),
    )?;
    dev.synchronize()?;
    ph.denoise = t.elapsed().as_secs_f64();
    sample_gpu();
    let t = Instant::now();
    let img = sampler::decode(&p.vae, &latents, p.dtype)?;
    dev.synchronize()?;
    ph.decode = t.elapsed().as_secs_f64();
    sample_gpu();
    let (latent_max, latent_finite) = absmax(&latents)?;
    let (_, img_finite) = absmax(&img)?;
    ph.latent_absmax = latent_max;
    ph.finite = latent_finite && img_finite;
    Ok(ph)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn run(args: &PipelineBench) -> Result<()> {
    let (device, dtype) = (args.device.clone(), args.dtype);
    if args.images == 0 || args.batch_size == 0 {
        return Err(Error::msg("--images and --batch-size must be at least 1"));
    }
    let t = Instant::now();
    let p = McldPipeline::random(&device, dtype, args.steps, args.size, args.seed)?;
    device.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    println!(
        "bench pipeline: SD-1.5-size MCLD with random weights, {}x{}, {} DDIM steps, guidance \
         {} (doubled batch), batch {}, device {}, precision {}",
        args.size,
        args.size,
        args.steps,
        p.guidance_scale,
        args.batch_size,
        crate::device::device_name(&args.device),
        p.precision.describe()
    );
    println!("built the networks in {build_s:.1}s");
    let batch = sample_batch(args.batch_size, args.seed)?;
    let mut gpu_peak = None;
    for w in 0..args.warmup {
        let ph = run_batch(&p, &batch, args.seed.wrapping_add(w as u64), &mut gpu_peak)?;
        println!("warm-up batch: {:.2}s", ph.total());
    }
    let batches = args.images.div_ceil(args.batch_size);
    let mut all = Vec::new();
    for i in 0..batches {
        let ph = run_batch(
            &p,
            &batch,
            args.seed.wrapping_add(1000 + i as u64),
            &mut gpu_peak,
        )?;
        println!(
            "batch {}/{batches}: {:.2}s (condition {:.2}, reference UNet + pose + projector {:.2}, \
             {} steps {:.2}, decode {:.2}); latents max|x| {:.3}{}",
            i + 1,
            ph.total(),
            ph.condition,
            ph.prepare,
            args.steps,
            ph.denoise,
            ph.decode,
            ph.latent_absmax,
            if ph.finite { "" } else { "  NON-FINITE (NaN/inf)" }
        );
        all.push(ph);
    }
    let n = (batches * args.batch_size) as f64;
    let sum = |f: fn(&Phases) -> f64| all.iter().map(f).sum::<f64>() / n;
    println!(
        "per image: {:.3}s total = condition (CLIP x2 + VAE encode) {:.3}s + reference UNet, \
         pose guider, projector {:.3}s + {} guided steps {:.3}s ({:.3}s/step) + VAE decode {:.3}s",
        sum(Phases::total),
        sum(|p| p.condition),
        sum(|p| p.prepare),
        args.steps,
        sum(|p| p.denoise),
        sum(|p| p.denoise) / args.steps.max(1) as f64,
        sum(|p| p.decode),
    );
    match crate::bench::peak_rss_bytes() {
        Some(b) => println!("peak RSS {:.2} GiB", gib(b)),
        None => println!("peak RSS: not reported by this OS"),
    }
    if device.is_cuda() {
        print_gpu_peak(&device, gpu_peak);
    }
    if all.iter().any(|p| !p.finite) {
        return Err(Error::msg(
            "non-finite latents or image in a timed batch (see above): the timings are of a \
             run that produced NaN/inf",
        ));
    }
    Ok(())
}
