//! `mcld edit`: the texture composition checked texel by texel against the Atlas2Normal table
//! read here on its own, then the command end to end on tiny random weights (no edit and an
//! identity swap give `infer`'s image bit for bit; garment swaps write the texture the test
//! composes itself; CLIP's photo input changes the output) and every bad input's message.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use mcld::edit::compose::{compose_region, Region, TexelParts};
use mcld::presets::tree::{write_tiny_layout, TinyLayout};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::common::run_mcld as run;

const N: u32 = 512;

/// The regions as the issue states them, written out here rather than taken from the code.
fn expected_parts(r: Region) -> Vec<u8> {
    let upper: Vec<u8> = [1, 2].into_iter().chain(15..=22).collect();
    let lower: Vec<u8> = (7..=14).collect();
    match r {
        Region::Head => vec![23, 24],
        Region::Upper => upper,
        Region::Lower => lower,
        Region::Hands => vec![3, 4],
        Region::Feet => vec![5, 6],
        Region::Outfit => upper.into_iter().chain(lower).collect(),
    }
}

/// DensePose part (1..=24, 0 = none) per texel, read straight from the table's file.
fn table_parts() -> Vec<u8> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/uv_atlas2normal_200_512.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("src_part").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I8);
    assert_eq!(t.shape(), [512, 512]);
    t.data()
        .iter()
        .map(|&b| {
            let p = b as i8;
            if p < 0 {
                0
            } else {
                p as u8 + 1
            }
        })
        .collect()
}

/// A texture with every texel non-empty.
fn full_texture(seed: u64) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    RgbImage::from_fn(N, N, |_, _| {
        Rgb([rng.random_range(1..=255), rng.random(), rng.random()])
    })
}

/// A donor texture with about a third of its texels empty (all zero) and some texels with
/// zero channels that are not empty.
fn holey_texture(seed: u64) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    RgbImage::from_fn(N, N, |_, _| match rng.random_range(0..6) {
        0 | 1 => Rgb([0, 0, 0]),
        2 => Rgb([0, 0, rng.random_range(1..=255)]),
        _ => Rgb([rng.random(), rng.random(), rng.random()]),
    })
}

/// The composition as the issue states it, texel by texel.
fn expected_composition(
    src: &RgbImage,
    donor: &RgbImage,
    parts: &[u8],
    region: &[u8],
) -> (RgbImage, usize, usize) {
    let mut out = src.clone();
    let (mut texels, mut covered) = (0, 0);
    for (k, &p) in parts.iter().enumerate() {
        if !region.contains(&p) {
            continue;
        }
        texels += 1;
        let (x, y) = ((k % N as usize) as u32, (k / N as usize) as u32);
        let d = *donor.get_pixel(x, y);
        if d.0 != [0, 0, 0] {
            out.put_pixel(x, y, d);
            covered += 1;
        }
    }
    (out, texels, covered)
}

#[test]
fn composition_is_exact_for_every_region() {
    let parts = table_parts();
    let table = TexelParts::builtin().unwrap();
    assert_eq!(table.as_slice(), parts.as_slice());
    let src = full_texture(1);
    let donor = holey_texture(2);
    for r in Region::ALL {
        let want_parts = expected_parts(r);
        let mut got_parts = r.parts().to_vec();
        got_parts.sort();
        let mut sorted = want_parts.clone();
        sorted.sort();
        assert_eq!(got_parts, sorted, "{r}");
        let (got, cov) = compose_region(&src, &donor, r, &table).unwrap();
        let (want, texels, covered) = expected_composition(&src, &donor, &parts, &want_parts);
        let diff = got
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{r}: {diff} texels differ");
        assert_eq!((cov.texels, cov.covered), (texels, covered), "{r}");
        assert!(texels > 0 && covered > 0 && covered < texels, "{r}");
        println!(
            "{r}: {texels} texels, donor covered {covered} ({:.1}%)",
            100.0 * cov.fraction()
        );
    }
    // outfit = upper then lower.
    let (a, _) = compose_region(&src, &donor, Region::Upper, &table).unwrap();
    let (a, _) = compose_region(&a, &donor, Region::Lower, &table).unwrap();
    let (b, _) = compose_region(&src, &donor, Region::Outfit, &table).unwrap();
    assert_eq!(a, b);
    // A texture of another size is refused.
    let small = RgbImage::new(256, 256);
    let e = compose_region(&src, &small, Region::Head, &table).unwrap_err();
    assert!(e.to_string().contains("256x256"), "{e}");
}

#[test]
fn an_empty_plan_leaves_the_pair_alone() {
    use mcld::data::{Pair, PairInputs};
    use mcld::edit::{apply_edit, EditPlan};
    let input = PairInputs {
        pair: Pair {
            from: "a.png".into(),
            to: "b.png".into(),
        },
        source: full_texture(3),
        pose: full_texture(4),
        texture: full_texture(5),
        face: (0..512).map(|i| i as f32).collect(),
        target: full_texture(6),
        face_missing: false,
    };
    let table = TexelParts::builtin().unwrap();
    let (out, cov) = apply_edit(&input, &EditPlan::default(), &table).unwrap();
    assert!(cov.is_empty());
    assert_eq!(out.source, input.source);
    assert_eq!(out.texture, input.texture);
    assert_eq!(out.face, input.face);
    assert_eq!(out.pose, input.pose);
}

fn rgb(p: &Path) -> RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A temp folder with tiny weights, a source photo, a target pose, a source texture.
struct Setup {
    dir: tempfile::TempDir,
    tiny: TinyLayout,
    source: PathBuf,
    pose: PathBuf,
    texture: PathBuf,
    empty: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let tiny = write_tiny_layout(&d.join("w"), &d.join("data"), 1).unwrap();
        let source = d.join("source.png");
        RgbImage::from_fn(176, 256, |x, y| {
            Rgb([(x + y) as u8, 200 - (y / 2) as u8, 90])
        })
        .save(&source)
        .unwrap();
        let pose = d.join("pose.png");
        mcld::pipeline::demo::synthetic_pose(176, 256, true)
            .save(&pose)
            .unwrap();
        let texture = d.join("texture.png");
        full_texture(7).save(&texture).unwrap();
        let empty = d.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        Self {
            dir,
            tiny,
            source,
            pose,
            texture,
            empty,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `CMD --source .. --pose .. --out OUT --ckpt_dir .. --config_path .. --pretrained_dir P`.
    fn args<'a>(&'a self, cmd: &'a str, out: &'a Path, pretrained: &'a Path) -> Vec<&'a str> {
        vec![
            cmd,
            "--source",
            s(&self.source),
            "--pose",
            s(&self.pose),
            "--out",
            s(out),
            "--ckpt_dir",
            s(&self.tiny.ckpt_dir),
            "--config_path",
            s(&self.tiny.config_path),
            "--pretrained_dir",
            s(pretrained),
        ]
    }
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs())
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

#[test]
fn edit_without_changes_equals_infer_and_garment_swaps_compose() {
    let t = Setup::new();
    let face = t.path("face.npy");
    let emb: Vec<f32> = (0..512)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    mcld::data::npy::write_f32(&face, &[512], &emb).unwrap();

    let infer_out = t.path("infer.png");
    let mut a = t.args("infer", &infer_out, &t.empty);
    a.extend(["--texture", s(&t.texture), "--face", s(&face)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");

    // No edit: infer's image bit for bit, and no texture written.
    let plain = t.path("plain.png");
    let mut a = t.args("edit", &plain, &t.empty);
    a.extend(["--texture", s(&t.texture), "--face", s(&face)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    assert_eq!(rgb(&plain), rgb(&infer_out));
    assert!(!t.path("plain_texture.png").exists());

    // Identity from an embedding: infer given that embedding, bit for bit.
    let donor_emb: Vec<f32> = (0..512)
        .map(|i| ((i * 13) % 29) as f32 / 7.0 - 2.0)
        .collect();
    let donor_face = t.path("donor_face.npy");
    mcld::data::npy::write_f32(&donor_face, &[512], &donor_emb).unwrap();
    let infer_donor = t.path("infer_donor.png");
    let mut a = t.args("infer", &infer_donor, &t.empty);
    a.extend(["--texture", s(&t.texture), "--face", s(&donor_face)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    let swapped = t.path("swapped.png");
    let mut a = t.args("edit", &swapped, &t.empty);
    a.extend(["--texture", s(&t.texture), "--face-emb", s(&donor_face)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    assert_eq!(rgb(&swapped), rgb(&infer_donor));
    assert_ne!(
        rgb(&swapped),
        rgb(&infer_out),
        "the identity reaches the image"
    );

    // Garments from two donor textures, narrower region winning over outfit.
    let d1 = t.path("d1.png");
    let d2 = t.path("d2.png");
    holey_texture(8).save(&d1).unwrap();
    holey_texture(9).save(&d2).unwrap();
    let out = t.path("garments.png");
    let composed = t.path("composed.png");
    let panel = t.path("panel.png");
    let mut a = t.args("edit", &out, &t.empty);
    let g2 = format!("upper={}", s(&d2));
    let g1 = format!("outfit={}", s(&d1));
    a.extend([
        "--texture",
        s(&t.texture),
        "--face",
        s(&face),
        "--garment-texture",
        &g2,
        "--garment-texture",
        &g1,
        "--save-texture",
        s(&composed),
        "--panel",
        s(&panel),
    ]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    println!("{text}");
    let parts = table_parts();
    let (want, _, _) = expected_composition(
        &rgb(&t.texture),
        &rgb(&d1),
        &parts,
        &expected_parts(Region::Outfit),
    );
    let (want, texels, covered) =
        expected_composition(&want, &rgb(&d2), &parts, &expected_parts(Region::Upper));
    assert_eq!(rgb(&composed), want);
    assert_ne!(rgb(&out), rgb(&infer_out), "the garments reach the image");
    assert!(
        text.contains("CLIP's photo input: the source photo"),
        "{text}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("garments_edit.json")).unwrap())
            .unwrap();
    let rows = report["garments"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["region"], "outfit");
    assert_eq!(rows[1]["region"], "upper");
    assert_eq!(rows[1]["texels"], texels);
    assert_eq!(rows[1]["covered"], covered);
    let pct = format!("{:.1}%", 100.0 * covered as f64 / texels as f64);
    assert!(text.contains(&pct), "{pct} not in {text}");

    // source | donor 1 | donor 2 | composed texture | pose | result, all 256 high.
    let p = rgb(&panel);
    let w = |iw: u32, ih: u32| (iw as f64 * 256.0 / ih as f64).round() as u32;
    assert_eq!(p.height(), 256);
    assert_eq!(p.width(), w(176, 256) + 3 * 256 + w(176, 256) + w(176, 256));
}

#[test]
fn outfit_swap_from_a_photo_and_what_clip_sees() {
    let t = Setup::new();
    let pre = t.path("pretrained");
    std::fs::create_dir_all(&pre).unwrap();
    std::fs::copy(
        crate::common::fixture_path("densepose/densepose_weights.pkl"),
        pre.join("model_final_844d15.pkl"),
    )
    .unwrap();
    std::fs::copy(
        crate::common::fixture_path("densepose/densepose_rcnn.json"),
        pre.join("densepose_rcnn.json"),
    )
    .unwrap();
    let donor = crate::common::fixture_path("densepose/input.png");
    let g = format!("outfit={}", s(&donor));
    let mut outs = Vec::new();
    for clip in ["auto", "source"] {
        let out = t.path(&format!("clip_{clip}.png"));
        let mut a = t.args("edit", &out, &pre);
        a.extend([
            "--texture",
            s(&t.texture),
            "--garment",
            &g,
            "--source-clip",
            clip,
        ]);
        let (ok, text) = run(&a);
        assert!(ok, "{text}");
        println!("{text}");
        let want = if clip == "auto" {
            "CLIP's photo input: the donor"
        } else {
            "CLIP's photo input: the source photo"
        };
        assert!(text.contains(want), "{text}");
        // The donor's texture is written beside the output and is what was composed.
        let dt = rgb(&t.path(&format!("clip_{clip}_donor1_texture.png")));
        let (want_tex, _, _) = expected_composition(
            &rgb(&t.texture),
            &dt,
            &table_parts(),
            &expected_parts(Region::Outfit),
        );
        assert_eq!(rgb(&t.path(&format!("clip_{clip}_texture.png"))), want_tex);
        outs.push(rgb(&out));
    }
    let d = mean_abs_diff(&outs[0], &outs[1]);
    println!("outfit swap, CLIP photo input donor vs source: mean |diff| {d:.2} levels of 255");
    assert!(d > 0.0);

    // Without --texture the source's map is computed as infer does, kept beside the output,
    // and is the base the donor's region is composed onto.
    let out = t.path("computed.png");
    let holey = t.path("holey.png");
    holey_texture(10).save(&holey).unwrap();
    let g = format!("upper={}", s(&holey));
    let (ok, text) = run(&[
        "edit",
        "--source",
        s(&donor),
        "--pose",
        s(&t.pose),
        "--out",
        s(&out),
        "--ckpt_dir",
        s(&t.tiny.ckpt_dir),
        "--config_path",
        s(&t.tiny.config_path),
        "--pretrained_dir",
        s(&pre),
        "--garment-texture",
        &g,
    ]);
    assert!(ok, "{text}");
    let src_tex = rgb(&t.path("computed_source_texture.png"));
    assert!(t.path("computed_source_iuv.png").is_file());
    let (want, _, _) = expected_composition(
        &src_tex,
        &rgb(&holey),
        &table_parts(),
        &expected_parts(Region::Upper),
    );
    assert_eq!(rgb(&t.path("computed_texture.png")), want);
}

/// A DensePose folder whose detector keeps no box (score threshold above 1): "no person".
fn blind_densepose(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        crate::common::fixture_path("densepose/densepose_weights.pkl"),
        dir.join("model_final_844d15.pkl"),
    )
    .unwrap();
    let mut j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture_path("densepose/densepose_rcnn.json"))
            .unwrap(),
    )
    .unwrap();
    j["config"]["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = serde_json::json!(1.5);
    std::fs::write(dir.join("densepose_rcnn.json"), j.to_string()).unwrap();
}

#[test]
fn bad_inputs_say_what_is_wrong() {
    let t = Setup::new();
    let out = t.path("out.png");
    let small = t.path("small.png");
    RgbImage::from_pixel(256, 256, Rgb([9, 9, 9]))
        .save(&small)
        .unwrap();
    let ok_tex = t.path("ok_tex.png");
    holey_texture(3).save(&ok_tex).unwrap();
    let blind = t.path("blind");
    blind_densepose(&blind);

    let check = |extra: &[&str], pretrained: &Path, wants: &[&str]| {
        let mut a = t.args("edit", &out, pretrained);
        a.extend_from_slice(extra);
        let (ok, text) = run(&a);
        assert!(!ok, "{extra:?} succeeded: {text}");
        assert!(!text.contains("panicked"), "{text}");
        for w in wants {
            assert!(
                text.contains(w),
                "{w:?} not in the message for {extra:?}: {text}"
            );
        }
        assert!(!out.exists());
        println!("{extra:?} -> {}", text.trim());
    };
    let tex = s(&t.texture);
    check(
        &["--texture", tex, "--garment", "torso=x.png"],
        &t.empty,
        &[
            "unknown region \"torso\"",
            "head, upper, lower, hands, feet, outfit",
        ],
    );
    check(
        &["--texture", tex, "--garment-texture", "upper"],
        &t.empty,
        &["REGION=TEXTURE.png"],
    );
    let ok_upper = format!("upper={}", s(&ok_tex));
    let small_upper = format!("upper={}", s(&small));
    check(
        &[
            "--texture",
            tex,
            "--garment-texture",
            &ok_upper,
            "--garment-texture",
            &small_upper,
        ],
        &t.empty,
        &["upper is given twice"],
    );
    check(
        &["--texture", tex, "--garment-texture", &small_upper],
        &t.empty,
        &["small.png", "256x256", "512x512"],
    );
    check(
        &["--texture", s(&small), "--garment-texture", &ok_upper],
        &t.empty,
        &["small.png", "source's texture map", "256x256"],
    );
    let missing = format!("head={}", s(&t.path("nobody.png")));
    check(
        &["--texture", tex, "--garment", &missing],
        &t.empty,
        &["nobody.png", "file not found"],
    );
    let small_lower = format!("lower={}", s(&small));
    check(
        &["--texture", tex, "--garment", &small_lower],
        &t.empty,
        &["model_final_844d15.pkl", "--garment-texture lower="],
    );
    check(
        &["--texture", tex, "--garment", &small_lower],
        &blind,
        &["small.png", "no person", "--garment lower"],
    );
    check(
        &["--texture", tex, "--face-from", s(&small)],
        &t.empty,
        &[
            "--face-from",
            "small.png",
            "glintr100.onnx",
            "--face-emb EMB.npy",
        ],
    );
}

#[test]
fn identity_swap_from_a_photo_equals_infer_with_its_embedding() {
    let m = crate::common::face_test_models();
    let t = Setup::new();
    let pre = t.path("pretrained");
    std::fs::create_dir_all(pre.join("antelopev2")).unwrap();
    std::fs::copy(&m.detector, pre.join("antelopev2/scrfd_10g_bnkps.onnx")).unwrap();
    std::fs::copy(&m.recogniser, pre.join("antelopev2/glintr100.onnx")).unwrap();
    let donor = m.scrfd_dir.join("images/newton.png");
    let emb = mcld::models::face::FaceEmbedder::load(&m.detector, &m.recogniser)
        .unwrap()
        .embed_largest(&rgb(&donor))
        .unwrap()
        .expect("the test photo has a face");
    let npy = t.path("newton.npy");
    mcld::data::npy::write_f32(&npy, &[512], &emb).unwrap();

    let infer_out = t.path("infer.png");
    let mut a = t.args("infer", &infer_out, &pre);
    a.extend(["--texture", s(&t.texture), "--face", s(&npy)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    let edit_out = t.path("edit.png");
    let mut a = t.args("edit", &edit_out, &pre);
    a.extend(["--texture", s(&t.texture), "--face-from", s(&donor)]);
    let (ok, text) = run(&a);
    assert!(ok, "{text}");
    assert_eq!(rgb(&edit_out), rgb(&infer_out));

    // A donor without a face: the file is named and the missing face said.
    let grey = t.path("grey.png");
    RgbImage::from_pixel(300, 400, Rgb([128, 128, 128]))
        .save(&grey)
        .unwrap();
    let out = t.path("noface.png");
    let mut a = t.args("edit", &out, &pre);
    a.extend(["--texture", s(&t.texture), "--face-from", s(&grey)]);
    let (ok, text) = run(&a);
    assert!(!ok, "{text}");
    assert!(
        text.contains("grey.png") && text.contains("no face found"),
        "{text}"
    );
    assert!(!out.exists());
}
