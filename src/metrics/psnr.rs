//! PSNR with data range 1, as `skimage.metrics.peak_signal_noise_ratio` on [0,1] float32 arrays.

use super::ChwImage;
use crate::{Error, Result};

/// Mean squared error: squares of the f32 differences, summed in f64 (skimage's `dtype=float64`).
pub fn mse(gt: &ChwImage, pred: &ChwImage) -> Result<f64> {
    gt.same_shape(pred, "mse")?;
    if gt.data.is_empty() {
        return Err(Error::msg("mse: empty images"));
    }
    let sum: f64 = gt
        .data
        .iter()
        .zip(&pred.data)
        .map(|(a, b)| {
            let d = a - b;
            (d * d) as f64
        })
        .sum();
    Ok(sum / gt.data.len() as f64)
}

/// PSNR in dB for data range 1; identical images give +inf, as skimage does.
pub fn psnr(gt: &ChwImage, pred: &ChwImage) -> Result<f64> {
    Ok(psnr_from_mse(mse(gt, pred)?))
}

/// `10 log10(1 / mse)`.
pub fn psnr_from_mse(mse: f64) -> f64 {
    10.0 * (1.0 / mse).log10()
}
