//! mcld: Multi-focal Conditioned Latent Diffusion for pose-guided person image synthesis,
//! on candle. The binary in `main.rs` is a thin CLI over these modules.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod download;
pub mod edit;
pub mod error;
pub mod evaluate;
pub mod fsutil;
pub mod imageops;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod person;
pub mod pipeline;
pub mod prepare;
pub mod presets;
pub mod rank;
pub mod scheduler;
pub mod serve;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
