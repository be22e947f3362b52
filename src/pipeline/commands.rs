//! `mcld test`, `mcld infer` and `mcld demo`: their arguments and bodies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use image::{Rgb, RgbImage};

use clap::Args;

use crate::args::{CheckpointArgs, ComputeArgs, PretrainedArgs, ShardArgs};
use crate::config::TrainConfig;
use crate::data::{read_face_embedding, read_pairs, read_rgb, DatasetLayout, Pair, PairInputs};
use crate::pipeline::demo;
use crate::pipeline::mcld::{McldPipeline, NoProgress, SampleOptions, SeededGenerator};
use crate::pipeline::preprocess::{self, FaceOutcome};
use crate::pipeline::testset::{run_test_set, Postprocess, TestRunOptions};
use crate::{Error, Result};

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
    /// The overrides of the inference config this command asks for.
    pub fn sample_options(&self) -> SampleOptions {
        SampleOptions {
            steps: self.steps,
            guidance: self.guidance,
        }
    }
}

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
}

/// `mcld demo` (the `--train` variant is `train::demo`'s, dispatched by the CLI).
pub fn demo_command(a: &DemoArgs) -> Result<()> {
    demo(&a.out, a.workdir.clone(), a.steps)
}

/// `mcld test`: the whole test set (or this process's shard of it), resumable.
pub fn test(a: &TestArgs) -> Result<()> {
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

/// Side-by-side strip of equally sized panels.
pub(crate) fn strip(panels: &[RgbImage]) -> RgbImage {
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(0);
    let w: u32 = panels.iter().map(|p| p.width()).sum();
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut x0 = 0;
    for p in panels {
        image::imageops::replace(&mut out, p, x0 as i64, 0);
        x0 += p.width();
    }
    out
}

pub(crate) fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (_, h, w) = t.dims3()?;
    crate::imageops::generated_to_rgb(t, (h, w))
}

/// An IUV image made visible: part index as hue-ish colour, U/V as brightness.
pub(crate) fn pose_preview(iuv: &RgbImage) -> RgbImage {
    RgbImage::from_fn(iuv.width(), iuv.height(), |x, y| {
        let p = iuv.get_pixel(x, y);
        if p[2] == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([p[2].saturating_mul(10), p[1], p[0]])
        }
    })
}

fn panel(img: &RgbImage, size: u32) -> Result<RgbImage> {
    crate::imageops::pil_resize_rgb(
        img,
        (size as usize, size as usize),
        crate::imageops::Filter::Bicubic,
    )
}

/// `mcld infer`: one pair without a dataset.
pub fn infer(a: &InferArgs) -> Result<()> {
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    let source = read_rgb(&a.source)?;
    let pose = read_rgb(&a.pose)?;
    let texture = match &a.texture {
        Some(p) => read_rgb(p)?,
        None => {
            let dp = source_densepose(a, &device)?;
            let (tex_path, iuv_path) = texture_paths(a);
            computed_texture(a, &dp, &source, &tex_path, &iuv_path)?
        }
    };
    let (face, face_missing) = source_face(a, &source)?;
    let input = infer_pair(a, source, pose, texture, face, face_missing);
    generate_to_out(a, &device, dtype, &input)?;
    Ok(())
}

/// The source's face embedding as `infer` takes it: `--face`, else computed from the photo,
/// else zeros (saying why). Returns the embedding and whether zeros stand in.
pub(crate) fn source_face(a: &InferArgs, source: &RgbImage) -> Result<(Vec<f32>, bool)> {
    Ok(match &a.face {
        Some(p) => (read_face_embedding(p)?, false),
        None => match preprocess::face_of_photo(&a.pretrained.pretrained_dir, source)? {
            FaceOutcome::Found(v) => {
                eprintln!("computed the source's face embedding (antelopev2)");
                (v, false)
            }
            FaceOutcome::NoFace => {
                eprintln!(
                    "no face found in {}: using a zero face embedding, as the reference does",
                    a.source.display()
                );
                (vec![0f32; 512], true)
            }
            FaceOutcome::ModelsMissing(msg) => {
                eprintln!("{msg}\nusing a zero face embedding (as for photos without a face)");
                (vec![0f32; 512], true)
            }
        },
    })
}

/// The pair `infer` hands the pipeline (the source photo is also CLIP's first input).
pub(crate) fn infer_pair(
    a: &InferArgs,
    source: RgbImage,
    pose: RgbImage,
    texture: RgbImage,
    face: Vec<f32>,
    face_missing: bool,
) -> PairInputs {
    PairInputs {
        pair: Pair {
            from: file_name(&a.source),
            to: file_name(&a.pose),
        },
        target: source.clone(),
        source,
        pose,
        texture,
        face,
        face_missing,
    }
}

/// Loads the pipeline, generates `input` with `--seed` and writes `--out`; returns the image.
pub(crate) fn generate_to_out(
    a: &InferArgs,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    input: &PairInputs,
) -> Result<RgbImage> {
    let t0 = Instant::now();
    let pipeline = McldPipeline::from_config(
        &a.checkpoints.ckpt_dir,
        &a.checkpoints.config_path,
        device,
        dtype,
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let out = pipeline.generate_with(
        std::slice::from_ref(input),
        a.seed,
        &a.sample_options(),
        &mut NoProgress,
    )?;
    let gen_s = t1.elapsed().as_secs_f64();
    let img = to_rgb(&out[0])?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img.clone()), &a.out)?;
    println!(
        "wrote {} (load {load_s:.1}s, generate {gen_s:.1}s, precision {})",
        a.out.display(),
        pipeline.precision.describe()
    );
    Ok(img)
}

/// DensePose for the source's texture map, with the advice to pass `--texture` when missing.
pub(crate) fn source_densepose(
    a: &InferArgs,
    device: &candle_core::Device,
) -> Result<crate::models::densepose::DensePose> {
    preprocess::load_densepose(&a.pretrained.pretrained_dir, device).map_err(|e| {
        Error::msg(format!(
            "no --texture given for {}, so its texture map must be computed, which needs \
             DensePose: {e}\n(alternatively pass --texture TEXTURE.png, e.g. one made by \
             `mcld prepare --only densepose,texture`)",
            a.source.display()
        ))
    })
}

/// Where `infer` writes the texture it computes (`--save-texture`, else beside `--out`) and
/// the source's IUV (beside the texture).
fn texture_paths(a: &InferArgs) -> (PathBuf, PathBuf) {
    let tex_path = a
        .save_texture
        .clone()
        .unwrap_or_else(|| beside(&a.out, "texture"));
    let iuv_path = tex_path.with_file_name(format!(
        "{}_source_iuv.png",
        tex_path
            .file_stem()
            .map(|s| s.to_string_lossy().trim_end_matches("_texture").to_string())
            .unwrap_or_else(|| "out".into())
    ));
    (tex_path, iuv_path)
}

/// Texture map of the source through DensePose, saved where the user can look at it.
pub(crate) fn computed_texture(
    a: &InferArgs,
    dp: &crate::models::densepose::DensePose,
    source: &RgbImage,
    tex_path: &Path,
    iuv_path: &Path,
) -> Result<RgbImage> {
    let t = Instant::now();
    let c = preprocess::texture_of_photo(dp, source, &a.source)?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(c.texture.clone()), tex_path)?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(c.iuv), iuv_path)?;
    eprintln!(
        "computed the texture map with DensePose in {:.1}s: {} (source IUV: {})",
        t.elapsed().as_secs_f64(),
        tex_path.display(),
        iuv_path.display()
    );
    Ok(c.texture)
}

/// `DIR/STEM_SUFFIX.png` for an output `DIR/STEM.EXT`.
pub(crate) fn beside(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{stem}_{suffix}.png"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into())
}

/// `mcld demo`: the full pipeline on the built-in sample with tiny random weights written on
/// the fly; shows what runs, not what a trained model produces.
pub fn demo(out: &Path, work: Option<PathBuf>, steps: usize) -> Result<()> {
    let t0 = Instant::now();
    let keep = work.is_some();
    let dir = match work {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("mcld-demo-{}", std::process::id())),
    };
    let layout = crate::pipeline::tiny::write_tiny_layout(&dir, &dir.join("dataset"), steps)?;
    let photo = demo::sample_photo().to_rgb8();
    let (w, h) = photo.dimensions();
    let src_pose = demo::synthetic_pose(w, h, false);
    let tgt_pose = demo::synthetic_pose(w, h, true);
    let assets = crate::prepare::texture::TextureAssets::builtin()?;
    let texture = crate::prepare::texture::texture_map(&photo, &src_pose, &assets)?;
    let cfg = TrainConfig::load(&layout.config_path)?;
    let infer = crate::config::InferenceConfig::load(&cfg.inference_config)?;
    let files = crate::pipeline::checkpoints::PipelineFiles::resolve(&layout.ckpt_dir, &cfg)?;
    let pipeline = McldPipeline::load(
        &files,
        &infer,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let input = PairInputs {
        pair: Pair {
            from: "astronaut.png".into(),
            to: "pose.png".into(),
        },
        source: photo.clone(),
        target: photo.clone(),
        pose: tgt_pose.clone(),
        texture: texture.clone(),
        face: vec![0f32; 512],
        face_missing: true,
    };
    let t1 = Instant::now();
    let img = pipeline.generate(std::slice::from_ref(&input), 42)?;
    let gen_s = t1.elapsed().as_secs_f64();
    let s = 256;
    let sheet = strip(&[
        panel(&photo, s)?,
        panel(&pose_preview(&tgt_pose), s)?,
        panel(&texture, s)?,
        panel(&to_rgb(&img[0])?, s)?,
    ]);
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(sheet), out)?;
    if keep {
        // The sample inputs beside the weights, so `infer` can be re-run on them.
        let inputs = dir.join("inputs");
        let face = inputs.join("face.npy");
        for (img, name) in [
            (&photo, "source.png"),
            (&tgt_pose, "pose.png"),
            (&texture, "texture.png"),
        ] {
            crate::fsutil::save_image_atomic(
                &image::DynamicImage::ImageRgb8(img.clone()),
                &inputs.join(name),
            )?;
        }
        crate::data::npy::write_f32(&face, &[512], &input.face)?;
        // A pose gallery for `mcld serve --poses DIR/poses`.
        for (img, name) in [
            (&tgt_pose, "demo_target.png"),
            (&src_pose, "demo_source.png"),
        ] {
            crate::fsutil::save_image_atomic(
                &image::DynamicImage::ImageRgb8(img.clone()),
                &dir.join("poses").join(name),
            )?;
        }
        println!(
            "kept the tiny weights and sample inputs in {}; re-run the pipeline on them with\n  \
             mcld infer --ckpt_dir {} --config_path {} --source {} --pose {} --texture {} \
             --face {} --out out.png",
            dir.display(),
            layout.ckpt_dir.display(),
            layout.config_path.display(),
            inputs.join("source.png").display(),
            inputs.join("pose.png").display(),
            inputs.join("texture.png").display(),
            face.display()
        );
        println!(
            "or open them in the web page:\n  mcld serve --ckpt_dir {} --config_path {} --poses {}",
            layout.ckpt_dir.display(),
            layout.config_path.display(),
            dir.join("poses").display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "wrote {}: source | target pose | texture map | output (512x512, {steps} DDIM steps)",
        out.display()
    );
    println!(
        "UNTRAINED: tiny random weights, so the output panel is noise by design. \
         generation {gen_s:.2}s, total {:.2}s on CPU",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "with real weights: `mcld download --only inference,prepare` fetches the checkpoints \
         into ./checkpoints and the base models into ./pretrained_weights, then\n  mcld \
         infer --source PHOTO \
         --pose TARGET_IUV.png --out out.png\n(the texture map and face embedding are computed \
         from the photo with model_final_844d15.pkl and antelopev2/ in ./pretrained_weights, \
         or given with --texture TEXTURE.png --face EMB.npy)"
    );
    Ok(())
}
