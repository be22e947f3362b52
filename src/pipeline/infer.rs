//! One pair without a dataset: a person from a photo (their texture map and face computed when
//! not given) into a target pose. `mcld infer` runs it as it is; `mcld edit` swaps identity or
//! garments in between; `mcld serve` keeps the pipeline loaded across requests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{read_rgb, Pair, PairInputs};
use crate::imageops::grid::{labelled_grid, GridRow, MIN_CELL};
use crate::imageops::viz::{pose_preview, tensor_to_rgb};
use crate::person::{FaceSource, PersonInputs, PersonRequest, Preprocessor, TextureOutputs};
use crate::pipeline::mcld::{McldPipeline, NoProgress, SampleOptions};
use crate::{Error, Result};

/// Everything one generation needs, as plain values.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// Photo of the person to re-pose.
    pub source: PathBuf,
    /// Target poses in order (at least one); the networks are loaded once for all of them and
    /// every one is generated with the same seed.
    pub poses: Vec<PoseSpec>,
    /// An animation through the results in the order of `poses`.
    pub gif: Option<PathBuf>,
    /// Precomputed texture map of the source (computed from the photo when absent).
    pub texture: Option<PathBuf>,
    /// Precomputed face embedding (computed from the photo when absent, else zeros).
    pub face: Option<PathBuf>,
    pub out: PathBuf,
    /// Folder of the MCLD checkpoints.
    pub ckpt_dir: PathBuf,
    /// Training config naming the base models.
    pub config_path: PathBuf,
    /// Folder of DensePose and antelopev2, for what is computed from the photo.
    pub pretrained_dir: PathBuf,
    /// Where a computed texture map goes (default beside `out`).
    pub save_texture: Option<PathBuf>,
    pub seed: u64,
    /// DDIM steps and guidance instead of the inference config's.
    pub options: SampleOptions,
    pub device: Device,
    pub dtype: DType,
}

impl InferRequest {
    /// Where `infer` writes the texture it computes (`save_texture`, else beside `out`) and
    /// the source's IUV (beside the texture).
    pub fn texture_outputs(&self) -> TextureOutputs {
        let texture = self
            .save_texture
            .clone()
            .unwrap_or_else(|| beside(&self.out, "texture"));
        let iuv = texture.with_file_name(format!(
            "{}_source_iuv.png",
            texture
                .file_stem()
                .map(|s| s.to_string_lossy().trim_end_matches("_texture").to_string())
                .unwrap_or_else(|| "out".into())
        ));
        TextureOutputs { texture, iuv }
    }

    /// How the source person's inputs are found: the given files, else the models.
    pub fn person(&self, face: FaceSource, save: TextureOutputs) -> PersonRequest {
        PersonRequest {
            photo: self.source.clone(),
            texture: self.texture.clone(),
            face,
            save,
        }
    }

    /// The face source the request implies: the given file, else computed.
    pub fn face_source(&self) -> FaceSource {
        match &self.face {
            Some(p) => FaceSource::File(p.clone()),
            None => FaceSource::Compute,
        }
    }

    /// The pair handed to the pipeline (the source photo is also CLIP's first input).
    pub fn pair(&self, person: PersonInputs, pose: RgbImage) -> PairInputs {
        PairInputs {
            pair: Pair {
                from: file_name(&self.source),
                to: self
                    .poses
                    .first()
                    .map(|p| file_name(p.path()))
                    .unwrap_or_default(),
            },
            target: person.photo.clone(),
            source: person.photo,
            pose,
            texture: person.texture,
            face: person.face,
            face_missing: person.face_missing,
        }
    }
}

/// A target pose: a DensePose IUV image, or a photo of someone in the pose, which DensePose
/// turns into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoseSpec {
    Iuv(PathBuf),
    Photo(PathBuf),
}

impl PoseSpec {
    pub fn path(&self) -> &Path {
        match self {
            PoseSpec::Iuv(p) | PoseSpec::Photo(p) => p,
        }
    }
}

/// Whether `img` reads as a DensePose IUV image: the blue channel is a part index (0 to 24)
/// everywhere and some pixel is on a part. A photo has larger blue values somewhere.
pub fn looks_like_iuv(img: &RgbImage) -> bool {
    let mut on_body = false;
    for p in img.pixels() {
        if p[2] > 24 {
            return false;
        }
        on_body |= p[2] > 0;
    }
    on_body
}

/// `--poses DIR`: its PNG and JPEG files in name order, each an IUV image when it looks like
/// one ([`looks_like_iuv`]) and a photo otherwise.
pub fn poses_in_dir(dir: &Path) -> Result<Vec<PoseSpec>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for e in rd {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let ext = p
            .extension()
            .map(|x| x.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if p.is_file() && !hidden && matches!(ext.as_str(), "png" | "jpg" | "jpeg") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::input(
            dir,
            "no .png or .jpg pose images in this folder",
        ));
    }
    files
        .into_iter()
        .map(|p| {
            Ok(if looks_like_iuv(&read_rgb(&p)?) {
                PoseSpec::Iuv(p)
            } else {
                PoseSpec::Photo(p)
            })
        })
        .collect()
}

/// One target pose, ready: its IUV and the name its row and pair carry.
#[derive(Debug, Clone)]
pub struct TargetPose {
    pub label: String,
    pub iuv: RgbImage,
}

/// `OUT.png` for one pose; `OUT_0.png`, `OUT_1.png`, ... for several.
pub fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}_{i}.{ext}")))
        .collect()
}

/// Where the IUV computed from the `i`-th of `n` target photos goes: `OUT_target_iuv.png`
/// beside the output it drives (`OUT_i_target_iuv.png` with several poses), for reuse with
/// `--pose`.
pub fn target_iuv_path(out: &Path, i: usize, n: usize) -> PathBuf {
    beside(&output_paths(out, n)[i], "target_iuv")
}

/// The request's target IUVs in order: read, or computed by DensePose from the photos (and
/// saved, see [`target_iuv_path`]). A photo without a person is an error naming it.
pub fn target_poses(req: &InferRequest, pre: &Preprocessor) -> Result<Vec<TargetPose>> {
    if req.poses.is_empty() {
        return Err(Error::msg(
            "no target pose: give --pose IUV.png, --pose-from PHOTO or --poses DIR",
        ));
    }
    let n = req.poses.len();
    let mut out = Vec::with_capacity(n);
    for (i, spec) in req.poses.iter().enumerate() {
        let label = format!("{}: {}", i, file_name(spec.path()));
        let iuv = match spec {
            PoseSpec::Iuv(p) => read_rgb(p)?,
            PoseSpec::Photo(p) => {
                let t = Instant::now();
                let photo = read_rgb(p)?;
                let explain = |e: Error| {
                    Error::msg(format!(
                        "the target pose photo {} needs DensePose: {e}
(alternatively pass                          its IUV image with --pose)",
                        p.display()
                    ))
                };
                let iuv = pre.iuv(&photo, explain)?.ok_or_else(|| {
                    Error::input(
                        p,
                        "DensePose found no person in this photo, so it gives no target pose                          (use a photo with one person in full view, or an IUV image with --pose)",
                    )
                })?;
                let path = target_iuv_path(&req.out, i, n);
                crate::fsutil::save_image_atomic(
                    &image::DynamicImage::ImageRgb8(iuv.clone()),
                    &path,
                )?;
                eprintln!(
                    "computed the target pose of {} with DensePose in {:.1}s: {}",
                    p.display(),
                    t.elapsed().as_secs_f64(),
                    path.display()
                );
                iuv
            }
        };
        out.push(TargetPose { label, iuv });
    }
    Ok(out)
}

/// `mcld infer`: reads or computes the source's inputs and the target poses, generates one
/// image per pose, writes them with the contact sheet (and the animation when asked).
pub fn run(req: &InferRequest) -> Result<Vec<RgbImage>> {
    let source = read_rgb(&req.source)?;
    let (poses, person) = {
        let pre = Preprocessor::new(&req.pretrained_dir, &req.device);
        // The poses first: a photo without a person fails before the texture is computed.
        let poses = target_poses(req, &pre)?;
        let person = req.person(req.face_source(), req.texture_outputs());
        (poses, PersonInputs::with_photo(&person, source, &pre)?)
    };
    let input = req.pair(person, poses[0].iuv.clone());
    generate_to_out(req, &input, &poses)
}

/// Loads the pipeline once and generates `input` in each of `poses` with the request's seed;
/// writes the outputs ([`output_paths`]), the contact sheet `OUT_sheet.png` (source | texture
/// | target pose | generated, a row per pose) and, when asked, the GIF.
pub fn generate_to_out(
    req: &InferRequest,
    input: &PairInputs,
    poses: &[TargetPose],
) -> Result<Vec<RgbImage>> {
    let t0 = Instant::now();
    let pipeline =
        McldPipeline::from_config(&req.ckpt_dir, &req.config_path, &req.device, req.dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let outs = output_paths(&req.out, poses.len());
    let bar = if poses.len() > 1 {
        let b = ProgressBar::new(poses.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} poses  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut results = Vec::with_capacity(poses.len());
    for (pose, path) in poses.iter().zip(&outs) {
        let mut one = input.clone();
        one.pose = pose.iuv.clone();
        let generated = pipeline.generate_with(
            std::slice::from_ref(&one),
            req.seed,
            &req.options,
            &mut NoProgress,
        )?;
        let img = tensor_to_rgb(&generated[0])?;
        crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img.clone()), path)?;
        results.push(img);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let gen_s = t1.elapsed().as_secs_f64();

    let sheet_path = beside(&req.out, "sheet");
    let title = if poses.len() == 1 {
        format!("mcld infer - seed {}", req.seed)
    } else {
        format!(
            "mcld infer - {} poses, seed {} for each",
            poses.len(),
            req.seed
        )
    };
    let rows: Vec<(String, RgbImage, RgbImage)> = poses
        .iter()
        .zip(&results)
        .map(|(p, r)| (p.label.clone(), p.iuv.clone(), r.clone()))
        .collect();
    let panel = sheet(&title, input, &rows)?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(panel), &sheet_path)?;
    if let Some(gif) = &req.gif {
        write_gif(gif, &results)?;
    }
    let written = if outs.len() == 1 {
        outs[0].display().to_string()
    } else {
        format!(
            "{} .. {}",
            outs[0].display(),
            outs[outs.len() - 1].display()
        )
    };
    println!(
        "wrote {written}, the contact sheet {}{} (load {load_s:.1}s, generate {gen_s:.1}s for \
         {} pose(s), precision {})",
        sheet_path.display(),
        req.gif
            .as_ref()
            .map(|g| format!(" and the animation {}", g.display()))
            .unwrap_or_default(),
        poses.len(),
        pipeline.precision.describe()
    );
    Ok(results)
}

/// Delay between the frames of the animation.
pub const GIF_FRAME_MS: u32 = 700;

/// An endlessly looping GIF through `frames` in order, written atomically.
pub fn write_gif(path: &Path, frames: &[RgbImage]) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut bytes = Vec::new();
    {
        let fail = |e: image::ImageError| Error::msg(format!("{}: {e}", path.display()));
        // Speed 10 of 30: NeuQuant palettes good enough to look at, seconds not minutes.
        let mut enc = GifEncoder::new_with_speed(&mut bytes, 10);
        enc.set_repeat(Repeat::Infinite).map_err(fail)?;
        for f in frames {
            let rgba = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            let frame = image::Frame::from_parts(
                rgba,
                0,
                0,
                image::Delay::from_numer_denom_ms(GIF_FRAME_MS, 1),
            );
            enc.encode_frame(frame).map_err(fail)?;
        }
    }
    crate::fsutil::write_atomic(path, &bytes)
}

/// Columns of `infer`'s panel and contact sheet (and `demo`'s).
pub const SHEET_COLUMNS: [&str; 4] = ["source", "texture", "target pose", "generated"];

/// `infer`'s labelled panel: one row per target pose, `(label, IUV, result)` (a contact sheet
/// when there are several), in the layout of the validation grid.
pub fn sheet(
    title: &str,
    input: &PairInputs,
    results: &[(String, RgbImage, RgbImage)],
) -> Result<RgbImage> {
    let rows: Vec<GridRow> = results
        .iter()
        .map(|(label, pose, generated)| GridRow {
            label: label.clone(),
            panels: vec![
                input.source.clone(),
                input.texture.clone(),
                pose_preview(pose),
                generated.clone(),
            ],
        })
        .collect();
    labelled_grid(title, &SHEET_COLUMNS, &rows, MIN_CELL)
}

/// `DIR/STEM_SUFFIX.png` for an output `DIR/STEM.EXT`.
pub fn beside(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{stem}_{suffix}.png"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into())
}
