//! A person as MCLD's networks see them (SPEC §2): the photo, its UV texture map (DensePose IUV
//! -> 24-tile atlas -> Telea inpainting -> 512x512 map) and its face embedding (SCRFD +
//! ArcFace). The one way from a photo to those inputs, below everything that needs it:
//! `prepare`'s dataset stages, `infer`, `edit`, the demos and the benches.

pub mod preprocess;
pub mod telea;
pub mod texture;

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;

use crate::data::{read_face_embedding, read_rgb};
use crate::models::densepose::DensePose;
use crate::{Error, Result};
pub use preprocess::{ComputedTexture, FaceOutcome};
use texture::TextureAssets;

/// The models that turn photos into a person's inputs, each loaded on first use: a run handed
/// precomputed files never loads them, and one DensePose serves the source and every donor.
pub struct Preprocessor {
    pretrained: PathBuf,
    device: Device,
    densepose: OnceCell<DensePose>,
    assets: OnceCell<TextureAssets>,
}

impl Preprocessor {
    /// Models are looked up in `pretrained` (DensePose's `.pkl`, `antelopev2/`).
    pub fn new(pretrained: &Path, device: &Device) -> Self {
        Self {
            pretrained: pretrained.to_path_buf(),
            device: device.clone(),
            densepose: OnceCell::new(),
            assets: OnceCell::new(),
        }
    }

    pub fn pretrained_dir(&self) -> &Path {
        &self.pretrained
    }

    /// DensePose, loaded now if it is not yet; a load error goes through `explain`, which says
    /// what needed the model and how to do without it.
    pub fn densepose(&self, explain: impl FnOnce(Error) -> Error) -> Result<&DensePose> {
        if let Some(dp) = self.densepose.get() {
            return Ok(dp);
        }
        let dp = preprocess::load_densepose(&self.pretrained, &self.device).map_err(explain)?;
        Ok(self.densepose.get_or_init(|| dp))
    }

    /// The texture step's template masks and lookup table (built into the binary).
    pub fn texture_assets(&self) -> Result<&TextureAssets> {
        if let Some(a) = self.assets.get() {
            return Ok(a);
        }
        let a = TextureAssets::builtin()?;
        Ok(self.assets.get_or_init(|| a))
    }

    /// IUV of the highest-scoring person in `photo`, `None` when DensePose finds nobody.
    pub fn iuv(
        &self,
        photo: &RgbImage,
        explain: impl FnOnce(Error) -> Error,
    ) -> Result<Option<RgbImage>> {
        preprocess::source_iuv(self.densepose(explain)?, photo)
    }

    /// The face embedding of the largest face in `photo` (antelopev2), or why there is none.
    pub fn face(&self, photo: &RgbImage) -> Result<FaceOutcome> {
        preprocess::face_of_photo(&self.pretrained, photo)
    }

    /// Drops DensePose, so its memory goes back before the diffusion networks load.
    pub fn release(&mut self) {
        self.densepose.take();
    }
}

/// Where a person's face embedding comes from.
#[derive(Debug, Clone)]
pub enum FaceSource {
    /// A precomputed (512,) `.npy`.
    File(PathBuf),
    /// Computed from the photo; zeros (saying why) when there is no face or no face model.
    Compute,
    /// Not needed (another identity replaces it): zeros, not counted as missing.
    Replaced,
}

/// Where the texture map computed from a photo and the photo's IUV are written, so users can
/// look at them and pass them back as files.
#[derive(Debug, Clone)]
pub struct TextureOutputs {
    pub texture: PathBuf,
    pub iuv: PathBuf,
}

/// How to get a person's inputs from a photo: files given by the user stand in for the models.
#[derive(Debug, Clone)]
pub struct PersonRequest {
    pub photo: PathBuf,
    /// A precomputed texture map; computed from the photo (and written to `save`) when absent.
    pub texture: Option<PathBuf>,
    pub face: FaceSource,
    pub save: TextureOutputs,
}

/// The source side of a pair: photo, texture map, face embedding.
#[derive(Debug, Clone)]
pub struct PersonInputs {
    pub photo: RgbImage,
    pub texture: RgbImage,
    pub face: Vec<f32>,
    /// True when zeros stand in for a face that could not be found or computed.
    pub face_missing: bool,
}

impl PersonInputs {
    /// Every input from files (`face` absent: zeros, as the reference does for faceless photos).
    pub fn from_files(photo: &Path, texture: &Path, face: Option<&Path>) -> Result<Self> {
        let (face, face_missing) = match face {
            Some(p) => (read_face_embedding(p)?, false),
            None => (vec![0f32; 512], true),
        };
        Ok(Self {
            photo: read_rgb(photo)?,
            texture: read_rgb(texture)?,
            face,
            face_missing,
        })
    }

    /// The inputs of the person in `req.photo`, computing what was not given with `pre`'s
    /// models and saying what was computed.
    pub fn from_photo(req: &PersonRequest, pre: &Preprocessor) -> Result<Self> {
        Self::with_photo(req, read_rgb(&req.photo)?, pre)
    }

    /// [`Self::from_photo`] for a photo already read (callers read every input file before
    /// any model runs, so a missing file fails fast).
    pub fn with_photo(req: &PersonRequest, photo: RgbImage, pre: &Preprocessor) -> Result<Self> {
        let texture = match &req.texture {
            Some(p) => read_rgb(p)?,
            None => computed_texture(pre, &req.photo, &photo, &req.save)?,
        };
        let (face, face_missing) = match &req.face {
            FaceSource::File(p) => (read_face_embedding(p)?, false),
            FaceSource::Replaced => (vec![0f32; 512], false),
            FaceSource::Compute => computed_face(pre, &req.photo, &photo)?,
        };
        Ok(Self {
            photo,
            texture,
            face,
            face_missing,
        })
    }
}

/// Texture map of the photo through DensePose, written where the user can look at it.
fn computed_texture(
    pre: &Preprocessor,
    path: &Path,
    photo: &RgbImage,
    save: &TextureOutputs,
) -> Result<RgbImage> {
    let dp = pre.densepose(|e| {
        Error::msg(format!(
            "no --texture given for {}, so its texture map must be computed, which needs \
             DensePose: {e}\n(alternatively pass --texture TEXTURE.png, e.g. one made by \
             `mcld prepare --only densepose,texture`)",
            path.display()
        ))
    })?;
    let t = std::time::Instant::now();
    let c = preprocess::texture_of_photo(dp, photo, path)?;
    crate::fsutil::save_image_atomic(
        &image::DynamicImage::ImageRgb8(c.texture.clone()),
        &save.texture,
    )?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(c.iuv), &save.iuv)?;
    eprintln!(
        "computed the texture map with DensePose in {:.1}s: {} (source IUV: {})",
        t.elapsed().as_secs_f64(),
        save.texture.display(),
        save.iuv.display()
    );
    Ok(c.texture)
}

/// The face embedding computed from the photo, else zeros saying why. Returns the embedding
/// and whether zeros stand in.
fn computed_face(pre: &Preprocessor, path: &Path, photo: &RgbImage) -> Result<(Vec<f32>, bool)> {
    Ok(match pre.face(photo)? {
        FaceOutcome::Found(v) => {
            eprintln!("computed the source's face embedding (antelopev2)");
            (v, false)
        }
        FaceOutcome::NoFace => {
            eprintln!(
                "no face found in {}: using a zero face embedding, as the reference does",
                path.display()
            );
            (vec![0f32; 512], true)
        }
        FaceOutcome::ModelsMissing(msg) => {
            eprintln!("{msg}\nusing a zero face embedding (as for photos without a face)");
            (vec![0f32; 512], true)
        }
    })
}
