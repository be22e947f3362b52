//! `mcld prepare --only densepose` end to end on the DensePose fixture (shared/fixtures/densepose):
//! the real binary, the fixture photo as a training photo, the fixture config as a YAML file and
//! the fixture weights as a detectron2 `.pkl`. Also resume, a corrupt photo, no-person photos,
//! missing weights, and batched backbone passes.
//!
//! The photo is the fixture's `input.png` saved under a `.jpg` name: the stage lists `*.jpg`
//! like every other stage, and decoders go by the bytes, so the PNG decodes losslessly.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_path, load_case, Case};
use mcld::models::densepose::iuv::{box_xywh_int, Image3};
use mcld::models::densepose::WEIGHTS_URL;
use mcld::prepare::densepose::{self as stage, DenseposeOptions, NO_PERSON_FILE};
use mcld::prepare::{PrepareReport, StageStatus};
use mcld::rank::Shard;

const GROUP: &str = "densepose";
const CASE: &str = "densepose_rcnn";
const PHOTO: &str = "fashionWOMENDressesid0000000101_1front.jpg";

/// A dataset root with `train/PHOTO` (the fixture photo) and the fixture config as YAML.
fn dataset(case: &Case) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train");
    std::fs::create_dir_all(&train).unwrap();
    std::fs::copy(
        fixture_path(&format!("{GROUP}/input.png")),
        train.join(PHOTO),
    )
    .unwrap();
    let cfg = dir.path().join("densepose_fixture.yaml");
    write_config(case, &cfg, None);
    (dir, cfg)
}

/// The fixture's merged config as a YAML file, optionally with ROI_HEADS.SCORE_THRESH_TEST set.
fn write_config(case: &Case, path: &Path, score_thresh: Option<f64>) {
    let mut cfg = case.json["config"].clone();
    if let Some(t) = score_thresh {
        cfg["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = serde_json::json!(t);
    }
    std::fs::write(path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
}

/// `mcld prepare` on the test device; `MCLD_TEST_BIN` names the binary where this test runs
/// away from its build tree (scripts/gpu-run.sh on the GPU machine).
fn mcld_prepare(root: &Path, extra: &[&str]) -> std::process::Output {
    let bin =
        std::env::var_os("MCLD_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mcld").into());
    let mut cmd = Command::new(bin);
    cmd.args(["prepare", "--only", "densepose", "--dataset_root"])
        .arg(root)
        .arg("--pretrained_dir")
        .arg(root.join("pretrained_weights"))
        .args(extra);
    if let Ok(d) = std::env::var("MCLD_TEST_DEVICE") {
        cmd.args(["--device", &d]);
    }
    cmd.output().unwrap()
}

fn report(root: &Path) -> mcld::prepare::StageReport {
    let text = std::fs::read_to_string(root.join("prepare_report.json")).unwrap();
    let rep: PrepareReport = serde_json::from_str(&text).unwrap();
    rep.stage("densepose").expect("densepose stage").clone()
}

fn weights_pkl() -> String {
    fixture_path(&format!("{GROUP}/densepose_weights.pkl"))
        .display()
        .to_string()
}

fn iuv_path(root: &Path, photo: &str) -> PathBuf {
    root.join("train_densepose")
        .join(photo.replace(".jpg", ".png"))
}

/// Our PNG against the reference's `densepose_iuv.png`, pixel by pixel (decoded, R=V G=U B=I).
/// Differences are allowed only where the fixture marks a near tie ("may flip"); returns the
/// number of differing pixels.
fn compare_with_reference(case: &Case, ours_path: &Path) -> usize {
    let ours = image::open(ours_path).unwrap().to_rgb8();
    let theirs = image::open(fixture_path(&format!("{GROUP}/densepose_iuv.png")))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions(), "IUV PNG size");
    let (w, h) = ours.dimensions();
    let lf = case.get("output.chart.label_may_flip");
    let (ch, cw) = lf.dims2().unwrap();
    let lf = lf.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let uvf = case
        .get("output.chart.uv255_may_flip")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let b = case
        .f32("output.instances.pred_boxes")
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (bx, by, _, _) = box_xywh_int(&[b[0], b[1], b[2], b[3]]);
    let may_flip_pixels = (0..ch * cw)
        .filter(|&p| lf[p] == 1 || uvf[p] == 1 || uvf[ch * cw + p] == 1)
        .count();
    let (mut differing, mut disallowed) = (0usize, 0usize);
    let mut worst = 0i32;
    let mut examples = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let o = ours.get_pixel(x, y).0;
            let t = theirs.get_pixel(x, y).0;
            if o == t {
                continue;
            }
            differing += 1;
            let (r, c) = (y as i64 - by, x as i64 - bx);
            let inside = r >= 0 && c >= 0 && (r as usize) < ch && (c as usize) < cw;
            // On disk: channel 0 = V, 1 = U, 2 = I.
            let ok = inside && {
                let p = r as usize * cw + c as usize;
                lf[p] == 1
                    || (o[2] == t[2]
                        && [(0usize, 1usize), (1, 0)].iter().all(|&(k, uvk)| {
                            o[k] == t[k]
                                || (uvf[uvk * ch * cw + p] == 1
                                    && (o[k] as i32 - t[k] as i32).abs() <= 1)
                        }))
            };
            if !ok {
                disallowed += 1;
            }
            for k in 0..3 {
                worst = worst.max((o[k] as i32 - t[k] as i32).abs());
            }
            if examples.len() < 5 {
                examples.push(format!("({x},{y}) ours VUI {o:?} ref {t:?}"));
            }
        }
    }
    println!(
        "IUV PNG vs densepose_iuv.png: {differing} differing pixels (worst channel diff {worst}), \
         {disallowed} outside the may-flip masks; {may_flip_pixels} may-flip pixels; e.g. {}",
        examples.join(", ")
    );
    assert_eq!(disallowed, 0, "IUV differs where it must be exact");
    assert!(
        differing <= may_flip_pixels,
        "more differing pixels ({differing}) than may-flip pixels ({may_flip_pixels})"
    );
    differing
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn prepare_densepose_writes_the_reference_iuv_and_resumes() {
    let case = load_case(GROUP, CASE);
    let (dir, cfg) = dataset(&case);
    let root = dir.path();
    // A corrupt photo next to the good one: it fails alone, the run goes on.
    std::fs::write(
        root.join("train").join("zz_corrupt.jpg"),
        b"\xff\xd8 not a jpeg",
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let w = weights_pkl();
    let args = ["--densepose-config", &cfg_s, "--densepose-weights", &w];
    let out = mcld_prepare(root, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed photo must fail the run");
    let rep = report(root);
    println!("first run: {rep:?}");
    assert_eq!(rep.status, StageStatus::Partial, "{stderr}");
    assert_eq!(rep.done, 1);
    assert_eq!(rep.failed.len(), 1);
    assert!(rep.failed[0].path.ends_with("zz_corrupt.jpg"), "{rep:?}");
    assert!(rep.failed[0].reason.contains("decode"), "{rep:?}");
    assert!(!iuv_path(root, "zz_corrupt.jpg").exists());
    let png = iuv_path(root, PHOTO);
    compare_with_reference(&case, &png);

    // Resume: nothing recomputed, the PNG untouched (bytes and modification time).
    std::fs::remove_file(root.join("train").join("zz_corrupt.jpg")).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    let t0 = mtime(&png);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = mcld_prepare(root, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = report(root);
    assert_eq!(
        (rep.done, rep.skipped, rep.failed.len()),
        (0, 1, 0),
        "{rep:?}"
    );
    assert_eq!(std::fs::read(&png).unwrap(), bytes);
    assert_eq!(mtime(&png), t0);
    // No temp files left behind.
    let names: Vec<String> = std::fs::read_dir(root.join("train_densepose"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![PHOTO.replace(".jpg", ".png")]);
}

#[test]
fn missing_weights_say_where_to_get_them() {
    let case = load_case(GROUP, CASE);
    let (dir, cfg) = dataset(&case);
    let root = dir.path();
    let cfg_s = cfg.display().to_string();
    let out = mcld_prepare(root, &["--densepose-config", &cfg_s]);
    assert!(!out.status.success());
    let rep = report(root);
    assert_eq!(rep.status, StageStatus::Failed);
    let e = rep.error.clone().unwrap();
    println!("{e}");
    let expected = root
        .join("pretrained_weights")
        .join("model_final_844d15.pkl");
    assert!(e.contains(&expected.display().to_string()), "{e}");
    assert!(e.contains(WEIGHTS_URL), "{e}");
    assert!(e.contains("--densepose-weights"), "{e}");
    assert_eq!(
        rep.missing,
        vec![iuv_path(root, PHOTO).display().to_string()]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(WEIGHTS_URL), "{stderr}");
    assert!(!root
        .join("train_densepose")
        .join(PHOTO.replace(".jpg", ".png"))
        .exists());
}

/// A score threshold nobody reaches stands in for a photo without a person: recorded, no PNG,
/// and the next run does not look at it again until the list is deleted.
#[test]
fn no_person_photos_are_recorded_and_skipped() {
    let case = load_case(GROUP, CASE);
    let (dir, _) = dataset(&case);
    let root = dir.path();
    let cfg = root.join("nobody.yaml");
    write_config(&case, &cfg, Some(0.999));
    let cfg_s = cfg.display().to_string();
    let w = weights_pkl();
    let args = ["--densepose-config", &cfg_s, "--densepose-weights", &w];
    let out = mcld_prepare(root, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = report(root);
    println!("{rep:?}");
    assert_eq!((rep.done, rep.skipped, rep.failed.len()), (0, 0, 0));
    assert!(rep
        .notes
        .iter()
        .any(|n| n.contains("no person") && n.contains(PHOTO)));
    let list = root.join("train_densepose").join(NO_PERSON_FILE);
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        format!("{PHOTO}\n")
    );
    assert!(!iuv_path(root, PHOTO).exists());
    // Second run: skipped without the model (even with the weights gone).
    let out = mcld_prepare(
        root,
        &[
            "--densepose-config",
            &cfg_s,
            "--densepose-weights",
            "/nonexistent.pkl",
        ],
    );
    assert!(out.status.success());
    let rep = report(root);
    assert_eq!((rep.done, rep.skipped), (0, 1), "{rep:?}");
    // Deleting the list retries the photo (here with the normal threshold: a person is found).
    std::fs::remove_file(&list).unwrap();
    let cfg2 = root.join("normal.yaml");
    write_config(&case, &cfg2, None);
    let cfg2_s = cfg2.display().to_string();
    let out = mcld_prepare(
        root,
        &["--densepose-config", &cfg2_s, "--densepose-weights", &w],
    );
    assert!(out.status.success());
    assert_eq!(report(root).done, 1);
    assert!(iuv_path(root, PHOTO).exists());
}

/// Same-size photos sharing a backbone pass give the same PNG as one at a time (library API,
/// the safetensors copy of the weights, batch 2 on three photos: one pair and one single).
#[test]
fn batched_backbone_passes_match_single_ones() {
    let case = load_case(GROUP, CASE);
    let (dir, cfg) = dataset(&case);
    let root = dir.path();
    for extra in ["b_copy.jpg", "c_copy.jpg"] {
        std::fs::copy(
            root.join("train").join(PHOTO),
            root.join("train").join(extra),
        )
        .unwrap();
    }
    let opts = DenseposeOptions {
        config: Some(cfg.clone()),
        weights: case.safetensors_path.clone(),
        device: common::device(),
        dtype: candle_core::DType::F32,
        batch: Some(2),
        shard: Shard::whole(),
    };
    let t0 = std::time::Instant::now();
    let rep = stage::run_stage(root, &opts, &indicatif::ProgressBar::hidden()).unwrap();
    println!("3 photos, batch 2: {:.2?}; {rep:?}", t0.elapsed());
    assert_eq!((rep.done, rep.failed.len()), (3, 0), "{rep:?}");
    // One photo alone, in process.
    let (c, _) = mcld::models::densepose::load_config(Some(&cfg)).unwrap();
    let model =
        mcld::models::densepose::load_model(&c, &case.safetensors_path, &common::device()).unwrap();
    let img = Image3::read_bgr(&root.join("train").join(PHOTO)).unwrap();
    let single = model.iuv(&img).unwrap().unwrap();
    let tmp = root.join("single.png");
    mcld::models::densepose::iuv::save_iuv_png(&single, img.h, img.w, &tmp).unwrap();
    let single_px = image::open(&tmp).unwrap().to_rgb8().into_raw();
    for name in [PHOTO, "b_copy.jpg", "c_copy.jpg"] {
        let px = image::open(iuv_path(root, name))
            .unwrap()
            .to_rgb8()
            .into_raw();
        let diff = px.iter().zip(&single_px).filter(|(a, b)| a != b).count();
        println!("{name}: {diff} bytes differ from the single-photo pass");
        assert_eq!(diff, 0, "{name}");
    }
    compare_with_reference(&case, &iuv_path(root, "b_copy.jpg"));
    // Mixed sizes in one call: grouped by padded size, each as if alone.
    let (h, w) = (301usize, 457usize);
    let data: Vec<u8> = (0..h * w * 3).map(|i| ((i * 7919) % 256) as u8).collect();
    let other = Image3::new(h, w, data).unwrap();
    let batch = model.iuv_batch(&[&img, &other, &img]).unwrap();
    assert_eq!(batch[0].as_ref(), Some(&single));
    assert_eq!(batch[2].as_ref(), Some(&single));
    assert_eq!(batch[1], model.iuv(&other).unwrap());
}

/// A config that cannot be read stops the stage before any weight loads, naming the file, and
/// the shipped YAML and its compiled-in copy agree.
#[test]
fn bad_config_is_named_and_builtin_config_matches_the_file() {
    let case = load_case(GROUP, CASE);
    let (dir, _) = dataset(&case);
    let root = dir.path();
    let bad = root.join("broken.yaml");
    std::fs::write(&bad, "MODEL: [unclosed").unwrap();
    let opts = DenseposeOptions {
        config: Some(bad.clone()),
        weights: root.join("none.pkl"),
        device: common::device(),
        dtype: candle_core::DType::F32,
        batch: None,
        shard: Shard::whole(),
    };
    let rep = stage::run_stage(root, &opts, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(rep.status, StageStatus::Failed);
    let e = rep.error.unwrap();
    println!("{e}");
    assert!(e.contains(&bad.display().to_string()), "{e}");
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(mcld::models::densepose::DEFAULT_CONFIG);
    let from_file = mcld::models::densepose::Config::from_yaml_file(&shipped).unwrap();
    let builtin = mcld::models::densepose::Config::builtin_r101_dl().unwrap();
    assert_eq!(format!("{from_file:?}"), format!("{builtin:?}"));
    assert_eq!(builtin.model.resnets.depth, 101);
}

/// `mcld bench densepose` runs the whole path and prints its figures (here on the fixture's
/// shrunk config so that it is quick; the real figure comes from the shipped R-101 config).
#[test]
fn bench_densepose_prints_figures() {
    let case = load_case(GROUP, CASE);
    let (dir, cfg) = dataset(&case);
    let out = Command::new(env!("CARGO_BIN_EXE_mcld"))
        .args([
            "bench",
            "densepose",
            "--images",
            "1",
            "--batch",
            "2",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    for want in [
        "images/s",
        "ResNet+FPN",
        "RPN",
        "box head",
        "DensePose head",
        "peak RSS",
        "batched path",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    drop(dir);
}

/// Two shards that find nobody in their photos each keep their own no-person list (so shards
/// running at once never rewrite each other's), and an unsharded run reads both lists: it
/// skips both photos without building the model.
#[test]
fn sharded_runs_keep_their_own_no_person_lists() {
    let case = load_case(GROUP, CASE);
    let (dir, _) = dataset(&case);
    let root = dir.path();
    let shards = [Shard::new(0, 2).unwrap(), Shard::new(1, 2).unwrap()];
    // A second photo that falls in the other shard than PHOTO.
    let theirs = shards
        .iter()
        .position(|s| s.owns_name(PHOTO))
        .map(|k| 1 - k)
        .unwrap();
    let other = (0..100)
        .map(|i| format!("fashionWOMENDressesid{i:08}01_2side.jpg"))
        .find(|n| shards[theirs].owns_name(n))
        .unwrap();
    std::fs::copy(
        root.join("train").join(PHOTO),
        root.join("train").join(&other),
    )
    .unwrap();
    let cfg = root.join("nobody.yaml");
    write_config(&case, &cfg, Some(0.999));
    let opts = |weights: PathBuf, shard: Shard| DenseposeOptions {
        config: Some(cfg.clone()),
        weights,
        device: common::device(),
        dtype: candle_core::DType::F32,
        batch: None,
        shard,
    };
    let bar = indicatif::ProgressBar::hidden();
    for s in shards {
        let rep = stage::run_stage(root, &opts(case.safetensors_path.clone(), s), &bar).unwrap();
        assert_eq!(
            (rep.done, rep.skipped, rep.failed.len()),
            (0, 0, 0),
            "{rep:?}"
        );
        let mine = if s.owns_name(PHOTO) {
            PHOTO
        } else {
            other.as_str()
        };
        let list = root
            .join("train_densepose")
            .join(format!("no_person.shard-{}-of-2.txt", s.index));
        assert_eq!(std::fs::read_to_string(&list).unwrap(), format!("{mine}\n"));
    }
    assert!(!root.join("train_densepose").join(NO_PERSON_FILE).exists());
    let rep = stage::run_stage(root, &opts(root.join("none.pkl"), Shard::whole()), &bar).unwrap();
    assert_eq!(
        (rep.done, rep.skipped, rep.status),
        (0, 2, StageStatus::Ok),
        "{rep:?}"
    );
}
