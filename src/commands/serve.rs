//! `mcld serve`: the local web page (see `crate::serve`).

use std::path::PathBuf;

use clap::Args;

use super::args::{CheckpointArgs, ComputeArgs, PretrainedArgs};
use crate::serve::ServeRequest;
use crate::Result;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but a loopback address lets other machines use the page
    /// (there is no login): a warning is printed.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
    /// DensePose and antelopev2 for photos without a precomputed texture map, pose or face.
    #[command(flatten)]
    pub pretrained: PretrainedArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Folder of target poses (DensePose IUV images) offered as the gallery; default the
    /// config's dataset `test_densepose/` when it exists.
    #[arg(long)]
    pub poses: Option<PathBuf>,
    /// Jobs that may wait behind the running one; more are refused until one starts.
    #[arg(long = "max-queue", visible_alias = "max_queue", default_value_t = 8)]
    pub max_queue: usize,
    /// Largest request accepted (all uploads of one generation together), in MB.
    #[arg(
        long = "max-upload-mb",
        visible_alias = "max_upload_mb",
        default_value_t = 20
    )]
    pub max_upload_mb: usize,
    /// Full-size networks on random weights instead of checkpoints (as `mcld bench pipeline`):
    /// measures memory and speed with nothing downloaded.
    #[arg(long = "random-weights", hide = true)]
    pub random_weights: bool,
}

impl ServeArgs {
    pub fn request(&self) -> ServeRequest {
        ServeRequest {
            host: self.host.clone(),
            port: self.port,
            ckpt_dir: self.checkpoints.ckpt_dir.clone(),
            config_path: self.checkpoints.config_path.clone(),
            pretrained_dir: self.pretrained.pretrained_dir.clone(),
            device: self.compute.device.clone(),
            dtype: self.compute.dtype.clone(),
            poses: self.poses.clone(),
            max_queue: self.max_queue,
            max_upload: self.max_upload_mb.saturating_mul(1024 * 1024),
            random_weights: self.random_weights,
        }
    }
}

pub fn run(a: &ServeArgs) -> Result<()> {
    crate::serve::run(&a.request())
}
