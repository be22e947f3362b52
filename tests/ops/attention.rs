//! The fused CPU attention and its vectorised exp, against f64 arithmetic.

use crate::common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_errs, naive_attention as naive};
use mcld::ops::attention::cpu::{
    attention, exp_approx, exp_shifted, softmax_in_place, softmax_scaled_in_place,
};

#[test]
fn exp_is_within_two_ulp_on_its_domain() {
    let mut worst = 0f64;
    let n = 2_000_000;
    let xs: Vec<f32> = (0..=n).map(|i| -87.0 * i as f32 / n as f32).collect();
    for &x in &xs {
        let want = (x as f64).exp();
        let got = exp_approx(x) as f64;
        let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
        worst = worst.max((got - want).abs() / ulp);
    }
    println!("exp_approx: worst error {worst:.2} ulp over [-87, 0]");
    assert!(worst <= 2.0, "exp_approx off by {worst} ulp");
    assert_eq!(exp_approx(0.0), 1.0);
    assert_eq!(exp_approx(-100.0), 0.0);
    assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    assert!(exp_approx(f32::NAN).is_nan());
    // The slice form (the vectorised build on AVX2 machines) agrees with the scalar one.
    let mut v = xs.clone();
    exp_shifted(&mut v, 1.5);
    for (x, y) in xs.iter().zip(&v) {
        assert_eq!(*y, exp_approx(x - 1.5));
    }
}

#[test]
fn softmax_handles_masked_and_empty_rows() {
    let mut row = vec![1.0f32, f32::NEG_INFINITY, 3.0, 2.0];
    softmax_in_place(&mut row);
    assert_eq!(row[1], 0.0);
    let s: f32 = row.iter().sum();
    assert!((s - 1.0).abs() < 1e-6);
    let e = (1f64.exp() + 3f64.exp() + 2f64.exp()) as f32;
    assert!((row[2] - 3f32.exp() / e).abs() < 1e-6);
    // Every key masked: NaN, as torch's softmax gives.
    let mut all = vec![f32::NEG_INFINITY; 3];
    softmax_in_place(&mut all);
    assert!(all.iter().all(|x| x.is_nan()));
}

#[test]
fn matches_f64_attention_over_shapes() {
    let dev = Device::Cpu;
    // (b, h, tq, tk, d, dv): one key, few keys (cross-attention), more keys than a block holds
    // rows for (several blocks, a ragged last one), a single query.
    for (b, h, tq, tk, d, dv) in [
        (1, 1, 5, 1, 8, 8),
        (2, 3, 37, 17, 40, 40),
        (1, 2, 300, 1500, 16, 24),
        (2, 1, 1, 77, 64, 64),
    ] {
        let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, tk, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, tk, dv), &dev).unwrap();
        let got = attention(&q, &k, &v, false)
            .unwrap()
            .expect("fused path applies");
        let e = max_errs(&got, &naive(&q, &k, &v)).0;
        println!("{b}x{h}x{tq}x{tk} d {d}: max_abs_err vs f64 {e:.3e}");
        assert!(e < 1e-5, "fused attention off by {e}");
    }
}

#[test]
fn views_and_fallbacks() {
    let dev = Device::Cpu;
    // Heads split from (B, T, H*d) are transposed views.
    let x = Tensor::randn(0f32, 1.0, (2, 50, 4 * 8), &dev).unwrap();
    let heads = x.reshape((2, 50, 4, 8)).unwrap().transpose(1, 2).unwrap();
    let got = attention(&heads, &heads, &heads, false).unwrap().unwrap();
    assert!(max_errs(&got, &naive(&heads, &heads, &heads)).0 < 1e-5);
    // Half precision and tracked inputs are left to the generic path.
    let h16 = heads.to_dtype(DType::F16).unwrap();
    assert!(attention(&h16, &h16, &h16, false).unwrap().is_none());
    let var = Var::from_tensor(&heads.contiguous().unwrap()).unwrap();
    assert!(attention(var.as_tensor(), &heads, &heads, false)
        .unwrap()
        .is_none());
    // Mismatched key/value lengths are not taken.
    let v = Tensor::randn(0f32, 1.0, (2, 4, 49, 8), &dev).unwrap();
    assert!(attention(&heads, &heads, &v, false).unwrap().is_none());
}

/// Heads are read in place from strided views and the output is written head-interleaved;
/// neither may change a bit against contiguous copies of the same operands, on either path.
#[test]
fn strided_heads_give_the_contiguous_result_bit_for_bit() {
    let dev = Device::Cpu;
    let (b, t, h, d) = (2, 37, 3, 16);
    // q from a (B, T, H*d) projection; k and v as the two halves of one (B, T, 2*H*d) tensor
    // (row stride 2*H*d); v's key length narrowed from a longer buffer.
    let q = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
    let kv = Tensor::randn(0f32, 1.0, (b, t + 5, 2 * h * d), &dev).unwrap();
    let split = |x: &Tensor| {
        let (b, t, c) = x.dims3().unwrap();
        x.reshape((b, t, h, c / h))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let qh = split(&q);
    let kv = kv.narrow(1, 2, t).unwrap();
    let kh = split(&kv.narrow(2, 0, h * d).unwrap());
    let vh = split(&kv.narrow(2, h * d, h * d).unwrap());
    assert!(!kh.is_contiguous() && kh.stride()[3] == 1);
    // A last dimension that is not dense is copied first.
    let vt = vh.contiguous().unwrap().transpose(2, 3).unwrap();
    let vt = vt.contiguous().unwrap().transpose(2, 3).unwrap();
    assert_ne!(vt.stride()[3], 1);
    for bf16 in [false, mcld::ops::packed_gemm::available()] {
        let dense = |x: &Tensor| x.contiguous().unwrap();
        let want = attention(&dense(&qh), &dense(&kh), &dense(&vh), bf16)
            .unwrap()
            .unwrap();
        for v in [&vh, &vt] {
            let got = attention(&qh, &kh, v, bf16).unwrap().unwrap();
            assert_eq!(got.dims(), &[b, h, t, d]);
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "bf16 {bf16}: strided operands changed the result"
            );
        }
    }
}

/// The bf16 path (`--dtype bf16` on CPUs with AVX-512 BF16) against f64 attention of the
/// bf16-rounded q, k, v. Scores are exact products summed in f32; the one rounding left is the
/// probabilities' to bf16 before the second product, which moves each output by at most
/// 2^-9 x sum_j p_j |v_j| <= 2^-9 max|v|.
#[test]
fn bf16_path_matches_f64_of_rounded_inputs() {
    if !mcld::ops::packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
        return;
    }
    let dev = Device::Cpu;
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for (b, h, tq, tk, d, dv) in [
        (1, 1, 5, 1, 8, 8),
        (2, 3, 37, 17, 40, 40),
        (1, 2, 300, 1500, 16, 24),
        (2, 1, 1, 77, 64, 64),
        (1, 1, 13, 9000, 40, 40),
    ] {
        let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, tk, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, tk, dv), &dev).unwrap();
        let got = attention(&q, &k, &v, true)
            .unwrap()
            .expect("fused path applies");
        let (q, k, v) = (round(&q), round(&k), round(&v));
        let vmax = v
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let bound = 2f64.powi(-9) * vmax + 1e-5;
        let e = max_errs(&got, &naive(&q, &k, &v)).0;
        println!("bf16 {b}x{h}x{tq}x{tk} d {d}: max_abs_err {e:.3e} (bound {bound:.3e})");
        assert!(e <= bound, "bf16 attention off by {e} > {bound}");
    }
}

/// The lane-parallel softmax of the bf16 path against f64 (and no worse than the plain one).
#[test]
fn scaled_softmax_matches_f64() {
    for n in [1usize, 5, 16, 17, 100, 8192] {
        let row: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let scaled: Vec<f64> = row.iter().map(|&x| (x * 0.125) as f64).collect();
        let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scaled.iter().map(|x| (x - max).exp()).sum();
        let mut plain: Vec<f32> = row.iter().map(|x| x * 0.125).collect();
        softmax_in_place(&mut plain);
        let mut got = row.clone();
        softmax_scaled_in_place(&mut got, 0.125);
        let rel = |v: &[f32]| {
            v.iter()
                .zip(&scaled)
                .map(|(&g, x)| {
                    let w = (x - max).exp() / total;
                    (g as f64 - w).abs() / w
                })
                .fold(0f64, f64::max)
        };
        let (e, e_plain) = (rel(&got), rel(&plain));
        assert!(
            e <= 2e-6 && e <= e_plain.max(1e-6),
            "n {n}: {e} (plain {e_plain})"
        );
    }
    let mut masked = vec![1.0f32, f32::NEG_INFINITY, 3.0];
    softmax_scaled_in_place(&mut masked, 0.5);
    assert_eq!(masked[1], 0.0);
    let mut all = vec![f32::NEG_INFINITY; 20];
    softmax_scaled_in_place(&mut all, 1.0);
    assert!(all.iter().all(|x| x.is_nan()));
    let mut nan = vec![1.0f32, f32::NAN, 2.0];
    softmax_scaled_in_place(&mut nan, 1.0);
    assert!(nan.iter().all(|x| x.is_nan()));
}
