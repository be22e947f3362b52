//! The CUDA training convolution's ops (`ops::cuda::conv`: forward, backward-data and
//! backward-filter ops, bias sum) run on the CPU, where their `cpu_fwd` take the CPU training
//! op's kernels: this checks the ops' wiring (arguments, shapes, which gradients, the bias sum)
//! against the CPU op (`ops::conv_grad`) in every build. `cuda_ops` runs the same cases on a
//! GPU, where the ops call cuDNN.

use candle_core::{DType, Device, Tensor, Var};

use crate::grad_check::{assert_rel, compare, rand};
use mcld::ops::{conv::conv2d_forward, conv_grad, cuda};

/// (name, n, ci, h, w, co, k, stride, padding, dilation, bias)
pub(crate) type Case = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
);

/// 3x3 stride 1 padded; 3x3 stride 2 whose height and width leave different remainders; 1x1;
/// dilation 2; unpadded without bias; and enough channels for cuDNN's tensor-core algorithms.
pub(crate) const CASES: [Case; 6] = [
    ("3x3_s1_p1", 2, 8, 12, 10, 16, 3, 1, 1, 1, true),
    ("3x3_s2_p1_uneven", 2, 8, 13, 10, 12, 3, 2, 1, 1, true),
    ("1x1", 2, 16, 9, 7, 8, 1, 1, 0, 1, true),
    ("3x3_p2_d2", 1, 6, 11, 9, 10, 3, 1, 2, 2, true),
    ("3x3_p0_nobias", 1, 5, 8, 9, 7, 3, 1, 0, 1, false),
    ("3x3_64ch", 2, 64, 24, 20, 64, 3, 1, 1, 1, true),
];

pub(crate) fn inputs(c: Case, seed: u64) -> Vec<Tensor> {
    let (_, n, ci, h, w, co, k, .., bias) = c;
    let scale = 1.0 / ((ci * k * k) as f64).sqrt();
    let mut t = vec![
        rand(seed, &[n, ci, h, w]),
        (rand(seed + 1, &[co, ci, k, k]) * scale).unwrap(),
    ];
    if bias {
        t.push(rand(seed + 2, &[co]));
    }
    t
}

/// Which function runs the convolution under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) enum Route {
    /// `ops::cuda::conv::conv2d_op` on any device (the wiring check on the CPU).
    Ops,
    /// `ops::cuda::conv::conv2d`, CUDA tensors only.
    Cuda,
    /// The network's entry point `ops::conv::conv2d_forward`.
    Entry,
    /// The CPU training op `ops::conv_grad::conv2d` (the reference).
    Cpu,
}

pub(crate) fn run(c: Case, t: &[Tensor], route: Route) -> Tensor {
    let (.., s, p, d, _) = c;
    let b = t.get(2);
    let y = match route {
        Route::Ops => cuda::conv::conv2d_op(&t[0], &t[1], b, p, s, d, 1),
        Route::Cuda => cuda::conv::conv2d(&t[0], &t[1], b, p, s, d, 1),
        Route::Entry => return conv2d_forward(&t[0], &t[1], b, p, s, d, 1).unwrap(),
        Route::Cpu => conv_grad::conv2d(&t[0], &t[1], b, p, s, d, 1),
    };
    y.unwrap().expect("the conv op applies")
}

/// The output and gradients through `route` in `dt` on `dev` against the CPU op in f64.
pub(crate) fn compare_conv(c: Case, seed: u64, dt: DType, dev: &Device, bound: f64, route: Route) {
    let what = ["out", "dx", "dw", "db"];
    let what = &what[..if c.10 { 4 } else { 3 }];
    let name = format!("conv {} via {route:?}", c.0);
    let ours = |t: &[Tensor]| run(c, t, route);
    let reference = |t: &[Tensor]| run(c, t, Route::Cpu);
    compare(
        &name,
        what,
        &inputs(c, seed),
        dt,
        dev,
        bound,
        &ours,
        &reference,
    );
}

/// On the CPU the ops run the CPU op's own kernels, so f64 agrees to rounding (the bias sum
/// differs in order) and f32 within the summation differences of the bias gradient.
#[test]
fn conv_ops_wiring_matches_the_cpu_op() {
    for (i, c) in CASES.into_iter().enumerate() {
        compare_conv(
            c,
            10 * i as u64,
            DType::F64,
            &Device::Cpu,
            1e-12,
            Route::Ops,
        );
        compare_conv(c, 10 * i as u64, DType::F32, &Device::Cpu, 1e-5, Route::Ops);
    }
    // The CUDA-only entry leaves CPU tensors alone.
    let t = inputs(CASES[0], 1);
    let (.., s, p, d, _) = CASES[0];
    let y = cuda::conv::conv2d(&t[0], &t[1], t.get(2), p, s, d, 1).unwrap();
    assert!(y.is_none());
}

/// Only the arguments that track get gradients: x alone, w alone (the bias constant).
#[test]
fn conv_ops_form_only_the_tracked_gradients() {
    let c = CASES[1];
    let t = inputs(c, 40);
    for tracked in [0, 1] {
        let var = Var::from_tensor(&t[tracked]).unwrap();
        let mut args = t.clone();
        args[tracked] = var.as_tensor().clone();
        let store = run(c, &args, Route::Ops)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = store.get(var.as_tensor()).expect("the tracked gradient");
        assert!(store.get(&t[1 - tracked]).is_none() && store.get(&t[2]).is_none());
        let var_ref = Var::from_tensor(&t[tracked]).unwrap();
        let mut args = t.clone();
        args[tracked] = var_ref.as_tensor().clone();
        let store_ref = run(c, &args, Route::Cpu)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = store_ref.get(var_ref.as_tensor()).unwrap();
        assert_rel(
            &format!("conv ops, only input {tracked} tracks"),
            got,
            want,
            1e-12,
        );
    }
}
