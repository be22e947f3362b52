//! The `face` stage of `prepare`: one raw ArcFace embedding per photo with a face (the models
//! are in `models::face`).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::report::{Failure, StageReport, StageStatus};
use crate::data::npy::write_f32 as write_npy_f32;
use crate::data::{derived_path, list_photos, Part};
use crate::models::face::{find_model, FaceEmbedder, DETECTOR_ONNX, RECOGNISER_ONNX};
use crate::rank::Shard;
use crate::Result;

/// Face stage: one `{part}_face/NAME.npy` per photo of the shard with a face; photos without
/// a face are listed under `missing` (the reference writes nothing for them; training uses
/// zeros).
pub fn run_face(
    root: &Path,
    pretrained_dir: &Path,
    shard: &Shard,
    bar: &indicatif::ProgressBar,
) -> Result<StageReport> {
    let mut rep = StageReport::new("face");
    let mut jobs = Vec::new();
    for part in Part::ALL {
        for name in list_photos(root, part)? {
            if !shard.owns_name(&name) {
                continue;
            }
            let out = derived_path(root, part, "face", &name, "npy");
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
                        write_npy_f32(out, &[v.len()], &v)?;
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
