//! The `mcld` command line: parses and dispatches; each command's arguments and body live with
//! the command (`prepare`, `pipeline::commands`, `evaluate`, `bench`). Flags keep the
//! reference's spellings (`--save_path`, `--ckpt_dir`, ...) so its README carries over; each
//! also has a kebab-case alias.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::evaluate::EvaluateArgs;
use crate::pipeline::commands::{DemoArgs, InferArgs, TestArgs};
use crate::prepare::command::PrepareArgs;

#[derive(Debug, Parser)]
#[command(
    name = "mcld",
    version,
    about = "Multi-focal Conditioned Latent Diffusion: pose-guided person image synthesis",
    long_about = "mcld reproduces MCLD (CVPR 2025) end to end on candle: prepare DeepFashion, \
                  train, generate the test set, evaluate, and move a person into a new pose."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Split raw DeepFashion, build pairs, DensePose IUV, texture maps, face embeddings, stats.
    Prepare(PrepareArgs),
    /// Train MCLD on one or many GPUs.
    Train(TrainArgs),
    /// Generate the whole test set (8,570 pairs) at 256x176 and 512x352.
    Test(TestArgs),
    /// FID, LPIPS, SSIM, PSNR and face similarity of generated images against ground truth.
    Evaluate(EvaluateArgs),
    /// One source photo + one target pose -> one image, no dataset needed.
    Infer(InferArgs),
    /// `infer` with another person's identity and/or garments swapped in (no new network).
    Edit(crate::edit::EditArgs),
    /// Run the whole pipeline on a built-in sample with tiny untrained weights (no downloads);
    /// with --train, train tiny weights on the CPU on a dataset made from the sample.
    Demo(DemoArgs),
    /// Time full-size networks with random weights (no downloads); prints the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fetch, check and place the models the other commands read (Hugging Face Hub, model zoos).
    Download(crate::download::DownloadArgs),
    /// A local web page to re-pose and dress people, on networks loaded once.
    Serve(crate::serve::ServeArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The MCLD pipeline at SD-1.5 size: seconds per image and peak memory.
    Pipeline(crate::bench::pipeline::PipelineBenchArgs),
    /// DensePose R-CNN R-101 at DeepFashion size (750x1101): images per second.
    Densepose(crate::bench::densepose::DenseposeBenchArgs),
    /// MCLD's training step on the full trainable set: seconds per phase and peak memory.
    Train(crate::bench::train::TrainBenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training config (the reference's keys).
    #[arg(long, default_value = "configs/train/train.yaml")]
    pub config: PathBuf,
    /// Optimizer steps to train to (overrides `solver.max_train_steps`).
    #[arg(long = "max_train_steps", visible_alias = "max-train-steps")]
    pub max_train_steps: Option<usize>,
    /// Experiments folder (overrides `output_dir`); the run writes OUTPUT_DIR/<exp_name>/.
    #[arg(long = "output_dir", visible_alias = "output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Checkpoint every N steps (overrides `checkpointing_steps`).
    #[arg(long = "checkpointing_steps", visible_alias = "checkpointing-steps")]
    pub checkpointing_steps: Option<usize>,
    /// Validation and loss curve every N steps (overrides `val.validation_steps`).
    #[arg(long = "validation_steps", visible_alias = "validation-steps")]
    pub validation_steps: Option<usize>,
    /// `latest` (from scratch when there is none yet) or a checkpoint folder.
    #[arg(
        long = "resume_from_checkpoint",
        visible_alias = "resume-from-checkpoint"
    )]
    pub resume_from_checkpoint: Option<String>,
    /// Batch size per process (overrides `data.train_bs`).
    #[arg(long = "train_bs", visible_alias = "train-bs")]
    pub train_bs: Option<usize>,
    /// cpu, cuda or cuda:N; default the config's `device`.
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16; default the config's `weight_dtype`.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Start N local ranks (one process each, torchrun's variables); not needed under torchrun.
    #[arg(long = "nproc-per-node", visible_alias = "nproc_per_node")]
    pub nproc_per_node: Option<usize>,
}

/// Outcome of a command that could not do its work.
#[derive(Debug)]
pub enum CliError {
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::Failed(e.into())
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Prepare(a) => Ok(crate::prepare::command::run(&a)?),
        Command::Train(a) => {
            let cmd = crate::train::cmd::TrainCommand {
                config: a.config,
                max_train_steps: a.max_train_steps,
                output_dir: a.output_dir,
                checkpointing_steps: a.checkpointing_steps,
                validation_steps: a.validation_steps,
                resume_from_checkpoint: a.resume_from_checkpoint,
                train_bs: a.train_bs,
                device: a.device,
                dtype: a.dtype,
                nproc_per_node: a.nproc_per_node,
            };
            Ok(crate::train::cmd::run_or_launch(&cmd)?)
        }
        Command::Test(a) => Ok(crate::pipeline::commands::test(&a)?),
        Command::Evaluate(a) => Ok(crate::evaluate::run(&a)?),
        Command::Infer(a) => Ok(crate::pipeline::commands::infer(&a)?),
        Command::Edit(a) => Ok(crate::edit::run(&a)?),
        Command::Demo(a) if a.train => {
            let dir = a
                .workdir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./mcld_demo_train"));
            Ok(crate::train::demo::run(&dir, a.train_steps).map(|_| ())?)
        }
        Command::Demo(a) => Ok(crate::pipeline::commands::demo_command(&a)?),
        Command::Bench(BenchCommand::Pipeline(a)) => Ok(crate::bench::pipeline::run(&a)?),
        Command::Bench(BenchCommand::Densepose(a)) => Ok(crate::bench::densepose::run(&a)?),
        Command::Bench(BenchCommand::Train(a)) => Ok(crate::bench::train::run(&a)?),
        Command::Download(a) => Ok(crate::download::run_cli(&a)?),
        Command::Serve(a) => Ok(crate::serve::run(&a)?),
    }
}
