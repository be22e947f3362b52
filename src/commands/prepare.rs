//! `mcld prepare`: split, pairs, DensePose IUV, texture maps, face embeddings, stats.

use std::path::PathBuf;

use clap::Args;

use super::args::{ComputeArgs, PretrainedArgs, ShardArgs};
use crate::prepare::run::{run_prepare, PrepareOptions, Stage};
use crate::{Error, Result};

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Dataset root: raw `MEN/` and `WOMEN/` folders in, `train/`, `test/`, `*_densepose/`,
    /// `*_texture/`, `*_face/`, `train.csv`, `test.csv` out.
    #[arg(
        long = "dataset_root",
        visible_alias = "dataset-root",
        default_value = "./dataset/fashion"
    )]
    pub dataset_root: PathBuf,
    #[command(flatten)]
    pub pretrained: PretrainedArgs,
    /// Run only these stages (comma-separated): split, pairs, densepose, texture, face, stats.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// DensePose detectron2 YAML (`_BASE_` followed); default
    /// configs/densepose/densepose_rcnn_R_101_FPN_DL_s1x.yaml, else its compiled-in copy.
    #[arg(long = "densepose-config", visible_alias = "densepose_config")]
    pub densepose_config: Option<PathBuf>,
    /// DensePose weights (.pkl from the detectron2 model zoo, or .safetensors with the same
    /// names); default PRETRAINED_DIR/model_final_844d15.pkl.
    #[arg(long = "densepose-weights", visible_alias = "densepose_weights")]
    pub densepose_weights: Option<PathBuf>,
    /// Photos per DensePose backbone pass (same-size photos share it); default 1 on the CPU,
    /// 4 on a GPU.
    #[arg(long = "densepose-batch", visible_alias = "densepose_batch")]
    pub densepose_batch: Option<usize>,
    #[command(flatten)]
    pub shard: ShardArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Runs the selected stages; a stage that failed fails the command (the report says why).
pub fn run(a: &PrepareArgs) -> Result<()> {
    let shard = a.shard.resolve()?;
    let device = a.compute.device_for(&shard)?;
    let dtype = a.compute.dtype()?;
    let mut opts = PrepareOptions::new(&a.dataset_root, &a.pretrained.pretrained_dir);
    if !a.only.is_empty() {
        opts.stages = Stage::parse_selection(&a.only)?;
    }
    opts.densepose_config = a.densepose_config.clone();
    opts.densepose_weights = a.densepose_weights.clone();
    opts.densepose_batch = a.densepose_batch;
    opts.device = device;
    opts.dtype = dtype;
    opts.interactive = true;
    opts.shard = shard;
    let report = run_prepare(&opts)?;
    if report.all_ok() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "prepare finished with failures (see {})",
            opts.report_path().display()
        )))
    }
}
