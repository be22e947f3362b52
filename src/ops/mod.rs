//! The compute layer under the networks: CPU kernels (packed GEMM, convolution, attention,
//! norms, GEGLU) with candle's generic ops as the fallback for everything they do not cover,
//! and the activation recomputation tape that training uses. Nothing here knows a network:
//! `models` builds on `ops`, never the other way round (candle-core/candle-nn vs
//! candle-transformers).

pub mod attention;
pub mod conv;
pub mod geglu;
pub(crate) mod host;
pub mod linear;
pub mod norm;
pub mod packed_gemm;
pub mod recompute;
