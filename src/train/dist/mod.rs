//! Data-parallel plumbing of training: the rank contract of torchrun and the collective
//! operations the loop needs ([`collective`]: one process, ranks as threads, processes over
//! TCP), on GPUs through NCCL (`nccl`, `nccl` feature), and the gradient buckets NCCL reduces
//! ([`bucket`]). Knows tensors, not networks or training.

pub mod bucket;
pub mod collective;
#[cfg(feature = "nccl")]
pub mod nccl;
