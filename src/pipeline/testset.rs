//! `mcld test`: generate every pair of `test.csv` at 256x176 and 512x352, plus the ground truth,
//! resuming where a previous run stopped.
//!
//! Decisions: a pair counts as done only when both of its outputs decode as images (a file cut
//! short by a crash is regenerated); outputs are written through temp files and renamed; a pair
//! whose inputs are missing or unreadable is skipped with its reason and listed in the summary,
//! while a model error stops the run (it would fail every pair alike).
//!
//! Several processes can share the list (`--shard K/N`, see `crate::rank`): each takes the pairs
//! whose index i in `test.csv` (after `--limit`) has i mod N == K, and writes them into the same
//! folders; the outputs are per pair, so shards never write the same file. A pair's noise is
//! seeded by that index, so its images do not depend on sharding, batching or resumption.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::data::{load_pair, DatasetLayout, Pair, PairInputs};
use crate::rank::Shard;
use crate::Result;

/// The output sizes of the reference, (height, width), and their folder names.
pub const OUTPUT_SIZES: [((usize, usize), &str); 2] = [((256, 176), "256"), ((512, 352), "512")];

/// Anything that turns a batch of pair inputs into images: (3, H, W) f32 in [0, 1] each.
pub trait Generator {
    /// `positions[j]` is the index of `batch[j]` in the whole test list (`test.csv` order): what
    /// a pair's randomness is keyed on, so that its image is the same whichever batch, run or
    /// shard it falls in.
    fn generate(&mut self, batch: &[PairInputs], positions: &[usize]) -> Result<Vec<Tensor>>;
}

/// Generated image (3, H, W) in [0, 1] -> uint8 RGB at (height, width).
pub type ResizeGenerated = dyn Fn(&Tensor, (usize, usize)) -> Result<RgbImage> + Send + Sync;
/// Ground-truth photo -> uint8 RGB at (height, width).
pub type ResizePhoto = dyn Fn(&RgbImage, (usize, usize)) -> Result<RgbImage> + Send + Sync;

/// Resizes used for saving; injected so that the exact Pillow/torch ports live in `imageops`.
pub struct Postprocess {
    /// Generated image (3, H, W) in [0, 1] -> uint8 RGB at (height, width).
    pub generated: Box<ResizeGenerated>,
    /// Ground-truth photo -> uint8 RGB at (height, width).
    pub ground_truth: Box<ResizePhoto>,
}

impl Postprocess {
    /// The reference's: generated images through torch's antialiased bicubic and truncating
    /// quantisation, ground truth through Pillow's bicubic (torchvision `Resize` on PIL images).
    pub fn reference() -> Self {
        Self {
            generated: Box::new(crate::imageops::generated_to_rgb),
            ground_truth: Box::new(|img, hw| {
                crate::imageops::pil_resize_rgb(img, hw, crate::imageops::Filter::Bicubic)
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestRunOptions {
    /// Output root: `save_path/exp_name/{256,512}/` and `save_path/gt/{256,512}/`.
    pub save_path: PathBuf,
    pub exp_name: String,
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
    /// The share of the (limited) list this run does.
    pub shard: Shard,
}

#[derive(Debug, Default, Clone)]
pub struct TestSummary {
    /// The share of the list this run did, and the pairs in it.
    pub shard: Shard,
    pub pairs_in_shard: usize,
    pub generated: usize,
    pub already_done: usize,
    /// (pair output name, reason)
    pub skipped: Vec<(String, String)>,
    pub seconds: f64,
}

impl TestSummary {
    pub fn print(&self) {
        if !self.shard.is_whole() {
            println!("shard {}: {} pairs", self.shard, self.pairs_in_shard);
        }
        println!(
            "generated {} pairs, {} already done, {} skipped in {:.1}s",
            self.generated,
            self.already_done,
            self.skipped.len(),
            self.seconds
        );
        for (name, why) in &self.skipped {
            println!("  skipped {name}: {why}");
        }
    }
}

fn out_path(root: &Path, folder: &str, size: &str, pair: &Pair) -> PathBuf {
    root.join(folder).join(size).join(pair.out_name())
}

/// True when the file exists and decodes completely.
fn is_good_image(path: &Path) -> bool {
    path.exists()
        && image::ImageReader::open(path)
            .ok()
            .and_then(|r| r.with_guessed_format().ok())
            .and_then(|r| r.decode().ok())
            .is_some()
}

fn pair_done(opts: &TestRunOptions, pair: &Pair) -> bool {
    OUTPUT_SIZES.iter().all(|(_, s)| {
        is_good_image(&out_path(&opts.save_path, &opts.exp_name, s, pair))
            && is_good_image(&out_path(&opts.save_path, "gt", s, pair))
    })
}

/// Runs this shard of the test set; returns what was done. `pairs` is the full list in
/// `test.csv` order.
pub fn run_test_set(
    opts: &TestRunOptions,
    layout: &DatasetLayout,
    pairs: &[Pair],
    generator: &mut dyn Generator,
    post: &Postprocess,
) -> Result<TestSummary> {
    let start = std::time::Instant::now();
    let pairs = &pairs[..opts.limit.unwrap_or(pairs.len()).min(pairs.len())];
    let mine: Vec<(usize, &Pair)> = pairs
        .iter()
        .enumerate()
        .filter(|(i, _)| opts.shard.owns_index(*i))
        .collect();
    let done: Vec<bool> = mine.par_iter().map(|(_, p)| pair_done(opts, p)).collect();
    let todo: Vec<(usize, &Pair)> = mine
        .iter()
        .zip(&done)
        .filter(|(_, d)| !**d)
        .map(|(p, _)| *p)
        .collect();
    let mut summary = TestSummary {
        shard: opts.shard,
        pairs_in_shard: mine.len(),
        already_done: mine.len() - todo.len(),
        ..Default::default()
    };

    let bar = if opts.progress {
        let b = ProgressBar::new(todo.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} pairs  {per_sec}  ETA {eta}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    for chunk in todo.chunks(opts.batch_size.max(1)) {
        // (pair output name, reason) for a pair whose inputs do not load.
        type Loaded = std::result::Result<PairInputs, (String, String)>;
        let loaded: Vec<Loaded> = chunk
            .par_iter()
            .map(|(_, p)| load_pair(layout, p).map_err(|e| (p.out_name(), e.to_string())))
            .collect();
        let mut batch = Vec::with_capacity(chunk.len());
        let mut positions = Vec::with_capacity(chunk.len());
        for ((i, _), l) in chunk.iter().zip(loaded) {
            match l {
                Ok(x) => {
                    batch.push(x);
                    positions.push(*i);
                }
                Err(s) => {
                    bar.println(format!("skipping {}: {}", s.0, s.1));
                    summary.skipped.push(s);
                    bar.inc(1);
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let images = generator.generate(&batch, &positions)?;
        if images.len() != batch.len() {
            return Err(crate::Error::msg(format!(
                "generator returned {} images for {} pairs",
                images.len(),
                batch.len()
            )));
        }
        batch
            .par_iter()
            .zip(images.par_iter())
            .map(|(inp, img)| save_pair(opts, post, inp, img))
            .collect::<Result<Vec<()>>>()?;
        summary.generated += batch.len();
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn save_pair(
    opts: &TestRunOptions,
    post: &Postprocess,
    inp: &PairInputs,
    img: &Tensor,
) -> Result<()> {
    for (hw, s) in OUTPUT_SIZES {
        let gt = (post.ground_truth)(&inp.target, hw)?;
        crate::fsutil::save_image_atomic(
            &image::DynamicImage::ImageRgb8(gt),
            &out_path(&opts.save_path, "gt", s, &inp.pair),
        )?;
        let out = (post.generated)(img, hw)?;
        crate::fsutil::save_image_atomic(
            &image::DynamicImage::ImageRgb8(out),
            &out_path(&opts.save_path, &opts.exp_name, s, &inp.pair),
        )?;
    }
    Ok(())
}

/// Rows of the `test --limit` panel at most (a longer list still gets its images, not rows).
pub const PANEL_ROWS: usize = 16;

/// Where `test --limit` puts its panel: `SAVE_PATH/EXP/panels.png`.
pub fn panels_path(opts: &TestRunOptions) -> PathBuf {
    opts.save_path.join(&opts.exp_name).join("panels.png")
}

/// `mcld test --limit N`: the first pairs (up to [`PANEL_ROWS`]) whose 512 output exists, in
/// the labelled layout of the validation grid; `None` when no pair has one.
pub fn write_panels(
    opts: &TestRunOptions,
    layout: &DatasetLayout,
    pairs: &[Pair],
    seed: u64,
) -> Result<Option<PathBuf>> {
    let limited = &pairs[..opts.limit.unwrap_or(pairs.len()).min(pairs.len())];
    let mut rows = Vec::new();
    for (i, p) in limited.iter().enumerate() {
        if rows.len() == PANEL_ROWS {
            break;
        }
        let generated = out_path(&opts.save_path, &opts.exp_name, OUTPUT_SIZES[1].1, p);
        if !generated.is_file() {
            continue;
        }
        let Ok(inp) = load_pair(layout, p) else {
            continue;
        };
        rows.push(crate::imageops::grid::GridRow {
            label: format!("#{i}  {}", p.label()),
            panels: vec![
                inp.source,
                inp.texture,
                crate::imageops::viz::pose_preview(&inp.pose),
                crate::data::read_rgb(&generated)?,
                inp.target,
            ],
        });
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let title = format!(
        "{} - mcld test - seed {seed} (pair #i uses seed + i) - {} of {} pairs",
        opts.exp_name,
        rows.len(),
        limited.len()
    );
    let img = crate::imageops::grid::labelled_grid(
        &title,
        &crate::imageops::grid::PAIR_COLUMNS,
        &rows,
        crate::imageops::grid::MIN_CELL,
    )?;
    let path = panels_path(opts);
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img), &path)?;
    Ok(Some(path))
}
