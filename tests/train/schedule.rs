//! Learning-rate schedules against values computed from diffusers' `get_scheduler` formulas,
//! and the step-level random draws (shared by all ranks, at the configured frequencies).

use std::path::Path;

use mcld::train::run::lr::{LrScheduler, SCHEDULES};
use mcld::train::step::api::{shared_rng, step_rngs};
use mcld::train::step::trainer::StepDraws;
use rand::Rng;

/// lr at schedule steps 0..=12 for base 1e-3, `num_warmup_steps` 4 (2 x accumulation 2),
/// `num_training_steps` 10 (5 x 2), from diffusers' lr lambdas (evaluated in Python floats).
const EXPECTED: [(&str, [f64; 13]); 6] = [
    ("constant", [1e-3; 13]),
    (
        "constant_with_warmup",
        [
            0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
            0.001,
        ],
    ),
    (
        "linear",
        [
            0.0,
            0.00025,
            0.0005,
            0.00075,
            0.001,
            0.0008333333333333334,
            0.0006666666666666666,
            0.0005,
            0.0003333333333333333,
            0.00016666666666666666,
            0.0,
            0.0,
            0.0,
        ],
    ),
    (
        "cosine",
        [
            0.0,
            0.00025,
            0.0005,
            0.00075,
            0.001,
            0.0009330127018922195,
            0.00075,
            0.0005,
            0.0002500000000000001,
            6.698729810778065e-05,
            0.0,
            6.69872981077807e-05,
            0.0002499999999999998,
        ],
    ),
    (
        "cosine_with_restarts",
        [
            0.0,
            0.00025,
            0.0005,
            0.00075,
            0.001,
            0.0009330127018922195,
            0.00075,
            0.0005,
            0.0002500000000000001,
            6.698729810778065e-05,
            0.0,
            0.0,
            0.0,
        ],
    ),
    (
        "polynomial",
        [
            0.0,
            0.00025,
            0.0005,
            0.00075,
            0.001,
            0.00083335,
            0.0006667,
            0.0005000499999999999,
            0.0003334,
            0.00016674999999999996,
            1e-07,
            1e-07,
            1e-07,
        ],
    ),
];

#[test]
fn lr_schedules_follow_diffusers_get_scheduler() {
    assert_eq!(SCHEDULES.len(), EXPECTED.len());
    for (name, want) in EXPECTED {
        let s = LrScheduler::from_solver(name, 1e-3, false, 2, 5, 2, 3, 1).unwrap();
        assert_eq!((s.warmup, s.total), (4, 10), "{name}");
        for (k, w) in want.iter().enumerate() {
            let got = s.base_lr * s.lambda(k as u64);
            assert!(
                (got - w).abs() <= 1e-15 * w.abs().max(1e-3),
                "{name} at schedule step {k}: {got} vs diffusers {w}"
            );
            // One rank: update k uses schedule step k.
            assert_eq!(s.lr(k as u64), got, "{name}");
        }
        // Two ranks: accelerate steps the schedule once per process per update.
        let two = LrScheduler::from_solver(name, 1e-3, false, 2, 5, 2, 3, 2).unwrap();
        for k in 0..6u64 {
            assert_eq!(two.lr(k), s.lr(2 * k), "{name}, 2 ranks, update {k}");
        }
    }
}

#[test]
fn constant_ignores_the_warmup_and_scale_lr_multiplies() {
    // The reference's own config: constant, lr_warmup_steps 1: full lr from the first step.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = here.join("../shared/data/reference_configs/train.yaml");
    let cfg = mcld::config::TrainConfig::load(&path).unwrap();
    let lc =
        mcld::train::run::cmd::loop_config(&cfg, candle_core::DType::F32, false, 1, &path).unwrap();
    assert_eq!(lc.lr_at(0), 1e-5);
    assert_eq!(lc.lr_at(1), 1e-5);
    // scale_lr: lr x accumulation x train_bs x world size (train.py line 442).
    let s = LrScheduler::from_solver("constant", 1e-5, true, 1, 100, 2, 12, 4).unwrap();
    assert!((s.lr(0) - 1e-5 * 2.0 * 12.0 * 4.0).abs() < 1e-18);
    let err = LrScheduler::from_solver("cosine_annealing", 1e-5, false, 1, 100, 1, 1, 1)
        .unwrap_err()
        .to_string();
    for n in SCHEDULES {
        assert!(err.contains(n), "{err}");
    }
    assert!(err.contains("cosine_annealing"), "{err}");
    // Through the config: the key is named.
    let mut bad = cfg.clone();
    bad.solver.lr_scheduler = "exponential".into();
    let e = mcld::train::run::cmd::loop_config(&bad, candle_core::DType::F32, false, 1, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("solver.lr_scheduler") && e.contains("polynomial"),
        "{e}"
    );
}

#[test]
fn step_level_draws_are_shared_by_ranks_and_sample_draws_are_not() {
    for step in 0..200u64 {
        for micro in 0..2 {
            let mut a = step_rngs(12580, step, 0, micro);
            let mut b = step_rngs(12580, step, 1, micro);
            let da = StepDraws::draw(&mut a.shared, 0.1, 0.1);
            let db = StepDraws::draw(&mut b.shared, 0.1, 0.1);
            assert_eq!(da, db, "step {step} micro {micro}");
            let (x, y): (u64, u64) = (a.local.random(), b.local.random());
            assert_ne!(x, y, "per-rank streams coincide at step {step}");
        }
    }
    // Distinct steps and micro-batches draw independently.
    let mut s0 = shared_rng(1, 0, 0);
    let mut s1 = shared_rng(1, 1, 0);
    let mut m1 = shared_rng(1, 0, 1);
    let (a, b, c): (u64, u64, u64) = (s0.random(), s1.random(), m1.random());
    assert!(a != b && a != c && b != c);
}

#[test]
fn step_level_draws_occur_at_the_configured_rates() {
    let n = 20_000u64;
    for (p_uncond, p_drop) in [(0.1, 0.1), (0.3, 0.05)] {
        let (mut u, mut d) = (0u64, 0u64);
        for step in 0..n {
            let mut r = step_rngs(7, step, 0, 0);
            let dr = StepDraws::draw(&mut r.shared, p_uncond, p_drop);
            u += u64::from(dr.uncond);
            d += u64::from(dr.drop_src);
        }
        // Within 5 binomial standard deviations (a false alarm about once in 3.5 million).
        for (what, k, p) in [("uncond", u, p_uncond), ("drop", d, p_drop)] {
            let mean = n as f64 * p;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            println!("{what}: {k} of {n} (expected {mean:.0} +- {sd:.1})");
            assert!(
                (k as f64 - mean).abs() <= 5.0 * sd,
                "{what}: {k} of {n}, p = {p}"
            );
        }
    }
    // The edge probabilities are exact.
    let mut r = step_rngs(7, 0, 0, 0);
    assert_eq!(
        StepDraws::draw(&mut r.shared, 0.0, 1.0),
        StepDraws {
            uncond: false,
            drop_src: true
        }
    );
}
