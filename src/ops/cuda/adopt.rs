//! A custom op's forward pass computed beforehand in tensor ops: the op adopts the finished
//! output (candle hands a custom op's forward storages, not tensors, so tensor code cannot run
//! inside it) and ties it to the op's arguments for autograd. Costs one copy of the output.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Shape, Storage, Tensor};

/// The output waiting for the op's forward pass (which runs once per op).
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(out: Tensor) -> Self {
        Self(Mutex::new(Some(out)))
    }

    /// The output's storage, as the op's own (a copy), and its shape.
    fn adopt<S: BackendStorage>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let out = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::msg("precomputed op: lock"))?
            .take()
            .ok_or_else(|| candle_core::Error::msg("precomputed op: forward ran twice"))?;
        let (st, l) = out.storage_and_layout();
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("precomputed op: the output is not a fresh dense tensor");
        }
        let s = pick(&st)
            .ok_or_else(|| candle_core::Error::msg("precomputed op: output on another device"))?
            .try_clone(l)?;
        Ok((s, out.shape().clone()))
    }

    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        self.adopt(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.adopt(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }
}
