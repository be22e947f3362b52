//! The foundations: weight loading, configs, image ops, the DDIM scheduler, dataset helpers.
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod config;
mod data_face_mask;
mod imageops;
mod presets;
mod scheduler;
mod weights;
