//! The training ops for CUDA tensors (issue #24): convolution through cuDNN (forward,
//! backward-data, backward-filter; `cudnn` feature) and attention in blocks of query rows with
//! a recomputing backward pass (cuBLAS products), GroupNorm(+SiLU) and LayerNorm keeping only
//! their group statistics, and GEGLU keeping only its input. All but the convolution are
//! candle tensor code, so the CPU tests run them too.

mod adopt;
pub mod attention;
pub mod conv;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod geglu;
pub mod norm;
