//! The networks of MCLD (SPEC §3), each a `Config` + `new(vb, cfg)` + `forward`, and those of
//! data preparation (DensePose R-CNN, the InsightFace face models).

pub mod clip;
pub mod densepose;
pub mod face;
pub mod layers;
pub mod mcld;
pub mod pose_guider;
pub mod resampler;
pub mod unet;
pub mod vae;
