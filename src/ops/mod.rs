//! Compute kernels with a backward pass of their own, exposed to candle's autograd as custom ops
//! (the training path's counterparts of the inference kernels in `models`).

pub mod attention_grad;
pub mod conv_grad;
mod elem;
pub mod norm_grad;

/// Whether the training path takes these ops (the default) or candle's composed ones
/// (`MCLD_TRAIN_OPS=candle`, kept for side-by-side measurements in one sitting).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MCLD_TRAIN_OPS").map_or(true, |v| v != "candle"))
}
