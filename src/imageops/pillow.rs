//! Pillow's `Image.resize` for 8-bit images (Pillow <= 12, `libImaging/Resample.c`): the
//! reference's dataset resizes, CLIP preprocessing and face masks were made with it, and
//! approximations (e.g. `image`'s CatmullRom) differ by several levels, so this reproduces the
//! algorithm step by step: double-precision kernel weights normalised per output pixel, then
//! turned into 22-bit fixed point; horizontal pass first into a clipped 8-bit buffer that only
//! covers the rows the vertical pass reads; round half up; clip to 0..255.

use rayon::prelude::*;

use super::U8Image;
use crate::{Error, Result};

/// Pillow's resampling filters (`Image.Resampling`), NEAREST excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Box,
    Bilinear,
    Hamming,
    /// Keys cubic with a = -0.5 (Pillow's default for `resize` on RGB/L).
    Bicubic,
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, tap count, and fixed-point weights (`ksize` per pixel).
pub(crate) struct Coeffs {
    pub ksize: usize,
    pub bounds: Vec<(usize, usize)>,
    pub weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
pub(crate) fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let ss = 1.0 / filterscale;
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; the clamps make the sign irrelevant.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass over input rows `y0..y0+rows`.
fn horizontal(img: &U8Image, y0: usize, rows: usize, out_w: usize, c: &Coeffs) -> Vec<u8> {
    let ch = img.channels;
    let mut out = vec![0u8; rows * out_w * ch];
    let in_row = img.width * ch;
    out.par_chunks_mut(out_w * ch)
        .enumerate()
        .for_each(|(r, orow)| {
            let src = &img.data[(y0 + r) * in_row..(y0 + r + 1) * in_row];
            for xx in 0..out_w {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                for b in 0..ch {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        ss += src[(xmin + x) * ch + b] as i64 * w as i64;
                    }
                    orow[xx * ch + b] = clip8(ss);
                }
            }
        });
    out
}

/// Vertical pass; `bounds` are relative to the first row held in `src`.
fn vertical(src: &[u8], w: usize, ch: usize, out_h: usize, c: &Coeffs, y_shift: usize) -> Vec<u8> {
    let row_len = w * ch;
    let mut out = vec![0u8; out_h * row_len];
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(yy, orow)| {
            let (ymin, n) = c.bounds[yy];
            let ymin = ymin - y_shift;
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            let mut acc = vec![1i64 << (PRECISION_BITS - 1); row_len];
            for (y, &wt) in k.iter().enumerate() {
                let s = &src[(ymin + y) * row_len..(ymin + y + 1) * row_len];
                for (a, &v) in acc.iter_mut().zip(s) {
                    *a += v as i64 * wt as i64;
                }
            }
            for (o, a) in orow.iter_mut().zip(acc) {
                *o = clip8(a);
            }
        });
    out
}

/// `Image.resize((out_w, out_h), filter)` on an 8-bit image with any channel count (L, RGB).
pub fn resize(img: &U8Image, out_w: usize, out_h: usize, filter: Filter) -> Result<U8Image> {
    img.validate()?;
    if out_w == 0 || out_h == 0 {
        return Err(Error::msg(format!(
            "resize: output size {out_w}x{out_h} must be positive"
        )));
    }
    if out_w == img.width && out_h == img.height {
        return Ok(img.clone());
    }
    let ch = img.channels;
    let need_h = out_w != img.width;
    let need_v = out_h != img.height;
    let cv = coeffs(img.height, out_h, filter);
    let (buf, w, shift) = if need_h {
        let ch_coeffs = coeffs(img.width, out_w, filter);
        // Only the input rows the vertical pass reads are resampled, as Pillow does.
        let (first, last) = if need_v {
            let first = cv.bounds[0].0;
            let (lmin, ln) = cv.bounds[out_h - 1];
            (first, lmin + ln)
        } else {
            (0, img.height)
        };
        (
            horizontal(img, first, last - first, out_w, &ch_coeffs),
            out_w,
            first,
        )
    } else {
        (img.data.clone(), img.width, 0)
    };
    let data = if need_v {
        vertical(&buf, w, ch, out_h, &cv, shift)
    } else {
        buf
    };
    Ok(U8Image {
        width: out_w,
        height: out_h,
        channels: ch,
        data,
    })
}
