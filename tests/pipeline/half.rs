//! The loaded pipeline (CLIP, VAE encode, projector, both UNets, decode) in f16 and bf16 on the
//! test device (the CPU unless `MCLD_TEST_DEVICE` says otherwise) against its own f32 run, on
//! tiny random checkpoints in the real layout: the half paths of every network run, stay finite
//! and land near the f32 image. (`pipeline_small` checks the sampler against the reference's
//! numbers; this covers the conditioning networks too.)

use candle_core::{DType, Tensor};
use mcld::data::{Pair, PairInputs};
use mcld::pipeline::demo;
use mcld::pipeline::mcld::McldPipeline;
use mcld::presets::tree::write_tiny_layout;

fn input() -> PairInputs {
    let photo = demo::sample_photo().to_rgb8();
    let (w, h) = photo.dimensions();
    let assets = mcld::person::texture::TextureAssets::builtin().unwrap();
    let texture =
        mcld::person::texture::texture_map(&photo, &demo::synthetic_pose(w, h, false), &assets)
            .unwrap();
    PairInputs {
        pair: Pair {
            from: "a.png".into(),
            to: "b.png".into(),
        },
        source: photo.clone(),
        target: photo,
        pose: demo::synthetic_pose(w, h, true),
        texture,
        face: (0..512).map(|i| ((i as f32) * 0.37).sin()).collect(),
        face_missing: false,
    }
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    if mse.is_nan() {
        f64::NAN
    } else {
        -10.0 * mse.max(1e-20).log10()
    }
}

/// Same bounds and reasoning as `pipeline_small`'s half-precision checks: f16 >= 40 dB (RMS
/// error about 2.5 levels of 255), bf16 >= 30 dB (about 8 levels); NaN fails.
#[test]
fn half_precision_pipeline_close_to_f32() {
    let d = tempfile::tempdir().unwrap();
    let tiny = write_tiny_layout(d.path(), &d.path().join("data"), 2).unwrap();
    let inp = input();
    let run = |dtype| {
        let p = McldPipeline::from_config(
            &tiny.ckpt_dir,
            &tiny.config_path,
            &crate::common::device(),
            dtype,
        )
        .unwrap();
        let img = p.generate(std::slice::from_ref(&inp), 42).unwrap();
        (img[0].clone(), p.precision.describe())
    };
    let (want, _) = run(DType::F32);
    for (dtype, bound) in [(DType::F16, 40.0), (DType::BF16, 30.0)] {
        let (got, how) = run(dtype);
        assert_eq!(got.dtype(), DType::F32);
        let p = psnr(&got, &want);
        println!("{dtype:?} ({how}): PSNR {p:.2} dB vs the f32 run (bound >= {bound} dB)");
        assert!(p >= bound, "{dtype:?}: PSNR {p:.2} dB < {bound} dB");
    }
}
