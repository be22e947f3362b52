//! The training loss's face mask (SPEC §4): DensePose parts 23/24 (head) of the target IUV
//! image, taken after the same Pillow bicubic squash the reference applies to the pose image,
//! then nearest-resized to latent size. The bicubic step blurs label edges so that a few
//! non-head pixels become 23/24 and some head pixels drop out; the reference trains with that
//! mask, so it is kept.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::imageops::{interpolate_nearest, open_rgb, Filter, U8Image};
use crate::{Error, Result};

/// DensePose part indices of the head (front and back).
pub const FACE_PARTS: [u8; 2] = [23, 24];

/// A face mask at image and at latent resolution, 0/1 bytes in row-major order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaceMask {
    /// (height, width) of `image`.
    pub image_size: (usize, usize),
    pub image: Vec<u8>,
    /// (height, width) of `latent`.
    pub latent_size: (usize, usize),
    pub latent: Vec<u8>,
}

impl FaceMask {
    /// The latent mask as an f32 (1, h, w) tensor, ready to weight the loss.
    pub fn latent_tensor(&self, device: &Device) -> Result<Tensor> {
        let (h, w) = self.latent_size;
        let v: Vec<f32> = self.latent.iter().map(|&b| b as f32).collect();
        Ok(Tensor::from_vec(v, (1, h, w), device)?)
    }
}

/// Face mask from an IUV image in the on-disk RGB layout (R = V, G = U, B = part index).
/// `image_size` is the training resolution the pose image is squashed to, (height, width);
/// `latent_size` the latent grid, (height, width).
pub fn face_mask(
    iuv: &U8Image,
    image_size: (usize, usize),
    latent_size: (usize, usize),
) -> Result<FaceMask> {
    if iuv.channels != 3 {
        return Err(Error::msg(format!(
            "IUV image must have 3 channels (V, U, I), got {}",
            iuv.channels
        )));
    }
    let (h, w) = image_size;
    let resized = iuv.resize(w, h, Filter::Bicubic)?;
    let image: Vec<u8> = resized
        .data
        .chunks(3)
        .map(|px| u8::from(FACE_PARTS.contains(&px[2])))
        .collect();
    let latent = interpolate_nearest(&image, 1, image_size, latent_size)?;
    Ok(FaceMask {
        image_size,
        image,
        latent_size,
        latent,
    })
}

/// [`face_mask`] of an IUV PNG file; errors name the file.
pub fn face_mask_file(
    path: &Path,
    image_size: (usize, usize),
    latent_size: (usize, usize),
) -> Result<FaceMask> {
    let img = U8Image::from_rgb(&open_rgb(path)?);
    face_mask(&img, image_size, latent_size).map_err(|e| Error::input(path, e.to_string()))
}
