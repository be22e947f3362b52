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
