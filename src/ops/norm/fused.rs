//! Fused GroupNorm(+SiLU) and LayerNorm for inference: one pass over the data where candle would
//! chain several allocating ops over strided views. They apply to f32 CPU tensors without gradient tracking;
//! otherwise the callers keep their composed ops (which training differentiates).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::ops::attention::cpu::exp_approx;
use crate::ops::host::{with_f32, CHUNK};

/// `x / (1 + exp(-x))` from [`exp_approx`] of `-|x|` (its domain), branch-free.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_approx(-x.abs());
    let num = if x >= 0.0 { x } else { x * e };
    let y = num / (1.0 + e);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `dst = (src - center) * scale + shift`, then SiLU when asked.
fn affine(src: &[f32], dst: &mut [f32], center: f32, scale: f32, shift: f32, act: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { affine_avx512(src, dst, center, scale, shift, act) };
            return;
        }
    }
    affine_portable(src, dst, center, scale, shift, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn affine_avx512(
    src: &[f32],
    dst: &mut [f32],
    center: f32,
    scale: f32,
    shift: f32,
    act: bool,
) {
    affine_portable(src, dst, center, scale, shift, act)
}

#[inline(always)]
fn affine_portable(src: &[f32], dst: &mut [f32], center: f32, scale: f32, shift: f32, act: bool) {
    if act {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = silu((x - center) * scale + shift);
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x - center) * scale + shift;
        }
    }
}

/// `dst[j] = (src[j] - center) * scale * w[j] + b[j]`: a LayerNorm row.
fn normalize_row(src: &[f32], dst: &mut [f32], center: f32, scale: f32, w: &[f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { normalize_row_avx512(src, dst, center, scale, w, b) };
            return;
        }
    }
    normalize_row_portable(src, dst, center, scale, w, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn normalize_row_avx512(
    src: &[f32],
    dst: &mut [f32],
    center: f32,
    scale: f32,
    w: &[f32],
    b: &[f32],
) {
    normalize_row_portable(src, dst, center, scale, w, b)
}

#[inline(always)]
fn normalize_row_portable(
    src: &[f32],
    dst: &mut [f32],
    center: f32,
    scale: f32,
    w: &[f32],
    b: &[f32],
) {
    for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(w).zip(b) {
        *d = (x - center) * scale * w + b;
    }
}

/// Mean and variance (population) of `xs`, accumulated in f64 in two passes.
fn mean_var(xs: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { mean_var_avx512(xs) };
        }
    }
    mean_var_portable(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn mean_var_avx512(xs: &[f32]) -> (f64, f64) {
    mean_var_portable(xs)
}

#[inline(always)]
fn mean_var_portable(xs: &[f32]) -> (f64, f64) {
    const L: usize = 8;
    let n = xs.len().max(1) as f64;
    let mut acc = [0f64; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    let mean = (acc.iter().sum::<f64>() + rest) / n;
    let mut acc = [0f64; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let d = x as f64 - mean;
            *a += d * d;
        }
    }
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum();
    (mean, (acc.iter().sum::<f64>() + rest) / n)
}

/// Whether a fused kernel may stand in for the composed ops: f32 CPU tensors that no gradient
/// flows through.
fn inference_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// GroupNorm of a (B, C, ...) tensor with per-channel `weight` and `bias`, then SiLU when `act`,
/// in two passes per group (statistics in f64; then scale, shift and activation). `None` where
/// the tensors are not f32 CPU tensors free of gradient tracking.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    act: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !inference_f32(&[x, weight, bias]) || x.rank() < 2 {
        return Ok(None);
    }
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 || weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "group_norm: {c} channels in {groups} groups with weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    let x = x.contiguous()?;
    let plane = x.elem_count() / (b * c).max(1);
    let group = c / groups * plane;
    let mut out = vec![0f32; x.elem_count()];
    if out.is_empty() {
        return Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?));
    }
    let (w, bs) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
    with_f32(&x, |src| {
        out.par_chunks_mut(group)
            .zip(src[..b * c * plane].par_chunks(group))
            .enumerate()
            .for_each(|(task, (o, s))| {
                let (mean, var) = mean_var(s);
                let rstd = 1.0 / (var + eps).sqrt();
                let c0 = task % groups * (c / groups);
                for (ch, (oc, sc)) in o.chunks_mut(plane).zip(s.chunks(plane)).enumerate() {
                    let scale = (rstd * w[c0 + ch] as f64) as f32;
                    affine(sc, oc, mean as f32, scale, bs[c0 + ch], act);
                }
            });
    })?;
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}

/// LayerNorm over the last dimension with optional affine `weight`/`bias`, one row per pass
/// pair (statistics in f64). `None` where the tensors are not f32 CPU tensors free of
/// gradient tracking.
pub fn layer_norm(
    x: &Tensor,
    eps: f64,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let params: Vec<&Tensor> = [Some(x), weight, bias].into_iter().flatten().collect();
    if !inference_f32(&params) || x.rank() == 0 {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    for p in [weight, bias].into_iter().flatten() {
        if p.dims() != [d] {
            candle_core::bail!(
                "layer_norm: parameter of shape {:?} for width {d}",
                p.dims()
            );
        }
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; x.elem_count()];
    if out.is_empty() {
        return Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?));
    }
    let w = match weight {
        Some(t) => t.to_vec1::<f32>()?,
        None => vec![1.0; d],
    };
    let bs = match bias {
        Some(t) => t.to_vec1::<f32>()?,
        None => vec![0.0; d],
    };
    let per_task = (CHUNK / d).max(1);
    with_f32(&x, |src| {
        out.par_chunks_mut(per_task * d)
            .zip(src[..x.elem_count()].par_chunks(per_task * d))
            .for_each(|(o, s)| {
                for (orow, srow) in o.chunks_exact_mut(d).zip(s.chunks_exact(d)) {
                    let (mean, var) = mean_var(srow);
                    let rstd = 1.0 / (var + eps).sqrt();
                    normalize_row(srow, orow, mean as f32, rstd as f32, &w, &bs);
                }
            });
    })?;
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}
