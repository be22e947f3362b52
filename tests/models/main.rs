//! The networks against their reference fixtures (UNet, VAE, CLIP, pose guider, projector, kernels).
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod bf16_gemm;
mod clip;
mod conv;
mod cpu_attention;
mod fused;
mod gpu_memory;
mod mcld;
mod nn;
mod pose_guider;
mod resampler;
mod unet;
mod vae;
