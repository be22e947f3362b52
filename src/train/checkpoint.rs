//! Checkpoint folders of `mcld train`: `{exp_dir}/checkpoint-{step}/` holds the four networks
//! under the released file names (so `mcld test --ckpt_dir` takes the folder as it is), the
//! step's own state (`train_state/`: weights, AdamW moments, loss scale) and `state.json` (where
//! the loop stands: step, data positions, seed).
//!
//! A folder exists complete or not at all: it is built as `checkpoint-{step}.tmp`, every file
//! and folder synced, then renamed; old folders are renamed away before they are deleted. Only
//! names `checkpoint-<digits>` holding `state.json` count as checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::api::{Net, TrainStep};
use crate::data::train_set::DataPos;
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
