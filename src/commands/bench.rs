//! `mcld bench`: full-size networks with random weights, timed (no downloads).

use clap::builder::{PossibleValuesParser, TypedValueParser};
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
    #[arg(long, default_value = "full", value_parser = width_parser())]
    pub width: Width,
    /// Include the AdamW update (with grad-norm clipping) or stop after the backward pass.
    #[arg(long, default_value = "adamw", value_parser = optimizer_parser())]
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

/// `--width`: the bench's own type stays free of clap; the names are the CLI's.
fn width_parser() -> impl TypedValueParser<Value = Width> {
    PossibleValuesParser::new(["full", "half"]).map(|s| match s.as_str() {
        "half" => Width::Half,
        _ => Width::Full,
    })
}

/// `--optimizer`, like [`width_parser`].
fn optimizer_parser() -> impl TypedValueParser<Value = Optimizer> {
    PossibleValuesParser::new(["adamw", "none"]).map(|s| match s.as_str() {
        "none" => Optimizer::None,
        _ => Optimizer::Adamw,
    })
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        bench: BenchCommand,
    }

    fn train(args: &[&str]) -> TrainBenchArgs {
        let argv = [&["mcld", "train"], args].concat();
        match Cli::try_parse_from(argv).unwrap().bench {
            BenchCommand::Train(a) => a,
            _ => unreachable!("parsed `train` as another bench"),
        }
    }

    #[test]
    fn width_and_optimizer_names_map_to_the_bench_types() {
        let a = train(&[]);
        assert_eq!((a.width, a.optimizer), (Width::Full, Optimizer::Adamw));
        let a = train(&["--width", "half", "--optimizer", "none"]);
        assert_eq!((a.width, a.optimizer), (Width::Half, Optimizer::None));
        let a = train(&["--width", "full", "--optimizer", "adamw"]);
        assert_eq!((a.width, a.optimizer), (Width::Full, Optimizer::Adamw));
        assert!(Cli::try_parse_from(["mcld", "train", "--width", "quarter"]).is_err());
        assert!(Cli::try_parse_from(["mcld", "train", "--optimizer", "sgd"]).is_err());
    }
}
