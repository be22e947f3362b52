//! torch's CPU `F.interpolate` kernels on float32 planes, reproduced for parity: the reference
//! resizes its generated images with antialiased bicubic and FID inputs with plain bilinear.
//! Arithmetic follows torch's float32 path (scale = in/out in f32, weights in f32), including
//! the fused multiply-adds its AVX2 build contracts the Keys polynomial and the accumulation
//! into: without them weights differ in the last bit for non-integer scales (512 -> 176), and
//! white pixels truncate to 254 instead of 255.

use rayon::prelude::*;

use crate::{Error, Result};

/// torch's antialias kernel for bicubic: Keys cubic with a = -0.5 (same as Pillow), in f32 with
/// the multiply-adds fused as GCC contracts them in torch's build.
fn aa_bicubic(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0).mul_add(x, -(A + 3.0)) * x).mul_add(x, 1.0)
    } else if x < 2.0 {
        A.mul_add(x, -5.0 * A)
            .mul_add(x, 8.0 * A)
            .mul_add(x, -4.0 * A)
    } else {
        0.0
    }
}

fn aa_bilinear(x: f32) -> f32 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Which antialiased kernel (`mode=` of `F.interpolate(..., antialias=True)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AaMode {
    Bilinear,
    Bicubic,
}

struct AaWeights {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    w: Vec<f32>,
}

/// `_compute_weights_aa` of torch (align_corners=False).
fn aa_weights(in_size: usize, out_size: usize, mode: AaMode) -> AaWeights {
    let (interp, f): (f32, fn(f32) -> f32) = match mode {
        AaMode::Bilinear => (2.0, aa_bilinear),
        AaMode::Bicubic => (4.0, aa_bicubic),
    };
    let scale = in_size as f32 / out_size as f32;
    let support = if scale >= 1.0 {
        interp * 0.5 * scale
    } else {
        interp * 0.5
    };
    let ksize = support.ceil() as usize * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut bounds = Vec::with_capacity(out_size);
    let mut w = vec![0f32; out_size * ksize];
    for i in 0..out_size {
        let center = scale * (i as f32 + 0.5);
        // In C++ `float + 0.5` is evaluated in double before the integer cast.
        let xmin = ((((center - support) as f64) + 0.5) as i64).max(0) as usize;
        let xmax = ((((center + support) as f64) + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let row = &mut w[i * ksize..(i + 1) * ksize];
        let mut total = 0f32;
        for (j, r) in row.iter_mut().enumerate().take(n) {
            let arg = ((((j + xmin) as f32 - center) as f64 + 0.5) * invscale as f64) as f32;
            let v = f(arg);
            *r = v;
            total += v;
        }
        if total != 0.0 {
            for r in row.iter_mut().take(n) {
                *r /= total;
            }
        }
        bounds.push((xmin, n));
    }
    AaWeights { bounds, ksize, w }
}

fn check_dims(len: usize, planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Result<()> {
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::msg(format!(
            "interpolate: sizes must be positive (input {h}x{w}, output {oh}x{ow})"
        )));
    }
    if len != planes * h * w {
        return Err(Error::msg(format!(
            "interpolate: buffer of {len} values is not {planes} planes of {h}x{w}"
        )));
    }
    Ok(())
}

/// `F.interpolate(x, (oh, ow), mode, antialias=True)` on `planes` contiguous (h, w) planes.
/// Width is resampled first into a float buffer, as torch does; unchanged axes are skipped.
pub fn interpolate_aa(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    mode: AaMode,
) -> Result<Vec<f32>> {
    check_dims(x.len(), planes, h, w, oh, ow)?;
    let tmp: Vec<f32> = if ow != w {
        let c = aa_weights(w, ow, mode);
        let mut out = vec![0f32; planes * h * ow];
        out.par_chunks_mut(ow).enumerate().for_each(|(r, orow)| {
            let src = &x[r * w..(r + 1) * w];
            for (i, o) in orow.iter_mut().enumerate() {
                let (xmin, n) = c.bounds[i];
                let k = &c.w[i * c.ksize..i * c.ksize + n];
                let mut t = src[xmin] * k[0];
                for j in 1..n {
                    t = src[xmin + j].mul_add(k[j], t);
                }
                *o = t;
            }
        });
        out
    } else {
        x.to_vec()
    };
    if oh == h {
        return Ok(tmp);
    }
    let c = aa_weights(h, oh, mode);
    let mut out = vec![0f32; planes * oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(r, orow)| {
        let (p, i) = (r / oh, r % oh);
        let plane = &tmp[p * h * ow..(p + 1) * h * ow];
        let (ymin, n) = c.bounds[i];
        let k = &c.w[i * c.ksize..i * c.ksize + n];
        for (xx, o) in orow.iter_mut().enumerate() {
            let mut t = plane[ymin * ow + xx] * k[0];
            for j in 1..n {
                t = plane[(ymin + j) * ow + xx].mul_add(k[j], t);
            }
            *o = t;
        }
    });
    Ok(out)
}

/// Source index and weight of torch's linear interpolation (align_corners=False).
fn linear_index(scale: f32, dst: usize, in_size: usize) -> (usize, usize, f32, f32) {
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(in_size - 1);
    let off = usize::from(i0 < in_size - 1);
    let l1 = (src - i0 as f32).clamp(0.0, 1.0);
    (i0, i0 + off, 1.0 - l1, l1)
}

/// `F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False)` without antialias
/// (torchvision's Inception input resize for FID).
pub fn interpolate_bilinear(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f32>> {
    check_dims(x.len(), planes, h, w, oh, ow)?;
    if (oh, ow) == (h, w) {
        return Ok(x.to_vec());
    }
    let sh = h as f32 / oh as f32;
    let sw = w as f32 / ow as f32;
    let cols: Vec<_> = (0..ow).map(|j| linear_index(sw, j, w)).collect();
    let mut out = vec![0f32; planes * oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(r, orow)| {
        let (p, i) = (r / oh, r % oh);
        let plane = &x[p * h * w..(p + 1) * h * w];
        let (y0, y1, h0, h1) = linear_index(sh, i, h);
        let r0 = &plane[y0 * w..(y0 + 1) * w];
        let r1 = &plane[y1 * w..(y1 + 1) * w];
        for (o, &(x0, x1, w0, w1)) in orow.iter_mut().zip(&cols) {
            *o = h0 * (w0 * r0[x0] + w1 * r0[x1]) + h1 * (w0 * r1[x0] + w1 * r1[x1]);
        }
    });
    Ok(out)
}

/// torch's `mode="nearest"` source index: floor(dst * (in/out)) in f32, clamped.
pub fn nearest_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    if in_size == out_size {
        return dst;
    }
    if out_size == 2 * in_size {
        return dst >> 1;
    }
    let scale = in_size as f32 / out_size as f32;
    ((dst as f32 * scale).floor() as usize).min(in_size - 1)
}

/// `F.interpolate(x, (oh, ow), mode="nearest")` on `planes` (h, w) planes of any `Copy` type.
pub fn interpolate_nearest<T: Copy + Send + Sync>(
    x: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<T>> {
    check_dims(x.len(), planes, h, w, oh, ow)?;
    let cols: Vec<usize> = (0..ow).map(|j| nearest_index(j, w, ow)).collect();
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        for i in 0..oh {
            let row = &x[p * h * w + nearest_index(i, h, oh) * w..][..w];
            out.extend(cols.iter().map(|&j| row[j]));
        }
    }
    Ok(out)
}

/// `(y * 255).clamp(0, 255).to(torch.uint8)`: truncation, as the reference quantises its outputs.
pub fn quantize_trunc(y: f32) -> u8 {
    // NaN maps to 0, like a clamp-then-cast of NaN on x86 in practice.
    let v = (y * 255.0).clamp(0.0, 255.0);
    if v.is_nan() {
        0
    } else {
        v as u8
    }
}
