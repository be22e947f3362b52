//! Fused CPU kernels for inference: one pass over the data where candle would chain several
//! allocating ops over strided views. They apply to f32 CPU tensors without gradient tracking;
//! otherwise the callers keep their composed ops (which training differentiates).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::cpu_attention::exp_approx;
use super::host::with_f32;

/// `erfc(|z|)` by Abramowitz & Stegun 7.1.26 (|error in erf| <= 1.5e-7, the approximation
/// PyTorch's vectorised CPU GELU uses), with the exponential from [`exp_approx`].
#[inline(always)]
fn erfc_abs(z: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    poly * exp_approx(-(a * a))
}

/// Exact-form GELU, `0.5 x (1 + erf(x / sqrt 2))`. For x < 0, `1 + erf` is taken as `erfc(|z|)`
/// directly instead of as a difference of nearly equal numbers, so no cancellation adds to the
/// approximation's error. Written branch-free so slices of it vectorise.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let w = erfc_abs(x * std::f32::consts::FRAC_1_SQRT_2);
    let one_plus_erf = if x >= 0.0 { 2.0 - w } else { w };
    let y = 0.5 * x * one_plus_erf;
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `a * gelu(gate)` per row, where each row of `h` is `[a | gate]` (`inner` values each), as
/// diffusers' GEGLU splits its projection.
fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { geglu_rows_avx512(h, out, inner) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { geglu_rows_avx2(h, out, inner) };
            return;
        }
    }
    geglu_rows_portable(h, out, inner);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn geglu_rows_avx512(h: &[f32], out: &mut [f32], inner: usize) {
    geglu_rows_portable(h, out, inner)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_rows_avx2(h: &[f32], out: &mut [f32], inner: usize) {
    geglu_rows_portable(h, out, inner)
}

#[inline(always)]
fn geglu_rows_portable(h: &[f32], out: &mut [f32], inner: usize) {
    for (row, o) in h.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
        let (a, gate) = row.split_at(inner);
        for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
            *o = a * gelu_erf(g);
        }
    }
}

/// Values per parallel task of the elementwise kernels: large enough to amortise the task,
/// small enough to split a 64x64 UNet activation across threads.
const CHUNK: usize = 1 << 15;

/// diffusers' GEGLU activation on its projection `h` (.., 2 * inner): `a * gelu(gate)` with
/// `[a | gate] = h`, in one pass. `None` where `h` is not an f32 CPU tensor without gradient
/// tracking (the caller composes the ops instead).
pub fn geglu(h: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !h.device().is_cpu() || h.dtype() != DType::F32 || h.track_op() || h.rank() == 0 {
        return Ok(None);
    }
    let dims = h.dims().to_vec();
    let width = dims[dims.len() - 1];
    if !width.is_multiple_of(2) || width == 0 {
        return Ok(None);
    }
    let inner = width / 2;
    let h = h.contiguous()?;
    let rows = h.elem_count() / width;
    let mut out = vec![0f32; rows * inner];
    let per_task = (CHUNK / inner).max(1);
    with_f32(&h, |src| {
        out.par_chunks_mut(per_task * inner)
            .zip(src[..rows * width].par_chunks(per_task * width))
            .for_each(|(o, s)| geglu_rows(s, o, inner));
    })?;
    let mut shape = dims;
    *shape.last_mut().expect("rank >= 1") = inner;
    Ok(Some(Tensor::from_vec(out, shape, h.device())?))
}

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
