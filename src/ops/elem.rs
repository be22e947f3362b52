//! The element types our training ops run in, and the matrix product they share.

use candle_core::{CpuStorage, Layout, Tensor, WithDType};

use super::attention::cpu as cpu_attention;
use super::autocast::Products;
use super::conv::{pack_weight_pairs_f32, run_packed, Geometry};
use super::conv_grad::{conv_forward_im2col, conv_transposed_flipped, flip_weight_into};
use super::geglu;
use super::packed_gemm::{self, PackedA, PackedB};

/// An operand of [`Elem::mm`]: element (i, j) at `data[i * rs + j * cs]`, one stride being 1.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Operand<'a, T> {
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }

    pub fn cols(data: &'a [T], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }
}

/// Element types the training kernels run in: f32 (the packed kernels where the CPU has them)
/// and f64 (the `gemm` crate; what the finite-difference tests check).
pub(crate) trait Elem: WithDType {
    /// `x <- exp(x - shift)` for `x <= shift` (softmax rows).
    fn exp_shifted(xs: &mut [Self], shift: Self) {
        for x in xs {
            *x = Self::from_f64((x.to_f64() - shift.to_f64()).exp());
        }
    }

    /// Exact-form GELU and its derivative `Phi(x) + x phi(x)`.
    fn gelu_and_grad(x: Self) -> (Self, Self) {
        let v = x.to_f64();
        let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (Self::from_f64(v * cdf), Self::from_f64(cdf + v * pdf))
    }

    /// The logistic function (SiLU's gate).
    fn sigmoid(x: Self) -> Self {
        Self::from_f64(1.0 / (1.0 + (-x.to_f64()).exp()))
    }

    /// `c = a b` (or `c += a b` with `accumulate`) for an m x k by k x n product into the
    /// row-major block `c` of row stride `ldc`, in parallel.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        m: usize,
        n: usize,
        k: usize,
        a: Operand<Self>,
        b: Operand<Self>,
        c: &mut [Self],
        ldc: usize,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        mm_gemm(m, n, k, a, b, c, ldc, accumulate)
    }

    /// [`Elem::mm`] multiplying as `products` says (only f32 has a bf16 form).
    #[allow(clippy::too_many_arguments)]
    fn mm_in(
        _products: Products,
        m: usize,
        n: usize,
        k: usize,
        a: Operand<Self>,
        b: Operand<Self>,
        c: &mut [Self],
        ldc: usize,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        Self::mm(m, n, k, a, b, c, ldc, accumulate)
    }

    /// [`Elem::conv_forward`] multiplying as `products` says (only f32 has a bf16 form).
    fn conv_forward_in(
        _products: Products,
        g: &Geometry,
        n: usize,
        x: &[Self],
        w: &[Self],
        bias: Option<&[Self]>,
    ) -> candle_core::Result<Vec<Self>> {
        Self::conv_forward(g, n, x, w, bias)
    }

    /// The stride-1 transposed convolution of `n` images as the forward one of geometry `gt`
    /// (the input gradient of a convolution whose weight `w` is `(gt.ci, gt.co, kh, kw)`):
    /// `w` flipped and its channels swapped.
    fn conv_transposed_in(
        products: Products,
        gt: &Geometry,
        n: usize,
        dy: &[Self],
        w: &[Self],
    ) -> candle_core::Result<Vec<Self>> {
        conv_transposed_flipped(products, gt, n, dy, w)
    }

    /// The forward convolution of `n` images, `w` row-major (co, ci * kh * kw).
    fn conv_forward(
        g: &Geometry,
        n: usize,
        x: &[Self],
        w: &[Self],
        bias: Option<&[Self]>,
    ) -> candle_core::Result<Vec<Self>> {
        conv_forward_im2col(g, n, x, w, bias)
    }
}

impl Elem for f64 {}

impl Elem for f32 {
    /// The forward value is `geglu::gelu_erf` (the inference kernel's arithmetic).
    #[inline(always)]
    fn gelu_and_grad(x: f32) -> (f32, f32) {
        let w = geglu::erfc_abs(x * std::f32::consts::FRAC_1_SQRT_2);
        // 1 + erf(x / sqrt 2), without cancellation on either side.
        let one_plus_erf = if x >= 0.0 { 2.0 - w } else { w };
        let cdf = 0.5 * one_plus_erf;
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let pdf = INV_SQRT_2PI * cpu_attention::exp_approx(-0.5 * x * x);
        (geglu::gelu_erf(x), cdf + x * pdf)
    }

    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        let e = cpu_attention::exp_approx(-x.abs());
        let s = 1.0 / (1.0 + e);
        if x >= 0.0 {
            s
        } else {
            e * s
        }
    }

    fn exp_shifted(xs: &mut [f32], shift: f32) {
        cpu_attention::exp_shifted(xs, shift)
    }

    #[allow(clippy::too_many_arguments)]
    fn mm(
        m: usize,
        n: usize,
        k: usize,
        a: Operand<f32>,
        b: Operand<f32>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        if !packed_gemm::available_f32() || m == 0 || n == 0 {
            return mm_gemm(m, n, k, a, b, c, ldc, accumulate);
        }
        let pa = if a.cs == 1 {
            PackedA::from_f32_rows_exact(a.data, m, k, a.rs)
        } else {
            // A transposed view (a weight, an output gradient read as dY^T).
            PackedA::from_f32_cols_exact(a.data, m, k, a.cs)
        };
        let pb = if b.cs == 1 {
            PackedB::from_f32_rows_exact(b.data, k, n, b.rs)
        } else {
            PackedB::from_f32_cols_exact(b.data, k, n, b.cs)
        };
        packed_gemm::matmul_parallel(&pa, &pb, c, ldc, accumulate).map_err(candle_core::Error::wrap)
    }

    #[allow(clippy::too_many_arguments)]
    fn mm_in(
        products: Products,
        m: usize,
        n: usize,
        k: usize,
        a: Operand<f32>,
        b: Operand<f32>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        if products != Products::Bf16 || !packed_gemm::available() || m == 0 || n == 0 {
            return Self::mm(m, n, k, a, b, c, ldc, accumulate);
        }
        let pa = if a.cs == 1 {
            PackedA::from_f32_rows(a.data, m, k, a.rs)
        } else {
            PackedA::from_f32_rows(&transpose(a.data, m, k, a.cs), m, k, k)
        };
        let pb = if b.cs == 1 {
            PackedB::from_f32_rows(b.data, k, n, b.rs)
        } else {
            PackedB::from_f32_cols(b.data, k, n, b.cs)
        };
        packed_gemm::matmul_parallel(&pa, &pb, c, ldc, accumulate).map_err(candle_core::Error::wrap)
    }

    fn conv_forward_in(
        products: Products,
        g: &Geometry,
        n: usize,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        if products != Products::Bf16 || !packed_gemm::available() {
            return Self::conv_forward(g, n, x, w, bias);
        }
        let pa = pack_weight_pairs_f32(w, [g.co, g.ci, g.kh * g.kw], false);
        run_packed(g, n, x, &pa, bias)
    }

    /// f32 products: the flipped weight is written straight into the kernel's packed operand.
    fn conv_transposed_in(
        products: Products,
        gt: &Geometry,
        n: usize,
        dy: &[f32],
        w: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let taps = gt.kh * gt.kw;
        if products == Products::Bf16 && packed_gemm::available() {
            let pa = pack_weight_pairs_f32(w, [gt.ci, gt.co, taps], true);
            return run_packed(gt, n, dy, &pa, None);
        }
        if products != Products::Exact || !packed_gemm::available_f32() {
            return conv_transposed_flipped(products, gt, n, dy, w);
        }
        let mut pa = PackedA::f32_in_buffer(Vec::new(), gt.co, gt.ci * taps);
        let (rows, ld) = pa.f32_rows_mut();
        flip_weight_into(w, [gt.ci, gt.co, taps], rows, ld);
        run_packed(gt, n, dy, &pa, None)
    }

    fn conv_forward(
        g: &Geometry,
        n: usize,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        if !packed_gemm::available_f32() {
            return conv_forward_im2col(g, n, x, w, bias);
        }
        let k = g.ci * g.kh * g.kw;
        let pa = PackedA::from_f32_rows_exact(w, g.co, k, k);
        run_packed(g, n, x, &pa, bias)
    }
}

/// The m x k matrix whose element (i, p) is `src[p * ld + i]`, row-major: 32 x 32 tiles, tiles
/// of rows in parallel.
fn transpose(src: &[f32], m: usize, k: usize, ld: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut out = vec![0f32; m * k];
    if m == 0 || k == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * k)
        .enumerate()
        .for_each(|(t, rows)| {
            let i0 = t * TILE;
            let n = rows.len() / k;
            for p0 in (0..k).step_by(TILE) {
                for p in p0..(p0 + TILE).min(k) {
                    for (r, &v) in src[p * ld + i0..p * ld + i0 + n].iter().enumerate() {
                        rows[r * k + p] = v;
                    }
                }
            }
        });
    out
}

/// [`Elem::mm`] through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_gemm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<T>,
    b: Operand<T>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
) -> candle_core::Result<()> {
    let span = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    if a.data.len() < span(m, k, a.rs, a.cs)
        || b.data.len() < span(k, n, b.rs, b.cs)
        || c.len() < span(m, n, ldc, 1)
    {
        candle_core::bail!("conv op: product operands shorter than {m} x {k} x {n}");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let one = T::from_f64(1.0);
    // SAFETY: the spans were checked above; `c` is borrowed exclusively.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            one,
            one,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads().max(1)),
        );
    }
    Ok(())
}

pub(crate) fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    if !l.is_contiguous() {
        candle_core::bail!("op: argument not contiguous");
    }
    Ok(&T::cpu_storage_as_slice(s)?[l.start_offset()..][..l.shape().elem_count()])
}

/// Runs `f` on the data of a contiguous CPU tensor of element type `T`.
pub(crate) fn with_data<T: Elem, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(slice(s, layout)?)),
        _ => candle_core::bail!("op: expected a CPU tensor"),
    }
}

/// candle's `CustomOp2` (without bias) and `CustomOp3` (with bias) for a CPU training op on an
/// input and a weight that has `fwd_storage(x, w, Option<bias>)` and
/// `backward(x, w, bias_tracks, dy) -> (dx, dw, db)` and a `sink` field (the weight-gradient
/// collector of its forward pass, which takes dw and db for the weights it collects); the bias
/// variant's name gets `-bias`.
macro_rules! weight_op_with_optional_bias {
    ($op:ty, $name:literal) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.fwd_storage((s1, l1), (s2, l2), None)
            }

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)>
            {
                let (dx, dw, _) = self.backward(x, w, false, dy)?;
                let sink = self.sink.as_deref();
                Ok((dx, $crate::ops::weight_grads::route(sink, w, dw)?))
            }
        }

        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                concat!($name, "-bias")
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.fwd_storage((s1, l1), (s2, l2), Some((s3, l3)))
            }

            #[allow(clippy::type_complexity)]
            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                b: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                let (dx, dw, db) = self.backward(x, w, b.track_op(), dy)?;
                let sink = self.sink.as_deref();
                Ok((
                    dx,
                    $crate::ops::weight_grads::route(sink, w, dw)?,
                    $crate::ops::weight_grads::route(sink, b, db)?,
                ))
            }
        }
    };
}
pub(crate) use weight_op_with_optional_bias;
