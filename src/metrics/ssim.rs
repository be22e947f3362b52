//! SSIM as scikit-image 0.21's `structural_similarity` computes it per channel of a CHW image.
//!
//! Only the interior that survives skimage's final crop (half a window per side) is filtered, so
//! the filter's border mode never enters. Filtering and the S map run in f64: the reference's
//! float32 arithmetic differs from that by ~3e-7, well inside the fixtures' 1e-5.

use rayon::prelude::*;

use super::ChwImage;
use crate::{Error, Result};

const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// The SSIM variants MCLD's evaluator reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SsimWindow {
    /// `win_size` x `win_size` box filter (scipy `uniform_filter`), odd size.
    Uniform { size: usize },
    /// Separable Gaussian (scipy `gaussian_filter`) with radius `int(truncate * sigma + 0.5)`.
    Gaussian { sigma: f64, truncate: f64 },
}

impl SsimWindow {
    /// The normalised 1-D taps of the separable window.
    pub fn taps(&self) -> Vec<f64> {
        match *self {
            SsimWindow::Uniform { size } => vec![1.0 / size as f64; size],
            SsimWindow::Gaussian { sigma, truncate } => {
                let r = (truncate * sigma + 0.5) as i64;
                let w: Vec<f64> = (-r..=r)
                    .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
                    .collect();
                let s: f64 = w.iter().sum();
                w.into_iter().map(|v| v / s).collect()
            }
        }
    }
}

/// Parameters of one SSIM call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsimParams {
    pub window: SsimWindow,
    /// Sample covariance (divide by NP-1, skimage's default) or population covariance.
    pub sample_covariance: bool,
    pub data_range: f64,
}

impl SsimParams {
    /// MCLD's "SSIM": 51x51 box, sample covariance, data range 1 on [0,1] images.
    pub fn mcld_uniform51() -> Self {
        Self {
            window: SsimWindow::Uniform { size: 51 },
            sample_covariance: true,
            data_range: 1.0,
        }
    }

    /// MCLD's "SSIM_256": Gaussian sigma 1.5 truncate 3.5, population covariance; the data range
    /// is set per image (see [`ssim_256`]).
    pub fn mcld_gaussian(data_range: f64) -> Self {
        Self {
            window: SsimWindow::Gaussian {
                sigma: 1.5,
                truncate: 3.5,
            },
            sample_covariance: false,
            data_range,
        }
    }
}

/// Per-channel SSIM values and their mean.
#[derive(Debug, Clone)]
pub struct SsimResult {
    pub per_channel: Vec<f64>,
    pub mean: f64,
}

/// SSIM of one 2-D plane: mean of the S map over the cropped interior.
pub fn ssim_plane(
    x: &[f32],
    y: &[f32],
    height: usize,
    width: usize,
    p: &SsimParams,
) -> Result<f64> {
    let taps = p.window.taps();
    let k = taps.len();
    let r = k / 2;
    if x.len() != height * width || y.len() != height * width {
        return Err(Error::msg("ssim: plane size does not match its shape"));
    }
    if height < k || width < k {
        return Err(Error::msg(format!(
            "ssim: image {height}x{width} is smaller than the {k}x{k} window"
        )));
    }
    let np = (k * k) as f64;
    let cov_norm = if p.sample_covariance {
        np / (np - 1.0)
    } else {
        1.0
    };
    let c1 = (K1 * p.data_range).powi(2);
    let c2 = (K2 * p.data_range).powi(2);
    let (oh, ow) = (height - 2 * r, width - 2 * r);

    // Horizontal pass over every row: 5 moments per output column of the valid region.
    let hpass: Vec<[f64; 5]> = (0..height)
        .into_par_iter()
        .flat_map_iter(|row| {
            let xr = &x[row * width..(row + 1) * width];
            let yr = &y[row * width..(row + 1) * width];
            let taps = &taps;
            (0..ow).map(move |col| {
                let mut m = [0f64; 5];
                for (t, &w) in taps.iter().enumerate() {
                    let a = xr[col + t] as f64;
                    let b = yr[col + t] as f64;
                    m[0] += w * a;
                    m[1] += w * b;
                    m[2] += w * a * a;
                    m[3] += w * b * b;
                    m[4] += w * a * b;
                }
                m
            })
        })
        .collect();

    // Vertical pass and the S map, summed per output row.
    let total: f64 = (0..oh)
        .into_par_iter()
        .map(|orow| {
            let mut acc = 0f64;
            for col in 0..ow {
                let mut m = [0f64; 5];
                for (t, &w) in taps.iter().enumerate() {
                    let h = &hpass[(orow + t) * ow + col];
                    for j in 0..5 {
                        m[j] += w * h[j];
                    }
                }
                let [ux, uy, uxx, uyy, uxy] = m;
                let vx = cov_norm * (uxx - ux * ux);
                let vy = cov_norm * (uyy - uy * uy);
                let vxy = cov_norm * (uxy - ux * uy);
                let a1 = 2.0 * ux * uy + c1;
                let a2 = 2.0 * vxy + c2;
                let b1 = ux * ux + uy * uy + c1;
                let b2 = vx + vy + c2;
                acc += (a1 * a2) / (b1 * b2);
            }
            acc
        })
        .sum();
    Ok(total / (oh * ow) as f64)
}

/// SSIM over every channel (skimage `channel_axis=0`).
pub fn ssim(gt: &ChwImage, pred: &ChwImage, p: &SsimParams) -> Result<SsimResult> {
    gt.same_shape(pred, "ssim")?;
    if !(p.data_range.is_finite() && p.data_range > 0.0) {
        return Err(Error::msg(format!(
            "ssim: data range must be positive, got {}",
            p.data_range
        )));
    }
    let per_channel = (0..gt.channels)
        .map(|c| ssim_plane(gt.plane(c), pred.plane(c), gt.height, gt.width, p))
        .collect::<Result<Vec<f64>>>()?;
    let mean = per_channel.iter().sum::<f64>() / per_channel.len() as f64;
    Ok(SsimResult { per_channel, mean })
}

/// MCLD's SSIM: 51x51 box window, data range 1.
pub fn ssim_uniform51(gt: &ChwImage, pred: &ChwImage) -> Result<SsimResult> {
    ssim(gt, pred, &SsimParams::mcld_uniform51())
}

/// Scales by 255 in f32, as the evaluator does before SSIM_256.
fn times255(img: &ChwImage) -> ChwImage {
    ChwImage {
        data: img.data.iter().map(|v| v * 255.0).collect(),
        ..img.clone()
    }
}

/// The data range SSIM_256 uses: max - min of the generated image times 255, in f32.
pub fn ssim_256_data_range(pred: &ChwImage) -> f32 {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in &pred.data {
        let v = v * 255.0;
        lo = lo.min(v);
        hi = hi.max(v);
    }
    hi - lo
}

/// MCLD's SSIM_256: Gaussian window on x255 arrays, data range from the generated image.
/// A flat generated image (range 0) is an error: the reference would divide 0 by 0 there.
pub fn ssim_256(gt: &ChwImage, pred: &ChwImage) -> Result<SsimResult> {
    let dr = ssim_256_data_range(pred);
    ssim(
        &times255(gt),
        &times255(pred),
        &SsimParams::mcld_gaussian(dr as f64),
    )
}
