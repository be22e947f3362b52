//! Seeded random weights for any tensor name, for full-size benchmarks and sanity runs without
//! downloads. The tensors are plain (not `Var`s): a `VarMap` would make every activation keep
//! its whole autograd graph alive, which took one SD-1.5 UNet forward from 3.4 GB to 21.9 GB.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// He-scaled normal matrices and kernels, unit norm scales, zero biases; each tensor depends
/// only on the seed and its name, so building order does not matter.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
    /// Extra factor on weights whose name contains the key (damping residual branches keeps
    /// deep random networks finite).
    damp: Vec<(String, f64)>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            damp: Vec::new(),
        }
    }

    /// Multiplies every weight whose name contains `key` by `factor`.
    pub fn damp(mut self, key: &str, factor: f64) -> Self {
        self.damp.push((key.to_string(), factor));
        self
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn rng_for(&self, name: &str) -> rand::rngs::StdRng {
        // FNV-1a: stable across Rust versions, unlike the std hasher.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        rand::rngs::StdRng::seed_from_u64(self.seed ^ h)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let scale_like = name.ends_with("running_var")
            || (dims.len() == 1 && (name.ends_with("weight") || name.ends_with("gamma")));
        if scale_like {
            return Tensor::ones(s, dtype, dev);
        }
        if dims.len() <= 1 {
            return Tensor::zeros(s, dtype, dev);
        }
        let fan_in: usize = dims[1..].iter().product();
        let damp: f64 = self
            .damp
            .iter()
            .filter(|(k, _)| name.contains(k.as_str()))
            .map(|(_, f)| *f)
            .product();
        let std = damp * (2.0 / fan_in.max(1) as f64).sqrt();
        let mut rng = self.rng_for(name);
        let data: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                (z * std) as f32
            })
            .collect();
        Tensor::from_vec(data, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
