//! Text on pictures (loss curve, labelled grids) with one font embedded in the binary, so no
//! system font is needed: DejaVu Sans (Bitstream Vera license, `assets/fonts/`), drawn by
//! plotters' `ab_glyph` backend.

use std::sync::Once;

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::{Error, Result};

/// The family name the embedded font is registered under.
pub const FONT: &str = "sans-serif";

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Registers the embedded font with plotters (once per process); call before drawing text.
pub fn ensure_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType file checked in with the source; a failure here
        // would show as missing text, and the font test catches it.
        let _ = register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

/// Width and height in pixels of `text` at `px` pixels.
pub fn text_size(text: &str, px: u32) -> (u32, u32) {
    ensure_font();
    let font = (FONT, px as f64).into_font();
    match font.box_size(text) {
        Ok((w, h)) => (w, h),
        Err(_) => (0, 0),
    }
}

/// Draws `text` with its top-left corner at `(x, y)`.
pub fn draw_text(
    img: &mut RgbImage,
    (x, y): (i32, i32),
    text: &str,
    px: u32,
    color: Rgb<u8>,
) -> Result<()> {
    ensure_font();
    let (w, h) = img.dimensions();
    let root =
        BitMapBackend::with_buffer(std::ops::DerefMut::deref_mut(img), (w, h)).into_drawing_area();
    let style = (FONT, px as f64)
        .into_font()
        .color(&RGBColor(color[0], color[1], color[2]));
    root.draw_text(text, &style, (x, y))
        .map_err(|e| Error::msg(format!("cannot draw text '{text}': {e}")))?;
    root.present()
        .map_err(|e| Error::msg(format!("cannot draw text '{text}': {e}")))
}

/// Draws `text` centred in the box `(x, y, w, h)`, shrinking the font until it fits the width.
pub fn draw_text_centred(
    img: &mut RgbImage,
    (x, y, w, h): (i32, i32, u32, u32),
    text: &str,
    px: u32,
    color: Rgb<u8>,
) -> Result<()> {
    let mut px = px.max(6);
    let (mut tw, mut th) = text_size(text, px);
    while tw > w.saturating_sub(4) && px > 8 {
        px -= 1;
        (tw, th) = text_size(text, px);
    }
    let tx = x + (w as i32 - tw as i32) / 2;
    let ty = y + (h as i32 - th as i32) / 2;
    draw_text(img, (tx.max(x), ty.max(y)), text, px, color)
}
