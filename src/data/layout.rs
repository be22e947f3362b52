//! The dataset layout `prepare` writes and everything else reads (SPEC §2): `ROOT/{train,test}/NAME.jpg`
//! and, per photo, `ROOT/{part}_densepose/STEM.png`, `{part}_texture/STEM.png`,
//! `{part}_face/STEM.npy`.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::{Error, Result};

/// Which half of the dataset an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Train,
    Test,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Train, Part::Test];

    /// Folder name under the dataset root, also the prefix of `*_densepose` etc.
    pub fn dir(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Test => "test",
        }
    }
}

/// A file name without its extension (`NAME.jpg` -> `NAME`).
pub fn stem(name: &str) -> &str {
    Path::new(name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name)
}

/// Where one split's files live.
#[derive(Debug, Clone)]
pub struct DatasetLayout {
    pub root: PathBuf,
    /// `train` or `test`.
    pub split: String,
}

impl DatasetLayout {
    pub fn new(root: impl Into<PathBuf>, split: &str) -> Self {
        Self {
            root: root.into(),
            split: split.to_string(),
        }
    }
    pub fn photo(&self, name: &str) -> PathBuf {
        self.root.join(&self.split).join(name)
    }
    /// `root/{split}_{kind}/{stem}.{ext}`: where a photo's IUV, texture or face file lives.
    pub fn derived(&self, kind: &str, name: &str, ext: &str) -> PathBuf {
        self.root
            .join(format!("{}_{kind}", self.split))
            .join(format!("{}.{ext}", stem(name)))
    }
    pub fn pose(&self, name: &str) -> PathBuf {
        self.derived("densepose", name, "png")
    }
    pub fn texture(&self, name: &str) -> PathBuf {
        self.derived("texture", name, "png")
    }
    pub fn face(&self, name: &str) -> PathBuf {
        self.derived("face", name, "npy")
    }
}

/// Flat names of the photos in `root/part/`, sorted; none when the folder is absent.
pub fn list_photos(root: &Path, part: Part) -> Result<Vec<String>> {
    let dir = root.join(part.dir());
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".jpg") && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `root/{part}_{kind}/{stem}.{ext}`: where a photo's IUV, texture or face file lives.
pub fn derived_path(root: &Path, part: Part, kind: &str, photo: &str, ext: &str) -> PathBuf {
    DatasetLayout::new(root, part.dir()).derived(kind, photo, ext)
}

/// Decodes an image file as RGB, naming the file on failure.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    if !path.exists() {
        return Err(Error::input(path, "file not found"));
    }
    crate::imageops::open_rgb(path)
}

/// A face embedding `.npy`: 512 values, float32 or float64, shape (512,) or (1, 512).
pub fn read_face_embedding(path: &Path) -> Result<Vec<f32>> {
    let (shape, data) = super::npy::read_f32(path)?;
    face_embedding(shape, data, path)
}

/// [`read_face_embedding`] of an uploaded `.npy`; `name` only labels the errors.
pub fn parse_face_embedding(bytes: &[u8], name: &Path) -> Result<Vec<f32>> {
    let (shape, data) = super::npy::parse_f32_named(bytes, name)?;
    face_embedding(shape, data, name)
}

fn face_embedding(shape: Vec<usize>, data: Vec<f32>, path: &Path) -> Result<Vec<f32>> {
    if data.len() != 512 {
        return Err(Error::input(
            path,
            format!("expected a 512-d face embedding, got shape {shape:?}"),
        ));
    }
    Ok(data)
}
