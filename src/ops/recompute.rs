//! Activation recomputation ("gradient checkpointing" in PyTorch) for candle, which has none: a [`Tape`] of segments (UNet blocks)
//! whose forward pass keeps only each segment's inputs and outputs, and whose backward pass
//! recomputes one segment at a time with its graph, pushes the incoming gradient through it and
//! moves on. Peak memory holds one segment's activations instead of the whole network's.
//!
//! The rule callers keep: a segment's function is pure in its inputs (the same inputs give the
//! same outputs; the trained weights are captured, not inputs). Between segments, glue (ops
//! outside any segment, e.g. a downsampler) keeps its graph as usual and is not recomputed; it
//! may read segment outputs and feed later segments. Glue that reads other glue fed to segments
//! is correct but costly: each is pushed back through its whole graph when flushed, so the
//! shared part runs its backward once per flush (a chain of residuals between segments should
//! pass through segment outputs instead, and inputs many segments share go through
//! [`Tape::enter`], which flushes them once, together).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::{Error, Result};

type SegmentFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a>;

struct Segment<'a> {
    /// The tensors the segment was called with (tracked or not).
    inputs: Vec<Tensor>,
    /// Leaf tensors (`Var`s) standing for its outputs: gradients for them collect here.
    outputs: Vec<Tensor>,
    f: SegmentFn<'a>,
}

/// The segments of one forward pass, in execution order.
#[derive(Default)]
pub struct Tape<'a> {
    segments: RefCell<Vec<Segment<'a>>>,
}

fn as_leaf(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t.detach())?.as_tensor().clone())
}

impl<'a> Tape<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.segments.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on `inputs` now, keeping no graph inside it, and records it for recomputation.
    /// The returned tensors are leaves that stand for the outputs in later computations.
    pub fn run(
        &self,
        inputs: Vec<Tensor>,
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a,
    ) -> Result<Vec<Tensor>> {
        let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        // The graph built here (back to the weights) is dropped with `outs` below.
        let outs = f(&detached)?;
        let outputs = outs.iter().map(as_leaf).collect::<Result<Vec<_>>>()?;
        drop(outs);
        self.segments.borrow_mut().push(Segment {
            inputs,
            outputs: outputs.clone(),
            f: Box::new(f),
        });
        Ok(outputs)
    }

    /// Tensors computed before the first segment and read by many (a time embedding, contexts)
    /// through one identity segment: the segments read leaves, and the gradients of all of them
    /// are pushed back together once, at the end of the backward pass. As glue, each would be
    /// flushed after its own earliest consumer, and a graph they share pushed back once per flush.
    pub fn enter(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.run(inputs, |x| Ok(x.to_vec()))
    }

    /// Gradients of `loss` for every `Var` reached (weights), through the recorded segments.
    ///
    /// Glue (tracked tensors fed to segments that are not segment outputs) keeps its graph;
    /// the gradients the segments hand it are collected apart from candle's store and pushed
    /// back through that graph right after its earliest consumer is processed: by then every
    /// consumer has contributed, and no segment it was computed from has been processed yet.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let segments = std::mem::take(&mut *self.segments.borrow_mut());
        let output_ids: HashSet<TensorId> = segments
            .iter()
            .flat_map(|s| s.outputs.iter().map(|t| t.id()))
            .collect();
        let is_glue = |t: &Tensor| t.track_op() && !output_ids.contains(&t.id());
        // Each glue tensor under its earliest consumer.
        let mut seen: HashSet<TensorId> = HashSet::new();
        let mut glue_at: Vec<Vec<Tensor>> = vec![Vec::new(); segments.len()];
        for (i, seg) in segments.iter().enumerate() {
            for t in seg.inputs.iter().filter(|t| is_glue(t)) {
                if seen.insert(t.id()) {
                    glue_at[i].push(t.clone());
                }
            }
        }
        // Gradients handed to glue by segments (candle's store may hold by-products of the
        // glue's own graph under the same ids, already pushed through it).
        let mut glue_grads: HashMap<TensorId, Tensor> = HashMap::new();
        for (i, seg) in segments.iter().enumerate().rev() {
            // Gradients handed out by candle may still carry a graph (through the weights);
            // detached, they are plain values again.
            let upstream: Vec<Option<Tensor>> = seg
                .outputs
                .iter()
                .map(|o| grads.remove(o).map(|g| g.detach()))
                .collect();
            if upstream.iter().any(Option::is_some) {
                self.recompute(seg, &upstream, &mut grads, &mut glue_grads, &is_glue)?;
            }
            // Glue whose earliest consumer this was: complete now.
            let mut surrogate: Option<Tensor> = None;
            for t in &glue_at[i] {
                if let Some(g) = glue_grads.remove(&t.id()) {
                    let term = t
                        .mul(&g.to_dtype(t.dtype())?)?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F32)?;
                    surrogate = Some(match surrogate {
                        Some(s) => (s + term)?,
                        None => term,
                    });
                }
            }
            if let Some(s) = surrogate {
                grads.extend(s.backward()?)?;
            }
        }
        Ok(grads)
    }

    /// Recomputes `seg` with its graph and pushes `upstream` through it: input gradients go to
    /// `glue_grads` (glue) or `grads` (outputs of earlier segments), the weights' to `grads`.
    fn recompute(
        &self,
        seg: &Segment<'a>,
        upstream: &[Option<Tensor>],
        grads: &mut GradStore,
        glue_grads: &mut HashMap<TensorId, Tensor>,
        is_glue: &dyn Fn(&Tensor) -> bool,
    ) -> Result<()> {
        let leaves = seg.inputs.iter().map(as_leaf).collect::<Result<Vec<_>>>()?;
        let outs = (seg.f)(&leaves)?;
        if outs.len() != seg.outputs.len() {
            return Err(Error::msg(
                "checkpointed segment returned a different number of outputs on recomputation",
            ));
        }
        let mut surrogate: Option<Tensor> = None;
        for (o, g) in outs.iter().zip(upstream) {
            if let Some(g) = g {
                let term = o
                    .mul(&g.to_dtype(o.dtype())?)?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F32)?;
                surrogate = Some(match surrogate {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        let Some(surrogate) = surrogate else {
            return Ok(());
        };
        let mut local = surrogate.backward()?;
        for (leaf, orig) in leaves.iter().zip(&seg.inputs) {
            let Some(g) = local.remove(leaf).map(|g| g.detach()) else {
                continue;
            };
            if is_glue(orig) {
                let g = match glue_grads.remove(&orig.id()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                glue_grads.insert(orig.id(), g);
            } else if orig.track_op() || orig.is_variable() {
                // An earlier segment's output (a leaf standing for it).
                let g = match grads.remove(orig) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(orig, g);
            }
        }
        // What is left are the weights' gradients.
        grads.extend(local)?;
        Ok(())
    }
}
