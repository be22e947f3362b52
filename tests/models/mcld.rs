//! `models::mcld` on `fixtures/model/reference_write_read`: the network set built from the
//! composite case's prefixed weights reproduces the reference's face tokens, pose features,
//! bank, noise prediction and guidance batch; the per-sample bank mask; one checkpoint file per
//! part with strict reports naming the right file.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{check_output, load_case, Case};
use mcld::models::mcld::{FaceCond, Mcld, McldConfig, McldInput, PoseCond};
use mcld::models::unet::{BankGuidance, IpAdapter};
use mcld::weights::{prefixed_var_builder, StrictWeights};

fn module_cfg<T: serde::de::DeserializeOwned>(case: &Case, m: &str) -> T {
    serde_json::from_value(case.json["modules"][m]["config"].clone()).unwrap()
}

fn config(case: &Case) -> McldConfig {
    let p = &case.json["params"];
    McldConfig {
        unet: module_cfg(case, "denoising_unet"),
        pose_guider: module_cfg(case, "pose_guider"),
        image_proj: module_cfg(case, "image_proj"),
        ip: IpAdapter {
            num_tokens: p["num_face_tokens"].as_u64().unwrap() as usize,
            scale: p["ip_scale"].as_f64().unwrap(),
        },
    }
}

/// The case's weights of the four parts, names as stored (with their module prefixes).
fn part_weights(case: &Case) -> HashMap<String, Tensor> {
    case.tensors
        .iter()
        .filter(|(k, _)| Mcld::PARTS.iter().any(|p| k.starts_with(&format!("{p}."))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn build(case: &Case) -> Mcld {
    let vb = VarBuilder::from_tensors(part_weights(case), DType::F32, &common::device());
    Mcld::new(vb, &config(case)).unwrap()
}

#[test]
fn config_from_parts_reads_tokens_from_the_projector() {
    let case = load_case("model", "reference_write_read");
    let cfg = config(&case);
    let derived = McldConfig::new(cfg.unet.clone(), cfg.image_proj.clone());
    assert_eq!(derived.ip.num_tokens, cfg.image_proj.num_queries);
    assert_eq!(derived.ip.scale, IpAdapter::MCLD_SCALE);
    assert_eq!(
        derived.ip, cfg.ip,
        "the fixture's adapter is MCLD's for its projector"
    );
    // A serde round trip keeps it, and a missing scale takes MCLD's default.
    let mut v = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        serde_json::from_value::<McldConfig>(v.clone()).unwrap(),
        cfg
    );
    v["ip"].as_object_mut().unwrap().remove("scale");
    assert_eq!(
        serde_json::from_value::<McldConfig>(v).unwrap().ip.scale,
        IpAdapter::MCLD_SCALE
    );
    // Parts that do not fit together are refused, naming both sides.
    let mut bad = cfg.clone();
    bad.ip.num_tokens += 1;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("num_queries") && e.contains("num_tokens"), "{e}");
    let vb = VarBuilder::from_tensors(part_weights(&case), DType::F32, &common::device());
    assert!(Mcld::new(vb, &bad).is_err());
}

#[test]
fn mcld_matches_reference_write_read() {
    let case = load_case("model", "reference_write_read");
    let nets = build(&case);
    let src = case.f32("input.clip_src_embeds");
    let tex = case.f32("input.clip_tex_embeds");
    let face_emb = case.f32("input.face_emb");
    let pose = (case.f32("input.pose_image_u8") / 255.0).unwrap();
    let latents = case.f32("input.noisy_latents");
    let timesteps = case.get("input.timesteps");

    let face = nets.face_tokens(&face_emb).unwrap();
    check_output(&case, "output.face_tokens", &face);
    check_output(
        &case,
        "output.pose_fea",
        &nets.pose_features(&pose).unwrap(),
    );
    let bank = nets
        .reference_bank(&case.f32("input.ref_latents"), &src)
        .unwrap();
    for (name, t) in &bank.entries {
        check_output(&case, &format!("output.bank.{name}"), t);
    }
    assert_eq!(
        bank.entries.len(),
        case.keys_with_prefix("output.bank.").len()
    );

    // Raw conditioning: embeddings and the IUV image, projected inside the forward.
    let mut inp = McldInput::new(
        &latents,
        timesteps,
        &src,
        &tex,
        FaceCond::Embeddings(&face_emb),
        PoseCond::Image(&pose),
    );
    inp.bank = Some(&bank);
    check_output(&case, "output.noise_pred", &nets.forward(&inp).unwrap());

    // The guidance batch as the sampler builds it: zero CLIP and zero face tokens first.
    let b = latents.dim(0).unwrap();
    let cat0 = |a: &Tensor, c: &Tensor| Tensor::cat(&[a, c], 0).unwrap();
    let z = |t: &Tensor| t.zeros_like().unwrap();
    let (src2, tex2, face2) = (
        cat0(&z(&src), &src),
        cat0(&z(&tex), &tex),
        cat0(&z(&face), &face),
    );
    let pose_fea = nets.pose_features(&pose).unwrap();
    let (lat2, t2, pose2) = (
        cat0(&latents, &latents),
        cat0(timesteps, timesteps),
        cat0(&pose_fea, &pose_fea),
    );
    let mut inp = McldInput::new(
        &lat2,
        &t2,
        &src2,
        &tex2,
        FaceCond::Tokens(&face2),
        PoseCond::Features(&pose2),
    );
    inp.bank = Some(&bank);
    inp.bank_guidance = BankGuidance::UncondFirstHalf;
    let both = nets.forward(&inp).unwrap();
    check_output(
        &case,
        "output.cfg.noise_pred_uncond",
        &both.narrow(0, 0, b).unwrap(),
    );
    check_output(
        &case,
        "output.cfg.noise_pred_cond",
        &both.narrow(0, b, b).unwrap(),
    );

    // The same batch as an explicit mask gives the same bits.
    let mask: Vec<bool> = (0..2 * b).map(|i| i < b).collect();
    inp.bank_guidance = BankGuidance::Ignore(mask);
    let masked = nets.forward(&inp).unwrap();
    let (diff, _) = common::max_errs(&masked, &both);
    assert_eq!(diff, 0.0, "first-half mask differs from UncondFirstHalf");
}

#[test]
fn per_sample_bank_mask_follows_the_samples() {
    let case = load_case("model", "reference_write_read");
    let nets = build(&case);
    // Three different samples from the fixture's one (scaled inputs), so that a mask has
    // rows to tell apart.
    let three = |t: Tensor| -> Tensor {
        let parts = [1.0, 0.5, -0.8].map(|s| (&t * s).unwrap());
        Tensor::cat(&parts, 0).unwrap()
    };
    let rep3 = |t: &Tensor| Tensor::cat(&[t, t, t], 0).unwrap();
    let src = rep3(&case.f32("input.clip_src_embeds"));
    let tex = rep3(&case.f32("input.clip_tex_embeds"));
    let face = nets
        .face_tokens(&rep3(&case.f32("input.face_emb")))
        .unwrap();
    let pose = nets
        .pose_features(&rep3(&(case.f32("input.pose_image_u8") / 255.0).unwrap()))
        .unwrap();
    let latents = three(case.f32("input.noisy_latents"));
    let timesteps = rep3(&case.f32("input.timesteps"));
    let bank = nets
        .reference_bank(&three(case.f32("input.ref_latents")), &src)
        .unwrap();
    let b = latents.dim(0).unwrap();
    assert_eq!(b, 3 * case.f32("input.noisy_latents").dim(0).unwrap());
    let run = |mask: Option<Vec<bool>>| -> mcld::Result<Tensor> {
        let mut inp = McldInput::new(
            &latents,
            &timesteps,
            &src,
            &tex,
            FaceCond::Tokens(&face),
            PoseCond::Features(&pose),
        );
        inp.bank = Some(&bank);
        if let Some(m) = mask {
            inp.bank_guidance = BankGuidance::Ignore(m);
        }
        nets.forward(&inp)
    };
    let reading = run(None).unwrap();
    let plain = run(Some(vec![true; b])).unwrap();
    // Masks that are not a leading run (the gather/scatter path) and one that is.
    let masks: Vec<Vec<bool>> = vec![
        (0..b).map(|j| j % 3 == 1).collect(),
        (0..b).map(|j| j % 3 != 1).collect(),
        (0..b).map(|j| j == b - 1).collect(),
        (0..b).map(|j| j == 0).collect(),
    ];
    for mask in masks {
        let out = run(Some(mask.clone())).unwrap();
        for (j, &ignores) in mask.iter().enumerate() {
            let row = |t: &Tensor| t.narrow(0, j, 1).unwrap();
            let (want, other) = if ignores {
                (&plain, &reading)
            } else {
                (&reading, &plain)
            };
            let (d, scale) = common::max_errs(&row(&out), &row(want));
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "mask {mask:?}, sample {j}: off by {d:.3e}"
            );
            let (apart, _) = common::max_errs(&row(want), &row(other));
            assert!(
                apart > 1e-3 * scale.max(1.0),
                "sample {j}: bank makes no difference"
            );
        }
    }
    let e = run(Some(vec![false; b + 1])).unwrap_err().to_string();
    assert!(e.contains("bank"), "{e}");
}

#[test]
fn one_file_per_part_reports_against_its_own_file() {
    let case = load_case("model", "reference_write_read");
    let cfg = config(&case);
    let part =
        |p: &str, file: &str| StrictWeights::new(case.weights_with_prefix(&format!("{p}.")), file);
    let load = |parts: &[(&str, StrictWeights)]| {
        let vb = prefixed_var_builder(
            parts
                .iter()
                .map(|(p, w)| (*p, w.var_builder(DType::F32, &common::device()))),
            DType::F32,
            &common::device(),
        );
        Mcld::new(vb, &cfg)
    };
    let files = [
        (Mcld::REFERENCE_UNET, "ref.safetensors"),
        (Mcld::DENOISING_UNET, "den.safetensors"),
        (Mcld::POSE_GUIDER, "pose.safetensors"),
        (Mcld::IMAGE_PROJ, "proj.safetensors"),
    ];
    let parts: Vec<_> = files.iter().map(|(p, f)| (*p, part(p, f))).collect();
    let nets = load(&parts).unwrap();
    for (_, w) in &parts {
        w.finish().unwrap();
    }
    // Same networks as from the composite source.
    let src = case.f32("input.clip_src_embeds");
    let bank = nets
        .reference_bank(&case.f32("input.ref_latents"), &src)
        .unwrap();
    check_output(
        &case,
        "output.bank.mid_block.attentions.0.transformer_blocks.0",
        bank.get("mid_block.attentions.0.transformer_blocks.0")
            .unwrap(),
    );

    // A tensor missing from the pose guider's file names that file and the unprefixed key.
    let mut w = case.weights_with_prefix("pose_guider.");
    assert!(w.remove("conv_in.weight").is_some());
    let mut parts: Vec<_> = files.iter().map(|(p, f)| (*p, part(p, f))).collect();
    parts[2].1 = StrictWeights::new(w, "pose.safetensors");
    let e = load(&parts).unwrap_err().to_string();
    assert!(
        e.contains("pose.safetensors") && e.contains("conv_in.weight"),
        "{e}"
    );

    // An extra tensor in the projector's file is unexpected there, and only there.
    let mut w = case.weights_with_prefix("image_proj.");
    w.insert(
        "stray.weight".into(),
        Tensor::zeros(2, DType::F32, &common::device()).unwrap(),
    );
    let mut parts: Vec<_> = files.iter().map(|(p, f)| (*p, part(p, f))).collect();
    parts[3].1 = StrictWeights::new(w, "proj.safetensors");
    load(&parts).unwrap();
    for (p, w) in &parts {
        let r = w.finish();
        if *p == Mcld::IMAGE_PROJ {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("proj.safetensors") && e.contains("stray.weight"),
                "{e}"
            );
        } else {
            r.unwrap();
        }
    }
}
