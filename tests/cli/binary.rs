//! The `mcld` binary: help text, flag spellings, bad input.

use crate::common::mcld;

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

#[test]
fn an_error_prints_each_cause_once() {
    let gone = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file (os error 2)");
    // The I/O error's text is in the message already: one line, the cause not repeated.
    let r = mcld::cli::CliError::from(mcld::Error::io("/data/x.png", gone())).report();
    assert_eq!(r, "error: /data/x.png: No such file (os error 2)");

    // A cause the message does not carry gets a line of its own.
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "loading the UNet failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let r = mcld::cli::CliError::from(Outer(gone())).report();
    assert_eq!(
        r,
        "error: loading the UNet failed\n  caused by: No such file (os error 2)"
    );
}

#[test]
fn a_missing_file_is_reported_once_by_the_binary() {
    let d = tempfile::tempdir().unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/train/train.yaml");
    // The config's dataset root is relative and absent here, so test.csv does not open.
    let out = mcld()
        .current_dir(d.path())
        .args(["test", "--config_path"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test.csv"), "{err}");
    // One line, the OS error once (it was printed again as the I/O error's source).
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
