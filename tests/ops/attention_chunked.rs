//! The shared attention: slicing the query rows must not change the result, and gradients
//! must still flow when the inputs are trained.

use crate::common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_errs, naive_attention as naive};
use mcld::ops::attention::{attention, attention_chunked};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    max_errs(a, b).0
}

fn qkv(tq: usize, tk: usize) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (2, 3, tq, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (2, 3, tk, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (2, 3, tk, 8), &dev).unwrap();
    (q, k, v)
}

#[test]
fn slicing_query_rows_keeps_the_result() {
    let (q, k, v) = qkv(37, 11);
    let want = naive(&q, &k, &v);
    let whole = attention(&q, &k, &v).unwrap();
    // 2 x 3 x 11 scores per query row: budgets of 1, 5 and 16 rows, and one below a row.
    for budget in [66, 330, 1056, 1] {
        let got = attention_chunked(&q, &k, &v, budget).unwrap();
        assert_eq!(got.dims(), whole.dims());
        let e = max_abs(&got, &want);
        println!("budget {budget}: max_abs_err vs f64 {e:.3e}");
        assert!(e < 1e-5, "chunked attention off by {e}");
        assert!(max_abs(&got, &whole) < 1e-6);
    }
    // Cross-attention shapes (few keys) and a single query row.
    let (q, k, v) = qkv(1, 77);
    assert!(
        max_abs(
            &attention_chunked(&q, &k, &v, 10).unwrap(),
            &naive(&q, &k, &v)
        ) < 1e-5
    );
}

#[test]
fn half_precision_inputs_keep_their_dtype() {
    let (q, k, v) = qkv(16, 16);
    let want = naive(&q, &k, &v);
    for dt in [DType::F16, DType::BF16] {
        let got = attention_chunked(
            &q.to_dtype(dt).unwrap(),
            &k.to_dtype(dt).unwrap(),
            &v.to_dtype(dt).unwrap(),
            200,
        )
        .unwrap();
        assert_eq!(got.dtype(), dt);
        let e = max_abs(&got, &want);
        println!("{dt:?}: max_abs_err vs f64 {e:.3e}");
        assert!(e < 5e-2, "{dt:?} attention off by {e}");
    }
}

#[test]
fn gradients_flow_through_sliced_attention() {
    let (q0, k0, v0) = qkv(9, 5);
    let q = Var::from_tensor(&q0).unwrap();
    let loss = |q: &Tensor| {
        attention_chunked(q, &k0, &v0, 2 * 3 * 5 * 2)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(q.as_tensor()).backward().unwrap();
    let g = grads.get(q.as_tensor()).expect("no gradient for q");
    // Central finite difference on a few entries of q.
    let flat = q0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gf = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let h = 1e-2f32;
    for idx in [0usize, 17, 100, 321] {
        let mut p = flat.clone();
        p[idx] += h;
        let lp = loss(&Tensor::from_vec(p.clone(), q0.shape(), &Device::Cpu).unwrap())
            .to_scalar::<f32>()
            .unwrap();
        p[idx] -= 2.0 * h;
        let lm = loss(&Tensor::from_vec(p, q0.shape(), &Device::Cpu).unwrap())
            .to_scalar::<f32>()
            .unwrap();
        let fd = (lp - lm) / (2.0 * h);
        assert!(
            (fd - gf[idx]).abs() <= 2e-2 * fd.abs().max(1.0),
            "grad[{idx}] {} vs finite difference {fd}",
            gf[idx]
        );
    }
}
