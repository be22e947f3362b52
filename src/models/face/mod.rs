//! Face models (SPEC §2, "Face embedding"), as InsightFace's antelopev2 does it: SCRFD detection
//! on a 640x640 letterbox, the largest face, a 5-point similarity alignment to ArcFace's 112x112
//! template, and the raw (not normalised) ArcFace embedding. The ONNX files run on tract.

mod align;
mod onnx;

pub use align::{norm_crop, resize, umeyama_similarity, warp_affine, ResizeMode, ARCFACE_TEMPLATE};
use onnx::tract_err;
pub use onnx::{load_onnx, plan_for_input, Plan};

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use crate::{Error, Result};

/// File names of InsightFace's antelopev2 pack (detector, recogniser).
pub const DETECTOR_ONNX: &str = "scrfd_10g_bnkps.onnx";
pub const RECOGNISER_ONNX: &str = "glintr100.onnx";

/// Where a model is looked for: `DIR/NAME`, then `DIR/antelopev2/NAME`.
pub fn find_model(pretrained_dir: &Path, name: &str) -> Option<PathBuf> {
    [
        pretrained_dir.join(name),
        pretrained_dir.join("antelopev2").join(name),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// SCRFD settings; the defaults are InsightFace's for antelopev2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScrfdConfig {
    pub input_size: usize,
    pub score_threshold: f32,
    pub nms_threshold: f32,
    pub strides: Vec<usize>,
    pub num_anchors: usize,
    pub input_mean: f32,
    pub input_std: f32,
    pub resize: ResizeMode,
}

impl Default for ScrfdConfig {
    fn default() -> Self {
        Self {
            input_size: 640,
            score_threshold: 0.5,
            nms_threshold: 0.4,
            strides: vec![8, 16, 32],
            num_anchors: 2,
            input_mean: 127.5,
            input_std: 128.0,
            resize: ResizeMode::Bilinear,
        }
    }
}

/// One detected face in photo coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// x1, y1, x2, y2.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Left eye, right eye, nose, left and right mouth corner (x, y).
    pub kps: [[f32; 2]; 5],
}

impl Detection {
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// NCHW float tensor of an RGB image, `(v - mean) / std`.
pub fn to_tensor(img: &RgbImage, mean: f32, std: f32) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            data[c * h * w + y as usize * w + x as usize] = (p.0[c] as f32 - mean) / std;
        }
    }
    Tensor::from_shape(&[1, 3, h, w], &data).map_err(|e| Error::msg(format!("tensor: {e}")))
}

/// Greedy NMS over detections sorted by score (InsightFace's "+1" pixel areas).
pub fn nms(dets: &[Detection], thresh: f32) -> Vec<Detection> {
    let area = |d: &Detection| (d.bbox[2] - d.bbox[0] + 1.0) * (d.bbox[3] - d.bbox[1] + 1.0);
    let mut keep: Vec<Detection> = Vec::new();
    let mut alive = vec![true; dets.len()];
    for i in 0..dets.len() {
        if !alive[i] {
            continue;
        }
        let a = &dets[i];
        keep.push(*a);
        for (j, b) in dets.iter().enumerate().skip(i + 1) {
            if !alive[j] {
                continue;
            }
            let w = (a.bbox[2].min(b.bbox[2]) - a.bbox[0].max(b.bbox[0]) + 1.0).max(0.0);
            let h = (a.bbox[3].min(b.bbox[3]) - a.bbox[1].max(b.bbox[1]) + 1.0).max(0.0);
            let inter = w * h;
            if inter / (area(a) + area(b) - inter) > thresh {
                alive[j] = false;
            }
        }
    }
    keep
}

/// SCRFD face detector (with key points).
pub struct Scrfd {
    plan: Plan,
    cfg: ScrfdConfig,
    path: PathBuf,
}

impl Scrfd {
    pub fn load(path: &Path, cfg: &ScrfdConfig) -> Result<Self> {
        let s = cfg.input_size;
        Ok(Self {
            plan: load_onnx(path, [1, 3, s, s])?,
            cfg: cfg.clone(),
            path: path.to_path_buf(),
        })
    }

    /// Faces in `img`, best score first, after NMS.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Detection>> {
        let cfg = &self.cfg;
        let size = cfg.input_size as u32;
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::msg("empty image"));
        }
        let ratio = h as f32 / w as f32;
        let (nw, nh) = if ratio > 1.0 {
            (((size as f32 / ratio) as u32).max(1), size)
        } else {
            (size, ((size as f32 * ratio) as u32).max(1))
        };
        let det_scale = nh as f32 / h as f32;
        let small = resize(img, nw, nh, cfg.resize);
        let mut canvas = RgbImage::new(size, size);
        image::imageops::replace(&mut canvas, &small, 0, 0);
        let input = to_tensor(&canvas, cfg.input_mean, cfg.input_std)?;
        let outs = self
            .plan
            .run(tvec!(input.into()))
            .map_err(|e| tract_err(&self.path, "SCRFD run", e))?;
        decode_scrfd(
            &self.path,
            &outs,
            (cfg.input_size, cfg.input_size),
            det_scale,
            cfg,
        )
    }
}

/// SCRFD's raw outputs (score, box and key-point maps per stride, for an input of `(ih, iw)`)
/// -> detections in the original image's coordinates, by score, after NMS, as InsightFace
/// decodes them.
pub fn decode_scrfd(
    path: &Path,
    outs: &[TValue],
    (ih, iw): (usize, usize),
    det_scale: f32,
    cfg: &ScrfdConfig,
) -> Result<Vec<Detection>> {
    let fmc = cfg.strides.len();
    if outs.len() < 3 * fmc {
        return Err(Error::weights(
            path,
            format!("expected {} outputs, got {}", 3 * fmc, outs.len()),
        ));
    }
    let mut dets = Vec::new();
    for (k, &stride) in cfg.strides.iter().enumerate() {
        let (fh, fw) = (ih / stride, iw / stride);
        let n = fh * fw * cfg.num_anchors;
        let view = |o: usize, per: usize| -> Result<&[f32]> {
            let s = outs[o]
                .as_slice::<f32>()
                .map_err(|e| tract_err(path, "SCRFD output", e))?;
            if s.len() != n * per {
                return Err(Error::weights(
                    path,
                    format!(
                        "output {o} (stride {stride}) has {} values, expected {n}x{per}",
                        s.len()
                    ),
                ));
            }
            Ok(s)
        };
        let scores = view(k, 1)?;
        let boxes = view(k + fmc, 4)?;
        let kps = view(k + 2 * fmc, 10)?;
        for (i, &score) in scores.iter().enumerate() {
            if score < cfg.score_threshold {
                continue;
            }
            let cell = i / cfg.num_anchors;
            let cx = ((cell % fw) * stride) as f32;
            let cy = ((cell / fw) * stride) as f32;
            let st = stride as f32;
            let b = &boxes[4 * i..4 * i + 4];
            let bbox = [
                (cx - b[0] * st) / det_scale,
                (cy - b[1] * st) / det_scale,
                (cx + b[2] * st) / det_scale,
                (cy + b[3] * st) / det_scale,
            ];
            let kp = &kps[10 * i..10 * i + 10];
            let mut pts = [[0f32; 2]; 5];
            for (j, p) in pts.iter_mut().enumerate() {
                *p = [
                    (cx + kp[2 * j] * st) / det_scale,
                    (cy + kp[2 * j + 1] * st) / det_scale,
                ];
            }
            dets.push(Detection {
                bbox,
                score,
                kps: pts,
            });
        }
    }
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(nms(&dets, cfg.nms_threshold))
}

/// ArcFace input settings; defaults as InsightFace uses for glintr100.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArcFaceConfig {
    pub input_size: usize,
    pub input_mean: f32,
    pub input_std: f32,
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        Self {
            input_size: 112,
            input_mean: 127.5,
            input_std: 127.5,
        }
    }
}

/// ArcFace recogniser: aligned RGB crop -> raw embedding.
pub struct ArcFace {
    plan: Plan,
    cfg: ArcFaceConfig,
    path: PathBuf,
}

impl ArcFace {
    pub fn load(path: &Path, cfg: &ArcFaceConfig) -> Result<Self> {
        let s = cfg.input_size;
        Ok(Self {
            plan: load_onnx(path, [1, 3, s, s])?,
            cfg: cfg.clone(),
            path: path.to_path_buf(),
        })
    }

    pub fn embed(&self, aligned: &RgbImage) -> Result<Vec<f32>> {
        let s = self.cfg.input_size as u32;
        if aligned.dimensions() != (s, s) {
            return Err(Error::msg(format!(
                "ArcFace wants a {s}x{s} crop, got {:?}",
                aligned.dimensions()
            )));
        }
        let input = to_tensor(aligned, self.cfg.input_mean, self.cfg.input_std)?;
        let outs = self
            .plan
            .run(tvec!(input.into()))
            .map_err(|e| tract_err(&self.path, "ArcFace run", e))?;
        let v = outs[0]
            .as_slice::<f32>()
            .map_err(|e| tract_err(&self.path, "ArcFace output", e))?;
        Ok(v.to_vec())
    }
}

/// Detector + recogniser.
pub struct FaceEmbedder {
    pub detector: Scrfd,
    pub recogniser: ArcFace,
}

impl FaceEmbedder {
    pub fn load(det: &Path, rec: &Path) -> Result<Self> {
        Ok(Self {
            detector: Scrfd::load(det, &ScrfdConfig::default())?,
            recogniser: ArcFace::load(rec, &ArcFaceConfig::default())?,
        })
    }

    /// Embedding of the largest face, or `None` when no face is found.
    pub fn embed_largest(&self, img: &RgbImage) -> Result<Option<Vec<f32>>> {
        let faces = self.detector.detect(img)?;
        let Some(face) = faces.iter().max_by(|a, b| a.area().total_cmp(&b.area())) else {
            return Ok(None);
        };
        self.recogniser.embed(&norm_crop(img, &face.kps)).map(Some)
    }
}
