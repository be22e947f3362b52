//! Random weights served straight to a model's `VarBuilder`, for timing full-size networks
//! without any download (`mcld bench pipeline|densepose`, the random trees of `presets::tree`,
//! sanity runs).
//!
//! Unlike a fresh `VarMap`, this backend (0) hands out plain tensors, not `Var`s: with `Var`
//! weights every activation keeps its autograd graph alive, which took one SD-1.5 UNet forward
//! from 4.1 GB to 21.9 GB peak; (1) is seeded and deterministic per tensor name,
//! (2) scales every matrix or kernel by 1/sqrt(fan-in), so that activations keep unit order
//! through dozens of layers instead of blowing up (a random SD-1.5 at full size stays finite,
//! in f16 too), and (3) answers `get_unchecked` for the tensors registered with
//! [`RandomWeights::with_shape`], which models that probe a checkpoint's layout (the VAE's
//! mid-block attention) need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Tensors are drawn in blocks of this many values, each block from its own seeded stream, so
/// generation runs in parallel and still gives the same values on every machine.
const BLOCK: usize = 1 << 16;

#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
    unchecked: HashMap<String, Vec<usize>>,
    /// Factor on every matrix/kernel scale: 1 keeps unit variance through linear layers,
    /// sqrt(2) through ReLU ones (He).
    gain: f32,
    /// Extra factors for weights whose name contains the key (damped residual branches keep
    /// deep random ResNets finite).
    damp: Vec<(String, f32)>,
    /// Every tensor handed out (f32, CPU), when recording: what `presets::tree` saves.
    record: Option<Arc<Mutex<HashMap<String, Tensor>>>>,
}

/// SplitMix64: a tiny, well-mixed generator, plenty for random weights.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_name(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike std's randomly keyed hasher.
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// What a tensor of this name and shape starts as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    Const(f32),
    /// Zero-mean uniform values with this standard deviation.
    Std(f32),
}

fn fill_for(name: &str, dims: &[usize]) -> Fill {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if dims.is_empty() || leaf == "bias" || leaf.ends_with("_bias") || leaf == "running_mean" {
        return Fill::Const(0.0);
    }
    if leaf == "latents" {
        // The projector's learned queries: randn / sqrt(width), as the reference initialises.
        return Fill::Std(1.0 / (*dims.last().unwrap_or(&1) as f32).sqrt());
    }
    if dims.len() == 1 {
        // Norm scales are 1; other vectors (CLIP's class embedding) small noise.
        return if leaf == "weight" || leaf == "gamma" || leaf == "running_var" {
            Fill::Const(1.0)
        } else {
            Fill::Std(0.02)
        };
    }
    let fan_in: usize = dims[1..].iter().product();
    Fill::Std(1.0 / (fan_in.max(1) as f32).sqrt())
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            unchecked: HashMap::new(),
            gain: 1.0,
            damp: Vec::new(),
            record: None,
        }
    }

    /// Scales every matrix/kernel by `gain` (sqrt(2) for ReLU networks).
    pub fn gain(mut self, gain: f32) -> Self {
        self.gain = gain;
        self
    }

    /// Multiplies every matrix/kernel whose name contains `key` by `factor`.
    pub fn damp(mut self, key: &str, factor: f32) -> Self {
        self.damp.push((key.to_string(), factor));
        self
    }

    /// Keeps a copy of every tensor handed out; [`RandomWeights::recorded`] returns them.
    pub fn recording(mut self) -> Self {
        self.record = Some(Arc::default());
        self
    }

    /// The tensors handed out so far (empty unless [`RandomWeights::recording`]).
    pub fn recorded(&self) -> HashMap<String, Tensor> {
        match &self.record {
            Some(r) => r.lock().map(|m| m.clone()).unwrap_or_default(),
            None => HashMap::new(),
        }
    }

    /// Registers the shape `get_unchecked(name)` returns (full dotted name).
    pub fn with_shape(mut self, name: impl Into<String>, dims: &[usize]) -> Self {
        self.unchecked.insert(name.into(), dims.to_vec());
        self
    }

    /// Registers the VAE mid-block attention projections (encoder and decoder) of a VAE with
    /// `channels` channels at its bottleneck, under `prefix` ("" for a bare VAE).
    pub fn with_vae_mid_attention(mut self, prefix: &str, channels: usize) -> Self {
        for part in ["encoder", "decoder"] {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                let name = format!("{prefix}{part}.mid_block.attentions.0.{proj}.weight");
                self = self.with_shape(name, &[channels, channels]);
            }
        }
        self
    }

    /// A `VarBuilder` handing out random tensors in `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self);
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// The tensor `name` of shape `dims`, in f32 on the CPU.
    pub fn tensor(&self, name: &str, dims: &[usize]) -> candle_core::Result<Tensor> {
        let t = self.generate(name, dims)?;
        if let Some(r) = &self.record {
            if let Ok(mut m) = r.lock() {
                m.insert(name.to_string(), t.clone());
            }
        }
        Ok(t)
    }

    fn generate(&self, name: &str, dims: &[usize]) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        let data = match fill_for(name, dims) {
            Fill::Const(v) => vec![v; n],
            Fill::Std(std) => {
                let std = if dims.len() >= 2 {
                    self.damp
                        .iter()
                        .filter(|(k, _)| name.contains(k.as_str()))
                        .fold(std * self.gain, |s, (_, f)| s * f)
                } else {
                    std
                };
                let half_width = std * 3f32.sqrt();
                let base = self.seed ^ hash_name(name);
                let mut data = vec![0f32; n];
                data.par_chunks_mut(BLOCK)
                    .enumerate()
                    .for_each(|(i, chunk)| {
                        let mut s =
                            base.wrapping_add((i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                        for v in chunk.iter_mut() {
                            // 24 random bits -> [0, 1) -> [-w, w).
                            let u = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                            *v = (2.0 * u - 1.0) * half_width;
                        }
                    });
                data
            }
        };
        Tensor::from_vec(data, dims, &Device::Cpu)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(name, s.dims())?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = self.unchecked.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "random weights: {name} is fetched without a shape; register it with \
                 RandomWeights::with_shape"
            ))
        })?;
        self.tensor(name, dims)?.to_dtype(dtype)?.to_device(dev)
    }

    /// Only registered tensors "exist": a model probing for an old checkpoint layout (the VAE's
    /// `query`/`key`/`value` names) then takes the current diffusers one.
    fn contains_tensor(&self, name: &str) -> bool {
        self.unchecked.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_scaled_and_named() {
        let r = RandomWeights::new(7);
        let a = r.tensor("x.weight", &[64, 32, 3, 3]).unwrap();
        let b = r.tensor("x.weight", &[64, 32, 3, 3]).unwrap();
        let c = r.tensor("y.weight", &[64, 32, 3, 3]).unwrap();
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(d(&a, &b), 0.0);
        assert!(d(&a, &c) > 0.0);
        let var = a
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = 1.0 / (32.0 * 9.0);
        assert!((var / want - 1.0).abs() < 0.05, "variance {var} vs {want}");
        let ones = r
            .tensor("norm.weight", &[8])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ones, vec![1.0; 8]);
        let zeros = r
            .tensor("norm.bias", &[8])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(zeros, vec![0.0; 8]);
    }

    #[test]
    fn unchecked_needs_a_registered_shape() {
        let vb = RandomWeights::new(1)
            .with_vae_mid_attention("", 16)
            .var_builder(DType::F32, &Device::Cpu);
        let w = vb
            .pp("decoder.mid_block.attentions.0.to_q")
            .get_unchecked("weight")
            .unwrap();
        assert_eq!(w.dims(), &[16, 16]);
        let e = vb.get_unchecked("other.weight").unwrap_err().to_string();
        assert!(
            e.contains("other.weight") && e.contains("with_shape"),
            "{e}"
        );
    }
}
