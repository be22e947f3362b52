//! Evaluation metrics as MCLD's evaluator computes them (SPEC §6): PSNR, SSIM (two variants),
//! LPIPS (AlexNet, v0.1), Inception-V3 pool features and the Frechet distance.

pub mod face;
pub mod fid;
pub mod inception;
pub mod lpips;
pub mod psnr;
pub mod ssim;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A float image in CHW order, values in [0,1] as `pil_to_tensor(img).float() / 255` gives them.
#[derive(Debug, Clone)]
pub struct ChwImage {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl ChwImage {
    /// Wraps raw CHW data, checking that the length matches the shape.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != channels * height * width {
            return Err(Error::msg(format!(
                "image data has {} values, expected {channels}x{height}x{width}",
                data.len()
            )));
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// Converts interleaved 8-bit RGB (HWC) the way torchvision does: an exact f32 division by 255.
    pub fn from_rgb8(height: usize, width: usize, hwc: &[u8]) -> Result<Self> {
        if hwc.len() != 3 * height * width {
            return Err(Error::msg(format!(
                "RGB buffer has {} bytes, expected 3x{height}x{width}",
                hwc.len()
            )));
        }
        let plane = height * width;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in hwc.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * plane + i] = px[c] as f32 / 255.0;
            }
        }
        Self::new(3, height, width, data)
    }

    /// Reads an image file as RGB. Grey or RGBA files are converted like PIL's `convert("RGB")`.
    pub fn load_rgb(path: &Path) -> Result<Self> {
        let img = crate::imageops::open_rgb(path)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::input(path, "image is empty"));
        }
        Self::from_rgb8(h, w, img.as_raw())
    }

    /// One channel plane.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// The image as a `(1, C, H, W)` f32 tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (1, self.channels, self.height, self.width),
            device,
        )?)
    }

    fn same_shape(&self, other: &ChwImage, what: &str) -> Result<()> {
        if (self.channels, self.height, self.width) != (other.channels, other.height, other.width) {
            return Err(Error::msg(format!(
                "{what}: image shapes differ ({}x{}x{} vs {}x{}x{})",
                self.channels, self.height, self.width, other.channels, other.height, other.width
            )));
        }
        Ok(())
    }
}
