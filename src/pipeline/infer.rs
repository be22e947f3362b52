//! One pair without a dataset: a person from a photo (their texture map and face computed when
//! not given) into a target pose. `mcld infer` runs it as it is; `mcld edit` swaps identity or
//! garments in between; `mcld serve` keeps the pipeline loaded across requests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;

use crate::data::{read_rgb, Pair, PairInputs};
use crate::imageops::viz::tensor_to_rgb;
use crate::person::{FaceSource, PersonInputs, PersonRequest, Preprocessor, TextureOutputs};
use crate::pipeline::mcld::McldPipeline;
use crate::Result;

/// Everything one generation needs, as plain values.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// Photo of the person to re-pose.
    pub source: PathBuf,
    /// Target pose as a DensePose IUV image (R = V, G = U, B = part index).
    pub pose: PathBuf,
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
                to: file_name(&self.pose),
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

/// `mcld infer`: reads or computes the source's inputs, generates, writes `out`.
pub fn run(req: &InferRequest) -> Result<RgbImage> {
    let source = read_rgb(&req.source)?;
    let pose = read_rgb(&req.pose)?;
    let person = {
        let pre = Preprocessor::new(&req.pretrained_dir, &req.device);
        let person = req.person(req.face_source(), req.texture_outputs());
        PersonInputs::with_photo(&person, source, &pre)?
    };
    let input = req.pair(person, pose);
    generate_to_out(req, &input)
}

/// Loads the pipeline, generates `input` with the request's seed and writes `out`.
pub fn generate_to_out(req: &InferRequest, input: &PairInputs) -> Result<RgbImage> {
    let t0 = Instant::now();
    let pipeline =
        McldPipeline::from_config(&req.ckpt_dir, &req.config_path, &req.device, req.dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let out = pipeline.generate(std::slice::from_ref(input), req.seed)?;
    let gen_s = t1.elapsed().as_secs_f64();
    let img = tensor_to_rgb(&out[0])?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img.clone()), &req.out)?;
    println!(
        "wrote {} (load {load_s:.1}s, generate {gen_s:.1}s, precision {})",
        req.out.display(),
        pipeline.precision.describe()
    );
    Ok(img)
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
