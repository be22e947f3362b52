//! The cuDNN calls of the CUDA training convolution (`ops::cuda::conv`): forward,
//! backward-data and backward-filter on candle's CUDA storages.
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
use candle_core::{DType, Layout, Shape, WithDType};
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

/// A dense operand's data (the ops take contiguous tensors, see `conv::conv2d`).
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

/// [`forward`] for the storage's dtype.
pub(super) fn forward_storage(
    g: &Geometry,
    n: usize,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<CudaStorage> {
    by_dtype!(x.0.dtype(), forward(g, n, x, w, b))
}

/// [`backward_data`] for the storage's dtype.
pub(super) fn backward_data_storage(
    g: &Geometry,
    n: usize,
    dy: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    by_dtype!(dy.0.dtype(), backward_data(g, n, dy, w))
}

/// [`backward_filter`] for the storage's dtype.
pub(super) fn backward_filter_storage(
    g: &Geometry,
    n: usize,
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    by_dtype!(x.0.dtype(), backward_filter(g, n, x, dy))
}
