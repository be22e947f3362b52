//! Telea inpainting (OpenCV 4.8 INPAINT_TELEA), used by the texture maps.
//!
//! The reference textures were made with OpenCV 4.8.1, whose fast-marching code has quirks that
//! later versions changed (4.10 reads different neighbours at the border, see opencv#28648), so
//! this follows the 4.8 behaviour step by step: the same padded grids, the same narrow band, the
//! same priority-queue order (smallest distance first, first-in first-out among equal distances),
//! the same mix of single and double precision (C's `fabs`/`sqrt` take doubles) and the same
//! border clamping of neighbour reads. With that,
//! results are byte-identical to `cv2.inpaint(img, mask, 3, cv2.INPAINT_TELEA)` of 4.8.1.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use image::{GrayImage, RgbImage};

use crate::{Error, Result};

/// Known pixel outside the narrow band.
const KNOWN: u8 = 0;
/// Narrow band: known, on the front.
const BAND: u8 = 1;
/// Still to be filled.
const INSIDE: u8 = 2;
/// Marks pixels reached by the outward march, whose distances are negated afterwards.
const CHANGE: u8 = 3;

/// Distance value of pixels the march has not reached.
const FAR: f32 = 1.0e6;

/// Queue entry; `BinaryHeap` is a max-heap, so the order is reversed: the smallest distance pops
/// first and, among equal distances, the earliest push (OpenCV keeps a sorted list and inserts a
/// new element after all elements with a distance <= its own).
#[derive(Clone, Copy)]
struct Entry {
    t: f32,
    seq: u32,
    idx: u32,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // `partial_cmp` treats -0.0 and 0.0 as equal, as C's `>` does.
        let by_t = other.t.partial_cmp(&self.t).unwrap_or(Ordering::Equal);
        by_t.then_with(|| other.seq.cmp(&self.seq))
    }
}

/// OpenCV's sorted-list priority queue, as a heap with an insertion counter for ties.
#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Entry>,
    seq: u32,
}

impl Queue {
    fn push(&mut self, idx: usize, t: f32) {
        // Each pixel is pushed at most once per queue and `inpaint_telea` caps the pixel count
        // at u32, so neither counter can wrap.
        self.heap.push(Entry {
            t,
            seq: self.seq,
            idx: idx as u32,
        });
        self.seq += 1;
    }
    fn pop(&mut self) -> Option<usize> {
        self.heap.pop().map(|e| e.idx as usize)
    }
}

/// The padded (one-pixel ring) grids that OpenCV works on.
struct Grid {
    /// Padded width and height.
    ew: usize,
    eh: usize,
}

impl Grid {
    #[inline]
    fn at(&self, i: usize, j: usize) -> usize {
        i * self.ew + j
    }
}

/// OpenCV's `FastMarching_solve`: the upwind update from two neighbours, in double precision.
#[inline]
fn solve(flags: &[u8], t: &[f32], a: usize, b: usize) -> f32 {
    let a11 = t[a] as f64;
    let a22 = t[b] as f64;
    let m12 = a11.min(a22);
    let sol = if flags[a] != INSIDE {
        if flags[b] != INSIDE {
            if (a11 - a22).abs() >= 1.0 {
                1.0 + m12
            } else {
                (a11 + a22 + (2.0 - (a11 - a22) * (a11 - a22)).sqrt()) * 0.5
            }
        } else {
            1.0 + a11
        }
    } else if flags[b] != INSIDE {
        1.0 + a22
    } else {
        1.0 + m12
    };
    sol as f32
}

/// Distance at padded index `p` from its four neighbours (OpenCV's `min4` of four solves).
#[inline]
fn distance(g: &Grid, flags: &[u8], t: &[f32], p: usize) -> f32 {
    let (up, down, left, right) = (p - g.ew, p + g.ew, p - 1, p + 1);
    let a = solve(flags, t, up, left);
    let b = solve(flags, t, down, left);
    let c = solve(flags, t, up, right);
    let d = solve(flags, t, down, right);
    a.min(b).min(c.min(d))
}

/// The four neighbours in OpenCV's visiting order: up, left, down, right.
#[inline]
fn neighbours(g: &Grid, p: usize) -> [usize; 4] {
    [p - g.ew, p - 1, p + g.ew, p + 1]
}

/// OpenCV's `icvCalcFMM` with `negate`: marches outwards from the band over `flags` and then
/// negates the distances of everything it reached, so outside pixels get T <= 0.
fn march_outwards(g: &Grid, flags: &mut [u8], t: &mut [f32], queue: &mut Queue) {
    while let Some(p) = queue.pop() {
        flags[p] = CHANGE;
        for q in neighbours(g, p) {
            if flags[q] == INSIDE {
                let d = distance(g, flags, t, q);
                t[q] = d;
                flags[q] = BAND;
                queue.push(q, d);
            }
        }
    }
    for (f, tv) in flags.iter_mut().zip(t.iter_mut()) {
        if *f == CHANGE {
            *f = KNOWN;
            *tv = -*tv;
        }
    }
}

/// Per-offset constants of the radius-`range` disc: offset, r = (centre - neighbour) and the
/// distance weight 1/|r|^3.
struct Offset {
    di: isize,
    dj: isize,
    rx: f32,
    ry: f32,
    dst: f32,
}

fn disc(range: isize) -> Vec<Offset> {
    let mut v = Vec::new();
    for dk in -range..=range {
        for dl in -range..=range {
            if dl * dl + dk * dk > range * range {
                continue;
            }
            // r = (i - k, j - l) = -(dk, dl); the centre gives 1/0 = inf as in OpenCV, but the
            // centre is never a known neighbour.
            let ry = -dk as f32;
            let rx = -dl as f32;
            let len2 = rx * rx + ry * ry;
            let dst = (1.0 / (len2 as f64 * (len2 as f64).sqrt())) as f32;
            v.push(Offset {
                di: dk,
                dj: dl,
                rx,
                ry,
                dst,
            });
        }
    }
    v
}

/// `cv2.inpaint(image, mask, radius, cv2.INPAINT_TELEA)` of OpenCV 4.8 for 8-bit images with 1 or
/// 3 interleaved channels (row-major, `width * height * channels` bytes). Nonzero mask pixels are
/// filled; every other pixel is returned unchanged. Channels are filled independently with the
/// same geometry, so RGB and BGR give the same result.
pub fn inpaint_telea(
    image: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    mask: &[u8],
    radius: f64,
) -> Result<Vec<u8>> {
    run(image, width, height, channels, mask, radius, None)
}

/// [`inpaint_telea`] that stops as soon as every masked pixel that is nonzero in `needed` is
/// filled; masked pixels filled by then have exactly the bytes of a full run (the march order up
/// to that point does not depend on what comes after), the rest keep their input values. The
/// texture maps keep only pixels near known texels, which the march reaches early.
pub fn inpaint_telea_needed(
    image: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    mask: &[u8],
    radius: f64,
    needed: &[u8],
) -> Result<Vec<u8>> {
    if needed.len() != width * height {
        return Err(Error::msg(format!(
            "telea inpainting: needed-pixel mask has {} bytes but the image is {width}x{height}",
            needed.len()
        )));
    }
    run(image, width, height, channels, mask, radius, Some(needed))
}

fn run(
    image: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    mask: &[u8],
    radius: f64,
    needed: Option<&[u8]>,
) -> Result<Vec<u8>> {
    if channels != 1 && channels != 3 {
        return Err(Error::msg(format!(
            "telea inpainting: {channels} channels given, only 1 or 3 are supported"
        )));
    }
    if image.len() != width * height * channels {
        return Err(Error::msg(format!(
            "telea inpainting: image has {} bytes, expected {width}x{height}x{channels}",
            image.len()
        )));
    }
    if mask.len() != width * height {
        return Err(Error::msg(format!(
            "telea inpainting: mask has {} bytes but the image is {width}x{height}",
            mask.len()
        )));
    }
    if !radius.is_finite() {
        return Err(Error::msg(format!(
            "telea inpainting: radius {radius} is not finite"
        )));
    }
    if (width + 2)
        .checked_mul(height + 2)
        .is_none_or(|n| n > u32::MAX as usize)
    {
        return Err(Error::msg(format!(
            "telea inpainting: {width}x{height} is too large"
        )));
    }
    let mut out = image.to_vec();
    if width == 0 || height == 0 || mask.iter().all(|&m| m == 0) {
        return Ok(out);
    }
    // cvRound, then OpenCV's clamp to [1, 100].
    let range = (radius.round_ties_even() as isize).clamp(1, 100);
    let g = Grid {
        ew: width + 2,
        eh: height + 2,
    };
    let n = g.ew * g.eh;

    // Mask grid with the ring left KNOWN.
    let mut flags = vec![KNOWN; n];
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] != 0 {
                flags[g.at(y + 1, x + 1)] = INSIDE;
            }
        }
    }
    // Narrow band: the cross-dilation of the mask minus the mask, ring excluded.
    let mut band = vec![false; n];
    for i in 1..g.eh - 1 {
        for j in 1..g.ew - 1 {
            let p = g.at(i, j);
            if flags[p] != INSIDE && neighbours(&g, p).iter().any(|&q| flags[q] == INSIDE) {
                band[p] = true;
            }
        }
    }
    let mut t = vec![FAR; n];
    for p in 0..n {
        if band[p] {
            t[p] = 0.0;
        }
    }

    // Outside ring: within `range` (square) of the mask, neither mask nor band, ring excluded.
    let r = range as usize;
    let mut near_rows = vec![false; n];
    for i in 0..g.eh {
        for j in 0..g.ew {
            let lo = j.saturating_sub(r);
            let hi = (j + r).min(g.ew - 1);
            near_rows[g.at(i, j)] = (lo..=hi).any(|jj| flags[g.at(i, jj)] == INSIDE);
        }
    }
    let mut outer = vec![KNOWN; n];
    for i in 1..g.eh - 1 {
        for j in 1..g.ew - 1 {
            let p = g.at(i, j);
            if flags[p] == INSIDE || band[p] {
                continue;
            }
            let lo = i.saturating_sub(r);
            let hi = (i + r).min(g.eh - 1);
            if (lo..=hi).any(|ii| near_rows[g.at(ii, j)]) {
                outer[p] = INSIDE;
            }
        }
    }

    let mut queue = Queue::default();
    for (p, &b) in band.iter().enumerate() {
        if b {
            queue.push(p, 0.0);
        }
    }
    march_outwards(&g, &mut outer, &mut t, &mut queue);

    // Padded-grid marks of the masked pixels the caller needs, and how many there are.
    let mut wanted = vec![false; if needed.is_some() { n } else { 0 }];
    let mut remaining = usize::MAX;
    if let Some(needed) = needed {
        remaining = 0;
        for y in 0..height {
            for x in 0..width {
                if needed[y * width + x] != 0 && mask[y * width + x] != 0 {
                    wanted[g.at(y + 1, x + 1)] = true;
                    remaining += 1;
                }
            }
        }
        if remaining == 0 {
            return Ok(out);
        }
    }

    let mut queue = Queue::default();
    for (p, &b) in band.iter().enumerate() {
        if b {
            queue.push(p, 0.0);
        }
    }
    fill(
        &g,
        &mut flags,
        &mut t,
        &mut out,
        width,
        height,
        channels,
        &disc(range),
        &mut queue,
        (&wanted, remaining),
    );
    Ok(out)
}

/// OpenCV's `icvTeleaInpaintFMM`: march inwards, filling each pixel as it is reached.
#[allow(clippy::too_many_arguments)]
fn fill(
    g: &Grid,
    flags: &mut [u8],
    t: &mut [f32],
    out: &mut [u8],
    width: usize,
    height: usize,
    channels: usize,
    offsets: &[Offset],
    queue: &mut Queue,
    (wanted, mut remaining): (&[bool], usize),
) {
    let (ew, eh) = (g.ew as isize, g.eh as isize);
    let (w1, h1) = (width as isize - 1, height as isize - 1);
    // OpenCV reads out of bounds on 1-pixel-wide images; clamping keeps us in bounds there and
    // changes nothing for larger images.
    let cy = |v: isize| v.clamp(0, h1) as usize;
    let cx = |v: isize| v.clamp(0, w1) as usize;
    let px = |y: usize, x: usize, c: usize| out_idx(y, x, c, width, channels);
    let mut near: Vec<(usize, isize, isize, usize)> = Vec::with_capacity(offsets.len());
    let mut lev: Vec<f64> = Vec::with_capacity(offsets.len());
    while let Some(pp) = queue.pop() {
        flags[pp] = KNOWN;
        for p in neighbours(g, pp) {
            let i = (p / g.ew) as isize;
            let j = (p % g.ew) as isize;
            if i <= 0 || j <= 0 || i > eh - 1 || j > ew - 1 || flags[p] != INSIDE {
                continue;
            }
            let dist = distance(g, flags, t, p);
            t[p] = dist;

            let known = |q: usize| flags[q] != INSIDE;
            let grad_t_x = match (known(p + 1), known(p - 1)) {
                (true, true) => (t[p + 1] - t[p - 1]) * 0.5,
                (true, false) => t[p + 1] - t[p],
                (false, true) => t[p] - t[p - 1],
                (false, false) => 0.0,
            };
            let grad_t_y = match (known(p + g.ew), known(p - g.ew)) {
                (true, true) => (t[p + g.ew] - t[p - g.ew]) * 0.5,
                (true, false) => t[p + g.ew] - t[p],
                (false, true) => t[p] - t[p - g.ew],
                (false, false) => 0.0,
            };

            let mut ia = [0f32; 3];
            let mut jx = [0f32; 3];
            let mut jy = [0f32; 3];
            let mut s = 1.0e-20f32;
            // First the known neighbours and their level-set weights, so that the divisions
            // run back to back (they dominate the cost otherwise).
            near.clear();
            lev.clear();
            for (oi, o) in offsets.iter().enumerate() {
                let k = i + o.di;
                let l = j + o.dj;
                if !(k > 0 && l > 0 && k < eh - 1 && l < ew - 1) {
                    continue;
                }
                let q = (k as usize) * g.ew + l as usize;
                if known(q) {
                    near.push((oi, k, l, q));
                    // C's double `fabs` promotes the float difference to double.
                    lev.push((t[q] - t[p]).abs() as f64);
                }
            }
            for v in lev.iter_mut() {
                *v = 1.0 / (1.0 + *v);
            }
            for (&(oi, k, l, q), &lev) in near.iter().zip(lev.iter()) {
                let o = &offsets[oi];
                // OpenCV's clamped image coordinates of the neighbour and its own neighbours.
                let km = k - 1 + (k == 1) as isize;
                let kp = k - 1 - (k == eh - 2) as isize;
                let lm = l - 1 + (l == 1) as isize;
                let lp = l - 1 - (l == ew - 2) as isize;

                let lev = lev as f32;
                let mut dir = o.rx * grad_t_x + o.ry * grad_t_y;
                if (dir.abs() as f64) <= 0.01 {
                    dir = 0.000001;
                }
                let w = (o.dst * lev * dir).abs();

                // Byte offsets of the value read and of the two ends of each gradient, with
                // the gradient's factor; a missing gradient reads the same byte twice (0.0).
                let (ykm, ykp, xlm, xlp) = (cy(km), cy(kp), cx(lm), cx(lp));
                let at = |y: usize, x: usize| (y * width + x) * channels;
                let centre = at(ykm, xlm);
                let (gxa, gxb, gxf) = match (known(q + 1), known(q - 1)) {
                    (true, true) => (at(ykm, cx(lp + 1)), at(ykm, cx(lm - 1)), 2.0f32),
                    (true, false) => (at(ykm, cx(lp + 1)), centre, 1.0),
                    (false, true) => (at(ykm, xlp), at(ykm, cx(lm - 1)), 1.0),
                    (false, false) => (centre, centre, 1.0),
                };
                let (gya, gyb, gyf) = match (known(q + g.ew), known(q - g.ew)) {
                    (true, true) => (at(cy(kp + 1), xlm), at(cy(km - 1), xlm), 2.0f32),
                    (true, false) => (at(cy(kp + 1), xlm), centre, 1.0),
                    (false, true) => (at(ykp, xlm), at(cy(km - 1), xlm), 1.0),
                    (false, false) => (centre, centre, 1.0),
                };
                for c in 0..channels {
                    let gx = (out[gxa + c] as i32 - out[gxb + c] as i32) as f32 * gxf;
                    let gy = (out[gya + c] as i32 - out[gyb + c] as i32) as f32 * gyf;
                    ia[c] += w * out[centre + c] as f32;
                    jx[c] -= w * (gx * o.rx);
                    jy[c] -= w * (gy * o.ry);
                }
                // The weight sum is the same for every channel.
                s += w;
            }
            let (y, x) = ((i - 1) as usize, (j - 1) as usize);
            for c in 0..channels {
                let norm = ((jx[c] * jx[c] + jy[c] * jy[c]) as f64).sqrt() + 1.0e-20f32 as f64;
                let sat = ((ia[c] / s) as f64 + (jx[c] + jy[c]) as f64 / norm + 0.5) as f32;
                out[px(y, x, c)] = saturate_u8(sat);
            }
            flags[p] = BAND;
            queue.push(p, dist);
            if wanted.get(p) == Some(&true) {
                remaining -= 1;
                if remaining == 0 {
                    return;
                }
            }
        }
    }
}

#[inline]
fn out_idx(y: usize, x: usize, c: usize, width: usize, channels: usize) -> usize {
    (y * width + x) * channels + c
}

/// `cv::saturate_cast<uchar>(float)`: round half to even, then clamp (NaN gives 0).
#[inline]
fn saturate_u8(v: f32) -> u8 {
    let r = v.round_ties_even();
    if r.is_nan() {
        0
    } else {
        r.clamp(0.0, 255.0) as u8
    }
}

/// [`inpaint_telea`] on an RGB image.
pub fn inpaint_rgb(image: &RgbImage, mask: &GrayImage, radius: f64) -> Result<RgbImage> {
    check_sizes(image.dimensions(), mask.dimensions())?;
    let (w, h) = image.dimensions();
    let data = inpaint_telea(
        image.as_raw(),
        w as usize,
        h as usize,
        3,
        mask.as_raw(),
        radius,
    )?;
    RgbImage::from_raw(w, h, data).ok_or_else(|| Error::msg("telea inpainting: bad buffer size"))
}

/// [`inpaint_telea`] on a single-channel image.
pub fn inpaint_gray(image: &GrayImage, mask: &GrayImage, radius: f64) -> Result<GrayImage> {
    check_sizes(image.dimensions(), mask.dimensions())?;
    let (w, h) = image.dimensions();
    let data = inpaint_telea(
        image.as_raw(),
        w as usize,
        h as usize,
        1,
        mask.as_raw(),
        radius,
    )?;
    GrayImage::from_raw(w, h, data).ok_or_else(|| Error::msg("telea inpainting: bad buffer size"))
}

fn check_sizes(image: (u32, u32), mask: (u32, u32)) -> Result<()> {
    if image != mask {
        return Err(Error::msg(format!(
            "telea inpainting: image is {}x{} but mask is {}x{}",
            image.0, image.1, mask.0, mask.1
        )));
    }
    Ok(())
}
