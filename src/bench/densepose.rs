//! `mcld bench densepose`: DensePose R-CNN R-101 at DeepFashion size with random weights.
//!
//! Random weights detect arbitrary boxes (or none), so the DensePose branch is forced onto the
//! top detection, or a fixed person-sized box when there is none: every image pays for the whole
//! path the real model takes on a one-person photo.

use std::time::{Duration, Instant};

use crate::models::densepose::iuv::{self, Image3};
use crate::models::densepose::{self, DensePose};
use crate::weights::random::RandomWeights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct DenseposeBench {
    /// Images to time (after one warm-up image).
    pub images: usize,
    /// Also time `prepare`'s own path (`iuv_batch`) with this many same-size photos per
    /// backbone pass; it runs the DensePose branch only where random weights detect something.
    pub batch: usize,
    /// Seed of the random weights.
    pub seed: u64,
    /// detectron2 YAML; default the shipped densepose_rcnn_R_101_FPN_DL_s1x.yaml.
    pub config: Option<std::path::PathBuf>,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
}

/// A DeepFashion-sized BGR photo: smooth gradients and a bright upright blob on a pale ground.
fn synthetic_photo(h: usize, w: usize) -> Result<Image3> {
    let mut data = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
            let (dx, dy) = ((fx - 0.5) / 0.18, (fy - 0.5) / 0.42);
            let person = dx * dx + dy * dy < 1.0;
            let o = (y * w + x) * 3;
            let base = [230.0 - 30.0 * fy, 225.0 - 20.0 * fx, 220.0];
            let px = if person {
                [
                    60.0 + 80.0 * fy,
                    90.0 + 50.0 * fx,
                    150.0 + 60.0 * (1.0 - fy),
                ]
            } else {
                base
            };
            for c in 0..3 {
                data[o + c] = px[c] as u8;
            }
        }
    }
    Image3::new(h, w, data)
}

#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    preprocess: Duration,
    backbone: Duration,
    rpn: Duration,
    box_head: Duration,
    densepose: Duration,
    iuv: Duration,
}

impl Stages {
    fn total(&self) -> Duration {
        self.preprocess + self.backbone + self.rpn + self.box_head + self.densepose + self.iuv
    }
}

/// One image through every stage, each timed after a device synchronisation.
fn one_image(model: &DensePose, img: &Image3, forced: &mut usize) -> Result<Stages> {
    let dev = model.device().clone();
    let mut st = Stages::default();
    let mut t = Instant::now();
    let mut lap = |slot: &mut Duration| -> Result<()> {
        dev.synchronize()?;
        *slot = t.elapsed();
        t = Instant::now();
        Ok(())
    };
    let pre = model.preprocess(img)?;
    lap(&mut st.preprocess)?;
    let hw = (pre.resized.h, pre.resized.w);
    let fpn = model.features(&pre.tensor)?;
    lap(&mut st.backbone)?;
    let levels = model.rpn().head(&fpn)?;
    let props = model.rpn().proposals(&levels, hw)?;
    lap(&mut st.rpn)?;
    let (_, det) = model.detect(&fpn, &props.boxes, hw)?;
    lap(&mut st.box_head)?;
    // Random weights give arbitrary, often degenerate boxes: below 5% of the image, a fixed
    // person-sized box stands in, so the chart resize costs what a real person costs.
    let (h, w) = (hw.0 as f32, hw.1 as f32);
    let top = match det.boxes.first() {
        Some(b) if (b[2] - b[0]) * (b[3] - b[1]) >= 0.05 * h * w => *b,
        _ => {
            *forced += 1;
            [0.3 * w, 0.08 * h, 0.7 * w, 0.92 * h]
        }
    };
    let dp = model.densepose(&fpn, &[top])?;
    lap(&mut st.densepose)?;
    let sx = img.w as f32 / hw.1 as f32;
    let sy = img.h as f32 / hw.0 as f32;
    let b = [top[0] * sx, top[1] * sy, top[2] * sx, top[3] * sy];
    let c = &dp.chart;
    let chart = iuv::chart_result(
        &c.coarse_segm.get(0)?,
        &c.fine_segm.get(0)?,
        &c.u.get(0)?,
        &c.v.get(0)?,
        &b,
    )?;
    let out = iuv::iuv_image(&chart, &b, img.h, img.w);
    std::hint::black_box(out);
    lap(&mut st.iuv)?;
    Ok(st)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: &DenseposeBench) -> Result<()> {
    if args.images == 0 {
        return Err(Error::msg("--images must be at least 1"));
    }
    let (device, dtype) = (args.device.clone(), args.dtype);
    if dtype != candle_core::DType::F32 {
        println!("note: DensePose runs in float32 (as `prepare` does); --dtype {dtype:?} ignored");
    }
    let (cfg, src) = densepose::load_config(args.config.as_deref())?;
    let t = Instant::now();
    // Residual branches damped so 101 random layers stay finite; small box/anchor deltas keep
    // the random proposals inside the image.
    let vb = RandomWeights::new(args.seed)
        .gain(std::f32::consts::SQRT_2)
        .damp("conv3", 0.2)
        .damp("anchor_deltas", 0.01)
        .damp("bbox_pred", 0.01)
        .var_builder(candle_core::DType::F32, &device);
    let model = DensePose::new(vb, &cfg)?;
    let t_build = t.elapsed();
    let (h, w) = (1101, 750);
    let img = synthetic_photo(h, w)?;
    println!(
        "DensePose R-{} FPN ({}), random weights, {h}x{w} photo (test resize {}/{}), device {:?}; \
         model built in {:.2?}",
        cfg.model.resnets.depth,
        src,
        cfg.input.min_size_test,
        cfg.input.max_size_test,
        device,
        t_build
    );
    let mut forced = 0;
    let warm = one_image(&model, &img, &mut forced)?;
    println!("warm-up image: {:.1} ms", ms(warm.total()));
    let mut sum = Stages::default();
    forced = 0;
    for _ in 0..args.images {
        let s = one_image(&model, &img, &mut forced)?;
        sum.preprocess += s.preprocess;
        sum.backbone += s.backbone;
        sum.rpn += s.rpn;
        sum.box_head += s.box_head;
        sum.densepose += s.densepose;
        sum.iuv += s.iuv;
    }
    let n = args.images as f64;
    let per = |d: Duration| ms(d) / n;
    println!(
        "per image (mean of {}): resize+normalise {:.1} ms, ResNet+FPN {:.1} ms, RPN {:.1} ms, \
         box head {:.1} ms, DensePose head (1 instance) {:.1} ms, chart+IUV {:.1} ms",
        args.images,
        per(sum.preprocess),
        per(sum.backbone),
        per(sum.rpn),
        per(sum.box_head),
        per(sum.densepose),
        per(sum.iuv)
    );
    println!(
        "{:.3} images/s ({:.1} ms per image){}",
        n / sum.total().as_secs_f64(),
        per(sum.total()),
        if forced > 0 {
            format!(
                "; DensePose branch on a fixed person-sized box for {forced} images (random \
                 weights detected nothing that large)"
            )
        } else {
            String::new()
        }
    );
    if args.batch > 1 {
        let photos: Vec<&Image3> = (0..args.batch).map(|_| &img).collect();
        model.iuv_batch(&photos)?;
        device.synchronize()?;
        let t = Instant::now();
        let out = model.iuv_batch(&photos)?;
        device.synchronize()?;
        let el = t.elapsed();
        println!(
            "batched path (prepare): {} photos per backbone pass: {:.3} images/s (DensePose \
             branch ran for the {} with a detection)",
            args.batch,
            args.batch as f64 / el.as_secs_f64(),
            out.iter().filter(|o| o.is_some()).count()
        );
    }
    match crate::bench::peak_rss_bytes() {
        Some(b) => println!(
            "peak RSS {:.2} GiB{}",
            b as f64 / (1u64 << 30) as f64,
            if device.is_cuda() {
                " (host memory only; GPU memory is not measured here)"
            } else {
                ""
            }
        ),
        None => println!("peak RSS: not reported by this OS"),
    }
    Ok(())
}
