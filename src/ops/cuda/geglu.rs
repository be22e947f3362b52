//! GEGLU (`a * gelu(g)` over the halves `[a | g]` of the feed-forward's projection) for
//! training on CUDA, in candle tensor ops with a backward pass of its own.
//!
//! Composed, autograd keeps `gelu(g)` beside the projection and builds the GELU's derivative
//! from primitives plus two zero-padded full-width gradients. Here only the projection is kept
//! and the backward pass forms `dh = [dy gelu(g) | dy a gelu'(g)]` (`gelu'(g) = Phi(g) + g
//! phi(g)`), as the CPU op in `ops::geglu_grad` does; the arithmetic in f32 (f64 for f64).
//! Tensor code like the attention here: the CPU tests check it against the CPU op.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use super::adopt::Precomputed;

fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The halves `a` and `g` of `h` in the arithmetic's dtype.
fn halves(h: &Tensor, inner: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let hs = h.to_dtype(stat_dtype(h.dtype()))?;
    Ok((
        hs.narrow(D::Minus1, 0, inner)?,
        hs.narrow(D::Minus1, inner, inner)?,
    ))
}

fn forward(h: &Tensor, inner: usize) -> candle_core::Result<Tensor> {
    let (a, g) = halves(h, inner)?;
    (a * g.gelu_erf()?)?.to_dtype(h.dtype())
}

fn backward(h: &Tensor, dy: &Tensor, inner: usize) -> candle_core::Result<Tensor> {
    let (a, g) = halves(h, inner)?;
    let dy = dy.to_dtype(a.dtype())?;
    // Phi(g) = (1 + erf(g / sqrt 2)) / 2, phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    let cdf = ((g.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
    let pdf = (g.sqr()? * -0.5)?.exp()?.affine(
        0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
        0.0,
    )?;
    let da = (&dy * (&g * &cdf)?)?;
    let dgelu = (cdf + (&g * pdf)?)?;
    let dg = ((dy * a)? * dgelu)?;
    Tensor::cat(&[da, dg], D::Minus1)?.to_dtype(h.dtype())
}

struct GegluOp {
    inner: usize,
    out: Precomputed,
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "mcld-tensor-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = |t: &Tensor| t.detach().contiguous();
        backward(&d(h)?, &d(dy)?, self.inner).map(Some)
    }
}

/// GEGLU of `h` (.., 2 * inner) as the op, for float tensors on any device; `None` where it
/// does not apply.
pub fn geglu_tensor_ops(h: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let float = matches!(
        h.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    );
    if !float || h.rank() == 0 || h.elem_count() == 0 {
        return Ok(None);
    }
    let width = h.dim(D::Minus1)?;
    if width == 0 || !width.is_multiple_of(2) {
        return Ok(None);
    }
    let inner = width / 2;
    let h = h.contiguous()?;
    let out = forward(&h.detach(), inner)?;
    let op = GegluOp {
        inner,
        out: Precomputed::new(out),
    };
    Ok(Some(h.apply_op1(op)?))
}

/// [`geglu_tensor_ops`] for CUDA tensors (the training path's GEGLU on a GPU); `None` for
/// other devices and in builds without the `cuda` feature.
pub fn geglu(h: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !cfg!(feature = "cuda") || !h.device().is_cuda() {
        return Ok(None);
    }
    geglu_tensor_ops(h)
}
