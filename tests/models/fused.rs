//! The fused inference kernels against f64 references and against the composed candle ops
//! they replace.

use candle_core::{DType, Device, Tensor, Var};
use mcld::models::fused::{geglu, gelu_erf};

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
