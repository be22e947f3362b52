//! The training attention for CUDA tensors (`ops::cuda::attention`, blocks of query rows in
//! candle tensor ops) run on the CPU, against the CPU training op (`ops::attention::grad`,
//! itself checked against finite differences in the train crate): output and the gradients of
//! q, k and v. The same tensor code runs on a GPU; `cuda_ops` compares it there.

use candle_core::{DType, Device, Tensor, Var};

use crate::common::max_errs;
use mcld::ops::attention::grad;
use mcld::ops::cuda::attention::attention_blocked;

/// Uniform values in [-1, 1) from a seeded xorshift, as an f64 CPU tensor.
pub(crate) fn rand(seed: u64, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// `f(inputs)` and the gradients of `sum(f(inputs) * r)` with respect to every input; `r` is
/// random (seed 999), rounded to `r_dtype` first so runs in different dtypes share it.
pub(crate) fn grads_of(
    inputs: &[Tensor],
    r_dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&t);
    let r = rand(999, y.dims())
        .to_dtype(r_dtype)
        .unwrap()
        .to_dtype(y.dtype())
        .unwrap()
        .to_device(y.device())
        .unwrap();
    let store = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            store
                .get(v.as_tensor())
                .expect("a gradient for every input")
                .clone()
        })
        .collect();
    (y, grads)
}

/// Asserts max |got - want| <= bound * max |want|, printing the figure either way.
pub(crate) fn assert_rel(what: &str, got: &Tensor, want: &Tensor, bound: f64) -> f64 {
    let (err, mx) = max_errs(got, want);
    let rel = err / mx.max(1e-30);
    println!("{what}: max|diff| / max|ref| {rel:.2e} (bound {bound:.0e})");
    assert!(
        rel <= bound,
        "{what}: relative error {rel:.2e} exceeds {bound:.0e}"
    );
    rel
}

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
    let rounded: Vec<Tensor> = attn_inputs(c, seed)
        .iter()
        .map(|t| t.to_dtype(dt).unwrap())
        .collect();
    let ours: Vec<Tensor> = rounded.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let refs: Vec<Tensor> = rounded
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let (y, g) = grads_of(&ours, dt, &|t| blocked(t, c.7));
    let (y_ref, g_ref) = grads_of(&refs, dt, &cpu_op);
    let mut worst = 0f64;
    for (what, got, want) in [
        ("out", &y, &y_ref),
        ("dq", &g[0], &g_ref[0]),
        ("dk", &g[1], &g_ref[1]),
        ("dv", &g[2], &g_ref[2]),
    ] {
        assert_eq!(got.dtype(), dt, "{what} keeps the inputs' dtype");
        let name = format!("attention {} {dt:?} on {dev:?} {what}", c.0);
        worst = worst.max(assert_rel(&name, got, want, bound));
    }
    worst
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
