//! `mcld prepare` (SPEC §2): split, pairs, DensePose IUV, texture maps, face embeddings, stats.

pub mod densepose;
pub mod telea;
pub mod texture;
