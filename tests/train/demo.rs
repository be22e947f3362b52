//! The validation grid and `mcld demo --train` on the tiny setup: grids of the right size at
//! the validation steps (test pairs, or training pairs when the test list has none), the demo's
//! loss falling by at least 20% over 40 steps, its checkpoint generating with `mcld infer`, and
//! plain `mcld demo --workdir` keeping weights and inputs that `infer` re-runs on.

use std::path::Path;
use std::process::Command;

use mcld::imageops::grid::{GridLayout, MIN_CELL};
use mcld::presets::tree::write_tiny_train_base;
use mcld::train::run::cmd::TrainCommand;
use mcld::train::run::demo::{quarter_means, read_losses, write_demo_dataset};
use mcld::train::run::validate::{grid_path, GRID_COLUMNS};

use crate::common::mcld;

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn dims(path: &Path) -> (u32, u32) {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .dimensions()
}

fn csv_pairs(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count() - 1
}

#[test]
fn validation_grid_is_written_at_the_validation_steps() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("dataset");
    write_demo_dataset(&data).unwrap();
    let config = write_tiny_train_base(d.path(), &data).unwrap();
    let cfg = mcld::config::TrainConfig::load(&config).unwrap();
    let side = cfg.data.train_height as u32;
    assert!(side < MIN_CELL && cfg.data.val_bs == 3);
    let test_rows = csv_pairs(&data.join("test.csv")).min(cfg.data.val_bs) as u32;
    assert!(test_rows >= 1);
    let layout = |rows| GridLayout {
        columns: GRID_COLUMNS.len() as u32,
        rows,
        cell: MIN_CELL,
    };

    // Validation every 2 steps: at steps 1 and 3 of 3.
    let out = d.path().join("runs");
    let cmd = TrainCommand {
        config: config.clone(),
        max_train_steps: Some(3),
        validation_steps: Some(2),
        output_dir: Some(out.clone()),
        device: Some("cpu".into()),
        ..Default::default()
    };
    let outcome = mcld::train::run::cmd::run(&cmd).unwrap();
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let exp = out.join(&cfg.exp_name);
    for step in [1, 3] {
        assert_eq!(
            dims(&grid_path(&exp, step)),
            layout(test_rows).size(),
            "step {step}"
        );
    }
    assert!(!grid_path(&exp, 2).exists());
    let names: Vec<_> = std::fs::read_dir(exp.join("validation"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".png")), "{names:?}");
    // The generated column changes as the weights train; the others are the inputs.
    let a = image::open(grid_path(&exp, 1)).unwrap().to_rgb8();
    let b = image::open(grid_path(&exp, 3)).unwrap().to_rgb8();
    let column = |img: &image::RgbImage, c: u32| {
        let (x, y) = layout(test_rows).cell_origin(0, c);
        image::imageops::crop_imm(img, x, y, MIN_CELL, MIN_CELL)
            .to_image()
            .into_raw()
    };
    assert_eq!(column(&a, 0), column(&b, 0));
    assert_ne!(column(&a, 3), column(&b, 3));

    // No usable test pair: the grid shows training pairs instead.
    std::fs::remove_file(data.join("test.csv")).unwrap();
    let out2 = d.path().join("runs2");
    let cmd = TrainCommand {
        max_train_steps: Some(1),
        output_dir: Some(out2.clone()),
        ..cmd
    };
    let outcome = mcld::train::run::cmd::run(&cmd).unwrap();
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let train_rows = csv_pairs(&data.join("train.csv")).min(cfg.data.val_bs) as u32;
    assert_eq!(
        dims(&grid_path(&out2.join(&cfg.exp_name), 1)),
        layout(train_rows).size()
    );
}

#[test]
fn demo_train_loss_falls_and_its_checkpoint_infers() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    let text = run_ok(
        mcld()
            .args(["demo", "--train", "--train-steps", "40", "--workdir"])
            .arg(&dir),
    );
    assert!(text.contains("learning rate raised to"), "{text}");
    let exp = dir.join("exp_output/demo");
    let losses = read_losses(&exp).unwrap();
    assert_eq!(losses.len(), 40);
    let (first, last) = quarter_means(&losses).unwrap();
    assert!(
        last <= 0.8 * first,
        "last quarter {last} vs first {first}: {losses:?}"
    );
    assert!(exp.join("loss_curve.png").is_file());
    assert!(grid_path(&exp, 1).is_file() && grid_path(&exp, 40).is_file());

    // The checkpoint folder as it is, with `mcld infer`.
    let ckpt = exp.join("checkpoint-40");
    let test = dir.join("dataset");
    let out = d.path().join("trained.png");
    run_ok(
        mcld()
            .arg("infer")
            .arg("--ckpt_dir")
            .arg(&ckpt)
            .arg("--config_path")
            .arg(dir.join("train.yaml"))
            .arg("--source")
            .arg(test.join("test/demo_test_00.jpg"))
            .arg("--texture")
            .arg(test.join("test_texture/demo_test_00.png"))
            .arg("--face")
            .arg(test.join("test_face/demo_test_00.npy"))
            .arg("--pose")
            .arg(test.join("test_densepose/demo_test_01.png"))
            .arg("--out")
            .arg(&out),
    );
    let (w, h) = dims(&out);
    assert!(w > 0 && h > 0);

    // `mcld train` on the same config resumes the demo's run: nothing left to do at step 40.
    let text = run_ok(
        mcld()
            .args(["train", "--resume_from_checkpoint", "latest", "--config"])
            .arg(dir.join("train.yaml")),
    );
    assert!(text.contains("nothing to do"), "{text}");
}

#[test]
fn demo_workdir_keeps_weights_and_inputs_for_infer() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("w");
    run_ok(
        mcld()
            .args(["demo", "--steps", "1", "--out"])
            .arg(d.path().join("sheet.png"))
            .arg("--workdir")
            .arg(&dir),
    );
    for p in ["checkpoints", "pretrained_weights"] {
        assert!(dir.join(p).is_dir(), "{p}");
    }
    let inputs = dir.join("inputs");
    let out = d.path().join("again.png");
    run_ok(
        mcld()
            .arg("infer")
            .arg("--ckpt_dir")
            .arg(dir.join("checkpoints"))
            .arg("--config_path")
            .arg(dir.join("train.yaml"))
            .arg("--source")
            .arg(inputs.join("source.png"))
            .arg("--pose")
            .arg(inputs.join("pose.png"))
            .arg("--texture")
            .arg(inputs.join("texture.png"))
            .arg("--face")
            .arg(inputs.join("face.npy"))
            .arg("--out")
            .arg(&out),
    );
    assert!(dims(&out).0 > 0);
}

/// `mcld demo --train --device`: a device this build cannot use is refused up front, naming the
/// flag, with nothing written (the GPU run passes `--device cuda`).
#[test]
fn demo_train_refuses_a_bad_device_before_writing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    let out = mcld()
        .args([
            "demo",
            "--train",
            "--train-steps",
            "1",
            "--device",
            "tpu",
            "--workdir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad --device was accepted");
    assert!(err.contains("--device") && err.contains("tpu"), "{err}");
    assert!(
        !dir.exists(),
        "the demo wrote {} before refusing",
        dir.display()
    );
}
