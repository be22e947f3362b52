//! 2-D convolution with a faster CPU path than candle 0.11.1's.
//!
//! candle's CPU convolution first transposes the whole input to NHWC on one thread, gathers
//! 512-pixel patch tiles element by element and scatters each tile's result back: a 3x3 conv
//! at 64x64x320 reaches 66 GFLOP/s and one at 512x512x128 (the VAE decoder's last stage) 31,
//! where its own matmul on the same numbers reaches 108 (PyTorch: 158 and 126). Here each tile
//! of output rows builds its patch matrix from whole input-row runs in the weight's own
//! (c_in, ky, kx) order, one matmul writes straight into the NCHW output with the bias already
//! in place, and tiles run in parallel. Tensors that track gradients (f32, f64 on the CPU) take
//! `ops::conv_grad`'s custom op, with a backward pass on the same kernel; tracked CUDA tensors
//! take `ops::cuda::conv` (cuDNN both ways, `cudnn` feature); anything else (untracked GPU
//! tensors, CPU half precision, grouped convs) goes to candle unchanged.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use half::bf16;

use super::host::zeroed;
use super::host::{with_f32, SharedOut};
use super::linear::with_bf16;
use super::packed_gemm::{self, Kind, PackedA, PackedB, NR};

/// A bf16 tile's packed patches take about this many bytes: small enough to stay in L2 beside
/// the weight block while the kernel runs over them right after packing.
const TILE_PAIR_BYTES: usize = 512 << 10;

/// A tile's patch matrix holds at most this many floats (16 MiB).
const TILE_FLOATS: usize = 1 << 22;

/// Below this many output pixels a tile's matmul is too thin to be worth its own thread.
const MIN_TILE_PIXELS: usize = 256;

/// Drop-in for `candle_nn::Conv2d` (same weight names, same config).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: ConvWeight,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

#[derive(Debug, Clone)]
enum ConvWeight {
    Dense(Tensor),
    /// The weight only in the kernel's packed layout (packed once here instead of on every
    /// call; no second copy in memory), with its (co, ci, kh, kw) shape: bf16 in the CPU bf16
    /// mode, f32 otherwise.
    Packed(Arc<PackedA>, [usize; 4], Device),
}

impl Conv2d {
    /// A CPU weight that is not a training variable is packed for `ops::packed_gemm` where the CPU
    /// has the kernel (bf16: AVX-512 BF16; f32: AVX-512F).
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        let packed = Kind::for_weight(&weight, 4).and_then(|_| {
            let (co, ci, kh, kw) = weight.dims4().ok()?;
            let dims = [co, ci, kh, kw];
            let w = weight.contiguous().ok()?;
            let pa = match weight.dtype() {
                DType::BF16 => with_bf16(&w, |ws| pack_pair_order(ws, dims)).ok()?,
                _ => {
                    let k = ci * kh * kw;
                    with_f32(&w, |ws| PackedA::from_f32_rows_exact(ws, co, k, k)).ok()?
                }
            };
            Some((pa, dims))
        });
        let weight = match packed {
            Some((pa, dims)) => ConvWeight::Packed(Arc::new(pa), dims, weight.device().clone()),
            None => ConvWeight::Dense(weight),
        };
        Self { weight, bias, cfg }
    }

    /// The weight as a tensor; a packed one is unpacked into a new bf16 tensor.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            ConvWeight::Dense(w) => Ok(w.clone()),
            ConvWeight::Packed(pa, dims, dev) => match pa.kind() {
                Kind::Bf16Pairs => {
                    Tensor::from_vec(unpack_pair_order(pa, *dims), dims.to_vec(), dev)
                }
                Kind::F32 => Tensor::from_vec(pa.to_f32_rows(), dims.to_vec(), dev),
            },
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> &Conv2dConfig {
        &self.cfg
    }
}

impl From<candle_nn::Conv2d> for Conv2d {
    fn from(inner: candle_nn::Conv2d) -> Self {
        Self::new(
            inner.weight().clone(),
            inner.bias().cloned(),
            *inner.config(),
        )
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let c = self.config();
        if let ConvWeight::Packed(pa, dims, _) = &self.weight {
            if c.groups == 1 {
                let packed = PackedWeight { a: pa, dims: *dims };
                if let Some(y) = conv2d_cpu_with(
                    x,
                    Prepared::Packed(packed),
                    self.bias(),
                    c.padding,
                    c.stride,
                    c.dilation,
                )? {
                    return Ok(y);
                }
            }
        }
        conv2d_forward(
            x,
            &self.weight()?,
            self.bias(),
            c.padding,
            c.stride,
            c.dilation,
            c.groups,
        )
    }
}

/// `x.conv2d(w, ..)` (+ bias per output channel) through the fast path where it applies.
pub fn conv2d_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    if let Some(y) = conv2d_cpu(x, w, bias, padding, stride, dilation, groups)? {
        return Ok(y);
    }
    // With gradient tracking: our op with its own backward pass (f32, f64 on the CPU).
    if super::train_ops_enabled() {
        if let Some(y) = super::conv_grad::conv2d(x, w, bias, padding, stride, dilation, groups)? {
            return Ok(y);
        }
        // CUDA tensors that track: cuDNN forward, backward-data and backward-filter.
        #[cfg(feature = "cudnn")]
        if x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op()) {
            let y = super::cuda::conv::conv2d(x, w, bias, padding, stride, dilation, groups)?;
            if let Some(y) = y {
                return Ok(y);
            }
        }
    }
    let x = if x.track_op() && stride > 1 {
        even_out_remainders(x, w, padding, stride, dilation)?
    } else {
        x.clone()
    };
    // The CPU bf16 mode's weight with an input its kernel does not take (tracked, another
    // dtype): candle's convolution with the weight in the input's dtype, as `Linear` does.
    let w = if w.dtype() == DType::BF16 && x.dtype() != DType::BF16 {
        w.to_dtype(x.dtype())?
    } else {
        w.clone()
    };
    let y = x.conv2d(&w, padding, stride, dilation, groups)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// candle 0.11.1's conv2d backward derives the transposed convolution's output padding from the
/// height alone and applies it to both axes, so a strided convolution whose height and width
/// leave different remainders (rows no window reaches) fails in the backward pass with a shape
/// error. Zero rows or columns appended where no window reaches leave the output unchanged and
/// equalise the remainders; their gradient is dropped by the padding's own backward.
fn even_out_remainders(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let rem = |size: usize, k: usize| {
        (size + 2 * padding)
            .checked_sub(dilation * (k.max(1) - 1) + 1)
            .map(|span| span % stride)
    };
    match (rem(h, kh), rem(wd, kw)) {
        (Some(rh), Some(rw)) if rh > rw => x.pad_with_zeros(3, 0, rh - rw),
        (Some(rh), Some(rw)) if rw > rh => x.pad_with_zeros(2, 0, rw - rh),
        _ => Ok(x.clone()),
    }
}

/// The fast path, or `None` where it does not apply.
pub fn conv2d_cpu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Option<Tensor>> {
    if groups != 1 {
        return Ok(None);
    }
    conv2d_cpu_with(x, Prepared::Tensor(w), bias, padding, stride, dilation)
}

/// A weight packed for the bf16 kernel, with its (co, ci, kh, kw) shape.
#[derive(Clone, Copy)]
struct PackedWeight<'a> {
    a: &'a PackedA,
    dims: [usize; 4],
}

/// The weight as the caller holds it.
#[derive(Clone, Copy)]
enum Prepared<'a> {
    Tensor(&'a Tensor),
    Packed(PackedWeight<'a>),
}

fn conv2d_cpu_with(
    x: &Tensor,
    w: Prepared,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> candle_core::Result<Option<Tensor>> {
    // A bf16 weight with f32 activations is the CPU bf16 mode (`weights::bf16_matmul_weights`).
    let (bf16, dims, weight_ok) = match w {
        Prepared::Tensor(w) => {
            let bf16 = w.dtype() == DType::BF16 && packed_gemm::available();
            let dtype_ok = w.dtype() == DType::F32 || bf16;
            let ok = w.device().is_cpu() && dtype_ok && !w.track_op() && w.rank() == 4;
            let dims = w
                .dims4()
                .map(|(a, b, c, d)| [a, b, c, d])
                .unwrap_or_default();
            (bf16, dims, ok)
        }
        Prepared::Packed(p) => (p.a.kind() == Kind::Bf16Pairs, p.dims, true),
    };
    let applies = stride > 0
        && dilation > 0
        && weight_ok
        && [Some(x), bias]
            .iter()
            .flatten()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op());
    if !applies {
        return Ok(None);
    }
    let (n, ci, h, wd) = x.dims4()?;
    let [co, ci_w, kh, kw] = dims;
    if ci != ci_w || kh == 0 || kw == 0 || bias.is_some_and(|b| b.elem_count() != co) {
        // Let candle report the mismatch in its own words.
        return Ok(None);
    }
    let Some(geo) = Geometry::new([ci, h, wd], [co, kh, kw], padding, stride, dilation) else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let b = bias.map(|b| b.contiguous()).transpose()?;
    let owned;
    let weights = match w {
        Prepared::Packed(p) => Weights::Packed(p.a),
        Prepared::Tensor(w) if bf16 => {
            let w = w.contiguous()?;
            owned = with_bf16(&w, |ws| pack_pair_order(ws, dims))?;
            Weights::Packed(&owned)
        }
        Prepared::Tensor(w) => Weights::F32(w.contiguous()?),
    };
    let out = with_f32(&x, |xs| match &b {
        Some(b) => with_f32(b, |bs| run(&geo, n, xs, &weights, Some(bs))),
        None => Ok(run(&geo, n, xs, &weights, None)),
    })???;
    Ok(Some(Tensor::from_vec(
        out,
        (n, geo.co, geo.oh, geo.ow),
        x.device(),
    )?))
}

/// One image's convolution shape (also used by the training op in `ops::conv_grad`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) ci: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) co: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) pad: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
}

impl Geometry {
    /// The geometry of a (c_in, h, w) input under (c_out, kh, kw) kernels; `None` when the
    /// kernel's reach exceeds the padded input (no output pixel).
    pub(crate) fn new(
        [ci, h, w]: [usize; 3],
        [co, kh, kw]: [usize; 3],
        pad: usize,
        stride: usize,
        dilation: usize,
    ) -> Option<Self> {
        let span = |size: usize, k: usize| (size + 2 * pad).checked_sub(dilation * (k - 1) + 1);
        Some(Self {
            ci,
            h,
            w,
            co,
            kh,
            kw,
            oh: span(h, kh)? / stride + 1,
            ow: span(w, kw)? / stride + 1,
            pad,
            stride,
            dilation,
        })
    }

    fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }

    /// A 1x1 stride-1 unpadded conv reads the input as its patch matrix directly.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Fills `col` (`[k, rows x ow]`, row-major) with the patches of output rows `r0..r1`.
    fn im2col(&self, x: &[f32], r0: usize, r1: usize, col: &mut [f32]) {
        let np = (r1 - r0) * self.ow;
        let mut row = 0;
        for c in 0..self.ci {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let dst = &mut col[row * np..(row + 1) * np];
                    self.fill_row(plane, ky, kx, r0, r1, dst);
                    row += 1;
                }
            }
        }
    }

    /// One patch-matrix row: tap (ky, kx) of one input plane over output rows `r0..r1`.
    fn fill_row(&self, plane: &[f32], ky: usize, kx: usize, r0: usize, r1: usize, dst: &mut [f32]) {
        let (ow, s) = (self.ow, self.stride);
        let off_x = (kx * self.dilation) as isize - self.pad as isize;
        // Output columns whose input column is inside the plane: ox in [lo, hi).
        let first_in = |ox: usize| ox as isize * s as isize + off_x;
        let lo = (0..ow).find(|&ox| first_in(ox) >= 0).unwrap_or(ow);
        let hi = (lo..ow)
            .find(|&ox| first_in(ox) >= self.w as isize)
            .unwrap_or(ow);
        for (i, oy) in (r0..r1).enumerate() {
            let d = &mut dst[i * ow..(i + 1) * ow];
            let iy = (oy * s + ky * self.dilation) as isize - self.pad as isize;
            if iy < 0 || iy >= self.h as isize || lo >= hi {
                d.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
            d[..lo].fill(0.0);
            d[hi..].fill(0.0);
            let x0 = first_in(lo) as usize;
            if s == 1 {
                d[lo..hi].copy_from_slice(&src[x0..x0 + (hi - lo)]);
            } else {
                for (j, v) in d[lo..hi].iter_mut().enumerate() {
                    *v = src[x0 + j * s];
                }
            }
        }
    }
}

/// A convolution's weight as its kernel wants it.
enum Weights<'a> {
    /// For the `gemm` crate.
    F32(Tensor),
    /// For `ops::packed_gemm` (bf16 pairs in pair order, or f32), packed by the layer or once per call.
    Packed(&'a PackedA),
}

/// The convolution of `n` images; tiles of output rows write disjoint parts of the output.
fn run(
    g: &Geometry,
    n: usize,
    x: &[f32],
    w: &Weights<'_>,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let w = match w {
        Weights::Packed(pa) => return run_packed(g, n, x, pa, bias),
        Weights::F32(w) => w,
    };
    let (k, p) = (g.k(), g.oh * g.ow);
    let mut out = zeroed(n * g.co * p, 0f32);
    if out.is_empty() {
        return Ok(out);
    }
    let threads = rayon::current_num_threads().max(1);
    // Tiles of at most TILE_FLOATS patches, at least MIN_TILE_PIXELS outputs where the image
    // allows, and at least two per thread where that leaves them big enough.
    let max_rows = (TILE_FLOATS / (k * g.ow).max(1)).clamp(1, g.oh);
    let min_rows = MIN_TILE_PIXELS.div_ceil(g.ow).clamp(1, g.oh);
    let slack_rows = g.oh.div_ceil((2 * threads).div_ceil(n));
    let rows_per_tile = slack_rows.max(min_rows).min(max_rows);
    let tiles_per_image = g.oh.div_ceil(rows_per_tile);
    let tiles: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| {
            (0..tiles_per_image).map(move |t| {
                let r0 = t * rows_per_tile;
                (b, r0, (r0 + rows_per_tile).min(g.oh))
            })
        })
        .collect();
    // Few tiles: parallelise inside each matmul instead of across tiles.
    let inner = if tiles.len() >= 2 * threads {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let dst = SharedOut::new(&mut out);
    let tile =
        |&(b, r0, r1): &(usize, usize, usize), col: &mut Vec<f32>| -> candle_core::Result<()> {
            let np = (r1 - r0) * g.ow;
            let xb = &x[b * g.ci * g.h * g.w..(b + 1) * g.ci * g.h * g.w];
            let (rhs, rhs_rs) = if g.pointwise() {
                (xb[r0 * g.ow..].as_ptr(), p as isize)
            } else {
                col.resize(k * np, 0.0);
                g.im2col(xb, r0, r1, col);
                (col.as_ptr(), np as isize)
            };
            // SAFETY: the tile's output block is rows 0..co of image b at pixels r0*ow..r1*ow:
            // inside `out`, and no other tile touches it. Operand pointers cover m x k and k x n.
            unsafe {
                let d = dst.get().add(b * g.co * p + r0 * g.ow);
                if let Some(bias) = bias {
                    for (c, &v) in bias.iter().enumerate() {
                        std::slice::from_raw_parts_mut(d.add(c * p), np).fill(v);
                    }
                }
                with_f32(w, |w| {
                    gemm::gemm(
                        g.co,
                        np,
                        k,
                        d,
                        1,
                        p as isize,
                        bias.is_some(),
                        w.as_ptr(),
                        1,
                        k as isize,
                        rhs,
                        1,
                        rhs_rs,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        inner,
                    )
                })
            }
        };
    if matches!(inner, gemm::Parallelism::None) {
        tiles
            .par_iter()
            .try_for_each_init(Vec::new, |col, t| tile(t, col))?;
    } else {
        let mut col = Vec::new();
        tiles.iter().try_for_each(|t| tile(t, &mut col))?;
    }
    Ok(out)
}

/// The weight as the bf16 kernel's left operand in pair order: depth index
/// `((c / 2) * taps + tap) * 2 + c % 2`, a missing odd last channel zero. A pair row of the patch
/// matrix is then one tap of two neighbouring channels, which [`run_bf16`] copies from an image
/// converted to channel pairs once instead of converting every patch.
fn pack_pair_order(w: &[bf16], [co, ci, kh, kw]: [usize; 4]) -> PackedA {
    let taps = kh * kw;
    let k = 2 * ci.div_ceil(2) * taps;
    let mut rows = vec![bf16::ZERO; co * k];
    for (o, row) in rows.chunks_exact_mut(k.max(1)).enumerate().take(co) {
        for c in 0..ci {
            for t in 0..taps {
                row[((c / 2) * taps + t) * 2 + c % 2] = w[(o * ci + c) * taps + t];
            }
        }
    }
    PackedA::from_bf16_rows(&rows, co, k, k)
}

/// [`pack_pair_order`] from an f32 (co, ci, taps) weight, rounded to bf16 as it is reordered
/// (the training ops pack their changing weights on every call), written straight into the
/// packed operand. With `flipped`, the operand of the transposed convolution (the input
/// gradient's): ci rows of depth co x taps, each output channel's taps reversed.
pub(crate) fn pack_weight_pairs_f32(
    w: &[f32],
    [co, ci, taps]: [usize; 3],
    flipped: bool,
) -> PackedA {
    use super::packed_gemm::{bits, pair};
    // A pair of channels' tap lines as one line of k-pair words.
    let put = |lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32], rev: bool| {
        for (t, d) in dst.iter_mut().enumerate().take(taps) {
            let s = if rev { taps - 1 - t } else { t };
            *d = pair(bits(lo[s]), hi.map_or(0, |h| bits(h[s])));
        }
    };
    if !flipped {
        let k = 2 * ci.div_ceil(2) * taps;
        return PackedA::bf16_pairs_by_blocks(co, k, 1, |o, row, _| {
            let src = &w[o * ci * taps..(o + 1) * ci * taps];
            for (c2, dst) in row.chunks_exact_mut(taps).take(ci.div_ceil(2)).enumerate() {
                let lo = &src[2 * c2 * taps..][..taps];
                let hi = (2 * c2 + 1 < ci).then(|| &src[(2 * c2 + 1) * taps..][..taps]);
                put(lo, hi, dst, false);
            }
        });
    }
    // Rows are input channels; a block of them reads runs of BLOCK x taps weights per output
    // channel instead of one cache line per (output, input) pair.
    const BLOCK: usize = 16;
    let k = 2 * co.div_ceil(2) * taps;
    PackedA::bf16_pairs_by_blocks(ci, k, BLOCK, |c0, rows, stride| {
        let nc = rows.len() / stride;
        for o2 in 0..co.div_ceil(2) {
            let lo = &w[(2 * o2 * ci + c0) * taps..][..nc * taps];
            let hi = (2 * o2 + 1 < co).then(|| &w[((2 * o2 + 1) * ci + c0) * taps..][..nc * taps]);
            for j in 0..nc {
                let dst = &mut rows[j * stride + o2 * taps..][..taps];
                let hi = hi.map(|h| &h[j * taps..(j + 1) * taps]);
                put(&lo[j * taps..(j + 1) * taps], hi, dst, true);
            }
        }
    })
}

/// Words per column of a packed patch matrix of `depth`.
fn pa_words(kind: Kind, depth: usize) -> usize {
    match kind {
        Kind::Bf16Pairs => depth.div_ceil(2),
        Kind::F32 => depth,
    }
}

/// The inverse of [`pack_pair_order`]: the (co, ci, kh, kw) weight, row-major.
fn unpack_pair_order(pa: &PackedA, [co, ci, kh, kw]: [usize; 4]) -> Vec<bf16> {
    let taps = kh * kw;
    let k = 2 * ci.div_ceil(2) * taps;
    let rows = pa.to_bf16_rows();
    let mut w = vec![bf16::ZERO; co * ci * taps];
    for o in 0..co {
        for c in 0..ci {
            for t in 0..taps {
                w[(o * ci + c) * taps + t] = rows[o * k + ((c / 2) * taps + t) * 2 + c % 2];
            }
        }
    }
    w
}

/// The convolution of `n` images through `ops::packed_gemm`. Each image is converted once into planes
/// (bf16: of channel pairs; f32: of channels) with a zero border of the padding's width, so a
/// tile's patch matrix is plain copies of plane rows in the kernel's layout; tiles are runs of
/// output pixels small enough that the packed patches stay in cache for the product, which
/// goes to a compact scratch and then, with the bias, into the NCHW output.
pub(crate) fn run_packed(
    g: &Geometry,
    n: usize,
    x: &[f32],
    pa: &PackedA,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let p = g.oh * g.ow;
    let len = n * g.co * p;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return Ok(out);
    }
    let taps = g.kh * g.kw;
    let kind = pa.kind();
    // Planes per image, and the patch matrix's depth.
    let (planes, depth) = match kind {
        Kind::Bf16Pairs => (g.ci.div_ceil(2), 2 * g.ci.div_ceil(2) * taps),
        Kind::F32 => (g.ci, g.ci * taps),
    };
    if pa.depth() != depth || pa.rows() != g.co {
        candle_core::bail!(
            "conv: packed weight is {} x {}, the geometry wants {} x {depth}",
            pa.rows(),
            pa.depth(),
            g.co
        );
    }
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let plane = hp * wp;
    let mut plane_img = zeroed(n * planes * plane, 0u32);
    plane_img
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, dst)| {
            let (b, cp) = (i / planes, i % planes);
            let img = &x[b * g.ci * g.h * g.w..(b + 1) * g.ci * g.h * g.w];
            let chan = |c: usize| &img[c * g.h * g.w..(c + 1) * g.h * g.w];
            for y in 0..g.h {
                let row = &mut dst[(y + g.pad) * wp + g.pad..][..g.w];
                let src = y * g.w..(y + 1) * g.w;
                match kind {
                    Kind::Bf16Pairs => {
                        let hi = (2 * cp + 1 < g.ci).then(|| &chan(2 * cp + 1)[src.clone()]);
                        packed_gemm::interleave_pairs(&chan(2 * cp)[src], hi, row)
                    }
                    Kind::F32 => row.copy_from_slice(bytemuck::cast_slice(&chan(cp)[src])),
                }
            }
        });

    let threads = rayon::current_num_threads().max(1);
    let cols = (TILE_PAIR_BYTES / (4 * pa_words(kind, depth)).max(1)) / NR * NR;
    let cols = cols.clamp(NR, 64 * NR).min(p);
    let per_image = p.div_ceil(cols);
    let tiles: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| (0..per_image).map(move |t| (b, t * cols, ((t + 1) * cols).min(p))))
        .collect();
    // Few tiles: parallelise inside each product instead of across tiles.
    let across = tiles.len() >= 2 * threads;
    let dst = SharedOut::from_ptr(out.as_mut_ptr());
    let (s, d) = (g.stride, g.dilation);
    let tile = |&(b, q0, q1): &(usize, usize, usize),
                (packed, prod, gather): &mut (Vec<u32>, Vec<f32>, Vec<u32>)|
     -> candle_core::Result<()> {
        let nt = q1 - q0;
        let mut pb = PackedB::in_buffer(std::mem::take(packed), kind, depth, nt);
        let img = &plane_img[b * planes * plane..(b + 1) * planes * plane];
        for cp in 0..planes {
            let pl = &img[cp * plane..(cp + 1) * plane];
            for t in 0..taps {
                let (ky, kx) = (t / g.kw, t % g.kw);
                let unit_row = cp * taps + t;
                let mut q = q0;
                while q < q1 {
                    let (oy, ox) = (q / g.ow, q % g.ow);
                    let run = (g.ow - ox).min(q1 - q);
                    let start = (oy * s + ky * d) * wp + kx * d + ox * s;
                    if s == 1 {
                        pb.put_pairs(unit_row, q - q0, &pl[start..start + run]);
                    } else {
                        gather.clear();
                        gather.extend((0..run).map(|i| pl[start + i * s]));
                        pb.put_pairs(unit_row, q - q0, gather);
                    }
                    q += run;
                }
            }
        }
        prod.resize(g.co * nt, 0.0);
        let product = if across {
            packed_gemm::matmul(pa, &pb, prod, nt, false)
        } else {
            packed_gemm::matmul_parallel(pa, &pb, prod, nt, false)
        };
        *packed = pb.into_buffer();
        product.map_err(candle_core::Error::wrap)?;
        for (c, src) in prod.chunks_exact(nt).enumerate() {
            let add = bias.map_or(0.0, |bs| bs[c]);
            // SAFETY: channel c's pixels q0..q1 of image b lie inside `out`'s capacity, and no
            // other tile writes them; written through the pointer, as they are not initialised.
            unsafe {
                let o = dst.get().add((b * g.co + c) * p + q0);
                for (i, &v) in src.iter().enumerate() {
                    o.add(i).write(v + add);
                }
            }
        }
        Ok(())
    };
    let scratch = || (Vec::new(), Vec::new(), Vec::new());
    if across {
        tiles
            .par_iter()
            .try_for_each_init(scratch, |sc, t| tile(t, sc))?;
    } else {
        let mut sc = scratch();
        tiles.iter().try_for_each(|t| tile(t, &mut sc))?;
    }
    // SAFETY: the tiles cover every pixel of every channel of every image, each written once.
    unsafe { out.set_len(len) };
    Ok(out)
}
