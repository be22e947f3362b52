//! The `mcld` command line: parses and dispatches to `commands`, where each subcommand's
//! arguments and body live.

use clap::{Parser, Subcommand};

use crate::commands::{self, bench::BenchCommand};

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
    Prepare(commands::prepare::PrepareArgs),
    /// Train MCLD on one or many GPUs.
    Train(commands::train::TrainArgs),
    /// Generate the whole test set (8,570 pairs) at 256x176 and 512x352.
    Test(commands::test::TestArgs),
    /// FID, LPIPS, SSIM, PSNR and face similarity of generated images against ground truth.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// One source photo + one target pose -> one image, no dataset needed.
    Infer(commands::infer::InferArgs),
    /// `infer` with another person's identity and/or garments swapped in (no new network).
    Edit(commands::edit::EditArgs),
    /// Run the whole pipeline on a built-in sample with tiny untrained weights (no downloads);
    /// with --train, train tiny weights on the CPU on a dataset made from the sample.
    Demo(commands::demo::DemoArgs),
    /// Time full-size networks with random weights (no downloads); prints the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fetch, check and place the models the other commands read (Hugging Face Hub, model zoos).
    Download(commands::download::DownloadArgs),
    /// A local web page to re-pose and dress people, on networks loaded once.
    Serve(commands::serve::ServeArgs),
}

impl Cli {
    /// Whether the command trains (gradient work, where our kernels and candle's elementwise ops
    /// alternate; see `device::park_idle_workers`).
    pub fn trains(&self) -> bool {
        match &self.command {
            Command::Train(_) | Command::Bench(BenchCommand::Train(_)) => true,
            Command::Demo(a) => a.train,
            _ => false,
        }
    }
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

impl CliError {
    /// What `main` prints: `error: MESSAGE`, then one `  caused by: ...` line for each cause
    /// whose text is not already shown (an I/O error's message carries its source, so the
    /// source would otherwise be printed twice).
    pub fn report(&self) -> String {
        let CliError::Failed(e) = self;
        error_report(e.chain())
    }
}

/// The lines of [`CliError::report`] for an error and its chain of causes.
pub fn error_report<'a>(
    mut chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let Some(top) = chain.next() else {
        return "error".into();
    };
    let mut shown = vec![top.to_string()];
    let mut out = format!("error: {}", shown[0]);
    for cause in chain {
        let c = cause.to_string();
        if c.trim().is_empty() || shown.iter().any(|s| s.contains(&c)) {
            continue;
        }
        out.push_str("\n  caused by: ");
        out.push_str(&c);
        shown.push(c);
    }
    out
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Prepare(a) => commands::prepare::run(&a)?,
        Command::Train(a) => commands::train::run(&a)?,
        Command::Test(a) => commands::test::run(&a)?,
        Command::Evaluate(a) => commands::evaluate::run(&a)?,
        Command::Infer(a) => commands::infer::run(&a)?,
        Command::Edit(a) => commands::edit::run(&a)?,
        Command::Demo(a) => commands::demo::run(&a)?,
        Command::Bench(c) => commands::bench::run(&c)?,
        Command::Download(a) => commands::download::run(&a)?,
        Command::Serve(a) => commands::serve::run(&a)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_training_commands_train() {
        let trains = |args: &[&str]| Cli::try_parse_from(args).unwrap().trains();
        assert!(trains(&["mcld", "bench", "train"]));
        assert!(trains(&["mcld", "demo", "--train"]));
        assert!(trains(&["mcld", "train", "--config", "x.yaml"]));
        assert!(!trains(&["mcld", "demo"]));
        assert!(!trains(&["mcld", "bench", "pipeline"]));
    }
}
