//! `mcld evaluate` (SPEC §6): matches generated and ground-truth images by file name at both
//! resolutions, computes the per-pair metrics and FID against the real set, and writes the
//! reference's printed lines plus `metrics.json` and `metrics.md`.
//!
//! The numeric kernels sit behind [`EvalBackend`] (implemented on `crate::metrics`), so this file
//! is only bookkeeping: listing, matching, the real-set statistics cache and the reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::read_rgb;
use crate::metrics::fid::{frechet_distance, FeatureStats};
use crate::metrics::inception::{Flavor, InceptionV3};
use crate::metrics::ChwImage;
use crate::{Error, Result};

/// Per-pair scores: PSNR, SSIM (51x51 box), SSIM_256 (Gaussian 1.5).
#[derive(Debug, Clone, Copy, Default)]
pub struct PairScores {
    pub psnr: f64,
    pub ssim: f64,
    pub ssim_256: f64,
}

/// The numeric side of evaluation.
pub trait EvalBackend: Sync {
    /// Short name of the FID network, part of the cache key.
    fn fid_backbone(&self) -> &str;
    fn pair_scores(&self, gt: &RgbImage, pred: &RgbImage) -> Result<PairScores>;
    /// LPIPS for a batch of pairs.
    fn lpips(&self, gt: &[RgbImage], pred: &[RgbImage]) -> Result<Vec<f64>>;
    /// FID features for a batch of images.
    fn fid_features(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<f32>>>;
    /// The real-set resize: antialiased bicubic to (height, width), as torchvision's Resize.
    fn resize_real(&self, img: &RgbImage, hw: (usize, usize)) -> Result<RgbImage>;
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub gen_dir: PathBuf,
    pub gt_dir: PathBuf,
    pub training_path: PathBuf,
    pub recompute_real_stats: bool,
    pub batch_size: usize,
    pub progress: bool,
    /// Resolutions to evaluate: (sub-folder, (height, width)).
    pub resolutions: Vec<(String, (usize, usize))>,
}

impl EvalOptions {
    pub fn reference_resolutions() -> Vec<(String, (usize, usize))> {
        vec![("256".into(), (256, 176)), ("512".into(), (512, 352))]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolutionReport {
    pub resolution: String,
    pub pairs: usize,
    pub fid: f64,
    pub lpips: f64,
    pub ssim: f64,
    pub ssim_256: f64,
    pub psnr: f64,
    pub real_images: usize,
    pub real_stats_cache: String,
    pub real_stats_cached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub generated: String,
    pub ground_truth: String,
    pub fid_backbone: String,
    pub results: Vec<ResolutionReport>,
    /// Face similarity, or why it was skipped.
    pub face: BTreeMap<String, serde_json::Value>,
}

fn bar(n: usize, on: bool, what: &str) -> ProgressBar {
    if !on {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(n as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}}  {{per_sec}}  ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

fn list_images(dir: &Path, exts: &[&str]) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        let lower = n.to_ascii_lowercase();
        if exts.iter().any(|x| lower.ends_with(x)) && !n.starts_with('.') {
            names.push(n);
        }
    }
    names.sort();
    Ok(names)
}

/// Ground-truth names with their generated counterparts; a missing counterpart is an error
/// naming both files (the reference would crash on it half-way through).
pub fn match_pairs(gen_dir: &Path, gt_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let names = list_images(gt_dir, &[".png", ".jpg", ".jpeg"])?;
    if names.is_empty() {
        return Err(Error::input(gt_dir, "no ground-truth images found"));
    }
    names
        .into_iter()
        .map(|n| {
            let g = gen_dir.join(&n);
            let t = gt_dir.join(&n);
            if !g.exists() {
                return Err(Error::input(
                    &g,
                    format!("no generated image for ground truth {}", t.display()),
                ));
            }
            Ok((t, g))
        })
        .collect()
}

/// Cache key of the real set: backbone, size and the sorted file list (names and sizes), so a
/// changed training folder invalidates the cache.
fn real_cache_path(
    opts: &EvalOptions,
    backbone: &str,
    hw: (usize, usize),
    names: &[String],
) -> PathBuf {
    // FNV-1a: stable across runs and platforms (std's hasher is not).
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |b: &[u8]| {
        for x in b {
            h ^= *x as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for n in names {
        feed(n.as_bytes());
        let len = std::fs::metadata(opts.training_path.join(n))
            .map(|m| m.len())
            .unwrap_or(0);
        feed(&len.to_le_bytes());
        feed(b"\n");
    }
    let base = opts
        .training_path
        .components()
        .next_back()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_else(|| "train".into());
    let parent = opts
        .training_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parent.join(format!(
        "fid_stats_{base}_{backbone}_{}x{}_{h:016x}.safetensors",
        hw.0, hw.1
    ))
}

fn save_stats(path: &Path, s: &FeatureStats) -> Result<()> {
    use candle_core::{Device, Tensor};
    let d = s.dim();
    let mu = Tensor::from_vec(s.mu.clone(), d, &Device::Cpu)?;
    let sig: Vec<f64> = (0..d)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| s.sigma[(i, j)])
        .collect();
    let sigma = Tensor::from_vec(sig, (d, d), &Device::Cpu)?;
    let n = Tensor::from_vec(vec![s.n as i64], 1, &Device::Cpu)?;
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("mu".to_string(), mu),
            ("sigma".to_string(), sigma),
            ("n".to_string(), n),
        ]),
        &tmp,
    )?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn load_stats(path: &Path) -> Result<FeatureStats> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)?;
    let get = |k: &str| {
        t.get(k)
            .cloned()
            .ok_or_else(|| Error::input(path, format!("cached FID statistics lack `{k}`")))
    };
    let mu = get("mu")?.to_vec1::<f32>()?;
    let d = mu.len();
    let sig = get("sigma")?.flatten_all()?.to_vec1::<f64>()?;
    if sig.len() != d * d {
        return Err(Error::input(
            path,
            "cached FID covariance has the wrong size",
        ));
    }
    Ok(FeatureStats {
        mu,
        sigma: faer::Mat::from_fn(d, d, |i, j| sig[i * d + j]),
        n: get("n")?.to_vec1::<i64>()?[0] as usize,
    })
}

fn stats_of(feats: &[Vec<f32>]) -> Result<FeatureStats> {
    let dim = feats.first().map(|f| f.len()).unwrap_or(0);
    let flat: Vec<f32> = feats.iter().flatten().copied().collect();
    FeatureStats::from_features(&flat, feats.len(), dim)
}

/// Real-set statistics at one size, from the cache when its key matches.
fn real_stats(
    opts: &EvalOptions,
    backend: &dyn EvalBackend,
    hw: (usize, usize),
) -> Result<(FeatureStats, PathBuf, bool, usize)> {
    let names = list_images(&opts.training_path, &[".jpg", ".jpeg", ".png"])?;
    if names.is_empty() {
        return Err(Error::input(
            &opts.training_path,
            "no training images for FID's real set",
        ));
    }
    let cache = real_cache_path(opts, backend.fid_backbone(), hw, &names);
    if cache.exists() && !opts.recompute_real_stats {
        if let Ok(s) = load_stats(&cache) {
            return Ok((s, cache, true, names.len()));
        }
    }
    let pb = bar(names.len(), opts.progress, "real set");
    let mut feats = Vec::with_capacity(names.len());
    for chunk in names.chunks(opts.batch_size.max(1)) {
        let imgs = chunk
            .par_iter()
            .map(|n| {
                let img = read_rgb(&opts.training_path.join(n))?;
                backend.resize_real(&img, hw)
            })
            .collect::<Result<Vec<_>>>()?;
        feats.extend(backend.fid_features(&imgs)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let s = stats_of(&feats)?;
    save_stats(&cache, &s)?;
    Ok((s, cache, false, names.len()))
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Evaluates every resolution; prints the reference's lines as it goes.
pub fn evaluate(opts: &EvalOptions, backend: &dyn EvalBackend) -> Result<EvalReport> {
    let mut results = Vec::new();
    for (sub, hw) in &opts.resolutions {
        let pairs = match_pairs(&opts.gen_dir.join(sub), &opts.gt_dir.join(sub))?;
        let pb = bar(pairs.len(), opts.progress, sub);
        let (mut scores, mut lp, mut feats) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in pairs.chunks(opts.batch_size.max(1)) {
            let loaded = chunk
                .par_iter()
                .map(|(t, g)| {
                    let gt = read_rgb(t)?;
                    let pr = read_rgb(g)?;
                    if gt.dimensions() != pr.dimensions() {
                        return Err(Error::input(
                            g,
                            format!(
                                "size {:?} differs from ground truth {} {:?}",
                                pr.dimensions(),
                                t.display(),
                                gt.dimensions()
                            ),
                        ));
                    }
                    let s = backend.pair_scores(&gt, &pr)?;
                    Ok((gt, pr, s))
                })
                .collect::<Result<Vec<_>>>()?;
            let (gts, prs): (Vec<RgbImage>, Vec<RgbImage>) = loaded
                .iter()
                .map(|(a, b, _)| (a.clone(), b.clone()))
                .unzip();
            scores.extend(loaded.iter().map(|(_, _, s)| *s));
            lp.extend(backend.lpips(&gts, &prs)?);
            feats.extend(backend.fid_features(&prs)?);
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        let fake = stats_of(&feats)?;
        let (real, cache, cached, n_real) = real_stats(opts, backend, *hw)?;
        let fid = frechet_distance(&real, &fake)?.fid;
        let r = ResolutionReport {
            resolution: sub.clone(),
            pairs: pairs.len(),
            fid,
            lpips: mean(&lp),
            ssim: mean(&scores.iter().map(|s| s.ssim).collect::<Vec<_>>()),
            ssim_256: mean(&scores.iter().map(|s| s.ssim_256).collect::<Vec<_>>()),
            psnr: mean(&scores.iter().map(|s| s.psnr).collect::<Vec<_>>()),
            real_images: n_real,
            real_stats_cache: cache.display().to_string(),
            real_stats_cached: cached,
        };
        println!("Evaluation Results on {} resolution:", r.resolution);
        println!("FID: {}", r.fid);
        println!("LPIPS: {}", r.lpips);
        println!("SSIM: {}", r.ssim);
        println!("SSIM_256: {}", r.ssim_256);
        println!("PSNR: {}", r.psnr);
        println!("------------------------------------------");
        results.push(r);
    }
    Ok(EvalReport {
        generated: opts.gen_dir.display().to_string(),
        ground_truth: opts.gt_dir.display().to_string(),
        fid_backbone: backend.fid_backbone().to_string(),
        results,
        face: BTreeMap::new(),
    })
}

/// Markdown table of a report, one row per resolution.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = format!(
        "# mcld evaluate\n\ngenerated: `{}`  \nground truth: `{}`  \nFID backbone: {}\n\n\
         | resolution | pairs | FID | LPIPS | SSIM | SSIM_256 | PSNR |\n|---|---|---|---|---|---|---|\n",
        r.generated, r.ground_truth, r.fid_backbone
    );
    for x in &r.results {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.4} | {:.4} | {:.4} | {:.3} |\n",
            x.resolution, x.pairs, x.fid, x.lpips, x.ssim, x.ssim_256, x.psnr
        ));
    }
    let f = |k: &str| r.face.get(k).and_then(|v| v.as_f64());
    let n = |k: &str| r.face.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    match (f("cosine_similarity"), f("euclidean_distance")) {
        (Some(c), Some(d)) => s.push_str(&format!(
            "\n| faces at | pairs with faces | pairs | face cosine similarity | face euclidean distance |\n\
             |---|---|---|---|---|\n| {} | {} | {} | {c:.4} | {d:.4} |\n",
            r.face
                .get("resolution")
                .and_then(|v| v.as_str())
                .unwrap_or("256"),
            n("pairs_with_faces"),
            n("pairs"),
        )),
        _ => {
            for (k, v) in &r.face {
                s.push_str(&format!("\nface {k}: {v}\n"));
            }
        }
    }
    s
}

/// Writes `metrics.json` and `metrics.md` into `dir` atomically.
pub fn write_reports(dir: &Path, r: &EvalReport) -> Result<()> {
    let json = serde_json::to_string_pretty(r).map_err(|e| Error::msg(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("metrics.json"), json.as_bytes())?;
    crate::fsutil::write_atomic(&dir.join("metrics.md"), markdown(r).as_bytes())
}

/// The real backend: the metric kernels of `crate::metrics` on the chosen device.
pub struct MetricsBackend {
    pub lpips: crate::metrics::lpips::Lpips,
    pub inception: InceptionV3,
    pub backbone: String,
}

fn chw(img: &RgbImage) -> Result<ChwImage> {
    ChwImage::from_rgb8(img.height() as usize, img.width() as usize, img.as_raw())
}

fn batch_tensor(imgs: &[RgbImage], device: &candle_core::Device) -> Result<candle_core::Tensor> {
    let ts = imgs
        .iter()
        .map(|i| chw(i)?.to_tensor(device))
        .collect::<Result<Vec<_>>>()?;
    Ok(candle_core::Tensor::cat(&ts, 0)?)
}

impl EvalBackend for MetricsBackend {
    fn fid_backbone(&self) -> &str {
        &self.backbone
    }
    fn pair_scores(&self, gt: &RgbImage, pred: &RgbImage) -> Result<PairScores> {
        let (g, p) = (chw(gt)?, chw(pred)?);
        Ok(PairScores {
            psnr: crate::metrics::psnr::psnr(&g, &p)?,
            ssim: crate::metrics::ssim::ssim_uniform51(&g, &p)?.mean,
            ssim_256: crate::metrics::ssim::ssim_256(&g, &p)?.mean,
        })
    }
    fn lpips(&self, gt: &[RgbImage], pred: &[RgbImage]) -> Result<Vec<f64>> {
        let dev = self.lpips.device().clone();
        let out = self
            .lpips
            .forward(&batch_tensor(pred, &dev)?, &batch_tensor(gt, &dev)?)?;
        Ok(out
            .lpips
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    }
    fn fid_features(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let c = imgs.iter().map(chw).collect::<Result<Vec<_>>>()?;
        let f = self.inception.features(&c)?;
        Ok(f.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
    }
    fn resize_real(&self, img: &RgbImage, hw: (usize, usize)) -> Result<RgbImage> {
        crate::imageops::pil_resize_rgb(img, hw, crate::imageops::Filter::Bicubic)
    }
}

/// Where `evaluate` expects the metric networks (torchvision's, pytorch-fid's and lpips'
/// published files).
pub const METRIC_WEIGHTS: &str = "\
  PRETRAINED/inception_v3_google-0cc3c7bd.pth   torchvision IMAGENET1K_V1 Inception-V3 (FID, default)
  PRETRAINED/pt_inception-2015-12-05-6726825d.pth  pytorch-fid's TF Inception (--fid-backbone pt_inception)
  PRETRAINED/alexnet-owt-7be5be79.pth           torchvision AlexNet (LPIPS trunk)
  PRETRAINED/lpips/alex.pth                     LPIPS v0.1 linear heads (from the lpips package)
  PRETRAINED/buffalo_s/det_500m.onnx, w600k_mbf.onnx  InsightFace buffalo_s (face similarity, optional)";

/// File names tried for each FID backbone, in order.
pub fn inception_file_names(flavor: Flavor) -> &'static [&'static str] {
    match flavor {
        Flavor::Torchvision => &[
            "inception_v3_google-0cc3c7bd.pth",
            "inception_v3_google-1a9a5a14.pth",
            "inception_v3.safetensors",
        ],
        Flavor::PtInception => &[
            "pt_inception-2015-12-05-6726825d.pth",
            "pt_inception-2015-12-05.pth",
            "pt_inception.safetensors",
        ],
    }
}

fn find_first(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

impl MetricsBackend {
    /// Loads the metric networks from `pretrained` with the safe weight reader.
    pub fn load(pretrained: &Path, backbone: &str, device: &candle_core::Device) -> Result<Self> {
        let flavor = Flavor::parse(backbone)?;
        let inc = find_first(pretrained, inception_file_names(flavor));
        let alex = find_first(
            pretrained,
            &[
                "alexnet-owt-7be5be79.pth",
                "alexnet-owt-4df8aa71.pth",
                "alexnet.safetensors",
            ],
        );
        let lin = find_first(
            pretrained,
            &["lpips/alex.pth", "alex.pth", "lpips_alex.safetensors"],
        );
        let (inc, alex, lin) = match (inc, alex, lin) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => {
                return Err(Error::msg(format!(
                    "metric weights missing under {} for --fid-backbone {backbone}; expected:\n{}\n\
                     `mcld download --only evaluate` fetches them (add pt_inception for \
                     --fid-backbone pt_inception)",
                    pretrained.display(),
                    METRIC_WEIGHTS.replace("PRETRAINED", &pretrained.display().to_string())
                )))
            }
        };
        let dt = candle_core::DType::F32;
        let inception = InceptionV3::load(&inc, flavor, device)?;
        let aw = crate::weights::StrictWeights::from_file(&alex)?.allow_unused(["classifier."]);
        let lw = crate::weights::StrictWeights::from_file(&lin)?;
        let lpips = crate::metrics::lpips::Lpips::from_parts(
            aw.var_builder(dt, device),
            lw.var_builder(dt, device),
        )
        .map_err(|e| Error::weights(&lin, e.to_string()))?;
        aw.finish()?;
        Ok(Self {
            lpips,
            inception,
            backbone: flavor.name().to_string(),
        })
    }
}

/// Face-similarity figures over the 256 pairs (SPEC §6).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FaceReport {
    pub resolution: String,
    pub pairs: usize,
    /// Pairs where both images have a face: the ones averaged.
    pub pairs_with_faces: usize,
    pub no_face_generated: usize,
    pub no_face_ground_truth: usize,
    /// Mean cosine similarity of the raw embeddings (NaN, written as null, without pairs).
    pub cosine_similarity: f64,
    /// Mean Euclidean distance of the raw embeddings.
    pub euclidean_distance: f64,
}

/// Face similarity of every matched pair of `sub`, as the reference's `evaluate_face`: both
/// images embedded by [`crate::metrics::face::FaceModels`], pairs without a face on either side
/// left out (and counted).
pub fn face_similarity(
    opts: &EvalOptions,
    models: &crate::metrics::face::FaceModels,
    sub: &str,
) -> Result<FaceReport> {
    let pairs = match_pairs(&opts.gen_dir.join(sub), &opts.gt_dir.join(sub))?;
    let pb = bar(pairs.len(), opts.progress, "faces");
    let per_pair = pairs
        .par_iter()
        .map(|(t, g)| {
            let gt = read_rgb(t)?;
            let pr = read_rgb(g)?;
            if gt.dimensions() != pr.dimensions() {
                return Err(Error::input(
                    g,
                    format!(
                        "size {:?} differs from ground truth {} {:?}",
                        pr.dimensions(),
                        t.display(),
                        gt.dimensions()
                    ),
                ));
            }
            let eg = models.embed_largest(&gt).map_err(|e| in_file(t, e))?;
            let ep = models.embed_largest(&pr).map_err(|e| in_file(g, e))?;
            pb.inc(1);
            Ok((eg, ep))
        })
        .collect::<Result<Vec<_>>>()?;
    pb.finish_and_clear();
    let mut r = FaceReport {
        resolution: sub.to_string(),
        pairs: pairs.len(),
        ..FaceReport::default()
    };
    let (mut cos, mut dist) = (Vec::new(), Vec::new());
    for (eg, ep) in per_pair {
        match (eg, ep) {
            (Some(a), Some(b)) => {
                let (c, d) = crate::metrics::face::similarity(&b, &a)?;
                cos.push(c);
                dist.push(d);
            }
            (gt, gen) => {
                r.no_face_ground_truth += usize::from(gt.is_none());
                r.no_face_generated += usize::from(gen.is_none());
            }
        }
    }
    r.pairs_with_faces = cos.len();
    r.cosine_similarity = mean(&cos);
    r.euclidean_distance = mean(&dist);
    Ok(r)
}

fn in_file(path: &Path, e: Error) -> Error {
    Error::input(path, format!("face similarity: {e}"))
}

/// The report's `face` entry: the figures when `PRETRAINED/buffalo_s/` holds both models
/// (printed as the reference prints them), otherwise why it was skipped. Missing models are
/// not an error.
pub fn face_status(
    opts: &EvalOptions,
    pretrained: &Path,
) -> Result<BTreeMap<String, serde_json::Value>> {
    use crate::metrics::face::{find_models, FaceConfig, FaceModels, BUFFALO_DIR};
    let mut m = BTreeMap::new();
    let Some((det, rec)) = find_models(pretrained) else {
        let msg = format!(
            "skipped: no {}/{BUFFALO_DIR}/{{{},{}}} (InsightFace buffalo_s ONNX models; \
             `mcld download --only buffalo_s` fetches them)",
            pretrained.display(),
            crate::metrics::face::DETECTOR_ONNX,
            crate::metrics::face::RECOGNISER_ONNX
        );
        println!("Face similarity {msg}");
        m.insert("status".into(), serde_json::Value::String(msg));
        return Ok(m);
    };
    let models = FaceModels::load(&det, &rec, &FaceConfig::default())?;
    // The reference scores faces on the 256 images only.
    let sub = opts
        .resolutions
        .iter()
        .map(|(s, _)| s.as_str())
        .find(|s| *s == "256")
        .or_else(|| opts.resolutions.first().map(|(s, _)| s.as_str()))
        .ok_or_else(|| Error::msg("no resolution to score faces on"))?;
    let r = face_similarity(opts, &models, sub)?;
    println!("Evaluation Results on faces of target images:");
    println!("Face cosine similarity: {}", r.cosine_similarity);
    println!("Face euclidean distance : {}", r.euclidean_distance);
    println!(
        "({} of {} pairs with a face on both sides; no face: {} generated, {} ground truth)",
        r.pairs_with_faces, r.pairs, r.no_face_generated, r.no_face_ground_truth
    );
    let v = serde_json::to_value(&r).map_err(|e| Error::msg(e.to_string()))?;
    if let serde_json::Value::Object(o) = v {
        m.extend(o);
    }
    m.insert("status".into(), "computed".into());
    m.insert(
        "models".into(),
        det.parent().unwrap_or(&det).display().to_string().into(),
    );
    Ok(m)
}
