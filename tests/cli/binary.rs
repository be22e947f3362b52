//! The `mcld` binary: help text, flag spellings, bad input.

use std::process::Command;

fn mcld() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mcld"))
}

#[test]
fn help_lists_every_subcommand() {
    let out = mcld().arg("--help").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for c in ["prepare", "train", "test", "evaluate", "infer"] {
        assert!(s.contains(c), "{c} missing from --help:\n{s}");
    }
}

#[test]
fn reference_flag_spellings_and_aliases_parse() {
    for flag in ["--save_path", "--img_path", "--save-path"] {
        let out = mcld()
            .args(["evaluate", flag, "a", "--gt_path", "b", "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = mcld().args(["test", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("--ckpt_dir") && s.contains("--config_path"),
        "{s}"
    );
}

#[test]
fn bad_device_is_an_error() {
    let out = mcld()
        .args(["prepare", "--device", "tpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
}

#[test]
fn train_with_bad_config_names_the_file() {
    let out = mcld()
        .args(["train", "--config", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.yaml"));
}
