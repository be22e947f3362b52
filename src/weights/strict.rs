//! A `VarBuilder` backend that behaves like PyTorch's strict `load_state_dict`: it remembers
//! every name a model asks for, so that keys the model never used can be reported afterwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// A requested tensor whose shape differs from the file's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Missing and unexpected keys, as `load_state_dict(strict=True)` would list them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<ShapeMismatch>,
    /// Hints about likely causes (a `module.` prefix left by DataParallel, ...).
    pub notes: Vec<String>,
}

impl KeyReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            let mut s = v.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 20 {
                s.push_str(&format!(", ... ({} in all)", v.len()));
            }
            s
        };
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing keys: {}", list(&self.missing)));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", list(&self.unexpected)));
        }
        for m in &self.mismatched {
            parts.push(format!(
                "shape mismatch for {}: model wants {:?}, file has {:?}",
                m.name, m.expected, m.found
            ));
        }
        parts.extend(self.notes.iter().cloned());
        if parts.is_empty() {
            parts.push("all keys matched".into());
        }
        write!(f, "{}", parts.join("; "))
    }
}

#[derive(Default)]
struct Record {
    requested: BTreeSet<String>,
    missing: BTreeSet<String>,
    mismatched: BTreeMap<String, ShapeMismatch>,
}

struct Inner {
    source: PathBuf,
    tensors: HashMap<String, Tensor>,
    collect: AtomicBool,
    record: Mutex<Record>,
}

/// Weights for one model, checked against what the model asks for.
///
/// By default a missing tensor or a shape mismatch fails the `VarBuilder` call at once, naming
/// the tensor and the file. With [`StrictWeights::collecting`], they are recorded instead (and
/// zeros of the requested shape handed out) so that one run lists every problem.
#[derive(Clone)]
pub struct StrictWeights {
    inner: Arc<Inner>,
    allowed_unused: Vec<String>,
    /// Unexpected keys are a warning ([`StrictWeights::warning`]), not an error.
    unexpected_warns: bool,
}

impl StrictWeights {
    /// `source` names where the tensors came from, for error messages.
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: source.into(),
                tensors,
                collect: AtomicBool::new(false),
                record: Mutex::new(Record::default()),
            }),
            allowed_unused: Vec::new(),
            unexpected_warns: false,
        }
    }

    /// The same file and settings over other tensors (e.g. the file's rounded to a precision).
    pub fn with_tensors(&self, tensors: HashMap<String, Tensor>) -> Self {
        let mut w = Self::new(tensors, self.inner.source.clone());
        w.allowed_unused = self.allowed_unused.clone();
        w.unexpected_warns = self.unexpected_warns;
        w
    }

    /// Loads a weight file with [`super::load`] (tensors stay on the CPU until requested).
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::new(super::load(path, &Device::Cpu)?, path))
    }

    /// Record missing tensors and shape mismatches instead of failing on the first one.
    pub fn collecting(self) -> Self {
        self.inner.collect.store(true, Ordering::Relaxed);
        self
    }

    /// Keys starting with one of these prefixes may stay unused (buffers the port recomputes,
    /// training-only heads) without counting as unexpected.
    pub fn allow_unused<S: Into<String>>(mut self, prefixes: impl IntoIterator<Item = S>) -> Self {
        self.allowed_unused
            .extend(prefixes.into_iter().map(Into::into));
        self
    }

    /// Keys the model never asks for do not fail [`StrictWeights::finish`]; they are counted
    /// in [`StrictWeights::warning`] instead. The reference loads `denoising_unet` with
    /// `strict=False`, so a file with extra entries (e.g. motion-module keys) is one it loads;
    /// a missing or mis-shaped tensor stays an error.
    pub fn unexpected_warns(mut self) -> Self {
        self.unexpected_warns = true;
        self
    }

    /// With [`StrictWeights::unexpected_warns`]: the line to print when the file holds keys
    /// the model did not use (their count and the first few).
    pub fn warning(&self) -> Option<String> {
        const SHOWN: usize = 5;
        let r = self.report();
        if !self.unexpected_warns || r.unexpected.is_empty() {
            return None;
        }
        let mut names = r.unexpected[..r.unexpected.len().min(SHOWN)].join(", ");
        if r.unexpected.len() > SHOWN {
            names.push_str(", ...");
        }
        Some(format!(
            "{}: {} unexpected key(s) ignored (the model does not use them): {names}",
            self.inner.source.display(),
            r.unexpected.len()
        ))
    }

    pub fn source(&self) -> &Path {
        &self.inner.source
    }

    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.inner.tensors
    }

    /// A `VarBuilder` over these weights; every tensor it hands out is converted to `dtype` and
    /// moved to `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(Backend(self.inner.clone()));
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Names the model asked for so far (found or not), sorted.
    pub fn requested(&self) -> Vec<String> {
        let rec = self.inner.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.requested.iter().cloned().collect()
    }

    /// What the model asked for so far compared with what the file holds.
    pub fn report(&self) -> KeyReport {
        let rec = self.inner.record.lock().unwrap_or_else(|e| e.into_inner());
        let mut unexpected: Vec<String> = self
            .inner
            .tensors
            .keys()
            .filter(|k| !rec.requested.contains(*k))
            .filter(|k| {
                !self
                    .allowed_unused
                    .iter()
                    .any(|p| k.starts_with(p.as_str()))
            })
            .cloned()
            .collect();
        unexpected.sort();
        let missing: Vec<String> = rec.missing.iter().cloned().collect();
        let mut notes = Vec::new();
        if let Some(hint) = rec
            .missing
            .iter()
            .next()
            .and_then(|m| prefix_hint(m, &self.inner.tensors))
        {
            notes.push(hint);
        }
        let prefixed = unexpected
            .iter()
            .filter(|k| k.starts_with("module."))
            .count();
        if prefixed > 0 {
            let would_match = unexpected
                .iter()
                .filter_map(|k| k.strip_prefix("module."))
                .filter(|k| rec.missing.contains(*k) || rec.requested.contains(*k))
                .count();
            notes.push(format!(
                "{prefixed} unexpected keys start with `module.` ({would_match} of them would match \
                 a requested name without it): a DataParallel checkpoint? strip the prefix explicitly"
            ));
        }
        KeyReport {
            missing,
            unexpected,
            mismatched: rec.mismatched.values().cloned().collect(),
            notes,
        }
    }

    /// The report, or an error naming the file and every problem when it is not clean.
    pub fn finish(&self) -> Result<KeyReport> {
        let r = self.report();
        let tolerated = self.unexpected_warns && r.missing.is_empty() && r.mismatched.is_empty();
        if r.is_clean() || tolerated {
            Ok(r)
        } else {
            Err(Error::weights(&self.inner.source, r.to_string()))
        }
    }
}

/// A likely cause when `name` is missing because every key of the file is off by one prefix:
/// the file adds one (`module.` from DataParallel / DDP, a wrapper's attribute name) or lacks
/// one the model asks for.
pub fn prefix_hint(name: &str, tensors: &HashMap<String, Tensor>) -> Option<String> {
    if tensors.is_empty() {
        return None;
    }
    // The file's keys carry an extra prefix: `PREFIX` + name is there.
    let extra = tensors.keys().find_map(|k| {
        let p = k.strip_suffix(name)?;
        (p.ends_with('.') && !p.is_empty()).then_some(p)
    });
    if let Some(p) = extra {
        if tensors.keys().all(|k| k.starts_with(p)) {
            return Some(format!(
                "every key in the file starts with `{p}` (`{p}{name}` is there): saved from a \
                 wrapped model (DataParallel adds `module.`)? strip that prefix from the keys"
            ));
        }
    }
    // The file's keys lack a prefix the model asks for.
    for (i, _) in name.match_indices('.') {
        let (p, rest) = (&name[..=i], &name[i + 1..]);
        if tensors.contains_key(rest) && !tensors.keys().any(|k| k.starts_with(p)) {
            return Some(format!(
                "no key in the file starts with `{p}` but `{rest}` is there: the file holds \
                 the network without the `{p}` prefix the model asks for"
            ));
        }
    }
    None
}

struct Backend(Arc<Inner>);

impl Backend {
    fn fail(&self, msg: String) -> candle_core::Error {
        candle_core::Error::wrap(Error::weights(&self.0.source, msg))
    }

    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .0
            .tensors
            .get(name)
            .ok_or_else(|| self.fail(format!("tensor `{name}` is missing from the file")))?;
        t.to_device(dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let inner = &self.0;
        let mut rec = inner.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.requested.insert(name.to_string());
        let Some(t) = inner.tensors.get(name) else {
            if inner.collect.load(Ordering::Relaxed) {
                rec.missing.insert(name.to_string());
                return Tensor::zeros(s, dtype, dev);
            }
            let hint = prefix_hint(name, &inner.tensors)
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            return Err(self.fail(format!(
                "tensor `{name}` (shape {:?}) is missing from the file{hint}",
                s.dims()
            )));
        };
        if t.dims() != s.dims() {
            if inner.collect.load(Ordering::Relaxed) {
                rec.mismatched.insert(
                    name.to_string(),
                    ShapeMismatch {
                        name: name.to_string(),
                        expected: s.dims().to_vec(),
                        found: t.dims().to_vec(),
                    },
                );
                return Tensor::zeros(s, dtype, dev);
            }
            return Err(self.fail(format!(
                "tensor `{name}`: the model wants shape {:?}, the file has {:?}",
                s.dims(),
                t.dims()
            )));
        }
        drop(rec);
        self.fetch(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        {
            let mut rec = self.0.record.lock().unwrap_or_else(|e| e.into_inner());
            rec.requested.insert(name.to_string());
            if !self.0.tensors.contains_key(name) && self.0.collect.load(Ordering::Relaxed) {
                rec.missing.insert(name.to_string());
            }
        }
        self.fetch(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}
