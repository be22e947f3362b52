//! The contract between the training loop (`mcld train`: data, checkpoints, resume, ranks) and
//! the training step (networks, loss, backward, optimizer). The loop never sees a network; the
//! step never sees a file list.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::weights::files;
use crate::Result;

pub use crate::data::train_set::TrainBatch;

/// Gradients of the trainable tensors, in the step's fixed order, plus the loss they came from.
/// Micro-batches and ranks are combined with [`Grads::add`] and [`Grads::scale`] (mean).
#[derive(Debug, Clone)]
pub struct Grads {
    pub tensors: Vec<Tensor>,
    /// Mean loss of the micro-batch (unscaled, whatever the loss scale).
    pub loss: f64,
    /// Samples that produced these gradients.
    pub samples: usize,
}

impl Grads {
    /// Element-wise sum (losses and sample counts add too).
    pub fn add(&self, other: &Grads) -> Result<Grads> {
        if self.tensors.len() != other.tensors.len() {
            return Err(crate::Error::msg(format!(
                "gradient sets differ in length: {} vs {}",
                self.tensors.len(),
                other.tensors.len()
            )));
        }
        let tensors = self
            .tensors
            .iter()
            .zip(&other.tensors)
            .map(|(a, b)| Ok(a.add(b)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Grads {
            tensors,
            loss: self.loss + other.loss,
            samples: self.samples + other.samples,
        })
    }

    /// Multiplies gradients and loss by `s` (1/n after summing n micro-batches or ranks).
    pub fn scale(&self, s: f64) -> Result<Grads> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| Ok((t * s)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Grads {
            tensors,
            loss: self.loss * s,
            samples: self.samples,
        })
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    /// Global L2 norm of the (unscaled) gradients before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// f16 only: the step was skipped because a gradient was inf/NaN (the scale was lowered).
    pub skipped: bool,
    /// f16 only: the loss scale after this step.
    pub loss_scale: Option<f64>,
}

/// The four networks a checkpoint folder holds, under the released checkpoints' file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    ReferenceUnet,
    DenoisingUnet,
    PoseGuider,
    ImageProj,
}

impl Net {
    pub const ALL: [Net; 4] = [
        Net::ReferenceUnet,
        Net::DenoisingUnet,
        Net::PoseGuider,
        Net::ImageProj,
    ];

    /// File name inside `checkpoint-N/` (what `mcld test --ckpt_dir` reads).
    pub fn file_name(self) -> &'static str {
        match self {
            Net::ReferenceUnet => files::REFERENCE_UNET.safetensors,
            Net::DenoisingUnet => files::DENOISING_UNET.safetensors,
            Net::PoseGuider => files::POSE_GUIDER.safetensors,
            Net::ImageProj => files::IMAGE_PROJECTOR.safetensors,
        }
    }
}

/// The training step as the loop drives it. Every random draw of a step comes from the `rng`
/// the loop passes in, so a resumed run makes the same draws (see [`step_rng`]).
pub trait TrainStep {
    /// Forward and backward on one micro-batch; gradients are not applied.
    fn grads(&mut self, batch: &TrainBatch, rng: &mut StdRng) -> Result<Grads>;
    /// Clips, applies AdamW at `lr` and advances the step counter (unless f16 skips the step).
    fn apply(&mut self, grads: &Grads, lr: f64) -> Result<StepStats>;
    /// Optimizer steps applied so far (skipped f16 steps included).
    fn step_count(&self) -> u64;
    /// Current weights of one network, detached, f32, under the released key names.
    fn weights(&self, net: Net) -> Result<HashMap<String, Tensor>>;
    /// Writes the trainable state (weights, AdamW moments, step, loss scale) into `dir`.
    fn save_state(&self, dir: &Path) -> Result<()>;
    /// Reads what [`TrainStep::save_state`] wrote.
    fn load_state(&mut self, dir: &Path) -> Result<()>;
}

/// The generator for one micro-batch: a pure function of the run's seed, the optimizer step, the
/// rank and the micro-batch index, so resuming needs no generator state.
pub fn step_rng(seed: u64, step: u64, rank: usize, micro: usize) -> StdRng {
    // SplitMix64 finaliser over the packed coordinates: distinct inputs give unrelated seeds.
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ (micro as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    StdRng::seed_from_u64(z)
}
