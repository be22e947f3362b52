//! GroupNorm(+SiLU), LayerNorm and GEGLU of `ops::cuda` (candle tensor code, the training ops
//! for CUDA tensors) run on the CPU, against the CPU training ops (`ops::norm::grad`,
//! `ops::geglu_grad`, checked against finite differences in the train crate): the output and
//! the gradient of every input.

use candle_core::{DType, Device, Tensor};

use crate::grad_check::{compare, rand};
use mcld::ops::cuda::{geglu, norm};
use mcld::ops::norm::grad;

/// Bounds per dtype (relative to the largest reference value): f32 from the summation order;
/// f16/bf16 a few units of their rounding (the output and gradients are rounded, statistics
/// and sums are f32). Worst measured on the CPU: f32 2.5e-7, f16 4.3e-4, bf16 2.7e-3.
pub(crate) const BOUNDS: [(DType, f64); 3] =
    [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)];

/// (name, input dims, groups (0: LayerNorm), SiLU)
type Case = (&'static str, &'static [usize], usize, bool);

/// GroupNorm with and without SiLU (one channel per group, several; planes of one and many
/// pixels), LayerNorm over rows of a 3-d input.
const CASES: [Case; 5] = [
    ("group_norm_silu", &[2, 8, 5, 6], 4, true),
    ("group_norm", &[2, 8, 5, 6], 4, false),
    ("group_norm_per_channel", &[3, 6, 7, 3], 6, true),
    ("group_norm_1px", &[2, 12, 1, 1], 3, false),
    ("layer_norm", &[2, 7, 24], 0, false),
];

fn inputs(c: Case, seed: u64) -> Vec<Tensor> {
    let ch = if c.2 == 0 { c.1[c.1.len() - 1] } else { c.1[1] };
    vec![
        // An offset, so the centring matters.
        rand(seed, c.1).affine(2.0, 0.5).unwrap(),
        (rand(seed + 1, &[ch]) + 1.0).unwrap(),
        rand(seed + 2, &[ch]),
    ]
}

fn ours(c: Case, t: &[Tensor], cuda_entry: bool) -> Tensor {
    let y = match (c.2, cuda_entry) {
        (0, false) => norm::layer_norm_tensor_ops(&t[0], 1e-5, &t[1], &t[2]),
        (0, true) => norm::layer_norm(&t[0], 1e-5, &t[1], &t[2]),
        (g, false) => norm::group_norm_tensor_ops(&t[0], g, 1e-5, &t[1], &t[2], c.3),
        (g, true) => norm::group_norm(&t[0], g, 1e-5, &t[1], &t[2], c.3),
    };
    y.unwrap().expect("the tensor-op norm applies")
}

fn cpu_op(c: Case, t: &[Tensor]) -> Tensor {
    let y = match c.2 {
        0 => grad::layer_norm(&t[0], 1e-5, &t[1], &t[2]),
        g => grad::group_norm(&t[0], g, 1e-5, &t[1], &t[2], c.3),
    };
    y.unwrap().expect("the CPU norm op applies")
}

/// Every case in `dt` on `dev` against the CPU op in f64 (`cuda_entry`: through the functions
/// that take CUDA tensors only).
pub(crate) fn compare_norms(dt: DType, dev: &Device, bound: f64, cuda_entry: bool) -> f64 {
    let mut worst = 0f64;
    for (i, c) in CASES.into_iter().enumerate() {
        let what = ["out", "dx", "dw", "db"];
        let f = |t: &[Tensor]| ours(c, t, cuda_entry);
        let r = |t: &[Tensor]| cpu_op(c, t);
        let e = compare(
            c.0,
            &what,
            &inputs(c, 500 + 10 * i as u64),
            dt,
            dev,
            bound,
            &f,
            &r,
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn tensor_norms_match_the_cpu_ops() {
    compare_norms(DType::F64, &Device::Cpu, 1e-12, false);
    for (dt, bound) in BOUNDS {
        compare_norms(dt, &Device::Cpu, bound, false);
    }
}

/// The CUDA-only entry points leave CPU tensors alone.
#[test]
fn tensor_norm_entry_points_skip_cpu_tensors() {
    let t = inputs(CASES[0], 1);
    assert!(norm::group_norm(&t[0], 4, 1e-5, &t[1], &t[2], true)
        .unwrap()
        .is_none());
    let t = inputs(CASES[4], 2);
    assert!(norm::layer_norm(&t[0], 1e-5, &t[1], &t[2])
        .unwrap()
        .is_none());
    let a = mcld::ops::cuda::attention::attention(&t[0], &t[0], &t[0]).unwrap();
    assert!(a.is_none());
}

/// GEGLU inputs (.., 2 * inner): one token row, several rows of a 3-d input.
const GEGLU_DIMS: [&[usize]; 2] = [&[1, 1, 6], &[2, 5, 2 * 24]];

/// GEGLU in `dt` on `dev` against the CPU op in f64 (`cuda_entry`: through the function that
/// takes CUDA tensors only).
pub(crate) fn compare_geglu(dt: DType, dev: &Device, bound: f64, cuda_entry: bool) -> f64 {
    let mut worst = 0f64;
    for (i, dims) in GEGLU_DIMS.into_iter().enumerate() {
        let f = |t: &[Tensor]| {
            let y = if cuda_entry {
                geglu::geglu(&t[0])
            } else {
                geglu::geglu_tensor_ops(&t[0])
            };
            y.unwrap().expect("the tensor-op GEGLU applies")
        };
        let r = |t: &[Tensor]| {
            mcld::ops::geglu_grad::geglu(&t[0])
                .unwrap()
                .expect("the CPU GEGLU op applies")
        };
        // Gate values over [-3, 3): GELU's bend and both tails.
        let h = rand(600 + i as u64, dims).affine(3.0, 0.0).unwrap();
        let e = compare("geglu", &["out", "dh"], &[h], dt, dev, bound, &f, &r);
        worst = worst.max(e);
    }
    worst
}

#[test]
fn tensor_geglu_matches_the_cpu_op() {
    compare_geglu(DType::F64, &Device::Cpu, 1e-12, false);
    for (dt, bound) in BOUNDS {
        compare_geglu(dt, &Device::Cpu, bound, false);
    }
    let h = rand(9, &[2, 8]);
    assert!(
        geglu::geglu(&h).unwrap().is_none(),
        "CPU tensors are left alone"
    );
}
