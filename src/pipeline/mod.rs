//! The MCLD inference pipeline (SPEC §5): the networks loaded from their weight files, the
//! guided sampler, and what runs on it (`infer`'s one pair, the test set, the demo).

pub mod demo;
pub mod infer;
pub mod mcld;
pub mod sampler;
pub mod testset;
pub mod weight_files;
