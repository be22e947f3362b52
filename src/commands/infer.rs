//! `mcld infer`: one source photo and one target pose, no dataset.

use std::path::PathBuf;

use clap::Args;

use super::args::{CheckpointArgs, ComputeArgs, PretrainedArgs};
use crate::pipeline::infer::InferRequest;
use crate::Result;

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Photo of the person to re-pose.
    #[arg(long)]
    pub source: PathBuf,
    /// Target pose as a DensePose IUV image (R = V, G = U, B = part index).
    #[arg(long)]
    pub pose: PathBuf,
    /// UV texture map of the source (computed when absent and the models are available).
    #[arg(long)]
    pub texture: Option<PathBuf>,
    /// ArcFace embedding of the source face, a (512,) float32 .npy (zeros when absent).
    #[arg(long)]
    pub face: Option<PathBuf>,
    /// Output image.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
    /// Used when --texture / --face are not given.
    #[command(flatten)]
    pub pretrained: PretrainedArgs,
    /// Where to write the texture map computed from the source (default: beside --out, as
    /// OUT_texture.png; the source's IUV goes beside it as OUT_source_iuv.png).
    #[arg(long = "save-texture", visible_alias = "save_texture")]
    pub save_texture: Option<PathBuf>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

impl InferArgs {
    /// The plain request (device and precision parsed, so a bad value fails before any work).
    pub fn request(&self) -> Result<InferRequest> {
        Ok(InferRequest {
            source: self.source.clone(),
            pose: self.pose.clone(),
            texture: self.texture.clone(),
            face: self.face.clone(),
            out: self.out.clone(),
            ckpt_dir: self.checkpoints.ckpt_dir.clone(),
            config_path: self.checkpoints.config_path.clone(),
            pretrained_dir: self.pretrained.pretrained_dir.clone(),
            save_texture: self.save_texture.clone(),
            seed: self.seed,
            device: self.compute.device()?,
            dtype: self.compute.dtype()?,
        })
    }
}

pub fn run(a: &InferArgs) -> Result<()> {
    crate::pipeline::infer::run(&a.request()?).map(|_| ())
}
