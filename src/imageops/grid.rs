//! The one labelled picture layout shared by the validation grid of `train`, the panels of
//! `test --limit`, `infer` (and its contact sheet of several poses) and `demo`: a title, a
//! header naming the columns, then one row of panels per pair, each row under a line naming it.

use image::{Rgb, RgbImage};

use super::text::{draw_text, draw_text_centred};
use super::{pil_resize_rgb, Filter};
use crate::{Error, Result};

/// The columns of a grid of dataset pairs (validation, `test --limit`).
pub const PAIR_COLUMNS: [&str; 5] = [
    "source",
    "texture",
    "target pose",
    "generated",
    "ground truth",
];

/// Cells are never smaller than this (whatever size the networks ran at).
pub const MIN_CELL: u32 = 256;
/// Band heights: title, column header, row label.
pub const TITLE_BAND: u32 = 40;
pub const HEADER_BAND: u32 = 28;
pub const ROW_BAND: u32 = 24;
/// Space around and between cells.
pub const MARGIN: u32 = 8;
pub const GAP: u32 = 4;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const CELL_BACKGROUND: Rgb<u8> = Rgb([236, 236, 236]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const MUTED: Rgb<u8> = Rgb([90, 90, 90]);

/// One row: its label and its panels (as many as there are columns).
#[derive(Debug, Clone)]
pub struct GridRow {
    pub label: String,
    pub panels: Vec<RgbImage>,
}

/// Where each part of a grid of `rows` x `columns` square cells of side `cell` lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub columns: u32,
    pub rows: u32,
    pub cell: u32,
}

impl GridLayout {
    pub fn size(&self) -> (u32, u32) {
        let w = 2 * MARGIN + self.columns * self.cell + self.columns.saturating_sub(1) * GAP;
        let h = TITLE_BAND + HEADER_BAND + self.rows * (ROW_BAND + self.cell + GAP) + MARGIN;
        (w, h)
    }

    /// Top-left corner of cell (row, column).
    pub fn cell_origin(&self, row: u32, col: u32) -> (u32, u32) {
        let x = MARGIN + col * (self.cell + GAP);
        let y = TITLE_BAND + HEADER_BAND + row * (ROW_BAND + self.cell + GAP) + ROW_BAND;
        (x, y)
    }

    /// Top of the label band of `row`.
    pub fn row_label_top(&self, row: u32) -> u32 {
        TITLE_BAND + HEADER_BAND + row * (ROW_BAND + self.cell + GAP)
    }
}

/// `img` scaled to fit a `cell` x `cell` box (aspect kept), centred on a light grey cell.
fn fit(img: &RgbImage, cell: u32) -> Result<RgbImage> {
    let mut out = RgbImage::from_pixel(cell, cell, CELL_BACKGROUND);
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Ok(out);
    }
    let scale = cell as f64 / w.max(h) as f64;
    let tw = ((w as f64 * scale).round() as u32).clamp(1, cell);
    let th = ((h as f64 * scale).round() as u32).clamp(1, cell);
    let scaled = if (tw, th) == (w, h) {
        img.clone()
    } else {
        pil_resize_rgb(img, (th as usize, tw as usize), Filter::Bicubic)?
    };
    image::imageops::replace(
        &mut out,
        &scaled,
        i64::from((cell - tw) / 2),
        i64::from((cell - th) / 2),
    );
    Ok(out)
}

/// The labelled grid: `title` on top, `columns` naming the cells below, each row under its
/// label. Cells are square, `cell` px (at least [`MIN_CELL`]); panels keep their aspect.
pub fn labelled_grid(
    title: &str,
    columns: &[&str],
    rows: &[GridRow],
    cell: u32,
) -> Result<RgbImage> {
    if columns.is_empty() || rows.is_empty() {
        return Err(Error::msg(format!(
            "{title}: a grid needs at least one column and one row"
        )));
    }
    if let Some(r) = rows.iter().find(|r| r.panels.len() != columns.len()) {
        return Err(Error::msg(format!(
            "{title}: row '{}' has {} panels for {} columns",
            r.label,
            r.panels.len(),
            columns.len()
        )));
    }
    let layout = GridLayout {
        columns: columns.len() as u32,
        rows: rows.len() as u32,
        cell: cell.max(MIN_CELL),
    };
    let (w, h) = layout.size();
    let mut out = RgbImage::from_pixel(w, h, BACKGROUND);
    draw_text_centred(
        &mut out,
        (MARGIN as i32, 0, w - 2 * MARGIN, TITLE_BAND),
        title,
        22,
        INK,
    )?;
    for (c, name) in columns.iter().enumerate() {
        let (x, _) = layout.cell_origin(0, c as u32);
        draw_text_centred(
            &mut out,
            (x as i32, TITLE_BAND as i32, layout.cell, HEADER_BAND),
            name,
            17,
            INK,
        )?;
    }
    for (r, row) in rows.iter().enumerate() {
        let top = layout.row_label_top(r as u32);
        draw_text(
            &mut out,
            (MARGIN as i32 + 2, top as i32 + 4),
            &row.label,
            15,
            MUTED,
        )?;
        for (c, p) in row.panels.iter().enumerate() {
            let (x, y) = layout.cell_origin(r as u32, c as u32);
            image::imageops::replace(&mut out, &fit(p, layout.cell)?, x.into(), y.into());
        }
    }
    Ok(out)
}
