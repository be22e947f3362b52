//! Face stage (SPEC §2, "Face embedding"): SCRFD + 5-point alignment + ArcFace from the ONNX
//! files under `pretrained_weights/`. The ONNX runtime is not in this build yet; the stage says
//! which models it looks for and how many embeddings are absent (training uses zeros for those).

use std::path::{Path, PathBuf};

use super::report::{StageReport, StageStatus};
use super::split::Part;
use crate::Result;

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

/// Face stage: reports the missing embeddings and models.
pub fn run_face(root: &Path, pretrained_dir: &Path) -> Result<StageReport> {
    let mut rep = StageReport::new("face");
    let mut absent = 0usize;
    for part in Part::ALL {
        let dir = root.join(part.dir());
        let out = root.join(format!("{}_face", part.dir()));
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("jpg") {
                continue;
            }
            let stem = p.file_stem().unwrap_or_default().to_string_lossy();
            if out.join(format!("{stem}.npy")).is_file() {
                rep.skipped += 1;
            } else {
                absent += 1;
            }
        }
    }
    for name in [DETECTOR_ONNX, RECOGNISER_ONNX] {
        if find_model(pretrained_dir, name).is_none() {
            rep.missing
                .push(pretrained_dir.join(name).display().to_string());
        }
    }
    rep.status = StageStatus::NotBuilt;
    rep.error = Some(format!(
        "face embeddings are not computed by this build; {absent} images have no \
         *_face/NAME.npy (training uses zeros for them)"
    ));
    Ok(rep)
}
