//! Real-size sanity of the UNet: SD-1.5's `config.json` values, seeded random weights, one
//! forward at 64x64 latents (512x512 images), batch 1 and the guidance batch 2.
//! `cargo bench --bench unet`; figures are printed, never asserted.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mcld::models::unet::{Config, UNet2DConditionModel};
use mcld::weights::random::RandomWeights;

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    })
}

fn main() {
    mcld::device::retain_freed_memory();
    let dev = Device::Cpu;
    let cfg = Config::sd15();
    let t0 = Instant::now();
    let vb = RandomWeights::new(0).var_builder(DType::F32, &dev);
    let unet = UNet2DConditionModel::new(vb, &cfg).expect("SD-1.5 UNet");
    println!(
        "built the SD-1.5 UNet in {:.1} s, peak RSS {}",
        t0.elapsed().as_secs_f64(),
        gib(mcld::bench::peak_rss_bytes())
    );
    for b in [1usize, 2] {
        let s = Tensor::randn(0f32, 1.0, (b, 4, 64, 64), &dev).expect("latents");
        let c = Tensor::randn(0f32, 1.0, (b, 17, 768), &dev).expect("context");
        let t = Tensor::full(999i64, b, &dev).expect("timesteps");
        let t0 = Instant::now();
        let out = unet.forward(&s, &t, &c).expect("forward");
        let max = out
            .abs()
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.max(0))
            .and_then(|x| x.to_scalar::<f32>())
            .expect("output");
        println!(
            "batch {b}, 64x64 latents: {:.1} s per forward, output max|x| {max:.3}, peak RSS {}",
            t0.elapsed().as_secs_f64(),
            gib(mcld::bench::peak_rss_bytes())
        );
    }
}
