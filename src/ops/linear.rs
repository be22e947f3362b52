//! Drop-in for `candle_nn::Linear` whose weight may be stored in bf16 while activations stay
//! f32: on CPUs with AVX-512 BF16 that is how `--dtype bf16` runs (see
//! `weights::bf16_matmul_weights`), through `ops::packed_gemm`; everything else goes to candle.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::host::with_f32;
use super::packed_gemm::{self, Kind, PackedA, PackedB};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// The weight kept only in `ops::packed_gemm`'s packed layout (packed once here rather than on
    /// every call; no second copy in memory): bf16 in the CPU bf16 mode, f32 otherwise.
    Packed(Arc<PackedB>, Device),
}

impl Linear {
    /// A CPU weight that is not a training variable is packed for `ops::packed_gemm` where the CPU
    /// has the kernel (bf16: AVX-512 BF16; f32: AVX-512F).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let packed = Kind::for_weight(&weight, 2).and_then(|_| {
            let (out_dim, in_dim) = weight.dims2().ok()?;
            let w = weight.contiguous().ok()?;
            match weight.dtype() {
                DType::BF16 => with_bf16(&w, |ws| {
                    PackedB::from_bf16_cols(ws, in_dim, out_dim, in_dim)
                }),
                _ => with_f32(&w, |ws| {
                    PackedB::from_f32_cols_exact(ws, in_dim, out_dim, in_dim)
                }),
            }
            .ok()
        });
        let weight = match packed {
            Some(p) => Weight::Packed(Arc::new(p), weight.device().clone()),
            None => Weight::Dense(weight),
        };
        Self { weight, bias }
    }

    /// The weight as a tensor (out, in); a packed one is unpacked into a new tensor.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Packed(p, dev) => match p.kind() {
                Kind::Bf16Pairs => Tensor::from_vec(p.to_bf16_cols(), (p.cols(), p.depth()), dev),
                Kind::F32 => Tensor::from_vec(p.to_f32_cols(), (p.cols(), p.depth()), dev),
            },
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether this layer multiplies in bf16 with f32 activations (the CPU bf16 mode).
    pub fn is_bf16_mixed(&self) -> bool {
        match &self.weight {
            Weight::Packed(p, _) => p.kind() == Kind::Bf16Pairs,
            Weight::Dense(w) => w.dtype() == DType::BF16 && w.device().is_cpu(),
        }
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(inner: candle_nn::Linear) -> Self {
        Self::new(inner.weight().clone(), inner.bias().cloned())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let packed = match &self.weight {
            Weight::Packed(p, _) if x.dtype() == DType::F32 && !x.track_op() => p,
            _ => {
                let w = self.weight()?;
                let tracked = x.track_op() || w.track_op();
                if tracked && super::train_ops_enabled() {
                    if let Some(y) = super::linear_grad::linear(x, &w, self.bias.as_ref())? {
                        return Ok(y);
                    }
                }
                if !self.is_bf16_mixed() || x.dtype() == DType::BF16 {
                    return candle_nn::Linear::new(w, self.bias.clone()).forward(x);
                }
                // Not the mode's own case: compute in x's dtype with the weight widened.
                let w = w.to_dtype(x.dtype())?;
                let b = self.bias().map(|b| b.to_dtype(x.dtype())).transpose()?;
                return candle_nn::Linear::new(w, b).forward(x);
            }
        };
        let (out_dim, in_dim) = (packed.cols(), packed.depth());
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        if k != in_dim {
            candle_core::bail!("linear: input has {k} features, the weight takes {in_dim}");
        }
        let m: usize = lead.iter().product();
        let x = x.contiguous()?;
        let pa = with_f32(&x, |xs| match packed.kind() {
            Kind::Bf16Pairs => PackedA::from_f32_rows(xs, m, k, k),
            Kind::F32 => PackedA::from_f32_rows_exact(xs, m, k, k),
        })?;
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
        packed_gemm::matmul_parallel(&pa, packed, &mut out, out_dim, accumulate)
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
