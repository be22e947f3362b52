//! `mcld bench pipeline`: the MCLD pipeline at SD-1.5 size with random weights.

use clap::Args;

use crate::cli::ComputeArgs;
use crate::{Error, Result};

#[derive(Debug, Clone, Args)]
pub struct PipelineBenchArgs {
    /// Images to time (after one warm-up image).
    #[arg(long, default_value_t = 2)]
    pub images: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(_args: &PipelineBenchArgs) -> Result<()> {
    Err(Error::msg("bench pipeline: not built yet"))
}
