//! Per-image timings of the metrics on this machine: `cargo bench --bench metrics`. Figures
//! are printed, never asserted. Weights come from the shared fixtures; the face part uses the
//! stand-in ONNX models tests/evaluate_face.rs fetches (skipped with a message without them).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mcld::metrics::fid::{frechet_distance, FeatureStats};
use mcld::metrics::inception::Flavor;
use mcld::metrics::{inception::InceptionV3, lpips::Lpips, ssim, ChwImage};

fn synthetic(h: usize, w: usize, seed: u32) -> ChwImage {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let data = (0..3 * h * w)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 256) as f32 / 255.0
        })
        .collect();
    ChwImage::new(3, h, w, data).unwrap()
}

fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> T) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    println!(
        "{label}: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() {
    mcld::device::retain_freed_memory();
    metric_timings();
    pt_inception_and_face_timings();
}

fn metric_timings() {
    let dev = Device::Cpu;
    let lp = common::load_case("metrics", "lpips_alex");
    let lpips = Lpips::new(VarBuilder::from_tensors(
        lp.tensors.clone(),
        DType::F32,
        &dev,
    ))
    .unwrap();
    let inc = common::load_case("metrics", "inception_fid");
    let name = inc.json["weights_file"]["name"].as_str().unwrap();
    let path = common::fixture_path(&format!("metrics/weights/{name}"));
    let t = candle_core::safetensors::load(&path, &dev).unwrap();
    let net = InceptionV3::new(VarBuilder::from_tensors(t, DType::F32, &dev)).unwrap();
    for (h, w) in [(256, 176), (512, 352)] {
        let (a, b) = (synthetic(h, w, 1), synthetic(h, w, 2));
        let (ta, tb) = (a.to_tensor(&dev).unwrap(), b.to_tensor(&dev).unwrap());
        time(&format!("ssim 51x51 {h}x{w}"), 5, || {
            ssim::ssim_uniform51(&a, &b).unwrap()
        });
        time(&format!("ssim_256 {h}x{w}"), 5, || {
            ssim::ssim_256(&a, &b).unwrap()
        });
        time(&format!("lpips {h}x{w}"), 3, || {
            lpips.forward(&ta, &tb).unwrap()
        });
        time(&format!("inception (1 image) {h}x{w}"), 3, || {
            net.features(std::slice::from_ref(&a)).unwrap()
        });
        let batch: Vec<ChwImage> = (0..8).map(|i| synthetic(h, w, 10 + i)).collect();
        let t = Instant::now();
        let _: Tensor = net.features(&batch).unwrap();
        println!(
            "inception batch 8 {h}x{w}: {:.1} ms/image",
            t.elapsed().as_secs_f64() * 1e3 / 8.0
        );
    }
    let n = 2500;
    let d = 2048;
    let f1: Vec<f32> = synthetic(n, d, 3).data[..n * d].to_vec();
    let f2: Vec<f32> = synthetic(n, d, 4).data[..n * d].to_vec();
    let t = Instant::now();
    let s1 = FeatureStats::from_features(&f1, n, d).unwrap();
    let s2 = FeatureStats::from_features(&f2, n, d).unwrap();
    println!(
        "stats (mean+cov) of 2x{n}x{d}: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let r = frechet_distance(&s1, &s2).unwrap();
    println!(
        "frechet 2048x2048: {:.2} s (fid {})",
        t.elapsed().as_secs_f64(),
        r.fid
    );
}

/// pt_inception features (the torchvision fixture weights run as the TF flavour: same sizes) and
/// face similarity per pair with the buffalo_s stand-ins (the stand-in detector is fixed at
/// 640x640, the real det_500m runs at 512x352).
fn pt_inception_and_face_timings() {
    let dev = Device::Cpu;
    let inc = common::load_case("metrics", "inception_fid");
    let name = inc.json["weights_file"]["name"].as_str().unwrap();
    let path = common::fixture_path(&format!("metrics/weights/{name}"));
    let net = InceptionV3::load(&path, Flavor::PtInception, &dev).unwrap();
    for (h, w) in [(256, 176), (512, 352)] {
        let a = synthetic(h, w, 1);
        time(&format!("pt_inception (1 image) {h}x{w}"), 3, || {
            net.features(std::slice::from_ref(&a)).unwrap()
        });
        let batch: Vec<ChwImage> = (0..8).map(|i| synthetic(h, w, 10 + i)).collect();
        let t = Instant::now();
        let _: Tensor = net.features(&batch).unwrap();
        println!(
            "pt_inception batch 8 {h}x{w}: {:.1} ms/image",
            t.elapsed().as_secs_f64() * 1e3 / 8.0
        );
    }

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let cache = target.join("mcld-test-cache/face");
    let det = cache.join("scrfd-0.3.0/models/scrfd.onnx");
    let rec = cache.join("package/model/fr_feature.onnx");
    if !det.is_file() || !rec.is_file() {
        println!("face timings skipped: run `cargo test --release --test evaluate_face` first");
        return;
    }
    let models = mcld::metrics::face::FaceModels::load(
        &det,
        &rec,
        &mcld::metrics::face::FaceConfig::default(),
    )
    .expect("face stand-ins");
    let photo = image::open(cache.join("scrfd-0.3.0/images/newton.png"))
        .unwrap()
        .to_rgb8();
    let img = image::imageops::resize(&photo, 176, 99, image::imageops::FilterType::Triangle);
    let mut canvas = image::RgbImage::from_pixel(176, 256, image::Rgb([128, 128, 128]));
    image::imageops::replace(&mut canvas, &img, 0, 78);
    time("face detect (640x640 canvas)", 5, || {
        models.detect(&canvas).unwrap()
    });
    time("face pair (2 x detect + align + embed)", 5, || {
        let a = models.embed_largest(&canvas).unwrap().unwrap();
        let b = models.embed_largest(&canvas).unwrap().unwrap();
        mcld::metrics::face::similarity(&a, &b).unwrap()
    });
}
