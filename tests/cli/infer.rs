//! `mcld infer` without `--texture` / `--face`: the texture map is computed from the source with
//! DensePose (the fixture's detectron2 pickle and config placed as a pretrained folder) and
//! written beside the output; without the DensePose weights the error names the missing file,
//! where to get it and the flag that takes a precomputed texture instead.

use crate::common;

use std::path::Path;

use mcld::presets::tree::write_tiny_layout;

use common::run_mcld as run;

fn infer_args<'a>(
    source: &'a str,
    pose: &'a str,
    out: &'a str,
    pretrained: &'a str,
    ckpt: &'a str,
    cfg: &'a str,
) -> Vec<&'a str> {
    vec![
        "infer",
        "--source",
        source,
        "--pose",
        pose,
        "--out",
        out,
        "--pretrained_dir",
        pretrained,
        "--ckpt_dir",
        ckpt,
        "--config_path",
        cfg,
    ]
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// The on-disk IUV (R = V, G = U, B = I) against the DensePose fixture's `output.iuv`
/// ([I, U, V]), allowing differences only where the fixture flags them as possible flips.
fn check_iuv_against_fixture(got: &image::RgbImage) {
    let case = common::load_case("densepose", "densepose_rcnn");
    let b = case.f32("output.instances.pred_boxes").get(0).unwrap();
    let b: Vec<f32> = b.to_vec1().unwrap();
    // On disk R = V, G = U, B = I; the fixture holds [I, U, V].
    let iuv: Vec<u8> = got.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
    let (bad, allowed) = common::iuv_flip_differences(&case, &iuv, &[b[0], b[1], b[2], b[3]]);
    println!("source IUV: {bad} disallowed differences, {allowed} allowed (may-flip)");
    assert_eq!(bad, 0, "the IUV infer computed differs from the fixture's");
}

#[test]
fn infer_computes_the_texture_with_densepose() {
    let d = tempfile::tempdir().unwrap();
    let tiny = write_tiny_layout(&d.path().join("w"), &d.path().join("data"), 1).unwrap();
    let pre = d.path().join("pretrained");
    std::fs::create_dir_all(&pre).unwrap();
    std::fs::copy(
        common::fixture_path("densepose/densepose_weights.pkl"),
        pre.join("model_final_844d15.pkl"),
    )
    .unwrap();
    std::fs::copy(
        common::fixture_path("densepose/densepose_rcnn.json"),
        pre.join("densepose_rcnn.json"),
    )
    .unwrap();
    let source = common::fixture_path("densepose/input.png");
    let photo = rgb(&source);
    let pose = d.path().join("pose.png");
    mcld::pipeline::demo::synthetic_pose(photo.width(), photo.height(), true)
        .save(&pose)
        .unwrap();
    let out = d.path().join("out.png");
    let (ok, text) = run(&infer_args(
        source.to_str().unwrap(),
        pose.to_str().unwrap(),
        out.to_str().unwrap(),
        pre.to_str().unwrap(),
        tiny.ckpt_dir.to_str().unwrap(),
        tiny.config_path.to_str().unwrap(),
    ));
    assert!(ok, "{text}");
    println!("{text}");
    assert_eq!(rgb(&out).dimensions(), (512, 512));
    // No face models in the folder: a zero embedding, saying which files are missing.
    assert!(
        text.contains("glintr100.onnx") && text.contains("--face"),
        "{text}"
    );

    // The IUV it computed is the reference's (exact except where the fixture marks a label or
    // a U/V truncation as within rounding of a tie), and the texture is the one built from it.
    let iuv = rgb(&d.path().join("out_source_iuv.png"));
    check_iuv_against_fixture(&iuv);
    let assets = mcld::person::texture::TextureAssets::builtin().unwrap();
    let want_tex = mcld::person::texture::texture_map(&photo, &iuv, &assets).unwrap();
    assert_eq!(rgb(&d.path().join("out_texture.png")), want_tex);

    // --save-texture puts it elsewhere.
    let tex2 = d.path().join("elsewhere/tex.png");
    std::fs::create_dir_all(tex2.parent().unwrap()).unwrap();
    let mut args = infer_args(
        source.to_str().unwrap(),
        pose.to_str().unwrap(),
        out.to_str().unwrap(),
        pre.to_str().unwrap(),
        tiny.ckpt_dir.to_str().unwrap(),
        tiny.config_path.to_str().unwrap(),
    );
    args.extend(["--save-texture", tex2.to_str().unwrap()]);
    let (ok, text) = run(&args);
    assert!(ok, "{text}");
    assert_eq!(rgb(&tex2), want_tex);
}

#[test]
fn infer_without_densepose_says_what_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let tiny = write_tiny_layout(&d.path().join("w"), &d.path().join("data"), 1).unwrap();
    let pre = d.path().join("empty");
    std::fs::create_dir_all(&pre).unwrap();
    let source = common::fixture_path("densepose/input.png");
    let out = d.path().join("out.png");
    let (ok, text) = run(&infer_args(
        source.to_str().unwrap(),
        source.to_str().unwrap(),
        out.to_str().unwrap(),
        pre.to_str().unwrap(),
        tiny.ckpt_dir.to_str().unwrap(),
        tiny.config_path.to_str().unwrap(),
    ));
    assert!(!ok, "{text}");
    for want in [
        "model_final_844d15.pkl",
        "dl.fbaipublicfiles.com",
        "--texture",
        "--pretrained_dir",
    ] {
        assert!(text.contains(want), "{want:?} not in: {text}");
    }
    assert!(!out.exists());
}

#[test]
fn infer_computes_the_face_embedding() {
    let d = tempfile::tempdir().unwrap();
    let tiny = write_tiny_layout(&d.path().join("w"), &d.path().join("data"), 1).unwrap();
    let m = common::face_test_models();
    let (det, rec, photo_path) = (
        m.detector.clone(),
        m.recogniser.clone(),
        m.scrfd_dir.join("images/newton.png"),
    );
    let pre = d.path().join("pretrained");
    std::fs::create_dir_all(pre.join("antelopev2")).unwrap();
    std::fs::copy(&det, pre.join("antelopev2/scrfd_10g_bnkps.onnx")).unwrap();
    std::fs::copy(&rec, pre.join("antelopev2/glintr100.onnx")).unwrap();
    let photo = rgb(&photo_path);
    let pose = d.path().join("pose.png");
    mcld::pipeline::demo::synthetic_pose(photo.width(), photo.height(), true)
        .save(&pose)
        .unwrap();
    let texture = d.path().join("texture.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([120, 80, 40]))
        .save(&texture)
        .unwrap();

    // The embedding infer would use, computed here and handed over as a file.
    let emb = mcld::models::face::FaceEmbedder::load(&det, &rec)
        .unwrap()
        .embed_largest(&photo)
        .unwrap()
        .expect("the test photo has a face");
    let npy = d.path().join("face.npy");
    mcld::data::npy::write_f32(&npy, &[emb.len()], &emb).unwrap();

    let zeros = d.path().join("zeros.npy");
    mcld::data::npy::write_f32(&zeros, &[512], &[0.0; 512]).unwrap();

    let outs = [
        d.path().join("computed.png"),
        d.path().join("given.png"),
        d.path().join("zeros.png"),
    ];
    for (i, out) in outs.iter().enumerate() {
        let mut args = infer_args(
            photo_path.to_str().unwrap(),
            pose.to_str().unwrap(),
            out.to_str().unwrap(),
            pre.to_str().unwrap(),
            tiny.ckpt_dir.to_str().unwrap(),
            tiny.config_path.to_str().unwrap(),
        );
        args.extend(["--texture", texture.to_str().unwrap()]);
        match i {
            1 => args.extend(["--face", npy.to_str().unwrap()]),
            2 => args.extend(["--face", zeros.to_str().unwrap()]),
            _ => {}
        }
        let (ok, text) = run(&args);
        assert!(ok, "{text}");
        if i == 0 {
            assert!(
                text.contains("computed the source's face embedding"),
                "{text}"
            );
        }
    }
    // Same seed, same weights: the computed embedding is the one given explicitly.
    assert_eq!(rgb(&outs[0]), rgb(&outs[1]));
    // ... and the face does reach the output (a zero embedding gives another image).
    assert_ne!(rgb(&outs[0]), rgb(&outs[2]));
}

/// The tiny layout and a pretrained folder holding the DensePose fixture.
fn densepose_setup(d: &Path) -> (mcld::presets::tree::TinyLayout, std::path::PathBuf) {
    let tiny = write_tiny_layout(&d.join("w"), &d.join("data"), 1).unwrap();
    let pre = d.join("pretrained");
    std::fs::create_dir_all(&pre).unwrap();
    std::fs::copy(
        common::fixture_path("densepose/densepose_weights.pkl"),
        pre.join("model_final_844d15.pkl"),
    )
    .unwrap();
    std::fs::copy(
        common::fixture_path("densepose/densepose_rcnn.json"),
        pre.join("densepose_rcnn.json"),
    )
    .unwrap();
    (tiny, pre)
}

#[test]
fn several_poses_from_iuv_images_and_photos_in_one_run() {
    use mcld::imageops::grid::{GridLayout, MIN_CELL};
    let d = tempfile::tempdir().unwrap();
    let (tiny, pre) = densepose_setup(d.path());
    let source = common::fixture_path("densepose/input.png");
    let photo = rgb(&source);
    let pose = d.path().join("pose.png");
    mcld::pipeline::demo::synthetic_pose(photo.width(), photo.height(), true)
        .save(&pose)
        .unwrap();
    let common_args = |out: &Path| {
        let mut v = infer_args(
            source.to_str().unwrap(),
            pose.to_str().unwrap(),
            out.to_str().unwrap(),
            pre.to_str().unwrap(),
            tiny.ckpt_dir.to_str().unwrap(),
            tiny.config_path.to_str().unwrap(),
        )
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        v.extend([
            "--texture".into(),
            d.path().join("tex.png").display().to_string(),
        ]);
        v
    };
    // A texture given, so DensePose runs only for the target photo.
    mcld::pipeline::demo::synthetic_pose(64, 64, false)
        .save(d.path().join("tex.png"))
        .unwrap();

    // One pose: OUT.png and its one-row sheet.
    let single = d.path().join("single.png");
    let args = common_args(&single);
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    let sheet = |out: &str, rows| {
        let img = rgb(&d.path().join(format!("{out}_sheet.png")));
        let l = GridLayout {
            columns: 4,
            rows,
            cell: MIN_CELL,
        };
        assert_eq!(img.dimensions(), l.size());
    };
    sheet("single", 1);

    // The IUV again, then a photo of the pose wanted, with an animation.
    let out = d.path().join("multi.png");
    let gif = d.path().join("multi.gif");
    let mut args = common_args(&out);
    args.extend([
        "--pose-from".into(),
        source.display().to_string(),
        "--gif".into(),
        gif.display().to_string(),
    ]);
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    assert!(text.contains("for 2 pose(s)"), "{text}");
    assert!(!out.exists());
    let first = rgb(&d.path().join("multi_0.png"));
    let second = rgb(&d.path().join("multi_1.png"));
    assert_eq!(first.dimensions(), (512, 512));
    // The same seed for every pose: the first equals the single-pose run on the same pose.
    assert_eq!(first, rgb(&single));
    assert_ne!(first, second);
    // DensePose's IUV of the target photo is kept beside its output, and is the reference's.
    check_iuv_against_fixture(&rgb(&d.path().join("multi_1_target_iuv.png")));
    sheet("multi", 2);
    let frames = image::AnimationDecoder::into_frames(
        image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&gif).unwrap(),
        ))
        .unwrap(),
    )
    .collect_frames()
    .unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].buffer().dimensions(), (512, 512));

    // The computed IUV reused as --pose gives the same image as --pose-from did.
    let again = d.path().join("again.png");
    let mut args = common_args(&again);
    let i = args.iter().position(|a| a == "--pose").unwrap();
    args[i + 1] = d
        .path()
        .join("multi_1_target_iuv.png")
        .display()
        .to_string();
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    assert_eq!(rgb(&again), second);

    // A photo in which DensePose finds nobody (its detector made to keep no box): an error
    // naming the photo, and no output.
    let blind = d.path().join("blind");
    std::fs::create_dir_all(&blind).unwrap();
    std::fs::copy(
        pre.join("model_final_844d15.pkl"),
        blind.join("model_final_844d15.pkl"),
    )
    .unwrap();
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pre.join("densepose_rcnn.json")).unwrap())
            .unwrap();
    j["config"]["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = serde_json::json!(1.5);
    std::fs::write(blind.join("densepose_rcnn.json"), j.to_string()).unwrap();
    let none = d.path().join("none.png");
    let mut args = common_args(&none);
    let i = args.iter().position(|a| a == "--pretrained_dir").unwrap();
    args[i + 1] = blind.display().to_string();
    args.extend(["--pose-from".into(), source.display().to_string()]);
    let (ok, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "{text}");
    assert!(
        text.contains("input.png") && text.contains("no person"),
        "{text}"
    );
    assert!(!d.path().join("none_0.png").exists());
}

#[test]
fn a_pose_folder_sorts_iuv_images_from_photos() {
    use mcld::pipeline::infer::{looks_like_iuv, poses_in_dir, PoseSpec};
    let d = tempfile::tempdir().unwrap();
    let iuv = mcld::pipeline::demo::synthetic_pose(80, 120, true);
    assert!(looks_like_iuv(&iuv));
    let photo = rgb(&common::fixture_path("densepose/input.png"));
    assert!(!looks_like_iuv(&photo));
    assert!(!looks_like_iuv(&image::RgbImage::new(8, 8)));
    iuv.save(d.path().join("b_pose.png")).unwrap();
    photo.save(d.path().join("a_photo.jpg")).unwrap();
    std::fs::write(d.path().join("notes.txt"), "not an image").unwrap();
    let got = poses_in_dir(d.path()).unwrap();
    assert_eq!(
        got,
        vec![
            PoseSpec::Photo(d.path().join("a_photo.jpg")),
            PoseSpec::Iuv(d.path().join("b_pose.png")),
        ]
    );
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = poses_in_dir(&empty).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("no .png"), "{e}");
}
