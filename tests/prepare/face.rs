//! Face embeddings on real ONNX models: SCRFD from the PyPI sdist `scrfd` 0.3.0 (with its test
//! photos and expected faces) and a 112x112 -> 512 ArcFace-style recogniser from the npm package
//! `faceplugin-face-recognition-js` 0.0.1. They are fetched with pip/npm into a cache under the
//! target folder, never committed; a failed fetch fails the tests.

use crate::common;

use common::face_test_models;
use mcld::data::npy::read_f32 as read_npy_f32;
use mcld::models::face::{
    norm_crop, umeyama_similarity, warp_affine, ArcFace, ArcFaceConfig, Detection, ResizeMode,
    Scrfd, ScrfdConfig, ARCFACE_TEMPLATE, DETECTOR_ONNX, RECOGNISER_ONNX,
};
use mcld::prepare::{run_prepare, PrepareOptions, Stage, StageStatus};

/// The settings of the `scrfd` package's own tests (PIL nearest resize, its thresholds).
fn package_cfg() -> ScrfdConfig {
    ScrfdConfig {
        score_threshold: 0.4,
        nms_threshold: 0.5,
        resize: ResizeMode::Nearest,
        ..ScrfdConfig::default()
    }
}

fn detector(cfg: &ScrfdConfig) -> Scrfd {
    Scrfd::load(&face_test_models().scrfd_dir.join("models/scrfd.onnx"), cfg).unwrap()
}

fn photo(name: &str) -> image::RgbImage {
    image::open(face_test_models().scrfd_dir.join("images").join(name))
        .unwrap()
        .to_rgb8()
}

/// Expected face of a photo from the package's `tests/truth_faces.py`: box corners, five key
/// points (x, y, in its order) and the probability.
fn truth(name: &str) -> (Vec<[f32; 2]>, f32) {
    let text =
        std::fs::read_to_string(face_test_models().scrfd_dir.join("tests/truth_faces.py")).unwrap();
    let start = text
        .find(&format!("\"{name}\""))
        .expect("photo in truth file");
    let rest = &text[start + name.len() + 2..];
    let block = &rest[..rest.find(".png\"").unwrap_or(rest.len())];
    let num = |s: &str| -> f32 {
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        s[..end].parse().unwrap()
    };
    let mut pts = Vec::new();
    for (i, _) in block.match_indices("Point(x=") {
        let x = num(&block[i + 8..]);
        let j = i + block[i..].find("y=").unwrap();
        pts.push([x, num(&block[j + 2..])]);
    }
    let p = block.find("probability=").unwrap();
    (pts, num(&block[p + 12..]))
}

/// The package's truth is the reference value truncated (points to integers, the probability to
/// two decimals), so the reference lies in [t, t + unit). Ours must lie there too, give or take
/// `EPS` units for tract vs onnxruntime rounding (gauss.png's mouth corner is 589.99994).
const EPS: f32 = 1e-3;

fn check_face(name: &str, d: &Detection) {
    let (pts, prob) = truth(name);
    assert_eq!(pts.len(), 7, "{name}: box corners + 5 key points");
    let got: Vec<[f32; 2]> = [[d.bbox[0], d.bbox[1]], [d.bbox[2], d.bbox[3]]]
        .into_iter()
        .chain(d.kps)
        .collect();
    // Distance outside [t, t + 1), in pixels.
    let outside = |v: f32, t: f32, unit: f32| (t - v).max(v - (t + unit)).max(0.0);
    let mut worst = 0f32;
    for (g, t) in got.iter().zip(&pts) {
        for k in 0..2 {
            worst = worst.max(outside(g[k], t[k], 1.0));
        }
    }
    let pw = outside(d.score, prob, 0.01);
    println!("{name}: worst distance outside the truth interval {worst} px, probability {pw}");
    println!("  score {}, points {got:?}", d.score);
    assert!(worst <= EPS, "{name}: got {got:?}, expected {pts:?}");
    assert!(
        pw <= EPS * 0.01,
        "{name}: probability {} vs {prob}",
        d.score
    );
}

#[test]
fn scrfd_matches_package_truth() {
    let det = detector(&package_cfg());
    for name in ["newton.png", "gauss.png"] {
        let faces = det.detect(&photo(name)).unwrap();
        assert_eq!(faces.len(), 1, "{name}: {faces:?}");
        check_face(name, &faces[0]);
    }
}

#[test]
fn scrfd_counts_faces_in_group_photo() {
    let det = detector(&package_cfg());
    let faces = det.detect(&photo("solvay_conference_1927.jpg")).unwrap();
    assert_eq!(faces.len(), 29);
    for f in &faces {
        for p in f.kps {
            assert!(
                f.bbox[0] <= p[0] && p[0] <= f.bbox[2] && f.bbox[1] <= p[1] && p[1] <= f.bbox[3],
                "{f:?}"
            );
        }
    }
}

#[test]
fn umeyama_recovers_a_similarity() {
    let (s, th, tx, ty) = (1.7f32, 0.3f32, 12.0f32, -5.0f32);
    let m = [
        [s * th.cos(), -s * th.sin(), tx],
        [s * th.sin(), s * th.cos(), ty],
    ];
    let src = ARCFACE_TEMPLATE;
    let dst: Vec<[f32; 2]> = src
        .iter()
        .map(|p| {
            [
                m[0][0] * p[0] + m[0][1] * p[1] + m[0][2],
                m[1][0] * p[0] + m[1][1] * p[1] + m[1][2],
            ]
        })
        .collect();
    let got = umeyama_similarity(&src, &dst);
    let mut worst = 0f32;
    for r in 0..2 {
        for c in 0..3 {
            worst = worst.max((got[r][c] - m[r][c]).abs());
        }
    }
    println!("umeyama worst error {worst}");
    assert!(worst < 1e-4, "{got:?} vs {m:?}");
    // Identity warp keeps the picture.
    let img = image::RgbImage::from_fn(112, 112, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let same = warp_affine(&img, &[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 112);
    assert_eq!(same, img);
}

fn crop_of(det: &Scrfd, img: &image::RgbImage) -> image::RgbImage {
    let faces = det.detect(img).unwrap();
    let f = faces
        .iter()
        .max_by(|a, b| a.area().total_cmp(&b.area()))
        .expect("a face");
    norm_crop(img, &f.kps)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn arcface_embeds_the_same_person_closer() {
    let det = detector(&ScrfdConfig::default());
    let rec = ArcFace::load(&face_test_models().recogniser, &ArcFaceConfig::default()).unwrap();
    let newton = photo("newton.png");
    let flipped = image::imageops::flip_horizontal(&newton);
    let e1 = rec.embed(&crop_of(&det, &newton)).unwrap();
    let e2 = rec.embed(&crop_of(&det, &flipped)).unwrap();
    let e3 = rec.embed(&crop_of(&det, &photo("gauss.png"))).unwrap();
    assert_eq!(e1.len(), 512);
    assert!(e1.iter().all(|v| v.is_finite()));
    let (same, other) = (cosine(&e1, &e2), cosine(&e1, &e3));
    println!("cosine newton/flipped {same:.3}, newton/gauss {other:.3}");
    assert!(same > other + 0.1, "same {same} other {other}");
    assert!(rec.embed(&image::RgbImage::new(100, 112)).is_err());
}

#[test]
fn face_stage_end_to_end() {
    let a = face_test_models();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fashion");
    let weights = dir.path().join("pretrained_weights");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::copy(
        a.scrfd_dir.join("models/scrfd.onnx"),
        weights.join(DETECTOR_ONNX),
    )
    .unwrap();
    std::fs::copy(&a.recogniser, weights.join(RECOGNISER_ONNX)).unwrap();
    let train = root.join("train");
    std::fs::create_dir_all(&train).unwrap();
    let face_name = "fashionMENShirts_Polosid0000180202_1front.jpg";
    let blank_name = "fashionMENShirts_Polosid0000180202_4full.jpg";
    let bad_name = "fashionWOMENSkirtsid0000062904_3back.jpg";
    let newton = photo("newton.png");
    newton.save(train.join(face_name)).unwrap();
    image::RgbImage::from_pixel(200, 300, image::Rgb([90, 120, 200]))
        .save(train.join(blank_name))
        .unwrap();
    std::fs::write(train.join(bad_name), b"\xff\xd8\xff garbage").unwrap();

    let mut o = PrepareOptions::new(&root, &weights);
    o.stages = vec![Stage::Face];
    let rep = run_prepare(&o).unwrap();
    let st = rep.stage("face").unwrap();
    assert_eq!(st.status, StageStatus::Partial, "{st:?}");
    assert_eq!(st.done, 1);
    assert_eq!(st.failed.len(), 1);
    assert!(st.failed[0].path.ends_with(bad_name), "{:?}", st.failed);
    assert_eq!(st.missing.len(), 1);
    assert!(st.missing[0].ends_with(blank_name));
    let npy = root
        .join("train_face")
        .join(face_name.replace(".jpg", ".npy"));
    let (shape, v) = read_npy_f32(&npy).unwrap();
    assert_eq!(shape, vec![512]);
    // Same as running the pieces by hand (the JPEG round trip is the stage's input).
    let det = detector(&ScrfdConfig::default());
    let rec = ArcFace::load(&a.recogniser, &ArcFaceConfig::default()).unwrap();
    let jpg = mcld::imageops::open_rgb(&train.join(face_name)).unwrap();
    let direct = rec.embed(&crop_of(&det, &jpg)).unwrap();
    let worst = v
        .iter()
        .zip(&direct)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!("stage vs direct embedding: worst abs error {worst}");
    assert_eq!(v, direct);

    // Resumed: the embedding is kept, only the two others are tried again.
    let rep = run_prepare(&o).unwrap();
    let st = rep.stage("face").unwrap();
    assert_eq!((st.done, st.skipped, st.failed.len()), (0, 1, 1));

    // Without models the stage says which files it wants.
    let mut o2 = PrepareOptions::new(&root, dir.path().join("none"));
    o2.stages = vec![Stage::Face];
    let rep = run_prepare(&o2).unwrap();
    let st = rep.stage("face").unwrap();
    assert_eq!(st.status, StageStatus::Failed);
    assert!(st.missing.iter().any(|m| m.ends_with(DETECTOR_ONNX)));
}
