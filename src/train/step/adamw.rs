//! AdamW with global grad-norm clipping, on f32 master weights, in the order of operations of
//! torch's single-tensor `AdamW` and `clip_grad_norm_` so one step matches the reference to
//! float noise.
//!
//! As in torch, a parameter without a gradient in a step (the reference UNet in an
//! unconditional step) is left out entirely: not in the clipping norm, no weight decay, no
//! moment update, and its own step count (bias correction) stays behind.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, Var};

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
    use rayon::prelude::*;
    let mut sq = 0f64;
    for g in grads {
        // On the CPU a sweep over the data (summed in f64) rather than a full-size square.
        let direct = with_slice(g, |gs| {
            let s: f64 = gs.par_chunks(1 << 14).map(sum_squares).sum();
            s.sqrt() as f32
        });
        let n = match direct {
            Some(n) => n,
            None => g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()?,
        } as f64;
        sq += n * n;
    }
    Ok(sq.sqrt())
}

/// Sum of squares in f64 over 16 independent lanes: one running sum is a chain of dependent
/// additions the compiler may not reorder, which ran at a quarter of memory speed.
fn sum_squares(xs: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x as f64) * (x as f64);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    acc.iter().sum::<f64>() + tail
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
            if in_place_cpu(p.as_tensor(), &self.m[i], &self.v[i], g, &k)? {
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

/// The f32 data of a contiguous CPU storage, for the in-place ops below.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32 CPU data"),
    }
}

fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32 CPU data"),
    }
}

/// Elements per parallel task of the in-place sweeps.
const CHUNK: usize = 1 << 14;

/// One fused sweep over a parameter, its moments and its gradient (each value read and written
/// once: 7 streams instead of the 10 of three separate updates). candle's in-place ops lend one
/// tensor mutably, so the three are borrowed by nesting: the parameter's op borrows the first
/// moment's, which borrows the second's, which runs the sweep.
struct FusedStep<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    k: &'a Coefs,
}

/// The first moment's level: the parameter's data lent from the outer level.
struct WithParam<'a, 'b> {
    v: &'a Tensor,
    k: &'a Coefs,
    p: RefCell<&'b mut [f32]>,
    g: &'b [f32],
}

/// The innermost level: parameter and first moment lent, the second moment's own storage.
struct WithMoment<'a, 'b, 'c> {
    outer: &'c WithParam<'a, 'b>,
    m: RefCell<&'c mut [f32]>,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let gs = cpu_f32(s2, l2)?;
        let ps = cpu_f32_mut(s1, l1)?;
        if gs.len() != ps.len() {
            candle_core::bail!("AdamW: gradient of {} values for {}", gs.len(), ps.len());
        }
        self.m.inplace_op1(&WithParam {
            v: self.v,
            k: self.k,
            p: RefCell::new(ps),
            g: gs,
        })
    }
}

impl InplaceOp1 for WithParam<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let ms = cpu_f32_mut(s, l)?;
        self.v.inplace_op1(&WithMoment {
            outer: self,
            m: RefCell::new(ms),
        })
    }
}

impl InplaceOp1 for WithMoment<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let vs = cpu_f32_mut(s, l)?;
        let mut ps = self.outer.p.borrow_mut();
        let mut ms = self.m.borrow_mut();
        let gs = self.outer.g;
        if ms.len() != gs.len() || vs.len() != gs.len() {
            candle_core::bail!("AdamW: moments of {} values for {}", ms.len(), gs.len());
        }
        let k = self.outer.k;
        ps.par_chunks_mut(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK)))
            .for_each(|((p, m), (v, g))| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    // The operations and their order of torch's single-tensor AdamW.
                    *m = *m * k.b1 + g * k.coef * (1.0 - k.b1);
                    let gi = g * k.coef;
                    *v = *v * k.b2 + gi * gi * (1.0 - k.b2);
                    let denom = v.sqrt() / k.bc2_sqrt + k.eps;
                    *p = *p * k.decay - (*m / denom) * k.step_size;
                }
            });
        Ok(())
    }
}

/// One AdamW update of an f32 CPU tensor and its moments, in place in one sweep, no allocation
/// (new full-size buffers every step meant the kernel zeroing fresh pages for the whole model
/// each step). Same operations in the same order as the tensor path and torch. `false` (nothing done) off the CPU or for other layouts.
fn in_place_cpu(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, k: &Coefs) -> Result<bool> {
    let dense_f32 =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.layout().is_contiguous();
    if !(dense_f32(p) && dense_f32(m) && dense_f32(v)) || g.elem_count() != p.elem_count() {
        return Ok(false);
    }
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    p.inplace_op2(&g, &FusedStep { m, v, k })?;
    Ok(true)
}
