//! Face similarity of `evaluate` (SPEC §6) as MCLD's `evaluate.py` computes it with InsightFace's
//! `buffalo_s` pack: SCRFD-500M finds faces (det_size 512x352 as the reference sets it, unless
//! the ONNX file fixes its own input size, which InsightFace then keeps), the largest face by box
//! area is aligned to ArcFace's 112x112 template and embedded by MobileFaceNet; a pair scores the
//! cosine similarity and the Euclidean distance of the RAW embeddings (InsightFace's
//! `face.embedding`, not `normed_embedding`), and pairs where either side has no face are left
//! out of the means.
//!
//! The detector, alignment and recogniser pieces are those of `crate::models::face`.

use std::path::{Path, PathBuf};

use image::RgbImage;
use tract_onnx::pb;
use tract_onnx::prelude::*;

pub use crate::models::face::plan_for_input;
use crate::models::face::{
    decode_scrfd, norm_crop, resize, to_tensor, ArcFace, ArcFaceConfig, Detection, Plan,
    ScrfdConfig,
};
use crate::{Error, Result};

/// Folder of the pack under `pretrained_weights/` and its two files used here.
pub const BUFFALO_DIR: &str = "buffalo_s";
pub const DETECTOR_ONNX: &str = "det_500m.onnx";
pub const RECOGNISER_ONNX: &str = "w600k_mbf.onnx";

/// Settings of the reference's `FaceAnalysis(name='buffalo_s').prepare(det_size=(512, 352))`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceConfig {
    /// Detector input (width, height) for a model whose input size is not fixed.
    pub det_size: (usize, usize),
    /// Score threshold, NMS threshold, strides, anchors, input scaling of SCRFD.
    pub scrfd: ScrfdConfig,
}

impl Default for FaceConfig {
    fn default() -> Self {
        Self {
            det_size: (512, 352),
            scrfd: ScrfdConfig::default(),
        }
    }
}

/// `DIR/buffalo_s/{det_500m,w600k_mbf}.onnx` when both exist.
pub fn find_models(pretrained: &Path) -> Option<(PathBuf, PathBuf)> {
    let dir = pretrained.join(BUFFALO_DIR);
    let det = dir.join(DETECTOR_ONNX);
    let rec = dir.join(RECOGNISER_ONNX);
    (det.is_file() && rec.is_file()).then_some((det, rec))
}

fn read_proto(path: &Path) -> Result<pb::ModelProto> {
    tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| Error::weights(path, format!("cannot read ONNX: {e:#}")))
}

/// Fixed (height, width) of the first graph input, if the file states both.
fn fixed_input_hw(proto: &pb::ModelProto) -> Option<(usize, usize)> {
    let graph = proto.graph.as_ref()?;
    let inits: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = graph
        .input
        .iter()
        .find(|i| !inits.contains(&i.name.as_str()))?;
    let Some(pb::type_proto::Value::TensorType(t)) = input.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims: Vec<Option<usize>> = t
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                Some(v as usize)
            }
            _ => None,
        })
        .collect();
    match dims.as_slice() {
        [_, _, Some(h), Some(w)] => Some((*h, *w)),
        _ => None,
    }
}

/// InsightFace's rule for ArcFace input scaling: a graph that starts with its own Sub and Mul
/// nodes (among the first 8) takes raw pixels, otherwise `(x - 127.5) / 127.5`.
fn arcface_scaling(proto: &pb::ModelProto) -> (f32, f32) {
    let nodes = proto
        .graph
        .as_ref()
        .map(|g| &g.node[..g.node.len().min(8)])
        .unwrap_or(&[]);
    let has = |pfx: &[&str]| {
        nodes
            .iter()
            .any(|n| pfx.iter().any(|p| n.name.starts_with(p)))
    };
    if has(&["Sub", "_minus"]) && has(&["Mul", "_mul"]) {
        (0.0, 1.0)
    } else {
        (127.5, 127.5)
    }
}

/// Detector + recogniser of the buffalo_s pack.
pub struct FaceModels {
    det: Plan,
    det_path: PathBuf,
    /// Detector input (height, width).
    det_hw: (usize, usize),
    cfg: ScrfdConfig,
    rec: ArcFace,
}

impl FaceModels {
    pub fn load(det: &Path, rec: &Path, cfg: &FaceConfig) -> Result<Self> {
        let det_proto = read_proto(det)?;
        let det_hw = fixed_input_hw(&det_proto).unwrap_or((cfg.det_size.1, cfg.det_size.0));
        if det_hw.0 == 0 || det_hw.1 == 0 {
            return Err(Error::msg("face detector: empty det_size"));
        }
        let (input_mean, input_std) = arcface_scaling(&read_proto(rec)?);
        let rec = ArcFace::load(
            rec,
            &ArcFaceConfig {
                input_mean,
                input_std,
                ..ArcFaceConfig::default()
            },
        )?;
        Ok(Self {
            det: plan_for_input(det, det_proto, [1, 3, det_hw.0, det_hw.1])?,
            det_path: det.to_path_buf(),
            det_hw,
            cfg: cfg.scrfd.clone(),
            rec,
        })
    }

    /// Detector input (height, width) in use.
    pub fn det_hw(&self) -> (usize, usize) {
        self.det_hw
    }

    /// Faces in `img`, best score first, after NMS: InsightFace's SCRFD.detect on a
    /// (possibly non-square) canvas, the photo scaled to fit and placed top-left.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Detection>> {
        let cfg = &self.cfg;
        let (ih, iw) = self.det_hw;
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::msg("empty image"));
        }
        // Python float arithmetic of the reference, then int() truncation.
        let im_ratio = h as f64 / w as f64;
        let model_ratio = ih as f64 / iw as f64;
        let (nw, nh) = if im_ratio > model_ratio {
            (((ih as f64 / im_ratio) as u32).max(1), ih as u32)
        } else {
            (iw as u32, ((iw as f64 * im_ratio) as u32).max(1))
        };
        let det_scale = (nh as f64 / h as f64) as f32;
        let small = resize(img, nw, nh, cfg.resize);
        let mut canvas = RgbImage::new(iw as u32, ih as u32);
        image::imageops::replace(&mut canvas, &small, 0, 0);
        let input = to_tensor(&canvas, cfg.input_mean, cfg.input_std)?;
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Error::weights(&self.det_path, format!("{what}: {e:#}"))
        };
        let outs = self
            .det
            .run(tvec!(input.into()))
            .map_err(|e| err("SCRFD run", &e))?;
        decode_scrfd(&self.det_path, &outs, (ih, iw), det_scale, cfg)
    }

    /// Raw embedding of the largest face (the last of equal areas, as the reference's sort
    /// picks it), or `None` without a face.
    pub fn embed_largest(&self, img: &RgbImage) -> Result<Option<Vec<f32>>> {
        let faces = self.detect(img)?;
        let Some(face) = faces.iter().max_by(|a, b| a.area().total_cmp(&b.area())) else {
            return Ok(None);
        };
        self.rec.embed(&norm_crop(img, &face.kps)).map(Some)
    }
}

/// Cosine similarity and Euclidean distance of two raw embeddings, in f64.
pub fn similarity(a: &[f32], b: &[f32]) -> Result<(f64, f64)> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::msg(format!(
            "face embeddings of different lengths ({} vs {})",
            a.len(),
            b.len()
        )));
    }
    let (mut dot, mut na, mut nb, mut d2) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
        d2 += (x - y) * (x - y);
    }
    Ok((dot / (na.sqrt() * nb.sqrt()), d2.sqrt()))
}
