//! 2-D convolution as a candle custom op with a backward pass of our own, for training on the
//! CPU.
//!
//! With gradient tracking candle 0.11 runs its own slow convolution forward and, in the backward
//! pass, a transposed convolution for the input gradient and a convolution with the output
//! gradient as kernel for the weight gradient (together most of a training step). Here:
//! - forward: the packed kernel inference uses (`conv::run_packed`, f32 on AVX-512F), the weight
//!   packed per call since it changes every step;
//! - input gradient: for stride 1, the forward kernel run on the output gradient with the weight
//!   transposed (channels swapped) and flipped, padded by `dilation * (k - 1) - padding`, which
//!   is the transposed convolution as a plain one; otherwise the product of the transposed weight
//!   with the output gradient (the patch gradients) scattered back by col2im;
//! - weight gradient: the product of the output gradient with the patches (im2col), tile by
//!   tile into one accumulator;
//! - bias gradient: a sum over images and pixels.
//!
//! The same code runs in f64 (through the `gemm` crate) so it can be checked against finite
//! differences; f32 on a CPU without AVX-512F takes the `gemm` crate too.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::autocast::Products;
use super::conv::Geometry;
use super::elem::{slice, weight_op_with_optional_bias, with_data, Elem, Operand};
use super::host::{grow_zeroed, zeroed};
use super::weight_grads::{self, WeightGrads};

/// A tile's patch matrix holds at most this many values (8 MiB of f32).
const TILE_VALUES: usize = 1 << 21;

/// Output rows per tile so that a tile's patches stay within [`TILE_VALUES`].
fn rows_per_tile(g: &Geometry) -> usize {
    let k = g.ci * g.kh * g.kw;
    (TILE_VALUES / (k * g.ow).max(1)).clamp(1, g.oh.max(1))
}

/// Patch row `(c, ky, kx)` reads input `(iy, ix)` for output `(oy, ox)`, or nothing (padding).
#[inline]
fn source(g: &Geometry, o: usize, k: usize, size: usize) -> Option<usize> {
    let i = (o * g.stride + k * g.dilation).checked_sub(g.pad)?;
    (i < size).then_some(i)
}

/// The patches of output rows `r0..r1` of one image (`x`: ci planes) as a `[k, np]` matrix.
fn im2col<T: Elem>(g: &Geometry, x: &[T], r0: usize, r1: usize, col: &mut [T]) {
    let np = (r1 - r0) * g.ow;
    let taps = g.kh * g.kw;
    let plane = g.h * g.w;
    col.par_chunks_mut(taps * np)
        .enumerate()
        .for_each(|(c, rows)| {
            let src = &x[c * plane..(c + 1) * plane];
            for (t, dst) in rows.chunks_exact_mut(np).enumerate() {
                let (ky, kx) = (t / g.kw, t % g.kw);
                for (i, oy) in (r0..r1).enumerate() {
                    let d = &mut dst[i * g.ow..(i + 1) * g.ow];
                    match source(g, oy, ky, g.h) {
                        None => d.fill(T::zero()),
                        Some(iy) => {
                            let line = &src[iy * g.w..(iy + 1) * g.w];
                            for (ox, v) in d.iter_mut().enumerate() {
                                *v = source(g, ox, kx, g.w).map_or(T::zero(), |ix| line[ix]);
                            }
                        }
                    }
                }
            }
        });
}

/// The inverse scatter of [`im2col`]: patch gradients of output rows `r0..r1` added into the
/// input gradient `dx` (ci planes of one image).
fn col2im<T: Elem>(g: &Geometry, col: &[T], r0: usize, r1: usize, dx: &mut [T]) {
    let np = (r1 - r0) * g.ow;
    let taps = g.kh * g.kw;
    let plane = g.h * g.w;
    dx.par_chunks_mut(plane).enumerate().for_each(|(c, dst)| {
        let rows = &col[c * taps * np..(c + 1) * taps * np];
        for (t, src) in rows.chunks_exact(np).enumerate() {
            let (ky, kx) = (t / g.kw, t % g.kw);
            for (i, oy) in (r0..r1).enumerate() {
                let Some(iy) = source(g, oy, ky, g.h) else {
                    continue;
                };
                let line = &mut dst[iy * g.w..(iy + 1) * g.w];
                for (ox, &v) in src[i * g.ow..(i + 1) * g.ow].iter().enumerate() {
                    if let Some(ix) = source(g, ox, kx, g.w) {
                        line[ix] += v;
                    }
                }
            }
        }
    });
}

/// The forward convolution by im2col and [`Elem::mm`] (f64, and f32 without AVX-512F).
pub(crate) fn conv_forward_im2col<T: Elem>(
    g: &Geometry,
    n: usize,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
) -> candle_core::Result<Vec<T>> {
    let (k, p) = (g.ci * g.kh * g.kw, g.oh * g.ow);
    let mut out = zeroed(n * g.co * p, T::zero());
    let rows = rows_per_tile(g);
    let mut col = Vec::new();
    for b in 0..n {
        let xb = &x[b * g.ci * g.h * g.w..(b + 1) * g.ci * g.h * g.w];
        let ob = &mut out[b * g.co * p..(b + 1) * g.co * p];
        if let Some(bias) = bias {
            for (c, plane) in ob.chunks_exact_mut(p.max(1)).enumerate() {
                plane.fill(bias[c]);
            }
        }
        let mut r0 = 0;
        while r0 < g.oh {
            let r1 = (r0 + rows).min(g.oh);
            let np = (r1 - r0) * g.ow;
            grow_zeroed(&mut col, k * np, T::zero());
            im2col(g, xb, r0, r1, &mut col);
            T::mm(
                g.co,
                np,
                k,
                Operand::rows(w, k),
                Operand::rows(&col, np),
                &mut ob[r0 * g.ow..],
                p,
                bias.is_some(),
            )?;
            r0 = r1;
        }
    }
    Ok(out)
}

/// The weight of the transposed convolution: row `c` (an input channel of `w`, which is
/// `(co, ci, taps)`) holds `w[o][c][taps - 1 - t]` at `o * taps + t`, rows `ld` apart in `dst`
/// (rows past `ci` are left alone). Blocks of input channels, so that each reads runs of
/// `FLIP_BLOCK * taps` weights per output channel rather than one cache line per channel pair.
pub(crate) fn flip_weight_into<T: Copy + Send + Sync>(
    w: &[T],
    [co, ci, taps]: [usize; 3],
    dst: &mut [T],
    ld: usize,
) {
    const FLIP_BLOCK: usize = 16;
    dst.par_chunks_mut(FLIP_BLOCK * ld)
        .enumerate()
        .for_each(|(blk, rows)| {
            let c0 = blk * FLIP_BLOCK;
            let nc = FLIP_BLOCK.min(ci.saturating_sub(c0));
            if nc == 0 {
                return;
            }
            for o in 0..co {
                let src = &w[(o * ci + c0) * taps..(o * ci + c0 + nc) * taps];
                for (j, s) in src.chunks_exact(taps).enumerate() {
                    let d = &mut rows[j * ld + o * taps..j * ld + (o + 1) * taps];
                    for (dv, sv) in d.iter_mut().rev().zip(s) {
                        *dv = *sv;
                    }
                }
            }
        });
}

/// [`Elem::conv_transposed_in`] for any element type: the flipped weight, then the forward op.
pub(crate) fn conv_transposed_flipped<T: Elem>(
    products: Products,
    gt: &Geometry,
    n: usize,
    dy: &[T],
    w: &[T],
) -> candle_core::Result<Vec<T>> {
    let taps = gt.kh * gt.kw;
    let k = gt.ci * taps;
    let mut wt = zeroed(gt.co * k, T::zero());
    flip_weight_into(w, [gt.ci, gt.co, taps], &mut wt, k);
    T::conv_forward_in(products, gt, n, dy, &wt, None)
}

/// The input gradient of `n` images from the output gradient `dy`.
pub(crate) fn conv_input_grad<T: Elem>(
    products: Products,
    g: &Geometry,
    n: usize,
    w: &[T],
    dy: &[T],
) -> candle_core::Result<Vec<T>> {
    let taps = g.kh * g.kw;
    let k = g.ci * taps;
    // Stride 1 with a square kernel: the transposed convolution is the forward one with the
    // weight flipped and its channels swapped.
    let flip_pad = (g.dilation * (g.kh - 1)).checked_sub(g.pad);
    if let (1, true, Some(pad)) = (g.stride, g.kh == g.kw, flip_pad) {
        let gt = Geometry {
            ci: g.co,
            h: g.oh,
            w: g.ow,
            co: g.ci,
            kh: g.kh,
            kw: g.kw,
            oh: g.h,
            ow: g.w,
            pad,
            stride: 1,
            dilation: g.dilation,
        };
        return T::conv_transposed_in(products, &gt, n, dy, w);
    }
    // Otherwise: patch gradients (w^T dy) per tile, scattered back.
    let p = g.oh * g.ow;
    let mut dx = zeroed(n * g.ci * g.h * g.w, T::zero());
    let rows = rows_per_tile(g);
    let mut col = Vec::new();
    for b in 0..n {
        let dyb = &dy[b * g.co * p..(b + 1) * g.co * p];
        let dxb = &mut dx[b * g.ci * g.h * g.w..(b + 1) * g.ci * g.h * g.w];
        let mut r0 = 0;
        while r0 < g.oh {
            let r1 = (r0 + rows).min(g.oh);
            let np = (r1 - r0) * g.ow;
            grow_zeroed(&mut col, k * np, T::zero());
            T::mm_in(
                products,
                k,
                np,
                g.co,
                Operand::cols(w, k),
                Operand::rows(&dyb[r0 * g.ow..], p),
                &mut col,
                np,
                false,
            )?;
            col2im(g, &col, r0, r1, dxb);
            r0 = r1;
        }
    }
    Ok(dx)
}

/// The weight gradient `(co, ci * kh * kw)` summed over `n` images: output gradient times the
/// patches, tile by tile.
pub(crate) fn conv_weight_grad<T: Elem>(
    products: Products,
    g: &Geometry,
    n: usize,
    x: &[T],
    dy: &[T],
) -> candle_core::Result<Vec<T>> {
    let (k, p) = (g.ci * g.kh * g.kw, g.oh * g.ow);
    let mut dw = zeroed(g.co * k, T::zero());
    let rows = rows_per_tile(g);
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
    let mut col = Vec::new();
    let mut first = true;
    for b in 0..n {
        let xb = &x[b * g.ci * g.h * g.w..(b + 1) * g.ci * g.h * g.w];
        let dyb = &dy[b * g.co * p..(b + 1) * g.co * p];
        let mut r0 = 0;
        while r0 < g.oh {
            let r1 = (r0 + rows).min(g.oh);
            let np = (r1 - r0) * g.ow;
            // A pointwise convolution's patches are the input itself.
            let patches = if pointwise {
                Operand::cols(&xb[r0 * g.ow..], p)
            } else {
                grow_zeroed(&mut col, k * np, T::zero());
                im2col(g, xb, r0, r1, &mut col);
                Operand::cols(&col[..], np)
            };
            T::mm_in(
                products,
                g.co,
                k,
                np,
                Operand::rows(&dyb[r0 * g.ow..], p),
                patches,
                &mut dw,
                k,
                !first,
            )?;
            first = false;
            r0 = r1;
        }
    }
    Ok(dw)
}

/// The bias gradient: the output gradient summed per channel (in f64).
fn conv_bias_grad<T: Elem>(co: usize, n: usize, p: usize, dy: &[T]) -> Vec<T> {
    (0..co)
        .into_par_iter()
        .map(|c| {
            let s: f64 = (0..n)
                .map(|b| {
                    dy[(b * co + c) * p..(b * co + c + 1) * p]
                        .iter()
                        .map(|v| v.to_f64())
                        .sum::<f64>()
                })
                .sum();
            T::from_f64(s)
        })
        .collect()
}

/// The custom op: its geometry and batch size (the arguments are contiguous, see [`conv2d`]).
#[derive(Debug, Clone)]
struct ConvOp {
    g: Geometry,
    n: usize,
    products: Products,
    sink: Option<Arc<WeightGrads>>,
}

impl ConvOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.g.co, self.g.oh, self.g.ow))
    }

    fn forward<T: Elem>(
        &self,
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = T::conv_forward_in(self.products, &self.g, self.n, x, w, b)?;
        Ok((T::to_cpu_storage_owned(y), self.out_shape()))
    }

    fn fwd_storage(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match x.0.dtype() {
            DType::F32 => self.forward::<f32>(
                slice(x.0, x.1)?,
                slice(w.0, w.1)?,
                b.map(|(s, l)| slice(s, l)).transpose()?,
            ),
            DType::F64 => self.forward::<f64>(
                slice(x.0, x.1)?,
                slice(w.0, w.1)?,
                b.map(|(s, l)| slice(s, l)).transpose()?,
            ),
            dt => candle_core::bail!("conv op: no kernel for {dt:?}"),
        }
    }

    /// Gradients of x, w and the bias, each only where its argument takes part in autograd.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: bool,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.backward_t::<f32>(x, w, bias, dy),
            DType::F64 => self.backward_t::<f64>(x, w, bias, dy),
            dt => candle_core::bail!("conv op: no kernel for {dt:?}"),
        }
    }

    fn backward_t<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: bool,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, n, dev) = (&self.g, self.n, x.device());
        let dy = dy.contiguous()?;
        with_data::<T, _>(&dy, |dys| {
            let dx = if x.track_op() {
                let v = with_data::<T, _>(w, |ws| conv_input_grad(self.products, g, n, ws, dys))??;
                Some(Tensor::from_vec(v, x.shape(), dev)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let v = with_data::<T, _>(x, |xs| conv_weight_grad(self.products, g, n, xs, dys))??;
                Some(Tensor::from_vec(v, w.shape(), dev)?)
            } else {
                None
            };
            let db = if bias {
                let v = conv_bias_grad(g.co, n, g.oh * g.ow, dys);
                Some(Tensor::from_vec(v, g.co, dev)?)
            } else {
                None
            };
            Ok((dx, dw, db))
        })?
    }
}

weight_op_with_optional_bias!(ConvOp, "mcld-conv2d");

/// `x.conv2d(w, ..)` (+ bias per output channel) as the custom op, for f32 and f64 CPU tensors
/// with groups 1; `None` where that does not hold or the shapes do not fit (the caller's
/// fallback then reports them).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    let applies = groups == 1
        && stride > 0
        && dilation > 0
        && matches!(dtype, DType::F32 | DType::F64)
        && x.rank() == 4
        && w.rank() == 4
        && [Some(x), Some(w), bias]
            .iter()
            .flatten()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype);
    if !applies {
        return Ok(None);
    }
    let (n, ci, h, wd) = x.dims4()?;
    let (co, ci_w, kh, kw) = w.dims4()?;
    if ci != ci_w || kh == 0 || kw == 0 || bias.is_some_and(|b| b.dims() != [co]) {
        return Ok(None);
    }
    let Some(g) = Geometry::new([ci, h, wd], [co, kh, kw], padding, stride, dilation) else {
        return Ok(None);
    };
    let op = ConvOp {
        g,
        n,
        products: Products::current(),
        sink: weight_grads::current(),
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(Some(match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    }))
}
