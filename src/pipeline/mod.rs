//! The MCLD inference pipeline (SPEC §5) and the commands built on it (`test`, `infer`).

pub mod checkpoints;
pub mod commands;
pub mod demo;
pub mod mcld;
pub mod preprocess;
pub mod sampler;
pub mod testset;
