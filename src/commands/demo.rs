//! `mcld demo`: the whole pipeline on the built-in sample with tiny untrained weights, or with
//! `--train` a few training steps on a dataset made from the sample.

use std::path::PathBuf;

use clap::Args;

use crate::Result;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Side-by-side result (source | pose | texture | output).
    #[arg(long, default_value = "mcld_demo_untrained.png")]
    pub out: PathBuf,
    /// DDIM steps (the real pipeline uses 20; fewer keep the demo quick on a CPU).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Keep the tiny weights, configs and sample inputs here (DIR/checkpoints/,
    /// DIR/pretrained_weights/, DIR/train.yaml, DIR/inputs/) so `mcld infer` can be re-run on
    /// them; with --train, where the training demo writes (default ./mcld_demo_train).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Train instead: a tiny dataset from the sample, tiny base models, a few CPU steps.
    #[arg(long)]
    pub train: bool,
    /// Optimizer steps of the training demo.
    #[arg(
        long = "train-steps",
        visible_alias = "train_steps",
        default_value_t = 40
    )]
    pub train_steps: usize,
    /// Where the training demo trains: cpu, cuda or cuda:N (the setup is written on the CPU
    /// either way; the untrained-image demo always runs on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs the demo `a` asks for (`--train`: the training demo, in `--workdir` or
/// ./mcld_demo_train).
pub fn run(a: &DemoArgs) -> Result<()> {
    if a.train {
        let dir = a
            .workdir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./mcld_demo_train"));
        return crate::train::run::demo::run(&dir, a.train_steps, &a.device).map(|_| ());
    }
    crate::pipeline::demo::run(&a.out, a.workdir.clone(), a.steps)
}
