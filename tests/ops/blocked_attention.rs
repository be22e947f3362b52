//! The training attention for CUDA tensors (`ops::cuda::attention`, blocks of query rows in
//! candle tensor ops) run on the CPU, against the CPU training op (`ops::attention::grad`,
//! itself checked against finite differences in the train crate): output and the gradients of
//! q, k and v. The same tensor code runs on a GPU; `cuda_ops` compares it there.

use candle_core::{DType, Device, Tensor, Var};

use crate::grad_check::{assert_rel, compare, grads_of, rand};
use mcld::ops::attention::grad;
use mcld::ops::cuda::attention::attention_blocked;

/// (name, B, heads, Tq, Tk, d, dv, score budget per block).
pub(crate) type AttnCase = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// Self-attention, cross-attention with dv != d, and query rows in several blocks (a ragged
/// last one) through a small score budget.
pub(crate) const ATTN_CASES: [AttnCase; 4] = [
    ("self", 2, 3, 40, 40, 8, 8, 1 << 26),
    ("cross_dv", 2, 3, 40, 7, 8, 12, 1 << 26),
    ("blocks", 1, 2, 45, 30, 4, 6, 480),
    ("blocks_cross", 2, 2, 33, 77, 16, 24, 2 * 2 * 77 * 5),
];

pub(crate) fn attn_inputs(c: AttnCase, seed: u64) -> Vec<Tensor> {
    let (_, b, h, tq, tk, d, dv, _) = c;
    vec![
        rand(seed, &[b, h, tq, d]),
        rand(seed + 1, &[b, h, tk, d]),
        rand(seed + 2, &[b, h, tk, dv]),
    ]
}

pub(crate) fn blocked(t: &[Tensor], max_scores: usize) -> Tensor {
    attention_blocked(&t[0], &t[1], &t[2], max_scores)
        .unwrap()
        .expect("the blocked attention applies")
}

/// The CPU training op (f32 or f64 CPU tensors).
pub(crate) fn cpu_op(t: &[Tensor]) -> Tensor {
    grad::attention(&t[0], &t[1], &t[2])
        .unwrap()
        .expect("the CPU attention op applies")
}

/// Output and gradients of the blocked attention in `dt` (on `dev`) against the CPU op in
/// f64 on the same `dt`-rounded values; returns the worst relative error.
pub(crate) fn compare_attention(
    c: AttnCase,
    seed: u64,
    dt: DType,
    dev: &Device,
    bound: f64,
) -> f64 {
    let name = format!("attention {}", c.0);
    let what = ["out", "dq", "dk", "dv"];
    let ours = |t: &[Tensor]| blocked(t, c.7);
    compare(
        &name,
        &what,
        &attn_inputs(c, seed),
        dt,
        dev,
        bound,
        &ours,
        &cpu_op,
    )
}

#[test]
fn blocked_attention_matches_the_cpu_op_in_f64_and_f32() {
    for (i, c) in ATTN_CASES.into_iter().enumerate() {
        compare_attention(c, 10 * i as u64, DType::F64, &Device::Cpu, 1e-12);
        compare_attention(c, 10 * i as u64, DType::F32, &Device::Cpu, 1e-5);
    }
}

/// Half precision through the same code on the CPU (candle's CPU matmul accumulates in f32,
/// as cuBLAS does): the probabilities and dS are rounded to the inputs' dtype before their
/// products, so the bounds are a few units of that dtype's rounding (f16 2^-11, bf16 2^-8);
/// worst measured here: f16 8.3e-4, bf16 5.8e-3.
#[test]
fn blocked_attention_half_precision_within_bounds() {
    for (i, c) in ATTN_CASES.into_iter().enumerate() {
        compare_attention(c, 10 * i as u64, DType::F16, &Device::Cpu, 3e-3);
        compare_attention(c, 10 * i as u64, DType::BF16, &Device::Cpu, 2e-2);
    }
}

/// Heads read from strided views (split from (B, T, heads * d)), the context as both keys and
/// values (its gradient is the sum of both uses), and inputs that do not track.
#[test]
fn blocked_attention_views_shared_inputs_and_untracked() {
    let split = |x: &Tensor, h: usize| {
        let (b, t, c) = x.dims3().unwrap();
        x.reshape((b, t, h, c / h))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let inputs = [rand(70, &[2, 9, 12]), rand(71, &[2, 5, 12])];
    let ours = grads_of(&inputs, DType::F64, &|t| {
        let (q, kv) = (split(&t[0], 3), split(&t[1], 3));
        blocked(&[q, kv.clone(), kv], 2 * 3 * 5 * 4)
    });
    let want = grads_of(&inputs, DType::F64, &|t| {
        let (q, kv) = (split(&t[0], 3), split(&t[1], 3));
        cpu_op(&[q, kv.clone(), kv])
    });
    assert_rel("strided out", &ours.0, &want.0, 1e-12);
    assert_rel("strided dx", &ours.1[0], &want.1[0], 1e-12);
    assert_rel("strided dctx", &ours.1[1], &want.1[1], 1e-12);
    // Without tracking the op still gives the output, and nothing tracks it.
    let t = attn_inputs(ATTN_CASES[1], 80);
    let y = blocked(&t, 1 << 26);
    assert!(!y.track_op());
    assert_rel("untracked out", &y, &cpu_op(&t), 1e-12);
    // Only v tracks: the backward pass forms dV alone.
    let v = Var::from_tensor(&t[2]).unwrap();
    let y = blocked(
        &[t[0].clone(), t[1].clone(), v.as_tensor().clone()],
        1 << 26,
    );
    let store = y.sum_all().unwrap().backward().unwrap();
    assert!(store.get(&t[0]).is_none());
    let dv = store.get(v.as_tensor()).expect("dv");
    let vv = Var::from_tensor(&t[2]).unwrap();
    let y_ref = cpu_op(&[t[0].clone(), t[1].clone(), vv.as_tensor().clone()]);
    let dv_ref = y_ref.sum_all().unwrap().backward().unwrap();
    assert_rel("dv alone", dv, dv_ref.get(vv.as_tensor()).unwrap(), 1e-12);
}
