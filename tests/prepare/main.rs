//! `mcld prepare`: split, pairs, texture maps (Telea), faces, DensePose and its stage.
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod densepose;
mod densepose_stage;
mod face;
mod split;
mod telea;
mod texture;
