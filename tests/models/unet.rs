//! UNet parity against `fixtures/model/{unet_plain,reference_write_read}` plus error cases.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{check_output, load_case, Case};
use mcld::models::unet::{
    BankGuidance, Config, DenoiseInput, IpAdapter, StageContexts, UNet2DConditionModel,
};

fn vb_from(map: HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(map, DType::F32, &common::device())
}

fn config_at(case: &Case, pointer: &str) -> Config {
    let v = case.json.pointer(pointer).expect("config in fixture JSON");
    serde_json::from_value(v.clone()).expect("UNet config parses")
}

fn plain_model(case: &Case) -> UNet2DConditionModel {
    let cfg = config_at(case, "/config");
    let prefix = case.json["weight_prefix"].as_str().unwrap_or("");
    UNet2DConditionModel::new(vb_from(case.weights_with_prefix(prefix)), &cfg).unwrap()
}

#[test]
fn unet_plain_matches_diffusers() {
    let case = load_case("model", "unet_plain");
    let unet = plain_model(&case);
    let (out, debug) = unet
        .forward_with_debug(
            &case.f32("input.sample"),
            case.get("input.timestep"),
            &case.f32("input.encoder_hidden_states"),
        )
        .unwrap();
    check_output(&case, "output.sample", &out);
    let expected = case.keys_with_prefix("output.debug.");
    assert!(!expected.is_empty(), "fixture has no debug outputs");
    let mut checked = 0;
    for (name, t) in &debug {
        let key = format!("output.debug.{name}");
        if case.tensors.contains_key(&key) {
            check_output(&case, &key, t);
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        expected.len(),
        "some debug outputs were not produced: {expected:?}"
    );
    // The plain forward agrees with the debug one.
    let again = unet
        .forward(
            &case.f32("input.sample"),
            case.get("input.timestep"),
            &case.f32("input.encoder_hidden_states"),
        )
        .unwrap();
    check_output(&case, "output.sample", &again);
}

struct McldCase {
    case: Case,
    reference: UNet2DConditionModel,
    denoising: UNet2DConditionModel,
}

fn mcld_case() -> McldCase {
    let case = load_case("model", "reference_write_read");
    let m = &case.json["modules"];
    let rcfg = config_at(&case, "/modules/reference_unet/config");
    let dcfg = config_at(&case, "/modules/denoising_unet/config");
    let rpre = m["reference_unet"]["prefix"].as_str().unwrap();
    let dpre = m["denoising_unet"]["prefix"].as_str().unwrap();
    let reference =
        UNet2DConditionModel::new_reference(vb_from(case.weights_with_prefix(rpre)), &rcfg)
            .unwrap();
    let ip = IpAdapter {
        num_tokens: case.json["params"]["num_face_tokens"].as_u64().unwrap() as usize,
        scale: case.json["params"]["ip_scale"].as_f64().unwrap(),
    };
    let denoising =
        UNet2DConditionModel::new_denoising(vb_from(case.weights_with_prefix(dpre)), &dcfg, ip)
            .unwrap();
    McldCase {
        case,
        reference,
        denoising,
    }
}

/// MCLD's stage contexts: down [src, face], mid [src, tex, face], up [tex, face].
fn stage_contexts(src: &Tensor, tex: &Tensor, face: &Tensor) -> StageContexts {
    StageContexts {
        down: Tensor::cat(&[src, face], 1).unwrap(),
        mid: Tensor::cat(&[src, tex, face], 1).unwrap(),
        up: Tensor::cat(&[tex, face], 1).unwrap(),
    }
}

fn ref_timesteps(case: &Case, batch: usize) -> Tensor {
    let t = case.json["params"]["reference_timestep"].as_i64().unwrap();
    Tensor::full(t, batch, &common::device()).unwrap()
}

#[test]
fn reference_bank_and_denoising_match_mcld() {
    let McldCase {
        case,
        reference,
        denoising,
    } = mcld_case();
    let ref_latents = case.f32("input.ref_latents");
    let b = ref_latents.dim(0).unwrap();
    let src = case.f32("input.clip_src_embeds");
    let tex = case.f32("input.clip_tex_embeds");

    // 1. Reference write.
    let bank = reference
        .forward_reference(&ref_latents, &ref_timesteps(&case, b), &src)
        .unwrap();
    let order: Vec<String> = case.json["params"]["bank_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(bank.names(), order, "bank order");
    for (name, t) in &bank.entries {
        check_output(&case, &format!("output.bank.{name}"), t);
    }
    assert_eq!(
        bank.entries.len(),
        case.keys_with_prefix("output.bank.").len()
    );

    // 2. Denoising read with the stored pose features and face tokens.
    let face = case.f32("output.face_tokens");
    let pose = case.f32("output.pose_fea");
    let latents = case.f32("input.noisy_latents");
    let timesteps = case.get("input.timesteps");
    let ctx = stage_contexts(&src, &tex, &face);
    let mut inp = DenoiseInput::new(&latents, timesteps, &ctx);
    inp.pose_features = Some(&pose);
    inp.bank = Some(&bank);
    let pred = denoising.forward_denoise(&inp).unwrap();
    check_output(&case, "output.noise_pred", &pred);

    // 3. The CFG batch as the pipeline builds it.
    let g = case.json["params"]["guidance_scale"].as_f64().unwrap();
    let zsrc = src.zeros_like().unwrap();
    let cat0 = |a: &Tensor, c: &Tensor| Tensor::cat(&[a, c], 0).unwrap();
    let ref2 = cat0(&ref_latents, &ref_latents);
    let bank2 = reference
        .forward_reference(&ref2, &ref_timesteps(&case, 2 * b), &cat0(&zsrc, &src))
        .unwrap();
    let ctx2 = stage_contexts(
        &cat0(&zsrc, &src),
        &cat0(&tex.zeros_like().unwrap(), &tex),
        &cat0(&face.zeros_like().unwrap(), &face),
    );
    let lat2 = cat0(&latents, &latents);
    let t2 = cat0(timesteps, timesteps);
    let pose2 = cat0(&pose, &pose);
    let mut inp = DenoiseInput::new(&lat2, &t2, &ctx2);
    inp.pose_features = Some(&pose2);
    inp.bank = Some(&bank2);
    inp.guidance = BankGuidance::UncondFirstHalf;
    let both = denoising.forward_denoise(&inp).unwrap();
    let uncond = both.narrow(0, 0, b).unwrap();
    let cond = both.narrow(0, b, b).unwrap();
    check_output(&case, "output.cfg.noise_pred_uncond", &uncond);
    check_output(&case, "output.cfg.noise_pred_cond", &cond);
    let guided = (&uncond + ((&cond - &uncond).unwrap() * g).unwrap()).unwrap();
    check_output(&case, "output.cfg.noise_pred", &guided);
}

#[test]
fn bank_rounding_flag_changes_the_result() {
    // The flag takes effect. Note: on this fixture the move is below the parity tolerance, so
    // the parity test alone cannot tell whether the rounding happened.
    let McldCase {
        case,
        reference,
        denoising,
    } = mcld_case();
    let ref_latents = case.f32("input.ref_latents");
    let b = ref_latents.dim(0).unwrap();
    let src = case.f32("input.clip_src_embeds");
    let bank = reference
        .forward_reference(&ref_latents, &ref_timesteps(&case, b), &src)
        .unwrap();
    let face = case.f32("output.face_tokens");
    let ctx = stage_contexts(&src, &case.f32("input.clip_tex_embeds"), &face);
    let latents = case.f32("input.noisy_latents");
    let mut inp = DenoiseInput::new(&latents, case.get("input.timesteps"), &ctx);
    inp.bank = Some(&bank);
    let a = denoising.forward_denoise(&inp).unwrap();
    inp.bank_fp16_round = false;
    let c = denoising.forward_denoise(&inp).unwrap();
    let (diff, _) = common::max_errs(&a, &c);
    println!("fp16 bank rounding moves the prediction by {diff:.3e}");
    assert!(diff > 0.0);
}

fn error_text<T: std::fmt::Debug>(r: mcld::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn missing_tensor_is_named() {
    let case = load_case("model", "unet_plain");
    let cfg = config_at(&case, "/config");
    let mut w = case.weights_with_prefix("");
    let key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    assert!(w.remove(key).is_some());
    let msg = error_text(UNet2DConditionModel::new(vb_from(w), &cfg));
    println!("{msg}");
    assert!(msg.contains(key), "{msg}");

    // A plain UNet has no IP weights: asking for them names the missing key.
    let w = case.weights_with_prefix("");
    let ip = IpAdapter {
        num_tokens: 4,
        scale: 0.5,
    };
    let msg = error_text(UNet2DConditionModel::new_denoising(vb_from(w), &cfg, ip));
    assert!(msg.contains("to_k_ip"), "{msg}");
}

#[test]
fn wrong_shape_is_named() {
    let case = load_case("model", "unet_plain");
    let cfg = config_at(&case, "/config");
    let mut w = case.weights_with_prefix("");
    let key = "down_blocks.1.resnets.0.conv1.weight";
    let t = w.get(key).unwrap();
    let bad = Tensor::zeros((t.dim(0).unwrap() + 1, 3), DType::F32, &common::device()).unwrap();
    w.insert(key.to_string(), bad);
    let msg = error_text(UNet2DConditionModel::new(vb_from(w), &cfg));
    println!("{msg}");
    assert!(msg.contains(key) && msg.contains("shape"), "{msg}");
}

#[test]
fn bad_config_names_key_and_values() {
    let case = load_case("model", "unet_plain");
    let base = config_at(&case, "/config");
    let w = || vb_from(case.weights_with_prefix(""));

    let mut cfg = base.clone();
    cfg.norm_num_groups = 3;
    let msg = error_text(UNet2DConditionModel::new(w(), &cfg));
    println!("{msg}");
    assert!(msg.contains("norm_num_groups = 3"), "{msg}");

    let mut cfg = base.clone();
    cfg.attention_head_dim = mcld::models::unet::PerBlock::One(3);
    let msg = error_text(UNet2DConditionModel::new(w(), &cfg));
    println!("{msg}");
    assert!(msg.contains("attention_head_dim = 3"), "{msg}");

    // Unknown keys are tolerated, a wrong type is not.
    let mut v = case.json["config"].clone();
    v["some_future_key"] = serde_json::json!(42);
    assert!(serde_json::from_value::<Config>(v.clone()).is_ok());
    v["block_out_channels"] = serde_json::json!("wide");
    assert!(serde_json::from_value::<Config>(v).is_err());

    // from_json_file names the file.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let mut v = case.json["config"].clone();
    v["norm_num_groups"] = serde_json::json!(5);
    std::fs::write(&p, v.to_string()).unwrap();
    let msg = error_text(Config::from_json_file(&p));
    println!("{msg}");
    assert!(msg.contains("config.json") && msg.contains("norm_num_groups = 5"));
}

#[test]
fn bad_inputs_are_errors() {
    let case = load_case("model", "unet_plain");
    let unet = plain_model(&case);
    let s = case.f32("input.sample");
    let t = case.get("input.timestep");
    let c = case.f32("input.encoder_hidden_states");
    let (b, ch, h, w) = s.dims4().unwrap();
    let wrong = Tensor::zeros((b, ch + 1, h, w), DType::F32, &common::device()).unwrap();
    assert!(error_text(unet.forward(&wrong, t, &c)).contains("sample"));
    let wrong_ctx = c.narrow(2, 0, c.dim(2).unwrap() - 1).unwrap();
    assert!(error_text(unet.forward(&s, t, &wrong_ctx)).contains("context"));
    let many_t = Tensor::zeros(b + 2, DType::I64, &common::device()).unwrap();
    assert!(error_text(unet.forward(&s, &many_t, &c)).contains("timesteps"));

    // A bank without this model's block names.
    let bank = mcld::models::unet::ReferenceBank::default();
    let ctx = StageContexts::uniform(&c);
    let mut inp = DenoiseInput::new(&s, t, &ctx);
    inp.bank = Some(&bank);
    let msg = error_text(unet.forward_denoise(&inp));
    assert!(msg.contains("reference bank has no entry"), "{msg}");
}

#[test]
fn odd_latent_sizes_round_trip() {
    // Sizes that are not multiples of 2^3 need diffusers' explicit upsample size.
    let case = load_case("model", "unet_plain");
    let unet = plain_model(&case);
    let c = case.f32("input.encoder_hidden_states");
    let b = c.dim(0).unwrap();
    let ch = unet.config().in_channels;
    let s = Tensor::randn(0f32, 1.0, (b, ch, 13, 10), &common::device()).unwrap();
    let t = Tensor::full(500i64, b, &common::device()).unwrap();
    let out = unet.forward(&s, &t, &c).unwrap();
    assert_eq!(out.dims(), &[b, unet.config().out_channels, 13, 10]);
}
