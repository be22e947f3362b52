//! The body of `mcld edit`: infer's inputs and code path, with the identity and texture regions
//! swapped in before the networks run.

use std::path::{Path, PathBuf};

use clap::Args;
use image::RgbImage;
use serde_json::json;

use super::compose::{check_texture, Coverage, Region, TexelParts};
use super::{apply_edit, EditPlan};
use crate::data::{read_face_embedding, read_rgb};
use crate::device::{parse_device, parse_dtype};
use crate::models::densepose::DensePose;
use crate::pipeline::commands::{self, beside, InferArgs};
use crate::pipeline::preprocess::{self, FaceOutcome};
use crate::prepare::texture::TextureAssets;
use crate::{Error, Result};

#[derive(Debug, Args)]
#[command(
    after_help = "Files: OUT (the image), OUT_edit.json (what came from whom, and how \
much of each region the donor's photo covered), the texture the networks saw (--save-texture, \
default OUT_texture.png when garments are swapped), OUT_donorN_texture.png per donor photo, \
OUT_source_texture.png and OUT_source_iuv.png when the source's texture is computed. Where \
regions overlap (outfit and upper) the narrower one wins. A texel the donor's photo never \
showed keeps the source's."
)]
#[command(mut_arg("save_texture", |a| a.help(
    "Where to write the texture map the networks see (the composed one; default \
     OUT_texture.png when garments are swapped, none otherwise)"
)))]
pub struct EditArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// Identity of another person: the face embedding of this photo (antelopev2 in
    /// --pretrained_dir) replaces the source's.
    #[arg(long = "face-from", visible_alias = "face_from", conflicts_with_all = ["face", "face_emb"])]
    pub face_from: Option<PathBuf>,
    /// Identity of another person as a precomputed (512,) float32 .npy ArcFace embedding.
    #[arg(long = "face-emb", visible_alias = "face_emb", conflicts_with = "face")]
    pub face_emb: Option<PathBuf>,
    /// REGION=PHOTO (repeatable): that region of the texture map comes from the person in PHOTO
    /// (its texture map computed with DensePose). Regions: head, upper, lower, hands, feet,
    /// outfit (= upper + lower).
    #[arg(long = "garment", value_name = "REGION=PHOTO")]
    pub garment: Vec<String>,
    /// REGION=TEXTURE.png (repeatable): as --garment, from a 512x512 texture map.
    #[arg(
        long = "garment-texture",
        visible_alias = "garment_texture",
        value_name = "REGION=TEXTURE.png"
    )]
    pub garment_texture: Vec<String>,
    /// Side-by-side PNG: source | donor(s) | composed texture | target pose | result.
    #[arg(long)]
    pub panel: Option<PathBuf>,
    /// CLIP's first input (the photo of the person): `auto` shows it the donor's photo when
    /// the whole outfit comes from one donor photo and the source's otherwise; `source` or
    /// `donor` force it.
    #[arg(long = "source-clip", visible_alias = "source_clip", default_value = "auto",
          value_parser = ["auto", "source", "donor"])]
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

/// DensePose, loaded on first use and shared by the source and every donor photo.
struct LazyDensePose<'a> {
    pretrained: &'a Path,
    device: &'a candle_core::Device,
    dp: Option<DensePose>,
}

impl LazyDensePose<'_> {
    fn get(&mut self, why: impl FnOnce() -> String) -> Result<&DensePose> {
        if self.dp.is_none() {
            let dp = preprocess::load_densepose(self.pretrained, self.device)
                .map_err(|e| Error::msg(format!("{}: {e}", why())))?;
            self.dp = Some(dp);
        }
        Ok(self.dp.as_ref().expect("loaded above"))
    }
}

/// The face embedding of a donor photo; unlike the source's, a missing face or missing models
/// is an error: the user asked for that identity.
fn donor_face(pretrained: &Path, path: &Path) -> Result<Vec<f32>> {
    let photo = read_rgb(path)?;
    match preprocess::face_of_photo(pretrained, &photo)? {
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
    dp: &mut LazyDensePose,
    assets: &TextureAssets,
    saved: &Path,
) -> Result<RgbImage> {
    let dp = dp.get(|| {
        format!(
            "--garment {region}={} needs the donor's texture map, computed with DensePose (or \
             pass --garment-texture {region}=TEXTURE.png, e.g. one written by `mcld infer \
             --save-texture`)",
            path.display()
        )
    })?;
    let iuv = preprocess::source_iuv(dp, photo)?.ok_or_else(|| {
        Error::input(
            path,
            format!(
                "donor photo for --garment {region}: DensePose found no person in it, so it \
                 has no texture map to take the {region} from"
            ),
        )
    })?;
    let texture = crate::prepare::texture::texture_map(photo, &iuv, assets)
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

/// An image scaled to `h` rows, keeping its aspect ratio.
fn fit_height(img: &RgbImage, h: u32) -> Result<RgbImage> {
    let w = ((img.width() as f64 * h as f64 / img.height().max(1) as f64).round() as u32).max(1);
    crate::imageops::pil_resize_rgb(
        img,
        (h as usize, w as usize),
        crate::imageops::Filter::Bicubic,
    )
}

/// `mcld edit`.
pub fn run(a: &EditArgs) -> Result<()> {
    let i = &a.infer;
    // Flags first: a typo in a region must not cost a DensePose run.
    let specs = garment_specs(&a.garment, &a.garment_texture)?;
    let device = parse_device(&i.compute.device)?;
    let dtype = parse_dtype(&i.compute.dtype)?;
    let source = read_rgb(&i.source)?;
    let pose = read_rgb(&i.pose)?;
    // Every donor file is read first, so that a missing or wrong-sized one fails before any
    // model runs. Donors are numbered in the order their regions are applied.
    let mut donors: Vec<Donor> = Vec::new();
    for s in &specs {
        if !donors.iter().any(|d| d.file == s.donor) {
            donors.push(read_donor(s)?);
        }
    }
    let mut dp = LazyDensePose {
        pretrained: &i.pretrained.pretrained_dir,
        device: &device,
        dp: None,
    };
    let texture = match &i.texture {
        Some(p) => {
            let t = read_rgb(p)?;
            if !specs.is_empty() {
                check_texture(&t, p, "the source's texture map (--texture)")?;
            }
            t
        }
        None => {
            let d = dp.dp.insert(commands::source_densepose(i, &device)?);
            let (tex, iuv) = (
                beside(&i.out, "source_texture"),
                beside(&i.out, "source_iuv"),
            );
            commands::computed_texture(i, d, &source, &tex, &iuv)?
        }
    };
    let (face, identity) = match (&a.face_emb, &a.face_from) {
        (Some(p), _) => (
            Some(read_face_embedding(p)?),
            json!({"from": "embedding", "file": p}),
        ),
        (None, Some(p)) => {
            let v = donor_face(&i.pretrained.pretrained_dir, p)?;
            eprintln!(
                "computed the face embedding of {} (antelopev2)",
                p.display()
            );
            (Some(v), json!({"from": "photo", "file": p}))
        }
        (None, None) => (None, json!({"from": "source"})),
    };
    let (src_face, src_face_missing) = if face.is_some() {
        // Not computed: the donor's identity replaces it.
        (vec![0f32; 512], false)
    } else {
        commands::source_face(i, &source)?
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
            let t = donor_texture(s.region, s.donor.path(), &d.shown, &mut dp, &assets, &saved)?;
            donors[k].texture = Some(t);
        }
        let t = donors[k].texture.clone().expect("computed above");
        garments.push((s.region, t));
    }
    // DensePose's memory goes back before the diffusion networks load.
    drop(dp);

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
    let input = commands::infer_pair(i, source, pose, texture, src_face, src_face_missing);
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

    let result = commands::generate_to_out(i, &device, dtype, &edited)?;

    let stem = i
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let report_path = i.out.with_file_name(format!("{stem}_edit.json"));
    let report = json!({
        "output": i.out,
        "source": i.source,
        "pose": i.pose,
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
        let pose_img = commands::pose_preview(&edited.pose);
        cols.push(fit_height(&pose_img, h)?);
        // The networks work on a 512x512 squash of the pose; shown at the pose's aspect.
        let w = (edited.pose.width() as f64 * h as f64 / edited.pose.height().max(1) as f64)
            .round()
            .max(1.0) as usize;
        cols.push(crate::imageops::pil_resize_rgb(
            &result,
            (h as usize, w),
            crate::imageops::Filter::Bicubic,
        )?);
        crate::fsutil::save_image_atomic(
            &image::DynamicImage::ImageRgb8(commands::strip(&cols)),
            panel,
        )?;
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
