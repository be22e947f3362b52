//! The stage runner behind `mcld prepare`: runs the selected stages in order, each one skipping
//! outputs that already exist (so an interrupted run resumes), records per-item failures without
//! stopping, and writes `prepare_report.json`.
//!
//! Under `--shard K/N` (see `crate::rank`) each run does the photos of its shard in every
//! per-photo stage (split, densepose, texture, face); `pairs` runs on shard 0 only and `stats`
//! on none (it needs every training photo: run `--only stats` once the shards are done). The
//! report is `prepare_report.shard-K-of-N.json`, so shards sharing a dataset root keep theirs.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::report::{Failure, PrepareReport, StageReport, StageStatus};
use super::split::SplitLists;
use super::{densepose, face, pairs, split, stats};
use crate::data::{derived_path, list_photos, Part};
use crate::person::texture;
use crate::rank::Shard;
use crate::{Error, Result};

/// A step of `prepare`, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Split,
    Pairs,
    Densepose,
    Texture,
    Face,
    Stats,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Split,
        Stage::Pairs,
        Stage::Densepose,
        Stage::Texture,
        Stage::Face,
        Stage::Stats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Split => "split",
            Stage::Pairs => "pairs",
            Stage::Densepose => "densepose",
            Stage::Texture => "texture",
            Stage::Face => "face",
            Stage::Stats => "stats",
        }
    }

    /// Stages named by `--only` (empty = all), sorted into run order, duplicates dropped.
    pub fn parse_selection(names: &[String]) -> Result<Vec<Stage>> {
        if names.iter().all(|n| n.trim().is_empty()) {
            return Ok(Stage::ALL.to_vec());
        }
        let mut v = names
            .iter()
            .filter(|n| !n.trim().is_empty())
            .map(|n| n.parse())
            .collect::<Result<Vec<Stage>>>()?;
        v.sort();
        v.dedup();
        Ok(v)
    }
}

impl FromStr for Stage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown prepare stage `{s}`; expected one of split, pairs, densepose, \
                     texture, face, stats"
                ))
            })
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Raw `MEN/`, `WOMEN/` in; `train/`, `test/`, `*_densepose/`, ... out.
    pub dataset_root: PathBuf,
    /// DensePose `.pkl`, SCRFD/ArcFace `.onnx`, CLIP.
    pub pretrained_dir: PathBuf,
    pub stages: Vec<Stage>,
    pub lists: SplitLists,
    /// Decode every photo during the split, so a corrupt JPEG is reported there and kept out.
    pub verify_images: bool,
    /// Progress bars and a printed summary (off for tests and scripts).
    pub interactive: bool,
    /// Where the JSON report goes; default `DATASET_ROOT/prepare_report.json` (with
    /// `.shard-K-of-N` before `.json` for a shard).
    pub report_path: Option<PathBuf>,
    /// The photos this run does (everything by default).
    pub shard: Shard,
    /// DensePose detectron2 YAML; default `configs/densepose/densepose_rcnn_R_101_FPN_DL_s1x.yaml`
    /// (the compiled-in copy when that file is not there).
    pub densepose_config: Option<PathBuf>,
    /// DensePose weights; default `PRETRAINED_DIR/model_final_844d15.pkl`.
    pub densepose_weights: Option<PathBuf>,
    /// Photos per DensePose backbone pass; default 1 on the CPU, 4 on a GPU.
    pub densepose_batch: Option<usize>,
    /// Where the networks run.
    pub device: Device,
    /// Requested precision (DensePose stays in float32, see its stage).
    pub dtype: DType,
}

impl PrepareOptions {
    /// All stages, the standard split lists, photos verified, no progress output, CPU, f32.
    pub fn new(dataset_root: impl Into<PathBuf>, pretrained_dir: impl Into<PathBuf>) -> Self {
        Self {
            dataset_root: dataset_root.into(),
            pretrained_dir: pretrained_dir.into(),
            stages: Stage::ALL.to_vec(),
            lists: SplitLists::builtin(),
            verify_images: true,
            interactive: false,
            report_path: None,
            shard: Shard::whole(),
            densepose_config: None,
            densepose_weights: None,
            densepose_batch: None,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Where the report is written.
    pub fn report_path(&self) -> PathBuf {
        self.report_path.clone().unwrap_or_else(|| {
            self.dataset_root
                .join(self.shard.file_name("prepare_report", "json"))
        })
    }
}

fn progress(opts: &PrepareOptions, stage: Stage) -> ProgressBar {
    if !opts.interactive {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(stage.name());
    bar
}

/// Runs the selected stages and writes the report. Stage-level problems (a missing folder, a
/// model not built) are recorded in the report, not returned, so later stages still run; the
/// error return is kept for a dataset root that does not exist or a report that cannot be written.
pub fn run_prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let root = &opts.dataset_root;
    if !root.is_dir() {
        return Err(Error::input(root, "dataset root is not a folder"));
    }
    let shard = opts.shard;
    let mut report = PrepareReport {
        dataset_root: root.clone(),
        shard: (!shard.is_whole()).then(|| shard.to_string()),
        stages: Vec::new(),
    };
    let mut stages = opts.stages.clone();
    stages.sort();
    stages.dedup();
    for stage in stages {
        let t0 = Instant::now();
        let bar = progress(opts, stage);
        let res = match stage {
            Stage::Split => split::run_split(root, &opts.lists, opts.verify_images, &shard, &bar),
            Stage::Pairs if shard.index != 0 => Ok(not_this_shard(
                stage,
                format!(
                    "train.csv and test.csv are written by shard 0/{}",
                    shard.count
                ),
            )),
            Stage::Pairs => pairs::run_pairs(root, &opts.lists),
            Stage::Densepose => run_densepose(opts, &bar),
            Stage::Texture => run_texture(root, &shard, &bar),
            Stage::Face => face::run_face(root, &opts.pretrained_dir, &shard, &bar),
            Stage::Stats if !shard.is_whole() => Ok(not_this_shard(
                stage,
                "clip_std.npy needs every training photo, so no shard computes it: run `mcld \
                 prepare --only stats` (without --shard) once every shard has finished"
                    .into(),
            )),
            Stage::Stats => stats::run_stats(root, &opts.pretrained_dir, &bar),
        };
        bar.finish_and_clear();
        let mut rep = res.unwrap_or_else(|e| StageReport::failed(stage.name(), e.to_string()));
        rep.settle();
        rep.seconds = t0.elapsed().as_secs_f64();
        report.stages.push(rep);
    }
    let path = opts.report_path();
    report.write_json(&path)?;
    if opts.interactive {
        eprint!("{}", report.summary(20));
        eprintln!("report: {}", path.display());
    }
    Ok(report)
}

/// A once-per-dataset stage that this shard leaves alone, saying why.
fn not_this_shard(stage: Stage, why: String) -> StageReport {
    let mut rep = StageReport::new(stage.name());
    rep.notes.push(why);
    rep
}

/// DensePose stage: IUV PNGs for the photos that have none (see `prepare::densepose`).
fn run_densepose(opts: &PrepareOptions, bar: &ProgressBar) -> Result<StageReport> {
    let dp = densepose::DenseposeOptions {
        config: opts.densepose_config.clone(),
        weights: opts.densepose_weights.clone().unwrap_or_else(|| {
            opts.pretrained_dir
                .join(crate::models::densepose::WEIGHTS_FILE)
        }),
        device: opts.device.clone(),
        dtype: opts.dtype,
        batch: opts.densepose_batch,
        shard: opts.shard,
    };
    densepose::run_stage(&opts.dataset_root, &dp, bar)
}

/// Reads an image as RGB, naming the file on failure.
fn read_rgb(path: &Path) -> Result<image::RgbImage> {
    crate::imageops::open_rgb(path)
}

/// Photo and IUV of one texture job, checked to decode and to have the same size.
pub fn load_texture_inputs(photo: &Path, iuv: &Path) -> Result<(image::RgbImage, image::RgbImage)> {
    let rgb = read_rgb(photo)?;
    let iuv_img = read_rgb(iuv)?;
    if iuv_img.dimensions() != rgb.dimensions() {
        let (w, h) = iuv_img.dimensions();
        let (pw, ph) = rgb.dimensions();
        return Err(Error::input(
            iuv,
            format!("IUV is {w}x{h}, its photo {} is {pw}x{ph}", photo.display()),
        ));
    }
    Ok((rgb, iuv_img))
}

/// One texture map: photo + IUV (same size) -> 512x512 PNG, written atomically.
pub fn texture_one(
    photo: &Path,
    iuv: &Path,
    out: &Path,
    assets: &texture::TextureAssets,
) -> Result<()> {
    let (rgb, iuv_img) = load_texture_inputs(photo, iuv)?;
    let tex = texture::texture_map(&rgb, &iuv_img, assets)
        .map_err(|e| Error::input(photo, format!("texture map: {e}")))?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(tex), out)
}

/// Texture stage: every photo of the shard with an IUV and no texture yet, in parallel.
fn run_texture(root: &Path, shard: &Shard, bar: &ProgressBar) -> Result<StageReport> {
    let mut rep = StageReport::new("texture");
    let mut jobs = Vec::new();
    for part in Part::ALL {
        for name in list_photos(root, part)? {
            if !shard.owns_name(&name) {
                continue;
            }
            let out = derived_path(root, part, "texture", &name, "png");
            let iuv = derived_path(root, part, "densepose", &name, "png");
            if out.is_file() {
                rep.skipped += 1;
            } else if !iuv.is_file() {
                rep.missing.push(iuv.display().to_string());
            } else {
                jobs.push((root.join(part.dir()).join(&name), iuv, out));
            }
        }
    }
    if !rep.missing.is_empty() {
        rep.notes.push(format!(
            "{} photos have no IUV yet (densepose stage) and were left for a later run",
            rep.missing.len()
        ));
    }
    if jobs.is_empty() {
        return Ok(rep);
    }
    let assets = match texture::TextureAssets::builtin() {
        Ok(a) => a,
        Err(e) => {
            rep.status = StageStatus::Failed;
            rep.error = Some(format!(
                "texture assets unavailable, {} jobs not attempted: {e}",
                jobs.len()
            ));
            return Ok(rep);
        }
    };
    bar.set_length(jobs.len() as u64);
    let results: Vec<Option<Failure>> = jobs
        .par_iter()
        .map(|(photo, iuv, out)| {
            let r = texture_one(photo, iuv, out, &assets);
            bar.inc(1);
            r.err().map(|e| Failure::new(photo, e.to_string()))
        })
        .collect();
    for r in results {
        match r {
            None => rep.done += 1,
            Some(f) => rep.failed.push(f),
        }
    }
    Ok(rep)
}
