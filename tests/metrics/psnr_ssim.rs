//! PSNR, SSIM and SSIM_256 against `metrics/psnr_ssim` (skimage 0.21 on the evaluator's arrays).

use crate::common;

use candle_core::DType;
use mcld::metrics::{psnr, ssim, ChwImage};

/// Element-wise bound of the metrics fixtures: |got - exp| <= abs + rel * |exp|.
fn check(case: &common::Case, key: &str, got: &[f64]) {
    let tol = &case.json["tolerance"][key];
    let abs = tol["abs"].as_f64().unwrap_or(0.0);
    let rel = tol["rel"].as_f64().unwrap_or(0.0);
    assert!(
        tol.get("abs").is_some() || tol.get("rel").is_some(),
        "{key}: no tolerance in the fixture"
    );
    let exp = case
        .get(key)
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(exp.len(), got.len(), "{key}: length");
    let mut worst = 0f64;
    let mut worst_excess = f64::NEG_INFINITY;
    for (g, e) in got.iter().zip(&exp) {
        let err = (g - e).abs();
        let err = if err.is_nan() { f64::INFINITY } else { err };
        worst = worst.max(err);
        worst_excess = worst_excess.max(err - (abs + rel * e.abs()));
    }
    println!("{key}: worst abs err {worst:.3e} (abs {abs:e}, rel {rel:e})");
    assert!(
        worst_excess <= 0.0,
        "{key}: error exceeds the tolerance by {worst_excess:.3e}"
    );
}

#[test]
fn psnr_ssim_match_skimage() {
    let case = common::load_case("metrics", "psnr_ssim");
    let pairs = case.json["pairs"].as_array().expect("pairs");
    let (mut mse, mut ps, mut ss, mut ss256, mut dr) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut ss_pc, mut ss256_pc) = (vec![], vec![]);
    for p in pairs {
        let load = |k: &str| {
            let rel = format!("metrics/{}", p[k].as_str().unwrap());
            ChwImage::load_rgb(&common::fixture_path(&rel)).unwrap()
        };
        let (gt, pred) = (load("gt"), load("pred"));
        assert_eq!(gt.height as u64, p["height"].as_u64().unwrap());
        assert_eq!(gt.width as u64, p["width"].as_u64().unwrap());
        let m = psnr::mse(&gt, &pred).unwrap();
        mse.push(m);
        ps.push(psnr::psnr_from_mse(m));
        let s = ssim::ssim_uniform51(&gt, &pred).unwrap();
        ss.push(s.mean);
        ss_pc.extend(s.per_channel.iter().copied());
        let s2 = ssim::ssim_256(&gt, &pred).unwrap();
        ss256.push(s2.mean);
        ss256_pc.extend(s2.per_channel.iter().copied());
        dr.push(ssim::ssim_256_data_range(&pred) as f64);
    }
    check(&case, "mse", &mse);
    check(&case, "psnr", &ps);
    check(&case, "ssim", &ss);
    check(&case, "ssim_per_channel", &ss_pc);
    check(&case, "ssim_256", &ss256);
    check(&case, "ssim_256_per_channel", &ss256_pc);
    check(&case, "ssim_256_data_range", &dr);
}

#[test]
fn shape_mismatch_is_an_error() {
    let a = ChwImage::new(3, 60, 60, vec![0.5; 3 * 60 * 60]).unwrap();
    let b = ChwImage::new(3, 60, 61, vec![0.5; 3 * 60 * 61]).unwrap();
    assert!(psnr::psnr(&a, &b).is_err());
    assert!(ssim::ssim_uniform51(&a, &b).is_err());
    let small = ChwImage::new(3, 40, 40, vec![0.5; 3 * 40 * 40]).unwrap();
    let err = ssim::ssim_uniform51(&small, &small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("smaller than"), "{err}");
    assert!(ChwImage::new(3, 2, 2, vec![0.0; 5]).is_err());
    let missing = std::path::Path::new("/nonexistent/x.png");
    let err = ChwImage::load_rgb(missing).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/x.png"), "{err}");
}

#[test]
fn identical_images_give_ssim_one() {
    let data: Vec<f32> = (0..3 * 64 * 64)
        .map(|i| ((i * 37) % 255) as f32 / 255.0)
        .collect();
    let a = ChwImage::new(3, 64, 64, data).unwrap();
    let s = ssim::ssim_uniform51(&a, &a).unwrap();
    assert!((s.mean - 1.0).abs() < 1e-12, "{}", s.mean);
    let t = a.to_tensor(&candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 64, 64]);
}
