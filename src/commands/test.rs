//! `mcld test`: the whole test set (or this process's shard of it), resumable.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::args::{CheckpointArgs, ComputeArgs, ShardArgs};
use crate::config::TrainConfig;
use crate::data::{read_pairs, DatasetLayout};
use crate::pipeline::mcld::{McldPipeline, SeededGenerator};
use crate::pipeline::testset::{run_test_set, Postprocess, TestRunOptions};
use crate::Result;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Output root: images go to SAVE_PATH/<exp_name>/{256,512}/, ground truth to SAVE_PATH/gt/.
    #[arg(
        long = "save_path",
        visible_alias = "save-path",
        default_value = "./results/"
    )]
    pub save_path: PathBuf,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
    /// Generate at most N pairs (in test.csv order); useful for a quick look.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Pairs per forward pass.
    #[arg(long = "batch-size", visible_alias = "batch_size", default_value_t = 1)]
    pub batch_size: usize,
    /// Seed of the initial noise: pair number i of test.csv uses seed + i, so a pair's noise does
    /// not depend on the batch size, on resumption or on --shard.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub shard: ShardArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `mcld test`: the whole test set (or this process's shard of it), resumable.
pub fn run(a: &TestArgs) -> Result<()> {
    let shard = a.shard.resolve()?;
    let device = a.compute.device_for(&shard)?;
    let dtype = a.compute.dtype()?;
    let cfg = TrainConfig::load(&a.checkpoints.config_path)?;
    let root = &cfg.data.root_dir;
    let csv = if cfg.data.test_pairs.is_absolute() {
        cfg.data.test_pairs.clone()
    } else {
        root.join(&cfg.data.test_pairs)
    };
    let pairs = read_pairs(&csv)?;
    let t0 = Instant::now();
    let pipeline = McldPipeline::from_config(
        &a.checkpoints.ckpt_dir,
        &a.checkpoints.config_path,
        &device,
        dtype,
    )?;
    eprintln!(
        "loaded the pipeline in {:.1}s (precision {})",
        t0.elapsed().as_secs_f64(),
        pipeline.precision.describe()
    );
    let opts = TestRunOptions {
        save_path: a.save_path.clone(),
        exp_name: cfg.exp_name.clone(),
        limit: a.limit,
        batch_size: a.batch_size,
        progress: true,
        shard,
    };
    let mut generator = SeededGenerator {
        pipeline: &pipeline,
        seed: a.seed,
    };
    let summary = run_test_set(
        &opts,
        &DatasetLayout::new(root, "test"),
        &pairs,
        &mut generator,
        &Postprocess::reference(),
    )?;
    summary.print();
    if a.limit.is_some() && shard.is_whole() {
        let layout = DatasetLayout::new(root, "test");
        if let Some(p) = crate::pipeline::testset::write_panels(&opts, &layout, &pairs, a.seed)? {
            println!("panels of the generated pairs: {}", p.display());
        }
    }
    if shard.is_whole() {
        println!("all test images are generated!");
    } else {
        println!(
            "the test images of shard {shard} are generated (the other shards write theirs \
             into the same folders)"
        );
    }
    Ok(())
}
