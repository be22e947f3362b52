//! Checkpoint folders of `mcld train`: `{exp_dir}/checkpoint-{step}/` holds the four networks
//! under the released file names (so `mcld test --ckpt_dir` takes the folder as it is), the
//! step's own state (`train_state/`: weights, AdamW moments, loss scale) and `state.json` (where
//! the loop stands: step, data positions, seed).
//!
//! Resuming from a checkpoint while later ones exist (a run that went on from there and is
//! being abandoned) moves the later ones into `abandoned-{step}-{time}/`, so `latest` never
//! picks a state of another timeline.
//!
//! A folder exists complete or not at all: it is built as `checkpoint-{step}.tmp`, every file
//! and folder synced, then renamed; old folders are renamed away before they are deleted. Only
//! names `checkpoint-<digits>` holding `state.json` count as checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::train_set::DataPos;
use crate::train::step::api::{Net, TrainStep};
use crate::{Error, Result};

pub const STATE_FILE: &str = "state.json";
/// Subfolder handed to [`TrainStep::save_state`].
pub const TRAIN_STATE_DIR: &str = "train_state";
const PREFIX: &str = "checkpoint-";

/// `state.json`: what the loop needs to continue exactly where it stopped. No generator state:
/// every random draw of a step comes from `step_rng(seed, step, rank, micro)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: u64,
    /// Rank 0's epoch.
    pub epoch: u64,
    /// Each rank's position in its data after the last step, indexed by rank.
    pub data: Vec<DataPos>,
    /// f16 loss scale after the last step (none in f32/bf16).
    pub loss_scale: Option<f64>,
    pub seed: u64,
    pub world_size: usize,
    pub train_bs: usize,
    pub gradient_accumulation_steps: usize,
    /// Samples trained on so far, all ranks.
    pub samples_seen: u64,
}

pub fn checkpoint_dir(exp_dir: &Path, step: u64) -> PathBuf {
    exp_dir.join(format!("{PREFIX}{step}"))
}

fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Complete checkpoints in `exp_dir`, oldest first.
pub fn list_checkpoints(exp_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match std::fs::read_dir(exp_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(exp_dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(exp_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step(&name) {
            let p = e.path();
            if p.join(STATE_FILE).is_file() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(exp_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(exp_dir)?.pop().map(|(_, p)| p))
}

/// Removes what an interrupted run left half-done: `checkpoint-*.tmp` folders being written and
/// `checkpoint-*.del` folders being deleted. Returns what was removed.
pub fn clean_stale(exp_dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(exp_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(exp_dir, e)),
    };
    let mut removed = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(exp_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && (name.ends_with(".tmp") || name.ends_with(".del")) {
            let p = e.path();
            remove_any(&p)?;
            removed.push(p);
        }
    }
    Ok(removed)
}

fn remove_any(p: &Path) -> Result<()> {
    let r = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::input(&p, format!("bad checkpoint state: {e}")))
}

/// Writes `checkpoint-{state.step}` atomically. An existing complete folder of that step is
/// kept as it is (the same step of the same run holds the same state). On error nothing new is
/// left behind and older checkpoints are untouched.
pub fn write_checkpoint(
    exp_dir: &Path,
    model: &dyn TrainStep,
    state: &CheckpointState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(exp_dir, state.step);
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir);
    }
    let tmp = exp_dir.join(format!("{PREFIX}{}.tmp", state.step));
    remove_any(&tmp)?;
    let res = fill(&tmp, model, state).and_then(|()| {
        // A folder of that name without state.json is a leftover of nothing we wrote: replace.
        if dir.exists() {
            remove_any(&dir)?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        sync_dir(exp_dir)
    });
    if let Err(e) = res {
        let _ = remove_any(&tmp);
        return Err(e);
    }
    Ok(dir)
}

fn fill(tmp: &Path, model: &dyn TrainStep, state: &CheckpointState) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    for net in Net::ALL {
        let w = model.weights(net)?;
        let host: HashMap<String, Tensor> = w
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let p = tmp.join(net.file_name());
        candle_core::safetensors::save(&host, &p)
            .map_err(|e| Error::weights(&p, format!("cannot write: {e}")))?;
    }
    let st = tmp.join(TRAIN_STATE_DIR);
    std::fs::create_dir_all(&st).map_err(|e| Error::io(&st, e))?;
    model.save_state(&st)?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::msg(format!("cannot serialise checkpoint state: {e}")))?;
    let p = tmp.join(STATE_FILE);
    std::fs::write(&p, json).map_err(|e| Error::io(&p, e))?;
    sync_tree(tmp)
}

/// fsync of every file and folder under `dir` (and `dir`), so the rename publishes data that is
/// on disk.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in walkdir::WalkDir::new(dir).contents_first(true) {
        let e = e.map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
        let p = e.path();
        let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        f.sync_all().map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.sync_all().map_err(|e| Error::io(dir, e))
}

/// Keeps the newest `keep` checkpoints (at least one), deleting older ones: each is first
/// renamed to `checkpoint-N.del` so a crash mid-delete never leaves a half folder that looks
/// like a checkpoint. Returns the removed folders.
pub fn prune(exp_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(exp_dir)?;
    let keep = keep.max(1);
    let mut removed = Vec::new();
    if all.len() <= keep {
        return Ok(removed);
    }
    for (step, p) in &all[..all.len() - keep] {
        let del = exp_dir.join(format!("{PREFIX}{step}.del"));
        remove_any(&del)?;
        std::fs::rename(p, &del).map_err(|e| Error::io(p, e))?;
        remove_any(&del)?;
        removed.push(p.clone());
    }
    Ok(removed)
}

/// Moves every checkpoint of `exp_dir` that does not continue `from` (step `step`) into
/// `exp_dir/abandoned-{step}-{unix time}/`: those with a later step, and, when `from` lies
/// outside `exp_dir`, all of them. Returns the folder when anything moved.
pub fn set_aside_after(exp_dir: &Path, from: &Path, step: u64) -> Result<Option<PathBuf>> {
    let same = |p: &Path| match (p.canonicalize(), from.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let inside = list_checkpoints(exp_dir)?.iter().any(|(_, p)| same(p));
    let moving: Vec<(u64, PathBuf)> = list_checkpoints(exp_dir)?
        .into_iter()
        .filter(|(s, p)| !same(p) && (*s > step || !inside))
        .collect();
    if moving.is_empty() {
        return Ok(None);
    }
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut dest = exp_dir.join(format!("abandoned-{step}-{time}"));
    let mut k = 1;
    while dest.exists() {
        dest = exp_dir.join(format!("abandoned-{step}-{time}-{k}"));
        k += 1;
    }
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    for (_, p) in moving {
        let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let to = dest.join(name);
        std::fs::rename(&p, &to).map_err(|e| Error::io(&p, e))?;
    }
    sync_dir(&dest)?;
    sync_dir(exp_dir)?;
    Ok(Some(dest))
}

/// The file stem of a network's epoch saves (`denoising_unet-{step}.safetensors`).
pub fn epoch_stem(net: Net) -> &'static str {
    net.file_name().trim_end_matches(".safetensors")
}

/// Writes the four networks as `exp_dir/{stem}-{step}.safetensors` (atomically), then keeps
/// the newest `keep` of each stem, as train.py's `save_checkpoint(..., total_limit=3)`.
pub fn write_epoch_weights(
    exp_dir: &Path,
    model: &dyn TrainStep,
    step: u64,
    keep: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(exp_dir).map_err(|e| Error::io(exp_dir, e))?;
    let mut written = Vec::new();
    for net in Net::ALL {
        let w = model.weights(net)?;
        let host: HashMap<String, Tensor> = w
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let stem = epoch_stem(net);
        let p = exp_dir.join(format!("{stem}-{step}.safetensors"));
        let bytes = safetensors::serialize(host.iter().map(|(k, v)| (k.clone(), v)), None)
            .map_err(|e| Error::weights(&p, format!("cannot serialise: {e}")))?;
        crate::fsutil::write_atomic(&p, &bytes)?;
        written.push(p);
        let mut saved = epoch_saves(exp_dir, stem)?;
        while saved.len() > keep.max(1) {
            let (_, old) = saved.remove(0);
            remove_any(&old)?;
        }
    }
    Ok(written)
}

/// `exp_dir/{stem}-{step}.safetensors` files, oldest first.
pub fn epoch_saves(exp_dir: &Path, stem: &str) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match std::fs::read_dir(exp_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(exp_dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(exp_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".safetensors"))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok());
        if let Some(s) = step {
            out.push((s, e.path()));
        }
    }
    out.sort();
    Ok(out)
}
