//! The models behind `person`: DensePose R-CNN found in the pretrained folder (with its config)
//! for the photo's IUV and texture map, and antelopev2 (SCRFD + ArcFace) for its face embedding,
//! exactly as `mcld prepare` makes them for the dataset (SPEC §2).

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;

use crate::models::densepose::iuv::Image3;
use crate::models::densepose::{Config as DensePoseConfig, DensePose};
use crate::models::face::{self, FaceEmbedder};
use crate::person::texture::{self, TextureAssets};
use crate::{Error, Result};

pub use crate::models::densepose::{
    load_config, WEIGHTS_FILE as DENSEPOSE_WEIGHTS, WEIGHTS_URL as DENSEPOSE_URL,
};
/// The detectron2 config of those weights, as shipped in `configs/densepose/`.
pub const DENSEPOSE_YAML: &str = "densepose_rcnn_R_101_FPN_DL_s1x.yaml";
/// A fully merged config dumped as JSON (the fixtures' form; `{"config": {...}}` or bare).
pub const DENSEPOSE_JSON: &str = "densepose_rcnn.json";

fn first_file(cands: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    cands.into_iter().find(|p| p.is_file())
}

/// Where the DensePose config is taken from: a JSON or YAML in the pretrained folder (so a
/// folder can carry its own variant), else the prepare stage's default (`configs/densepose/`,
/// or the copy built into the binary).
fn densepose_config(pretrained: &Path) -> Result<DensePoseConfig> {
    if let Some(p) = first_file([
        pretrained.join(DENSEPOSE_JSON),
        pretrained.join("densepose").join(DENSEPOSE_JSON),
    ]) {
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&p, e.to_string()))?;
        let v = v.get("config").cloned().unwrap_or(v);
        return DensePoseConfig::from_json_value(&v).map_err(|e| Error::config(&p, e.to_string()));
    }
    if let Some(p) = first_file([pretrained.join(DENSEPOSE_YAML)]) {
        return DensePoseConfig::from_yaml_file(&p);
    }
    Ok(load_config(None)?.0)
}

/// Loads DensePose R-CNN from `PRETRAINED/model_final_844d15.pkl` (or `PRETRAINED/densepose/`)
/// with its config; a missing file is an error saying where to get it.
pub fn load_densepose(pretrained: &Path, device: &Device) -> Result<DensePose> {
    let weights = first_file([
        pretrained.join(DENSEPOSE_WEIGHTS),
        pretrained.join("densepose").join(DENSEPOSE_WEIGHTS),
    ])
    .ok_or_else(|| {
        Error::msg(format!(
            "DensePose weights not found: expected {} (`mcld download --only densepose` \
             fetches {DENSEPOSE_URL}), or pass --pretrained_dir with the folder holding them",
            pretrained.join(DENSEPOSE_WEIGHTS).display()
        ))
    })?;
    let cfg = densepose_config(pretrained)?;
    crate::models::densepose::load_weights(&weights, &cfg, device)
}

/// IUV image of the highest-scoring person as MCLD stores it (R = V, G = U, B = I), or `None`
/// when DensePose finds nobody.
pub fn source_iuv(dp: &DensePose, photo: &RgbImage) -> Result<Option<RgbImage>> {
    let (w, h) = (photo.width() as usize, photo.height() as usize);
    let mut bgr = photo.as_raw().clone();
    for px in bgr.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    let Some(iuv) = dp.iuv(&Image3::new(h, w, bgr)?)? else {
        return Ok(None);
    };
    // [I, U, V] -> the on-disk channel order.
    let mut rgb = iuv;
    for px in rgb.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    Ok(RgbImage::from_raw(w as u32, h as u32, rgb))
}

/// The source photo's texture map (DensePose then the UV atlas); `None` when no person is found.
pub struct ComputedTexture {
    pub iuv: RgbImage,
    pub texture: RgbImage,
}

pub fn texture_of_photo(
    dp: &DensePose,
    photo: &RgbImage,
    source: &Path,
) -> Result<ComputedTexture> {
    let iuv = source_iuv(dp, photo)?.ok_or_else(|| {
        Error::input(
            source,
            "DensePose found no person in the photo, so there is no texture map to build; \
             pass --texture TEXTURE.png",
        )
    })?;
    let assets = TextureAssets::builtin()?;
    let texture = texture::texture_map(photo, &iuv, &assets)
        .map_err(|e| Error::input(source, format!("texture map: {e}")))?;
    Ok(ComputedTexture { iuv, texture })
}

/// How the face embedding of the source came about.
pub enum FaceOutcome {
    Found(Vec<f32>),
    /// The models ran and saw no face: zeros, as the reference does.
    NoFace,
    /// The face models are not installed; the message says which file and where to get it.
    ModelsMissing(String),
}

/// Face embedding of the largest face in `photo`, with antelopev2 from `pretrained`.
pub fn face_of_photo(pretrained: &Path, photo: &RgbImage) -> Result<FaceOutcome> {
    match load_face_models(pretrained)? {
        Ok(emb) => face_with(&emb, photo),
        Err(msg) => Ok(FaceOutcome::ModelsMissing(msg)),
    }
}

/// [`face_of_photo`] with models already loaded (`mcld serve` keeps them).
pub fn face_with(emb: &FaceEmbedder, photo: &RgbImage) -> Result<FaceOutcome> {
    Ok(match emb.embed_largest(photo)? {
        Some(v) => FaceOutcome::Found(v),
        None => FaceOutcome::NoFace,
    })
}

/// antelopev2's detector and recogniser from `pretrained`; `Ok(Err(message))` when they are
/// not installed (the message names the files and how to get them).
pub fn load_face_models(pretrained: &Path) -> Result<std::result::Result<FaceEmbedder, String>> {
    let det = face::find_model(pretrained, face::DETECTOR_ONNX);
    let rec = face::find_model(pretrained, face::RECOGNISER_ONNX);
    let (Some(det), Some(rec)) = (det, rec) else {
        let missing: Vec<String> = [face::DETECTOR_ONNX, face::RECOGNISER_ONNX]
            .iter()
            .filter(|n| face::find_model(pretrained, n).is_none())
            .map(|n| pretrained.join("antelopev2").join(n).display().to_string())
            .collect();
        return Ok(Err(format!(
            "face models not found: {} (InsightFace's antelopev2 pack; `mcld download --only \
             antelopev2` fetches it); pass --face EMB.npy for a precomputed embedding",
            missing.join(", ")
        )));
    };
    Ok(Ok(FaceEmbedder::load(&det, &rec)?))
}
