//! `mcld evaluate`: FID, LPIPS, SSIM, PSNR and face similarity of generated images against the
//! ground truth, with the reference's printed lines and reports.

use std::path::PathBuf;

use clap::Args;

use super::args::{ComputeArgs, PretrainedArgs};
use crate::Result;

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Generated images: the folder holding `256/` and `512/` (the reference's --img_path).
    #[arg(long = "save_path", visible_aliases = ["save-path", "img_path", "img-path"])]
    pub save_path: PathBuf,
    /// Ground truth: the folder holding `256/` and `512/` (the reference's --gt_path).
    #[arg(long = "gt_folder", visible_aliases = ["gt-folder", "gt_path", "gt-path"])]
    pub gt_folder: PathBuf,
    /// All training images, the real set of FID.
    #[arg(
        long = "training_path",
        visible_alias = "training-path",
        default_value = "./dataset/fashion/train/"
    )]
    pub training_path: PathBuf,
    /// FID network: torchvision (what MCLD reports; PRETRAINED/inception_v3_google-0cc3c7bd.pth)
    /// or pt_inception (pytorch-fid's TF port, the usual FID elsewhere;
    /// PRETRAINED/pt_inception-2015-12-05-6726825d.pth from pytorch-fid's GitHub release).
    #[arg(long = "fid-backbone", default_value = "torchvision", value_parser = ["torchvision", "pt_inception"])]
    pub fid_backbone: String,
    /// Recompute the cached real-set FID statistics.
    #[arg(long = "recompute-real-stats")]
    pub recompute_real_stats: bool,
    #[command(flatten)]
    pub pretrained: PretrainedArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `mcld evaluate`: every metric, the reports, then the face similarity's status.
pub fn run(a: &EvaluateArgs) -> Result<()> {
    let device = a.compute.device()?;
    let pretrained_dir = &a.pretrained.pretrained_dir;
    let backend = crate::evaluate::MetricsBackend::load(pretrained_dir, &a.fid_backbone, &device)?;
    let opts = crate::evaluate::EvalOptions {
        gen_dir: a.save_path.clone(),
        gt_dir: a.gt_folder.clone(),
        training_path: a.training_path.clone(),
        recompute_real_stats: a.recompute_real_stats,
        batch_size: 16,
        progress: true,
        resolutions: crate::evaluate::EvalOptions::reference_resolutions(),
    };
    let mut report = crate::evaluate::evaluate(&opts, &backend)?;
    // A face-model failure still leaves the other metrics on disk, then fails the run.
    let face = crate::evaluate::face_status(&opts, pretrained_dir);
    report.face = match &face {
        Ok(m) => m.clone(),
        Err(e) => [("status".to_string(), format!("failed: {e}").into())].into(),
    };
    crate::evaluate::write_reports(&a.save_path, &report)?;
    println!(
        "wrote {} and {}",
        a.save_path.join("metrics.json").display(),
        a.save_path.join("metrics.md").display()
    );
    face?;
    Ok(())
}
