//! AdamW with global grad-norm clipping, on f32 master weights, in the order of operations of
//! torch's single-tensor `AdamW` and `clip_grad_norm_` so one step matches the reference to
//! float noise.
//!
//! As in torch, a parameter without a gradient in a step (the reference UNet in an
//! unconditional step) is left out entirely: not in the clipping norm, no weight decay, no
//! moment update, and its own step count (bias correction) stays behind.

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

/// First and second moments of every trainable tensor, and the step counts.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates applied (steps the f16 scaler skipped not counted): the lr schedule's count.
    pub step: u64,
    /// Per-parameter step counts (torch's `state[p]["step"]`), for the bias correction.
    pub param_steps: Vec<u64>,
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
            param_steps: vec![0; params.len()],
        })
    }

    /// [`AdamW::step_masked`] with every parameter holding a gradient.
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<f64> {
        self.step_masked(params, grads, &vec![true; grads.len()], lr)
    }

    /// Clips the gradients of the parameters marked in `has_grad` to `max_grad_norm` and
    /// applies one AdamW step at `lr` to those parameters only. Returns the pre-clip global
    /// norm. Gradients must be finite (the caller checks, see the loss scaler).
    pub fn step_masked(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        has_grad: &[bool],
        lr: f64,
    ) -> Result<f64> {
        if grads.len() != params.len()
            || self.m.len() != params.len()
            || has_grad.len() != params.len()
            || self.param_steps.len() != params.len()
        {
            return Err(Error::msg(format!(
                "AdamW: {} gradients ({} flags) for {} parameters ({} moments, {} step counts)",
                grads.len(),
                has_grad.len(),
                params.len(),
                self.m.len(),
                self.param_steps.len()
            )));
        }
        let c = self.cfg;
        let present: Vec<Tensor> = grads
            .iter()
            .zip(has_grad)
            .filter(|(_, h)| **h)
            .map(|(g, _)| g.clone())
            .collect();
        let norm = global_norm(&present)?;
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, always multiplied.
        let coef = ((c.max_grad_norm as f32) / (norm as f32 + 1e-6)).min(1.0) as f64;
        self.step += 1;
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            if !has_grad[i] {
                continue;
            }
            self.param_steps[i] += 1;
            let t = self.param_steps[i] as i32;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            let step_size = lr / bc1;
            let bc2_sqrt = bc2.sqrt();
            let k = Coefs {
                coef: coef as f32,
                decay: (1.0 - lr * c.weight_decay) as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                bc2_sqrt: bc2_sqrt as f32,
                eps: c.eps as f32,
                step_size: step_size as f32,
            };
            if let Some((new, m, v)) = fused_cpu(p.as_tensor(), &self.m[i], &self.v[i], g, &k)? {
                p.set(&new)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
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

/// The scalars of one AdamW step, in f32.
struct Coefs {
    coef: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Some(f(&v[a..b]))
        }
        _ => None,
    }
}

/// One AdamW update of an f32 CPU tensor in a single parallel pass (the tensor-op path makes a
/// dozen full-size temporaries per tensor, which dominates the optimizer's time on the CPU).
/// Same operations in the same order as the tensor path and torch. `None` off the CPU.
fn fused_cpu(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    k: &Coefs,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use rayon::prelude::*;
    if !p.device().is_cpu() || p.dtype() != DType::F32 {
        return Ok(None);
    }
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let n = p.elem_count();
    let mut np = vec![0f32; n];
    let mut nm = vec![0f32; n];
    let mut nv = vec![0f32; n];
    let done = with_slice(p, |ps| {
        with_slice(m, |ms| {
            with_slice(v, |vs| {
                with_slice(&g, |gs| {
                    const CHUNK: usize = 1 << 14;
                    np.par_chunks_mut(CHUNK)
                        .zip(nm.par_chunks_mut(CHUNK))
                        .zip(nv.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, ((op, om), ov))| {
                            let s = c * CHUNK;
                            for j in 0..op.len() {
                                let gi = gs[s + j] * k.coef;
                                let mi = ms[s + j] * k.b1 + gi * (1.0 - k.b1);
                                let vi = vs[s + j] * k.b2 + gi * gi * (1.0 - k.b2);
                                let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
                                op[j] = ps[s + j] * k.decay - (mi / denom) * k.step_size;
                                om[j] = mi;
                                ov[j] = vi;
                            }
                        });
                })
            })
        })
    });
    if !matches!(done, Some(Some(Some(Some(()))))) {
        return Ok(None);
    }
    let shape = p.shape().clone();
    Ok(Some((
        Tensor::from_vec(np, shape.clone(), p.device())?,
        Tensor::from_vec(nm, shape.clone(), p.device())?,
        Tensor::from_vec(nv, shape, p.device())?,
    )))
}
