//! The training step as `mcld train` runs it (`McldTrainer`: forward, backward, clipping,
//! AdamW) against the `train_steps` fixture (conditional, unconditional, conditional: the
//! reference UNet has no gradient in step 2 and must not move) and the `train_step_eps` fixture
//! (`enable_zero_snr: false`, `snr_gamma: 0`). Shapes and parameters come from the files.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use mcld::train::step::adamw::AdamWConfig;
use mcld::train::step::api::TrainStep;
use mcld::train::step::loss::LossInputs;
use mcld::train::step::trainer::{McldTrainer, StepConfig};

use crate::common::{check_output, load_case, Case};
use crate::step::fixture_setup;

fn adamw_of(p: &serde_json::Value) -> AdamWConfig {
    AdamWConfig {
        beta1: p["betas"][0].as_f64().unwrap(),
        beta2: p["betas"][1].as_f64().unwrap(),
        weight_decay: p["weight_decay"].as_f64().unwrap(),
        eps: p["eps"].as_f64().unwrap(),
        max_grad_norm: p["max_grad_norm"].as_f64().unwrap(),
    }
}

/// The fixture's networks in the trainer `mcld train` builds (no VAE/CLIP: inputs are given
/// encoded).
fn fixture_trainer(case: &Case) -> McldTrainer {
    let p = &case.json["params"];
    let (params, nets, sched) = fixture_setup(case, DType::F32);
    let mut cfg = StepConfig::mcld(nets, DType::F32);
    cfg.adamw = adamw_of(p);
    cfg.snr_gamma = p["snr_gamma"].as_f64().unwrap();
    McldTrainer::without_encoders(cfg, params, sched).unwrap()
}

/// `input.{step}.{name}` when the step has its own, else the shared `input.{name}`.
fn input(case: &Case, step: &str, name: &str) -> Tensor {
    let own = format!("input.{step}.{name}");
    if case.tensors.contains_key(&own) {
        case.f32(&own)
    } else {
        case.f32(&format!("input.{name}"))
    }
}

fn timesteps(case: &Case, step: &str) -> Tensor {
    let own = format!("input.{step}.timesteps");
    if case.tensors.contains_key(&own) {
        case.get(&own).clone()
    } else {
        case.get("input.timesteps").clone()
    }
}

fn host_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn scalar(v: f64) -> Tensor {
    Tensor::new(&[v as f32], &Device::Cpu).unwrap()
}

#[test]
fn train_steps_unconditional_step_leaves_the_reference_unet_untouched() {
    let case = load_case("model", "train_steps");
    let p = &case.json["params"];
    let lr = p["lr"].as_f64().unwrap();
    let kinds: Vec<String> = serde_json::from_value(p["steps"].clone()).unwrap();
    assert!(kinds.iter().any(|k| k == "unconditional"), "{kinds:?}");
    let mut tr = fixture_trainer(&case);
    let names: Vec<String> = tr
        .params
        .trainable()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let before: HashMap<String, Tensor> = names
        .iter()
        .map(|n| (n.clone(), tr.params.get(n).unwrap().copy().unwrap()))
        .collect();
    let pose = (case.f32("input.pose_image_u8") / 255.0).unwrap();
    let face = case.f32("input.face_emb");
    let ref_latents = case.f32("input.ref_latents");
    let mut after_prev: Option<HashMap<String, Vec<u32>>> = None;
    let mut moments_prev: Option<Vec<(Vec<u32>, Vec<u32>)>> = None;
    for (i, kind) in kinds.iter().enumerate() {
        let step = format!("step{}", i + 1);
        let cond = kind == "conditional";
        let latents = input(&case, &step, "latents");
        let noise = input(&case, &step, "noise");
        let t = timesteps(&case, &step);
        let clip_src = input(&case, &step, "clip_src_embeds");
        let clip_tex = input(&case, &step, "clip_tex_embeds");
        let inp = LossInputs {
            latents: &latents,
            noise: &noise,
            timesteps: &t,
            ref_latents: cond.then_some(&ref_latents),
            clip_src: &clip_src,
            clip_tex: &clip_tex,
            face_emb: &face,
            pose: &pose,
        };
        let r = tr.step_inputs(&inp, latents.dim(0).unwrap()).unwrap();
        let out = format!("output.{step}");
        check_output(&case, &format!("{out}.model_pred"), &r.outputs.model_pred);
        check_output(
            &case,
            &format!("{out}.loss_per_sample"),
            &r.outputs.loss_per_sample,
        );
        check_output(&case, &format!("{out}.loss"), &scalar(r.grads.loss));
        // Which tensors got no gradient: exactly the reference UNet, in the unconditional step.
        for (n, has) in names.iter().zip(&r.grads.has_grad) {
            let ref_unet = n.starts_with("reference_unet.");
            assert_eq!(*has, cond || !ref_unet, "{step} ({kind}): gradient of {n}");
        }
        let stats = tr.apply(&r.grads, lr).unwrap();
        assert!(!stats.skipped);
        check_output(&case, &format!("{out}.grad_norm"), &scalar(stats.grad_norm));
        for key in case.keys_with_prefix(&format!("{out}.update.")) {
            let n = key.strip_prefix(&format!("{out}.update.")).unwrap();
            let now = tr.params.get(n).unwrap();
            check_output(&case, &key, &(&before[n] - &now).unwrap());
        }
        let after: HashMap<String, Vec<u32>> = names
            .iter()
            .map(|n| (n.clone(), host_bits(&tr.params.get(n).unwrap())))
            .collect();
        let moments: Vec<(Vec<u32>, Vec<u32>)> = tr
            .opt
            .m
            .iter()
            .zip(&tr.opt.v)
            .map(|(m, v)| (host_bits(m), host_bits(v)))
            .collect();
        if !cond {
            // Bit-identical weights and moments: no decay, no stale momentum.
            let (prev, prev_m) = (after_prev.as_ref().unwrap(), moments_prev.as_ref().unwrap());
            let (mut checked, mut moved) = (0, 0);
            for (j, n) in names.iter().enumerate() {
                if n.starts_with("reference_unet.") {
                    assert!(after[n] == prev[n], "{step}: {n} moved without a gradient");
                    assert!(
                        moments[j] == prev_m[j],
                        "{step}: AdamW moments of {n} moved"
                    );
                    checked += 1;
                } else if after[n] != prev[n] {
                    moved += 1;
                }
            }
            assert!(checked > 0 && moved > 0, "{checked} still, {moved} moved");
        }
        after_prev = Some(after);
        moments_prev = Some(moments);
    }
    // Per-tensor step counts: the reference UNet is one behind per unconditional step.
    let uncond = kinds.iter().filter(|k| *k == "unconditional").count() as u64;
    let total = kinds.len() as u64;
    for (n, c) in names.iter().zip(&tr.opt.param_steps) {
        let want = if n.starts_with("reference_unet.") {
            total - uncond
        } else {
            total
        };
        assert_eq!(*c, want, "AdamW step count of {n}");
    }
    if let Some(c) = p["adamw_step_count_after"]["reference_unet (each tensor)"].as_u64() {
        assert_eq!(c, total - uncond, "the fixture's own count");
    }
    assert_eq!(tr.step_count(), total);
    assert_eq!(tr.updates_applied(), total);
}

#[test]
fn train_step_eps_plain_mse_on_the_noise() {
    let case = load_case("model", "train_step_eps");
    let p = &case.json["params"];
    assert_eq!(p["snr_gamma"].as_f64().unwrap(), 0.0);
    // The scheduler `mcld train` builds from the kwargs with enable_zero_snr false is the
    // fixture's.
    let kw = &case.json["scheduler_config"];
    let mut cfg: mcld::config::TrainConfig = mcld::config::parse_yaml(
        include_str!("../../configs/train/train.yaml"),
        std::path::Path::new("configs/train/train.yaml"),
    )
    .unwrap();
    cfg.enable_zero_snr = p["enable_zero_snr"].as_bool().unwrap();
    cfg.noise_scheduler_kwargs = mcld::config::NoiseSchedulerKwargs {
        num_train_timesteps: kw["num_train_timesteps"].as_u64().unwrap() as usize,
        beta_start: kw["beta_start"].as_f64().unwrap(),
        beta_end: kw["beta_end"].as_f64().unwrap(),
        beta_schedule: kw["beta_schedule"].as_str().unwrap().into(),
        steps_offset: kw["steps_offset"].as_u64().unwrap() as usize,
        clip_sample: kw["clip_sample"].as_bool().unwrap(),
        prediction_type: "epsilon".into(),
        rescale_betas_zero_snr: false,
        timestep_spacing: "leading".into(),
    };
    let ours = mcld::train::step::setup::train_scheduler(&cfg).unwrap();
    let theirs: mcld::scheduler::ddim::DdimConfig = serde_json::from_value(kw.clone()).unwrap();
    assert_eq!(ours.config(), &theirs);

    let mut tr = fixture_trainer(&case);
    tr.scheduler = ours;
    let pose = (case.f32("input.pose_image_u8") / 255.0).unwrap();
    let (latents, noise) = (case.f32("input.latents"), case.f32("input.noise"));
    let (src, tex) = (
        case.f32("input.clip_src_embeds"),
        case.f32("input.clip_tex_embeds"),
    );
    let (face, reference) = (case.f32("input.face_emb"), case.f32("input.ref_latents"));
    let t = case.get("input.timesteps").clone();
    let inp = LossInputs {
        latents: &latents,
        noise: &noise,
        timesteps: &t,
        ref_latents: Some(&reference),
        clip_src: &src,
        clip_tex: &tex,
        face_emb: &face,
        pose: &pose,
    };
    let before: HashMap<String, Tensor> = case
        .keys_with_prefix("output.update.")
        .iter()
        .map(|k| {
            let n = k.strip_prefix("output.update.").unwrap();
            (n.to_string(), tr.params.get(n).unwrap().copy().unwrap())
        })
        .collect();
    let r = tr.step_inputs(&inp, latents.dim(0).unwrap()).unwrap();
    check_output(&case, "output.target", &r.outputs.target);
    check_output(&case, "output.model_pred", &r.outputs.model_pred);
    check_output(&case, "output.loss", &scalar(r.grads.loss));
    let stats = tr.apply(&r.grads, p["lr"].as_f64().unwrap()).unwrap();
    check_output(&case, "output.grad_norm", &scalar(stats.grad_norm));
    for key in case.keys_with_prefix("output.param_after.") {
        let n = key.strip_prefix("output.param_after.").unwrap();
        check_output(&case, &key, &tr.params.get(n).unwrap());
    }
    for (n, b) in &before {
        let key = format!("output.update.{n}");
        check_output(&case, &key, &(b - tr.params.get(n).unwrap()).unwrap());
    }
}
