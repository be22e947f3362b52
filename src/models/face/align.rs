//! Image geometry of the face models: the detector's resize and the five-point similarity
//! alignment to ArcFace's template.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// ArcFace's 112x112 five-point template (eyes, nose tip, mouth corners), as InsightFace uses.
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// How the photo is shrunk into the detector's square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Pixel-centre bilinear, as `cv2.resize` (InsightFace); float, not OpenCV's fixed point.
    Bilinear,
    /// Pixel-centre nearest, as PIL's `Image.resize(NEAREST)`.
    Nearest,
}

/// Samples `img` at real coordinates with bilinear weights; outside is black.
fn sample_bilinear(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (x0, y0) = (x0 as i64, y0 as i64);
    let mut acc = [0f32; 3];
    for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
        for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
            let (xx, yy) = (x0 + dx, y0 + dy);
            if xx < 0 || yy < 0 || xx >= w || yy >= h {
                continue;
            }
            let p = img.get_pixel(xx as u32, yy as u32).0;
            for c in 0..3 {
                acc[c] += wx * wy * p[c] as f32;
            }
        }
    }
    acc
}

/// Source index of each output pixel for PIL's nearest resize: PIL accumulates the position
/// `scale / 2 + i * scale` by repeated f64 addition and truncates, and that rounding decides
/// ties at exact integers, so it is reproduced step by step.
fn pil_nearest_index(len_in: u32, len_out: u32) -> Vec<u32> {
    let scale = len_in as f64 / len_out as f64;
    let mut pos = scale * 0.5;
    let mut out = Vec::with_capacity(len_out as usize);
    for _ in 0..len_out {
        out.push((pos.max(0.0) as u32).min(len_in - 1));
        pos += scale;
    }
    out
}

pub fn resize(img: &RgbImage, w: u32, h: u32, mode: ResizeMode) -> RgbImage {
    match mode {
        ResizeMode::Nearest => {
            let xs = pil_nearest_index(img.width(), w);
            let ys = pil_nearest_index(img.height(), h);
            RgbImage::from_fn(w, h, |x, y| *img.get_pixel(xs[x as usize], ys[y as usize]))
        }
        ResizeMode::Bilinear => {
            let sx = img.width() as f64 / w as f64;
            let sy = img.height() as f64 / h as f64;
            let (iw, ih) = (img.width() as f64, img.height() as f64);
            RgbImage::from_fn(w, h, |x, y| {
                let xs = ((x as f64 + 0.5) * sx - 0.5).clamp(0.0, iw - 1.0);
                let ys = ((y as f64 + 0.5) * sy - 0.5).clamp(0.0, ih - 1.0);
                let v = sample_bilinear(img, xs as f32, ys as f32);
                image::Rgb(v.map(|c| c.round().clamp(0.0, 255.0) as u8))
            })
        }
    }
}

/// Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping
/// `src` onto `dst`, as a 2x3 matrix: Umeyama's estimate, in its closed 2-D form.
pub fn umeyama_similarity(src: &[[f32; 2]], dst: &[[f32; 2]]) -> [[f32; 3]; 2] {
    let n = src.len().min(dst.len()).max(1) as f64;
    let mean = |p: &[[f32; 2]]| {
        let (mut x, mut y) = (0f64, 0f64);
        for q in p {
            x += q[0] as f64;
            y += q[1] as f64;
        }
        (x / n, y / n)
    };
    let (sx, sy) = mean(src);
    let (dx, dy) = mean(dst);
    let (mut dot, mut cross, mut var) = (0f64, 0f64, 0f64);
    for (s, d) in src.iter().zip(dst) {
        let (ax, ay) = (s[0] as f64 - sx, s[1] as f64 - sy);
        let (bx, by) = (d[0] as f64 - dx, d[1] as f64 - dy);
        dot += ax * bx + ay * by;
        cross += ax * by - ay * bx;
        var += ax * ax + ay * ay;
    }
    let (a, b) = if var > 0.0 {
        (dot / var, cross / var)
    } else {
        (1.0, 0.0)
    };
    let tx = dx - (a * sx - b * sy);
    let ty = dy - (b * sx + a * sy);
    [
        [a as f32, -b as f32, tx as f32],
        [b as f32, a as f32, ty as f32],
    ]
}

/// `cv2.warpAffine(img, m, (size, size))` with bilinear sampling and a black border. Sampling is
/// in float; OpenCV snaps positions to 1/32 px, so a pixel may differ by a grey level.
pub fn warp_affine(img: &RgbImage, m: &[[f32; 3]; 2], size: u32) -> RgbImage {
    let (a, b, c) = (m[0][0] as f64, m[0][1] as f64, m[0][2] as f64);
    let (d, e, f) = (m[1][0] as f64, m[1][1] as f64, m[1][2] as f64);
    let det = a * e - b * d;
    let det = if det.abs() < 1e-12 { 1e-12 } else { det };
    let (ia, ib, id, ie) = (e / det, -b / det, -d / det, a / det);
    RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f64 - c, y as f64 - f);
        let sx = ia * u + ib * v;
        let sy = id * u + ie * v;
        let p = sample_bilinear(img, sx as f32, sy as f32);
        image::Rgb(p.map(|c| c.round().clamp(0.0, 255.0) as u8))
    })
}

/// The 112x112 ArcFace crop of a face given its five key points.
pub fn norm_crop(img: &RgbImage, kps: &[[f32; 2]; 5]) -> RgbImage {
    warp_affine(img, &umeyama_similarity(kps, &ARCFACE_TEMPLATE), 112)
}
