//! `mcld demo`: the built-in sample (a public-domain photo and a generated DensePose-style
//! pose) through the whole pipeline with tiny random weights, so it can be seen running before
//! any weights are downloaded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{Rgb, RgbImage};

use crate::config::TrainConfig;
use crate::data::{Pair, PairInputs};
use crate::imageops::viz::tensor_to_rgb;
use crate::pipeline::mcld::McldPipeline;
use crate::Result;

/// One limb of the synthetic figure: a capsule from `a` to `b` (fractions of the image) with a
/// half-width, painted with DensePose part index `part`.
struct Limb {
    part: u8,
    a: (f32, f32),
    b: (f32, f32),
    radius: f32,
}

/// A standing figure in DensePose IUV form as stored on disk (R = V, G = U, B = part index).
/// U runs along each limb and V across it, like DensePose's chart coordinates, so texture and
/// pose code see realistic value ranges. `arms_up` gives a second pose for the demo.
pub fn synthetic_pose(width: u32, height: u32, arms_up: bool) -> RgbImage {
    let (ly, ry) = if arms_up { (0.12, 0.12) } else { (0.58, 0.58) };
    let limbs = [
        // torso front (1, 2 are the two torso charts)
        Limb {
            part: 2,
            a: (0.5, 0.25),
            b: (0.5, 0.55),
            radius: 0.11,
        },
        // head
        Limb {
            part: 23,
            a: (0.5, 0.1),
            b: (0.5, 0.17),
            radius: 0.06,
        },
        // upper legs (right 7, left 8), lower legs (right 11, left 12), feet (6, 5)
        Limb {
            part: 7,
            a: (0.44, 0.55),
            b: (0.43, 0.73),
            radius: 0.05,
        },
        Limb {
            part: 8,
            a: (0.56, 0.55),
            b: (0.57, 0.73),
            radius: 0.05,
        },
        Limb {
            part: 11,
            a: (0.43, 0.73),
            b: (0.42, 0.92),
            radius: 0.04,
        },
        Limb {
            part: 12,
            a: (0.57, 0.73),
            b: (0.58, 0.92),
            radius: 0.04,
        },
        Limb {
            part: 6,
            a: (0.42, 0.93),
            b: (0.39, 0.96),
            radius: 0.025,
        },
        Limb {
            part: 5,
            a: (0.58, 0.93),
            b: (0.61, 0.96),
            radius: 0.025,
        },
        // upper arms (left 15, right 16), lower arms (left 19, right 20), hands (4, 3)
        Limb {
            part: 16,
            a: (0.38, 0.27),
            b: (0.3, 0.43),
            radius: 0.035,
        },
        Limb {
            part: 15,
            a: (0.62, 0.27),
            b: (0.7, 0.43),
            radius: 0.035,
        },
        Limb {
            part: 20,
            a: (0.3, 0.43),
            b: (0.27, ly),
            radius: 0.03,
        },
        Limb {
            part: 19,
            a: (0.7, 0.43),
            b: (0.73, ry),
            radius: 0.03,
        },
        Limb {
            part: 3,
            a: (0.27, ly),
            b: (0.26, ly + 0.04),
            radius: 0.025,
        },
        Limb {
            part: 4,
            a: (0.73, ry),
            b: (0.74, ry + 0.04),
            radius: 0.025,
        },
    ];
    let mut img = RgbImage::new(width, height);
    let (w, h) = (width as f32, height as f32);
    for y in 0..height {
        for x in 0..width {
            let p = ((x as f32 + 0.5) / w, (y as f32 + 0.5) / h);
            // Later limbs are drawn on top, like an occluding arm.
            for l in &limbs {
                let (dx, dy) = (l.b.0 - l.a.0, l.b.1 - l.a.1);
                let len2 = dx * dx + dy * dy;
                let t = (((p.0 - l.a.0) * dx + (p.1 - l.a.1) * dy) / len2).clamp(0.0, 1.0);
                let (cx, cy) = (l.a.0 + t * dx, l.a.1 + t * dy);
                // Distances in the image's aspect so capsules stay round.
                let (ex, ey) = ((p.0 - cx) * w / h, p.1 - cy);
                let d = (ex * ex + ey * ey).sqrt();
                if d <= l.radius {
                    let side = if (ex * dy - ey * dx) >= 0.0 {
                        1.0
                    } else {
                        -1.0
                    };
                    let v = 0.5 + 0.5 * side * d / l.radius;
                    let u = t;
                    img.put_pixel(x, y, Rgb([(v * 255.0) as u8, (u * 255.0) as u8, l.part]));
                }
            }
        }
    }
    img
}

/// The built-in source photo (PNG bytes embedded in the binary).
pub fn sample_photo() -> image::DynamicImage {
    image::load_from_memory(include_bytes!("../../assets/demo/astronaut.png"))
        .expect("the embedded sample photo is a valid PNG")
}

/// `mcld demo`: the full pipeline on the built-in sample with tiny random weights written on
/// the fly; shows what runs, not what a trained model produces.
pub fn run(out: &Path, work: Option<PathBuf>, steps: usize) -> Result<()> {
    let t0 = Instant::now();
    let keep = work.is_some();
    let dir = match work {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("mcld-demo-{}", std::process::id())),
    };
    let layout = crate::presets::tree::write_tiny_layout(&dir, &dir.join("dataset"), steps)?;
    let photo = sample_photo().to_rgb8();
    let (w, h) = photo.dimensions();
    let src_pose = synthetic_pose(w, h, false);
    let tgt_pose = synthetic_pose(w, h, true);
    let assets = crate::person::texture::TextureAssets::builtin()?;
    let texture = crate::person::texture::texture_map(&photo, &src_pose, &assets)?;
    let cfg = TrainConfig::load(&layout.config_path)?;
    let infer = crate::config::InferenceConfig::load(&cfg.inference_config)?;
    let files = crate::pipeline::weight_files::PipelineFiles::resolve(&layout.ckpt_dir, &cfg)?;
    let pipeline = McldPipeline::load(
        &files,
        &infer,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let input = PairInputs {
        pair: Pair {
            from: "astronaut.png".into(),
            to: "pose.png".into(),
        },
        source: photo.clone(),
        target: photo.clone(),
        pose: tgt_pose.clone(),
        texture: texture.clone(),
        face: vec![0f32; 512],
        face_missing: true,
    };
    let t1 = Instant::now();
    let img = pipeline.generate(std::slice::from_ref(&input), 42)?;
    let gen_s = t1.elapsed().as_secs_f64();
    let sheet = crate::pipeline::infer::sheet(
        &format!("UNTRAINED demo (tiny random weights) - seed 42 - {steps} DDIM steps"),
        &input,
        &[(
            input.pair.label(),
            tgt_pose.clone(),
            tensor_to_rgb(&img[0])?,
        )],
    )?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(sheet), out)?;
    if keep {
        // The sample inputs beside the weights, so `infer` can be re-run on them.
        let inputs = dir.join("inputs");
        let face = inputs.join("face.npy");
        for (img, name) in [
            (&photo, "source.png"),
            (&tgt_pose, "pose.png"),
            (&src_pose, "source_pose.png"),
            (&texture, "texture.png"),
        ] {
            crate::fsutil::save_image_atomic(
                &image::DynamicImage::ImageRgb8(img.clone()),
                &inputs.join(name),
            )?;
        }
        crate::data::npy::write_f32(&face, &[512], &input.face)?;
        // A pose gallery for `mcld serve --poses DIR/poses`.
        for (img, name) in [
            (&tgt_pose, "demo_target.png"),
            (&src_pose, "demo_source.png"),
        ] {
            crate::fsutil::save_image_atomic(
                &image::DynamicImage::ImageRgb8(img.clone()),
                &dir.join("poses").join(name),
            )?;
        }
        println!(
            "kept the tiny weights and sample inputs in {}; re-run the pipeline on them with\n  \
             mcld infer --ckpt_dir {} --config_path {} --source {} --pose {} --texture {} \
             --face {} --out out.png",
            dir.display(),
            layout.ckpt_dir.display(),
            layout.config_path.display(),
            inputs.join("source.png").display(),
            inputs.join("pose.png").display(),
            inputs.join("texture.png").display(),
            face.display()
        );
        println!(
            "or open them in the web page:\n  mcld serve --ckpt_dir {} --config_path {} --poses {}",
            layout.ckpt_dir.display(),
            layout.config_path.display(),
            dir.join("poses").display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "wrote {}: source | target pose | texture map | output (512x512, {steps} DDIM steps)",
        out.display()
    );
    println!(
        "UNTRAINED: tiny random weights, so the output panel is noise by design. \
         generation {gen_s:.2}s, total {:.2}s on CPU",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "with real weights: `mcld download --only inference,prepare` fetches the checkpoints \
         into ./checkpoints and the base models into ./pretrained_weights, then\n  mcld \
         infer --source PHOTO \
         --pose TARGET_IUV.png --out out.png\n(the texture map and face embedding are computed \
         from the photo with model_final_844d15.pkl and antelopev2/ in ./pretrained_weights, \
         or given with --texture TEXTURE.png --face EMB.npy)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pose_has_all_drawn_parts_and_background() {
        let p = synthetic_pose(176, 256, false);
        let mut seen = [false; 25];
        for px in p.pixels() {
            seen[px[2] as usize] = true;
        }
        for part in [2, 23, 7, 8, 11, 12, 5, 6, 15, 16, 19, 20, 3, 4] {
            assert!(seen[part], "part {part} missing");
        }
        assert!(seen[0], "no background");
        assert_ne!(synthetic_pose(176, 256, true), p);
        assert_eq!(sample_photo().width(), 512);
    }
}
