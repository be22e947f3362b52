//! `mcld infer`: one source photo into one or several target poses, no dataset.

use std::path::PathBuf;

use clap::Args;

use super::args::{CheckpointArgs, ComputeArgs, PretrainedArgs};
use crate::pipeline::infer::{poses_in_dir, InferRequest, PoseSpec};
use crate::pipeline::mcld::SampleOptions;
use crate::Result;

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Photo of the person to re-pose.
    #[arg(long)]
    pub source: PathBuf,
    /// Target pose as a DensePose IUV image (R = V, G = U, B = part index); repeatable.
    #[arg(long)]
    pub pose: Vec<PathBuf>,
    /// Target pose from a photo of someone in it (DensePose computes the IUV, written beside
    /// the output as OUT_target_iuv.png for reuse with --pose); repeatable.
    #[arg(long = "pose-from", visible_alias = "pose_from")]
    pub pose_from: Vec<PathBuf>,
    /// Every image of this folder as a target pose, in name order (IUV images as --pose,
    /// photos as --pose-from). Poses run in the order --pose, --pose-from, --poses; with
    /// several, the outputs are OUT_0.png, OUT_1.png, ...
    #[arg(long)]
    pub poses: Option<PathBuf>,
    /// Also write an animation through the results in pose order (the same seed for every
    /// frame).
    #[arg(long)]
    pub gif: Option<PathBuf>,
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
    /// DDIM steps (default: the inference config's `num_inference_steps`).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: the inference config's `guidance_scale`).
    #[arg(long)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

impl InferArgs {
    /// The target poses in run order: --pose, then --pose-from, then --poses DIR.
    pub fn pose_specs(&self) -> Result<Vec<PoseSpec>> {
        let mut v: Vec<PoseSpec> = self.pose.iter().cloned().map(PoseSpec::Iuv).collect();
        v.extend(self.pose_from.iter().cloned().map(PoseSpec::Photo));
        if let Some(dir) = &self.poses {
            v.extend(poses_in_dir(dir)?);
        }
        if v.is_empty() {
            return Err(crate::Error::msg(
                "no target pose: give --pose IUV.png, --pose-from PHOTO or --poses DIR",
            ));
        }
        Ok(v)
    }

    /// The plain request (device and precision parsed, so a bad value fails before any work).
    pub fn request(&self) -> Result<InferRequest> {
        Ok(InferRequest {
            source: self.source.clone(),
            poses: self.pose_specs()?,
            gif: self.gif.clone(),
            texture: self.texture.clone(),
            face: self.face.clone(),
            out: self.out.clone(),
            ckpt_dir: self.checkpoints.ckpt_dir.clone(),
            config_path: self.checkpoints.config_path.clone(),
            pretrained_dir: self.pretrained.pretrained_dir.clone(),
            save_texture: self.save_texture.clone(),
            seed: self.seed,
            options: SampleOptions {
                steps: self.steps,
                guidance: self.guidance,
            },
            device: self.compute.device()?,
            dtype: self.compute.dtype()?,
        })
    }
}

pub fn run(a: &InferArgs) -> Result<()> {
    crate::pipeline::infer::run(&a.request()?).map(|_| ())
}
