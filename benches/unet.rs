//! Real-size sanity of the UNet: SD-1.5's `config.json` values, seeded random weights, one
//! forward at 64x64 latents (512x512 images), batch 1 and the guidance batch 2.
//! `cargo bench --bench unet`; figures are printed, never asserted. `MCLD_BENCH_DTYPE=bf16` runs
//! the CPU bf16 mode (bf16 weights and products, f32 activations) instead of f32; each batch
//! size reports the best of three forwards after a warm-up one.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mcld::models::unet::UNet2DConditionModel;
use mcld::weights::random::RandomWeights;

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    })
}

fn main() {
    mcld::device::retain_freed_memory();
    let dev = Device::Cpu;
    let cfg = mcld::presets::unet(mcld::presets::Size::Full).expect("SD-1.5 config");
    let t0 = Instant::now();
    let bf16 = std::env::var("MCLD_BENCH_DTYPE").is_ok_and(|d| d == "bf16");
    let mut vb = RandomWeights::new(0).var_builder(DType::F32, &dev);
    if bf16 {
        vb = mcld::weights::bf16::bf16_matmul_weights(vb);
    }
    println!("{}", if bf16 { "bf16" } else { "f32" });
    let unet = UNet2DConditionModel::new(vb, &cfg).expect("SD-1.5 UNet");
    println!(
        "built the SD-1.5 UNet in {:.1} s, peak RSS {}",
        t0.elapsed().as_secs_f64(),
        gib(mcld::bench::peak_rss_bytes())
    );
    for b in bench_batches() {
        let s = Tensor::randn(0f32, 1.0, (b, 4, 64, 64), &dev).expect("latents");
        let c = Tensor::randn(0f32, 1.0, (b, 17, 768), &dev).expect("context");
        let t = Tensor::full(999i64, b, &dev).expect("timesteps");
        let mut out = unet.forward(&s, &t, &c).expect("forward");
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            out = unet.forward(&s, &t, &c).expect("forward");
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let max = out
            .abs()
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.max(0))
            .and_then(|x| x.to_scalar::<f32>())
            .expect("output");
        println!(
            "batch {b}, 64x64 latents: {:.2} s per forward, output max|x| {max:.3}, peak RSS {}",
            best,
            gib(mcld::bench::peak_rss_bytes())
        );
    }
}

/// Batch sizes to time: `MCLD_BENCH_BATCHES=1` for batch 1 only (default 1 and 2).
fn bench_batches() -> Vec<usize> {
    std::env::var("MCLD_BENCH_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2])
}
