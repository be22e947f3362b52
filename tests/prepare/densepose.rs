//! Parity of the DensePose R-CNN port with detectron2, stage by stage, on the fixtures of
//! `shared/fixtures/densepose` (README there). Each stage starts from the reference's own
//! input to that stage, so a failure points at one stage; `end_to_end` chains them all.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, fixture_path, load_case, max_errs, Case, Tolerance};
use mcld::models::densepose::iuv::{self, Image3};
use mcld::models::densepose::{Config, DensePose};

const GROUP: &str = "densepose";
const CASE: &str = "densepose_rcnn";

/// The fixture's tolerance for a key: exact key, else longest prefix, else default
/// (this group uses `abs` as well as `rel_to_max`).
fn tol(case: &Case, key: &str) -> Tolerance {
    let obj = case.json["tolerance"].as_object().expect("tolerance block");
    let mut best: Option<(&String, &serde_json::Value)> = None;
    for (k, v) in obj {
        if k != "default"
            && (key == k || key.starts_with(k.as_str()))
            && best.map(|(b, _)| k.len() > b.len()).unwrap_or(true)
        {
            best = Some((k, v));
        }
    }
    let v = best.map(|(_, v)| v).unwrap_or(&obj["default"]);
    if let Some(a) = v.get("abs").and_then(|x| x.as_f64()) {
        Tolerance::Abs(a)
    } else if let Some(r) = v.get("rel_to_max").and_then(|x| x.as_f64()) {
        Tolerance::RelToMax(r)
    } else {
        panic!("tolerance for {key}: no abs or rel_to_max in {v}")
    }
}

fn check(case: &Case, key: &str, got: &Tensor) {
    let expected = case.f32(key);
    let got = got.to_dtype(DType::F32).unwrap();
    assert_close(key, &got, &expected, tol(case, key));
}

fn setup() -> (Case, Config, DensePose) {
    let case = load_case(GROUP, CASE);
    let cfg = Config::from_json_value(&case.json["config"]).expect("fixture config");
    let tensors: HashMap<String, Tensor> = case
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = DensePose::new(vb, &cfg).expect("model from fixture weights");
    (case, cfg, model)
}

fn boxes_of(t: &Tensor) -> Vec<[f32; 4]> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect()
}

fn boxes_tensor(b: &[[f32; 4]]) -> Tensor {
    let flat: Vec<f32> = b.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b.len(), 4), &Device::Cpu).unwrap()
}

fn fpn_of(case: &Case) -> Vec<Tensor> {
    (2..=6)
        .map(|l| case.f32(&format!("output.fpn.p{l}")).unsqueeze(0).unwrap())
        .collect()
}

fn resized_hw(case: &Case) -> (usize, usize) {
    let (h, w, _) = case.get("input.resized_bgr").dims3().unwrap();
    (h, w)
}

fn resized_input(case: &Case) -> Image3 {
    let t = case.get("input.resized_bgr");
    let (h, w, _) = t.dims3().unwrap();
    let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    Image3::new(h, w, data).unwrap()
}

fn photo(case: &Case) -> Image3 {
    let img = Image3::read_bgr(&fixture_path(&format!("{GROUP}/input.png"))).unwrap();
    let hw = case.json["image_hw"].as_array().unwrap();
    assert_eq!(
        (img.h, img.w),
        (
            hw[0].as_u64().unwrap() as usize,
            hw[1].as_u64().unwrap() as usize
        )
    );
    img
}

#[test]
fn config_yaml_matches_fixture() {
    let case = load_case(GROUP, CASE);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/densepose")
        .join(case.json["config_file"].as_str().unwrap());
    let overrides: Vec<(String, serde_yaml::Value)> = case.json["config_overrides_vs_real"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), serde_yaml::to_value(v).unwrap()))
        .collect();
    let real = Config::from_yaml_file(&path).unwrap();
    for (k, v) in case.json["real_values_of_overrides"].as_object().unwrap() {
        let got = lookup(&real, k);
        assert_eq!(got, *v, "real config value of {k}");
    }
    let cfg = Config::from_yaml_file_with(&path, &overrides).unwrap();
    let fix = Config::from_json_value(&case.json["config"]).unwrap();
    assert_eq!(format!("{cfg:?}"), format!("{fix:?}"));
}

/// The handful of override keys, read back from a parsed config.
fn lookup(c: &Config, key: &str) -> serde_json::Value {
    let m = &c.model;
    let v = match key {
        "MODEL.RESNETS.STEM_OUT_CHANNELS" => m.resnets.stem_out_channels,
        "MODEL.RESNETS.WIDTH_PER_GROUP" => m.resnets.width_per_group,
        "MODEL.RESNETS.RES2_OUT_CHANNELS" => m.resnets.res2_out_channels,
        "MODEL.FPN.OUT_CHANNELS" => m.fpn.out_channels,
        "MODEL.ROI_BOX_HEAD.FC_DIM" => m.roi_box_head.fc_dim,
        "MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM" => m.roi_densepose_head.conv_head_dim,
        "MODEL.ROI_DENSEPOSE_HEAD.DECODER_CONV_DIMS" => m.roi_densepose_head.decoder_conv_dims,
        "MODEL.ROI_DENSEPOSE_HEAD.DECODER_NUM_CLASSES" => m.roi_densepose_head.decoder_num_classes,
        "INPUT.MIN_SIZE_TEST" => c.input.min_size_test,
        "INPUT.MAX_SIZE_TEST" => c.input.max_size_test,
        "TEST.DETECTIONS_PER_IMAGE" => c.test.detections_per_image,
        k => panic!("no lookup for {k}"),
    };
    serde_json::json!(v)
}

#[test]
fn resize_and_normalize() {
    let (case, _cfg, model) = setup();
    let pre = model.preprocess(&photo(&case)).unwrap();
    let want = resized_input(&case);
    assert_eq!(
        (pre.resized.h, pre.resized.w),
        (want.h, want.w),
        "resized size"
    );
    let diff = pre
        .resized
        .data
        .iter()
        .zip(&want.data)
        .filter(|(a, b)| a != b)
        .count();
    let worst = pre
        .resized
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap_or(0);
    println!("input.resized_bgr: {diff} differing bytes, worst {worst}");
    assert_eq!(diff, 0, "PIL bilinear resize must be exact");
    let t = model.normalize_pad(&want).unwrap().squeeze(0).unwrap();
    check(&case, "output.image_tensor", &t);
}

#[test]
fn backbone_fpn() {
    let (case, _cfg, model) = setup();
    let x = case.f32("output.image_tensor").unsqueeze(0).unwrap();
    let feats = model.features(&x).unwrap();
    for (i, f) in feats.iter().enumerate() {
        check(
            &case,
            &format!("output.fpn.p{}", i + 2),
            &f.squeeze(0).unwrap(),
        );
    }
}

/// Matches `got` proposals to the reference as sets of (box, logit); returns unmatched counts.
fn match_proposals(case: &Case, got_b: &[[f32; 4]], got_l: &[f32]) -> (usize, usize, f64, f64) {
    let want_b = boxes_of(&case.f32("output.rpn.proposal_boxes"));
    let want_l = case
        .f32("output.rpn.objectness_logits")
        .to_vec1::<f32>()
        .unwrap();
    let btol = match tol(case, "output.rpn.proposal_boxes") {
        Tolerance::Abs(a) => a,
        t => panic!("unexpected box tolerance {t:?}"),
    };
    let lmax = want_l.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let ltol = match tol(case, "output.rpn.objectness_logits") {
        Tolerance::RelToMax(r) => r * lmax,
        Tolerance::Abs(a) => a,
        Tolerance::Rel(r) => r * lmax.max(1.0),
    };
    let mut used = vec![false; want_b.len()];
    let (mut worst_b, mut worst_l) = (0f64, 0f64);
    let mut unmatched = 0;
    for (b, l) in got_b.iter().zip(got_l) {
        let mut best: Option<(usize, f64)> = None;
        for (j, wb) in want_b.iter().enumerate() {
            if used[j] {
                continue;
            }
            let e = (0..4)
                .map(|k| (b[k] - wb[k]).abs() as f64)
                .fold(0f64, f64::max);
            let le = (l - want_l[j]).abs() as f64;
            if e <= btol && le <= ltol && best.map(|(_, be)| e < be).unwrap_or(true) {
                best = Some((j, e));
            }
        }
        match best {
            Some((j, e)) => {
                used[j] = true;
                worst_b = worst_b.max(e);
                worst_l = worst_l.max((l - want_l[j]).abs() as f64);
            }
            None => unmatched += 1,
        }
    }
    let missing = used.iter().filter(|u| !**u).count();
    println!(
        "rpn proposals: got {}, want {}, unmatched {unmatched}, missing {missing}, worst box err {worst_b:.3e} (bound {btol:.1e}), worst logit err {worst_l:.3e} (bound {ltol:.1e})",
        got_b.len(),
        want_b.len()
    );
    (unmatched, missing, worst_b, worst_l)
}

#[test]
fn rpn_proposals() {
    let (case, _cfg, model) = setup();
    for (l, cell) in model.rpn().cell_anchors.iter().enumerate() {
        let t = boxes_tensor(cell);
        check(&case, &format!("output.rpn.cell_anchors.p{}", l + 2), &t);
    }
    let fpn = fpn_of(&case);
    let levels = model.rpn().head(&fpn).unwrap();
    for (l, lv) in levels.iter().enumerate() {
        check(
            &case,
            &format!("output.rpn.objectness_logits_raw.p{}", l + 2),
            &lv.logits,
        );
    }
    let props = model.rpn().proposals(&levels, resized_hw(&case)).unwrap();
    let (unmatched, missing, _, _) = match_proposals(&case, &props.boxes, &props.logits);
    // A couple may differ where an IoU sits within ~1e-5 of the NMS threshold.
    assert!(unmatched <= 2 && missing <= 2, "too many proposals differ");
}

#[test]
fn box_head_and_instances() {
    let (case, _cfg, model) = setup();
    let fpn = fpn_of(&case);
    let props = boxes_of(&case.f32("output.rpn.proposal_boxes"));
    let (out, det) = model.detect(&fpn, &props, resized_hw(&case)).unwrap();
    check(&case, "output.box_predictor.cls_logits", &out.cls_logits);
    check(&case, "output.box_predictor.bbox_deltas", &out.bbox_deltas);
    check(
        &case,
        "output.roi.pred_boxes_input_coords",
        &boxes_tensor(&det.boxes),
    );
}

#[test]
fn densepose_branch() {
    let (case, _cfg, model) = setup();
    let fpn = fpn_of(&case);
    let boxes = boxes_of(&case.f32("output.roi.pred_boxes_input_coords"));
    let dp = model.densepose(&fpn, &boxes).unwrap();
    check(
        &case,
        "output.densepose.decoder",
        &dp.decoder.unwrap().squeeze(0).unwrap(),
    );
    check(&case, "output.densepose.pooled", &dp.pooled);
    check(&case, "output.densepose.head", &dp.head);
    let c = &dp.chart;
    check(
        &case,
        "output.densepose.coarse_segm",
        &c.coarse_segm.narrow(0, 0, 1).unwrap(),
    );
    check(
        &case,
        "output.densepose.fine_segm",
        &c.fine_segm.narrow(0, 0, 1).unwrap(),
    );
    check(&case, "output.densepose.u", &c.u.narrow(0, 0, 1).unwrap());
    check(&case, "output.densepose.v", &c.v.narrow(0, 0, 1).unwrap());
}

/// Labels exact outside `label_may_flip`, uv within tolerance where labels agree.
fn check_chart(case: &Case, chart: &iuv::ChartResult) {
    let want_l = case.get("output.chart.labels");
    let (h, w) = want_l.dims2().unwrap();
    assert_eq!((chart.h, chart.w), (h, w), "chart size");
    let want_l = want_l.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let flip = case
        .get("output.chart.label_may_flip")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let want_uv = case
        .f32("output.chart.uv")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let n = h * w;
    let (mut bad, mut flipped) = (0, 0);
    let mut worst_uv = 0f64;
    for p in 0..n {
        if chart.labels[p] != want_l[p] {
            if flip[p] == 1 {
                flipped += 1;
            } else {
                bad += 1;
            }
            continue;
        }
        for c in 0..2 {
            worst_uv = worst_uv.max((chart.uv[c * n + p] - want_uv[c * n + p]).abs() as f64);
        }
    }
    let uv_tol = match tol(case, "output.chart.uv") {
        Tolerance::Abs(a) => a,
        t => panic!("unexpected uv tolerance {t:?}"),
    };
    println!(
        "output.chart.labels: {bad} mismatches outside may-flip, {flipped} inside; output.chart.uv: max_abs_err {worst_uv:.3e} (bound {uv_tol:.1e})"
    );
    assert_eq!(bad, 0, "labels differ outside the may-flip mask");
    assert!(worst_uv <= uv_tol, "uv error too large");
}

/// The IUV image against `output.iuv` with the README's allowances.
fn check_iuv(case: &Case, got: &[u8], box_xyxy: &[f32; 4]) {
    let (bad, allowed) = common::iuv_flip_differences(case, got, box_xyxy);
    println!("output.iuv: {bad} disallowed differences, {allowed} allowed (may-flip)");
    assert_eq!(bad, 0, "IUV differs where it must be exact");
}

#[test]
fn chart_result_and_iuv() {
    let case = load_case(GROUP, CASE);
    let b = boxes_of(&case.f32("output.instances.pred_boxes"))[0];
    let chart = iuv::chart_result(
        &case.f32("output.densepose.coarse_segm"),
        &case.f32("output.densepose.fine_segm"),
        &case.f32("output.densepose.u"),
        &case.f32("output.densepose.v"),
        &b,
    )
    .unwrap();
    check_chart(&case, &chart);
    let (h, w, _) = case.get("output.iuv").dims3().unwrap();
    let img = iuv::iuv_image(&chart, &b, h, w);
    check_iuv(&case, &img, &b);
    // The PNG as MCLD writes it: R = V, G = U, B = I.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iuv.png");
    iuv::save_iuv_png(&img, h, w, &p).unwrap();
    let ours = image::open(&p).unwrap().to_rgb8().into_raw();
    let theirs = image::open(fixture_path(&format!("{GROUP}/densepose_iuv.png")))
        .unwrap()
        .to_rgb8()
        .into_raw();
    let flipped: Vec<u8> = theirs
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    check_iuv(
        &case,
        &ours
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect::<Vec<_>>(),
        &b,
    );
    let ref_png_vs_iuv = flipped
        == case
            .get("output.iuv")
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
    assert!(
        ref_png_vs_iuv,
        "fixture PNG channel order is not R=V, G=U, B=I"
    );
}

#[test]
fn end_to_end() {
    let (case, _cfg, model) = setup();
    let img = photo(&case);
    let t0 = std::time::Instant::now();
    let trace = model.run(&img).unwrap();
    println!("end-to-end forward: {:.2?}", t0.elapsed());
    assert_eq!(trace.pre.resized.data, resized_input(&case).data, "resize");
    for (i, f) in trace.fpn.iter().enumerate() {
        check(
            &case,
            &format!("output.fpn.p{}", i + 2),
            &f.squeeze(0).unwrap(),
        );
    }
    let (unmatched, missing, _, _) =
        match_proposals(&case, &trace.proposals.boxes, &trace.proposals.logits);
    assert!(unmatched <= 2 && missing <= 2, "too many proposals differ");
    check(
        &case,
        "output.roi.pred_boxes_input_coords",
        &boxes_tensor(&trace.detections.boxes),
    );
    check(
        &case,
        "output.instances.pred_boxes",
        &boxes_tensor(&trace.boxes_orig),
    );
    let scores = Tensor::new(trace.scores.as_slice(), &Device::Cpu).unwrap();
    check(&case, "output.instances.scores", &scores);
    let classes: Vec<f32> = trace.classes.iter().map(|&c| c as f32).collect();
    check(
        &case,
        "output.instances.pred_classes",
        &Tensor::new(classes.as_slice(), &Device::Cpu).unwrap(),
    );
    let dp = trace.densepose.as_ref().unwrap();
    check(&case, "output.densepose.pooled", &dp.pooled);
    check(&case, "output.densepose.head", &dp.head);
    check(
        &case,
        "output.densepose.u",
        &dp.chart.u.narrow(0, 0, 1).unwrap(),
    );
    let chart = DensePose::chart_result(&trace, 0).unwrap();
    check_chart(&case, &chart);
    let iuv = iuv::iuv_image(&chart, &trace.boxes_orig[0], img.h, img.w);
    check_iuv(&case, &iuv, &trace.boxes_orig[0]);
}

#[test]
fn end_to_end_first_instance_only_and_iuv() {
    let (case, _cfg, model) = setup();
    let img = photo(&case);
    let trace = model.run_with(&img, 1).unwrap();
    let dp = trace.densepose.as_ref().unwrap();
    assert_eq!(
        dp.pooled.dims()[0],
        1,
        "DensePose branch limited to one instance"
    );
    check(&case, "output.densepose.coarse_segm", &dp.chart.coarse_segm);
    check(&case, "output.densepose.fine_segm", &dp.chart.fine_segm);
    let iuv = model.iuv(&img).unwrap().expect("a person is detected");
    check_iuv(&case, &iuv, &trace.boxes_orig[0]);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let case = load_case(GROUP, CASE);
    let mut j = case.json["config"].clone();
    j["MODEL"]["ROI_DENSEPOSE_HEAD"]["UV_CONFIDENCE"]["ENABLED"] = serde_json::json!(true);
    let e = Config::from_json_value(&j).unwrap_err().to_string();
    assert!(e.contains("confidence"), "{e}");
    let mut j = case.json["config"].clone();
    j["MODEL"]["RESNETS"]["DEPTH"] = serde_json::json!(42);
    let e = Config::from_json_value(&j).unwrap_err().to_string();
    assert!(e.contains("DEPTH"), "{e}");
    // A weight set missing one tensor names it.
    let cfg = Config::from_json_value(&case.json["config"]).unwrap();
    let missing = "roi_heads.densepose_head.body_conv_fcn3.weight";
    let tensors: HashMap<String, Tensor> = case
        .tensors
        .iter()
        .filter(|(k, _)| k.as_str() != missing)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let e = DensePose::new(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains(missing), "{e}");
    // Wrong image buffer size.
    assert!(Image3::new(4, 4, vec![0; 10]).is_err());
}

/// Odd, non-square, upscaled and tiny photos run through without shape errors.
#[test]
fn other_image_shapes_run() {
    let (_case, _cfg, model) = setup();
    for (h, w) in [(301usize, 457usize), (457, 301), (40, 33), (1, 1)] {
        let data: Vec<u8> = (0..h * w * 3).map(|i| ((i * 7919) % 256) as u8).collect();
        let img = Image3::new(h, w, data).unwrap();
        let trace = model.run_with(&img, 1).unwrap();
        let (th, tw) = (trace.pre.resized.h, trace.pre.resized.w);
        let (_, _, ph, pw) = trace.pre.tensor.dims4().unwrap();
        assert!(ph % 32 == 0 && pw % 32 == 0 && ph >= th && pw >= tw);
        for b in &trace.boxes_orig {
            assert!(b[0] >= 0.0 && b[2] <= w as f32 && b[1] >= 0.0 && b[3] <= h as f32);
        }
        if let Some(iuv) = model.iuv(&img).unwrap() {
            assert_eq!(iuv.len(), h * w * 3);
        }
    }
    assert!(model
        .preprocess(&Image3::new(0, 5, vec![]).unwrap())
        .is_err());
}

/// The non-local block has no fixture (the DL configs leave it off); this checks its wiring:
/// with its output GroupNorm zeroed, as DensePose initialises it, it is the identity, so the
/// head matches the reference; with a non-zero GroupNorm it changes the head's output.
#[test]
fn nonlocal_block_wiring() {
    let case = load_case(GROUP, CASE);
    let mut j = case.json["config"].clone();
    j["MODEL"]["ROI_DENSEPOSE_HEAD"]["DEEPLAB"]["NONLOCAL_ON"] = serde_json::json!(1);
    let cfg = Config::from_json_value(&j).unwrap();
    let c = cfg.model.roi_densepose_head.decoder_num_classes;
    let inter = c / 2;
    let build = |gn_weight: f32| {
        let mut t: HashMap<String, Tensor> = case
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let p = "roi_heads.densepose_head.NLBlock.";
        let dev = Device::Cpu;
        for (name, o, i) in [
            ("g.0", inter, c),
            ("theta", inter, c),
            ("phi.0", inter, c),
            ("W.0", c, inter),
        ] {
            let w = (Tensor::randn(0f32, 1f32, (o, i, 1, 1), &dev).unwrap() * 0.1).unwrap();
            t.insert(format!("{p}{name}.weight"), w);
            t.insert(
                format!("{p}{name}.bias"),
                Tensor::zeros(o, DType::F32, &dev).unwrap(),
            );
        }
        t.insert(
            format!("{p}W.1.weight"),
            (Tensor::ones(c, DType::F32, &dev).unwrap() * gn_weight as f64).unwrap(),
        );
        t.insert(
            format!("{p}W.1.bias"),
            Tensor::zeros(c, DType::F32, &dev).unwrap(),
        );
        DensePose::new(VarBuilder::from_tensors(t, DType::F32, &dev), &cfg).unwrap()
    };
    let fpn = fpn_of(&case);
    let boxes = boxes_of(&case.f32("output.roi.pred_boxes_input_coords"));
    let identity = build(0.0).densepose(&fpn, &boxes).unwrap();
    check(&case, "output.densepose.head", &identity.head);
    let active = build(1.0).densepose(&fpn, &boxes).unwrap();
    let (err, _) = common::max_errs(&active.head, &case.f32("output.densepose.head"));
    println!("non-local with GN weight 1: head differs from the no-non-local head by {err:.3e}");
    assert!(err.is_finite() && err > 1e-3);
}

#[test]
fn load_from_safetensors_file() {
    let case = load_case(GROUP, CASE);
    let cfg = Config::from_json_value(&case.json["config"]).unwrap();
    let model =
        mcld::models::densepose::load_safetensors(&case.safetensors_path, &cfg, &Device::Cpu)
            .unwrap();
    let x = case.f32("output.image_tensor").unsqueeze(0).unwrap();
    let p5 = model.features(&x).unwrap().remove(3).squeeze(0).unwrap();
    check(&case, "output.fpn.p5", &p5);
    let e = mcld::models::densepose::load_safetensors(
        std::path::Path::new("/nonexistent/w.safetensors"),
        &cfg,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/w.safetensors"), "{e}");
}

/// On a GPU the decoder's and chart predictor's bilinear upscales run as candle's
/// `upsample_bilinear2d_with_scale` instead of our host loop (which the fixtures pin). Same
/// interpolation on the CPU, for the factors and odd shapes used: equal to float rounding.
#[test]
fn device_bilinear_matches_host_bilinear() {
    use mcld::models::densepose::predictor::upsample_bilinear_host;
    let dev = Device::Cpu;
    for (factor, h, w) in [
        (2usize, 28usize, 28usize),
        (2, 37, 50),
        (2, 1, 3),
        (4, 7, 5),
    ] {
        let x = Tensor::randn(0f32, 1f32, (2, 3, h, w), &dev).unwrap();
        let host = upsample_bilinear_host(&x, factor).unwrap();
        let f = factor as f64;
        let kernel = x.upsample_bilinear2d_with_scale(f, f, false).unwrap();
        assert_eq!(host.dims(), kernel.dims());
        let err = max_errs(&host, &kernel).0;
        assert!(err < 1e-5, "factor {factor}, {h}x{w}: max error {err}");
    }
}
