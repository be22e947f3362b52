//! `mcld bench`: full-size networks with random weights, timed (no downloads).

use clap::{Args, Subcommand};

use super::args::ComputeArgs;
use crate::bench::densepose::DenseposeBench;
use crate::bench::pipeline::PipelineBench;
use crate::bench::train::{Optimizer, TrainBench, Width};
use crate::Result;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The MCLD pipeline at SD-1.5 size: seconds per image and peak memory.
    Pipeline(PipelineBenchArgs),
    /// DensePose R-CNN R-101 at DeepFashion size (750x1101): images per second.
    Densepose(DenseposeBenchArgs),
    /// MCLD's training step on the full trainable set: seconds per phase and peak memory.
    Train(TrainBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DenseposeBenchArgs {
    /// Images to time (after one warm-up image).
    #[arg(long, default_value_t = 2)]
    pub images: usize,
    /// Also time `prepare`'s own path (`iuv_batch`) with this many same-size photos per
    /// backbone pass; it runs the DensePose branch only where random weights detect something.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// detectron2 YAML; default the shipped densepose_rcnn_R_101_FPN_DL_s1x.yaml.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PipelineBenchArgs {
    /// Images to time (after the warm-up batch).
    #[arg(long, default_value_t = 2)]
    pub images: usize,
    /// DDIM steps per image (MCLD uses 20).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Square image size the networks run at (MCLD: 512; a multiple of 64).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Pairs per forward pass (the loop runs twice that for guidance).
    #[arg(long = "batch-size", visible_alias = "batch_size", default_value_t = 1)]
    pub batch_size: usize,
    /// Untimed warm-up batches before timing (0 skips it; useful on a slow CPU).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the random weights and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TrainBenchArgs {
    /// Square image size (latents are size / 8; MCLD trains at 512).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Samples per step.
    #[arg(long = "batch-size", visible_alias = "batch_size", default_value_t = 1)]
    pub batch_size: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// UNet channel widths: full (SD-1.5) or half.
    #[arg(long, value_enum, default_value_t = Width::Full)]
    pub width: Width,
    /// Include the AdamW update (with grad-norm clipping) or stop after the backward pass.
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    pub optimizer: Optimizer,
    /// Recompute each UNet block in the backward pass instead of keeping its activations.
    #[arg(long = "grad-checkpointing", visible_alias = "gradient_checkpointing")]
    pub grad_checkpointing: bool,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(c: &BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Pipeline(a) => crate::bench::pipeline::run(&PipelineBench {
            images: a.images,
            steps: a.steps,
            size: a.size,
            batch_size: a.batch_size,
            warmup: a.warmup,
            seed: a.seed,
            device: a.compute.device()?,
            dtype: a.compute.dtype()?,
        }),
        BenchCommand::Densepose(a) => crate::bench::densepose::run(&DenseposeBench {
            images: a.images,
            batch: a.batch,
            seed: a.seed,
            config: a.config.clone(),
            device: a.compute.device()?,
            dtype: a.compute.dtype()?,
        }),
        BenchCommand::Train(a) => crate::bench::train::run(&TrainBench {
            size: a.size,
            batch_size: a.batch_size,
            steps: a.steps,
            width: a.width,
            optimizer: a.optimizer,
            grad_checkpointing: a.grad_checkpointing,
            warmup: a.warmup,
            seed: a.seed,
            device: a.compute.device()?,
            dtype: a.compute.dtype()?,
        }),
    }
}
