//! Helpers for comparing a training op's output and gradients with a reference op.

use candle_core::{DType, Device, Tensor, Var};

use crate::common::max_errs;

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

/// `ours` in `dt` on `dev` against `reference` in f64 on the CPU, both on the same
/// `dt`-rounded values: the output and the gradient of every input (named by `what`, output
/// first), each within `bound` of the largest reference value; returns the worst ratio.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare(
    name: &str,
    what: &[&str],
    inputs: &[Tensor],
    dt: DType,
    dev: &Device,
    bound: f64,
    ours: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let rounded: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dt).unwrap()).collect();
    let on_dev: Vec<Tensor> = rounded.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let refs: Vec<Tensor> = rounded
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let (y, g) = grads_of(&on_dev, dt, ours);
    let (y_ref, g_ref) = grads_of(&refs, dt, reference);
    assert_eq!(what.len(), 1 + g.len(), "{name}: one name per result");
    let pairs = std::iter::once((&y, &y_ref)).chain(g.iter().zip(&g_ref));
    let mut worst = 0f64;
    for (w, (got, want)) in what.iter().zip(pairs) {
        assert_eq!(got.dtype(), dt, "{name} {w} keeps the inputs' dtype");
        assert!(got.device().same_device(dev), "{name} {w} stays on {dev:?}");
        let tag = format!("{name} {dt:?} on {dev:?} {w}");
        worst = worst.max(assert_rel(&tag, got, want, bound));
    }
    worst
}
