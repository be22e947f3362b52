//! The networks of MCLD (SPEC §3), each a `Config` + `new(vb, cfg)` + `forward`.

pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod cpu_attention;
mod host;
pub mod nn;
pub mod pose_guider;
pub mod resampler;
pub mod unet;
pub mod vae;
