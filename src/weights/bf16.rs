//! The weight view of the CPU bf16 mode: matmul and convolution weights are handed out in bf16,
//! everything else (biases, norms, embedding tables) in the builder's f32. The layers that take
//! those weights (`ops::linear`, `ops::conv`, and through them attention) multiply bf16
//! operands with f32 accumulation; a weight handed to any other op fails loudly on the dtype.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

struct MatmulBf16 {
    inner: VarBuilder<'static>,
}

/// A `weight` of rank 4 (a convolution) or of rank 2 (a linear layer, unless it is an
/// embedding table such as CLIP's `position_embedding.weight`).
pub fn is_matmul_weight(name: &str, rank: usize) -> bool {
    let mut parts = name.rsplit('.');
    if parts.next() != Some("weight") {
        return false;
    }
    match rank {
        4 => true,
        2 => !parts.next().is_some_and(|p| p.contains("embedding")),
        _ => false,
    }
}

fn narrow(name: &str, t: Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == DType::F32 && t.device().is_cpu() && is_matmul_weight(name, t.rank()) {
        t.to_dtype(DType::BF16)
    } else {
        Ok(t)
    }
}

impl SimpleBackend for MatmulBf16 {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        narrow(name, self.inner.get_with_hints_dtype(s, name, h, dtype)?)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        narrow(name, self.inner.get_unchecked_dtype(name, dtype)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// `vb` with its matmul and convolution weights in bf16 (see the module doc); `vb` is f32 on
/// the CPU.
pub fn bf16_matmul_weights(vb: VarBuilder<'static>) -> VarBuilder<'static> {
    let (dtype, device) = (vb.dtype(), vb.device().clone());
    let backend: Box<dyn SimpleBackend> = Box::new(MatmulBf16 { inner: vb });
    VarBuilder::from_backend(backend, dtype, device)
}
