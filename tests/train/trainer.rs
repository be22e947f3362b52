//! The whole training step on tiny random base models in the real file layout: starting
//! weights as the reference builds them, random draws, state round trips, half precision and
//! loss scaling.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use mcld::config::TrainConfig;
use mcld::presets::tree::write_tiny_train_base;
use mcld::train::step::api::{step_rngs, Grads, Net, TrainBatch, TrainStep};
use mcld::train::step::init::{initial_weights, InitSources};
use mcld::train::step::setup::build_trainer;
use mcld::train::step::trainer::{randn, McldTrainer};

fn tiny(dir: &Path) -> TrainConfig {
    let cfg = write_tiny_train_base(dir, &dir.join("dataset")).unwrap();
    TrainConfig::load(&cfg).unwrap()
}

/// A batch of 2 with random pixels in the value ranges the loader produces, and a head
/// region (parts 23/24) in the pose so the face term is active.
fn batch(cfg: &TrainConfig, seed: u64) -> TrainBatch {
    let (h, w) = (cfg.data.train_height, cfg.data.train_width);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = |d: &[usize]| randn(&mut rng, d, &Device::Cpu).unwrap();
    let unit = |t: Tensor| (t * 0.5).unwrap().clamp(-1f32, 1f32).unwrap();
    let mut iuv = vec![0f32; 2 * 3 * h * w];
    for b in 0..2 {
        for y in 0..h / 4 {
            for x in w / 4..w / 2 {
                iuv[b * 3 * h * w + 2 * h * w + y * w + x] = (23 + (x % 2)) as f32 / 255.0;
            }
        }
    }
    TrainBatch {
        target: unit(r(&[2, 3, h, w])),
        texture: unit(r(&[2, 3, h, w])),
        clip_src: r(&[2, 3, 224, 224]),
        clip_tex: r(&[2, 3, 224, 224]),
        pose: Tensor::from_vec(iuv, (2, 3, h, w), &Device::Cpu).unwrap(),
        face: r(&[2, 1, 512]),
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn starting_weights_follow_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let src = InitSources {
        unet_dir: cfg.base_model_path.join("unet"),
        controlnet: Some(cfg.controlnet_openpose_path.clone()),
        cond_chan: 3,
        seed: 7,
    };
    let init = initial_weights(&src).unwrap();
    let t = &init.tensors;
    let base = mcld::weights::load(
        &cfg.base_model_path
            .join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // Both UNets start from the base; the reference has no output head.
    for (k, v) in &base {
        let d = &t[&format!("denoising_unet.{k}")];
        assert_eq!(host(d), host(v), "denoising_unet.{k}");
        let r = t.get(&format!("reference_unet.{k}"));
        if k.starts_with("conv_out.") || k.starts_with("conv_norm_out.") {
            assert!(r.is_none(), "reference_unet.{k} should not exist");
        } else {
            assert_eq!(host(r.unwrap()), host(v), "reference_unet.{k}");
        }
    }
    // Fresh bias-free IP projections beside every cross-attention, torch's default range.
    let ip: Vec<&String> = t.keys().filter(|k| k.contains("to_k_ip")).collect();
    let attn2 = base
        .keys()
        .filter(|k| k.ends_with("attn2.to_k.weight"))
        .count();
    assert_eq!(ip.len(), attn2);
    assert!(attn2 > 0);
    for k in &ip {
        let w = &t[*k];
        let bound = 1.0 / (w.dim(1).unwrap() as f32).sqrt();
        let v = host(w);
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(
            v.iter().any(|x| x.abs() > bound / 2.0),
            "{k} looks degenerate"
        );
        assert!(!t.contains_key(&k.replace("weight", "bias")));
    }
    // Pose guider: the ControlNet embedding, conv_out zero.
    let cn = mcld::weights::load(&cfg.controlnet_openpose_path, &Device::Cpu).unwrap();
    for (k, v) in &cn {
        let name = k.strip_prefix("controlnet_cond_embedding.").unwrap();
        let p = host(&t[&format!("pose_guider.{name}")]);
        if name.starts_with("conv_out.") {
            assert!(
                p.iter().all(|&x| x == 0.0),
                "pose_guider.{name} is not zero"
            );
        } else {
            assert_eq!(p, host(v), "pose_guider.{name}");
        }
    }
    // Projector: fresh, queries ~ N(0, 1/dim).
    let lat = host(&t["image_proj.latents"]);
    let var = lat.iter().map(|x| x * x).sum::<f32>() / lat.len() as f32;
    let dim = init.cfg.image_proj.dim as f32;
    assert!((var * dim - 1.0).abs() < 0.2, "latents variance {var}");
    assert!(init.fresh.iter().any(|k| k == "image_proj.latents"));
    assert_eq!(
        init.fresh.iter().filter(|k| k.contains("_ip.")).count(),
        2 * attn2
    );
}

#[test]
fn a_missing_base_tensor_names_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let file = cfg
        .base_model_path
        .join("unet/diffusion_pytorch_model.safetensors");
    let mut w = mcld::weights::load(&file, &Device::Cpu).unwrap();
    w.remove("mid_block.resnets.0.conv1.weight");
    candle_core::safetensors::save(&w, &file).unwrap();
    let err = match build_trainer(&cfg, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("a missing tensor must be an error"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("mid_block.resnets.0.conv1.weight"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

fn run_steps(tr: &mut McldTrainer, cfg: &TrainConfig, from: u64, to: u64) -> Vec<f64> {
    let mut losses = Vec::new();
    for step in from..to {
        let mut rng = step_rngs(cfg.seed, step, 0, 0);
        let g = tr.grads(&batch(cfg, step), &mut rng).unwrap();
        let stats = tr.apply(&g, 1e-3).unwrap();
        assert!(stats.loss.is_finite() && stats.grad_norm.is_finite());
        losses.push(stats.loss);
    }
    losses
}

#[test]
fn state_round_trip_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let mut a = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    run_steps(&mut a, &cfg, 0, 2);
    let ck = dir.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    a.save_state(&ck).unwrap();
    let la = run_steps(&mut a, &cfg, 2, 4);

    let mut b = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    b.load_state(&ck).unwrap();
    assert_eq!(b.step_count(), 2);
    let lb = run_steps(&mut b, &cfg, 2, 4);
    assert_eq!(la, lb, "losses after resume");
    for net in Net::ALL {
        let (wa, wb) = (a.weights(net).unwrap(), b.weights(net).unwrap());
        assert_eq!(wa.len(), wb.len());
        for (k, t) in &wa {
            assert_eq!(host(t), host(&wb[k]), "{k} differs after resume");
        }
    }
    for (ma, mb) in a.opt.m.iter().zip(&b.opt.m) {
        assert_eq!(host(ma), host(mb));
    }

    // A state from another configuration is refused with the file named.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("train_state.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = b.load_state(&bad).unwrap_err().to_string();
    assert!(err.contains("train_state.safetensors"), "{err}");
}

#[test]
fn the_step_learns_and_touches_only_trainable_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let mut tr = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    let frozen_before: HashMap<String, Vec<f32>> = tr
        .params
        .frozen()
        .iter()
        .map(|(k, v)| (k.clone(), host(v)))
        .collect();
    assert!(frozen_before.keys().all(|k| k.contains("up_blocks.3")));
    // Overfit one batch with one draw: the loss must fall.
    let b = batch(&cfg, 0);
    let mut losses = Vec::new();
    for step in 0..12 {
        let mut rng = step_rngs(cfg.seed, 0, 0, 0);
        let g = tr.grads(&b, &mut rng).unwrap();
        losses.push(tr.apply(&g, 2e-3).unwrap().loss);
        assert_eq!(tr.step_count(), step + 1);
    }
    println!("losses {losses:?}");
    assert!(
        losses[11] < 0.8 * losses[0],
        "loss did not fall: {losses:?}"
    );
    for (k, v) in tr.params.frozen() {
        assert_eq!(host(v), frozen_before[k], "frozen {k} changed");
    }
}

/// Half precision against the f32 step on the same draws: f16 computes in f16 with loss
/// scaling; bf16 on the CPU computes in f32 on bf16-rounded weights.
#[test]
fn half_precision_steps_stay_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let b = batch(&cfg, 3);
    let grads_in = |dt: DType| -> (McldTrainer, Grads) {
        let mut tr = build_trainer(&cfg, &Device::Cpu, dt).unwrap();
        let mut rng = step_rngs(cfg.seed, 5, 0, 0);
        let g = tr.grads(&b, &mut rng).unwrap();
        (tr, g)
    };
    let (_, g32) = grads_in(DType::F32);
    for (dt, loss_tol, grad_tol) in [(DType::F16, 1e-2, 5e-2), (DType::BF16, 3e-2, 1e-1)] {
        let (mut tr, g) = grads_in(dt);
        let dl = (g.loss - g32.loss).abs() / g32.loss.abs();
        // Relative error of the whole gradient vector (L2), trainable tensors concatenated.
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in g.tensors.iter().zip(&g32.tensors) {
            num += (a - b)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            den += b
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        let dg = (num / den).sqrt();
        println!("{dt:?}: loss rel err {dl:.2e} (bound {loss_tol}), grad rel L2 err {dg:.2e} (bound {grad_tol})");
        assert!(dl <= loss_tol, "{dt:?} loss off by {dl}");
        assert!(dg <= grad_tol, "{dt:?} gradients off by {dg}");
        let stats = tr.apply(&g, 1e-3).unwrap();
        assert!(!stats.skipped);
        assert_eq!(stats.loss_scale.is_some(), dt == DType::F16);
    }
}

#[test]
fn f16_overflow_skips_the_step_and_lowers_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let mut tr = build_trainer(&cfg, &Device::Cpu, DType::F16).unwrap();
    let scaler = tr.scaler.as_mut().unwrap();
    scaler.scale = 1e30; // beyond f16: the scaled backward overflows
    let before = tr.weights(Net::DenoisingUnet).unwrap();
    let mut rng = step_rngs(cfg.seed, 0, 0, 0);
    let g = tr.grads(&batch(&cfg, 1), &mut rng).unwrap();
    let stats = tr.apply(&g, 1e-3).unwrap();
    assert!(stats.skipped, "the overflowing step must be skipped");
    assert_eq!(stats.loss_scale, Some(5e29));
    let after = tr.weights(Net::DenoisingUnet).unwrap();
    for (k, t) in &before {
        assert_eq!(host(t), host(&after[k]), "{k} changed in a skipped step");
    }
    // torch's GradScaler skips optimizer.step(): the step is taken, no update is counted (the
    // lr schedule and every tensor's bias correction stay where they were).
    assert_eq!(tr.step_count(), 1);
    assert_eq!(tr.updates_applied(), 0);
    assert!(tr.opt.param_steps.iter().all(|&c| c == 0));
    // The next, finite step is the optimizer's first.
    tr.scaler.as_mut().unwrap().scale = 1024.0;
    let mut rng = step_rngs(cfg.seed, 1, 0, 0);
    let g = tr.grads(&batch(&cfg, 2), &mut rng).unwrap();
    assert!(!tr.apply(&g, 1e-3).unwrap().skipped);
    assert_eq!((tr.step_count(), tr.updates_applied()), (2, 1));
    assert!(tr.opt.param_steps.iter().all(|&c| c == 1));
}

/// An unconditional step drawn by the step itself (uncond_ratio 1) leaves every reference-UNet
/// tensor and its AdamW moments bit-identical, and its step count behind.
#[test]
fn an_unconditional_step_leaves_the_reference_unet_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let mut tr = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    tr.cfg.uncond_ratio = 0.0;
    let mut rng = step_rngs(cfg.seed, 0, 0, 0);
    let g = tr.grads(&batch(&cfg, 0), &mut rng).unwrap();
    assert!(
        g.has_grad.iter().all(|h| *h),
        "a conditional step reaches every tensor"
    );
    tr.apply(&g, 1e-3).unwrap();
    let names: Vec<String> = tr
        .params
        .trainable()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let snap = |tr: &McldTrainer| -> Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    host(&tr.params.get(n).unwrap()),
                    host(&tr.opt.m[i]),
                    host(&tr.opt.v[i]),
                )
            })
            .collect()
    };
    let before = snap(&tr);
    tr.cfg.uncond_ratio = 1.0;
    let mut rng = step_rngs(cfg.seed, 1, 0, 0);
    let g = tr.grads(&batch(&cfg, 1), &mut rng).unwrap();
    tr.apply(&g, 1e-3).unwrap();
    let after = snap(&tr);
    for (i, n) in names.iter().enumerate() {
        let same = before[i] == after[i];
        if n.starts_with("reference_unet.") {
            assert!(
                same,
                "{n}: weights or moments moved in an unconditional step"
            );
            assert_eq!(tr.opt.param_steps[i], 1, "{n}");
        } else {
            assert!(!same, "{n} did not move");
            assert_eq!(tr.opt.param_steps[i], 2, "{n}");
        }
    }
    // The counts survive a save and load.
    let ck = dir.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    tr.save_state(&ck).unwrap();
    let mut b = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    b.load_state(&ck).unwrap();
    assert_eq!(b.opt.param_steps, tr.opt.param_steps);
    assert_eq!((b.step_count(), b.updates_applied()), (2, 2));
}

/// train.py lines 355-370: with `pose_guider_pretrain` the ControlNet's embedding with
/// (16, 32, 96, 256) and `cond_chan` inputs (`conv_in1` when not 3, left fresh); without, the
/// class defaults (16, 32, 64, 128), 3 inputs, fresh.
#[test]
fn pose_guider_channels_follow_pretrain_and_cond_chan() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let src = |controlnet: bool, cond_chan: usize| InitSources {
        unet_dir: cfg.base_model_path.join("unet"),
        controlnet: controlnet.then(|| cfg.controlnet_openpose_path.clone()),
        cond_chan,
        seed: 7,
    };
    let c0 = initial_weights(&src(false, 3)).unwrap();
    assert_eq!(c0.cfg.pose_guider.block_out_channels, vec![16, 32, 64, 128]);
    assert_eq!(
        c0.tensors["pose_guider.blocks.5.weight"].dims(),
        &[128, 64, 3, 3]
    );
    assert!(c0.fresh.iter().any(|k| k == "pose_guider.conv_in.weight"));
    let cn = mcld::weights::load(&cfg.controlnet_openpose_path, &Device::Cpu).unwrap();
    let c3 = initial_weights(&src(true, 3)).unwrap();
    assert_eq!(c3.cfg.pose_guider.block_out_channels, vec![16, 32, 96, 256]);
    assert_eq!(
        host(&c3.tensors["pose_guider.conv_in.weight"]),
        host(&cn["controlnet_cond_embedding.conv_in.weight"])
    );
    let c1 = initial_weights(&src(true, 1)).unwrap();
    assert_eq!(
        c1.tensors["pose_guider.conv_in1.weight"].dims(),
        &[16, 1, 3, 3]
    );
    assert!(!c1.tensors.contains_key("pose_guider.conv_in.weight"));
    assert!(c1.fresh.iter().any(|k| k == "pose_guider.conv_in1.weight"));
    assert_eq!(
        host(&c1.tensors["pose_guider.blocks.0.weight"]),
        host(&cn["controlnet_cond_embedding.blocks.0.weight"])
    );
    // A guider that cannot read the 3-channel pose images stops the run before it starts.
    let mut bad = cfg.clone();
    bad.cond_chan = 1;
    let err = match build_trainer(&bad, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("cond_chan 1 must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cond_chan"), "{err}");
}

#[test]
fn non_finite_gradients_stop_an_f32_step_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path());
    let mut tr = build_trainer(&cfg, &Device::Cpu, DType::F32).unwrap();
    let mut rng = step_rngs(cfg.seed, 0, 0, 0);
    let mut g = tr.grads(&batch(&cfg, 1), &mut rng).unwrap();
    g.tensors[0] = (g.tensors[0].ones_like().unwrap() * f64::NAN).unwrap();
    let err = tr.apply(&g, 1e-3).unwrap_err().to_string();
    assert!(
        err.contains("step 1") && err.contains("non-finite"),
        "{err}"
    );
    assert_eq!(tr.step_count(), 0);
}
