//! The compute layer under the networks: CPU kernels (packed GEMM, convolution, attention,
//! norms, GEGLU) with candle's generic ops as the fallback for everything they do not cover,
//! and the activation recomputation tape that training uses. Nothing here knows a network:
//! `models` builds on `ops`, never the other way round (candle-core/candle-nn vs
//! candle-transformers).

pub mod attention;
pub mod autocast;
pub mod conv;
pub mod conv_grad;
pub mod cuda;
mod elem;
pub mod geglu;
pub mod geglu_grad;
pub(crate) mod host;
pub mod linear;
pub mod linear_grad;
pub mod norm;
pub mod packed_gemm;
pub mod recompute;
pub mod weight_grads;

/// Whether the training path takes the custom ops with backward passes of their own
/// ([`conv_grad`], [`attention::grad`], [`norm::grad`], [`geglu_grad`], [`linear_grad`]; the
/// default) or candle's composed ops
/// (`MCLD_TRAIN_OPS=candle`, kept for side-by-side measurements in one sitting).
pub fn train_ops_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MCLD_TRAIN_OPS").map_or(true, |v| v != "candle"))
}
