//! The networks of MCLD (SPEC §3), each a `Config` + `new(vb, cfg)` + `forward`, and those of
//! data preparation (DensePose R-CNN, the InsightFace face models).

pub mod bf16_gemm;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod cpu_attention;
pub mod densepose;
pub mod face;
pub mod fused;
mod host;
pub mod linear;
pub mod mcld;
pub mod nn;
pub mod pose_guider;
pub mod resampler;
pub mod unet;
pub mod vae;
