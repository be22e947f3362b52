//! `mcld test` and `mcld infer` end to end on a tiny generated dataset with tiny random
//! checkpoints in the real on-disk layout: outputs, resumption, regeneration of a truncated
//! file, and the errors for a missing checkpoint and a wrong tensor shape.

use std::path::Path;

use image::{Rgb, RgbImage};
use mcld::presets::tree::write_tiny_layout;

use crate::common::mcld;

fn make_dataset(root: &Path) {
    for (i, n) in ["a", "b"].iter().enumerate() {
        let photo = RgbImage::from_fn(48, 64, |x, y| {
            Rgb([(x * 5) as u8, (y * 4) as u8, 60 * i as u8])
        });
        let p = root.join(format!("test/{n}.jpg"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        photo
            .save_with_format(&p, image::ImageFormat::Jpeg)
            .unwrap();
        let iuv = mcld::pipeline::demo::synthetic_pose(48, 64, i == 1);
        let p = root.join(format!("test_densepose/{n}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        iuv.save(&p).unwrap();
        let p = root.join(format!("test_texture/{n}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_pixel(64, 64, Rgb([120, 80, 40]))
            .save(&p)
            .unwrap();
    }
    std::fs::write(root.join("test.csv"), "from,to\na.jpg,b.jpg\nb.jpg,a.jpg\n").unwrap();
}

fn run(args: &[&str]) -> (bool, String) {
    let out = mcld().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn test_command_generates_resumes_and_regenerates() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("fashion");
    make_dataset(&data);
    let tiny = write_tiny_layout(&d.path().join("w"), &data, 1).unwrap();
    let save = d.path().join("results");
    let args = [
        "test",
        "--save_path",
        save.to_str().unwrap(),
        "--ckpt_dir",
        tiny.ckpt_dir.to_str().unwrap(),
        "--config_path",
        tiny.config_path.to_str().unwrap(),
        "--batch-size",
        "2",
    ];
    let (ok, text) = run(&args);
    assert!(ok, "{text}");
    assert!(text.contains("generated 2 pairs"), "{text}");
    for (sub, w, h) in [("256", 176, 256), ("512", 352, 512)] {
        for folder in ["tiny", "gt"] {
            let p = save.join(folder).join(sub).join("a_2_b.png");
            let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!((img.width(), img.height()), (w, h));
        }
    }
    // Resume: nothing left to do.
    let (ok, text) = run(&args);
    assert!(
        ok && text.contains("generated 0 pairs, 2 already done"),
        "{text}"
    );
    // A truncated output is regenerated.
    let p = save.join("tiny/512/b_2_a.png");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..100]).unwrap();
    let (ok, text) = run(&args);
    assert!(
        ok && text.contains("generated 1 pairs, 1 already done"),
        "{text}"
    );
    assert!(image::open(&p).is_ok());

    // infer on the same weights, twice with the same seed: identical output.
    let out1 = d.path().join("o1.png");
    let out2 = d.path().join("o2.png");
    for out in [&out1, &out2] {
        let (ok, text) = run(&[
            "infer",
            "--source",
            data.join("test/a.jpg").to_str().unwrap(),
            "--pose",
            data.join("test_densepose/b.png").to_str().unwrap(),
            "--texture",
            data.join("test_texture/a.png").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--ckpt_dir",
            tiny.ckpt_dir.to_str().unwrap(),
            "--config_path",
            tiny.config_path.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
    }
    let a = image::open(&out1).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (512, 512));
    assert_eq!(a, image::open(&out2).unwrap().to_rgb8());

    // A missing checkpoint lists the expected layout.
    let pg = tiny.ckpt_dir.join("pose_guider.safetensors");
    let kept = d.path().join("pose_guider.keep");
    std::fs::rename(&pg, &kept).unwrap();
    let (ok, text) = run(&args);
    assert!(
        !ok && text.contains("pose_guider.pth") && text.contains("expected layout"),
        "{text}"
    );
    std::fs::rename(&kept, &pg).unwrap();

    // A tensor of the wrong shape is named with both shapes.
    let cpu = candle_core::Device::Cpu;
    let mut t = candle_core::safetensors::load(&pg, &cpu).unwrap();
    let want = t["conv_in.bias"].dims().to_vec();
    t.insert(
        "conv_in.bias".into(),
        candle_core::Tensor::zeros(7, candle_core::DType::F32, &cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &pg).unwrap();
    let (ok, text) = run(&args);
    assert!(!ok, "{text}");
    assert!(
        text.contains("conv_in.bias") && text.contains("[7]"),
        "{text}"
    );
    assert!(text.contains(&format!("{want:?}")), "{text}");
}
