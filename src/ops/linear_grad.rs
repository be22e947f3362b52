//! Linear layers on the training path (`y = x W^T + b`) as a candle custom op whose forward and
//! backward passes run on the packed kernels (through [`Elem::mm`]).
//!
//! Composed, a linear layer on a batch is candle's broadcast matmul of the transposed weight: the
//! `gemm` crate's AVX2 kernels, the weight broadcast over the batch in the forward pass and the
//! weight gradient summed back over that broadcast (a full copy per use) in the backward pass.
//! Here the input is one m x k matrix, so `dX = dY W`, `dW = dY^T X` and `db = colsum(dY)` are
//! one product or one sweep each.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use std::sync::Arc;

use super::autocast::Products;
use super::elem::{slice, weight_op_with_optional_bias, with_data, Elem, Operand};
use super::host::zeroed;
use super::weight_grads::{self, WeightGrads};

#[derive(Debug, Clone)]
struct LinearOp {
    /// Rows of the flattened input, input features, output features.
    m: usize,
    k: usize,
    n: usize,
    products: Products,
    sink: Option<Arc<WeightGrads>>,
}

impl LinearOp {
    fn forward<T: Elem>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> candle_core::Result<Vec<T>> {
        let LinearOp {
            m, k, n, products, ..
        } = *self;
        let mut y = zeroed(m * n, T::from_f64(0.0));
        if m == 0 || n == 0 {
            return Ok(y);
        }
        if let Some(b) = b {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(&b[..n]);
            }
        }
        // W^T: element (kk, j) at w[j * k + kk].
        T::mm_in(
            products,
            m,
            n,
            k,
            Operand::rows(x, k),
            Operand::cols(w, k),
            &mut y,
            n,
            b.is_some(),
        )?;
        Ok(y)
    }

    fn fwd_storage(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.m, self.n));
        let out = match x.0.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                slice(x.0, x.1)?,
                slice(w.0, w.1)?,
                b.map(|(s, l)| slice(s, l)).transpose()?,
            )?),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                slice(x.0, x.1)?,
                slice(w.0, w.1)?,
                b.map(|(s, l)| slice(s, l)).transpose()?,
            )?),
            dt => candle_core::bail!("linear op: no kernel for {dt:?}"),
        };
        Ok((out, shape))
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
            dt => candle_core::bail!("linear op: no kernel for {dt:?}"),
        }
    }

    fn backward_t<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: bool,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let LinearOp {
            m, k, n, products, ..
        } = *self;
        let dev = x.device();
        let dy = dy.contiguous()?;
        with_data::<T, _>(&dy, |dys| {
            let dx = if x.track_op() {
                let v = with_data::<T, _>(w, |ws| {
                    let mut dx = zeroed(m * k, T::from_f64(0.0));
                    T::mm_in(
                        products,
                        m,
                        k,
                        n,
                        Operand::rows(dys, n),
                        Operand::rows(ws, k),
                        &mut dx,
                        k,
                        false,
                    )
                    .map(|()| dx)
                })??;
                Some(Tensor::from_vec(v, x.shape(), dev)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let v = with_data::<T, _>(x, |xs| {
                    let mut dw = zeroed(n * k, T::from_f64(0.0));
                    // dY^T: element (j, i) at dy[i * n + j].
                    T::mm_in(
                        products,
                        n,
                        k,
                        m,
                        Operand::cols(dys, n),
                        Operand::rows(xs, k),
                        &mut dw,
                        k,
                        false,
                    )
                    .map(|()| dw)
                })??;
                Some(Tensor::from_vec(v, w.shape(), dev)?)
            } else {
                None
            };
            let db = if bias {
                Some(Tensor::from_vec(column_sums(dys, n), n, dev)?)
            } else {
                None
            };
            Ok((dx, dw, db))
        })?
    }
}

/// Sums of the columns of a row-major matrix of `n` columns, accumulated in f64.
fn column_sums<T: Elem>(rows: &[T], n: usize) -> Vec<T> {
    let mut acc = vec![0f64; n];
    if n > 0 {
        for row in rows.chunks_exact(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v.to_f64();
            }
        }
    }
    acc.into_iter().map(T::from_f64).collect()
}

weight_op_with_optional_bias!(LinearOp, "mcld-linear");

/// `x W^T (+ b)` over the last axis of `x` as the custom op, for f32 and f64 CPU tensors with
/// `w` of shape (out, in); `None` where that does not hold (the caller falls back to candle).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    let applies = matches!(dtype, DType::F32 | DType::F64)
        && x.rank() >= 1
        && w.rank() == 2
        && [Some(x), Some(w), bias]
            .iter()
            .flatten()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype);
    if !applies {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    let Some((&k_x, lead)) = dims.split_last() else {
        return Ok(None);
    };
    if k_x != k || bias.is_some_and(|b| b.dims() != [n]) {
        return Ok(None);
    }
    let m: usize = lead.iter().product();
    let op = LinearOp {
        m,
        k,
        n,
        products: Products::current(),
        sink: weight_grads::current(),
    };
    let x2 = x.contiguous()?.reshape((m, k))?;
    let w = w.contiguous()?;
    let y = match bias {
        Some(b) => x2.apply_op3(&w, &b.contiguous()?, op)?,
        None => x2.apply_op2(&w, op)?,
    };
    let mut shape = lead.to_vec();
    shape.push(n);
    Ok(Some(y.reshape(shape)?))
}
