//! The fused inference kernels against f64 references and against the composed candle ops
//! they replace.

use candle_core::{DType, Device, Tensor, Var};
use mcld::ops::geglu::{geglu, gelu_erf};
use mcld::ops::norm::fused::{group_norm, layer_norm, silu};

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// A&S 7.1.26 is within 1.5e-7 of erf, so GELU is within 0.5 |x| 1.5e-7 plus the f32
/// roundings (a few 2^-24 relative). `1 + erf` for x < 0 is formed without cancellation, so
/// the same absolute bound holds in the negative tail.
#[test]
fn gelu_matches_f64_within_the_approximation_bound() {
    let n = 400_000;
    let mut worst = 0f64;
    for i in 0..=n {
        let x = -12.0 + 24.0 * i as f64 / n as f64;
        let xf = x as f32;
        let want = gelu64(xf as f64);
        let got = gelu_erf(xf) as f64;
        let bound = 0.5 * (xf as f64).abs() * 1.5e-7 + 4.0 * f32::EPSILON as f64 * want.abs();
        let err = (got - want).abs();
        worst = worst.max(err / bound.max(f64::MIN_POSITIVE));
        assert!(err <= bound, "gelu({xf}) = {got}, want {want}");
    }
    println!("gelu: worst error {worst:.2} of its bound");
    assert_eq!(gelu_erf(0.0), 0.0);
    assert_eq!(gelu_erf(f32::INFINITY), f32::INFINITY);
    assert_eq!(gelu_erf(-1e30), 0.0);
    assert!(gelu_erf(f32::NAN).is_nan());
}

#[test]
fn geglu_is_a_times_gelu_of_the_gate() {
    let dev = Device::Cpu;
    let h = (Tensor::randn(0f32, 1.0, (2, 33, 2 * 40), &dev).unwrap() * 3.0).unwrap();
    let got = geglu(&h)
        .unwrap()
        .expect("f32 CPU tensors take the fused kernel");
    assert_eq!(got.dims(), &[2, 33, 40]);
    let hv = h.to_vec3::<f32>().unwrap();
    let gv = got.to_vec3::<f32>().unwrap();
    for (hb, gb) in hv.iter().zip(&gv) {
        for (row, out) in hb.iter().zip(gb) {
            for j in 0..40 {
                assert_eq!(out[j].to_bits(), (row[j] * gelu_erf(row[40 + j])).to_bits());
            }
        }
    }
    // Against candle's composed ops (libm's erf): the bound above for each GELU, plus a few
    // roundings of the product, relative to |a| |gate|.
    let a = h.narrow(2, 0, 40).unwrap();
    let gate = h.narrow(2, 40, 40).unwrap();
    let composed = (a.clone() * gate.gelu_erf().unwrap()).unwrap();
    let scale = (a.abs().unwrap() * gate.abs().unwrap()).unwrap();
    let diff = (composed - &got).unwrap().abs().unwrap();
    let excess = (diff - ((scale * 6.0e-7).unwrap() + 1e-6).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        excess <= 0.0,
        "geglu differs from the composed ops by {excess} over the bound"
    );
    // A strided input is read correctly.
    let wide = Tensor::randn(0f32, 1.0, (3, 2 * 40 + 6), &dev).unwrap();
    let view = wide.narrow(1, 3, 80).unwrap();
    let want = geglu(&view.contiguous().unwrap()).unwrap().unwrap();
    let got = geglu(&view).unwrap().unwrap();
    assert_eq!(
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn geglu_leaves_other_tensors_to_the_composed_ops() {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
    assert!(geglu(&h.to_dtype(DType::F16).unwrap()).unwrap().is_none());
    let var = Var::from_tensor(&h).unwrap();
    assert!(geglu(var.as_tensor()).unwrap().is_none());
    let odd = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
    assert!(geglu(&odd).unwrap().is_none());
}

/// exp_approx is within 2 ulp, so SiLU is within a few f32 roundings of f64 (relative).
#[test]
fn silu_matches_f64() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -100.0 + 200.0 * i as f64 / 200_000.0;
        let xf = x as f32;
        let xd = xf as f64;
        let want = xd / (1.0 + (-xd).exp());
        let got = silu(xf) as f64;
        let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
        // Below about -87 the true value underflows f32 and 0 is returned.
        if xd > -87.0 {
            worst = worst.max(rel);
        } else {
            assert!(got.abs() <= 1e-35);
        }
    }
    println!("silu: worst relative error {worst:.2e}");
    assert!(
        worst <= 8.0 * f32::EPSILON as f64,
        "silu relative error {worst}"
    );
    assert!(silu(f32::NAN).is_nan());
    assert_eq!(silu(0.0), 0.0);
}

#[allow(clippy::too_many_arguments)]
fn f64_group_norm(
    x: &[f32],
    b: usize,
    c: usize,
    plane: usize,
    groups: usize,
    eps: f64,
    w: &[f32],
    bias: &[f32],
    act: bool,
) -> Vec<f64> {
    let per = c / groups * plane;
    let mut out = vec![0f64; x.len()];
    for n in 0..b * groups {
        let s = &x[n * per..(n + 1) * per];
        let mean = s.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
        let var = s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
        for (i, &v) in s.iter().enumerate() {
            let ch = n % groups * (c / groups) + i / plane;
            let y = (v as f64 - mean) / (var + eps).sqrt() * w[ch] as f64 + bias[ch] as f64;
            out[n * per + i] = if act { y / (1.0 + (-y).exp()) } else { y };
        }
    }
    out
}

/// Statistics in f64, then three f32 operations and the SiLU per element: each output within
/// a few f32 roundings of the f64 GroupNorm, relative to the sizes involved (|n w|, the
/// centring's |w| |mean| / std, |b|).
#[test]
fn group_norm_matches_f64_and_the_composed_ops() {
    let dev = Device::Cpu;
    let (b, c, h, w) = (2, 12, 5, 7);
    let groups = 4;
    // An offset mean, so centring matters.
    let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)
        .unwrap()
        .affine(3.0, 20.0)
        .unwrap();
    let wt = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
    let bs = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (wv, bv) = (wt.to_vec1::<f32>().unwrap(), bs.to_vec1::<f32>().unwrap());
    let per = c / groups * h * w;
    for act in [false, true] {
        let got = group_norm(&x, groups, 1e-5, &wt, &bs, act)
            .unwrap()
            .expect("fused");
        assert_eq!(got.dims(), x.dims());
        let gv = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = f64_group_norm(&xv, b, c, h * w, groups, 1e-5, &wv, &bv, act);
        let plain = f64_group_norm(&xv, b, c, h * w, groups, 1e-5, &wv, &bv, false);
        for (i, ((&g, &y), &p)) in gv.iter().zip(&want).zip(&plain).enumerate() {
            let ch = i / (h * w) % c;
            // Centring on the f32 mean moves n by about |mean| / std roundings.
            let grp = &xv[i / per * per..][..per];
            let mean = grp.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
            let std =
                (grp.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64).sqrt();
            let scale = (p - bv[ch] as f64).abs()
                + wv[ch].abs() as f64 * (mean.abs() / std + 1.0)
                + bv[ch].abs() as f64;
            assert!(
                (g as f64 - y).abs() <= 16.0 * f32::EPSILON as f64 * scale,
                "act {act}, element {i}: {g} vs {y}"
            );
        }
        // And the composed candle ops agree to their own precision.
        let composed = candle_nn::GroupNorm::new(wt.clone(), bs.clone(), c, groups, 1e-5).unwrap();
        let mut cy = candle_core::Module::forward(&composed, &x).unwrap();
        if act {
            cy = candle_nn::ops::silu(&cy).unwrap();
        }
        let diff = (cy - &got)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
    // Tracked inputs, other dtypes: left to the composed ops. Bad parameters: an error.
    let var = Var::from_tensor(&x).unwrap();
    assert!(group_norm(var.as_tensor(), groups, 1e-5, &wt, &bs, false)
        .unwrap()
        .is_none());
    let x16 = x.to_dtype(DType::F16).unwrap();
    assert!(group_norm(&x16, groups, 1e-5, &wt, &bs, false)
        .unwrap()
        .is_none());
    assert!(group_norm(&x, 5, 1e-5, &wt, &bs, false).is_err());
}

#[test]
fn layer_norm_matches_f64() {
    let dev = Device::Cpu;
    let d = 37;
    let x = Tensor::randn(0f32, 1.0, (3, 4, d), &dev)
        .unwrap()
        .affine(2.0, -5.0)
        .unwrap();
    let wt = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
    let bs = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
    let (wv, bv) = (wt.to_vec1::<f32>().unwrap(), bs.to_vec1::<f32>().unwrap());
    for affine in [true, false] {
        let (w, b) = if affine {
            (Some(&wt), Some(&bs))
        } else {
            (None, None)
        };
        let got = layer_norm(&x, 1e-5, w, b).unwrap().expect("fused");
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gv = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (row, grow) in xv.chunks(d).zip(gv.chunks(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                let n = (row[j] as f64 - mean) / (var + 1e-5).sqrt();
                let (wj, bj) = if affine {
                    (wv[j] as f64, bv[j] as f64)
                } else {
                    (1.0, 0.0)
                };
                let want = n * wj + bj;
                let scale = (n * wj).abs() + wj.abs() * (mean.abs() / var.sqrt() + 1.0) + bj.abs();
                assert!((grow[j] as f64 - want).abs() <= 16.0 * f32::EPSILON as f64 * scale);
            }
        }
    }
    let var = Var::from_tensor(&x).unwrap();
    assert!(layer_norm(var.as_tensor(), 1e-5, Some(&wt), Some(&bs))
        .unwrap()
        .is_none());
    let short = Tensor::ones(d - 1, DType::F32, &dev).unwrap();
    assert!(layer_norm(&x, 1e-5, Some(&short), None).is_err());
}
