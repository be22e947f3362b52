//! GEGLU, the UNet feed-forward's gate, in one pass for inference: `a * gelu(g)` over the two
//! halves of the projection, with the exact (erf) GELU, vectorised. f32 CPU tensors without
//! gradient tracking only; with it the caller takes `geglu_grad`'s custom op (f32, f64 on the
//! CPU) or candle's composed ops.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::attention::cpu::exp_approx;
use super::host::{with_f32, CHUNK};

/// `erfc(|z|)` by Abramowitz & Stegun 7.1.26 (|error in erf| <= 1.5e-7, the approximation
/// PyTorch's vectorised CPU GELU uses), with the exponential from [`exp_approx`].
#[inline(always)]
pub(crate) fn erfc_abs(z: f32) -> f32 {
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
