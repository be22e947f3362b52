//! The training state's weights: trainable tensors as f32 `Var`s (the master copy AdamW
//! updates) and frozen ones as plain tensors, all under their composite names
//! (`reference_unet.*`, `denoising_unet.*`, `pose_guider.*`, `image_proj.*`).
//!
//! Networks are rebuilt from this store for every step through [`Params::var_builder`]: the
//! builder hands each module its weight cast to the compute dtype. For a trainable weight that
//! cast is a tracked op back to the f32 `Var`, so gradients arrive in f32 on the master copy
//! whatever the compute dtype (the autocast arrangement of the reference).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::ops::autocast::{bf16_products, Bf16Scope};
use crate::ops::weight_grads::{self, CollectScope, WeightGrads};
use crate::pipeline::mcld::Precision;
use crate::{Error, Result};

/// MCLD's trainable split (SPEC §4): everything but the reference UNet's `up_blocks.3`, which
/// the reference freezes (it still runs: its transformer blocks write the last bank entries).
pub fn is_trainable(name: &str) -> bool {
    !(name.starts_with("reference_unet.") && name.contains("up_blocks.3"))
}

#[derive(Debug, Clone)]
pub struct Params {
    /// Trainable tensors in name order: the order of gradients, moments and saved state.
    trainable: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    frozen: HashMap<String, Tensor>,
    device: Device,
}

impl Params {
    /// Splits `tensors` with `trainable` and moves them to `device` as f32 masters.
    pub fn new(
        tensors: HashMap<String, Tensor>,
        trainable: impl Fn(&str) -> bool,
        device: &Device,
    ) -> Result<Self> {
        Self::with_dtype(tensors, trainable, device, DType::F32)
    }

    /// [`Params::new`] with another master dtype (f64 for finite-difference checks).
    pub fn with_dtype(
        tensors: HashMap<String, Tensor>,
        trainable: impl Fn(&str) -> bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut sorted: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut frozen = HashMap::new();
        for (name, t) in tensors {
            let t = t.to_dtype(dtype)?.to_device(device)?;
            if trainable(&name) {
                sorted.insert(name, t);
            } else {
                frozen.insert(name, t);
            }
        }
        let trainable: Vec<(String, Var)> = sorted
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let index = trainable
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            trainable,
            index,
            frozen,
            device: device.clone(),
        })
    }

    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    pub fn frozen(&self) -> &HashMap<String, Tensor> {
        &self.frozen
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Number of trainable scalars.
    pub fn trainable_elems(&self) -> usize {
        self.trainable.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Current value of any tensor (trainable or frozen), detached.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        if let Some(&i) = self.index.get(name) {
            return Some(self.trainable[i].1.as_tensor().detach());
        }
        self.frozen.get(name).cloned()
    }

    /// Every tensor whose name starts with `prefix`, the prefix removed, detached.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (n, v) in &self.trainable {
            if let Some(k) = n.strip_prefix(prefix) {
                out.insert(k.to_string(), v.as_tensor().detach());
            }
        }
        for (n, t) in &self.frozen {
            if let Some(k) = n.strip_prefix(prefix) {
                out.insert(k.to_string(), t.clone());
            }
        }
        out
    }

    /// Overwrites trainable values in place (same shapes), e.g. from a saved state.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let i = self
            .index_of(name)
            .ok_or_else(|| Error::msg(format!("no trainable tensor named {name}")))?;
        let var = &self.trainable[i].1;
        if var.dims() != value.dims() {
            return Err(Error::msg(format!(
                "tensor {name}: saved shape {:?}, the model has {:?}",
                value.dims(),
                var.dims()
            )));
        }
        var.set(&value.to_dtype(var.dtype())?.to_device(&self.device)?)?;
        Ok(())
    }

    /// A builder serving every tensor cast to `dtype`. With `tracked`, trainable tensors keep
    /// their link to the `Var` (gradients flow); without, everything is detached, for forward
    /// passes that must not hold a graph (validation, recomputation bookkeeping).
    pub fn var_builder(&self, dtype: DType, tracked: bool) -> Result<VarBuilder<'static>> {
        self.var_builder_rounded(dtype, None, tracked)
    }

    /// [`Params::var_builder`] whose tensors are first rounded through `round` (a dtype the
    /// device cannot compute in, such as bf16 on the CPU: bf16 weights, f32 arithmetic). The
    /// rounding is a tracked cast, so gradients still reach the masters.
    pub fn var_builder_rounded(
        &self,
        dtype: DType,
        round: Option<DType>,
        tracked: bool,
    ) -> Result<VarBuilder<'static>> {
        let mut map = HashMap::with_capacity(self.trainable.len() + self.frozen.len());
        for (n, v) in &self.trainable {
            let t = if tracked {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            };
            map.insert(n.clone(), t);
        }
        for (n, t) in &self.frozen {
            map.insert(n.clone(), t.clone());
        }
        let backend = CastBackend {
            tensors: Arc::new(map),
            round,
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            self.device.clone(),
        ))
    }
}

impl Params {
    /// The builder the trained networks load from at `prec`, and the scope they must run their
    /// forward and backward passes in. CPU bf16 with the AVX-512 BF16 kernel: the f32 masters
    /// themselves, inside a bf16-products scope (`ops::autocast`: convolutions and linear
    /// layers multiply bf16-rounded operands, as torch's autocast); without that kernel the
    /// masters rounded to bf16 and computed in f32; otherwise `prec`'s compute dtype. Read the
    /// gradients with [`Params::gradients`] through the same scope.
    pub fn var_builder_for(&self, prec: &Precision) -> Result<(VarBuilder<'static>, StepScope)> {
        let sink = Arc::new(WeightGrads::new(
            self.trainable.iter().map(|(_, v)| v.as_tensor()),
        ));
        let collect = weight_grads::collect(&sink);
        let products = if prec.bf16_matmuls {
            bf16_products()
        } else {
            None
        };
        let round = match products {
            Some(_) => None,
            None => prec.round_weights,
        };
        let vb = self.var_builder_rounded(prec.compute, round, true)?;
        Ok((
            vb,
            StepScope {
                sink,
                _products: products,
                _collect: collect,
            },
        ))
    }

    /// Each trainable tensor's gradient (f32, detached): what the training ops delivered to the
    /// scope's collector plus what candle's `store` holds for it; `None` where neither has one.
    pub fn gradients(&self, scope: &StepScope, store: &GradStore) -> Result<Vec<Option<Tensor>>> {
        self.trainable
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor();
                let g = match (scope.sink.take(t), store.get(t)) {
                    // both in the weight's dtype
                    (Some(a), Some(b)) => Some((a + b.detach())?),
                    (a, b) => a.or_else(|| b.map(Tensor::detach)),
                };
                Ok(g.map(|g| g.to_dtype(DType::F32)).transpose()?)
            })
            .collect()
    }
}

/// What a training step's forward and backward passes run inside (see
/// [`Params::var_builder_for`]): the bf16-products scope where it applies and the collector of
/// the ops' weight gradients (`ops::weight_grads`). Tied to the thread that opened it.
#[must_use = "the forward and backward passes must run while the scope is alive"]
pub struct StepScope {
    sink: Arc<WeightGrads>,
    _products: Option<Bf16Scope>,
    _collect: CollectScope,
}

/// Serves tensors from a map, cast to the requested dtype; missing names and shape mismatches
/// are errors naming the tensor (the store was checked against the networks when loaded).
struct CastBackend {
    tensors: Arc<HashMap<String, Tensor>>,
    round: Option<DType>,
}

impl SimpleBackend for CastBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "training weights: {name} has shape {:?}, the network wants {:?}",
                t.dims(),
                s.dims()
            )
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("training weights: no tensor named {name}"))
        })?;
        let t = match self.round {
            Some(r) => t.to_dtype(r)?,
            None => t.clone(),
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
