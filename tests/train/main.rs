//! Training: the step at fixture parity, gradient coverage, finite differences, precision,
//! checkpointing, state round trips, and the collectives' gradient buckets and control channel.

#[path = "../common/mod.rs"]
mod common;

mod collective;
mod demo;
mod grad;
#[cfg(feature = "nccl")]
mod nccl;
mod plot;
mod run_loop;
mod schedule;
mod step;
mod steps;
mod trainer;
