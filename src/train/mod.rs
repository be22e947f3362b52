//! Training (SPEC §4) in three parts, with dependencies pointing one way (`run` uses `step` and
//! `dist`; `step` and `dist` use neither):
//!
//! - [`step`]: one training step on a batch: the networks' starting weights, the loss, the
//!   trainable parameters, AdamW and the f16 loss scaler, behind the [`step::api::TrainStep`]
//!   contract (the step never sees a file list).
//! - [`run`]: the loop around any step (`mcld train`, `mcld demo --train`): data, epochs,
//!   accumulation, the learning-rate schedule, logs and the loss curve, run checkpoints and
//!   resume, validation grids, the dry run (the loop never sees a network).
//! - [`dist`]: data-parallel plumbing the loop talks to: the rank contract of torchrun, the
//!   collectives (threads, TCP, NCCL) and the gradient buckets.

pub mod dist;
pub mod run;
pub mod step;
