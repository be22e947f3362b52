//! What a generation request holds once its uploads are decoded, and the networks that turn it
//! into an image: loaded once, kept for every later request, run through `mcld infer`'s (and,
//! with swaps, `mcld edit`'s) exact code path so a result equals what the command line writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use image::RgbImage;

use crate::data::{Pair, PairInputs};
use crate::edit::compose::{check_texture, Region, TexelParts};
use crate::edit::run::{single_outfit_donor, DonorFile, GarmentSpec};
use crate::edit::{apply_edit, EditPlan};
use crate::imageops::viz::{pose_preview, tensor_to_rgb as to_rgb};
use crate::models::densepose::DensePose;
use crate::models::face::FaceEmbedder;
use crate::person::preprocess::{self, FaceOutcome};
use crate::person::texture::TextureAssets;
use crate::pipeline::mcld::{McldPipeline, Progress, SampleOptions};
use crate::{Error, Result};

/// An uploaded image, decoded. `name` is the file name the browser sent, cleaned for display
/// and for the reproducing command line; it never becomes a path on this machine.
#[derive(Debug, Clone)]
pub struct Upload {
    pub name: String,
    pub image: RgbImage,
    /// SHA-256 of the uploaded bytes: tells two uploads of the same photo apart from two photos.
    pub digest: String,
}

/// An uploaded face embedding (`.npy`, 512 values).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub values: Vec<f32>,
}

/// The target pose.
#[derive(Debug, Clone)]
pub enum PoseInput {
    /// A file of the `--poses` gallery (already resolved inside it and read).
    Gallery {
        name: String,
        path: PathBuf,
        image: RgbImage,
    },
    /// An uploaded DensePose IUV image.
    Iuv(Upload),
    /// A photo of someone in the wanted pose: DensePose computes its IUV.
    Photo(Upload),
}

/// Where a region's texels come from (`mcld edit --garment` / `--garment-texture`).
#[derive(Debug, Clone)]
pub enum GarmentDonor {
    Photo(Upload),
    Texture(Upload),
}

impl GarmentDonor {
    fn upload(&self) -> &Upload {
        match self {
            GarmentDonor::Photo(u) | GarmentDonor::Texture(u) => u,
        }
    }
}

/// One generation, as `mcld infer` / `mcld edit` would be asked for it.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub source: Upload,
    pub pose: PoseInput,
    /// The source's texture map (`--texture`); computed with DensePose when absent.
    pub texture: Option<Upload>,
    /// The source's face embedding (`--face`); computed with antelopev2 when absent.
    pub face: Option<Embedding>,
    /// Another person's identity from a photo (`--face-from`).
    pub face_from: Option<Upload>,
    /// Another person's identity as an embedding (`--face-emb`).
    pub face_emb: Option<Embedding>,
    /// One donor per region at most.
    pub garments: Vec<(Region, GarmentDonor)>,
    pub seed: u64,
    pub options: SampleOptions,
}

impl JobRequest {
    /// True when the request needs `mcld edit` rather than `mcld infer`.
    pub fn is_edit(&self) -> bool {
        self.face_from.is_some() || self.face_emb.is_some() || !self.garments.is_empty()
    }
}

/// What a finished job hands back.
pub struct JobOutput {
    /// The PNG `mcld infer --out result.png` writes for the same inputs.
    pub result_png: Vec<u8>,
    /// The target pose as the networks saw it (IUV), and a coloured preview of it.
    pub pose_iuv_png: Vec<u8>,
    pub pose_preview_png: Vec<u8>,
    /// The command line that reproduces the result, and what the user must know to run it.
    pub command: String,
    pub command_note: Option<String>,
}

/// Where the networks come from.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub ckpt_dir: PathBuf,
    pub config_path: PathBuf,
    pub pretrained_dir: PathBuf,
    pub device: String,
    pub dtype: String,
    /// Full-size networks on random weights (as `mcld bench pipeline`), for measurements.
    pub random_weights: bool,
}

/// The loaded networks and what was loaded on first use (DensePose, antelopev2).
pub struct Engine {
    cfg: EngineConfig,
    pub pipeline: McldPipeline,
    device: Device,
    densepose: Option<DensePose>,
    /// antelopev2, or the message saying it is not installed (looked for once).
    face: Option<std::result::Result<FaceEmbedder, String>>,
    assets: TextureAssets,
    /// Outputs are noise: the checkpoints carry `mcld demo`'s marker, or the weights are random.
    pub untrained: bool,
    /// Every network load so far (the diffusion networks count as one).
    pub loads: AtomicUsize,
}

impl Engine {
    pub fn load(cfg: EngineConfig) -> Result<Self> {
        let device = crate::device::parse_device(&cfg.device)?;
        let dtype = crate::device::parse_dtype(&cfg.dtype)?;
        let (pipeline, untrained) = if cfg.random_weights {
            let p = McldPipeline::random(&device, dtype, 20, 512, 0)?;
            (p, true)
        } else {
            let p = McldPipeline::from_config(&cfg.ckpt_dir, &cfg.config_path, &device, dtype)?;
            let marker = cfg.ckpt_dir.join(crate::presets::tree::UNTRAINED_MARKER);
            (p, marker.is_file())
        };
        Ok(Self {
            cfg,
            pipeline,
            device,
            densepose: None,
            face: None,
            assets: TextureAssets::builtin()?,
            untrained,
            loads: AtomicUsize::new(1),
        })
    }

    /// The inference config's step count and guidance (what the page starts from).
    pub fn defaults(&self) -> (usize, f64) {
        (
            self.pipeline.scheduler.timesteps().len(),
            self.pipeline.guidance_scale,
        )
    }

    /// DensePose, loaded on first use and kept; `why` says what needed it when it is missing.
    fn densepose(&mut self, why: &str) -> Result<&DensePose> {
        if self.densepose.is_none() {
            let dp = preprocess::load_densepose(&self.cfg.pretrained_dir, &self.device)
                .map_err(|e| Error::msg(format!("{why} needs DensePose: {e}")))?;
            self.loads.fetch_add(1, Ordering::Relaxed);
            self.densepose = Some(dp);
        }
        Ok(self.densepose.as_ref().expect("loaded above"))
    }

    /// antelopev2 (loaded on first use and kept) or why it is unavailable.
    fn face_models(&mut self) -> Result<std::result::Result<&FaceEmbedder, String>> {
        if self.face.is_none() {
            let f = preprocess::load_face_models(&self.cfg.pretrained_dir)?;
            if f.is_ok() {
                self.loads.fetch_add(1, Ordering::Relaxed);
            }
            self.face = Some(f);
        }
        Ok(match self.face.as_ref().expect("looked for above") {
            Ok(f) => Ok(f),
            Err(m) => Err(m.clone()),
        })
    }

    fn face_of(&mut self, photo: &RgbImage) -> Result<FaceOutcome> {
        match self.face_models()? {
            Ok(f) => preprocess::face_with(f, photo),
            Err(m) => Ok(FaceOutcome::ModelsMissing(m)),
        }
    }

    /// Runs one request: inputs as `mcld infer`/`mcld edit` build them, then the pipeline.
    /// `phase` hears about the slow preparation steps before sampling starts.
    pub fn run(
        &mut self,
        req: &JobRequest,
        phase: &mut dyn FnMut(&str) -> Result<()>,
        progress: &mut dyn Progress,
    ) -> Result<JobOutput> {
        let source = &req.source.image;
        let pose = match &req.pose {
            PoseInput::Gallery { image, .. } => image.clone(),
            PoseInput::Iuv(u) => u.image.clone(),
            PoseInput::Photo(u) => {
                phase("computing the target pose with DensePose")?;
                let dp = self.densepose("a pose photo")?;
                preprocess::source_iuv(dp, &u.image)?.ok_or_else(|| {
                    Error::input(
                        &u.name,
                        "pose photo: DensePose found no person in it, so there is no pose to \
                         take from it",
                    )
                })?
            }
        };
        let texture = match &req.texture {
            Some(u) => {
                if !req.garments.is_empty() {
                    check_texture(&u.image, Path::new(&u.name), "the source's texture map")?;
                }
                u.image.clone()
            }
            None => {
                phase("computing the source's texture map with DensePose")?;
                let dp = self.densepose(
                    "the source's texture map (or upload one under \"texture map\", e.g. one \
                     written by `mcld infer --save-texture`)",
                )?;
                preprocess::texture_of_photo(dp, source, Path::new(&req.source.name))?.texture
            }
        };
        let donor_face = match (&req.face_emb, &req.face_from) {
            (Some(e), _) => Some(e.values.clone()),
            (None, Some(u)) => {
                phase("computing the donor's face embedding")?;
                Some(match self.face_of(&u.image)? {
                    FaceOutcome::Found(v) => v,
                    FaceOutcome::NoFace => {
                        return Err(Error::input(
                            &u.name,
                            "identity donor: no face found in this photo (antelopev2's \
                             detector); use a photo with a visible face or upload an \
                             embedding",
                        ))
                    }
                    FaceOutcome::ModelsMissing(m) => {
                        return Err(Error::msg(format!(
                            "an identity donor photo needs the face models: {m}"
                        )))
                    }
                })
            }
            (None, None) => None,
        };
        // As `mcld edit`: with a donor identity the source's is not computed.
        let (face, face_missing) = match (&donor_face, &req.face) {
            (Some(_), _) => (vec![0f32; 512], false),
            (None, Some(e)) => (e.values.clone(), false),
            (None, None) => {
                phase("computing the source's face embedding")?;
                match self.face_of(source)? {
                    FaceOutcome::Found(v) => (v, false),
                    FaceOutcome::NoFace | FaceOutcome::ModelsMissing(_) => (vec![0f32; 512], true),
                }
            }
        };

        // Garments in `mcld edit`'s order: wider regions first, so the narrower one wins.
        let mut garments: Vec<&(Region, GarmentDonor)> = req.garments.iter().collect();
        garments.sort_by_key(|(r, _)| std::cmp::Reverse(r.parts().len()));
        let parts = TexelParts::from_assets(&self.assets);
        let mut plan_garments = Vec::new();
        let mut specs = Vec::new();
        for (region, donor) in &garments {
            let tex = match donor {
                GarmentDonor::Texture(u) => {
                    check_texture(
                        &u.image,
                        Path::new(&u.name),
                        &format!("the {region} donor's texture map"),
                    )?;
                    u.image.clone()
                }
                GarmentDonor::Photo(u) => {
                    phase("computing a donor's texture map with DensePose")?;
                    let dp = self.densepose(&format!("the {region} donor photo"))?;
                    let iuv = preprocess::source_iuv(dp, &u.image)?.ok_or_else(|| {
                        Error::input(
                            &u.name,
                            format!(
                                "{region} donor photo: DensePose found no person in it, so it \
                                 has no texture map to take the {region} from"
                            ),
                        )
                    })?;
                    crate::person::texture::texture_map(&u.image, &iuv, &self.assets)
                        .map_err(|e| Error::input(&u.name, format!("donor texture map: {e}")))?
                }
            };
            plan_garments.push((*region, tex));
            // The digest stands for the file: equal uploads are one donor, as equal paths are.
            let label = PathBuf::from(&donor.upload().digest);
            specs.push(GarmentSpec {
                region: *region,
                donor: match donor {
                    GarmentDonor::Photo(_) => DonorFile::Photo(label),
                    GarmentDonor::Texture(_) => DonorFile::Texture(label),
                },
            });
        }
        let clip_source = single_outfit_donor(&specs).map(|digest| {
            garments
                .iter()
                .find_map(|(_, d)| match d {
                    GarmentDonor::Photo(u) if Path::new(&u.digest) == digest => {
                        Some(u.image.clone())
                    }
                    _ => None,
                })
                .expect("the outfit donor is one of the garment photos")
        });
        let input = PairInputs {
            pair: Pair {
                from: req.source.name.clone(),
                to: pose_name(&req.pose).to_string(),
            },
            target: source.clone(),
            source: source.clone(),
            pose: pose.clone(),
            texture,
            face,
            face_missing,
        };
        let plan = EditPlan {
            face: donor_face,
            garments: plan_garments,
            clip_source,
        };
        let (edited, _) = apply_edit(&input, &plan, &parts)?;

        let out = self.pipeline.generate_with(
            std::slice::from_ref(&edited),
            req.seed,
            &req.options,
            progress,
        )?;
        let img = to_rgb(&out[0])?;
        let png = |img: RgbImage, what: &str| {
            crate::fsutil::encode_image(
                &image::DynamicImage::ImageRgb8(img),
                image::ImageFormat::Png,
                Path::new(what),
            )
        };
        let (command, command_note) = self.command(req);
        Ok(JobOutput {
            result_png: png(img, "result.png")?,
            pose_preview_png: png(pose_preview(&pose), "pose.png")?,
            pose_iuv_png: png(pose, "pose_iuv.png")?,
            command,
            command_note,
        })
    }

    /// The `mcld infer` / `mcld edit` line that writes the same image, run from the folder
    /// holding the uploaded files under the names the browser sent.
    pub fn command(&self, req: &JobRequest) -> (String, Option<String>) {
        if self.cfg.random_weights {
            return (
                String::new(),
                Some(
                    "random full-size weights (--random-weights): no command line reproduces \
                     this"
                        .into(),
                ),
            );
        }
        let abs = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let mut a: Vec<String> = vec![
            "mcld".into(),
            if req.is_edit() { "edit" } else { "infer" }.into(),
        ];
        let mut flag = |f: &str, v: String| {
            a.push(f.into());
            a.push(v);
        };
        flag("--ckpt_dir", abs(&self.cfg.ckpt_dir));
        flag("--config_path", abs(&self.cfg.config_path));
        flag("--pretrained_dir", abs(&self.cfg.pretrained_dir));
        if self.cfg.device != "cpu" {
            flag("--device", self.cfg.device.clone());
        }
        if self.cfg.dtype != "f32" {
            flag("--dtype", self.cfg.dtype.clone());
        }
        flag("--source", req.source.name.clone());
        let mut note = None;
        match &req.pose {
            PoseInput::Gallery { path, .. } => flag("--pose", abs(path)),
            PoseInput::Iuv(u) => flag("--pose", u.name.clone()),
            PoseInput::Photo(u) => {
                flag("--pose", "pose_iuv.png".into());
                note = Some(format!(
                    "pose_iuv.png is the DensePose IUV computed from {}: save it with the \
                     \"pose IUV\" link",
                    u.name
                ));
            }
        }
        if let Some(u) = &req.texture {
            flag("--texture", u.name.clone());
        }
        if let Some(e) = &req.face {
            flag("--face", e.name.clone());
        }
        if let Some(u) = &req.face_from {
            flag("--face-from", u.name.clone());
        }
        if let Some(e) = &req.face_emb {
            flag("--face-emb", e.name.clone());
        }
        for (region, donor) in &req.garments {
            match donor {
                GarmentDonor::Photo(u) => flag("--garment", format!("{region}={}", u.name)),
                GarmentDonor::Texture(u) => {
                    flag("--garment-texture", format!("{region}={}", u.name))
                }
            }
        }
        flag("--seed", req.seed.to_string());
        if let Some(s) = req.options.steps {
            flag("--steps", s.to_string());
        }
        if let Some(g) = req.options.guidance {
            flag("--guidance", g.to_string());
        }
        flag("--out", "result.png".into());
        let line = a
            .iter()
            .map(|s| shell_quote(s))
            .collect::<Vec<_>>()
            .join(" ");
        (line, note)
    }
}

/// The name a pose goes by in messages.
fn pose_name(p: &PoseInput) -> &str {
    match p {
        PoseInput::Gallery { name, .. } => name,
        PoseInput::Iuv(u) | PoseInput::Photo(u) => &u.name,
    }
}

/// A word as a POSIX shell reads it back: as is when it holds only safe characters, else in
/// single quotes.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("a/b-c_d.png"), "a/b-c_d.png");
        assert_eq!(shell_quote("my photo.jpg"), "'my photo.jpg'");
        assert_eq!(shell_quote("it's.png"), r"'it'\''s.png'");
        assert_eq!(shell_quote(""), "''");
    }
}
