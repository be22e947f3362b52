//! The body of `mcld edit`: infer's inputs and code path, with the identity and texture regions
//! swapped in before the networks run.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::json;

use super::compose::{check_texture, Coverage, Region, TexelParts};
use super::{apply_edit, EditPlan};
use crate::data::{read_face_embedding, read_rgb};
use crate::imageops::viz::{fit_height, pose_preview, strip};
use crate::person::texture::TextureAssets;
use crate::person::{FaceOutcome, FaceSource, PersonInputs, Preprocessor};
use crate::pipeline::infer::{beside, generate_to_out, target_poses, InferRequest};
use crate::{Error, Result};

/// An edit as plain values: `infer`'s request plus what to swap in.
#[derive(Debug, Clone)]
pub struct EditRequest {
    pub infer: InferRequest,
    /// A photo whose face embedding replaces the source's identity.
    pub face_from: Option<PathBuf>,
    /// A precomputed face embedding replacing the source's identity.
    pub face_emb: Option<PathBuf>,
    /// `--garment REGION=PHOTO` values.
    pub garment: Vec<String>,
    /// `--garment-texture REGION=TEXTURE.png` values.
    pub garment_texture: Vec<String>,
    /// Side-by-side PNG: source | donor(s) | composed texture | target pose | result.
    pub panel: Option<PathBuf>,
    /// CLIP's photo input: `auto`, `source` or `donor`.
    pub source_clip: String,
}

/// Where a region's texels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DonorFile {
    Photo(PathBuf),
    Texture(PathBuf),
}

impl DonorFile {
    pub fn path(&self) -> &Path {
        match self {
            DonorFile::Photo(p) | DonorFile::Texture(p) => p,
        }
    }
}

/// One `--garment` / `--garment-texture` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GarmentSpec {
    pub region: Region,
    pub donor: DonorFile,
}

impl GarmentSpec {
    /// Parses `REGION=FILE` given to `flag`; errors quote the value and list the regions.
    pub fn parse(flag: &str, value: &str) -> Result<Self> {
        let what = if flag == "--garment" {
            "PHOTO"
        } else {
            "TEXTURE.png"
        };
        let Some((region, file)) = value.split_once('=') else {
            return Err(Error::msg(format!(
                "{flag} {value:?}: expected REGION={what}, REGION one of {}",
                Region::valid_names()
            )));
        };
        let region: Region = region
            .parse()
            .map_err(|e| Error::msg(format!("{flag} {value:?}: {e}")))?;
        if file.trim().is_empty() {
            return Err(Error::msg(format!(
                "{flag} {value:?}: no file after {region}="
            )));
        }
        let file = PathBuf::from(file);
        let donor = if flag == "--garment" {
            DonorFile::Photo(file)
        } else {
            DonorFile::Texture(file)
        };
        Ok(Self { region, donor })
    }
}

/// All garment flags, in the order they are applied: wider regions first, so that where two
/// overlap (`outfit` and `upper`) the narrower one wins whatever the order on the command line
/// (clap does not keep the order across two flags). A region given twice is an error.
pub fn garment_specs(garment: &[String], garment_texture: &[String]) -> Result<Vec<GarmentSpec>> {
    let mut specs = garment
        .iter()
        .map(|v| GarmentSpec::parse("--garment", v))
        .chain(
            garment_texture
                .iter()
                .map(|v| GarmentSpec::parse("--garment-texture", v)),
        )
        .collect::<Result<Vec<_>>>()?;
    for (i, s) in specs.iter().enumerate() {
        if let Some(t) = specs[..i].iter().find(|t| t.region == s.region) {
            return Err(Error::msg(format!(
                "region {} is given twice ({} and {}); give each region once",
                s.region,
                t.donor.path().display(),
                s.donor.path().display()
            )));
        }
    }
    specs.sort_by_key(|s| std::cmp::Reverse(s.region.parts().len()));
    Ok(specs)
}

/// The donor photo every outfit part (upper + lower) ends up taken from, if it is one photo.
pub fn single_outfit_donor(specs: &[GarmentSpec]) -> Option<&Path> {
    let mut donor: Option<&DonorFile> = None;
    for &p in Region::Outfit.parts() {
        // Applied in order, so the last spec covering a part is the one that shows.
        let d = &specs.iter().rev().find(|s| s.region.contains(p))?.donor;
        match donor {
            Some(prev) if prev != d => return None,
            _ => donor = Some(d),
        }
    }
    match donor? {
        DonorFile::Photo(p) => Some(p),
        DonorFile::Texture(_) => None,
    }
}

/// The face embedding of a donor photo; unlike the source's, a missing face or missing models
/// is an error: the user asked for that identity.
fn donor_face(pre: &Preprocessor, path: &Path) -> Result<Vec<f32>> {
    let photo = read_rgb(path)?;
    match pre.face(&photo)? {
        FaceOutcome::Found(v) => Ok(v),
        FaceOutcome::NoFace => Err(Error::input(
            path,
            "--face-from: no face found in this photo (antelopev2's detector), so there is no \
             identity to take from it; use a photo with a visible face or pass --face-emb EMB.npy",
        )),
        FaceOutcome::ModelsMissing(msg) => Err(Error::msg(format!(
            "--face-from {} needs the face models to compute its embedding: {}",
            path.display(),
            // The shared message points at infer's flag; the donor's is --face-emb.
            msg.replace("pass --face EMB.npy", "pass --face-emb EMB.npy")
        ))),
    }
}

/// A donor file as read, and (once known) its texture map.
struct Donor {
    file: DonorFile,
    /// What the panel shows: the photo, or the texture map itself.
    shown: RgbImage,
    texture: Option<RgbImage>,
}

/// Reads a donor file; a texture map of the wrong size is refused here, before any model runs.
fn read_donor(spec: &GarmentSpec) -> Result<Donor> {
    let img = read_rgb(spec.donor.path())?;
    let texture = match &spec.donor {
        DonorFile::Texture(p) => {
            check_texture(&img, p, &format!("--garment-texture {}=...", spec.region))?;
            Some(img.clone())
        }
        DonorFile::Photo(_) => None,
    };
    Ok(Donor {
        file: spec.donor.clone(),
        shown: img,
        texture,
    })
}

/// The texture map of a donor photo (DensePose, then the UV atlas, as for the source), written
/// beside the output so it can be reused with `--garment-texture`.
fn donor_texture(
    region: Region,
    path: &Path,
    photo: &RgbImage,
    pre: &Preprocessor,
    assets: &TextureAssets,
    saved: &Path,
) -> Result<RgbImage> {
    let iuv = pre.iuv(photo, |e| {
        Error::msg(format!(
            "--garment {region}={} needs the donor's texture map, computed with DensePose (or \
             pass --garment-texture {region}=TEXTURE.png, e.g. one written by `mcld infer \
             --save-texture`): {e}",
            path.display()
        ))
    })?;
    let iuv = iuv.ok_or_else(|| {
        Error::input(
            path,
            format!(
                "donor photo for --garment {region}: DensePose found no person in it, so it \
                 has no texture map to take the {region} from"
            ),
        )
    })?;
    let texture = crate::person::texture::texture_map(photo, &iuv, assets)
        .map_err(|e| Error::input(path, format!("donor texture map: {e}")))?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(texture.clone()), saved)?;
    eprintln!(
        "computed the texture map of donor {} with DensePose: {}",
        path.display(),
        saved.display()
    );
    Ok(texture)
}

/// Parts as "1, 2, 15-22" for the report.
fn parts_text(parts: &[u8]) -> String {
    let mut runs: Vec<(u8, u8)> = Vec::new();
    for &p in parts {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == p => *hi = p,
            _ => runs.push((p, p)),
        }
    }
    runs.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `mcld edit`.
pub fn run(a: &EditRequest) -> Result<()> {
    let i = &a.infer;
    // Flags first: a typo in a region must not cost a DensePose run.
    let specs = garment_specs(&a.garment, &a.garment_texture)?;
    let source = read_rgb(&i.source)?;
    // Every donor file is read first, so that a missing or wrong-sized one fails before any
    // model runs. Donors are numbered in the order their regions are applied.
    let mut donors: Vec<Donor> = Vec::new();
    for s in &specs {
        if !donors.iter().any(|d| d.file == s.donor) {
            donors.push(read_donor(s)?);
        }
    }
    if let (Some(p), false) = (&i.texture, specs.is_empty()) {
        check_texture(&read_rgb(p)?, p, "the source's texture map (--texture)")?;
    }
    let mut pre = Preprocessor::new(&i.pretrained_dir, &i.device);
    // The target poses before the edit: a photo without a person fails before any texture
    // work.
    let poses = target_poses(i, &pre)?;
    let pose = poses[0].iuv.clone();
    // The donor's identity replaces the source's, which is then not computed.
    let face_source = if a.face_emb.is_some() || a.face_from.is_some() {
        FaceSource::Replaced
    } else {
        i.face_source()
    };
    let saves = crate::person::TextureOutputs {
        texture: beside(&i.out, "source_texture"),
        iuv: beside(&i.out, "source_iuv"),
    };
    let person = PersonInputs::with_photo(&i.person(face_source, saves), source, &pre)?;
    let (face, identity) = match (&a.face_emb, &a.face_from) {
        (Some(p), _) => (
            Some(read_face_embedding(p)?),
            json!({"from": "embedding", "file": p}),
        ),
        (None, Some(p)) => {
            let v = donor_face(&pre, p)?;
            eprintln!(
                "computed the face embedding of {} (antelopev2)",
                p.display()
            );
            (Some(v), json!({"from": "photo", "file": p}))
        }
        (None, None) => (None, json!({"from": "source"})),
    };

    let assets = TextureAssets::builtin()?;
    let parts = TexelParts::from_assets(&assets);
    let mut garments = Vec::new();
    for s in &specs {
        let k = donors
            .iter()
            .position(|d| d.file == s.donor)
            .expect("every donor was read above");
        if donors[k].texture.is_none() {
            let saved = beside(&i.out, &format!("donor{}_texture", k + 1));
            let d = &donors[k];
            let t = donor_texture(s.region, s.donor.path(), &d.shown, &pre, &assets, &saved)?;
            donors[k].texture = Some(t);
        }
        let t = donors[k].texture.clone().expect("computed above");
        garments.push((s.region, t));
    }
    // DensePose's memory goes back before the diffusion networks load.
    pre.release();

    let outfit_donor = single_outfit_donor(&specs);
    let clip_from: Option<&Path> = match a.source_clip.as_str() {
        "source" => None,
        "donor" => {
            let photos: Vec<&Path> = donors
                .iter()
                .filter_map(|d| match &d.file {
                    DonorFile::Photo(p) => Some(p.as_path()),
                    DonorFile::Texture(_) => None,
                })
                .collect();
            match (outfit_donor, photos.as_slice()) {
                (Some(p), _) => Some(p),
                (None, [p]) => Some(*p),
                _ => {
                    return Err(Error::msg(format!(
                        "--source-clip donor needs exactly one garment donor photo (--garment \
                         REGION=PHOTO); got {}",
                        photos.len()
                    )))
                }
            }
        }
        _ => outfit_donor,
    };
    let clip_source = clip_from.map(|p| {
        donors
            .iter()
            .find(|d| matches!(&d.file, DonorFile::Photo(q) if q == p))
            .map(|d| d.shown.clone())
            .expect("a donor photo named by the specs")
    });

    let plan = EditPlan {
        face,
        garments,
        clip_source,
    };
    let input = i.pair(person, pose);
    let (edited, coverage) = apply_edit(&input, &plan, &parts)?;
    let report_rows = report_coverage(&specs, &coverage);
    match clip_from {
        Some(p) => println!(
            "CLIP's photo input: the donor {} (the whole outfit comes from it)",
            p.display()
        ),
        None => println!("CLIP's photo input: the source photo"),
    }

    let tex_path = match (&i.save_texture, specs.is_empty()) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(beside(&i.out, "texture")),
        (None, true) => None,
    };
    if let Some(p) = &tex_path {
        crate::fsutil::save_image_atomic(
            &image::DynamicImage::ImageRgb8(edited.texture.clone()),
            p,
        )?;
        println!("wrote the composed texture map {}", p.display());
    }

    let results = generate_to_out(i, &edited, &poses)?;
    let result = &results[0];

    let stem = i
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let report_path = i.out.with_file_name(format!("{stem}_edit.json"));
    let report = json!({
        "output": i.out,
        "source": i.source,
        "poses": i.poses.iter().map(|p| p.path()).collect::<Vec<_>>(),
        "seed": i.seed,
        "identity": identity,
        "garments": report_rows,
        "texture": tex_path,
        "clip_photo_input": match clip_from {
            Some(p) => json!({"from": "donor", "file": p}),
            None => json!({"from": "source", "file": i.source}),
        },
        "clip_texture_input": "the composed texture map",
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(e.to_string()))?;
    crate::fsutil::write_atomic(&report_path, text.as_bytes())?;
    println!("wrote the edit report {}", report_path.display());

    if let Some(panel) = &a.panel {
        let h = 256;
        let mut cols = vec![fit_height(&input.source, h)?];
        if let Some(p) = &a.face_from {
            cols.push(fit_height(&read_rgb(p)?, h)?);
        }
        for d in &donors {
            cols.push(fit_height(&d.shown, h)?);
        }
        cols.push(fit_height(&edited.texture, h)?);
        let pose_img = pose_preview(&edited.pose);
        cols.push(fit_height(&pose_img, h)?);
        // The networks work on a 512x512 squash of the pose; shown at the pose's aspect.
        let w = (edited.pose.width() as f64 * h as f64 / edited.pose.height().max(1) as f64)
            .round()
            .max(1.0) as usize;
        cols.push(crate::imageops::pil_resize_rgb(
            result,
            (h as usize, w),
            crate::imageops::Filter::Bicubic,
        )?);
        crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(strip(&cols)), panel)?;
        println!(
            "wrote {}: source | donor(s) | composed texture | target pose | result",
            panel.display()
        );
    }
    Ok(())
}

/// Prints what each donor covered and returns the rows of the JSON report.
fn report_coverage(specs: &[GarmentSpec], coverage: &[Coverage]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for (s, c) in specs.iter().zip(coverage) {
        println!(
            "{} (DensePose parts {}) from {}: the donor covered {:.1}% of its {} texels; the \
             rest keep the source's",
            s.region,
            parts_text(s.region.parts()),
            s.donor.path().display(),
            100.0 * c.fraction(),
            c.texels
        );
        rows.push(json!({
            "region": s.region.name(),
            "parts": s.region.parts(),
            "donor": s.donor.path(),
            "kind": match s.donor { DonorFile::Photo(_) => "photo", DonorFile::Texture(_) => "texture" },
            "texels": c.texels,
            "covered": c.covered,
            "fraction": c.fraction(),
        }));
    }
    rows
}
