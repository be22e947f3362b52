//! `mcld train`: the config plus what people change per run, on one or many processes.

use std::path::PathBuf;

use clap::Args;

use crate::train::run::cmd::TrainCommand;
use crate::Result;

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
    /// f32, f16 or bf16 for networks and encoders; default `solver.mixed_precision` for the
    /// trained networks and `weight_dtype` for the frozen VAE and CLIP.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Check the config, data lists, weights and output folder and print the plan (steps,
    /// epochs, batch, learning rates, trained/frozen counts, checkpoints, memory) without
    /// training.
    #[arg(long = "dry-run", visible_alias = "dry_run")]
    pub dry_run: bool,
    /// Start N local ranks (one process each, torchrun's variables); not needed under torchrun.
    #[arg(long = "nproc-per-node", visible_alias = "nproc_per_node")]
    pub nproc_per_node: Option<usize>,
}

impl TrainArgs {
    /// The plain request the training module takes.
    pub fn request(&self) -> TrainCommand {
        TrainCommand {
            config: self.config.clone(),
            max_train_steps: self.max_train_steps,
            output_dir: self.output_dir.clone(),
            checkpointing_steps: self.checkpointing_steps,
            validation_steps: self.validation_steps,
            resume_from_checkpoint: self.resume_from_checkpoint.clone(),
            train_bs: self.train_bs,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            dry_run: self.dry_run,
            nproc_per_node: self.nproc_per_node,
        }
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
    crate::train::run::cmd::run_or_launch(&a.request())
}
