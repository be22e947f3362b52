//! Activation recomputation ("gradient checkpointing" in PyTorch) for candle, which has none: a [`Tape`] of segments (UNet blocks)
//! whose forward pass keeps only each segment's inputs and outputs, and whose backward pass
//! recomputes one segment at a time with its graph, pushes the incoming gradient through it and
//! moves on. Peak memory holds one segment's activations instead of the whole network's.
//!
//! Rules the callers keep: a segment's function is pure in its inputs (the same inputs give the
//! same outputs; the trained weights are captured, not inputs), and glue computed outside the
//! segments may feed segments but may not be computed from a segment's output except on the
//! way to the loss (the final `loss.backward()` covers that path). [`Tape::backward`] checks the
//! second rule and fails loudly when it is broken.

use std::cell::RefCell;
use std::collections::HashSet;

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

    /// Gradients of `loss` for every `Var` reached (weights), through the recorded segments.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let segments = std::mem::take(&mut *self.segments.borrow_mut());
        let output_ids: HashSet<TensorId> = segments
            .iter()
            .flat_map(|s| s.outputs.iter().map(|t| t.id()))
            .collect();
        // Tracked glue tensors that fed segments, with the gradient they received.
        let mut glue: Vec<Tensor> = Vec::new();
        let mut glue_ids: HashSet<TensorId> = HashSet::new();
        for seg in segments.iter().rev() {
            // Gradients handed out by candle may still carry a graph (through the weights);
            // detached, they are plain values again.
            let upstream: Vec<Option<Tensor>> = seg
                .outputs
                .iter()
                .map(|o| grads.remove(o).map(|g| g.detach()))
                .collect();
            if upstream.iter().all(Option::is_none) {
                continue;
            }
            let leaves = seg.inputs.iter().map(as_leaf).collect::<Result<Vec<_>>>()?;
            let outs = (seg.f)(&leaves)?;
            if outs.len() != seg.outputs.len() {
                return Err(Error::msg(
                    "checkpointed segment returned a different number of outputs on recomputation",
                ));
            }
            let mut surrogate: Option<Tensor> = None;
            for (o, g) in outs.iter().zip(&upstream) {
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
            let Some(surrogate) = surrogate else { continue };
            let mut local = surrogate.backward()?;
            // Input gradients go to the tensors the segment was called with.
            for (leaf, orig) in leaves.iter().zip(&seg.inputs) {
                if let Some(g) = local.remove(leaf).map(|g| g.detach()) {
                    if orig.track_op() || output_ids.contains(&orig.id()) {
                        let g = match grads.remove(orig) {
                            Some(prev) => (prev + g)?,
                            None => g,
                        };
                        grads.insert(orig, g);
                        if !output_ids.contains(&orig.id()) && glue_ids.insert(orig.id()) {
                            glue.push(orig.clone());
                        }
                    }
                }
            }
            // What is left are the weights' gradients.
            grads.extend(local)?;
        }
        // Finally push the gradients of the glue that fed the segments through its graph.
        let mut surrogate: Option<Tensor> = None;
        for t in &glue {
            if let Some(g) = grads.remove(t).map(|g| g.detach()) {
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
            let local = s.backward()?;
            if let Some(id) = output_ids.iter().find(|id| local.get_id(**id).is_some()) {
                return Err(Error::msg(format!(
                    "checkpointing: glue computed from a segment output ({id:?}) fed another segment"
                )));
            }
            grads.extend(local)?;
        }
        Ok(grads)
    }
}
