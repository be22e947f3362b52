//! Config parsing: the shipped configs load, round-trip, and every kind of error names the file,
//! the key and what was expected.

use std::path::{Path, PathBuf};

use mcld::config::{parse_yaml, InferenceConfig, TrainConfig};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn train_text() -> String {
    std::fs::read_to_string(repo("configs/train/train.yaml")).unwrap()
}

#[test]
fn shipped_configs_load() {
    let t = TrainConfig::load(&repo("configs/train/train.yaml")).unwrap();
    assert_eq!(t.data.train_width, 512);
    assert_eq!(t.noise_scheduler_kwargs.beta_schedule, "scaled_linear");
    assert!((t.solver.learning_rate - 1e-5).abs() < 1e-12);
    assert_eq!(t.solver.max_train_steps, 60000);
    let i = InferenceConfig::load(&repo("configs/inference/inference.yaml")).unwrap();
    assert_eq!(i.noise_scheduler_kwargs.prediction_type, "v_prediction");
    assert!(i.noise_scheduler_kwargs.rescale_betas_zero_snr);
    assert_eq!(i.noise_scheduler_kwargs.timestep_spacing, "trailing");
    assert_eq!(i.num_inference_steps, 20);
}

#[test]
fn train_config_round_trips() {
    let path = repo("configs/train/train.yaml");
    let t = TrainConfig::load(&path).unwrap();
    let text = serde_yaml::to_string(&t).unwrap();
    let back: TrainConfig = parse_yaml(&text, &path).unwrap();
    assert_eq!(t, back);
    let i = InferenceConfig::load(&repo("configs/inference/inference.yaml")).unwrap();
    let back: InferenceConfig = parse_yaml(&serde_yaml::to_string(&i).unwrap(), &path).unwrap();
    assert_eq!(i, back);
}

#[test]
fn reference_inference_config_loads_unchanged() {
    // The original's inference_v3.yaml has no mcld keys; defaults fill them.
    let text = "noise_scheduler_kwargs:\n  beta_start: 0.00085\n  beta_end: 0.012\n  \
                beta_schedule: \"linear\"\n  clip_sample: false\n  steps_offset: 1\n  \
                prediction_type: \"v_prediction\"\n  rescale_betas_zero_snr: True\n  \
                timestep_spacing: \"trailing\"\nsampler: DDIM\n";
    let c: InferenceConfig = parse_yaml(text, Path::new("inference_v3.yaml")).unwrap();
    assert_eq!(c.guidance_scale, 3.5);
    assert_eq!(c.noise_scheduler_kwargs.num_train_timesteps, 1000);
}

fn write_tmp(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn unknown_key_is_named() {
    let text = train_text().replace("  train_bs: 12", "  train_bs: 12\n  trian_bs: 3");
    let (_d, p) = write_tmp(&text);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("bad.yaml"), "{e}");
    assert!(e.contains("trian_bs"), "{e}");
}

#[test]
fn wrong_type_is_named_with_key_path() {
    let text = train_text().replace("learning_rate: 1.0e-5", "learning_rate: fast");
    let (_d, p) = write_tmp(&text);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("solver.learning_rate"), "{e}");
    assert!(e.contains("f64") || e.contains("float"), "{e}");
}

#[test]
fn missing_key_is_named() {
    let text = train_text().replace("  max_grad_norm: 1.0\n", "");
    let (_d, p) = write_tmp(&text);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("max_grad_norm"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = TrainConfig::load(Path::new("/nonexistent/train.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/train.yaml"), "{e}");
}

#[test]
fn bad_values_are_refused() {
    let text = train_text().replace(
        "beta_schedule: \"scaled_linear\"",
        "beta_schedule: \"cosine\"",
    );
    let (_d, p) = write_tmp(&text);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("noise_scheduler_kwargs.beta_schedule"), "{e}");

    let text = train_text().replace("uncond_ratio: 0.1", "uncond_ratio: 1.5");
    let (_d, p) = write_tmp(&text);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("uncond_ratio"), "{e}");

    let (_d, p) = write_tmp("noise_scheduler_kwargs:\n  beta_start: 0.1\n  beta_end: 0.2\n  beta_schedule: linear\nsampler: Euler\n");
    let e = InferenceConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("sampler"), "{e}");
}

fn reference_config(name: &str) -> PathBuf {
    repo(&format!("../shared/data/reference_configs/{name}"))
}

/// The reference's own files, unchanged: its current train.yaml, its first commit's (with the
/// four keys the later one dropped), and the three inference configs.
#[test]
fn reference_config_files_load_unchanged() {
    let cur = TrainConfig::load(&reference_config("train.yaml")).unwrap();
    assert_eq!(cur.data.train_bs, 12);
    assert_eq!(cur.solver.lr_scheduler, "constant");
    assert!(cur.validation_resume_dir.is_none());
    let first = TrainConfig::load(&reference_config("train_first_commit.yaml")).unwrap();
    assert_eq!(first.data.train_bs, 8);
    assert_eq!(
        first.validation_resume_dir.as_deref(),
        Some(Path::new("./exp_output/deepfashion_stage1"))
    );
    assert!(first.pose_guider_path.is_some());
    // The dropped keys are named at start-up, with what happens instead.
    let notes = first.notes().join("\n");
    for k in [
        "validation_resume_dir",
        "denoising_unet_path",
        "reference_unet_path",
        "pose_guider_path",
    ] {
        assert!(notes.contains(k), "{k} not named: {notes}");
    }
    // The current file: only its meta_paths (read by neither train.py's dataset nor mcld).
    assert!(
        cur.notes().len() == 1 && cur.notes()[0].contains("meta_paths"),
        "{:?}",
        cur.notes()
    );
    for v in [
        "inference_v1.yaml",
        "inference_v2.yaml",
        "inference_v3.yaml",
    ] {
        let c = InferenceConfig::load(&reference_config(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(c.sampler, "DDIM", "{v}");
        let u = c.unet_additional_kwargs.as_ref().unwrap();
        // v1 and v2 ask for motion modules: said, not silently dropped.
        if u.use_motion_module {
            assert!(
                c.notes().iter().any(|n| n.contains("use_motion_module")),
                "{v}: {:?}",
                c.notes()
            );
        }
    }
    let v3 = InferenceConfig::load(&reference_config("inference_v3.yaml")).unwrap();
    assert!(v3.notes().is_empty(), "{:?}", v3.notes());
}

/// Every key set to a value mcld does not follow is named at start-up with what happens
/// instead; the reference's values give no message.
#[test]
fn unsupported_values_are_named_with_what_happens_instead() {
    let path = repo("configs/train/train.yaml");
    let base = TrainConfig::load(&path).unwrap();
    assert!(base.notes().is_empty(), "{:?}", base.notes());
    let mut c = base.clone();
    c.solver.use_8bit_adam = true;
    c.solver.enable_xformers_memory_efficient_attention = true;
    c.data.texture_clip_condition = true;
    c.data.texture_unet_condition = false;
    c.data.pose_type = "openpose".into();
    c.data.clip_type = "face".into();
    c.data.use_face_emb = false;
    c.data.meta_paths = vec!["./data/fashion_meta.json".into()];
    c.noise_scheduler_kwargs.beta_schedule = "linear".into();
    let notes = c.notes();
    let all = notes.join("\n");
    assert!(
        all.contains("8-bit AdamW is not available; using AdamW with f32 state"),
        "{all}"
    );
    for k in [
        "use_8bit_adam",
        "enable_xformers_memory_efficient_attention",
        "texture_clip_condition",
        "texture_unet_condition",
        "pose_type",
        "clip_type",
        "use_face_emb",
        "meta_paths",
        "beta_schedule",
    ] {
        assert!(all.contains(k), "{k} not named: {all}");
    }
    assert_eq!(notes.len(), 9, "{all}");
    // A launched world size other than num_processes is a warning.
    let lr =
        mcld::train::run::lr::LrScheduler::from_solver("constant", 1e-5, false, 1, 10, 1, 1, 3)
            .unwrap();
    let w = mcld::train::run::cmd::startup_notes(&base, 3, &lr).join("\n");
    assert!(w.contains("warning") && w.contains("num_processes"), "{w}");
    assert!(mcld::train::run::cmd::startup_notes(&base, 2, &lr).is_empty());
    // mixed_precision picks the networks' compute dtype, weight_dtype the encoders'.
    let mut m = base.clone();
    m.solver.mixed_precision = "no".into();
    m.weight_dtype = "fp16".into();
    let cmd = mcld::train::run::cmd::TrainCommand::default();
    assert_eq!(
        cmd.dtypes(&m).unwrap(),
        (candle_core::DType::F32, candle_core::DType::F16)
    );
    let mut bad = train_text();
    bad = bad.replace("mixed_precision: \"fp16\"", "mixed_precision: \"fp8\"");
    let (_d, p) = write_tmp(&bad);
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("solver.mixed_precision"), "{e}");
}
