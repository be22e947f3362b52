//! `mcld prepare` (SPEC §2): split, pairs, DensePose IUV, texture maps, face embeddings, stats.

pub mod densepose;
pub mod face;
pub mod pairs;
pub mod report;
pub mod run;
pub mod split;
pub mod stats;

pub use report::{PrepareReport, StageReport, StageStatus};
pub use run::{run_prepare, PrepareOptions, Stage};
