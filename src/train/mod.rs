//! Training (SPEC §4): the step (networks, loss, backward, AdamW) and the loop around it.

pub mod adamw;
pub mod api;
pub mod init;
pub mod loss;
pub mod params;
pub mod scaler;
pub mod setup;
pub mod state;
pub mod tiny;
pub mod trainer;
