//! GroupNorm(+SiLU) and LayerNorm for training on CUDA, in candle tensor ops with a backward
//! pass of their own (candle's CUDA kernels on a GPU).
//!
//! candle's composed norm keeps its f32 copy of the input, the centred values, the normalised
//! values and the affine result for the backward pass, and walks them in a dozen kernels. Here
//! the forward pass (on detached tensors) keeps only each group's mean and 1/std; the backward
//! pass recomputes the normalised values from the input and forms, per group,
//! `dx = rstd (g - mean(g) - x_hat mean(g x_hat))` with `g = dz w`, `dw = sum(dz x_hat)`,
//! `db = sum(dz)` (`dz = dy silu'(z)` after SiLU), as the CPU op in `ops::norm::grad` does.
//! Statistics and sums in f32 (f64 for f64) whatever the inputs' dtype.
//!
//! Like the attention here, nothing is CUDA-specific but the op's `cuda_fwd`, so the CPU tests
//! check the same code against the CPU op; the networks take it for CUDA tensors only.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::adopt::Precomputed;

/// The shapes a norm works in: statistics over the last axis of `stats` (A, G, R), the affine
/// parameters along the middle axis of `affine` (A, C, P); both views of the contiguous input.
#[derive(Debug, Clone, Copy)]
struct Views {
    stats: (usize, usize, usize),
    affine: (usize, usize, usize),
    eps: f64,
    silu: bool,
}

fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl Views {
    /// The normalised input (in the affine view) from the input and the group statistics.
    fn x_hat(&self, xs: &Tensor, mean: &Tensor, rstd: &Tensor) -> candle_core::Result<Tensor> {
        xs.reshape(self.stats)?
            .broadcast_sub(mean)?
            .broadcast_mul(rstd)?
            .reshape(self.affine)
    }

    /// `x_hat w + b`, the parameters spread along the channel axis.
    fn affine(&self, x_hat: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let c = (1, self.affine.1, 1);
        x_hat
            .broadcast_mul(&w.reshape(c)?)?
            .broadcast_add(&b.reshape(c)?)
    }

    /// The output and the group statistics (mean, 1/std), each (A, G, 1).
    fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dt, st) = (x.dtype(), stat_dtype(x.dtype()));
        let xs = x.to_dtype(st)?;
        let g = xs.reshape(self.stats)?;
        let mean = g.mean_keepdim(2)?;
        let var = g.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let z = self.affine(
            &self.x_hat(&xs, &mean, &rstd)?,
            &w.to_dtype(st)?,
            &b.to_dtype(st)?,
        )?;
        let y = if self.silu {
            candle_nn::ops::silu(&z)?
        } else {
            z
        };
        Ok((y.to_dtype(dt)?.reshape(x.shape())?, mean, rstd))
    }

    /// Gradients of x, w and b from the output gradient `dy`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        (mean, rstd): (&Tensor, &Tensor),
        dy: &Tensor,
        want: [bool; 3],
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (dt, st) = (x.dtype(), stat_dtype(x.dtype()));
        let (ws, bs) = (w.to_dtype(st)?, b.to_dtype(st)?);
        let x_hat = self.x_hat(&x.to_dtype(st)?, mean, rstd)?;
        let dy = dy.to_dtype(st)?.reshape(self.affine)?;
        let dz = if self.silu {
            // silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
            let z = self.affine(&x_hat, &ws, &bs)?;
            let s = candle_nn::ops::sigmoid(&z)?;
            let ds = ((z * (1.0 - &s)?)? + 1.0)?;
            (dy * (s * ds)?)?
        } else {
            dy
        };
        // Per-channel sums over the batch and the pixels.
        let per_channel = |t: &Tensor| t.sum(2)?.sum(0)?.to_dtype(dt);
        let db = if want[2] {
            Some(per_channel(&dz)?)
        } else {
            None
        };
        let dw = if want[1] {
            Some(per_channel(&(&dz * &x_hat)?)?)
        } else {
            None
        };
        let dx = if want[0] {
            let g = dz
                .broadcast_mul(&ws.reshape((1, self.affine.1, 1))?)?
                .reshape(self.stats)?;
            let xh = x_hat.reshape(self.stats)?;
            let proj = (&g * &xh)?.mean_keepdim(2)?;
            let dx = g
                .broadcast_sub(&g.mean_keepdim(2)?)?
                .sub(&xh.broadcast_mul(&proj)?)?
                .broadcast_mul(rstd)?;
            Some(dx.to_dtype(dt)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok([dx, dw, db])
    }
}

/// The op on (x, w, b): the output until the op adopts it, and the group statistics.
struct NormOp {
    views: Views,
    out: Precomputed,
    mean: Tensor,
    rstd: Tensor,
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "mcld-tensor-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = |t: &Tensor| t.detach().contiguous();
        let [dx, dw, db] = self.views.backward(
            &d(x)?,
            &d(w)?,
            &d(b)?,
            (&self.mean, &self.rstd),
            &d(dy)?,
            [x.track_op(), w.track_op(), b.track_op()],
        )?;
        Ok((dx, dw, db))
    }
}

/// Whether the op takes these tensors: one float dtype, one device.
fn applies(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
        && ts
            .iter()
            .all(|t| t.dtype() == dtype && t.device().same_device(ts[0].device()))
}

fn apply(views: Views, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dd = |t: &Tensor| t.detach().contiguous();
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    let (out, mean, rstd) = views.forward(&dd(&x)?, &dd(&w)?, &dd(&b)?)?;
    let op = NormOp {
        views,
        out: Precomputed::new(out),
        mean,
        rstd,
    };
    x.apply_op3(&w, &b, op)
}

/// GroupNorm of a (B, C, ...) tensor with per-channel `weight` and `bias`, then SiLU when
/// `act`, as the op, on any one device; `None` where it does not apply.
pub fn group_norm_tensor_ops(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    act: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) || x.rank() < 2 || x.elem_count() == 0 {
        return Ok(None);
    }
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 || weight.dims() != [c] || bias.dims() != [c] {
        return Ok(None);
    }
    let plane = x.elem_count() / (n * c);
    let views = Views {
        stats: (n, groups, c / groups * plane),
        affine: (n, c, plane),
        eps,
        silu: act,
    };
    apply(views, x, weight, bias).map(Some)
}

/// LayerNorm over the last dimension with `weight` and `bias`, as the op, on any one device;
/// `None` where it does not apply.
pub fn layer_norm_tensor_ops(
    x: &Tensor,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) || x.rank() == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        return Ok(None);
    }
    let rows = x.elem_count() / d;
    let views = Views {
        stats: (rows, 1, d),
        affine: (rows, d, 1),
        eps,
        silu: false,
    };
    apply(views, x, weight, bias).map(Some)
}

/// [`group_norm_tensor_ops`] for CUDA tensors (the training path's GroupNorm on a GPU).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    act: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cuda() {
        return Ok(None);
    }
    group_norm_tensor_ops(x, groups, eps, weight, bias, act)
}

/// [`layer_norm_tensor_ops`] for CUDA tensors (the training path's LayerNorm on a GPU).
pub fn layer_norm(
    x: &Tensor,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cuda() {
        return Ok(None);
    }
    layer_norm_tensor_ops(x, eps, weight, bias)
}
