//! 2-D convolution for training on CUDA through cuDNN: forward, backward-data and
//! backward-filter, each a candle custom op whose `cuda_fwd` calls the cuDNN routine
//! ([`super::cudnn`], `cudnn` feature).
//!
//! candle 0.11's own backward for a CUDA convolution runs its direct `conv_transpose2d` kernel
//! for the input gradient (one thread per element, no cuDNN) and a convolution with the output
//! gradient as kernel for the weight gradient. Here the forward op's `bwd` applies two more
//! custom ops, [`BwdData`] (`cudnnConvolutionBackwardData`) and [`BwdFilter`]
//! (`cudnnConvolutionBackwardFilter`), so nothing of candle's convolution code is on the
//! training path. The bias is spread into the output before the convolution adds onto it
//! (beta = 1), and its gradient is a per-channel sum of the output gradient, in f32 for half
//! precision.
//!
//! The ops' `cpu_fwd` run the CPU training op's kernels (`ops::conv_grad`, f32 and f64), so the
//! CPU tests check the ops' wiring (arguments, shapes, which gradients, the bias sum) in every
//! build; the networks take the ops for CUDA tensors only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::super::autocast::Products;
use super::super::conv::Geometry;
use super::super::conv_grad::{conv_input_grad, conv_weight_grad};
use super::super::elem::{slice, Elem};

/// The forward op: geometry and batch size (x, w and the bias are contiguous, see [`conv2d`]).
#[derive(Debug, Clone, Copy)]
struct ConvOp {
    g: Geometry,
    n: usize,
}

/// An op's result on the CPU, through the CPU training op's kernels (f32, f64).
fn on_cpu(
    dt: DType,
    shape: Shape,
    f32s: impl FnOnce() -> candle_core::Result<Vec<f32>>,
    f64s: impl FnOnce() -> candle_core::Result<Vec<f64>>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    match dt {
        DType::F32 => Ok((f32::to_cpu_storage_owned(f32s()?), shape)),
        DType::F64 => Ok((f64::to_cpu_storage_owned(f64s()?), shape)),
        dt => candle_core::bail!("conv op: no CPU kernel for {dt:?}"),
    }
}

impl ConvOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.g.co, self.g.oh, self.g.ow))
    }

    fn cpu(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(
            op: &ConvOp,
            (xs, xl): (&CpuStorage, &Layout),
            (ws, wl): (&CpuStorage, &Layout),
            b: Option<(&CpuStorage, &Layout)>,
        ) -> candle_core::Result<Vec<T>> {
            let bias = b.map(|(s, l)| slice::<T>(s, l)).transpose()?;
            T::conv_forward(&op.g, op.n, slice(xs, xl)?, slice(ws, wl)?, bias)
        }
        let (x, w) = ((xs, xl), (ws, wl));
        on_cpu(
            xs.dtype(),
            self.out_shape(),
            || run::<f32>(self, x, w, b),
            || run::<f64>(self, x, w, b),
        )
    }

    #[cfg(feature = "cudnn")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        w: (&candle_core::CudaStorage, &Layout),
        b: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cudnn::forward_storage(&self.g, self.n, x, w, b)?;
        Ok((y, self.out_shape()))
    }

    /// Gradients of x, w and the bias, each only where its argument takes part in autograd;
    /// the gradient ops record nothing (no second-order graph).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: bool,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.detach().contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(&w.detach(), &BwdData(*self))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.detach().apply_op2_no_bwd(&dy, &BwdFilter(*self))?)
        } else {
            None
        };
        let db = if bias {
            let (n, co, p) = (self.n, self.g.co, self.g.oh * self.g.ow);
            let per_image = dy.reshape((n, co, p))?;
            Some(match dy.dtype() {
                DType::F16 | DType::BF16 => per_image
                    .to_dtype(DType::F32)?
                    .sum(2)?
                    .sum(0)?
                    .to_dtype(dy.dtype())?,
                _ => per_image.sum(2)?.sum(0)?,
            })
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, false, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, b.track_op(), dy)
    }
}

/// The input gradient as an op on (dy, w): `cudnnConvolutionBackwardData`.
struct BwdData(ConvOp);

impl BwdData {
    fn shape(&self) -> Shape {
        let ConvOp { g, n } = self.0;
        Shape::from((n, g.ci, g.h, g.w))
    }
}

impl CustomOp2 for BwdData {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        on_cpu(
            s1.dtype(),
            self.shape(),
            || conv_input_grad::<f32>(Products::Exact, &g, n, slice(s2, l2)?, slice(s1, l1)?),
            || conv_input_grad::<f64>(Products::Exact, &g, n, slice(s2, l2)?, slice(s1, l1)?),
        )
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        let dx = super::cudnn::backward_data_storage(&g, n, (s1, l1), (s2, l2))?;
        Ok((dx, self.shape()))
    }
}

/// The weight gradient as an op on (x, dy): `cudnnConvolutionBackwardFilter`.
struct BwdFilter(ConvOp);

impl BwdFilter {
    fn shape(&self) -> Shape {
        let g = self.0.g;
        Shape::from((g.co, g.ci, g.kh, g.kw))
    }
}

impl CustomOp2 for BwdFilter {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        on_cpu(
            s1.dtype(),
            self.shape(),
            || conv_weight_grad::<f32>(Products::Exact, &g, n, slice(s1, l1)?, slice(s2, l2)?),
            || conv_weight_grad::<f64>(Products::Exact, &g, n, slice(s1, l1)?, slice(s2, l2)?),
        )
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        let dw = super::cudnn::backward_filter_storage(&g, n, (s1, l1), (s2, l2))?;
        Ok((dw, self.shape()))
    }
}

/// `x.conv2d(w, ..)` (+ bias per output channel) as the ops of this module, for float tensors
/// of one dtype on one device with groups 1 (on the CPU f32 and f64 only, through the CPU
/// kernels: the tests' way to check the wiring); `None` where that does not hold or the shapes
/// do not fit (the caller's fallback then reports them).
pub fn conv2d_op(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    // Half precision only where cuDNN runs it (the CPU kernels take f32 and f64).
    let half = matches!(dtype, DType::F16 | DType::BF16) && x.device().is_cuda();
    let applies = groups == 1
        && stride > 0
        && dilation > 0
        && (matches!(dtype, DType::F32 | DType::F64) || half)
        && x.rank() == 4
        && w.rank() == 4
        && [Some(x), Some(w), bias]
            .iter()
            .flatten()
            .all(|t| t.dtype() == dtype && t.device().same_device(x.device()));
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
    let op = ConvOp { g, n };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(Some(match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    }))
}

/// [`conv2d_op`] for CUDA tensors through cuDNN both ways (the training path's convolution on
/// a GPU); `None` for other devices and in builds without the `cudnn` feature.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !cfg!(feature = "cudnn") || !x.device().is_cuda() {
        return Ok(None);
    }
    conv2d_op(x, w, bias, padding, stride, dilation, groups)
}
