//! Texture maps (SPEC §2): IUV + photo -> 24-tile atlas -> Telea inpainting -> 512x512 UV map.
//!
//! Every step is per colour channel or symmetric in the channels (scatter, "any channel nonzero",
//! min/max over all channels, Telea), so the reference's BGR order gives the same bytes as working
//! in RGB throughout; images go in and come out as RGB.

use image::{GrayImage, Luma, RgbImage};
use rayon::prelude::*;
use safetensors::SafeTensors;

use super::telea::{inpaint_telea, inpaint_telea_needed};
use crate::{Error, Result};

/// DensePose part count (I = 1..=24).
pub const PARTS: usize = 24;
/// Side of one atlas tile.
pub const TILE: usize = 200;
/// Atlas grid: tile of part p sits at row (p-1) % 6, column (p-1) / 6.
pub const ATLAS_ROWS: usize = 6;
pub const ATLAS_COLS: usize = 4;
/// Side of the final SMPL-UV texture.
pub const NORMAL: usize = 512;
/// Side of the even dilation kernel; OpenCV anchors it at (5, 5), i.e. offsets -5..=4.
const DILATE: usize = 10;
/// Telea radius used by MCLD.
const TELEA_RADIUS: f64 = 3.0;

const BG_NAME: &str = "assets/texture_bg_200.png";
const LUT_NAME: &str = "assets/uv_atlas2normal_200_512.safetensors";
static BG_PNG: &[u8] = include_bytes!("../../assets/texture_bg_200.png");
static LUT_ST: &[u8] = include_bytes!("../../assets/uv_atlas2normal_200_512.safetensors");

/// The fixed inputs of the texture step: template masks and the Atlas2Normal lookup table.
#[derive(Debug, Clone)]
pub struct TextureAssets {
    /// Per part, the 200x200 template (nonzero = texel that belongs to the body surface).
    templates: Vec<Vec<u8>>,
    /// Per texture pixel: source part (0..23, -1 = black), row and column in that part's tile.
    src_part: Vec<i8>,
    src_row: Vec<u8>,
    src_col: Vec<u8>,
}

impl TextureAssets {
    /// The assets built into the binary. Decoding takes a few milliseconds: build them once and
    /// share them (`&TextureAssets` is `Sync`) across images.
    pub fn builtin() -> Result<Self> {
        Self::from_bytes(BG_PNG, BG_NAME, LUT_ST, LUT_NAME)
    }

    /// Assets from files: the 800x1200 template atlas PNG (`texture_bg_200.png`) and the
    /// Atlas2Normal lookup table (`uv_atlas2normal_200_512.safetensors`).
    pub fn from_files(bg_png: &std::path::Path, lut: &std::path::Path) -> Result<Self> {
        let bg = std::fs::read(bg_png).map_err(|e| Error::io(bg_png, e))?;
        let st = std::fs::read(lut).map_err(|e| Error::io(lut, e))?;
        Self::from_bytes(
            &bg,
            &bg_png.display().to_string(),
            &st,
            &lut.display().to_string(),
        )
    }

    fn from_bytes(bg_png: &[u8], bg_name: &str, lut: &[u8], lut_name: &str) -> Result<Self> {
        let templates = parse_templates(bg_png, bg_name)?;
        let st = SafeTensors::deserialize(lut)
            .map_err(|e| Error::input(lut_name, format!("not a safetensors file: {e}")))?;
        let get = |name: &str, dtype: safetensors::Dtype| -> Result<Vec<u8>> {
            let v = st
                .tensor(name)
                .map_err(|e| Error::input(lut_name, format!("tensor {name}: {e}")))?;
            if v.dtype() != dtype || v.shape() != [NORMAL, NORMAL] {
                return Err(Error::input(
                    lut_name,
                    format!(
                        "tensor {name} is {:?} {:?}, expected {dtype:?} [{NORMAL}, {NORMAL}]",
                        v.dtype(),
                        v.shape()
                    ),
                ));
            }
            Ok(v.data().to_vec())
        };
        let src_part: Vec<i8> = get("src_part", safetensors::Dtype::I8)?
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let src_row = get("src_row", safetensors::Dtype::U8)?;
        let src_col = get("src_col", safetensors::Dtype::U8)?;
        for (i, &p) in src_part.iter().enumerate() {
            let bad_part = p < -1 || p >= PARTS as i8;
            let bad_texel = p >= 0 && (src_row[i] as usize >= TILE || src_col[i] as usize >= TILE);
            if bad_part || bad_texel {
                return Err(Error::input(
                    lut_name,
                    format!(
                        "entry {i} points at part {p}, texel ({}, {}): outside the atlas",
                        src_row[i], src_col[i]
                    ),
                ));
            }
        }
        Ok(Self {
            templates,
            src_part,
            src_row,
            src_col,
        })
    }

    /// The template tile of part `p` (1..=24), 200x200 row-major.
    pub fn template(&self, part: usize) -> &[u8] {
        &self.templates[part - 1]
    }

    /// Per texel of the 512x512 texture (row-major), the DensePose part it shows minus one
    /// (0..23), or -1 where no part maps: what region edits compose by.
    pub fn texel_parts(&self) -> &[i8] {
        &self.src_part
    }
}

/// Splits the template atlas into its 24 tiles. The reference reads it with
/// `cv2.IMREAD_GRAYSCALE`; the file is grey (R = G = B), which that conversion keeps as is.
fn parse_templates(png: &[u8], name: &str) -> Result<Vec<Vec<u8>>> {
    let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(|e| Error::input(name, format!("cannot decode PNG: {e}")))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if (w as usize, h as usize) != (ATLAS_COLS * TILE, ATLAS_ROWS * TILE) {
        return Err(Error::input(
            name,
            format!(
                "template atlas is {w}x{h}, expected {}x{}",
                ATLAS_COLS * TILE,
                ATLAS_ROWS * TILE
            ),
        ));
    }
    let mut tiles = vec![vec![0u8; TILE * TILE]; PARTS];
    for (p, tile) in tiles.iter_mut().enumerate() {
        let (r0, c0) = tile_origin(p + 1);
        for y in 0..TILE {
            for x in 0..TILE {
                let px = img.get_pixel((c0 + x) as u32, (r0 + y) as u32).0;
                if px[0] != px[1] || px[1] != px[2] {
                    return Err(Error::input(
                        name,
                        format!("pixel ({}, {}) is not grey: {px:?}", c0 + x, r0 + y),
                    ));
                }
                tile[y * TILE + x] = px[0];
            }
        }
    }
    Ok(tiles)
}

/// Top-left (row, column) of part `p`'s tile (1..=24) in the 1200x800 atlas.
pub fn tile_origin(part: usize) -> (usize, usize) {
    (
        ((part - 1) % ATLAS_ROWS) * TILE,
        ((part - 1) / ATLAS_ROWS) * TILE,
    )
}

/// Every intermediate of one part's tile (200x200, row-major; colours RGB).
#[derive(Debug, Clone)]
pub struct TileStages {
    /// Photo colours scattered onto the tile (zeros where nothing landed).
    pub scatter: Vec<[u8; 3]>,
    /// 1 where any channel of `scatter` is nonzero.
    pub valid: Vec<u8>,
    /// `valid` dilated with a 10x10 ones kernel (anchor 5, 5).
    pub dilated: Vec<u8>,
    /// 1 where the template is set and `valid` is not: the region Telea fills.
    pub inpaint_mask: Vec<u8>,
    /// Min-max scaled tile after Telea. Built by [`texture_map`]'s fast path, only the pixels
    /// inside `dilated` are filled; [`texture_atlas`] fills all, as the reference does.
    pub normalized_inpainted: Vec<[u8; 3]>,
    /// Scaled back, truncated, kept only inside `dilated` (MCLD's TextureIm tile).
    pub final_tile: Vec<[u8; 3]>,
    /// (min, max) over the whole scattered tile, all channels, zeros included.
    pub minmax: (f64, f64),
}

/// All tiles of one photo; `None` for parts absent from the IUV image.
#[derive(Debug, Clone)]
pub struct AtlasStages {
    pub tiles: Vec<Option<TileStages>>,
}

/// One 200x200 colour tile, row-major.
pub type Tile = Vec<[u8; 3]>;

/// Scatters `photo` (RGB) onto the 24 part tiles using its IUV image as stored on disk
/// (R = V, G = U, B = I), in raster order so later pixels win. Returns the tiles (RGB, row-major)
/// and which parts occur.
pub fn scatter(photo: &RgbImage, iuv: &RgbImage) -> Result<(Vec<Tile>, [bool; PARTS])> {
    if photo.dimensions() != iuv.dimensions() {
        return Err(Error::msg(format!(
            "texture map: photo is {}x{} but its IUV image is {}x{}",
            photo.width(),
            photo.height(),
            iuv.width(),
            iuv.height()
        )));
    }
    let mut tiles = vec![vec![[0u8; 3]; TILE * TILE]; PARTS];
    let mut present = [false; PARTS];
    for (c, i) in photo.pixels().zip(iuv.pixels()) {
        let [v, u, part] = i.0;
        let part = part as usize;
        if part == 0 || part > PARTS {
            continue;
        }
        present[part - 1] = true;
        // float64 arithmetic and truncation, as the reference's int((255 - V) * 199.0 / 255.0).
        let row = ((255 - v) as f64 * (TILE - 1) as f64 / 255.0) as usize;
        let col = (u as f64 * (TILE - 1) as f64 / 255.0) as usize;
        tiles[part - 1][row * TILE + col] = c.0;
    }
    if !present.iter().any(|&p| p) {
        return Err(Error::msg(
            "texture map: no person in the IUV image (no pixel has a part index 1..24)",
        ));
    }
    Ok((tiles, present))
}

/// `cv2.dilate(mask, ones((10, 10)))` on a 200x200 0/1 tile: max over offsets -5..=4 in both
/// directions, pixels outside the tile ignored.
pub fn dilate_10x10(mask: &[u8]) -> Vec<u8> {
    let before = DILATE / 2;
    let after = DILATE - 1 - before;
    let mut rows = vec![0u8; TILE * TILE];
    for y in 0..TILE {
        for x in 0..TILE {
            let lo = x.saturating_sub(before);
            let hi = (x + after).min(TILE - 1);
            rows[y * TILE + x] = mask[y * TILE + lo..=y * TILE + hi]
                .iter()
                .copied()
                .max()
                .unwrap_or(0);
        }
    }
    let mut out = vec![0u8; TILE * TILE];
    for y in 0..TILE {
        let lo = y.saturating_sub(before);
        let hi = (y + after).min(TILE - 1);
        for x in 0..TILE {
            out[y * TILE + x] = (lo..=hi).map(|yy| rows[yy * TILE + x]).max().unwrap_or(0);
        }
    }
    out
}

/// One present part's tile through valid mask, dilation, min-max scaling, Telea and back. With
/// `full == false` Telea stops once the pixels inside the dilated area are filled: the final tile
/// is the same, only `normalized_inpainted` outside that area is left unfilled.
pub fn process_tile(scattered: Vec<[u8; 3]>, template: &[u8], full: bool) -> Result<TileStages> {
    let valid: Vec<u8> = scattered
        .iter()
        .map(|c| (c.iter().any(|&v| v != 0)) as u8)
        .collect();
    let dilated = dilate_10x10(&valid);
    let inpaint_mask: Vec<u8> = template
        .iter()
        .zip(&valid)
        .map(|(&t, &v)| (t != 0 && v == 0) as u8)
        .collect();
    let lo = scattered.iter().flatten().copied().min().unwrap_or(0) as f64;
    let hi = scattered.iter().flatten().copied().max().unwrap_or(0) as f64;
    let span = hi - lo;
    // A constant tile (only black texels) has span 0: the reference's 0/0 becomes 0 after its
    // uint8 cast, and scaling back gives `lo` everywhere.
    let norm: Vec<u8> = scattered
        .iter()
        .flatten()
        .map(|&v| {
            if span > 0.0 {
                ((v as f64 - lo) / span * 255.0) as u8
            } else {
                0
            }
        })
        .collect();
    let filled = if full {
        inpaint_telea(&norm, TILE, TILE, 3, &inpaint_mask, TELEA_RADIUS)?
    } else {
        inpaint_telea_needed(&norm, TILE, TILE, 3, &inpaint_mask, TELEA_RADIUS, &dilated)?
    };
    let normalized_inpainted: Vec<[u8; 3]> =
        filled.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
    let final_tile = normalized_inpainted
        .iter()
        .zip(&dilated)
        .map(|(c, &d)| {
            if d == 0 {
                [0; 3]
            } else {
                c.map(|v| ((v as f64 / 255.0) * span + lo) as u8)
            }
        })
        .collect();
    Ok(TileStages {
        scatter: scattered,
        valid,
        dilated,
        inpaint_mask,
        normalized_inpainted,
        final_tile,
        minmax: (lo, hi),
    })
}

/// Every stage of the atlas for one photo, each as complete as the reference's; tiles run in
/// parallel.
pub fn texture_atlas(
    photo: &RgbImage,
    iuv: &RgbImage,
    assets: &TextureAssets,
) -> Result<AtlasStages> {
    atlas(photo, iuv, assets, true)
}

fn atlas(
    photo: &RgbImage,
    iuv: &RgbImage,
    assets: &TextureAssets,
    full: bool,
) -> Result<AtlasStages> {
    let (tiles, present) = scatter(photo, iuv)?;
    let tiles = tiles
        .into_par_iter()
        .enumerate()
        .map(|(p, tile)| {
            if present[p] {
                process_tile(tile, assets.template(p + 1), full).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AtlasStages { tiles })
}

impl AtlasStages {
    /// One colour stage laid out as the 800x1200 (W x H) atlas; absent parts stay black.
    pub fn atlas_rgb(&self, stage: impl Fn(&TileStages) -> &[[u8; 3]]) -> RgbImage {
        let mut img = RgbImage::new((ATLAS_COLS * TILE) as u32, (ATLAS_ROWS * TILE) as u32);
        for (p, t) in self.tiles.iter().enumerate() {
            let Some(t) = t else { continue };
            let (r0, c0) = tile_origin(p + 1);
            for (k, c) in stage(t).iter().enumerate() {
                let (y, x) = (k / TILE, k % TILE);
                img.put_pixel((c0 + x) as u32, (r0 + y) as u32, image::Rgb(*c));
            }
        }
        img
    }

    /// One mask stage laid out as the atlas.
    pub fn atlas_gray(&self, stage: impl Fn(&TileStages) -> &[u8]) -> GrayImage {
        let mut img = GrayImage::new((ATLAS_COLS * TILE) as u32, (ATLAS_ROWS * TILE) as u32);
        for (p, t) in self.tiles.iter().enumerate() {
            let Some(t) = t else { continue };
            let (r0, c0) = tile_origin(p + 1);
            for (k, &v) in stage(t).iter().enumerate() {
                let (y, x) = (k / TILE, k % TILE);
                img.put_pixel((c0 + x) as u32, (r0 + y) as u32, Luma([v]));
            }
        }
        img
    }

    /// The 512x512 texture through the Atlas2Normal lookup table.
    pub fn to_normal(&self, assets: &TextureAssets) -> RgbImage {
        let mut img = RgbImage::new(NORMAL as u32, NORMAL as u32);
        for (k, px) in img.pixels_mut().enumerate() {
            let p = assets.src_part[k];
            if p < 0 {
                continue;
            }
            if let Some(t) = &self.tiles[p as usize] {
                let texel = assets.src_row[k] as usize * TILE + assets.src_col[k] as usize;
                px.0 = t.final_tile[texel];
            }
        }
        img
    }
}

/// Atlas2Normal on a full 800x1200 (W x H) final atlas image, as the reference applies it.
pub fn atlas_to_normal(atlas: &RgbImage, assets: &TextureAssets) -> Result<RgbImage> {
    let (w, h) = atlas.dimensions();
    if (w as usize, h as usize) != (ATLAS_COLS * TILE, ATLAS_ROWS * TILE) {
        return Err(Error::msg(format!(
            "Atlas2Normal: atlas is {w}x{h}, expected {}x{}",
            ATLAS_COLS * TILE,
            ATLAS_ROWS * TILE
        )));
    }
    let mut img = RgbImage::new(NORMAL as u32, NORMAL as u32);
    for (k, px) in img.pixels_mut().enumerate() {
        let p = assets.src_part[k];
        if p < 0 {
            continue;
        }
        let (r0, c0) = tile_origin(p as usize + 1);
        let (r, c) = (assets.src_row[k] as usize, assets.src_col[k] as usize);
        *px = *atlas.get_pixel((c0 + c) as u32, (r0 + r) as u32);
    }
    Ok(img)
}

/// Texture map of `photo` (RGB) given its IUV image as stored on disk (R = V, G = U, B = I);
/// returns the 512x512 RGB texture. No person in the IUV is an error.
pub fn texture_map(photo: &RgbImage, iuv: &RgbImage, assets: &TextureAssets) -> Result<RgbImage> {
    Ok(atlas(photo, iuv, assets, false)?.to_normal(assets))
}
