//! LPIPS v0.1 (AlexNet) against `metrics/lpips_alex`.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mcld::metrics::{lpips::Lpips, ChwImage};

/// |got - exp| <= abs + rel * |exp| element-wise, worst error printed.
fn check(case: &common::Case, key: &str, got: &Tensor) {
    let tol = &case.json["tolerance"][key];
    let abs = tol["abs"].as_f64().expect("abs tolerance");
    let rel = tol["rel"].as_f64().expect("rel tolerance");
    let exp = case.get(key);
    assert_eq!(got.dims(), exp.dims(), "{key}: shape");
    let g = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let e = exp
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (mut worst, mut worst_rel, mut excess) = (0f64, 0f64, f64::NEG_INFINITY);
    for (g, e) in g.iter().zip(&e) {
        let err = (g - e).abs();
        let err = if err.is_nan() { f64::INFINITY } else { err };
        worst = worst.max(err);
        worst_rel = worst_rel.max(err / e.abs());
        excess = excess.max(err - (abs + rel * e.abs()));
    }
    println!("{key}: worst abs err {worst:.3e}, worst rel err {worst_rel:.3e} (abs {abs:e} + rel {rel:e})");
    assert!(
        excess <= 0.0,
        "{key}: exceeds the tolerance by {excess:.3e}"
    );
}

#[test]
fn lpips_alex_matches_reference() {
    let case = common::load_case("metrics", "lpips_alex");
    let dev = Device::Cpu;
    let vb = VarBuilder::from_tensors(case.tensors.clone(), DType::F32, &dev);
    let model = Lpips::new(vb).unwrap();
    let pairs = case.json["pairs"].as_array().expect("pairs");
    let (mut all, mut all_layers) = (vec![], vec![]);
    for p in pairs {
        let load = |k: &str| {
            let rel = format!("metrics/{}", p[k].as_str().unwrap());
            ChwImage::load_rgb(&common::fixture_path(&rel))
                .unwrap()
                .to_tensor(&dev)
                .unwrap()
        };
        let out = model.forward(&load("pred"), &load("gt")).unwrap();
        all.push(out.lpips);
        all_layers.push(out.per_layer);
    }
    check(&case, "lpips", &Tensor::cat(&all, 0).unwrap());
    check(
        &case,
        "lpips_per_layer",
        &Tensor::cat(&all_layers, 0).unwrap(),
    );
}

#[test]
fn lpips_reports_missing_and_misshapen_weights() {
    let case = common::load_case("metrics", "lpips_alex");
    let dev = Device::Cpu;
    let mut t = case.tensors.clone();
    t.remove("features.6.weight");
    let err = Lpips::new(VarBuilder::from_tensors(t, DType::F32, &dev))
        .unwrap_err()
        .to_string();
    assert!(err.contains("features.6.weight"), "{err}");
    let mut t = case.tensors.clone();
    t.insert(
        "lin2.model.1.weight".into(),
        Tensor::zeros((1, 3, 1, 1), DType::F32, &dev).unwrap(),
    );
    let err = Lpips::new(VarBuilder::from_tensors(t, DType::F32, &dev))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lin2"), "{err}");
    let model = Lpips::new(VarBuilder::from_tensors(
        case.tensors.clone(),
        DType::F32,
        &dev,
    ))
    .unwrap();
    let a = Tensor::zeros((1, 3, 64, 64), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((1, 3, 64, 48), DType::F32, &dev).unwrap();
    assert!(model.forward(&a, &b).is_err());
    let same = model
        .forward(&a, &a)
        .unwrap()
        .lpips
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(same, vec![0.0]);
}
