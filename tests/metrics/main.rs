//! The metrics (PSNR, SSIM, LPIPS, Inception/FID, pt_inception, face similarity).
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod evaluate_face;
mod fid;
mod inception;
mod lpips;
mod psnr_ssim;
mod pt_inception;
