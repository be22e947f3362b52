//! The training ops for CUDA tensors (issue #24): convolution through cuDNN (forward,
//! backward-data, backward-filter; `cudnn` feature) and attention in blocks of query rows with
//! a recomputing backward pass (cuBLAS products). GroupNorm, LayerNorm and GEGLU keep candle's
//! composed ops on CUDA.

pub mod attention;
#[cfg(feature = "cudnn")]
pub mod conv;
