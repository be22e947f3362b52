//! GEGLU (`a * gelu(g)` over the two halves `[a | g]` of the feed-forward's projection) as a
//! candle custom op with a fused backward pass, for training on the CPU.
//!
//! Composed, it is two narrows, an erf GELU and a product forward, and in the backward pass the
//! GELU's derivative from primitives plus two zero-padded full-width gradients added together.
//! Here each pass is one sweep: `dh = [dout * gelu(g) | dout * a * gelu'(g)]`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::elem::{slice, with_data, Elem};
use super::host::zeroed;

/// Rows of `2 * inner` values per parallel task: about 32k values.
fn rows_per_task(inner: usize) -> usize {
    ((1 << 15) / inner.max(1)).max(1)
}

#[derive(Debug, Clone, Copy)]
struct GegluOp {
    inner: usize,
}

impl GegluOp {
    fn forward<T: Elem>(&self, h: &[T]) -> Vec<T> {
        let inner = self.inner;
        let rows = h.len() / (2 * inner);
        let per = rows_per_task(inner);
        let mut out = zeroed(rows * inner, T::zero());
        out.par_chunks_mut(per * inner)
            .zip(h.par_chunks(per * 2 * inner))
            .for_each(|(o, s)| {
                for (orow, srow) in o.chunks_exact_mut(inner).zip(s.chunks_exact(2 * inner)) {
                    let (a, g) = srow.split_at(inner);
                    for ((o, &a), &g) in orow.iter_mut().zip(a).zip(g) {
                        *o = a * T::gelu_and_grad(g).0;
                    }
                }
            });
        out
    }

    fn backward<T: Elem>(&self, h: &[T], dout: &[T]) -> Vec<T> {
        let inner = self.inner;
        let per = rows_per_task(inner);
        let mut dh = zeroed(h.len(), T::zero());
        dh.par_chunks_mut(per * 2 * inner)
            .zip(
                h.par_chunks(per * 2 * inner)
                    .zip(dout.par_chunks(per * inner)),
            )
            .for_each(|(d, (s, go))| {
                for ((drow, srow), grow) in d
                    .chunks_exact_mut(2 * inner)
                    .zip(s.chunks_exact(2 * inner))
                    .zip(go.chunks_exact(inner))
                {
                    let (da, dg) = drow.split_at_mut(inner);
                    let (a, g) = srow.split_at(inner);
                    for j in 0..inner {
                        let (gelu, slope) = T::gelu_and_grad(g[j]);
                        da[j] = grow[j] * gelu;
                        dg[j] = grow[j] * a[j] * slope;
                    }
                }
            });
        dh
    }

    fn out_shape(&self, shape: &Shape) -> Shape {
        let mut dims = shape.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.inner;
        Shape::from(dims)
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "mcld-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.out_shape(l.shape());
        match s.dtype() {
            DType::F32 => Ok((
                f32::to_cpu_storage_owned(self.forward(slice::<f32>(s, l)?)),
                shape,
            )),
            DType::F64 => Ok((
                f64::to_cpu_storage_owned(self.forward(slice::<f64>(s, l)?)),
                shape,
            )),
            dt => candle_core::bail!("geglu op: no kernel for {dt:?}"),
        }
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, dout: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dh = match h.dtype() {
            DType::F32 => {
                let v = with_data::<f32, _>(h, |hs| {
                    with_data::<f32, _>(dout, |gs| self.backward(hs, gs))
                })??;
                Tensor::from_vec(v, h.shape(), h.device())?
            }
            DType::F64 => {
                let v = with_data::<f64, _>(h, |hs| {
                    with_data::<f64, _>(dout, |gs| self.backward(hs, gs))
                })??;
                Tensor::from_vec(v, h.shape(), h.device())?
            }
            dt => candle_core::bail!("geglu op: no kernel for {dt:?}"),
        };
        Ok(Some(dh))
    }
}

/// GEGLU of `h` (.., 2 * inner) as the custom op, for f32 or f64 CPU tensors; `None` where it
/// does not apply.
pub fn geglu(h: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let ok = h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64) && h.rank() > 0;
    if !ok || h.elem_count() == 0 {
        return Ok(None);
    }
    let width = h.dim(candle_core::D::Minus1)?;
    if width == 0 || !width.is_multiple_of(2) {
        return Ok(None);
    }
    Ok(Some(
        h.contiguous()?.apply_op1(GegluOp { inner: width / 2 })?,
    ))
}
