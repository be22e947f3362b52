//! Typed views of `configs/train/train.yaml` and `configs/inference/inference.yaml`.
//!
//! The keys are the reference's (SPEC §4-5), so a reference config loads unchanged. Unknown keys
//! are refused: a typo in a 26-hour training config should fail at once, not be ignored.
//! A few keys are ours (marked "mcld:"); they all have defaults so reference files still load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Parses YAML into `T`, naming the file and the full key path on error.
pub fn load_yaml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(path, format!("cannot read: {e}")))?;
    parse_yaml(&text, path)
}

/// A config shipped in `configs/`, compiled into the binary: what the demos, the random trees
/// and the benches start from.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinYaml {
    /// From the crate root; messages name it.
    pub path: &'static str,
    pub text: &'static str,
}

macro_rules! builtin_yaml {
    ($path:literal) => {
        BuiltinYaml {
            path: $path,
            text: include_str!(concat!("../", $path)),
        }
    };
}

pub const TRAIN_YAML: BuiltinYaml = builtin_yaml!("configs/train/train.yaml");
pub const INFERENCE_YAML: BuiltinYaml = builtin_yaml!("configs/inference/inference.yaml");

impl BuiltinYaml {
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        parse_yaml(
            self.text,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(self.path),
        )
    }
}

/// Writes `value` as YAML to `path`, atomically.
pub fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_yaml::to_string(value).map_err(|e| Error::msg(e.to_string()))?;
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Like [`load_yaml`] on text already in memory; `path` is only used in messages.
pub fn parse_yaml<T: for<'de> Deserialize<'de>>(text: &str, path: &Path) -> Result<T> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        if key == "." || key.is_empty() {
            Error::config(path, inner.to_string())
        } else {
            Error::config(path, format!("key `{key}`: {inner}"))
        }
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train_bs: usize,
    pub val_bs: usize,
    pub num_processes: usize,
    pub train_width: usize,
    pub train_height: usize,
    #[serde(default)]
    pub meta_paths: Vec<String>,
    pub texture_clip_condition: bool,
    pub texture_unet_condition: bool,
    /// Dataset root holding `train/`, `test/`, `*_densepose/`, `*_texture/`, `*_face/`.
    pub root_dir: PathBuf,
    pub pose_type: String,
    pub clip_type: String,
    pub use_face_emb: bool,
    /// mcld: test pairs (`from,to`); relative paths are taken from `root_dir`.
    #[serde(default = "default_test_csv")]
    pub test_pairs: PathBuf,
    /// mcld: training pairs, written by `mcld prepare` (or supplied by the user).
    #[serde(default = "default_train_csv")]
    pub train_pairs: PathBuf,
}

fn default_test_csv() -> PathBuf {
    "test.csv".into()
}
fn default_train_csv() -> PathBuf {
    "train.csv".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverConfig {
    pub gradient_accumulation_steps: usize,
    pub mixed_precision: String,
    pub enable_xformers_memory_efficient_attention: bool,
    pub gradient_checkpointing: bool,
    pub max_train_steps: usize,
    pub max_grad_norm: f64,
    pub learning_rate: f64,
    pub scale_lr: bool,
    pub lr_warmup_steps: usize,
    pub lr_scheduler: String,
    pub use_8bit_adam: bool,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValConfig {
    pub validation_steps: usize,
}

/// diffusers `DDIMScheduler` keyword arguments, as both configs spell them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseSchedulerKwargs {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub solver: SolverConfig,
    pub val: ValConfig,
    pub noise_scheduler_kwargs: NoiseSchedulerKwargs,
    pub base_model_path: PathBuf,
    pub vae_model_path: PathBuf,
    pub image_encoder_path: PathBuf,
    pub controlnet_openpose_path: PathBuf,
    pub pretrained_base_model_path: PathBuf,
    pub pretrained_vae_path: PathBuf,
    /// Only in the reference's first commit; its train.py never reads it (nor does mcld).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_resume_dir: Option<PathBuf>,
    /// Only in the reference's first commit; its train.py never reads it (nor does mcld).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoising_unet_path: Option<PathBuf>,
    /// Only in the reference's first commit; its train.py never reads it (nor does mcld).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_unet_path: Option<PathBuf>,
    /// Only in the reference's first commit; its train.py never reads it (nor does mcld).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pose_guider_path: Option<PathBuf>,
    pub inference_config: PathBuf,
    pub weight_dtype: String,
    pub uncond_ratio: f64,
    pub noise_offset: f64,
    pub snr_gamma: f64,
    pub enable_zero_snr: bool,
    pub pose_guider_pretrain: bool,
    pub device: String,
    pub seed: u64,
    pub resume_from_checkpoint: String,
    pub checkpointing_steps: usize,
    pub save_model_epoch_interval: usize,
    pub exp_name: String,
    pub output_dir: PathBuf,
    pub cond_chan: usize,
    pub no_save: bool,
    /// mcld: per-dimension std of the CLIP embeddings of the training sources (`mcld prepare`).
    #[serde(default = "default_clip_std")]
    pub clip_std_path: PathBuf,
    /// mcld: `mcld train` keeps this many newest `checkpoint-N/` folders.
    #[serde(default = "default_checkpoints_total_limit")]
    pub checkpoints_total_limit: usize,
}

fn default_checkpoints_total_limit() -> usize {
    3
}

fn default_clip_std() -> PathBuf {
    "./dataset/fashion/clip_std.npy".into()
}

/// AnimateAnyone's 3-D UNet options as the reference's inference configs spell them. MCLD's
/// image model is the 2-D case of that UNet: the options that would add frames are refused
/// or named at start-up ([`InferenceConfig::notes`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetAdditionalKwargs {
    #[serde(default)]
    pub use_inflated_groupnorm: bool,
    #[serde(default)]
    pub unet_use_cross_frame_attention: bool,
    #[serde(default)]
    pub unet_use_temporal_attention: bool,
    #[serde(default)]
    pub use_motion_module: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_module_resolutions: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_module_mid_block: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_module_decoder_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_module_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_module_kwargs: Option<MotionModuleKwargs>,
}

/// The motion module's settings (video only; named, never used).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionModuleKwargs {
    pub num_attention_heads: Option<usize>,
    pub num_transformer_block: Option<usize>,
    pub attention_block_types: Option<Vec<String>>,
    pub temporal_position_encoding: Option<bool>,
    pub temporal_position_encoding_max_len: Option<usize>,
    pub temporal_attention_dim_div: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    #[serde(default)]
    pub unet_additional_kwargs: Option<UnetAdditionalKwargs>,
    pub noise_scheduler_kwargs: NoiseSchedulerKwargs,
    /// The reference's `inference_v1.yaml` has none (its test script then uses DDIM).
    #[serde(default = "default_sampler")]
    pub sampler: String,
    /// mcld: DDIM steps (the reference hard-codes 20).
    #[serde(default = "default_steps")]
    pub num_inference_steps: usize,
    /// mcld: classifier-free guidance scale (the reference hard-codes 3.5).
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
}

fn default_sampler() -> String {
    "DDIM".into()
}

fn default_steps() -> usize {
    20
}
fn default_guidance() -> f64 {
    3.5
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = load_yaml(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::config(path, format!("key `{key}`: {msg}")));
        if self.data.train_bs == 0 {
            return bad("data.train_bs", "expected a batch size >= 1, got 0");
        }
        if !matches!(self.weight_dtype.as_str(), "fp16" | "fp32" | "bf16") {
            return bad("weight_dtype", "expected one of fp16, fp32, bf16");
        }
        if !matches!(self.solver.mixed_precision.as_str(), "no" | "fp16" | "bf16") {
            return bad("solver.mixed_precision", "expected one of no, fp16, bf16");
        }
        if self.solver.gradient_accumulation_steps == 0 {
            return bad("solver.gradient_accumulation_steps", "expected >= 1");
        }
        if !(0.0..=1.0).contains(&self.uncond_ratio) {
            return bad("uncond_ratio", "expected a probability in [0, 1]");
        }
        if !self.data.train_width.is_multiple_of(8) || !self.data.train_height.is_multiple_of(8) {
            return bad("data.train_width", "image sizes must be multiples of 8");
        }
        self.noise_scheduler_kwargs
            .validate(path, "noise_scheduler_kwargs")
    }
}

impl TrainConfig {
    /// Start-up messages for keys set to values mcld does not follow, each saying what happens
    /// instead (no key is silently ignored). Keys with the reference's values give none.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |key: &str, what: String| out.push(format!("config `{key}`: {what}"));
        let d = &self.data;
        if !d.meta_paths.is_empty() {
            note(
                "data.meta_paths",
                format!(
                    "not read (the reference's dataset does not read it either); the pairs \
                     come from data.train_pairs ({})",
                    d.train_pairs.display()
                ),
            );
        }
        if d.texture_clip_condition {
            note(
                "data.texture_clip_condition",
                "true is not supported; the second CLIP condition is the texture map's \
                 CLIP embedding as with false"
                    .into(),
            );
        }
        if !d.texture_unet_condition {
            note(
                "data.texture_unet_condition",
                "false is not supported; the reference UNet reads the texture map as with true"
                    .into(),
            );
        }
        if d.pose_type != "densepose" {
            note(
                "data.pose_type",
                format!(
                    "{:?} is not supported; DensePose IUV images are used",
                    d.pose_type
                ),
            );
        }
        if d.clip_type != "whole_body" {
            note(
                "data.clip_type",
                format!(
                    "{:?} is not supported; CLIP sees the whole source photo (whole_body)",
                    d.clip_type
                ),
            );
        }
        if !d.use_face_emb {
            note(
                "data.use_face_emb",
                "false is not supported; the face embeddings are used as with true".into(),
            );
        }
        let s = &self.solver;
        if s.enable_xformers_memory_efficient_attention {
            note(
                "solver.enable_xformers_memory_efficient_attention",
                "xformers does not exist here; mcld's own attention kernels are used".into(),
            );
        }
        if s.use_8bit_adam {
            note(
                "solver.use_8bit_adam",
                "8-bit AdamW is not available; using AdamW with f32 state".into(),
            );
        }
        if self.noise_scheduler_kwargs.beta_schedule != "scaled_linear" {
            note(
                "noise_scheduler_kwargs.beta_schedule",
                format!(
                    "{:?} is used for validation only; training uses scaled_linear, as \
                     train.py (line 335) does",
                    self.noise_scheduler_kwargs.beta_schedule
                ),
            );
        }
        for (key, v) in [
            ("validation_resume_dir", &self.validation_resume_dir),
            ("denoising_unet_path", &self.denoising_unet_path),
            ("reference_unet_path", &self.reference_unet_path),
            ("pose_guider_path", &self.pose_guider_path),
        ] {
            if let Some(p) = v {
                note(
                    key,
                    format!(
                        "{} is not read by training (nor by the reference's train.py); \
                         `mcld test --ckpt_dir` names the weights to test",
                        p.display()
                    ),
                );
            }
        }
        out
    }
}

impl InferenceConfig {
    /// Start-up messages for settings mcld does not follow (the video options of AnimateAnyone's
    /// UNet), saying what happens instead.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = &self.unet_additional_kwargs {
            if u.use_motion_module {
                out.push(
                    "config `unet_additional_kwargs.use_motion_module`: motion modules are \
                     AnimateAnyone's video layers, not part of MCLD's image model (its released \
                     weights have none); the UNet runs without them"
                        .into(),
                );
            }
            if u.unet_use_cross_frame_attention || u.unet_use_temporal_attention {
                out.push(
                    "config `unet_additional_kwargs.unet_use_*_attention`: frame attention \
                     needs video; single images use spatial attention only"
                        .into(),
                );
            }
            if u.use_inflated_groupnorm {
                out.push(
                    "config `unet_additional_kwargs.use_inflated_groupnorm`: with one frame an \
                     inflated GroupNorm is the plain GroupNorm used"
                        .into(),
                );
            }
        }
        out
    }

    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = load_yaml(path)?;
        if cfg.sampler != "DDIM" {
            return Err(Error::config(
                path,
                format!(
                    "key `sampler`: only DDIM is supported, got {:?}",
                    cfg.sampler
                ),
            ));
        }
        if cfg.num_inference_steps == 0 {
            return Err(Error::config(
                path,
                "key `num_inference_steps`: expected >= 1",
            ));
        }
        cfg.noise_scheduler_kwargs
            .validate(path, "noise_scheduler_kwargs")?;
        Ok(cfg)
    }
}

impl NoiseSchedulerKwargs {
    fn validate(&self, path: &Path, at: &str) -> Result<()> {
        let bad =
            |key: &str, msg: String| Err(Error::config(path, format!("key `{at}.{key}`: {msg}")));
        if !matches!(
            self.beta_schedule.as_str(),
            "linear" | "scaled_linear" | "squaredcos_cap_v2"
        ) {
            return bad(
                "beta_schedule",
                format!(
                    "expected linear, scaled_linear or squaredcos_cap_v2, got {:?}",
                    self.beta_schedule
                ),
            );
        }
        if !matches!(
            self.prediction_type.as_str(),
            "epsilon" | "v_prediction" | "sample"
        ) {
            return bad(
                "prediction_type",
                format!(
                    "expected epsilon, v_prediction or sample, got {:?}",
                    self.prediction_type
                ),
            );
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return bad(
                "timestep_spacing",
                format!(
                    "expected leading, trailing or linspace, got {:?}",
                    self.timestep_spacing
                ),
            );
        }
        if self.num_train_timesteps == 0 {
            return bad("num_train_timesteps", "expected >= 1".into());
        }
        Ok(())
    }
}
