//! Training (SPEC §4): the step (networks, loss, backward, AdamW) and the loop around it.

pub mod api;
pub mod build;
pub mod checkpoint;
pub mod cmd;
pub mod collective;
pub mod plot;
pub mod run;

pub use build::build_step;
