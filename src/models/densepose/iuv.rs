//! Input resize (Pillow's bilinear), the chart result of one instance and the MCLD IUV image.

use std::path::Path;

use candle_core::Tensor;

use super::predictor::BilinearGrid;
use crate::{Error, Result};

/// An 8-bit 3-channel image, row-major `HxWx3` (channel order is the caller's: BGR here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image3 {
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
}

impl Image3 {
    pub fn new(h: usize, w: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != h * w * 3 {
            return Err(Error::msg(format!(
                "image buffer has {} bytes, expected {h}x{w}x3",
                data.len()
            )));
        }
        Ok(Self { h, w, data })
    }

    /// Reads a photo as BGR, EXIF orientation applied (detectron2's `read_image(format="BGR")`).
    pub fn read_bgr(path: &Path) -> Result<Self> {
        let img = crate::imageops::open_image_oriented(path)?.to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = img.into_raw();
        for px in data.chunks_exact_mut(3) {
            px.swap(0, 2);
        }
        Self::new(h, w, data)
    }
}

/// `ResizeShortestEdge` at test time: the output `(h, w)`.
pub fn shortest_edge_size(h: usize, w: usize, min: usize, max: usize) -> (usize, usize) {
    let (h, w) = (h as f64, w as f64);
    let scale = min as f64 / h.min(w);
    let (mut nh, mut nw) = if h < w {
        (min as f64, scale * w)
    } else {
        (scale * h, min as f64)
    };
    if nh.max(nw) > max as f64 {
        let s = max as f64 / nh.max(nw);
        nh *= s;
        nw *= s;
    }
    ((nh + 0.5) as usize, (nw + 0.5) as usize)
}

/// `PIL.Image.resize(BILINEAR)` of a 3-channel 8-bit image, through the crate's Pillow port.
pub fn resize_pil_bilinear(img: &Image3, oh: usize, ow: usize) -> Result<Image3> {
    if oh == 0 || ow == 0 || img.h == 0 || img.w == 0 {
        return Err(Error::msg(format!(
            "cannot resize a {}x{} image to {oh}x{ow}",
            img.h, img.w
        )));
    }
    let u = crate::imageops::U8Image::new(img.w, img.h, 3, img.data.clone())?;
    let r = crate::imageops::pillow::resize(&u, ow, oh, crate::imageops::Filter::Bilinear)?;
    Image3::new(oh, ow, r.data)
}

/// The chart result of one instance at its box size: labels `[h, w]` and `uv` `[2, h, w]`.
#[derive(Debug, Clone)]
pub struct ChartResult {
    pub h: usize,
    pub w: usize,
    pub labels: Vec<u8>,
    pub uv: Vec<f32>,
}

/// Box `(x, y, w, h)` as detectron2 truncates it (`.long()` of the float XYWH, w/h at least 1).
pub fn box_xywh_int(b: &[f32; 4]) -> (i64, i64, i64, i64) {
    let w = (b[2] - b[0]) as i64;
    let h = (b[3] - b[1]) as i64;
    (b[0] as i64, b[1] as i64, w.max(1), h.max(1))
}

/// `densepose_chart_predictor_output_to_result` for one instance; tensors are `[1 or C, S, S]`
/// planes (coarse, fine, u, v) of that instance.
pub fn chart_result(
    coarse: &Tensor,
    fine: &Tensor,
    u: &Tensor,
    v: &Tensor,
    box_xyxy: &[f32; 4],
) -> Result<ChartResult> {
    let (_, _, w, h) = box_xywh_int(box_xyxy);
    let (h, w) = (h as usize, w as usize);
    let host = |t: &Tensor| -> Result<(usize, usize, usize, Vec<f32>)> {
        let t = if t.rank() == 4 {
            t.squeeze(0)?
        } else {
            t.clone()
        };
        let (c, sh, sw) = t.dims3()?;
        Ok((c, sh, sw, t.flatten_all()?.to_vec1::<f32>()?))
    };
    let (cc, csh, csw, coarse) = host(coarse)?;
    let (fc, sh, sw, fine) = host(fine)?;
    let (uc, ush, usw, u) = host(u)?;
    let (vc, vsh, vsw, v) = host(v)?;
    if uc != fc || vc != fc {
        return Err(Error::msg(format!(
            "chart outputs disagree: fine has {fc} channels, u {uc}, v {vc}"
        )));
    }
    if (csh, csw) != (sh, sw) || (ush, usw) != (sh, sw) || (vsh, vsw) != (sh, sw) {
        return Err(Error::msg(
            "chart outputs disagree in size (coarse, fine, u, v)",
        ));
    }
    // One grid for all four (same source size, same box). Each output pixel is evaluated on
    // its own with the full resize's arithmetic: coarse first, the 25 fine channels only on the
    // foreground, U and V only in the chosen part's channel. Rows run in parallel.
    let grid = BilinearGrid::new(sh, sw, h, w, sh as f32 / h as f32, sw as f32 / w as f32);
    let plane = sh * sw;
    let argmax = |d: &[f32], c: usize, oy: usize, ox: usize| -> usize {
        let mut best = 0;
        let mut best_v = grid.at(&d[..plane], oy, ox);
        for k in 1..c {
            let v = grid.at(&d[k * plane..(k + 1) * plane], oy, ox);
            if v > best_v {
                best = k;
                best_v = v;
            }
        }
        best
    };
    let n = h * w;
    let mut labels = vec![0u8; n];
    let mut u_out = vec![0f32; n];
    let mut v_out = vec![0f32; n];
    {
        use rayon::prelude::*;
        labels
            .par_chunks_mut(w)
            .zip(u_out.par_chunks_mut(w))
            .zip(v_out.par_chunks_mut(w))
            .enumerate()
            .for_each(|(oy, ((lr, ur), vr))| {
                for ox in 0..w {
                    if argmax(&coarse, cc, oy, ox) == 0 {
                        continue;
                    }
                    let l = argmax(&fine, fc, oy, ox);
                    lr[ox] = l as u8;
                    if l > 0 {
                        ur[ox] = grid.at(&u[l * plane..(l + 1) * plane], oy, ox);
                        vr[ox] = grid.at(&v[l * plane..(l + 1) * plane], oy, ox);
                    }
                }
            });
    }
    let mut uv = u_out;
    uv.extend_from_slice(&v_out);
    Ok(ChartResult { h, w, labels, uv })
}

/// MCLD's `process_output`: `[I, U*255, V*255]` truncated to uint8, pasted at the box into a
/// zero `HxWx3` image (channel order I, U, V).
pub fn iuv_image(chart: &ChartResult, box_xyxy: &[f32; 4], h: usize, w: usize) -> Vec<u8> {
    let (bx, by, _, _) = box_xywh_int(box_xyxy);
    let mut out = vec![0u8; h * w * 3];
    let n = chart.h * chart.w;
    for r in 0..chart.h {
        let y = by + r as i64;
        if y < 0 || y >= h as i64 {
            continue;
        }
        for c in 0..chart.w {
            let x = bx + c as i64;
            if x < 0 || x >= w as i64 {
                continue;
            }
            let p = r * chart.w + c;
            let o = (y as usize * w + x as usize) * 3;
            out[o] = chart.labels[p];
            out[o + 1] = to_u8_wrapping(chart.uv[p] as f64 * 255.0);
            out[o + 2] = to_u8_wrapping(chart.uv[n + p] as f64 * 255.0);
        }
    }
    out
}

/// numpy's float64 -> uint8 `astype` on x86: truncate, then keep the low 8 bits.
fn to_u8_wrapping(v: f64) -> u8 {
    (v as i64) as u8
}

/// Writes an `[I, U, V]` image as MCLD does with OpenCV: on disk R = V, G = U, B = I.
pub fn save_iuv_png(iuv: &[u8], h: usize, w: usize, path: &Path) -> Result<()> {
    let mut rgb = Vec::with_capacity(iuv.len());
    for px in iuv.chunks_exact(3) {
        rgb.extend_from_slice(&[px[2], px[1], px[0]]);
    }
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .ok_or_else(|| Error::msg(format!("IUV buffer does not fit {h}x{w}")))?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img), path)
}
