//! AdamW with global grad-norm clipping, on f32 master weights, in the order of operations of
//! torch's single-tensor `AdamW` and `clip_grad_norm_` so one step matches the reference to
//! float noise.

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// Global L2 norm the gradients are clipped to (`max_grad_norm`).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.01,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

/// First and second moments of every trainable tensor, and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: u64,
}

/// Global L2 norm of a set of gradients, accumulated in f64 over per-tensor f32 norms (torch
/// stacks the per-tensor norms and takes their norm).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        let n = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        sq += n * n;
    }
    Ok(sq.sqrt())
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &[(String, Var)]) -> Result<Self> {
        let zeros = |v: &Var| -> Result<Tensor> { Ok(v.as_tensor().zeros_like()?) };
        Ok(Self {
            cfg,
            m: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_>>()?,
            v: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_>>()?,
            step: 0,
        })
    }

    /// Clips `grads` to `max_grad_norm` and applies one AdamW step at `lr`. Returns the
    /// pre-clip global norm. Gradients must be finite (the caller checks, see the loss scaler).
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<f64> {
        if grads.len() != params.len() || self.m.len() != params.len() {
            return Err(Error::msg(format!(
                "AdamW: {} gradients for {} parameters ({} moments)",
                grads.len(),
                params.len(),
                self.m.len()
            )));
        }
        let c = self.cfg;
        let norm = global_norm(grads)?;
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, always multiplied.
        let coef = ((c.max_grad_norm as f32) / (norm as f32 + 1e-6)).min(1.0) as f64;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            let g = (g.to_dtype(DType::F32)? * coef)?;
            let pt = p.as_tensor().detach();
            // Decoupled weight decay first, as torch.
            let pt = (pt * (1.0 - lr * c.weight_decay))?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let new = (pt - (m.div(&denom)? * step_size)?)?;
            p.set(&new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }
}
