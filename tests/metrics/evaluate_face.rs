//! Face similarity of `mcld evaluate` on real ONNX stand-ins for buffalo_s: the SCRFD detector of
//! the PyPI sdist `scrfd` 0.3.0 as `det_500m.onnx` and the ArcFace-style recogniser of the npm
//! package `faceplugin-face-recognition-js` 0.0.1 as `w600k_mbf.onnx` (the files
//! tests/prepare_face.rs uses, fetched into the same cache under the target folder; a failed
//! fetch fails the tests). Photos with faces are the `scrfd` package's own.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::face_test_models;
use image::RgbImage;
use mcld::evaluate::{face_similarity, face_status, EvalOptions};
use mcld::metrics::face::{FaceConfig, FaceModels, DETECTOR_ONNX, RECOGNISER_ONNX};

/// A pretrained folder holding the stand-ins under buffalo_s's names.
fn pretrained(root: &Path) -> PathBuf {
    let (det, rec) = (&face_test_models().detector, &face_test_models().recogniser);
    let pre = root.join("pretrained");
    std::fs::create_dir_all(pre.join("buffalo_s")).unwrap();
    std::fs::copy(det, pre.join("buffalo_s").join(DETECTOR_ONNX)).unwrap();
    std::fs::copy(rec, pre.join("buffalo_s").join(RECOGNISER_ONNX)).unwrap();
    pre
}

/// A package photo fitted into a 176x256 grey canvas, like a DeepFashion 256 image.
fn photo(name: &str) -> RgbImage {
    let img = image::open(face_test_models().scrfd_dir.join("images").join(name))
        .unwrap()
        .to_rgb8();
    let (w, h) = img.dimensions();
    let s = (176.0 / w as f64).min(256.0 / h as f64);
    let (nw, nh) = ((w as f64 * s) as u32, (h as f64 * s) as u32);
    let small = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    let mut canvas = RgbImage::from_pixel(176, 256, image::Rgb([128, 128, 128]));
    image::imageops::replace(
        &mut canvas,
        &small,
        ((176 - nw) / 2) as i64,
        ((256 - nh) / 2) as i64,
    );
    canvas
}

fn blank() -> RgbImage {
    RgbImage::from_pixel(176, 256, image::Rgb([90, 120, 200]))
}

/// gen/256/NAME and gt/256/NAME for each (name, generated, ground truth).
fn layout(root: &Path, pairs: &[(&str, &RgbImage, &RgbImage)]) -> EvalOptions {
    for (name, gen, gt) in pairs {
        for (dir, img) in [("gen", gen), ("gt", gt)] {
            let p = root.join(dir).join("256").join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            img.save(&p).unwrap();
        }
    }
    EvalOptions {
        gen_dir: root.join("gen"),
        gt_dir: root.join("gt"),
        training_path: root.join("train"),
        recompute_real_stats: false,
        batch_size: 4,
        progress: false,
        resolutions: vec![("256".into(), (256, 176))],
    }
}

fn models(pre: &Path) -> FaceModels {
    let dir = pre.join("buffalo_s");
    FaceModels::load(
        &dir.join(DETECTOR_ONNX),
        &dir.join(RECOGNISER_ONNX),
        &FaceConfig::default(),
    )
    .unwrap()
}

#[test]
fn face_similarity_identical_different_and_missing() {
    let d = tempfile::tempdir().unwrap();
    let pre = pretrained(d.path());
    let m = models(&pre);
    // The stand-in detector fixes its input at 640x640, which InsightFace keeps over det_size.
    assert_eq!(m.det_hw(), (640, 640));
    let (newton, gauss, empty) = (photo("newton.png"), photo("gauss.png"), blank());
    assert!(
        m.embed_largest(&newton).unwrap().is_some(),
        "newton: no face"
    );
    assert!(m.embed_largest(&gauss).unwrap().is_some(), "gauss: no face");
    assert!(m.embed_largest(&empty).unwrap().is_none());

    let same = face_similarity(
        &layout(&d.path().join("same"), &[("a.png", &newton, &newton)]),
        &m,
        "256",
    )
    .unwrap();
    println!("identical pair: {same:?}");
    assert_eq!((same.pairs, same.pairs_with_faces), (1, 1));
    assert!((same.cosine_similarity - 1.0).abs() <= 1e-5, "{same:?}");
    assert!(same.euclidean_distance.abs() <= 1e-5, "{same:?}");

    let other = face_similarity(
        &layout(&d.path().join("other"), &[("b.png", &gauss, &newton)]),
        &m,
        "256",
    )
    .unwrap();
    println!("different people: {other:?}");
    assert_eq!(other.pairs_with_faces, 1);
    assert!(
        other.cosine_similarity < same.cosine_similarity - 0.1,
        "{other:?}"
    );
    assert!(other.euclidean_distance > 0.1, "{other:?}");

    let missing = face_similarity(
        &layout(
            &d.path().join("missing"),
            &[("c.png", &empty, &newton), ("d.png", &newton, &empty)],
        ),
        &m,
        "256",
    )
    .unwrap();
    println!("one side without a face: {missing:?}");
    assert_eq!(missing.pairs, 2);
    assert_eq!(missing.pairs_with_faces, 0);
    assert_eq!(
        (missing.no_face_generated, missing.no_face_ground_truth),
        (1, 1)
    );
    assert!(missing.cosine_similarity.is_nan());

    // Without the models: a skip message, not an error.
    let none = face_status(
        &layout(&d.path().join("same"), &[]),
        &d.path().join("nothing"),
    )
    .unwrap();
    let status = none["status"].as_str().unwrap();
    assert!(
        status.starts_with("skipped") && status.contains("buffalo_s"),
        "{status}"
    );
}

/// `mcld evaluate` end to end with the face models present: printed lines, metrics.json and
/// metrics.md carry the face figures, averaged over the pairs with a face on both sides.
#[test]
fn evaluate_command_reports_face_similarity() {
    use candle_core::DType;
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let pre = pretrained(root);
    let (newton, gauss, empty) = (photo("newton.png"), photo("gauss.png"), blank());
    let pairs = [
        ("a.png", &newton, &newton),
        ("b.png", &gauss, &newton),
        ("c.png", &empty, &gauss),
    ];
    layout(root, &pairs);
    // The 512 folder and the real set, needed by the other metrics.
    for (name, gen, gt) in &pairs {
        for (dir, img) in [("gen", gen), ("gt", gt), ("train", gt)] {
            let sub = if dir == "train" { "" } else { "512" };
            let p = root.join(dir).join(sub).join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            img.save(&p).unwrap();
        }
    }
    // Metric weights from the shared fixtures, as tests/cli_evaluate.rs provides them.
    let inc = common::load_case("metrics", "inception_fid");
    let name = inc.json["weights_file"]["name"].as_str().unwrap();
    std::os::unix::fs::symlink(
        common::fixture_path(&format!("metrics/weights/{name}")),
        pre.join("inception_v3.safetensors"),
    )
    .unwrap();
    let lp = common::load_case("metrics", "lpips_alex");
    let pick = |pfx: &str| {
        lp.tensors
            .iter()
            .filter(|(k, _)| k.starts_with(pfx))
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    candle_core::safetensors::save(&pick("features."), pre.join("alexnet.safetensors")).unwrap();
    candle_core::safetensors::save(&pick("lin"), pre.join("lpips_alex.safetensors")).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_mcld"))
        .arg("evaluate")
        .arg("--save_path")
        .arg(root.join("gen"))
        .arg("--gt_folder")
        .arg(root.join("gt"))
        .arg("--training_path")
        .arg(root.join("train"))
        .arg("--pretrained_dir")
        .arg(&pre)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(text.contains("Face cosine similarity: "), "{text}");
    assert!(text.contains("Face euclidean distance : "), "{text}");

    // Same figures as the library on the two scored pairs.
    let m = models(&pre);
    let lib = face_similarity(&layout(&root.join("lib"), &pairs[..2]), &m, "256").unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("gen/metrics.json")).unwrap())
            .unwrap();
    let face = &report["face"];
    assert_eq!(face["status"], "computed");
    assert_eq!(face["pairs"], 3);
    assert_eq!(face["pairs_with_faces"], 2);
    assert_eq!(face["no_face_generated"], 1);
    assert_eq!(face["no_face_ground_truth"], 0);
    let cos = face["cosine_similarity"].as_f64().unwrap();
    let dist = face["euclidean_distance"].as_f64().unwrap();
    println!("CLI cosine {cos}, distance {dist}; library {lib:?}");
    assert!((cos - lib.cosine_similarity).abs() <= 1e-9);
    assert!((dist - lib.euclidean_distance).abs() <= 1e-9);
    assert!(cos < 1.0 - 0.05 && cos > -1.0);
    let md = std::fs::read_to_string(root.join("gen/metrics.md")).unwrap();
    assert!(md.contains("face cosine similarity"), "{md}");

    // A broken face model fails the run with its name, after the other metrics are written.
    let det = pre.join("buffalo_s").join(DETECTOR_ONNX);
    std::fs::write(&det, b"not an onnx file").unwrap();
    std::fs::remove_file(root.join("gen/metrics.json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mcld"))
        .arg("evaluate")
        .arg("--save_path")
        .arg(root.join("gen"))
        .arg("--gt_folder")
        .arg(root.join("gt"))
        .arg("--training_path")
        .arg(root.join("train"))
        .arg("--pretrained_dir")
        .arg(&pre)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(DETECTOR_ONNX), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("gen/metrics.json")).unwrap())
            .unwrap();
    let status = report["face"]["status"].as_str().unwrap();
    assert!(
        status.starts_with("failed") && status.contains(DETECTOR_ONNX),
        "{status}"
    );
    assert!(report["results"][0]["ssim"].is_number());
}

/// The detector loader gives an opset-11 `Resize` with empty `scales` and `sizes` computed from
/// `Shape` of another map (how dynamic-shape SCRFD exports upsample in their FPN) real scales:
/// y = x + nearest-upsampled 2x2 max-pool of x, on a graph built here.
#[test]
fn resize_with_dynamic_sizes_runs_at_the_chosen_input() {
    use mcld::metrics::face::plan_for_input;
    use tract_onnx::pb;
    use tract_onnx::prelude::*;

    let attr_ints = |name: &str, v: &[i64]| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    };
    let attr_str = |name: &str, v: &str| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    };
    let empty_const = |out: &str| pb::NodeProto {
        op_type: "Constant".into(),
        name: format!("const_{out}"),
        output: vec![out.into()],
        attribute: vec![pb::AttributeProto {
            name: "value".into(),
            r#type: pb::attribute_proto::AttributeType::Tensor as i32,
            t: Some(pb::TensorProto {
                dims: vec![0],
                data_type: pb::tensor_proto::DataType::Float as i32,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let node =
        |op: &str, ins: &[&str], out: &str, attribute: Vec<pb::AttributeProto>| pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}_{out}"),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            attribute,
            ..Default::default()
        };
    let value_info = |name: &str, dims: &[Option<i64>]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Some(v) => pb::tensor_shape_proto::dimension::Value::DimValue(*v),
                                None => {
                                    pb::tensor_shape_proto::dimension::Value::DimParam("?".into())
                                }
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let proto = pb::ModelProto {
        ir_version: 6,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 11,
        }],
        graph: Some(pb::GraphProto {
            name: "fpn_like".into(),
            node: vec![
                node(
                    "MaxPool",
                    &["x"],
                    "p",
                    vec![
                        attr_ints("kernel_shape", &[2, 2]),
                        attr_ints("strides", &[2, 2]),
                    ],
                ),
                node("Shape", &["x"], "s", vec![]),
                empty_const("roi"),
                empty_const("scales"),
                node(
                    "Resize",
                    &["p", "roi", "scales", "s"],
                    "u",
                    vec![
                        attr_str("mode", "nearest"),
                        attr_str("coordinate_transformation_mode", "asymmetric"),
                        attr_str("nearest_mode", "floor"),
                    ],
                ),
                node("Add", &["x", "u"], "y", vec![]),
            ],
            input: vec![value_info("x", &[Some(1), Some(1), None, None])],
            output: vec![value_info("y", &[Some(1), Some(1), None, None])],
            ..Default::default()
        }),
        ..Default::default()
    };
    // tract by itself does not resize here (the reason for the patch): it fails or differs.
    let x0: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let raw = tract_onnx::onnx()
        .model_for_proto_model(&proto)
        .and_then(|m| m.with_input_fact(0, f32::fact([1, 1, 4, 6]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .and_then(|p| p.run(tvec!(Tensor::from_shape(&[1, 1, 4, 6], &x0)?.into())));
    println!(
        "unpatched tract: {:?}",
        raw.as_ref()
            .map(|o| o[0].shape().to_vec())
            .map_err(|e| e.to_string())
    );
    assert!(raw.is_err() || raw.unwrap()[0].shape() != [1, 1, 4, 6]);
    for (h, w) in [(4usize, 6usize), (8, 4)] {
        let x: Vec<f32> = (0..h * w).map(|i| ((i * 7) % 11) as f32).collect();
        let plan = plan_for_input(Path::new("fpn_like.onnx"), proto.clone(), [1, 1, h, w])
            .unwrap_or_else(|e| panic!("{h}x{w}: {e}"));
        let input = Tensor::from_shape(&[1, 1, h, w], &x).unwrap();
        let out = plan.run(tvec!(input.into())).unwrap();
        let y = out[0].as_slice::<f32>().unwrap();
        assert_eq!(y.len(), h * w);
        let mut worst = 0f32;
        for i in 0..h {
            for j in 0..w {
                let (bi, bj) = (i / 2 * 2, j / 2 * 2);
                let m = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(a, b)| x[(bi + a) * w + bj + b])
                    .fold(f32::MIN, f32::max);
                worst = worst.max((y[i * w + j] - (x[i * w + j] + m)).abs());
            }
        }
        println!("{h}x{w}: worst error {worst}");
        assert_eq!(worst, 0.0);
    }
}

fn face_fixture_dir() -> PathBuf {
    std::env::var_os("MCLD_FACE_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face_similarity")
        })
}

/// Against tests/fixtures/face_similarity (InsightFace 0.7.3's own code on the same stand-ins,
/// evaluate.py's semantics): the chosen face's box and key points, its raw embedding, the pair
/// figures and their means, within the fixture's tolerances (10x the gap between OpenCV's
/// fixed-point sampling and the float sampling used here).
#[test]
fn face_similarity_matches_insightface() {
    let dir = face_fixture_dir();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("face_similarity.json")).unwrap())
            .unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("face_similarity.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tol = |k: &str| json["tolerance"][k].as_f64().expect("tolerance entry");
    let vec = |k: &str| -> Option<Vec<f32>> {
        tensors
            .get(k)
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let d = tempfile::tempdir().unwrap();
    let pre = pretrained(d.path());
    let m = models(&pre);
    let hw = &json["detector"]["input_hw"];
    assert_eq!(
        m.det_hw(),
        (
            hw[0].as_u64().unwrap() as usize,
            hw[1].as_u64().unwrap() as usize
        )
    );

    let mut emb = std::collections::HashMap::new();
    let (mut worst_e, mut worst_k, mut worst_b) = (0f64, 0f64, 0f64);
    for name in json["images"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let img = image::open(dir.join(name)).unwrap().to_rgb8();
        let faces = m.detect(&img).unwrap();
        let largest = faces.iter().max_by(|a, b| a.area().total_cmp(&b.area()));
        let got = m.embed_largest(&img).unwrap();
        let Some(want) = vec(&format!("{name}.embedding")) else {
            assert!(
                largest.is_none() && got.is_none(),
                "{name}: a face where InsightFace has none"
            );
            continue;
        };
        let face = largest.unwrap_or_else(|| panic!("{name}: no face"));
        let got = got.unwrap();
        let max = want.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        let e = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max)
            / max;
        let kps: Vec<f32> = face.kps.iter().flatten().copied().collect();
        let k = kps
            .iter()
            .zip(vec(&format!("{name}.kps")).unwrap())
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        let b = face
            .bbox
            .iter()
            .zip(vec(&format!("{name}.bbox")).unwrap())
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        println!("{name}: embedding {e:.3e} of max, key points {k:.3e} px, box {b:.3e} px");
        worst_e = worst_e.max(e);
        worst_k = worst_k.max(k);
        worst_b = worst_b.max(b);
        emb.insert(name.to_string(), got);
    }
    println!(
        "worst: embedding {worst_e:.3e} (tol {}), key points {worst_k:.3e} (tol {}), box {worst_b:.3e} (tol {})",
        tol("embedding"),
        tol("kps"),
        tol("bbox")
    );
    assert!(worst_e <= tol("embedding"));
    assert!(worst_k <= tol("kps"));
    assert!(worst_b <= tol("bbox"));

    // Per pair, then the means over the whole folder as `evaluate` computes them.
    let pairs = json["pairs"].as_array().unwrap();
    let (mut worst_c, mut worst_d) = (0f64, 0f64);
    let mut files = Vec::new();
    for p in pairs {
        let (g, t) = (
            p["generated"].as_str().unwrap(),
            p["ground_truth"].as_str().unwrap(),
        );
        files.push((
            format!("{}.png", p["name"].as_str().unwrap()),
            image::open(dir.join(g)).unwrap().to_rgb8(),
            image::open(dir.join(t)).unwrap().to_rgb8(),
        ));
        match (emb.get(g), emb.get(t), p["cosine"].as_f64()) {
            (Some(a), Some(b), Some(c)) => {
                let (cos, dist) = mcld::metrics::face::similarity(a, b).unwrap();
                let want_d = p["euclidean"].as_f64().unwrap();
                println!(
                    "pair {}: cosine {cos} vs {c}, distance {dist} vs {want_d}",
                    p["name"]
                );
                worst_c = worst_c.max((cos - c).abs());
                worst_d = worst_d.max((dist - want_d).abs());
            }
            (a, b, c) => assert!(
                c.is_none() && (a.is_none() || b.is_none()),
                "pair {}: face presence differs from InsightFace",
                p["name"]
            ),
        }
    }
    let refs: Vec<(&str, &RgbImage, &RgbImage)> =
        files.iter().map(|(n, g, t)| (n.as_str(), g, t)).collect();
    let r = face_similarity(&layout(&d.path().join("eval"), &refs), &m, "256").unwrap();
    let (mc, md) = (
        json["mean_cosine"].as_f64().unwrap(),
        json["mean_euclidean"].as_f64().unwrap(),
    );
    println!(
        "means: cosine {} vs {mc}, distance {} vs {md}",
        r.cosine_similarity, r.euclidean_distance
    );
    worst_c = worst_c.max((r.cosine_similarity - mc).abs());
    worst_d = worst_d.max((r.euclidean_distance - md).abs());
    println!(
        "worst: cosine {worst_c:.3e} (tol {}), distance {worst_d:.3e} (tol {})",
        tol("cosine"),
        tol("distance")
    );
    assert_eq!(
        r.pairs_with_faces as u64,
        json["pairs_with_faces"].as_u64().unwrap()
    );
    assert!(worst_c <= tol("cosine"));
    assert!(worst_d <= tol("distance"));
}
