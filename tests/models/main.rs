//! The networks against their reference fixtures (UNet, VAE, CLIP, pose guider, projector).
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod clip;
mod gpu_memory;
mod mcld;
mod pose_guider;
mod resampler;
mod unet;
mod vae;
