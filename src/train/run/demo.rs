//! `mcld demo --train`: a tiny prepared dataset made from the built-in sample (flips, crops and
//! shifts of the photo and of a generated pose, with their textures and face embeddings), the
//! tiny random base models and a `train.yaml` with a raised learning rate, then the same
//! training `mcld train --config DIR/train.yaml` runs, on the CPU, overfitting a few pairs.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::RgbImage;

use super::cmd::TrainCommand;
use super::train_loop::{TrainOutcome, LOG_FILE};
use crate::config::TrainConfig;
use crate::data::{npy, DatasetLayout};
use crate::person::texture::{texture_map, TextureAssets};
use crate::pipeline::demo::{sample_photo, synthetic_pose};
use crate::{Error, Result};

/// Side of the stored demo photos (the training config squashes them to 64x64).
const PHOTO: u32 = 128;
/// The demo's learning rate: high enough to overfit a handful of pairs in 40 steps.
pub const DEMO_LEARNING_RATE: f64 = 1e-3;
/// The demo's experiment name (`DIR/exp_output/demo/`).
pub const DEMO_EXP: &str = "demo";

/// A geometric variant of the sample, applied alike to the photo and its pose.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Plain,
    Flip,
    /// Zoom into the central part.
    Crop,
    /// Shifted right and down, the edge repeated.
    Shift,
}

impl Variant {
    fn apply(self, img: &RgbImage, filter: FilterType) -> RgbImage {
        let n = img.width();
        match self {
            Variant::Plain => img.clone(),
            Variant::Flip => imageops::flip_horizontal(img),
            Variant::Crop => {
                let m = n / 10;
                let c = imageops::crop_imm(img, m, m / 2, n - 2 * m, n - 2 * m).to_image();
                imageops::resize(&c, n, n, filter)
            }
            Variant::Shift => {
                let d = n / 12;
                RgbImage::from_fn(n, n, |x, y| {
                    *img.get_pixel(x.saturating_sub(d), y.saturating_sub(d / 2))
                })
            }
        }
    }
}

/// (name, variant, arms up) of the demo's photos per split.
fn photos(split: &str) -> Vec<(String, Variant, bool)> {
    let list: &[(Variant, bool)] = if split == "train" {
        &[
            (Variant::Plain, false),
            (Variant::Plain, true),
            (Variant::Flip, false),
            (Variant::Flip, true),
            (Variant::Crop, false),
            (Variant::Shift, true),
        ]
    } else {
        &[(Variant::Crop, true), (Variant::Shift, false)]
    };
    list.iter()
        .enumerate()
        .map(|(i, (v, up))| (format!("demo_{split}_{i:02}.jpg"), *v, *up))
        .collect()
}

/// Writes the demo dataset under `root` (`train/`, `test/`, their `_densepose`, `_texture`,
/// `_face` folders, `train.csv`, `test.csv`); returns the number of training pairs.
pub fn write_demo_dataset(root: &Path) -> Result<usize> {
    let sample = imageops::resize(
        &sample_photo().to_rgb8(),
        PHOTO,
        PHOTO,
        FilterType::CatmullRom,
    );
    let assets = TextureAssets::builtin()?;
    let mut train_pairs = 0;
    for split in ["train", "test"] {
        let layout = DatasetLayout::new(root, split);
        let list = photos(split);
        for (i, (name, v, up)) in list.iter().enumerate() {
            let photo = v.apply(&sample, FilterType::CatmullRom);
            let pose = v.apply(&synthetic_pose(PHOTO, PHOTO, *up), FilterType::Nearest);
            let texture = texture_map(&photo, &pose, &assets)?;
            save(&photo, &layout.photo(name))?;
            save(&pose, &layout.pose(name))?;
            save(&texture, &layout.texture(name))?;
            let face: Vec<f32> = (0..512)
                .map(|k| ((k * 7 + i * 13) as f32 * 0.01).sin() * 0.05)
                .collect();
            npy::write_f32(&layout.face(name), &[512], &face)?;
        }
        // Each photo to the next one, and to the one after that in the training split.
        let mut csv = String::from("from,to\n");
        let n = list.len();
        let hops: &[usize] = if split == "train" { &[1, 3] } else { &[1] };
        for i in 0..n {
            for h in hops {
                csv.push_str(&format!("{},{}\n", list[i].0, list[(i + h) % n].0));
                if split == "train" {
                    train_pairs += 1;
                }
            }
        }
        crate::fsutil::write_atomic(&root.join(format!("{split}.csv")), csv.as_bytes())?;
    }
    Ok(train_pairs)
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img.clone()), path)
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone)]
pub struct DemoTrainLayout {
    pub config: PathBuf,
    pub dataset: PathBuf,
    /// `{output_dir}/{exp_name}`.
    pub exp_dir: PathBuf,
    pub train_pairs: usize,
}

/// Writes the dataset, the tiny base and `dir/train.yaml` for `steps` steps (a checkpoint at
/// the end, validation grids at steps 1 and `steps`).
pub fn prepare(dir: &Path, steps: usize) -> Result<DemoTrainLayout> {
    let dataset = dir.join("dataset");
    let train_pairs = write_demo_dataset(&dataset)?;
    let config = crate::presets::tree::write_tiny_train_base(dir, &dataset)?;
    let mut cfg = TrainConfig::load(&config)?;
    cfg.solver.learning_rate = DEMO_LEARNING_RATE;
    cfg.solver.max_train_steps = steps;
    cfg.checkpointing_steps = steps;
    // Grids at the first and the last step: the untrained and the trained weights.
    cfg.val.validation_steps = (steps - 1).max(1);
    cfg.exp_name = DEMO_EXP.into();
    cfg.resume_from_checkpoint = String::new();
    // The inference config next to it, so `mcld infer --config_path DIR/train.yaml` works from
    // any directory.
    let infer: crate::config::InferenceConfig = crate::config::INFERENCE_YAML.parse()?;
    let infer_path = dir.join("inference.yaml");
    crate::config::write_yaml(&infer_path, &infer)?;
    cfg.inference_config = infer_path;
    crate::config::write_yaml(&config, &cfg)?;
    Ok(DemoTrainLayout {
        config,
        dataset,
        exp_dir: cfg.output_dir.join(&cfg.exp_name),
        train_pairs,
    })
}

/// Losses of `train_log.jsonl`, in step order.
pub fn read_losses(exp_dir: &Path) -> Result<Vec<f64>> {
    let path = exp_dir.join(LOG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("loss").and_then(|x| x.as_f64()))
                .ok_or_else(|| Error::input(&path, format!("line {}: no loss", i + 1)))
        })
        .collect()
}

/// Mean loss of the first and of the last quarter of the steps.
pub fn quarter_means(losses: &[f64]) -> Option<(f64, f64)> {
    let q = losses.len() / 4;
    if q == 0 {
        return None;
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    Some((mean(&losses[..q]), mean(&losses[losses.len() - q..])))
}

/// `mcld demo --train`: prepares `dir`, trains `steps` steps on `device` and prints the loss.
pub fn run(dir: &Path, steps: usize, device: &str) -> Result<TrainOutcome> {
    if steps == 0 {
        return Err(Error::msg("--train-steps: expected >= 1"));
    }
    // A bad device is refused before anything is written, naming the flag.
    crate::device::parse_device(device).map_err(|e| Error::msg(format!("--device: {e}")))?;
    let t0 = std::time::Instant::now();
    let layout = prepare(dir, steps)?;
    if layout.exp_dir.exists() {
        // The demo's own previous run: start over rather than refuse.
        std::fs::remove_dir_all(&layout.exp_dir).map_err(|e| Error::io(&layout.exp_dir, e))?;
        println!(
            "demo: removed the previous demo run in {}",
            layout.exp_dir.display()
        );
    }
    println!(
        "demo: wrote {} training pairs made from the built-in sample to {}, tiny random base \
         models to {}, and {}",
        layout.train_pairs,
        layout.dataset.display(),
        dir.join("pretrained_weights").display(),
        layout.config.display()
    );
    println!(
        "demo: learning rate raised to {DEMO_LEARNING_RATE:e} (the real config uses 1e-5) to \
         overfit a few pairs"
    );
    println!(
        "demo: training {steps} steps on {device}, as `mcld train --config {} --device {device}` \
         does",
        layout.config.display()
    );
    let cmd = TrainCommand {
        config: layout.config.clone(),
        device: Some(device.to_string()),
        ..Default::default()
    };
    let outcome = super::cmd::run(&cmd)?;
    let losses = read_losses(&layout.exp_dir)?;
    let every = (losses.len() / 10).max(1);
    for (i, l) in losses.iter().enumerate() {
        if i % every == 0 || i + 1 == losses.len() {
            println!("  step {:>4}  loss {l:.4}", i + 1);
        }
    }
    if let Some((first, last)) = quarter_means(&losses) {
        println!(
            "demo: mean loss of the first quarter {first:.4}, of the last quarter {last:.4} \
             ({:+.0}%), {:.0}s in all",
            100.0 * (last - first) / first,
            t0.elapsed().as_secs_f64()
        );
    }
    let ck = outcome
        .last_checkpoint
        .clone()
        .ok_or_else(|| Error::msg("the demo run wrote no checkpoint"))?;
    let inputs = DatasetLayout::new(&layout.dataset, "test");
    let (src, tgt) = {
        let p = photos("test");
        (p[0].0.clone(), p[1].0.clone())
    };
    println!(
        "demo: log {}, loss curve {}, validation grids in {}\n\
         generate with the trained tiny weights:\n  mcld infer --ckpt_dir {} --config_path {} \
         --source {} --texture {} --face {} --pose {} --out demo_trained.png",
        layout.exp_dir.join(LOG_FILE).display(),
        layout.exp_dir.join(super::train_loop::LOSS_CURVE).display(),
        layout.exp_dir.join("validation").display(),
        ck.display(),
        layout.config.display(),
        inputs.photo(&src).display(),
        inputs.texture(&src).display(),
        inputs.face(&src).display(),
        inputs.pose(&tgt).display(),
    );
    Ok(outcome)
}
