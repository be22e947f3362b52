//! Face stage (SPEC §2, "Face embedding"), as InsightFace's antelopev2 does it: SCRFD detection
//! on a 640x640 letterbox, the largest face, a 5-point similarity alignment to ArcFace's 112x112
//! template, and the raw (not normalised) ArcFace embedding. The ONNX files run on tract.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::report::{Failure, StageReport, StageStatus};
use super::split::Part;
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

/// ArcFace's 112x112 five-point template (eyes, nose tip, mouth corners), as InsightFace uses.
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// How the photo is shrunk into the detector's square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Pixel-centre bilinear, as `cv2.resize` (InsightFace); float, not OpenCV's fixed point.
    Bilinear,
    /// Pixel-centre nearest, as PIL's `Image.resize(NEAREST)`.
    Nearest,
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

pub type Plan = TypedRunnableModel<TypedModel>;

fn tract_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::weights(path, format!("{what}: {e:#}"))
}

/// Loads an ONNX file for a fixed NCHW input. Resize nodes that give only output `sizes`
/// (empty `scales`, as in SCRFD's FPN) are rewritten to constant `scales`: tract's Resize
/// evaluates an empty `scales` as "no resize" and the graph then breaks at the next Add.
pub fn load_onnx(path: &Path, input_shape: [usize; 4]) -> Result<Plan> {
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| tract_err(path, "cannot read ONNX", e))?;
    plan_for_input(path, proto, input_shape)
}

/// Prepares an ONNX graph for a fixed NCHW input. tract 0.21 runs an opset-11 `Resize` whose
/// `scales` input is empty (the exporters' way to say "use `sizes`") as no resize at all, so
/// every such node gets constant scales: output over input shape, both from tract's shape
/// analysis at this input size. Unlike a lookup of constant `sizes`, this also covers
/// dynamic-shape exports (InsightFace's det_500m) whose sizes come from `Shape` of another map.
pub fn plan_for_input(path: &Path, mut proto: pb::ModelProto, shape: [usize; 4]) -> Result<Plan> {
    let err =
        |what: &str, e: &dyn std::fmt::Display| Error::weights(path, format!("{what}: {e:#}"));
    let onnx = tract_onnx::onnx();
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| Error::weights(path, "ONNX file has no graph"))?;
    let empty_const = |name: &str| {
        name.is_empty()
            || graph
                .initializer
                .iter()
                .any(|t| t.name == name && t.dims.iter().product::<i64>() == 0)
            || graph.node.iter().any(|n| {
                n.op_type == "Constant"
                    && n.output.iter().any(|o| o == name)
                    && n.attribute.iter().any(|a| {
                        a.t.as_ref()
                            .is_some_and(|t| t.dims.iter().product::<i64>() == 0)
                    })
            })
    };
    let targets: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type == "Resize"
                && n.input.len() == 4
                && !n.input[3].is_empty()
                && empty_const(&n.input[2])
        })
        .map(|(i, _)| i)
        .collect();
    if !targets.is_empty() {
        let mut model = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
            .map_err(|e| err("cannot read ONNX graph", &e))?;
        model
            .analyse(false)
            .map_err(|e| err("cannot infer ONNX shapes", &e))?;
        let concrete = |name: &str| -> Option<Vec<usize>> {
            let o = model.find_outlet_label(name)?;
            model
                .outlet_fact(o)
                .ok()?
                .shape
                .as_concrete_finite()
                .ok()
                .flatten()
                .map(|s| s.to_vec())
        };
        let mut inits = Vec::new();
        let mut rewrites = Vec::new();
        for i in targets {
            let node = &graph.node[i];
            let (Some(inp), Some(out)) = (concrete(&node.input[0]), concrete(&node.output[0]))
            else {
                return Err(Error::weights(
                    path,
                    format!(
                        "Resize `{}`: shapes not known at input {shape:?}",
                        node.name
                    ),
                ));
            };
            if inp.len() != out.len() || inp.contains(&0) {
                return Err(Error::weights(
                    path,
                    format!("Resize `{}`: input {inp:?} vs output {out:?}", node.name),
                ));
            }
            let scales: Vec<f32> = out
                .iter()
                .zip(&inp)
                .map(|(&o, &i)| o as f32 / i as f32)
                .collect();
            let name = format!("{}__mcld_scales", node.output[0]);
            inits.push(pb::TensorProto {
                name: name.clone(),
                dims: vec![scales.len() as i64],
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: scales,
                ..Default::default()
            });
            rewrites.push((i, name));
        }
        let graph = proto.graph.as_mut().expect("checked above");
        for (i, name) in rewrites {
            graph.node[i].input[2] = name;
            graph.node[i].input.truncate(3);
        }
        graph.initializer.extend(inits);
    }
    onnx.model_for_proto_model(&proto)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| err("cannot prepare the ONNX graph", &e))
}

/// Samples `img` at real coordinates with bilinear weights; outside is black.
fn sample_bilinear(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (x0, y0) = (x0 as i64, y0 as i64);
    let mut acc = [0f32; 3];
    for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
        for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
            let (xx, yy) = (x0 + dx, y0 + dy);
            if xx < 0 || yy < 0 || xx >= w || yy >= h {
                continue;
            }
            let p = img.get_pixel(xx as u32, yy as u32).0;
            for c in 0..3 {
                acc[c] += wx * wy * p[c] as f32;
            }
        }
    }
    acc
}

/// Source index of each output pixel for PIL's nearest resize: PIL accumulates the position
/// `scale / 2 + i * scale` by repeated f64 addition and truncates, and that rounding decides
/// ties at exact integers, so it is reproduced step by step.
fn pil_nearest_index(len_in: u32, len_out: u32) -> Vec<u32> {
    let scale = len_in as f64 / len_out as f64;
    let mut pos = scale * 0.5;
    let mut out = Vec::with_capacity(len_out as usize);
    for _ in 0..len_out {
        out.push((pos.max(0.0) as u32).min(len_in - 1));
        pos += scale;
    }
    out
}

pub fn resize(img: &RgbImage, w: u32, h: u32, mode: ResizeMode) -> RgbImage {
    match mode {
        ResizeMode::Nearest => {
            let xs = pil_nearest_index(img.width(), w);
            let ys = pil_nearest_index(img.height(), h);
            RgbImage::from_fn(w, h, |x, y| *img.get_pixel(xs[x as usize], ys[y as usize]))
        }
        ResizeMode::Bilinear => {
            let sx = img.width() as f64 / w as f64;
            let sy = img.height() as f64 / h as f64;
            let (iw, ih) = (img.width() as f64, img.height() as f64);
            RgbImage::from_fn(w, h, |x, y| {
                let xs = ((x as f64 + 0.5) * sx - 0.5).clamp(0.0, iw - 1.0);
                let ys = ((y as f64 + 0.5) * sy - 0.5).clamp(0.0, ih - 1.0);
                let v = sample_bilinear(img, xs as f32, ys as f32);
                image::Rgb(v.map(|c| c.round().clamp(0.0, 255.0) as u8))
            })
        }
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

/// Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping
/// `src` onto `dst`, as a 2x3 matrix: Umeyama's estimate, in its closed 2-D form.
pub fn umeyama_similarity(src: &[[f32; 2]], dst: &[[f32; 2]]) -> [[f32; 3]; 2] {
    let n = src.len().min(dst.len()).max(1) as f64;
    let mean = |p: &[[f32; 2]]| {
        let (mut x, mut y) = (0f64, 0f64);
        for q in p {
            x += q[0] as f64;
            y += q[1] as f64;
        }
        (x / n, y / n)
    };
    let (sx, sy) = mean(src);
    let (dx, dy) = mean(dst);
    let (mut dot, mut cross, mut var) = (0f64, 0f64, 0f64);
    for (s, d) in src.iter().zip(dst) {
        let (ax, ay) = (s[0] as f64 - sx, s[1] as f64 - sy);
        let (bx, by) = (d[0] as f64 - dx, d[1] as f64 - dy);
        dot += ax * bx + ay * by;
        cross += ax * by - ay * bx;
        var += ax * ax + ay * ay;
    }
    let (a, b) = if var > 0.0 {
        (dot / var, cross / var)
    } else {
        (1.0, 0.0)
    };
    let tx = dx - (a * sx - b * sy);
    let ty = dy - (b * sx + a * sy);
    [
        [a as f32, -b as f32, tx as f32],
        [b as f32, a as f32, ty as f32],
    ]
}

/// `cv2.warpAffine(img, m, (size, size))` with bilinear sampling and a black border. Sampling is
/// in float; OpenCV snaps positions to 1/32 px, so a pixel may differ by a grey level.
pub fn warp_affine(img: &RgbImage, m: &[[f32; 3]; 2], size: u32) -> RgbImage {
    let (a, b, c) = (m[0][0] as f64, m[0][1] as f64, m[0][2] as f64);
    let (d, e, f) = (m[1][0] as f64, m[1][1] as f64, m[1][2] as f64);
    let det = a * e - b * d;
    let det = if det.abs() < 1e-12 { 1e-12 } else { det };
    let (ia, ib, id, ie) = (e / det, -b / det, -d / det, a / det);
    RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f64 - c, y as f64 - f);
        let sx = ia * u + ib * v;
        let sy = id * u + ie * v;
        let p = sample_bilinear(img, sx as f32, sy as f32);
        image::Rgb(p.map(|c| c.round().clamp(0.0, 255.0) as u8))
    })
}

/// The 112x112 ArcFace crop of a face given its five key points.
pub fn norm_crop(img: &RgbImage, kps: &[[f32; 2]; 5]) -> RgbImage {
    warp_affine(img, &umeyama_similarity(kps, &ARCFACE_TEMPLATE), 112)
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

/// Face stage: one `{part}_face/NAME.npy` per photo with a face; photos without a face are
/// listed under `missing` (the reference writes nothing for them; training uses zeros).
pub fn run_face(
    root: &Path,
    pretrained_dir: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<StageReport> {
    let mut rep = StageReport::new("face");
    let mut jobs = Vec::new();
    for part in Part::ALL {
        for name in super::run::list_photos(root, part)? {
            let out = super::run::derived_path(root, part, "face", &name, "npy");
            if out.is_file() {
                rep.skipped += 1;
            } else {
                jobs.push((root.join(part.dir()).join(&name), out));
            }
        }
    }
    if jobs.is_empty() {
        return Ok(rep);
    }
    let det = find_model(pretrained_dir, DETECTOR_ONNX);
    let rec = find_model(pretrained_dir, RECOGNISER_ONNX);
    let (Some(det), Some(rec)) = (det, rec) else {
        for name in [DETECTOR_ONNX, RECOGNISER_ONNX] {
            if find_model(pretrained_dir, name).is_none() {
                rep.missing
                    .push(pretrained_dir.join(name).display().to_string());
            }
        }
        rep.status = StageStatus::Failed;
        rep.error = Some(format!(
            "face models not found (InsightFace antelopev2 ONNX files; `mcld download --only \
             antelopev2` fetches them); {} photos left",
            jobs.len()
        ));
        return Ok(rep);
    };
    let embedder = FaceEmbedder::load(&det, &rec)?;
    bar.set_length(jobs.len() as u64);
    let results: Vec<(PathBuf, Result<bool>)> = jobs
        .par_iter()
        .map(|(photo, out)| {
            let r = (|| {
                let img = crate::imageops::open_rgb(photo)?;
                match embedder.embed_largest(&img)? {
                    Some(v) => {
                        super::stats::write_npy_f32(out, &[v.len()], &v)?;
                        Ok(true)
                    }
                    None => Ok(false),
                }
            })();
            bar.inc(1);
            (photo.clone(), r)
        })
        .collect();
    let mut no_face = 0usize;
    for (photo, r) in results {
        match r {
            Ok(true) => rep.done += 1,
            Ok(false) => {
                no_face += 1;
                rep.missing.push(photo.display().to_string());
            }
            Err(e) => rep.failed.push(Failure::new(photo, e.to_string())),
        }
    }
    if no_face > 0 {
        rep.notes.push(format!(
            "{no_face} photos without a detected face (no .npy; training uses zeros)"
        ));
    }
    Ok(rep)
}
