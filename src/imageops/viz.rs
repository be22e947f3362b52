//! Pictures for people to look at (demo strips, edit panels, validation grids): panels laid side
//! by side and DensePose IUV images made visible. Nothing here feeds a network.

use candle_core::Tensor;
use image::{Rgb, RgbImage};

use crate::Result;

/// Side-by-side strip of panels, top-aligned on a white background.
pub fn strip(panels: &[RgbImage]) -> RgbImage {
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(0);
    let w: u32 = panels.iter().map(|p| p.width()).sum();
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut x0 = 0;
    for p in panels {
        image::imageops::replace(&mut out, p, x0 as i64, 0);
        x0 += p.width();
    }
    out
}

/// An IUV image made visible: part index as hue-ish colour, U/V as brightness.
pub fn pose_preview(iuv: &RgbImage) -> RgbImage {
    RgbImage::from_fn(iuv.width(), iuv.height(), |x, y| {
        let p = iuv.get_pixel(x, y);
        if p[2] == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([p[2].saturating_mul(10), p[1], p[0]])
        }
    })
}

/// `img` squashed to `size` x `size` (bicubic).
pub fn square(img: &RgbImage, size: u32) -> Result<RgbImage> {
    super::pil_resize_rgb(img, (size as usize, size as usize), super::Filter::Bicubic)
}

/// `img` scaled to `h` rows, keeping its aspect ratio.
pub fn fit_height(img: &RgbImage, h: u32) -> Result<RgbImage> {
    let w = ((img.width() as f64 * h as f64 / img.height().max(1) as f64).round() as u32).max(1);
    super::pil_resize_rgb(img, (h as usize, w as usize), super::Filter::Bicubic)
}

/// A generated (3, H, W) image in [-1, 1] as 8-bit RGB.
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (_, h, w) = t.dims3()?;
    super::generated_to_rgb(t, (h, w))
}
