//! 2-D convolution for training on CUDA through cuDNN: forward, backward-data and
//! backward-filter, each a candle custom op whose `cuda_fwd` calls the cuDNN routine.
//!
//! candle 0.11's own backward for a CUDA convolution runs its direct `conv_transpose2d` kernel
//! for the input gradient (one thread per element, no cuDNN) and a convolution with the output
//! gradient as kernel for the weight gradient. Here the forward op's `bwd` applies two more
//! custom ops, [`BwdData`] (`cudnnConvolutionBackwardData`) and [`BwdFilter`]
//! (`cudnnConvolutionBackwardFilter`), so nothing of candle's convolution code is on the
//! training path. The bias is written into the output before the convolution adds onto it
//! (beta = 1), and its gradient is a per-channel sum of the output gradient, in f32 for half
//! precision.
//!
//! f32 uses cuDNN's plain FMA math unless candle's reduced-precision f32 GEMM flag is set (then
//! TF32 tensor cores), so f32 training keeps the precision of candle's cuBLAS matmuls; f16 and
//! bf16 run on tensor cores with f32 accumulation (cuDNN's pseudo-half configurations).
//! Algorithms come from cuDNN's heuristics (`cudnnGet*Algorithm_v7`, the first pick), as
//! PyTorch does without `benchmark`, else algorithm 0 (implicit GEMM, the most general); their
//! workspace is allocated per call from candle's stream-ordered pool.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::ops::conv::Geometry;

thread_local! {
    /// cuDNN handles are neither Send nor Sync: one per thread and device (as candle keeps its
    /// own), bound to the device's stream so the calls order with candle's kernels.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// An element type cuDNN convolves, with the type it accumulates in.
trait Elem:
    CudnnDataType + DeviceRepr + ValidAsZeroBits + CudaDType + WithDType + Copy + 'static
{
    type Compute: CudnnDataType;
    fn math() -> sys::cudnnMathType_t;
}

impl Elem for f32 {
    type Compute = f32;
    fn math() -> sys::cudnnMathType_t {
        if candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }
}

impl Elem for f64 {
    type Compute = f64;
    fn math() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    }
}

impl Elem for f16 {
    type Compute = f32;
    fn math() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

impl Elem for bf16 {
    type Compute = f32;
    fn math() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

/// The descriptors of one convolution of `n` images: input, filter, output, and the
/// convolution itself.
struct Descs<T: Elem> {
    conv: ConvDescriptor<T::Compute>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn int(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("cudnn conv: {v} exceeds i32")))
}

impl<T: Elem> Descs<T> {
    fn new(cudnn: &Arc<Cudnn>, g: &Geometry, n: usize) -> candle_core::Result<Self> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let (pad, stride, dil) = (int(g.pad)?, int(g.stride)?, int(g.dilation)?);
        let mut conv = cudnn.create_conv2d::<T::Compute>(
            [pad, pad],
            [stride, stride],
            [dil, dil],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        conv.set_math_type(T::math())?;
        let n = int(n)?;
        Ok(Self {
            conv,
            x: cudnn.create_4d_tensor::<T>(NCHW, [n, int(g.ci)?, int(g.h)?, int(g.w)?])?,
            w: cudnn
                .create_4d_filter::<T>(NCHW, [int(g.co)?, int(g.ci)?, int(g.kh)?, int(g.kw)?])?,
            y: cudnn.create_4d_tensor::<T>(NCHW, [n, int(g.co)?, int(g.oh)?, int(g.ow)?])?,
        })
    }
}

/// A workspace of `bytes` (at least one, so there is always a buffer to hand over).
fn workspace(dev: &CudaDevice, bytes: usize) -> candle_core::Result<CudaSlice<u8>> {
    // SAFETY: scratch space cuDNN writes before it reads.
    unsafe { dev.alloc::<u8>(bytes.max(1)) }
}

/// A dense operand's data (the ops take contiguous tensors, see [`conv2d`]).
fn dense<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("cudnn conv: operands must be contiguous");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// A fresh (uninitialised) output of `len` elements.
fn output<T: Elem>(dev: &CudaDevice, len: usize) -> candle_core::Result<CudaStorage> {
    // SAFETY: every element is written by the cuDNN call (beta = 0: cuDNN does not read it).
    let s = unsafe { dev.alloc::<T>(len)? };
    Ok(CudaStorage::wrap_cuda_slice(s, dev.clone()))
}

/// Dispatches on the storage's dtype.
macro_rules! by_dtype {
    ($dt:expr, $f:ident ( $($arg:expr),* )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            dt => candle_core::bail!("cudnn conv: no kernel for {dt:?}"),
        }
    };
}

/// `y = conv(x, w) (+ bias)` through `cudnnConvolutionForward`.
fn forward<T: Elem>(
    g: &Geometry,
    n: usize,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<CudaStorage> {
    let dev = &xs.device;
    let cudnn = handle(dev)?;
    let d = Descs::<T>::new(&cudnn, g, n)?;
    let (x, w) = (dense::<T>(xs, xl)?, dense::<T>(ws, wl)?);
    // The bias spread over images and pixels first (a strided read of the bias through
    // candle's affine kernel, times 1 plus 0); the convolution then adds onto it (beta = 1).
    let (mut y, beta) = match bias {
        Some((bs, bl)) => {
            if !bl.is_contiguous() {
                candle_core::bail!("cudnn conv: bias must be contiguous");
            }
            let spread = Layout::new(
                Shape::from((n, g.co, g.oh, g.ow)),
                vec![0, 1, 0, 0],
                bl.start_offset(),
            );
            (bs.affine(&spread, 1.0, 0.0)?, T::from_f64(1.0))
        }
        None => (output::<T>(dev, n * g.co * g.oh * g.ow)?, T::from_f64(0.0)),
    };
    let op = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    };
    // cuDNN's first heuristic pick, else its most general algorithm (the heuristics can
    // rank an unsupported one first for unusual configurations).
    let algo = op
        .pick_algorithm()
        .unwrap_or(sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
    let mut ws = workspace(dev, op.get_workspace_size(algo)?)?;
    // SAFETY: the descriptors describe exactly these buffers (dense, checked above).
    unsafe {
        op.launch(
            algo,
            Some(&mut ws),
            (T::from_f64(1.0), beta),
            &x,
            &w,
            y.as_cuda_slice_mut::<T>()?,
        )?;
    }
    Ok(y)
}

/// `dx` from the output gradient and the weight through `cudnnConvolutionBackwardData`.
fn backward_data<T: Elem>(
    g: &Geometry,
    n: usize,
    (dys, dyl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let dev = &dys.device;
    let cudnn = handle(dev)?;
    let d = Descs::<T>::new(&cudnn, g, n)?;
    let (dy, w) = (dense::<T>(dys, dyl)?, dense::<T>(ws, wl)?);
    let mut dx = output::<T>(dev, n * g.ci * g.h * g.w)?;
    let op = ConvBackwardData {
        conv: &d.conv,
        dx: &d.x,
        w: &d.w,
        dy: &d.y,
    };
    // cuDNN's first heuristic pick, else its most general algorithm (the heuristics can
    // rank an unsupported one first for unusual configurations).
    let algo = op
        .pick_algorithm()
        .unwrap_or(sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0);
    let mut work = workspace(dev, op.get_workspace_size(algo)?)?;
    // SAFETY: as in `forward`; beta = 0 writes every element of dx.
    unsafe {
        op.launch(
            algo,
            Some(&mut work),
            (T::from_f64(1.0), T::from_f64(0.0)),
            dx.as_cuda_slice_mut::<T>()?,
            &w,
            &dy,
        )?;
    }
    Ok(dx)
}

/// `dw` (summed over the images) from the input and the output gradient through
/// `cudnnConvolutionBackwardFilter`.
fn backward_filter<T: Elem>(
    g: &Geometry,
    n: usize,
    (xs, xl): (&CudaStorage, &Layout),
    (dys, dyl): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let dev = &xs.device;
    let cudnn = handle(dev)?;
    let d = Descs::<T>::new(&cudnn, g, n)?;
    let (x, dy) = (dense::<T>(xs, xl)?, dense::<T>(dys, dyl)?);
    let mut dw = output::<T>(dev, g.co * g.ci * g.kh * g.kw)?;
    let op = ConvBackwardFilter {
        conv: &d.conv,
        x: &d.x,
        dw: &d.w,
        dy: &d.y,
    };
    // cuDNN's first heuristic pick, else its most general algorithm (the heuristics can
    // rank an unsupported one first for unusual configurations).
    let algo = op
        .pick_algorithm()
        .unwrap_or(sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0);
    let mut work = workspace(dev, op.get_workspace_size(algo)?)?;
    // SAFETY: as in `forward`; beta = 0 writes every element of dw.
    unsafe {
        op.launch(
            algo,
            Some(&mut work),
            (T::from_f64(1.0), T::from_f64(0.0)),
            &x,
            dw.as_cuda_slice_mut::<T>()?,
            &dy,
        )?;
    }
    Ok(dw)
}

/// The forward op: geometry and batch size (x, w and the bias are contiguous, see [`conv2d`]).
#[derive(Debug, Clone, Copy)]
struct ConvOp {
    g: Geometry,
    n: usize,
}

impl ConvOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.g.co, self.g.oh, self.g.ow))
    }

    fn fwd(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = by_dtype!(x.0.dtype(), forward(&self.g, self.n, x, w, b))?;
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
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv: CUDA tensors only (the CPU has ops::conv_grad)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
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
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv: CUDA tensors only (the CPU has ops::conv_grad)")
    }

    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
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

impl CustomOp2 for BwdData {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv: CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        let dx = by_dtype!(s1.dtype(), backward_data(&g, n, (s1, l1), (s2, l2)))?;
        Ok((dx, Shape::from((n, g.ci, g.h, g.w))))
    }
}

/// The weight gradient as an op on (x, dy): `cudnnConvolutionBackwardFilter`.
struct BwdFilter(ConvOp);

impl CustomOp2 for BwdFilter {
    fn name(&self) -> &'static str {
        "mcld-cudnn-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv: CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ConvOp { g, n } = self.0;
        let dw = by_dtype!(s1.dtype(), backward_filter(&g, n, (s1, l1), (s2, l2)))?;
        Ok((dw, Shape::from((g.co, g.ci, g.kh, g.kw))))
    }
}

/// `x.conv2d(w, ..)` (+ bias per output channel) through cuDNN with a cuDNN backward pass, for
/// CUDA tensors of one float dtype with groups 1; `None` where that does not hold or the shapes
/// do not fit (the caller's fallback then reports them).
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
        && matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
        && x.rank() == 4
        && w.rank() == 4
        && [Some(x), Some(w), bias]
            .iter()
            .flatten()
            .all(|t| t.device().is_cuda() && t.dtype() == dtype)
        && w.device().same_device(x.device())
        && bias.is_none_or(|b| b.device().same_device(x.device()));
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
