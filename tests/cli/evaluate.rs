//! `mcld evaluate` bookkeeping with a counting test backend: pair matching, error messages,
//! the real-set statistics cache (reused, invalidated by a changed file list, forced refresh).
//! The metric kernels themselves are tested against the fixtures in tests/metrics_*.rs.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{Rgb, RgbImage};
use mcld::evaluate::{evaluate, write_reports, EvalBackend, EvalOptions, PairScores};

#[derive(Default)]
struct Fake {
    feature_images: AtomicUsize,
}

impl EvalBackend for Fake {
    fn fid_backbone(&self) -> &str {
        "fake"
    }
    fn pair_scores(&self, gt: &RgbImage, pred: &RgbImage) -> mcld::Result<PairScores> {
        let d = gt.get_pixel(0, 0)[0] as f64 - pred.get_pixel(0, 0)[0] as f64;
        Ok(PairScores {
            psnr: d.abs(),
            ssim: 1.0,
            ssim_256: 0.5,
        })
    }
    fn lpips(&self, gt: &[RgbImage], _pred: &[RgbImage]) -> mcld::Result<Vec<f64>> {
        Ok(vec![0.25; gt.len()])
    }
    fn fid_features(&self, imgs: &[RgbImage]) -> mcld::Result<Vec<Vec<f32>>> {
        self.feature_images.fetch_add(imgs.len(), Ordering::SeqCst);
        Ok(imgs
            .iter()
            .map(|i| vec![i.get_pixel(0, 0)[0] as f32])
            .collect())
    }
    fn resize_real(&self, img: &RgbImage, (h, w): (usize, usize)) -> mcld::Result<RgbImage> {
        Ok(RgbImage::from_pixel(
            w as u32,
            h as u32,
            *img.get_pixel(0, 0),
        ))
    }
}

fn img(path: &Path, w: u32, h: u32, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(w, h, Rgb([v, v, v]))
        .save(path)
        .unwrap();
}

fn setup(root: &Path) -> EvalOptions {
    for (sub, w, h) in [("256", 176, 256), ("512", 352, 512)] {
        for (n, g, p) in [("a_2_b.png", 10, 14), ("c_2_d.png", 20, 20)] {
            img(&root.join("gt").join(sub).join(n), w, h, g);
            img(&root.join("gen").join(sub).join(n), w, h, p);
        }
    }
    for (n, v) in [("x.jpg", 30u8), ("y.jpg", 50)] {
        let p = root.join("fashion/train").join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_pixel(8, 8, Rgb([v, v, v]))
            .save_with_format(&p, image::ImageFormat::Png)
            .unwrap();
    }
    EvalOptions {
        gen_dir: root.join("gen"),
        gt_dir: root.join("gt"),
        training_path: root.join("fashion/train"),
        recompute_real_stats: false,
        batch_size: 4,
        progress: false,
        resolutions: EvalOptions::reference_resolutions(),
    }
}

#[test]
fn evaluates_both_sizes_and_caches_real_stats() {
    let d = tempfile::tempdir().unwrap();
    let opts = setup(d.path());
    let b = Fake::default();
    let r = evaluate(&opts, &b).unwrap();
    assert_eq!(r.results.len(), 2);
    let r256 = &r.results[0];
    assert_eq!((r256.pairs, r256.real_images), (2, 2));
    assert!((r256.psnr - 2.0).abs() < 1e-12); // mean(|10-14|, |20-20|)
    assert!((r256.lpips - 0.25).abs() < 1e-12);
    // 1-d features: real {30, 50} (mean 40, var 200), fake {14, 20} (mean 17, var 18):
    // (40-17)^2 + 200 + 18 - 2 sqrt(200*18) = 627.
    assert!((r256.fid - 627.0).abs() < 1e-6, "{}", r256.fid);
    assert!(!r256.real_stats_cached);
    // 2 generated + 2 real per resolution.
    assert_eq!(b.feature_images.load(Ordering::SeqCst), 8);

    // Second run: real statistics come from the cache.
    let b2 = Fake::default();
    let r2 = evaluate(&opts, &b2).unwrap();
    assert!(r2.results.iter().all(|x| x.real_stats_cached));
    assert_eq!(b2.feature_images.load(Ordering::SeqCst), 4);
    assert_eq!(r2.results[0].fid, r256.fid);

    // A new training image changes the file list: the cache is recomputed.
    RgbImage::from_pixel(8, 8, Rgb([90, 90, 90]))
        .save_with_format(
            d.path().join("fashion/train/z.jpg"),
            image::ImageFormat::Png,
        )
        .unwrap();
    let b3 = Fake::default();
    let r3 = evaluate(&opts, &b3).unwrap();
    assert!(r3.results.iter().all(|x| !x.real_stats_cached));
    assert_eq!(r3.results[0].real_images, 3);

    // --recompute-real-stats forces it.
    let mut forced = opts.clone();
    forced.recompute_real_stats = true;
    let b4 = Fake::default();
    let r4 = evaluate(&forced, &b4).unwrap();
    assert!(r4.results.iter().all(|x| !x.real_stats_cached));

    write_reports(d.path(), &r4).unwrap();
    let md = std::fs::read_to_string(d.path().join("metrics.md")).unwrap();
    assert!(md.contains("| 256 | 2 |"), "{md}");
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(js["results"][1]["resolution"], "512");
}

#[test]
fn missing_generated_image_names_both_files() {
    let d = tempfile::tempdir().unwrap();
    let opts = setup(d.path());
    std::fs::remove_file(d.path().join("gen/256/c_2_d.png")).unwrap();
    let e = evaluate(&opts, &Fake::default()).unwrap_err().to_string();
    assert!(
        e.contains("gen/256/c_2_d.png") && e.contains("gt/256/c_2_d.png"),
        "{e}"
    );
}

#[test]
fn size_mismatch_names_both_files() {
    let d = tempfile::tempdir().unwrap();
    let opts = setup(d.path());
    img(&d.path().join("gen/256/a_2_b.png"), 100, 100, 1);
    let e = evaluate(&opts, &Fake::default()).unwrap_err().to_string();
    assert!(
        e.contains("gen/256/a_2_b.png") && e.contains("gt/256/a_2_b.png"),
        "{e}"
    );
    assert!(e.contains("(100, 100)"), "{e}");
}

use crate::common;

/// `mcld evaluate` end to end on the fixture's real photos and weights: the printed PSNR, SSIM,
/// SSIM_256 and LPIPS means equal the means of the fixture's per-pair values.
#[test]
fn evaluate_command_matches_fixture_numbers() {
    use candle_core::{DType, Device};
    let d = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let ps = common::load_case("metrics", "psnr_ssim");
    let lp = common::load_case("metrics", "lpips_alex");
    let pairs = ps.json["pairs"].as_array().unwrap().clone();
    // Layout: gen/<size>/<id>.png, gt/<size>/<id>.png, train/ = the ground truths.
    for p in &pairs {
        let sub = if p["height"].as_u64().unwrap() == 256 {
            "256"
        } else {
            "512"
        };
        let id = p["id"].as_str().unwrap();
        for (k, folder) in [("gt", "gt"), ("pred", "gen")] {
            let src = common::fixture_path(&format!("metrics/{}", p[k].as_str().unwrap()));
            let dst = d.path().join(folder).join(sub).join(format!("{id}.png"));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&src, &dst).unwrap();
        }
        let dst = d.path().join("train").join(format!("{id}.png"));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(
            common::fixture_path(&format!("metrics/{}", p["gt"].as_str().unwrap())),
            dst,
        )
        .unwrap();
    }
    // Metric weights as `evaluate` looks for them.
    let pre = d.path().join("pretrained");
    std::fs::create_dir_all(&pre).unwrap();
    let inc = common::load_case("metrics", "inception_fid");
    let wf = inc.json["weights_file"].as_str().unwrap_or("").to_string();
    let wpath = if wf.is_empty() {
        std::fs::read_dir(common::fixture_path("metrics/weights"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    } else {
        common::fixture_path(&format!("metrics/{wf}"))
    };
    std::os::unix::fs::symlink(&wpath, pre.join("inception_v3.safetensors")).unwrap();
    let pick = |pfx: &str| {
        lp.tensors
            .iter()
            .filter(|(k, _)| k.starts_with(pfx))
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    candle_core::safetensors::save(&pick("features."), pre.join("alexnet.safetensors")).unwrap();
    candle_core::safetensors::save(&pick("lin"), pre.join("lpips_alex.safetensors")).unwrap();
    let _ = &cpu;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcld"))
        .args(["evaluate", "--img_path"])
        .arg(d.path().join("gen"))
        .arg("--gt_path")
        .arg(d.path().join("gt"))
        .arg("--training_path")
        .arg(d.path().join("train"))
        .arg("--pretrained_dir")
        .arg(&pre)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("gen/metrics.json")).unwrap())
            .unwrap();
    let per_pair = |case: &common::Case, key: &str| -> Vec<f64> {
        case.get(key)
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let lpips_ids: Vec<String> = lp.json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    for (ri, sub) in ["256", "512"].iter().enumerate() {
        let r = &report["results"][ri];
        assert_eq!(r["resolution"], *sub);
        let idx: Vec<usize> = pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| p["id"].as_str().unwrap().starts_with(sub))
            .map(|(i, _)| i)
            .collect();
        for (key, tol) in [("psnr", 1e-5), ("ssim", 1e-5), ("ssim_256", 1e-5)] {
            let v = per_pair(&ps, key);
            let want = idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64;
            let got = r[key].as_f64().unwrap();
            println!("{sub} {key}: got {got}, fixture mean {want}");
            assert!((got - want).abs() <= tol, "{sub} {key}: {got} vs {want}");
        }
        let lv = per_pair(&lp, "lpips");
        let li: Vec<usize> = lpips_ids
            .iter()
            .enumerate()
            .filter(|(_, id)| id.starts_with(sub))
            .map(|(i, _)| i)
            .collect();
        if !li.is_empty() {
            let want = li.iter().map(|&i| lv[i]).sum::<f64>() / li.len() as f64;
            let got = r["lpips"].as_f64().unwrap();
            println!("{sub} lpips: got {got}, fixture mean {want}");
            assert!(
                (got - want).abs() <= 1e-7 + 1e-4 * want.abs(),
                "{sub} lpips: {got} vs {want}"
            );
        }
        assert!(r["fid"].as_f64().unwrap().is_finite());
    }
    assert!(text.contains("FID:") && text.contains("PSNR:"), "{text}");
}
