//! Weight loading (SPEC §8): safetensors by mmap, diffusers/transformers model folders, PyTorch
//! checkpoints (zip and legacy) and detectron2 pickles. Pickles are untrusted and go through a
//! restricted reader that only rebuilds tensors; any other callable is refused by name.

pub mod bf16;
pub mod files;
pub mod pickle;
pub mod prefixed;
pub mod random;
pub mod strict;
pub mod torch;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use prefixed::prefixed_var_builder;
pub use strict::{KeyReport, ShapeMismatch, StrictWeights};
pub use torch::Loaded;

use crate::error::{Error, Result};

/// The container a weight file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    TorchZip,
    TorchLegacy,
    Pickle,
}

/// Tells the format from the first bytes, never from the extension (`.bin` is both torch
/// layouts, `.pth` too).
pub fn detect(path: &Path) -> Result<Format> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Format::TorchZip);
    }
    if torch::is_legacy(head) {
        return Ok(Format::TorchLegacy);
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(Format::Pickle);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    Err(Error::weights(
        path,
        "unrecognised weight file (expected safetensors, a PyTorch zip or legacy checkpoint, \
         or a protocol 2-5 pickle)",
    ))
}

/// Every tensor of a weight file, by name. Checkpoints nesting their tensors under one key
/// (`state_dict`, `model`, ...) are unwrapped; names are kept exactly as stored.
pub fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(load_full(path, device)?.tensors)
}

/// Like [`load`], also saying where the tensors were nested and which entries were skipped.
pub fn load_full(path: &Path, device: &Device) -> Result<Loaded> {
    match detect(path)? {
        Format::Safetensors => load_safetensors(path, device).map(|tensors| Loaded {
            tensors,
            ..Loaded::default()
        }),
        Format::TorchZip => torch::read_zip(path, device),
        Format::TorchLegacy => torch::read_legacy(path, &read_all(path)?, device),
        Format::Pickle => torch::read_plain_pickle(path, &read_all(path)?, device),
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let werr = |e: candle_core::Error| Error::weights(path, e.to_string());
    // SAFETY: the mapping lives only during this call and every tensor is copied out of it;
    // a file truncated by another process meanwhile is the one hazard mmap always carries.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(werr)?;
    let mut out = HashMap::new();
    for (name, _) in st.tensors() {
        let t = st
            .load(&name, device)
            .map_err(|e| Error::weights(path, format!("tensor {name}: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// A diffusers/transformers model folder: `config.json` and one weight file (or a sharded set).
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// Single-file weight names, best first: safetensors over pickled `.bin`.
const WEIGHT_FILES: [&str; 4] = [
    files::DIFFUSERS_WEIGHTS[0],
    files::TRANSFORMERS_WEIGHTS[0],
    files::DIFFUSERS_WEIGHTS[1],
    files::TRANSFORMERS_WEIGHTS[1],
];

const SHARD_INDEXES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
];

impl ModelDir {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::weights(&dir, "model folder does not exist"));
        }
        let config = dir.join(files::CONFIG);
        if !config.is_file() {
            return Err(Error::weights(&dir, "model folder has no config.json"));
        }
        if let Some(f) = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        {
            return Ok(Self {
                dir,
                config,
                weights: vec![f],
            });
        }
        if let Some(idx) = SHARD_INDEXES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        {
            let weights = shards(&idx, &dir)?;
            return Ok(Self {
                dir,
                config,
                weights,
            });
        }
        Err(Error::weights(
            &dir,
            format!(
                "no weight file found; looked for {} and the sharded indexes {}",
                WEIGHT_FILES.join(", "),
                SHARD_INDEXES.join(", ")
            ),
        ))
    }

    /// Parses `config.json` into a model's `Config` (unknown keys are the struct's business).
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let text = std::fs::read_to_string(&self.config).map_err(|e| Error::io(&self.config, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| Error::config(&self.config, e.to_string()))
    }

    /// All tensors of all weight files.
    pub fn load(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for w in &self.weights {
            for (k, t) in load(w, device)? {
                if out.insert(k.clone(), t).is_some() {
                    return Err(Error::weights(
                        w,
                        format!("tensor {k} appears in two shards"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The folder's tensors behind a strict, key-recording `VarBuilder` source.
    pub fn strict(&self) -> Result<StrictWeights> {
        let source = match self.weights.as_slice() {
            [one] => one.clone(),
            _ => self.dir.clone(),
        };
        Ok(StrictWeights::new(self.load(&Device::Cpu)?, source))
    }
}

fn shards(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::weights(index, e.to_string()))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::weights(index, "no weight_map object"));
    };
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let Some(f) = f.as_str() else {
            return Err(Error::weights(index, "weight_map value is not a file name"));
        };
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::weights(
                index,
                format!("shard name {f:?} leaves the folder"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(p) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::weights(
            index,
            format!("shard {} is missing", p.display()),
        ));
    }
    Ok(paths)
}

/// A `VarBuilder` over memory-mapped safetensors files, and the files' names for messages;
/// a missing file is an error naming it.
pub fn mmap_safetensors(
    files: &[&Path],
    dtype: candle_core::DType,
    device: &Device,
) -> Result<(candle_nn::VarBuilder<'static>, String)> {
    let shown = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for f in files {
        if !f.exists() {
            return Err(Error::weights(f, "file not found"));
        }
    }
    // SAFETY: the files are mapped read-only and not modified while the model lives.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|e| Error::weights(&shown, e.to_string()))?;
    Ok((vb, shown))
}
