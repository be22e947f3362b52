//! The `mcld` command line. Flags keep the reference's spellings (`--save_path`, `--ckpt_dir`,
//! ...) so its README carries over; each also has a kebab-case alias.

pub mod commands;
pub mod evaluate;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code for a command whose work is not built yet (distinct from a failure, 1).
pub const EXIT_NOT_BUILT: i32 = 2;

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
    Prepare(PrepareArgs),
    /// Train MCLD on one or many GPUs.
    Train(TrainArgs),
    /// Generate the whole test set (8,570 pairs) at 256x176 and 512x352.
    Test(TestArgs),
    /// FID, LPIPS, SSIM, PSNR and face similarity of generated images against ground truth.
    Evaluate(EvaluateArgs),
    /// One source photo + one target pose -> one image, no dataset needed.
    Infer(InferArgs),
    /// Run the whole pipeline on a built-in sample with tiny untrained weights (no downloads).
    Demo(DemoArgs),
    /// Time full-size networks with random weights (no downloads); prints the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fetch, check and place the models the other commands read (Hugging Face Hub, model zoos).
    Download(crate::download::DownloadArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The MCLD pipeline at SD-1.5 size: seconds per image and peak memory.
    Pipeline(crate::bench::pipeline::PipelineBenchArgs),
    /// DensePose R-CNN R-101 at DeepFashion size (750x1101): images per second.
    Densepose(crate::bench::densepose::DenseposeBenchArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Side-by-side result (source | pose | texture | output).
    #[arg(long, default_value = "mcld_demo_untrained.png")]
    pub out: PathBuf,
    /// DDIM steps (the real pipeline uses 20; fewer keep the demo quick on a CPU).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
}

/// Flags every compute command shares.
#[derive(Debug, Clone, Args)]
pub struct ComputeArgs {
    /// Where to run: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Numeric precision of the networks: f32 (reference parity), f16 or bf16 (speed).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

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
    /// Folder with the preprocessing models (DensePose .pkl, SCRFD and ArcFace .onnx, CLIP).
    #[arg(
        long = "pretrained_dir",
        visible_alias = "pretrained-dir",
        default_value = "./pretrained_weights"
    )]
    pub pretrained_dir: PathBuf,
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
    pub compute: ComputeArgs,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training config (the reference's keys).
    #[arg(long, default_value = "configs/train/train.yaml")]
    pub config: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Output root: images go to SAVE_PATH/<exp_name>/{256,512}/, ground truth to SAVE_PATH/gt/.
    #[arg(
        long = "save_path",
        visible_alias = "save-path",
        default_value = "./results/"
    )]
    pub save_path: PathBuf,
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
    /// Generate at most N pairs (in test.csv order); useful for a quick look.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Pairs per forward pass.
    #[arg(long = "batch-size", visible_alias = "batch_size", default_value_t = 1)]
    pub batch_size: usize,
    /// Seed of the initial noise; the same seed gives the same images.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

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
    /// Folder with inception, alexnet, lpips and face-model weights (face similarity runs when
    /// buffalo_s/det_500m.onnx and buffalo_s/w600k_mbf.onnx, InsightFace's buffalo_s, are there).
    #[arg(
        long = "pretrained_dir",
        visible_alias = "pretrained-dir",
        default_value = "./pretrained_weights"
    )]
    pub pretrained_dir: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

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
    /// Folder with the MCLD checkpoints.
    #[arg(
        long = "ckpt_dir",
        visible_alias = "ckpt-dir",
        default_value = "./checkpoints/"
    )]
    pub ckpt_dir: PathBuf,
    /// Training config that names the base models.
    #[arg(
        long = "config_path",
        visible_alias = "config-path",
        default_value = "./configs/train/train.yaml"
    )]
    pub config_path: PathBuf,
    /// Folder with the preprocessing models used when --texture / --face are not given
    /// (model_final_844d15.pkl for DensePose, antelopev2/ for the face embedding).
    #[arg(
        long = "pretrained_dir",
        visible_alias = "pretrained-dir",
        default_value = "./pretrained_weights"
    )]
    pub pretrained_dir: PathBuf,
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

/// Outcome of a command that could not do its work.
#[derive(Debug)]
pub enum CliError {
    /// The command exists but its implementation has not landed yet.
    NotBuilt(&'static str),
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::Failed(e.into())
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Prepare(a) => {
            let device = crate::device::parse_device(&a.compute.device)?;
            let dtype = crate::device::parse_dtype(&a.compute.dtype)?;
            let mut opts =
                crate::prepare::run::PrepareOptions::new(&a.dataset_root, &a.pretrained_dir);
            if !a.only.is_empty() {
                opts.stages = crate::prepare::run::Stage::parse_selection(&a.only)?;
            }
            opts.densepose_config = a.densepose_config.clone();
            opts.densepose_weights = a.densepose_weights.clone();
            opts.densepose_batch = a.densepose_batch;
            opts.device = device;
            opts.dtype = dtype;
            opts.interactive = true;
            let report = crate::prepare::run::run_prepare(&opts)?;
            if report.all_ok() {
                Ok(())
            } else {
                Err(CliError::Failed(anyhow::anyhow!(
                    "prepare finished with failures (see {})",
                    a.dataset_root.join("prepare_report.json").display()
                )))
            }
        }
        Command::Train(a) => {
            crate::config::TrainConfig::load(&a.config)?;
            Err(CliError::NotBuilt("train"))
        }
        Command::Test(a) => Ok(commands::test(&a)?),
        Command::Evaluate(a) => {
            let device = crate::device::parse_device(&a.compute.device)?;
            let backend =
                evaluate::MetricsBackend::load(&a.pretrained_dir, &a.fid_backbone, &device)?;
            let opts = evaluate::EvalOptions {
                gen_dir: a.save_path.clone(),
                gt_dir: a.gt_folder.clone(),
                training_path: a.training_path.clone(),
                recompute_real_stats: a.recompute_real_stats,
                batch_size: 16,
                progress: true,
                resolutions: evaluate::EvalOptions::reference_resolutions(),
            };
            let mut report = evaluate::evaluate(&opts, &backend)?;
            // A face-model failure still leaves the other metrics on disk, then fails the run.
            let face = evaluate::face_status(&opts, &a.pretrained_dir);
            report.face = match &face {
                Ok(m) => m.clone(),
                Err(e) => [("status".to_string(), format!("failed: {e}").into())].into(),
            };
            evaluate::write_reports(&a.save_path, &report)?;
            println!(
                "wrote {} and {}",
                a.save_path.join("metrics.json").display(),
                a.save_path.join("metrics.md").display()
            );
            face?;
            Ok(())
        }
        Command::Infer(a) => Ok(commands::infer(&a)?),
        Command::Demo(a) => Ok(commands::demo(&a.out, None, a.steps)?),
        Command::Bench(BenchCommand::Pipeline(a)) => Ok(crate::bench::pipeline::run(&a)?),
        Command::Bench(BenchCommand::Densepose(a)) => Ok(crate::bench::densepose::run(&a)?),
        Command::Download(a) => Ok(crate::download::run_cli(&a)?),
    }
}
