//! Flag groups several commands share, defined once and `#[command(flatten)]`ed into each
//! command's arguments, so a flag is spelled, defaulted and documented the same everywhere.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::Args;

use crate::rank::Shard;
use crate::Result;

/// Where and in what precision a command computes.
#[derive(Debug, Clone, Args)]
pub struct ComputeArgs {
    /// Where to run: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Numeric precision of the networks: f32 (reference parity), f16 or bf16 (speed).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ComputeArgs {
    pub fn device(&self) -> Result<Device> {
        crate::device::parse_device(&self.device)
    }

    pub fn dtype(&self) -> Result<DType> {
        crate::device::parse_dtype(&self.dtype)
    }

    /// The device of this process's shard: `cuda` means `cuda:LOCAL_RANK` when the shard came
    /// from a launcher's variables (one GPU per process, as torchrun starts them).
    pub fn device_for(&self, shard: &Shard) -> Result<Device> {
        match shard.local_rank {
            Some(local) if self.device.trim() == "cuda" => {
                crate::device::parse_device(&format!("cuda:{local}"))
            }
            _ => self.device(),
        }
    }
}

/// The MCLD checkpoints and the training config that names the dataset and base models.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// Folder with denoising_unet.pth, reference_unet.pth, pose_guider.pth and the projector.
    #[arg(
        long = "ckpt_dir",
        visible_alias = "ckpt-dir",
        default_value = "./checkpoints/"
    )]
    pub ckpt_dir: PathBuf,
    /// Training config that names the dataset, base models and experiment.
    #[arg(
        long = "config_path",
        visible_alias = "config-path",
        default_value = "./configs/train/train.yaml"
    )]
    pub config_path: PathBuf,
}

/// The folder of downloaded third-party models.
#[derive(Debug, Clone, Args)]
pub struct PretrainedArgs {
    /// Folder with the pretrained models: DensePose model_final_844d15.pkl and antelopev2/
    /// (prepare, infer), the metric networks and buffalo_s/ (evaluate).
    #[arg(
        long = "pretrained_dir",
        visible_alias = "pretrained-dir",
        default_value = "./pretrained_weights"
    )]
    pub pretrained_dir: PathBuf,
}

/// Which share of the items this process does (`mcld test`, `mcld prepare`).
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// Do only shard K of N (K from 0 to N-1): the N shards split the items with no overlap
    /// and can run at once, as separate processes or nodes, into the same folders. Default:
    /// torchrun's RANK/WORLD_SIZE when set, else everything.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<Shard>,
}

impl ShardArgs {
    /// `--shard`, else `RANK`/`WORLD_SIZE`, else everything.
    pub fn resolve(&self) -> Result<Shard> {
        Shard::resolve(self.shard)
    }
}

fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    Shard::parse(s).map_err(|e| e.to_string())
}
