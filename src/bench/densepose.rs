//! `mcld bench densepose`: DensePose R-CNN R-101 at DeepFashion size with random weights.

use clap::Args;

use crate::cli::ComputeArgs;
use crate::{Error, Result};

#[derive(Debug, Clone, Args)]
pub struct DenseposeBenchArgs {
    /// Images to time (after one warm-up image).
    #[arg(long, default_value_t = 2)]
    pub images: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(_args: &DenseposeBenchArgs) -> Result<()> {
    Err(Error::msg("bench densepose: not built yet"))
}
