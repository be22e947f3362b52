//! Random weights for any tensor name, so the full-size model can be built and timed without
//! the real checkpoint (`mcld bench densepose`).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// He-scaled normal weights, zero biases, identity FrozenBN / GroupNorm. Residual branches
/// (`conv3`) are damped and box/anchor deltas kept small, so activations stay finite through
/// 101 layers and the proposals stay inside the image.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomWeights;

impl RandomWeights {
    pub fn var_builder(device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone())
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        if name.ends_with("running_var") || (dims.len() == 1 && name.ends_with("weight")) {
            return Tensor::ones(s, dtype, dev);
        }
        if dims.len() == 1 {
            return Tensor::zeros(s, dtype, dev);
        }
        // Transposed convs store (in, out, k, k); fan-in is still every dim after the first.
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let damp = if name.contains("conv3") {
            0.2
        } else if name.contains("anchor_deltas") || name.contains("bbox_pred") {
            0.01
        } else {
            1.0
        };
        let std = damp * (2.0 / fan_in as f64).sqrt();
        Tensor::randn(0f32, std as f32, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("RandomWeights needs a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
