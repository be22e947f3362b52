//! The compute layer (`mcld::ops`): the packed GEMM, convolution, attention, norm and GEGLU
//! kernels against f64 references and candle's composed ops.

#[path = "../common/mod.rs"]
mod common;

mod attention;
mod attention_chunked;
mod blocked_attention;
mod conv;
mod conv_ops;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod fused;
mod grad_check;
mod packed_gemm;
mod tensor_ops;
