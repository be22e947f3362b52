//! The validation grid of `mcld train` (SPEC §4): every `validation_steps`, the pipeline built
//! from the step's current weights generates `data.val_bs` pairs of the test list (20 DDIM steps,
//! guidance 3.5, the config's seed, the training scheduler config as the reference does), saved
//! as `{exp_dir}/validation/step-{step}.png`: `val_bs` rows, one per pair and labelled with it,
//! under a header naming the columns (source | texture | target pose | generated | ground
//! truth) and a title with the step and the seed; cells at least 256 px whatever the training
//! size.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::RgbImage;

use super::train_loop::TrainHooks;
use crate::config::TrainConfig;
use crate::data::{load_pair, read_pairs, DatasetLayout, PairInputs};
use crate::imageops::grid::{labelled_grid, GridRow, MIN_CELL};
use crate::models::clip::ClipVisionModelWithProjection;
use crate::models::mcld::Mcld;
use crate::models::unet;
use crate::models::vae::AutoencoderKL;
use crate::pipeline::mcld::{build_nets, McldPipeline, Precision};
use crate::scheduler::ddim::DdimScheduler;
use crate::train::step::api::{Net, TrainStep};
use crate::weights::StrictWeights;
use crate::{Error, Result};

/// DDIM steps and guidance scale of the reference's validation.
pub const VALIDATION_STEPS: usize = 20;
pub const VALIDATION_GUIDANCE: f64 = 3.5;
/// The grid's columns.
pub use crate::imageops::grid::PAIR_COLUMNS as GRID_COLUMNS;

/// Where the grid of `step` goes.
pub fn grid_path(exp_dir: &Path, step: u64) -> PathBuf {
    exp_dir.join("validation").join(format!("step-{step}.png"))
}

/// What stays loaded between validations: the frozen models and the decoded pairs.
struct Loaded {
    ucfg: unet::Config,
    vae: AutoencoderKL,
    image_encoder: ClipVisionModelWithProjection,
    scheduler: DdimScheduler,
    pairs: Vec<PairInputs>,
}

/// [`TrainHooks`] that renders the validation grid. The VAE, CLIP and the pairs are loaded at
/// the first validation (a loading failure is then a warning of the run, retried next time).
pub struct ValidationHook {
    cfg: TrainConfig,
    device: Device,
    precision: Precision,
    loaded: Option<Loaded>,
    /// Also say on stderr which pairs the grid shows (once).
    verbose: bool,
}

impl ValidationHook {
    /// `dtype` is the training compute dtype; half precision on the CPU validates in f32, as
    /// the frozen encoders of the step do.
    pub fn new(cfg: &TrainConfig, device: &Device, dtype: DType, verbose: bool) -> Self {
        let dtype = if device.is_cpu() && dtype != DType::F32 {
            DType::F32
        } else {
            dtype
        };
        Self {
            cfg: cfg.clone(),
            device: device.clone(),
            precision: Precision::new(device, dtype),
            loaded: None,
            verbose,
        }
    }

    /// The image side the pipeline runs at: the training size (square, as the reference's).
    fn size(&self) -> usize {
        self.cfg.data.train_height.max(self.cfg.data.train_width)
    }

    fn load(&self) -> Result<Loaded> {
        let ucfg_path = self
            .cfg
            .base_model_path
            .join(crate::weights::files::UNET_CONFIG);
        let ucfg = unet::Config::from_json_file(&ucfg_path)?;
        let enc = crate::train::step::setup::frozen_encoders(
            &self.cfg,
            &self.device,
            self.precision.compute,
        )?;
        let mut scheduler = crate::train::step::setup::val_scheduler(&self.cfg)?;
        scheduler.set_timesteps(VALIDATION_STEPS)?;
        let (pairs, note) = validation_pairs(&self.cfg, self.cfg.data.val_bs.max(1))?;
        if self.verbose || note.is_some() {
            eprintln!(
                "validation grid: {} pairs{}",
                pairs.len(),
                note.map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        Ok(Loaded {
            ucfg,
            vae: enc.vae,
            image_encoder: enc.image_encoder,
            scheduler,
            pairs,
        })
    }

    /// The grid image of the step's current weights.
    pub fn render(&mut self, step: u64, model: &dyn TrainStep) -> Result<RgbImage> {
        if self.loaded.is_none() {
            self.loaded = Some(self.load()?);
        }
        let size = self.size();
        let l = self
            .loaded
            .as_ref()
            .ok_or_else(|| Error::msg("validation models not loaded"))?;
        let parts = [
            (Mcld::REFERENCE_UNET, Net::ReferenceUnet),
            (Mcld::DENOISING_UNET, Net::DenoisingUnet),
            (Mcld::POSE_GUIDER, Net::PoseGuider),
            (Mcld::IMAGE_PROJ, Net::ImageProj),
        ]
        .into_iter()
        .map(|(prefix, net)| {
            let src = format!("training step {step}: {}", net.file_name());
            Ok((prefix, StrictWeights::new(model.weights(net)?, src)))
        })
        .collect::<Result<Vec<_>>>()?;
        let nets = build_nets(parts, l.ucfg.clone(), &self.precision, &self.device)?;
        let pipeline = McldPipeline {
            nets,
            vae: l.vae.clone(),
            image_encoder: l.image_encoder.clone(),
            scheduler: l.scheduler.clone(),
            guidance_scale: VALIDATION_GUIDANCE,
            device: self.device.clone(),
            dtype: self.precision.compute,
            precision: self.precision,
            size,
        };
        let generated = pipeline.generate(&l.pairs, self.cfg.seed)?;
        let mut rows = Vec::with_capacity(l.pairs.len());
        for (p, g) in l.pairs.iter().zip(&generated) {
            rows.push(GridRow {
                label: p.pair.label(),
                panels: vec![
                    p.source.clone(),
                    p.texture.clone(),
                    crate::imageops::viz::pose_preview(&p.pose),
                    crate::imageops::generated_to_rgb(g, (size, size))?,
                    p.target.clone(),
                ],
            });
        }
        let title = format!(
            "{} - validation at step {step} - seed {} - {VALIDATION_STEPS} DDIM steps, \
             guidance {VALIDATION_GUIDANCE}",
            self.cfg.exp_name, self.cfg.seed
        );
        labelled_grid(&title, &GRID_COLUMNS, &rows, (size as u32).max(MIN_CELL))
    }
}

impl TrainHooks for ValidationHook {
    fn validate(&mut self, step: u64, model: &dyn TrainStep, exp_dir: &Path) -> Result<()> {
        let img = self.render(step, model)?;
        crate::fsutil::save_image_atomic(
            &image::DynamicImage::ImageRgb8(img),
            &grid_path(exp_dir, step),
        )
    }
}

/// The first `n` pairs of the test list whose files all read; the training list when none
/// does, with a note saying so.
pub fn validation_pairs(cfg: &TrainConfig, n: usize) -> Result<(Vec<PairInputs>, Option<String>)> {
    let root = &cfg.data.root_dir;
    let list = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let test_csv = list(&cfg.data.test_pairs);
    let test = usable(&test_csv, &DatasetLayout::new(root, "test"), n);
    if !test.is_empty() {
        return Ok((test, None));
    }
    let train_csv = list(&cfg.data.train_pairs);
    let train = usable(&train_csv, &DatasetLayout::new(root, "train"), n);
    if train.is_empty() {
        return Err(Error::msg(format!(
            "no usable validation pair: neither {} nor {} lists a pair whose files all read",
            test_csv.display(),
            train_csv.display()
        )));
    }
    Ok((
        train,
        Some(format!(
            "no usable pair in {}: showing training pairs from {}",
            test_csv.display(),
            train_csv.display()
        )),
    ))
}

fn usable(csv: &Path, layout: &DatasetLayout, n: usize) -> Vec<PairInputs> {
    let Ok(pairs) = read_pairs(csv) else {
        return Vec::new();
    };
    pairs
        .iter()
        .filter_map(|p| load_pair(layout, p).ok())
        .take(n)
        .collect()
}
