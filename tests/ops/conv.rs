//! The fast CPU convolution against candle's own, over the geometries the networks use and
//! the awkward ones (padding wider than the kernel reach, strides that skip the last column,
//! dilation, non-square kernels, views, many tiles).

use crate::common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Conv2dConfig;
use common::max_errs;
use mcld::ops::conv::{conv2d_cpu, conv2d_forward, Conv2d};

/// Relative to the reference's largest magnitude.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (e, m) = max_errs(got, want);
    e / m.max(1e-12)
}

fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, pad: usize, s: usize, d: usize) -> Tensor {
    let y = x.conv2d(w, pad, s, d, 1).unwrap();
    match b {
        Some(b) => y
            .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap())
            .unwrap(),
        None => y,
    }
}

/// The largest amount by which |got - want| exceeds `bound` (all f64); <= 0 within it.
fn excess_over(got: &Tensor, want: &Tensor, bound: &Tensor) -> f64 {
    (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .sub(bound)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The CPU bf16 mode's convolution (bf16 weight, f32 input, `ops::packed_gemm`) against an f64
/// convolution of the bf16-rounded operands: products of two bf16 values are exact in f32, so
/// the error is the f32 summation's, at most (k + 1) 2^-24 sum |w x| (k = ci kh kw, +1 for the
/// bias), sum |w x| being the f64 convolution of the magnitudes.
fn bf16_case(
    i: usize,
    xs: (usize, usize, usize, usize),
    ws: (usize, usize, usize, usize),
    pad: usize,
    s: usize,
    d: usize,
) {
    if !mcld::ops::packed_gemm::available() {
        return;
    }
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, xs, &dev).unwrap();
    let w16 = Tensor::randn(0f32, 1.0, ws, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b = Tensor::randn(0f32, 1.0, ws.0, &dev).unwrap();
    let f64_of = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (x64, w64, b64) = (f64_of(&x), f64_of(&w16), b.to_dtype(DType::F64).unwrap());
    let k = (ws.1 * ws.2 * ws.3) as f64;
    for bias in [None, Some(&b)] {
        let got = conv2d_cpu(&x, &w16, bias, pad, s, d, 1)
            .unwrap()
            .unwrap_or_else(|| panic!("case {i}: bf16 path did not apply"));
        let want = reference(&x64, &w64, bias.map(|_| &b64), pad, s, d);
        let mag = reference(
            &x64.abs().unwrap(),
            &w64.abs().unwrap(),
            bias.map(|_| &b64).map(|b| b.abs().unwrap()).as_ref(),
            pad,
            s,
            d,
        );
        let bound = (mag * ((k + 1.0) * 2f64.powi(-24))).unwrap();
        let excess = excess_over(&got.to_dtype(DType::F64).unwrap(), &want, &bound);
        assert!(
            excess <= 0.0,
            "case {i} bf16 bias {}: {excess} over the bound",
            bias.is_some()
        );
    }
}

/// (n, ci, h, w, co, kh, kw, pad, stride, dilation)
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// Geometries the fast paths must match: padding wider than the kernel reach, strides that
/// skip the last column, dilation, non-square kernels, odd channel counts.
const GEOMETRIES: [Case; 14] = [
    (1, 4, 8, 8, 5, 3, 3, 1, 1, 1),
    (2, 3, 9, 7, 4, 3, 3, 1, 2, 1),
    (1, 6, 10, 11, 3, 1, 1, 0, 1, 1),
    (3, 6, 10, 11, 3, 1, 1, 0, 2, 1),
    (1, 5, 6, 6, 2, 1, 1, 1, 1, 1),
    (1, 3, 13, 9, 4, 5, 5, 2, 1, 1),
    (1, 3, 12, 12, 4, 3, 3, 3, 1, 2),
    (1, 2, 14, 10, 3, 3, 3, 4, 2, 3),
    (1, 3, 7, 17, 2, 1, 7, 0, 1, 1),
    (1, 3, 17, 7, 2, 7, 1, 0, 1, 1),
    (1, 2, 3, 3, 2, 3, 3, 5, 1, 1),
    (2, 4, 5, 5, 3, 3, 3, 0, 3, 1),
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (1, 3, 4, 4, 2, 4, 4, 0, 1, 1),
];

#[test]
fn matches_candle_over_geometries() {
    let dev = Device::Cpu;
    let cases = GEOMETRIES;
    for (i, &(n, ci, h, w, co, kh, kw, pad, s, d)) in cases.iter().enumerate() {
        bf16_case(i, (n, ci, h, w), (co, ci, kh, kw), pad, s, d);
        let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (co, ci, kh, kw), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
        for bias in [None, Some(&b)] {
            let got = conv2d_cpu(&x, &k, bias, pad, s, d, 1)
                .unwrap()
                .unwrap_or_else(|| panic!("case {i}: fast path did not apply"));
            let want = reference(&x, &k, bias, pad, s, d);
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "case {i} bias {}: error {e}", bias.is_some());
        }
    }
}

/// Enough output rows for several tiles per image (and a batch), so tiles run in parallel
/// and each writes its own slice of every output channel.
#[test]
fn many_tiles_and_views() {
    let dev = Device::Cpu;
    bf16_case(100, (2, 64, 60, 64), (8, 64, 3, 3), 1, 1, 1);
    let x = Tensor::randn(0f32, 1.0, (2, 64, 200, 256), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (8, 64, 3, 3), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
    let got = conv2d_cpu(&x, &k, Some(&b), 1, 1, 1, 1).unwrap().unwrap();
    let e = rel_err(&got, &reference(&x, &k, Some(&b), 1, 1, 1));
    assert!(e < 1e-5, "error {e}");
    // A transposed view (non-contiguous input) and a narrowed batch.
    let xt = x
        .narrow(2, 0, 64)
        .unwrap()
        .narrow(3, 0, 64)
        .unwrap()
        .t()
        .unwrap();
    let got = conv2d_cpu(&xt, &k, None, 1, 2, 1, 1).unwrap().unwrap();
    let e = rel_err(&got, &reference(&xt, &k, None, 1, 2, 1));
    assert!(e < 1e-5, "view: error {e}");
    let x1 = x.narrow(0, 1, 1).unwrap();
    let got = conv2d_cpu(&x1, &k, None, 0, 1, 1, 1).unwrap().unwrap();
    let e = rel_err(&got, &reference(&x1, &k, None, 0, 1, 1));
    assert!(e < 1e-5, "narrowed batch: error {e}");
}

/// Where the fast path does not apply, the module still gives candle's answer.
#[test]
fn falls_back_where_it_does_not_apply() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 6), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (4, 2, 3, 3), &dev).unwrap();
    // Grouped.
    assert!(conv2d_cpu(&x, &k, None, 1, 1, 1, 2).unwrap().is_none());
    let got = conv2d_forward(&x, &k, None, 1, 1, 1, 2).unwrap();
    let want = x.conv2d(&k, 1, 1, 1, 2).unwrap();
    assert!(rel_err(&got, &want) == 0.0);
    // Half precision.
    let k1 = Tensor::randn(0f32, 1.0, (3, 4, 3, 3), &dev).unwrap();
    let xh = x.to_dtype(DType::F16).unwrap();
    let kh = k1.to_dtype(DType::F16).unwrap();
    assert!(conv2d_cpu(&xh, &kh, None, 1, 1, 1, 1).unwrap().is_none());
    // Tracked for gradients: candle's op, so backward works.
    let v = Var::from_tensor(&k1).unwrap();
    assert!(conv2d_cpu(&x, v.as_tensor(), None, 1, 1, 1, 1)
        .unwrap()
        .is_none());
    let conv = Conv2d::new(
        v.as_tensor().clone(),
        None,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    );
    let y = conv.forward(&x).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(v.as_tensor()).is_some(),
        "no gradient reached the weight"
    );
    // Mismatched channels: candle's error, not a panic.
    let bad = Tensor::randn(0f32, 1.0, (3, 5, 3, 3), &dev).unwrap();
    assert!(conv2d_forward(&x, &bad, None, 1, 1, 1, 1).is_err());
}

/// In the CPU bf16 mode a layer keeps its weight packed: the same result as packing on every
/// call, bit for bit, the weight recoverable exactly, and inputs the kernel does not take
/// (tracked, f16) still served by candle with the unpacked weight.
#[test]
fn packed_layer_matches_per_call_packing() {
    if !mcld::ops::packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
        return;
    }
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 5, 9, 11), &dev).unwrap();
    let w16 = Tensor::randn(0f32, 1.0, (7, 5, 3, 3), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
    for (padding, stride) in [(1, 1), (0, 2)] {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = Conv2d::new(w16.clone(), Some(b.clone()), cfg);
        assert_eq!(
            conv.weight()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap(),
            w16.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap()
        );
        let got = conv.forward(&x).unwrap();
        let want = conv2d_forward(&x, &w16, Some(&b), padding, stride, 1, 1).unwrap();
        assert!(rel_err(&got, &want) == 0.0, "packed layer differs");
        // A tracked input: candle's convolution with the weight widened to f32.
        let v = Var::from_tensor(&x).unwrap();
        let tracked = conv.forward(v.as_tensor()).unwrap();
        let wide = x
            .conv2d(&w16.to_dtype(DType::F32).unwrap(), padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 7, 1, 1)).unwrap())
            .unwrap();
        assert!(rel_err(&tracked, &wide) < 1e-6);
    }
}

/// An f32 layer keeps its weight packed for `ops::packed_gemm`'s f32 kernel (CPUs with AVX-512F):
/// within the f32 summation bound of an f64 convolution, (k + 1) 2^-24 sum |w x|, over the
/// awkward geometries and a many-tile image; the weight recoverable bit for bit; a tracked
/// input still served by candle.
#[test]
fn packed_f32_layer_matches_f64() {
    if !mcld::ops::packed_gemm::available_f32() {
        eprintln!("skipped: this CPU lacks AVX-512F");
        return;
    }
    let dev = Device::Cpu;
    // The geometries above, then many tiles per image and a strided many-tile case.
    let mut cases = GEOMETRIES.to_vec();
    cases.extend([
        (2, 64, 60, 64, 13, 3, 3, 1, 1, 1),
        (1, 40, 33, 35, 30, 3, 3, 1, 2, 1),
    ]);
    for (i, &(n, ci, h, w, co, kh, kw, pad, s, d)) in cases.iter().enumerate() {
        let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (co, ci, kh, kw), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
        let cfg = Conv2dConfig {
            padding: pad,
            stride: s,
            dilation: d,
            ..Default::default()
        };
        let conv = Conv2d::new(k.clone(), Some(b.clone()), cfg);
        assert_eq!(
            conv.weight()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "case {i}: weight round trip"
        );
        let got = conv.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = reference(&f64_of(&x), &f64_of(&k), Some(&f64_of(&b)), pad, s, d);
        let mag = reference(
            &f64_of(&x).abs().unwrap(),
            &f64_of(&k).abs().unwrap(),
            Some(&f64_of(&b).abs().unwrap()),
            pad,
            s,
            d,
        );
        let depth = (ci * kh * kw) as f64;
        let bound = (mag * ((depth + 1.0) * 2f64.powi(-24))).unwrap();
        let excess = excess_over(&got, &want, &bound);
        assert!(excess <= 0.0, "case {i}: {excess} over the bound");
        if i == 0 {
            let v = Var::from_tensor(&x).unwrap();
            let tracked = conv.forward(v.as_tensor()).unwrap();
            let plain = reference(&x, &k, Some(&b), pad, s, d);
            assert!(rel_err(&tracked, &plain) < 1e-6);
        }
    }
}
