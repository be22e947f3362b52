//! Assembles the training step from a training config: starting weights from the real files,
//! frozen VAE and CLIP, the training scheduler, `clip_std.npy`, AdamW settings.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adamw::AdamWConfig;
use super::api::TrainStep;
use super::init::{initial_weights, InitSources};
use super::params::{is_trainable, Params};
use super::trainer::{FrozenEncoders, McldTrainer, StepConfig};
use crate::config::TrainConfig;
use crate::models::clip::{self, ClipVisionModelWithProjection};
use crate::models::vae::{self, AutoencoderKL};
use crate::scheduler::ddim::{
    BetaSchedule, DdimConfig, DdimScheduler, PredictionType, TimestepSpacing,
};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The validation scheduler (train.py lines 326-334): the config's kwargs, plus, with
/// `enable_zero_snr`, zero-terminal-SNR rescale, trailing spacing and v-prediction; without,
/// the kwargs alone (epsilon prediction unless they say otherwise).
pub fn val_scheduler_config(cfg: &TrainConfig) -> Result<DdimConfig> {
    let mut c = DdimConfig::from_config_kwargs(&cfg.noise_scheduler_kwargs)?;
    if cfg.enable_zero_snr {
        c.rescale_betas_zero_snr = true;
        c.timestep_spacing = TimestepSpacing::Trailing;
        c.prediction_type = PredictionType::VPrediction;
    }
    Ok(c)
}

/// The training scheduler: the validation one with `beta_schedule` forced to scaled_linear,
/// as train.py line 335 does whatever the config says.
pub fn train_scheduler(cfg: &TrainConfig) -> Result<DdimScheduler> {
    let mut c = val_scheduler_config(cfg)?;
    c.beta_schedule = BetaSchedule::ScaledLinear;
    DdimScheduler::new(c)
}

/// The scheduler of the validation grid.
pub fn val_scheduler(cfg: &TrainConfig) -> Result<DdimScheduler> {
    DdimScheduler::new(val_scheduler_config(cfg)?)
}

/// The frozen VAE and image encoder, in `dtype`.
pub fn frozen_encoders(cfg: &TrainConfig, device: &Device, dtype: DType) -> Result<FrozenEncoders> {
    let hint = |e: Error| {
        Error::msg(format!(
            "{e} (`mcld download --only vae,image_encoder,train` fetches the VAE, the image \
             encoder and the base models)"
        ))
    };
    let vdir = ModelDir::open(&cfg.vae_model_path).map_err(hint)?;
    let vcfg: vae::Config = vdir.config()?;
    let w = vdir.strict()?;
    let vae = AutoencoderKL::new(w.var_builder(dtype, device), &vcfg)
        .map_err(|e| Error::weights(w.source(), e.to_string()))?;
    w.finish()?;
    let edir = ModelDir::open(&cfg.image_encoder_path).map_err(hint)?;
    let ecfg = clip::Config::from_file(&edir.config)?;
    let w = edir
        .strict()?
        .allow_unused(["text_model.", "text_projection.", "logit_scale"]);
    let image_encoder = ClipVisionModelWithProjection::new(w.var_builder(dtype, device), &ecfg)
        .map_err(|e| Error::weights(w.source(), e.to_string()))?;
    w.finish()?;
    Ok(FrozenEncoders {
        vae,
        image_encoder,
        dtype,
    })
}

/// Reads `clip_std.npy` (D values).
pub fn read_clip_std(path: &Path) -> Result<Tensor> {
    let (shape, data) = crate::data::npy::read_f32(path).map_err(|e| {
        Error::input(
            path,
            format!("{e} (write it with `mcld prepare --only stats`, or use the reference's file)"),
        )
    })?;
    if shape.len() != 1 || data.is_empty() {
        return Err(Error::input(
            path,
            format!("expected a 1-D array of per-dimension stds, got shape {shape:?}"),
        ));
    }
    Ok(Tensor::from_vec(data, shape[0], &Device::Cpu)?)
}

/// The dtype of the frozen VAE and CLIP: the config's `weight_dtype` (train.py casts them to
/// it).
pub fn config_dtype(cfg: &TrainConfig) -> DType {
    match cfg.weight_dtype.as_str() {
        "fp16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

/// The compute dtype of the trained networks: `solver.mixed_precision` (accelerate's autocast;
/// f16 brings the loss scaler). Master weights and AdamW stay f32 either way.
pub fn mixed_precision_dtype(cfg: &TrainConfig) -> DType {
    match cfg.solver.mixed_precision.as_str() {
        "fp16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

/// The training step `mcld train` drives.
pub fn build_step(cfg: &TrainConfig, device: &Device, dtype: DType) -> Result<Box<dyn TrainStep>> {
    Ok(Box::new(build_trainer(cfg, device, dtype)?))
}

/// The whole training step for `cfg`, computing in `dtype` on `device` (the frozen encoders in
/// [`config_dtype`]).
pub fn build_trainer(cfg: &TrainConfig, device: &Device, dtype: DType) -> Result<McldTrainer> {
    build_trainer_with(cfg, device, dtype, config_dtype(cfg))
}

/// [`build_trainer`] with the frozen encoders' dtype given.
pub fn build_trainer_with(
    cfg: &TrainConfig,
    device: &Device,
    dtype: DType,
    encoder_dtype: DType,
) -> Result<McldTrainer> {
    if cfg.pose_guider_pretrain && cfg.cond_chan != 3 {
        return Err(Error::msg(format!(
            "config `cond_chan`: {} input channels for the pose guider, but the training pose \
             images are 3-channel DensePose IUV images it could not read (train.py builds the \
             guider the same way and fails at its first step)",
            cfg.cond_chan
        )));
    }
    let init = initial_weights(&InitSources {
        unet_dir: cfg.base_model_path.join("unet"),
        controlnet: cfg
            .pose_guider_pretrain
            .then(|| cfg.controlnet_openpose_path.clone()),
        cond_chan: cfg.cond_chan,
        seed: cfg.seed,
    })?;
    let params = Params::new(init.tensors, is_trainable, device)?;
    let s = &cfg.solver;
    let mut step = StepConfig::mcld(init.cfg, dtype);
    step.adamw = AdamWConfig {
        beta1: s.adam_beta1,
        beta2: s.adam_beta2,
        weight_decay: s.adam_weight_decay,
        eps: s.adam_epsilon,
        max_grad_norm: s.max_grad_norm,
    };
    step.uncond_ratio = cfg.uncond_ratio;
    step.noise_offset = cfg.noise_offset;
    step.snr_gamma = cfg.snr_gamma;
    step.gradient_checkpointing = s.gradient_checkpointing;
    // Frozen encoders in weight_dtype, as the reference casts VAE and CLIP (half precision
    // on the CPU falls back to f32 there: no half matmul).
    let enc_dtype = if device.is_cpu() && encoder_dtype != DType::F32 {
        DType::F32
    } else {
        encoder_dtype
    };
    let encoders = frozen_encoders(cfg, device, enc_dtype)?;
    let clip_std = read_clip_std(&cfg.clip_std_path)?;
    McldTrainer::new(step, params, encoders, train_scheduler(cfg)?, clip_std)
}
