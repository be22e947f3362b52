//! Data-parallel plumbing of training: which rank this process is ([`rank`]), the collective
//! operations the loop needs ([`collective`]: one process, ranks as threads), the same between
//! processes over TCP ([`tcp`]) and on GPUs through NCCL (`nccl`, `nccl` feature), and the
//! gradient buckets NCCL reduces ([`bucket`]). Knows tensors, not networks or training.

pub mod bucket;
pub mod collective;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rank;
pub mod tcp;
