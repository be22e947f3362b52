//! The MCLD sampler (SPEC §5): conditioning, the reference UNet once, the guided DDIM loop and
//! the VAE decode. Classifier-free guidance runs as one doubled batch [uncond, cond].
//!
//! Decision: the reference UNet runs on the conditional half only. The reference runs it on the
//! doubled batch, but the unconditional half of the denoising UNet never reads the bank, so that
//! half of the work is wasted; the results are identical (the `pipeline_small` fixture checks).
//!
//! Precision: the networks run in `Mcld::dtype` (f32, f16 or bf16), but the latents, the
//! guidance combination and the DDIM update stay in f32. The reference's fp16 run keeps latents
//! in fp16; keeping them in f32 costs nothing measurable (a few 64x64x4 tensors per step) and
//! stops 20 steps of half-precision rounding from accumulating in the one state that persists.

use candle_core::{DType, Tensor};

use crate::models::mcld::{FaceCond, Mcld, McldInput, PoseCond};
use crate::models::unet::{BankGuidance, ReferenceBank};
use crate::models::vae::AutoencoderKL;
use crate::scheduler::ddim::DdimScheduler;
use crate::Result;

/// The VAE's latent scale (SD-1.x).
pub const VAE_SCALE: f64 = 0.18215;

/// Network-ready conditioning of a batch of B pairs.
pub struct Conditioning {
    /// CLIP image embedding of the source photos (B, 1, D).
    pub clip_src: Tensor,
    /// CLIP image embedding of the texture maps (B, 1, D).
    pub clip_tex: Tensor,
    /// Face embeddings (B, 1, 512).
    pub face: Tensor,
    /// VAE latents of the texture maps x 0.18215 (B, 4, h, w).
    pub ref_latents: Tensor,
    /// Target IUV images in [0, 1] (B, 3, H, W).
    pub pose: Tensor,
}

/// What one denoising step produced (kept for tests and previews).
pub struct StepRecord {
    pub timestep: usize,
    pub noise_pred: Tensor,
    pub latents: Tensor,
}

/// What the loop reuses at every step: computed once per batch.
pub struct Prepared {
    /// CLIP embeddings and face tokens of the doubled batch (or the batch itself without
    /// guidance); the unconditional half is zeros.
    pub clip_src: Tensor,
    pub clip_tex: Tensor,
    pub face_tokens: Tensor,
    /// The reference UNet's bank (conditional half only).
    pub bank: ReferenceBank,
    /// Pose-guider features, doubled like the batch.
    pub pose: Tensor,
    /// Pairs in the batch.
    pub batch: usize,
}

/// Face tokens, the reference UNet (once, t = 0, context = CLIP(source)) and the pose
/// features: everything the loop needs besides the latents.
pub fn prepare(nets: &Mcld, cond: &Conditioning, guidance_scale: f64) -> Result<Prepared> {
    let b = cond.ref_latents.dim(0)?;
    let dtype = nets.dtype();
    let face_tokens = nets.face_tokens(&cond.face)?;
    let cfg = guidance_scale > 1.0;
    let double = |cond_half: &Tensor| -> Result<Tensor> {
        if cfg {
            Ok(Tensor::cat(&[&cond_half.zeros_like()?, cond_half], 0)?)
        } else {
            Ok(cond_half.clone())
        }
    };
    let bank = nets.reference_bank(&cond.ref_latents, &cond.clip_src)?;
    let pose = nets.pose_features(&cond.pose)?;
    let pose = if cfg {
        Tensor::cat(&[&pose, &pose], 0)?
    } else {
        pose
    };
    Ok(Prepared {
        clip_src: double(&cond.clip_src.to_dtype(dtype)?)?,
        clip_tex: double(&cond.clip_tex.to_dtype(dtype)?)?,
        face_tokens: double(&face_tokens)?,
        bank,
        pose,
        batch: b,
    })
}

/// Runs the guided DDIM loop from `init_noise`; returns the final latents and every step.
/// `on_step(i, n)` runs after step i of n (from 1); an error from it stops the loop there
/// (how `mcld serve` cancels a job) and is returned.
pub fn denoise(
    nets: &Mcld,
    scheduler: &DdimScheduler,
    cond: &Conditioning,
    init_noise: &Tensor,
    guidance_scale: f64,
    on_step: impl FnMut(usize, usize) -> Result<()>,
) -> Result<(Tensor, Vec<StepRecord>)> {
    let prep = prepare(nets, cond, guidance_scale)?;
    sample(nets, scheduler, &prep, init_noise, guidance_scale, on_step)
}

/// The DDIM loop alone, on prepared conditioning.
pub fn sample(
    nets: &Mcld,
    scheduler: &DdimScheduler,
    prep: &Prepared,
    init_noise: &Tensor,
    guidance_scale: f64,
    mut on_step: impl FnMut(usize, usize) -> Result<()>,
) -> Result<(Tensor, Vec<StepRecord>)> {
    let b = prep.batch;
    if init_noise.dim(0)? != b {
        return Err(crate::Error::msg(format!(
            "sampler: {} noise samples for a batch of {b}",
            init_noise.dim(0)?
        )));
    }
    let dtype = nets.dtype();
    let cfg = guidance_scale > 1.0;

    let timesteps = scheduler.timesteps().to_vec();
    let mut latents = init_noise.to_dtype(DType::F32)?;
    let mut steps = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let input = if cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let input = input.to_dtype(dtype)?;
        let tt = Tensor::full(t as i64, input.dim(0)?, input.device())?;
        let mut inp = McldInput::new(
            &input,
            &tt,
            &prep.clip_src,
            &prep.clip_tex,
            FaceCond::Tokens(&prep.face_tokens),
            PoseCond::Features(&prep.pose),
        );
        inp.bank = Some(&prep.bank);
        inp.bank_guidance = if cfg {
            BankGuidance::UncondFirstHalf
        } else {
            BankGuidance::AllSamples
        };
        let out = nets.forward(&inp)?.to_dtype(DType::F32)?;
        let noise_pred = if cfg {
            let uncond = out.narrow(0, 0, b)?;
            let cond_p = out.narrow(0, b, b)?;
            (&uncond + ((cond_p - &uncond)? * guidance_scale)?)?
        } else {
            out
        };
        latents = scheduler.step(&noise_pred, t, &latents)?.prev_sample;
        steps.push(StepRecord {
            timestep: t,
            noise_pred,
            latents: latents.clone(),
        });
        on_step(i + 1, timesteps.len())?;
    }
    Ok((latents, steps))
}

/// Decodes latents to images in [0, 1]: (vae.decode(z / 0.18215) / 2 + 0.5).clamp(0, 1).
/// The VAE runs in `dtype` (its weights' dtype); the result is f32.
pub fn decode(vae: &AutoencoderKL, latents: &Tensor, dtype: DType) -> Result<Tensor> {
    let z = (latents.to_dtype(DType::F32)? / VAE_SCALE)?.to_dtype(dtype)?;
    let x = vae.decode(&z)?.to_dtype(DType::F32)?;
    Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
