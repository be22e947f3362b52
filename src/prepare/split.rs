//! Split stage (SPEC §2): raw `MEN|WOMEN/<Category>/id_XXXXXXXX/NN_view.jpg` tree -> flat names
//! in `train/` and `test/`, following the standard split lists.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::report::{Failure, StageReport};
use crate::data::Part;
use crate::rank::Shard;
use crate::{Error, Result};

const TRAIN_LST: &str = include_str!("../../assets/deepfashion/train.lst");
const TEST_LST: &str = include_str!("../../assets/deepfashion/test.lst");
/// The 8,570 standard test pairs, written as `test.csv` when the dataset has none.
pub const TEST_CSV: &str = include_str!("../../assets/deepfashion/test.csv");

/// The split lists (flat names). Embedded copies of the standard lists by default, so that
/// `prepare` works without the shared data folder.
#[derive(Debug, Clone)]
pub struct SplitLists {
    pub train: Vec<String>,
    pub test: Vec<String>,
}

impl SplitLists {
    /// The standard DeepFashion lists (48,674 train, 4,038 test names).
    pub fn builtin() -> Self {
        Self {
            train: parse_list(TRAIN_LST),
            test: parse_list(TEST_LST),
        }
    }

    /// Lists read from two files of one flat name per line.
    pub fn from_files(train: &Path, test: &Path) -> Result<Self> {
        let read = |p: &Path| -> Result<Vec<String>> {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let names = parse_list(&text);
            if let Some(bad) = names.iter().find(|n| n.contains('/') || n.contains('\\')) {
                return Err(Error::input(
                    p,
                    format!("expected flat file names, one per line; found `{bad}`"),
                ));
            }
            Ok(names)
        };
        Ok(Self {
            train: read(train)?,
            test: read(test)?,
        })
    }

    pub fn get(&self, part: Part) -> &[String] {
        match part {
            Part::Train => &self.train,
            Part::Test => &self.test,
        }
    }
}

fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Flat name of a raw image given its path relative to the raw root
/// (`MEN/Shirts_Polos/id_00001802/02_4_full.jpg` -> `fashionMENShirts_Polosid0000180202_4full.jpg`):
/// the category is kept as is, the id loses every `_`, the file name keeps only its first `_`.
pub fn flat_name(rel: &Path) -> Option<String> {
    let parts: Vec<&str> = rel
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<Vec<_>>>()?;
    let [gender, category, id, file] = parts.as_slice() else {
        return None;
    };
    if !matches!(*gender, "MEN" | "WOMEN") || category.is_empty() || !id.starts_with("id_") {
        return None;
    }
    let id: String = id.chars().filter(|&c| c != '_').collect();
    let file = match file.split_once('_') {
        Some((head, tail)) => format!("{head}_{}", tail.replace('_', "")),
        None => (*file).to_owned(),
    };
    Some(format!("fashion{gender}{category}{id}{file}"))
}

/// What a walk of the raw tree found.
#[derive(Debug, Clone, Default)]
pub struct RawTree {
    /// (flat name, path), sorted by name.
    pub images: Vec<(String, PathBuf)>,
    /// `.jpg` files that do not fit the layout, kept so they can be reported.
    pub odd: Vec<PathBuf>,
}

/// Every `.jpg` under `root/{MEN,WOMEN}/*/id_*/`.
pub fn walk_raw(root: &Path) -> Result<RawTree> {
    let mut found = Vec::new();
    let mut odd = Vec::new();
    for gender in ["MEN", "WOMEN"] {
        let top = root.join(gender);
        if !top.is_dir() {
            continue;
        }
        for entry in walkdir::WalkDir::new(&top).min_depth(1).max_depth(3) {
            let entry = entry.map_err(|e| {
                let p = e.path().unwrap_or(&top).to_path_buf();
                Error::input(p, format!("cannot walk the raw tree: {e}"))
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path();
            let is_jpg = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg"));
            if !is_jpg {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(path);
            match flat_name(rel) {
                Some(name) => found.push((name, path.to_path_buf())),
                None => odd.push(path.to_path_buf()),
            }
        }
    }
    found.sort();
    Ok(RawTree { images: found, odd })
}

/// How one image reached its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Linked,
    Copied,
}

/// Puts `src` at `dst` by hard link (no extra disk space), else by copy; through a temp name
/// and a rename so that `dst` is either absent or complete.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<Placed> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let how = if std::fs::hard_link(src, &tmp).is_ok() {
        Placed::Linked
    } else {
        std::fs::copy(src, &tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(src, e)
        })?;
        Placed::Copied
    };
    std::fs::rename(&tmp, dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(dst, e)
    })?;
    Ok(how)
}

/// Fully decodes a JPEG so that a corrupt or truncated photo never enters the dataset.
pub fn check_jpeg(path: &Path) -> Result<(u32, u32)> {
    // The same decoder the later stages use, so what passes here is what they can read.
    let img = crate::imageops::open_image(path).map_err(|e| match e {
        Error::Input { path, msg } => Error::input(path, format!("not a readable JPEG: {msg}")),
        e => e,
    })?;
    Ok((img.width(), img.height()))
}

/// Split stage: places every listed image of the shard found in the raw tree into `train/` or
/// `test/`. Images already in place are skipped, so a second run does nothing.
pub fn run_split(
    root: &Path,
    lists: &SplitLists,
    verify: bool,
    shard: &Shard,
    bar: &indicatif::ProgressBar,
) -> Result<StageReport> {
    let mut rep = StageReport::new("split");
    let RawTree { images: raw, odd } = walk_raw(root)?;
    for p in odd {
        rep.notes.push(format!(
            "ignored (not MEN|WOMEN/<Category>/id_*/<file>.jpg): {}",
            p.display()
        ));
    }
    let mut by_name: HashMap<&str, &Path> = HashMap::with_capacity(raw.len());
    for (name, path) in &raw {
        if let Some(prev) = by_name.insert(name.as_str(), path.as_path()) {
            return Err(Error::input(
                path,
                format!("same flat name `{name}` as {}", prev.display()),
            ));
        }
    }

    let mut listed: HashSet<&str> = HashSet::new();
    let mut jobs: Vec<(&Path, PathBuf)> = Vec::new();
    let mut missing = Vec::new();
    for part in Part::ALL {
        let dir = root.join(part.dir());
        for name in lists.get(part) {
            listed.insert(name.as_str());
            if !shard.owns_name(name) {
                continue;
            }
            let dst = dir.join(name);
            if dst.is_file() {
                rep.skipped += 1;
            } else if let Some(src) = by_name.get(name.as_str()) {
                jobs.push((src, dst));
            } else {
                missing.push(name.clone());
            }
        }
    }
    let unlisted = raw
        .iter()
        .filter(|(n, _)| !listed.contains(n.as_str()) && shard.owns_name(n))
        .count();
    if unlisted > 0 {
        rep.notes.push(format!(
            "{unlisted} raw images are in neither list (left out)"
        ));
    }
    if !missing.is_empty() {
        rep.notes.push(format!(
            "{} listed names not found in the raw tree nor in train/ or test/",
            missing.len()
        ));
    }
    if raw.is_empty() && rep.skipped == 0 {
        return Err(Error::input(
            root,
            format!(
                "no raw images under MEN/ or WOMEN/ and no split images in train/ or test/ \
                 ({} listed names)",
                missing.len()
            ),
        ));
    }
    rep.missing = missing;

    bar.set_length(jobs.len() as u64);
    let results: Vec<(PathBuf, Result<Placed>)> = jobs
        .par_iter()
        .map(|(src, dst)| {
            let r = (|| {
                if verify {
                    check_jpeg(src)?;
                }
                link_or_copy(src, dst)
            })();
            bar.inc(1);
            (src.to_path_buf(), r)
        })
        .collect();
    let (mut linked, mut copied) = (0usize, 0usize);
    for (src, r) in results {
        match r {
            Ok(Placed::Linked) => linked += 1,
            Ok(Placed::Copied) => copied += 1,
            Err(e) => rep.failed.push(Failure::new(src, e.to_string())),
        }
    }
    rep.done = linked + copied;
    if rep.done > 0 {
        rep.notes
            .push(format!("{linked} hard-linked, {copied} copied"));
    }
    Ok(rep)
}
