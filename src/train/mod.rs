//! Training (SPEC §4): the step (networks, loss, backward, AdamW) and the loop around it
//! (data, checkpoints, resume, ranks, logs).

pub mod adamw;
pub mod api;
pub mod bucket;
pub mod checkpoint;
pub mod cmd;
pub mod collective;
pub mod demo;
pub mod dry_run;
pub mod init;
pub mod loss;
pub mod lr;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod params;
pub mod plot;
pub mod run;
pub mod scaler;
pub mod setup;
pub mod state;
pub mod trainer;
pub mod validate;

pub use setup::build_step;
