//! Drop-in for `candle_nn::Linear` whose weight may be stored in bf16 while activations stay
//! f32: on CPUs with AVX-512 BF16 that is how `--dtype bf16` runs (see
//! `weights::bf16_matmul_weights`), through `bf16_gemm`; everything else goes to candle.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::bf16_gemm::{self, PackedA, PackedB};
use super::host::with_f32;

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Whether this layer multiplies in bf16 with f32 activations (the CPU bf16 mode).
    pub fn is_bf16_mixed(&self) -> bool {
        let w = self.weight();
        w.dtype() == DType::BF16 && w.device().is_cpu()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(inner: candle_nn::Linear) -> Self {
        Self { inner }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.is_bf16_mixed() || x.dtype() == DType::BF16 {
            return self.inner.forward(x);
        }
        if x.dtype() != DType::F32 || x.track_op() || !bf16_gemm::available() {
            // Not the mode's own case: compute in x's dtype with the weight widened.
            let w = self.weight().to_dtype(x.dtype())?;
            let b = self.bias().map(|b| b.to_dtype(x.dtype())).transpose()?;
            return candle_nn::Linear::new(w, b).forward(x);
        }
        let (out_dim, in_dim) = self.weight().dims2()?;
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        if k != in_dim {
            candle_core::bail!("linear: input has {k} features, the weight takes {in_dim}");
        }
        let m: usize = lead.iter().product();
        let x = x.contiguous()?;
        let w = self.weight().contiguous()?;
        let pb = with_bf16(&w, |ws| {
            PackedB::from_bf16_cols(ws, in_dim, out_dim, in_dim)
        })?;
        let pa = with_f32(&x, |xs| PackedA::from_f32_rows(xs, m, k, k))?;
        let mut out = vec![0f32; m * out_dim];
        let accumulate = match self.bias() {
            Some(b) => {
                let b = b.to_dtype(DType::F32)?.contiguous()?;
                with_f32(&b, |bs| {
                    for row in out.chunks_exact_mut(out_dim) {
                        row.copy_from_slice(&bs[..out_dim]);
                    }
                })?;
                true
            }
            None => false,
        };
        bf16_gemm::matmul_parallel(&pa, &pb, &mut out, out_dim, accumulate)
            .map_err(candle_core::Error::wrap)?;
        let mut shape = lead.to_vec();
        shape.push(out_dim);
        Tensor::from_vec(out, shape, x.device())
    }
}

/// Runs `f` on a contiguous bf16 CPU tensor's data (from its start offset).
pub(crate) fn with_bf16<R>(
    t: &Tensor,
    f: impl FnOnce(&[half::bf16]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
            Ok(f(&v[layout.start_offset()..]))
        }
        _ => candle_core::bail!("CPU kernel: expected a bf16 CPU tensor"),
    }
}

/// `candle_nn::linear` returning our `Linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// `candle_nn::linear_no_bias` returning our `Linear`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}
