//! Gradients of the trained weights, collected beside candle's autograd in one buffer per weight.
//!
//! candle's backward pass gives every tensor it reaches a fresh zero tensor and adds each
//! incoming gradient to it (`zeros_like` + `add`: two full-size allocations and three sweeps per
//! gradient, on candle's serial-or-barrier elementwise path). For the weights of the convolution
//! and linear training ops that was a copy of the whole trainable set per step. Inside a
//! [`collect`] scope those ops hand their weight and bias gradients to a [`WeightGrads`] instead:
//! the first gradient of a weight is kept as computed, later ones are added into it in place.
//! Each op reads the scope when the forward pass builds it (as [`super::autocast`] does), so a
//! backward pass run later, or a recomputed checkpoint segment, still delivers to it. Tensors the
//! collector was not told about (activations, frozen or cast weights) go to candle as before.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, TensorId};

/// Gradients of a fixed set of weights (by tensor id), summed over every use.
#[derive(Debug, Default)]
pub struct WeightGrads {
    wanted: HashSet<TensorId>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl WeightGrads {
    /// A collector for these weights (the tensors the ops are called with, e.g. `Var`s).
    pub fn new<'a>(weights: impl IntoIterator<Item = &'a Tensor>) -> Self {
        Self {
            wanted: weights.into_iter().map(Tensor::id).collect(),
            grads: Mutex::default(),
        }
    }

    /// Keeps `g`, the gradient of `w`, when `w` is collected here (and answers `None`);
    /// otherwise gives it back for candle's own accumulation.
    pub fn offer(&self, w: &Tensor, g: Option<Tensor>) -> candle_core::Result<Option<Tensor>> {
        let Some(g) = g else { return Ok(None) };
        if !self.wanted.contains(&w.id()) {
            return Ok(Some(g));
        }
        let mut grads = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight gradients: lock poisoned".into()))?;
        match grads.get_mut(&w.id()) {
            None => {
                grads.insert(w.id(), g);
            }
            Some(sum) => add_into(sum, &g)?,
        }
        Ok(None)
    }

    /// The summed gradient of `w`, if any op delivered one (taken out of the collector).
    pub fn take(&self, w: &Tensor) -> Option<Tensor> {
        self.grads.lock().ok()?.remove(&w.id())
    }
}

/// `sum += g`, in place where both are contiguous CPU f32 or f64 tensors of one shape (the
/// collector owns `sum`: it is the first gradient an op computed, handed over whole).
fn add_into(sum: &mut Tensor, g: &Tensor) -> candle_core::Result<()> {
    if sum.shape() != g.shape() {
        candle_core::bail!(
            "weight gradients: {:?} added to {:?}",
            g.shape(),
            sum.shape()
        );
    }
    let g = g.to_dtype(sum.dtype())?;
    if sum.device().is_cpu() && g.device().is_cpu() && sum.is_contiguous() {
        return sum.inplace_op2(&g.contiguous()?, &AddAssign);
    }
    *sum = (&*sum + g)?;
    Ok(())
}

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "weight-grad-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        fn add<T: Copy + Send + Sync + std::ops::AddAssign>(
            dst: &mut [T],
            src: &[T],
        ) -> candle_core::Result<()> {
            use rayon::prelude::*;
            const CHUNK: usize = 1 << 16;
            if dst.len() != src.len() {
                candle_core::bail!(
                    "weight gradients: {} values added to {}",
                    src.len(),
                    dst.len()
                );
            }
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
            Ok(())
        }
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("weight gradients: strided operands");
        };
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => add(&mut d[a0..a1], &s[b0..b1]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => add(&mut d[a0..a1], &s[b0..b1]),
            (d, _) => candle_core::bail!("weight gradients: no in-place sum for {:?}", d.dtype()),
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<WeightGrads>>> = const { RefCell::new(None) };
}

/// The collector of the innermost scope on this thread.
pub fn current() -> Option<Arc<WeightGrads>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// `g` (the gradient of `w`) through `sink` when there is one: see [`WeightGrads::offer`].
pub(crate) fn route(
    sink: Option<&WeightGrads>,
    w: &Tensor,
    g: Option<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    match sink {
        Some(s) => s.offer(w, g),
        None => Ok(g),
    }
}

/// While alive, training ops built on this thread deliver weight gradients to its collector.
#[must_use = "the scope ends when this value is dropped"]
pub struct CollectScope {
    prev: Option<Arc<WeightGrads>>,
    /// Tied to the thread whose collector it set.
    _thread: PhantomData<*const ()>,
}

impl Drop for CollectScope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Opens a scope in which the training ops deliver to `sink`.
pub fn collect(sink: &Arc<WeightGrads>) -> CollectScope {
    let prev = CURRENT.with(|c| c.borrow_mut().replace(sink.clone()));
    CollectScope {
        prev,
        _thread: PhantomData,
    }
}
