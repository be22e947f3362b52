//! Training: the step at fixture parity, gradient coverage, finite differences, precision,
//! checkpointing, state round trips.

#[path = "../common/mod.rs"]
mod common;

mod demo;
mod grad;
mod run_loop;
mod step;
mod trainer;
