//! The contract between the training loop ([`crate::train::run`]: data, checkpoints, resume,
//! ranks) and the training step (this folder: networks, loss, backward, optimizer). The loop
//! never sees a network; the step never sees a file list.

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
    /// One per trainable tensor; zeros where [`Grads::has_grad`] is false.
    pub tensors: Vec<Tensor>,
    /// Whether the tensor got a gradient at all (torch: `grad is not None`). The optimizer
    /// leaves a tensor without one untouched. Empty means all did.
    pub has_grad: Vec<bool>,
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
        let (a, b) = (self.flags(), other.flags());
        Ok(Grads {
            tensors,
            has_grad: a.iter().zip(&b).map(|(x, y)| *x || *y).collect(),
            loss: self.loss + other.loss,
            samples: self.samples + other.samples,
        })
    }

    /// [`Grads::has_grad`] spelled out (one flag per tensor).
    pub fn flags(&self) -> Vec<bool> {
        if self.has_grad.len() == self.tensors.len() {
            self.has_grad.clone()
        } else {
            vec![true; self.tensors.len()]
        }
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
            has_grad: self.has_grad.clone(),
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

/// The training step as the loop drives it. Every random draw of a step comes from the
/// generators the loop passes in, so a resumed run makes the same draws (see [`step_rngs`]).
pub trait TrainStep {
    /// Forward and backward on one micro-batch; gradients are not applied.
    fn grads(&mut self, batch: &TrainBatch, rngs: &mut StepRngs) -> Result<Grads>;
    /// Clips, applies AdamW at `lr` and advances the step counter (an f16 step skipped for a
    /// non-finite gradient advances only the step counter, not the optimizer's counts).
    fn apply(&mut self, grads: &Grads, lr: f64) -> Result<StepStats>;
    /// Training steps taken so far (skipped f16 steps included): the loop's position.
    fn step_count(&self) -> u64;
    /// Updates the optimizer applied (skipped f16 steps not counted): where the lr schedule
    /// stands, as accelerate steps it only after an applied update.
    fn updates_applied(&self) -> u64 {
        self.step_count()
    }
    /// Current weights of one network, detached, f32, under the released key names.
    fn weights(&self, net: Net) -> Result<HashMap<String, Tensor>>;
    /// Writes the trainable state (weights, AdamW moments, step, loss scale) into `dir`.
    fn save_state(&self, dir: &Path) -> Result<()>;
    /// Reads what [`TrainStep::save_state`] wrote.
    fn load_state(&mut self, dir: &Path) -> Result<()>;
}

/// The per-rank generator for one micro-batch: a pure function of the run's seed, the optimizer
/// step, the rank and the micro-batch index, so resuming needs no generator state.
pub fn step_rng(seed: u64, step: u64, rank: usize, micro: usize) -> StdRng {
    StdRng::seed_from_u64(mix(seed, step, rank as u64, micro as u64))
}

/// The generator every rank shares for one micro-batch (the reference seeds every rank alike,
/// so its step-level decisions agree across ranks).
pub fn shared_rng(seed: u64, step: u64, micro: usize) -> StdRng {
    // A rank coordinate no real rank has keeps this stream apart from every per-rank one.
    StdRng::seed_from_u64(mix(seed, step, u64::MAX, micro as u64))
}

/// The two generators of one micro-batch: `shared` for step-level decisions (unconditional
/// step, CLIP drop), the same on every rank; `local` for per-sample draws (noise, timesteps,
/// offsets, VAE samples), one stream per rank.
#[derive(Debug, Clone)]
pub struct StepRngs {
    pub shared: StdRng,
    pub local: StdRng,
}

pub fn step_rngs(seed: u64, step: u64, rank: usize, micro: usize) -> StepRngs {
    StepRngs {
        shared: shared_rng(seed, step, micro),
        local: step_rng(seed, step, rank, micro),
    }
}

/// SplitMix64 finaliser over the packed coordinates: distinct inputs give unrelated seeds.
fn mix(seed: u64, step: u64, rank: u64, micro: u64) -> u64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ rank.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ micro.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z
}
