//! `ops::attention::cpu` whole (both products and the softmax) on the UNet's attention shapes
//! at 512x512: f32 and bf16. `cargo bench --bench attention`; figures are printed, never
//! asserted.

use std::time::Instant;

use candle_core::{Device, Tensor};
use mcld::ops::attention::cpu as cpu_attention;
use mcld::ops::packed_gemm;

/// CPU time this process has used, all threads together.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> candle_core::Result<()> {
    println!(
        "{} threads; AVX-512 BF16: {}",
        rayon::current_num_threads(),
        packed_gemm::available()
    );
    // (name, batch x heads, query tokens, key tokens, head width)
    let shapes = [
        ("ref self-attn 64x64", 8, 4096, 4096, 40),
        ("guided self-attn + bank 64x64", 16, 4096, 8192, 40),
        ("guided self-attn + bank 32x32", 16, 1024, 2048, 80),
        ("guided cross-attn 64x64 (77+16 tok)", 16, 4096, 93, 40),
    ];
    println!(
        "{:38} {:>18} {:>18}",
        "shape", "f32 ms (cpu ms)", "bf16 ms (cpu ms)"
    );
    let dev = Device::Cpu;
    for (name, bh, tq, tk, d) in shapes {
        let q = (Tensor::randn(0f32, 1.0, (1, bh, tq, d), &dev)? * 2.0)?;
        let k = (Tensor::randn(0f32, 1.0, (1, bh, tk, d), &dev)? * 2.0)?;
        let v = Tensor::randn(0f32, 1.0, (1, bh, tk, d), &dev)?;
        let mut cells = Vec::new();
        for bf16 in [false, true] {
            if bf16 && !packed_gemm::available() {
                cells.push("n/a".to_string());
                continue;
            }
            let run = || cpu_attention::attention(&q, &k, &v, bf16).map(|o| o.is_some());
            run()?;
            let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let (t, c) = (Instant::now(), cpu_seconds());
                run()?;
                best = best.min(t.elapsed().as_secs_f64());
                best_cpu = best_cpu.min(cpu_seconds() - c);
            }
            cells.push(format!("{:8.1} ({:7.1})", best * 1e3, best_cpu * 1e3));
        }
        println!("{name:38} {:>18} {:>18}", cells[0], cells[1]);
    }
    Ok(())
}
