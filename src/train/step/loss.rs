//! MCLD's training objective on network inputs (SPEC §4, the reference's `train.py`): the
//! scheduler's target (velocity for v-prediction, the noise for epsilon), and with
//! `snr_gamma > 0` min-SNR weights and a second MSE term inside the face mask; with
//! `snr_gamma == 0` train.py's plain branch, the mean squared error over everything.
//! Everything random is drawn by the caller, so this function is deterministic and is what the
//! `train_step` fixture checks.

use candle_core::{DType, Device, Tensor, D};

use crate::imageops::interpolate_nearest;
use crate::models::mcld::Mcld;
use crate::models::unet::{BankGuidance, DenoiseInput, ReferenceBank};
use crate::ops::recompute::Tape;
use crate::scheduler::ddim::{DdimScheduler, PredictionType};
use crate::{Error, Result};

/// DensePose part indices of the head, the face-mask parts.
const FACE_PARTS: [u8; 2] = [23, 24];

/// Inputs of one training forward pass, after the frozen encoders (VAE, CLIP).
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Target latents x 0.18215, (B, 4, h, w), f32.
    pub latents: &'a Tensor,
    /// Noise including the offset noise, (B, 4, h, w), f32.
    pub noise: &'a Tensor,
    /// Training timesteps, (B,), integer.
    pub timesteps: &'a Tensor,
    /// Texture latents x 0.18215 for the reference UNet; `None` for an unconditional step
    /// (the reference UNet is skipped and the denoising UNet attends to itself only).
    pub ref_latents: Option<&'a Tensor>,
    /// CLIP image embedding of the source, noise already added, (B, 1, D).
    pub clip_src: &'a Tensor,
    /// CLIP image embedding of the texture, (B, 1, D).
    pub clip_tex: &'a Tensor,
    /// Face embeddings (B, 1, 512).
    pub face_emb: &'a Tensor,
    /// Target IUV image / 255, (B, 3, H, W).
    pub pose: &'a Tensor,
}

/// The loss and the intermediate values the fixture checks.
#[derive(Debug, Clone)]
pub struct LossOutputs {
    /// Scalar f32 loss, tracked.
    pub loss: Tensor,
    pub loss_per_sample: Tensor,
    pub model_pred: Tensor,
    pub target: Tensor,
    pub noisy_latents: Tensor,
    pub weights: Tensor,
    /// (B, 1, h, w) 0/1.
    pub face_mask: Tensor,
}

/// Face mask at latent size from the pose images: part index (channel 2 x 255) 23 or 24,
/// nearest-resized as `F.interpolate(mode="nearest")` does. Computed on the host (it carries no
/// gradient and is a few kilobytes).
pub fn face_mask_from_pose(pose: &Tensor, latent: (usize, usize)) -> Result<Tensor> {
    let (b, c, h, w) = pose.dims4()?;
    if c != 3 {
        return Err(Error::msg(format!(
            "pose images must be (B, 3, H, W), got {:?}",
            pose.dims()
        )));
    }
    let parts = (pose.narrow(1, 2, 1)?.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = parts
        .iter()
        .map(|&p| u8::from(FACE_PARTS.iter().any(|&f| f as f32 == p)))
        .collect();
    let small = interpolate_nearest(&bytes, b, (h, w), latent)?;
    let v: Vec<f32> = small.into_iter().map(f32::from).collect();
    Ok(Tensor::from_vec(v, (b, 1, latent.0, latent.1), &Device::Cpu)?.to_device(pose.device())?)
}

/// Settings of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    /// Min-SNR gamma (`snr_gamma`, 5); 0 selects the plain mean squared error.
    pub snr_gamma: f64,
    /// Round the bank through f16 as the reference does (its gradient is rounded too). Off
    /// only for finite-difference checks, where rounding makes the loss piecewise constant.
    pub bank_fp16_round: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            snr_gamma: 5.0,
            bank_fp16_round: true,
        }
    }
}

/// The reference UNet's bank: `None` for an unconditional step, else the bank of the reference
/// UNet at t = 0 on the texture latents with context CLIP(source). With a `tape`, every block is a checkpointed segment.
pub fn reference_bank<'a>(
    nets: &'a Mcld,
    inp: &LossInputs,
    tape: Option<&Tape<'a>>,
) -> Result<Option<ReferenceBank>> {
    let Some(r) = inp.ref_latents else {
        return Ok(None);
    };
    let dtype = nets.dtype();
    let b = r.dim(0)?;
    let t0 = Tensor::zeros(b, DType::I64, r.device())?;
    let r = r.to_dtype(dtype)?;
    let src = inp.clip_src.to_dtype(dtype)?;
    let unet = &nets.reference_unet;
    Ok(Some(match tape {
        Some(tp) => unet.forward_reference_checkpointed(tp, &r, &t0, &src)?,
        None => unet.forward_reference(&r, &t0, &src)?,
    }))
}

/// Forward pass and loss: [`reference_bank`], then [`denoise_loss`].
///
/// With a `tape`, both UNets run block by block as checkpointed segments (activation
/// checkpointing): call `tape.backward(&out.loss)` instead of `out.loss.backward()`.
pub fn mcld_loss<'a>(
    nets: &'a Mcld,
    scheduler: &DdimScheduler,
    inp: &LossInputs,
    opts: LossOptions,
    tape: Option<&Tape<'a>>,
) -> Result<LossOutputs> {
    let bank = reference_bank(nets, inp, tape)?;
    denoise_loss(nets, scheduler, inp, bank.as_ref(), opts, tape)
}

/// The denoising half of the step: face tokens, stage contexts, pose features, the denoising
/// UNet reading `bank`, and the loss. The networks run in `nets.dtype`; the loss in f32 (f64
/// when the networks run in f64, for finite-difference checks).
pub fn denoise_loss<'a>(
    nets: &'a Mcld,
    scheduler: &DdimScheduler,
    inp: &LossInputs,
    bank: Option<&ReferenceBank>,
    opts: LossOptions,
    tape: Option<&Tape<'a>>,
) -> Result<LossOutputs> {
    let dtype = nets.dtype();
    let ldt = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (_, _, h, w) = inp.latents.dims4()?;
    let dev = inp.latents.device();
    let latents = inp.latents.to_dtype(ldt)?;
    let noise = inp.noise.to_dtype(ldt)?;
    let noisy = scheduler.add_noise(&latents, &noise, inp.timesteps)?;
    let target = match scheduler.config().prediction_type {
        PredictionType::Epsilon => noise.clone(),
        PredictionType::VPrediction => scheduler.get_velocity(&latents, &noise, inp.timesteps)?,
        other => {
            return Err(Error::msg(format!(
                "training: prediction type {other:?} has no target (train.py knows epsilon and \
                 v_prediction)"
            )))
        }
    };

    let face_tokens = nets.face_tokens(inp.face_emb)?;
    let contexts = nets.contexts(inp.clip_src, inp.clip_tex, &face_tokens)?;
    let pose = nets.pose_features(inp.pose)?;
    let sample = noisy.to_dtype(dtype)?;
    let mut d = DenoiseInput::new(&sample, inp.timesteps, &contexts);
    d.pose_features = Some(&pose);
    d.bank = bank;
    d.guidance = BankGuidance::AllSamples;
    d.bank_fp16_round = opts.bank_fp16_round;
    let pred = match tape {
        Some(tp) => nets.denoising_unet.forward_denoise_checkpointed(tp, &d)?,
        None => nets.denoising_unet.forward_denoise(&d)?,
    }
    .to_dtype(ldt)?;

    let mask = face_mask_from_pose(inp.pose, (h, w))?.to_dtype(ldt)?;
    let diff = (&pred - &target)?;
    if opts.snr_gamma == 0.0 {
        // train.py: F.mse_loss(pred, target) over every element, no weights, no face term.
        let per_sample = diff.sqr()?.flatten_from(1)?.mean(D::Minus1)?;
        let loss = diff.sqr()?.mean_all()?;
        let weights = per_sample.ones_like()?;
        return Ok(LossOutputs {
            loss,
            loss_per_sample: per_sample,
            model_pred: pred,
            target,
            noisy_latents: noisy,
            weights,
            face_mask: mask,
        });
    }
    let masked = (pred.broadcast_mul(&mask)? - target.broadcast_mul(&mask)?)?;
    let per_elem = (diff.sqr()? + masked.sqr()?)?;
    let per_sample = per_elem.flatten_from(1)?.mean(D::Minus1)?;
    let weights = scheduler
        .min_snr_weights(inp.timesteps, opts.snr_gamma)?
        .to_device(dev)?
        .to_dtype(ldt)?;
    let weighted = (&per_sample * &weights)?;
    let loss = weighted.mean_all()?;
    Ok(LossOutputs {
        loss,
        loss_per_sample: per_sample,
        model_pred: pred,
        target,
        noisy_latents: noisy,
        weights,
        face_mask: mask,
    })
}
