//! DDIM (eta 0) as diffusers' `DDIMScheduler` computes it.
//!
//! The tables and per-step coefficients are computed on the host in the same float32 arithmetic
//! as diffusers/torch on the CPU (linspace in f32, cumulative product with a double
//! accumulator, scalar coefficients in f32), so that released checkpoints see the exact noise
//! levels they were trained with. Tensor work is plain scale-and-add on the caller's device.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::NoiseSchedulerKwargs;
use crate::{Error, Result};

/// How the betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    /// Linear in sqrt(beta), the Stable Diffusion schedule.
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Glide's cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "sample")]
    Sample,
}

/// How the inference timesteps are picked from the training range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
    #[serde(rename = "linspace")]
    Linspace,
}

/// diffusers `DDIMScheduler` config (`scheduler_config.json`); unknown keys such as
/// `_class_name` are ignored, missing keys take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    /// Dynamic thresholding is not implemented; `true` is refused by [`DdimScheduler::new`].
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| Error::config(path, format!("key `{}`: {}", e.path(), e.inner())))
    }

    /// The config the YAML `noise_scheduler_kwargs` describe (keys absent there keep
    /// diffusers' defaults, e.g. `set_alpha_to_one`).
    pub fn from_config_kwargs(kw: &NoiseSchedulerKwargs) -> Result<Self> {
        Ok(Self {
            num_train_timesteps: kw.num_train_timesteps,
            beta_start: kw.beta_start,
            beta_end: kw.beta_end,
            beta_schedule: parse_enum("beta_schedule", &kw.beta_schedule)?,
            steps_offset: kw.steps_offset,
            clip_sample: kw.clip_sample,
            prediction_type: parse_enum("prediction_type", &kw.prediction_type)?,
            rescale_betas_zero_snr: kw.rescale_betas_zero_snr,
            timestep_spacing: parse_enum("timestep_spacing", &kw.timestep_spacing)?,
            ..Self::default()
        })
    }
}

fn parse_enum<T: serde::de::DeserializeOwned>(key: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string()))
        .map_err(|e| Error::msg(format!("noise_scheduler_kwargs.{key}: {e}")))
}

/// Result of one DDIM step.
#[derive(Debug, Clone)]
pub struct DdimStepOutput {
    /// x_{t-1}
    pub prev_sample: Tensor,
    /// The model's estimate of x_0 at this step.
    pub pred_original_sample: Tensor,
}

/// DDIM with eta = 0 (deterministic), the only setting MCLD uses.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    num_inference_steps: Option<usize>,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(Error::msg(format!(
                "DDIM: num_train_timesteps must be at least 2, got {n}"
            )));
        }
        if config.thresholding {
            return Err(Error::msg(
                "DDIM: thresholding (dynamic thresholding) is not supported",
            ));
        }
        let mut betas = match (&config.trained_betas, config.beta_schedule) {
            (Some(tb), _) => {
                if tb.len() != n {
                    return Err(Error::msg(format!(
                        "DDIM: trained_betas has {} values, num_train_timesteps is {n}",
                        tb.len()
                    )));
                }
                tb.iter().map(|&b| b as f32).collect()
            }
            (None, BetaSchedule::Linear) => {
                linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            (None, BetaSchedule::SquaredcosCapV2) => cosine_betas(n),
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        if alphas_cumprod.iter().any(|a| !a.is_finite() || *a < 0.0) {
            return Err(Error::msg(
                "DDIM: the beta schedule gives alphas_cumprod outside [0, 1]; check beta_start/beta_end",
            ));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            betas,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: None,
        })
    }

    /// Scheduler from the YAML `noise_scheduler_kwargs`.
    pub fn from_config_kwargs(kw: &NoiseSchedulerKwargs) -> Result<Self> {
        Self::new(DdimConfig::from_config_kwargs(kw)?)
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// Initial latents are plain unit Gaussians for DDIM.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Inference timesteps, descending; empty until [`Self::set_timesteps`].
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// Picks `n` inference timesteps as diffusers does for the configured spacing.
    ///
    /// For "trailing", numpy's `arange(T, 0, -T/n)` yields n+1 values for some n (61, 103, ...)
    /// because of rounding, the extra one being -1; only the first n are kept.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        if n == 0 || n > t {
            return Err(Error::msg(format!(
                "DDIM: num_inference_steps must be in 1..={t}, got {n}"
            )));
        }
        let ts: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                if n == 1 {
                    vec![0]
                } else {
                    let step = (t - 1) as f64 / (n - 1) as f64;
                    (0..n)
                        .rev()
                        .map(|i| {
                            if i == n - 1 {
                                (t - 1) as i64
                            } else {
                                (i as f64 * step).round_ties_even() as i64
                            }
                        })
                        .collect()
                }
            }
            TimestepSpacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // numpy's arange fill: start + i * ((start + step) - start).
                let start = t as f64;
                let delta = (start - t as f64 / n as f64) - start;
                (0..n)
                    .map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        if let Some(bad) = ts.iter().find(|&&x| x < 0 || x >= t as i64) {
            return Err(Error::msg(format!(
                "DDIM: timestep {bad} outside 0..{t} (steps_offset {} too large for {n} steps?)",
                self.config.steps_offset
            )));
        }
        self.timesteps = ts.into_iter().map(|x| x as usize).collect();
        self.num_inference_steps = Some(n);
        Ok(())
    }

    fn alpha_at(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::msg(format!(
                "DDIM: timestep {t} outside 0..{}",
                self.config.num_train_timesteps
            ))
        })
    }

    /// One deterministic DDIM step (eta = 0) from x_t to x_{t-1}.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<DdimStepOutput> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::msg("DDIM: step() called before set_timesteps()".to_string()))?;
        if model_output.dims() != sample.dims() {
            return Err(Error::msg(format!(
                "DDIM step: model_output shape {:?} differs from sample shape {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        let prev_t = timestep as i64 - (self.config.num_train_timesteps / n) as i64;
        let a_t = self.alpha_at(timestep)?;
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0f32 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let (x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div_scalar(&(sample - scale(model_output, sb)?)?, sa)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = div_scalar(&(sample - scale(model_output, sa)?)?, sb)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (scale(sample, sa)? - scale(model_output, sb)?)?;
                let eps = (scale(model_output, sa)? + scale(sample, sb)?)?;
                (x0, eps)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        // eta = 0: std_dev_t = 0, so the direction term is sqrt(1 - a_prev) * eps.
        let dir = scale(&eps, (1.0f32 - a_prev).sqrt())?;
        let prev_sample = (scale(&x0, a_prev.sqrt())? + dir)?;
        Ok(DdimStepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }

    /// Per-sample (sqrt(a_t), sqrt(1 - a_t)) as (B, 1, ..., 1) tensors for `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let ts = self.timestep_list(timesteps)?;
        let b = like.dims().first().copied().unwrap_or(1);
        if ts.len() != b && ts.len() != 1 {
            return Err(Error::msg(format!(
                "DDIM: {} timesteps for a batch of {b}",
                ts.len()
            )));
        }
        let mut sa = Vec::with_capacity(ts.len());
        let mut sb = Vec::with_capacity(ts.len());
        for &t in &ts {
            let a = self.alpha_at(t)?;
            sa.push(a.sqrt());
            sb.push((1.0f32 - a).sqrt());
        }
        let mut shape = vec![ts.len()];
        shape.resize(like.rank().max(1), 1);
        let mk = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape.as_slice(), like.device())?.to_dtype(like.dtype())?)
        };
        Ok((mk(sa)?, mk(sb)?))
    }

    fn timestep_list(&self, timesteps: &Tensor) -> Result<Vec<usize>> {
        let v = timesteps
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        v.into_iter()
            .map(|x| {
                if x.fract() != 0.0 || x < 0.0 || x >= self.config.num_train_timesteps as f64 {
                    Err(Error::msg(format!(
                        "DDIM: timestep {x} is not an integer in 0..{}",
                        self.config.num_train_timesteps
                    )))
                } else {
                    Ok(x as usize)
                }
            })
            .collect()
    }

    /// Forward process: sqrt(a_t) x0 + sqrt(1 - a_t) noise, one timestep per batch entry.
    pub fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        same_shape("add_noise", original_samples, noise)?;
        let (sa, sb) = self.coefficients(timesteps, original_samples)?;
        Ok((original_samples.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0.
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        same_shape("get_velocity", sample, noise)?;
        let (sa, sb) = self.coefficients(timesteps, sample)?;
        Ok((noise.broadcast_mul(&sa)? - sample.broadcast_mul(&sb)?)?)
    }

    /// SNR (sqrt(a_t) / sqrt(1 - a_t))^2 in f32 as diffusers' `compute_snr` gives it.
    pub fn snr_at(&self, t: usize) -> Result<f32> {
        let a = self.alpha_at(t)?;
        let r = a.sqrt() / (1.0f32 - a).sqrt();
        Ok(r * r)
    }

    /// SNR of each timestep, an f32 tensor of shape (B,) on the timesteps' device.
    pub fn compute_snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        let v = self
            .timestep_list(timesteps)?
            .into_iter()
            .map(|t| self.snr_at(t))
            .collect::<Result<Vec<f32>>>()?;
        let n = v.len();
        Ok(Tensor::from_vec(v, n, timesteps.device())?)
    }

    /// Min-SNR-gamma loss weights as MCLD's train.py computes them: for v-prediction
    /// min(snr + 1, gamma) / (snr + 1), else min(snr, gamma) / snr (its limit 1 at snr = 0,
    /// where the formula would give NaN under a zero-terminal-SNR schedule).
    pub fn min_snr_weights(&self, timesteps: &Tensor, gamma: f64) -> Result<Tensor> {
        let g = gamma as f32;
        let v = self
            .timestep_list(timesteps)?
            .into_iter()
            .map(|t| {
                let mut snr = self.snr_at(t)?;
                if self.config.prediction_type == PredictionType::VPrediction {
                    snr += 1.0;
                }
                Ok(if snr == 0.0 { 1.0 } else { snr.min(g) / snr })
            })
            .collect::<Result<Vec<f32>>>()?;
        let n = v.len();
        Ok(Tensor::from_vec(v, n, timesteps.device())?)
    }

    /// `alphas_cumprod` as an f32 tensor, for code that gathers on the device.
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.alphas_cumprod.as_slice(), device)?)
    }
}

fn same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::msg(format!(
            "DDIM {what}: sample shape {:?} differs from noise shape {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// x * c with c rounded to the tensor's dtype (torch's tensor-times-0-d-tensor).
fn scale(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// x / c as a true division (multiplying by 1/c rounds differently).
fn div_scalar(x: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

/// torch.linspace in float32: from both ends towards the middle. (torch's SIMD kernel adds
/// lane * step to a vector base, which can differ from this by an ulp.)
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// torch.cumprod on the CPU accumulates float32 in double.
fn cumprod(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, in f64, stored as f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023) in float32: shift and scale
/// sqrt(alphas_cumprod) so the last timestep has exactly zero SNR.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_bar: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let s0 = sqrt_bar[0];
    let st = *sqrt_bar.last().unwrap_or(&0.0);
    let k = s0 / (s0 - st);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| {
            let v = (s - st) * k;
            v * v
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}
