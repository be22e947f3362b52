//! `mcld bench pipeline` refuses bad settings before building gigabytes of random weights.
//! (The timing run itself is a manual command: full-size networks need ~9 GiB of memory.)

use crate::common::run_mcld as run;

#[test]
fn bad_settings_fail_fast_with_a_reason() {
    let (ok, text) = run(&["bench", "pipeline", "--size", "100"]);
    assert!(
        !ok && text.contains("--size 100") && text.contains("64"),
        "{text}"
    );
    let (ok, text) = run(&["bench", "pipeline", "--images", "0"]);
    assert!(!ok && text.contains("--images"), "{text}");
    let (ok, text) = run(&["bench", "pipeline", "--dtype", "int8"]);
    assert!(!ok && text.contains("int8"), "{text}");
}
