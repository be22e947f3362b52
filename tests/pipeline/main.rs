//! The inference pipeline: the sampler against `pipeline_small`, half precision, the resumable
//! test run and its shards, the bench, `mcld edit`.
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod edit;
mod half;
mod shard;
mod small;
mod testset;
