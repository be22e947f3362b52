//! The training pairs of `train.csv` with their files, as the reference's training dataset reads
//! them (SPEC §2, §4): source and target photo, target IUV, source texture, source face embedding
//! (zeros when the file is missing). Everything is squashed to the training size with Pillow's
//! bicubic; source and texture also get CLIP's preprocessing.
//!
//! A pair with a missing or unreadable file is skipped and recorded, never zero-filled: missing
//! files are found when the set is opened, undecodable ones when the loader reaches them. The
//! loader ([`Loader`]) decodes on worker threads ahead of the training step, in an order that is
//! a pure function of (seed, epoch, rank), so a resumed run reads the same batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::data::{load_pair, read_pairs, DatasetLayout, Pair};
use crate::imageops::{pil_resize_rgb, Filter, U8Image};
use crate::models::clip;
use crate::{Error, Result};

/// One micro-batch as the data loader delivers it: host tensors, f32.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Target photos in [-1, 1], (B, 3, H, W).
    pub target: Tensor,
    /// Source texture maps in [-1, 1], (B, 3, H, W): the reference UNet's input through the VAE.
    pub texture: Tensor,
    /// CLIP-preprocessed source photos (B, 3, 224, 224).
    pub clip_src: Tensor,
    /// CLIP-preprocessed source texture maps (B, 3, 224, 224).
    pub clip_tex: Tensor,
    /// Target IUV images / 255, (B, 3, H, W); channel 2 x 255 is the DensePose part index.
    pub pose: Tensor,
    /// Source face embeddings (B, 1, 512); zeros where the pair has no face file.
    pub face: Tensor,
}

impl TrainBatch {
    pub fn len(&self) -> usize {
        self.target.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pair left out of training, with the file at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedPair {
    pub from: String,
    pub to: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The usable pairs of a training CSV and where their files are.
#[derive(Debug, Clone)]
pub struct TrainSet {
    layout: DatasetLayout,
    csv: PathBuf,
    pairs: Vec<Pair>,
    /// (height, width) every image is squashed to.
    size: (usize, usize),
    /// Pairs dropped when the set was opened (a file is missing).
    pub skipped: Vec<SkippedPair>,
}

/// One decoded pair, host tensors in the layout of [`TrainBatch`] without the batch axis.
#[derive(Debug, Clone)]
pub struct TrainSample {
    pub target: Tensor,
    pub texture: Tensor,
    pub clip_src: Tensor,
    pub clip_tex: Tensor,
    pub pose: Tensor,
    pub face: Tensor,
}

/// Where a rank stands in its data: epoch and index into its shard of that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPos {
    pub epoch: u64,
    pub pos: u64,
}

impl TrainSet {
    /// `data.train_pairs` (relative to `data.root_dir` unless absolute) under `data.root_dir`,
    /// at `train_height` x `train_width`.
    pub fn from_config(data: &DataConfig) -> Result<Self> {
        let csv = if data.train_pairs.is_absolute() {
            data.train_pairs.clone()
        } else {
            data.root_dir.join(&data.train_pairs)
        };
        Self::open(&data.root_dir, &csv, (data.train_height, data.train_width))
    }

    /// Reads the CSV and keeps the pairs whose files all exist; a set with none is an error
    /// that says what is missing.
    pub fn open(root: &Path, csv: &Path, size: (usize, usize)) -> Result<Self> {
        if size.0 == 0 || size.1 == 0 {
            return Err(Error::msg(format!(
                "training size {}x{} is empty",
                size.1, size.0
            )));
        }
        let all = read_pairs(csv)?;
        let layout = DatasetLayout::new(root, "train");
        let checked: Vec<std::result::Result<Pair, SkippedPair>> = all
            .par_iter()
            .map(|p| match missing_file(&layout, p) {
                None => Ok(p.clone()),
                Some(path) => Err(SkippedPair {
                    from: p.from.clone(),
                    to: p.to.clone(),
                    path,
                    reason: "file not found".into(),
                }),
            })
            .collect();
        let mut pairs = Vec::new();
        let mut skipped = Vec::new();
        for c in checked {
            match c {
                Ok(p) => pairs.push(p),
                Err(s) => skipped.push(s),
            }
        }
        let set = Self {
            layout,
            csv: csv.to_path_buf(),
            pairs,
            size,
            skipped,
        };
        if set.pairs.is_empty() {
            return Err(set.no_usable_pair(all.len()));
        }
        Ok(set)
    }

    fn no_usable_pair(&self, listed: usize) -> Error {
        if listed == 0 {
            return Error::input(&self.csv, "lists no pairs (only a header, or empty)");
        }
        // Count by folder so the message says which stage of `prepare` has not run.
        let mut by_dir: BTreeMap<String, usize> = BTreeMap::new();
        for s in &self.skipped {
            let dir = s
                .path
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            *by_dir.entry(dir).or_default() += 1;
        }
        let counts: Vec<String> = by_dir
            .iter()
            .map(|(d, n)| format!("{n} with a file missing in {d}"))
            .collect();
        let first = self
            .skipped
            .first()
            .map(|s| format!("; first: {} ({})", s.path.display(), s.reason))
            .unwrap_or_default();
        Error::input(
            &self.csv,
            format!(
                "no usable training pair: all {listed} listed pairs lack a file ({}){first}. \
                 Run `mcld prepare` for the missing stages",
                counts.join(", ")
            ),
        )
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }

    pub fn csv(&self) -> &Path {
        &self.csv
    }

    /// (height, width) of the images in a batch.
    pub fn size(&self) -> (usize, usize) {
        self.size
    }

    /// Decodes pair `i`; the error names the file that could not be read.
    pub fn load(&self, i: usize) -> Result<TrainSample> {
        let pair = self.pairs.get(i).ok_or_else(|| {
            Error::msg(format!(
                "pair index {i} out of range ({} pairs)",
                self.pairs.len()
            ))
        })?;
        let inputs = load_pair(&self.layout, pair)?;
        let squash = |img: &RgbImage| -> Result<RgbImage> {
            let (h, w) = self.size;
            if img.width() as usize == w && img.height() as usize == h {
                return Ok(img.clone());
            }
            pil_resize_rgb(img, (h, w), Filter::Bicubic)
        };
        let pre = clip::Preprocess::default();
        let source = squash(&inputs.source)?;
        let texture = squash(&inputs.texture)?;
        Ok(TrainSample {
            target: unit_tensor(&squash(&inputs.target)?, true)?,
            texture: unit_tensor(&texture, true)?,
            clip_src: pre.apply(&U8Image::from_rgb(&source), &Device::Cpu)?,
            clip_tex: pre.apply(&U8Image::from_rgb(&texture), &Device::Cpu)?,
            pose: unit_tensor(&squash(&inputs.pose)?, false)?,
            face: Tensor::from_vec(inputs.face, (1, 512), &Device::Cpu)?,
        })
    }

    /// [`TrainSet::load`], with a failure turned into the record of a skipped pair.
    fn load_or_skip(&self, i: usize) -> std::result::Result<TrainSample, SkippedPair> {
        self.load(i).map_err(|e| {
            let pair = &self.pairs[i];
            let (path, reason) = match e {
                Error::Input { path, msg } => (path, msg),
                Error::Io { path, source } => (path, source.to_string()),
                e => (self.layout.photo(&pair.from), e.to_string()),
            };
            SkippedPair {
                from: pair.from.clone(),
                to: pair.to.clone(),
                path,
                reason,
            }
        })
    }

    /// Pair indices of `epoch` in training order: a seeded shuffle, the same on every rank.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.pairs.len()).collect();
        let mut rng = StdRng::seed_from_u64(mix(seed, epoch));
        order.shuffle(&mut rng);
        order
    }

    /// The part of `epoch`'s order that `rank` of `world` reads: every `world`-th entry from
    /// `rank`, so ranks never share a pair within an epoch.
    pub fn shard(&self, seed: u64, epoch: u64, rank: usize, world: usize) -> Vec<usize> {
        self.epoch_order(seed, epoch)
            .into_iter()
            .skip(rank)
            .step_by(world.max(1))
            .collect()
    }
}

/// Distinct epochs get unrelated shuffles (SplitMix64 finaliser).
fn mix(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first required file of a pair that does not exist (the face embedding is optional).
fn missing_file(layout: &DatasetLayout, p: &Pair) -> Option<PathBuf> {
    [
        layout.photo(&p.from),
        layout.photo(&p.to),
        layout.pose(&p.to),
        layout.texture(&p.from),
    ]
    .into_iter()
    .find(|f| !f.is_file())
}

/// RGB bytes -> (3, H, W) f32: torchvision's `ToTensor` (x / 255), then with `signed`
/// `Normalize(0.5, 0.5)` to [-1, 1], in the same float operations.
fn unit_tensor(img: &RgbImage, signed: bool) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = px[c] as f32 / 255.0;
            out[c * plane + i] = if signed { (v - 0.5) / 0.5 } else { v };
        }
    }
    Ok(Tensor::from_vec(out, (3, h, w), &Device::Cpu)?)
}

/// Stacks samples into one batch.
pub fn collate(samples: &[TrainSample]) -> Result<TrainBatch> {
    if samples.is_empty() {
        return Err(Error::msg("cannot build a training batch of no samples"));
    }
    let stack = |f: fn(&TrainSample) -> &Tensor| -> Result<Tensor> {
        let v: Vec<&Tensor> = samples.iter().map(f).collect();
        Ok(Tensor::stack(&v, 0)?)
    };
    Ok(TrainBatch {
        target: stack(|s| &s.target)?,
        texture: stack(|s| &s.texture)?,
        clip_src: stack(|s| &s.clip_src)?,
        clip_tex: stack(|s| &s.clip_tex)?,
        pose: stack(|s| &s.pose)?,
        face: stack(|s| &s.face)?,
    })
}

/// A batch as the loader hands it over.
#[derive(Debug)]
pub struct LoadedBatch {
    pub batch: TrainBatch,
    /// Data position after this batch: where a run resumed after it starts reading.
    pub after: DataPos,
    /// Pairs that failed to decode while this batch was filled.
    pub skipped: Vec<SkippedPair>,
}

/// What a [`Loader`] reads.
#[derive(Debug, Clone, Copy)]
pub struct LoaderOptions {
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    pub batch_size: usize,
    /// Batches decoded ahead of the step (the bound of the queue).
    pub prefetch: usize,
}

/// Background batch producer: one thread walks this rank's shard in order and decodes each
/// batch's pairs in parallel (rayon), feeding a bounded queue. Batches never span epochs: when
/// the rest of a shard cannot fill one, the next epoch starts (the rest is dropped, as
/// `drop_last` does), so every rank and every step sees a full batch.
pub struct Loader {
    rx: Option<Receiver<Result<LoadedBatch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    pub fn start(set: Arc<TrainSet>, opts: LoaderOptions, start: DataPos) -> Result<Self> {
        if opts.batch_size == 0 || opts.world == 0 || opts.rank >= opts.world {
            return Err(Error::msg(format!(
                "loader: batch size {} rank {} of {} is not a valid setting",
                opts.batch_size, opts.rank, opts.world
            )));
        }
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name(format!("mcld-loader-{}", opts.rank))
            .spawn(move || {
                let mut walk = Walk::new(&set, opts, start);
                loop {
                    let item = walk.next_batch();
                    let stop = item.is_err();
                    // The receiver is gone when the run ended: stop quietly.
                    if tx.send(item).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| Error::msg(format!("cannot start the data loader thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// The next batch (waits for the workers when they are behind).
    pub fn next_batch(&mut self) -> Result<LoadedBatch> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::msg("data loader already stopped"))?;
        rx.recv()
            .map_err(|_| Error::msg("data loader stopped unexpectedly"))?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queue makes the producer's next send fail, and it returns.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The deterministic walk behind [`Loader`], usable without a thread.
pub struct Walk<'a> {
    set: &'a TrainSet,
    opts: LoaderOptions,
    cur: DataPos,
    shard: Vec<usize>,
    shard_epoch: Option<u64>,
    /// Batches produced in the current epoch (an epoch with none means nothing is readable).
    batches_this_epoch: usize,
}

impl<'a> Walk<'a> {
    pub fn new(set: &'a TrainSet, opts: LoaderOptions, start: DataPos) -> Self {
        Self {
            set,
            opts,
            cur: start,
            shard: Vec::new(),
            shard_epoch: None,
            // Resumed mid-epoch: that epoch already gave batches.
            batches_this_epoch: usize::from(start.pos > 0),
        }
    }

    fn load_shard(&mut self) {
        if self.shard_epoch != Some(self.cur.epoch) {
            self.shard = self.set.shard(
                self.opts.seed,
                self.cur.epoch,
                self.opts.rank,
                self.opts.world,
            );
            self.shard_epoch = Some(self.cur.epoch);
        }
    }

    pub fn next_batch(&mut self) -> Result<LoadedBatch> {
        let bs = self.opts.batch_size;
        let mut samples: Vec<TrainSample> = Vec::with_capacity(bs);
        let mut skipped = Vec::new();
        let mut failures_this_epoch: Vec<SkippedPair> = Vec::new();
        loop {
            self.load_shard();
            let need = bs - samples.len();
            let left = self.shard.len().saturating_sub(self.cur.pos as usize);
            if left < need {
                if self.batches_this_epoch == 0 {
                    return Err(self.nothing_readable(&failures_this_epoch));
                }
                // The rest of this epoch cannot fill the batch: start the next epoch afresh.
                self.cur = DataPos {
                    epoch: self.cur.epoch + 1,
                    pos: 0,
                };
                self.batches_this_epoch = 0;
                samples.clear();
                failures_this_epoch.clear();
                continue;
            }
            let start = self.cur.pos as usize;
            let idx = &self.shard[start..start + need];
            let decoded: Vec<_> = idx.par_iter().map(|&i| self.set.load_or_skip(i)).collect();
            self.cur.pos += need as u64;
            for d in decoded {
                match d {
                    Ok(s) => samples.push(s),
                    Err(s) => {
                        failures_this_epoch.push(s.clone());
                        skipped.push(s);
                    }
                }
            }
            if samples.len() == bs {
                self.batches_this_epoch += 1;
                return Ok(LoadedBatch {
                    batch: collate(&samples)?,
                    after: self.cur,
                    skipped,
                });
            }
        }
    }

    fn nothing_readable(&self, failures: &[SkippedPair]) -> Error {
        if failures.is_empty() {
            return Error::input(
                self.set.csv(),
                format!(
                    "rank {} of {} gets {} of the {} usable pairs per epoch, fewer than one \
                     batch of train_bs {}",
                    self.opts.rank,
                    self.opts.world,
                    self.shard.len(),
                    self.set.len(),
                    self.opts.batch_size
                ),
            );
        }
        let first = failures
            .first()
            .map(|s| format!("; first: {}: {}", s.path.display(), s.reason))
            .unwrap_or_default();
        Error::input(
            self.set.csv(),
            format!(
                "no training batch of {} could be read in epoch {} of rank {}: its shard has {} \
                 pairs, {} of them unreadable{first}",
                self.opts.batch_size,
                self.cur.epoch,
                self.opts.rank,
                self.shard.len(),
                failures.len()
            ),
        )
    }
}
