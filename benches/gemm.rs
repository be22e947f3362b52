//! The matmul kernels side by side on the shapes that dominate the MCLD pipeline at 512x512:
//! f32 through the `gemm` crate (what `--dtype f32` uses) and bf16 through
//! `ops::packed_gemm` (what `--dtype bf16` uses on CPUs with AVX-512 BF16), packing included.
//! `cargo bench --bench gemm`; figures are printed, never asserted.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use mcld::ops::conv::Conv2d;
use mcld::ops::packed_gemm::{self, PackedA, PackedB};

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

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

/// (GFLOP/s of wall time, GFLOP/s per second of CPU time) of `f` for a product of 2 m n k
/// flops, best of a few repeats. The second figure is the rate of one busy core, which stays
/// meaningful when other processes share the machine.
fn rate(m: usize, n: usize, k: usize, mut f: impl FnMut()) -> (f64, f64) {
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((4e9 / flops) as usize).clamp(1, 50);
    f();
    let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_seconds());
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        best_cpu = best_cpu.min((cpu_seconds() - c) / reps as f64);
    }
    (flops / best / 1e9, flops / best_cpu / 1e9)
}

fn main() {
    // As the binary runs: freed memory stays in the heap (fresh pages would be timed otherwise).
    mcld::device::retain_freed_memory();
    let threads = rayon::current_num_threads();
    println!(
        "{threads} threads; AVX-512 BF16: {}",
        packed_gemm::available()
    );
    let shapes = [
        ("conv 3x3 320ch 64x64", 320, 4096, 2880),
        ("conv 3x3 640ch 32x32", 640, 1024, 5760),
        ("conv 3x3 1280ch 16x16", 1280, 256, 11520),
        ("vae conv 3x3 128ch 512^2 tile", 128, 8192, 1152),
        ("linear 4096 tok 320->320", 4096, 320, 320),
        ("geglu 4096 tok 320->2560", 4096, 2560, 320),
        ("ff out 4096 tok 1280->320", 4096, 320, 1280),
        ("attn q k^T 256 rows x 8192 d40", 256, 8192, 40),
        ("attn p v 256 rows x 8192 d40", 256, 40, 8192),
        ("clip mlp 257 tok 1024->4096", 257, 4096, 1024),
    ];
    println!("GFLOP/s of wall time (in brackets: per busy core, from CPU time)");
    println!(
        "{:34} {:>20} {:>20} {:>7}",
        "shape (m x n x k)", "f32", "bf16", "ratio"
    );
    for (name, m, n, k) in shapes {
        let a = values(m * k);
        let b = values(k * n);
        let mut c = vec![0f32; m * n];
        let f32_rate = rate(m, n, k, || unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        let bf16_rate = if packed_gemm::available() {
            rate(m, n, k, || {
                let pa = PackedA::from_f32_rows(&a, m, k, k);
                let pb = PackedB::from_f32_rows(&b, k, n, n);
                packed_gemm::matmul_parallel(&pa, &pb, &mut c, n, false).expect("bf16 matmul");
            })
        } else {
            (f64::NAN, f64::NAN)
        };
        println!(
            "{name:34} {:7.1} ({:6.1}/core) {:7.1} ({:6.1}/core) {:6.2}x",
            f32_rate.0,
            f32_rate.1,
            bf16_rate.0,
            bf16_rate.1,
            bf16_rate.0 / f32_rate.0
        );
    }
    // The kernel alone: operands packed once, outside the timing, one thread.
    let (m, n, k) = (384, 1024, 2880);
    let (a, b) = (values(m * k), values(k * n));
    let pa = PackedA::from_f32_rows(&a, m, k, k);
    let pb = PackedB::from_f32_rows(&b, k, n, n);
    let mut c = vec![0f32; m * n];
    if packed_gemm::available() {
        let r = rate(m, n, k, || {
            packed_gemm::matmul(&pa, &pb, &mut c, n, false).expect("bf16 matmul")
        });
        println!(
            "bf16 kernel alone, {m} x {n} x {k}, one thread: {:.1} GFLOP/s",
            r.1
        );
    }
    if packed_gemm::available_f32() {
        let pa = PackedA::from_f32_rows_exact(&a, m, k, k);
        let pb = PackedB::from_f32_rows_exact(&b, k, n, n);
        let r = rate(m, n, k, || {
            packed_gemm::matmul(&pa, &pb, &mut c, n, false).expect("f32 matmul")
        });
        println!(
            "f32 packed kernel alone, {m} x {n} x {k}, one thread: {:.1} GFLOP/s",
            r.1
        );
    }
    conv_layers(threads);
    packing(threads);
}

/// The f32 right operand packed from lines (a linear layer's weight read as W^T, packed again
/// every training step since the weight changes): milliseconds and GB/s read plus written.
fn packing(threads: usize) {
    println!("f32 right operands from lines (W^T of a linear layer), {threads} threads");
    for (lines, depth) in [(1280, 1280), (2560, 640), (640, 5120), (320, 320)] {
        let w = values(lines * depth);
        let reps = (2e8 / (lines * depth) as f64).clamp(3.0, 200.0) as usize;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(PackedB::from_f32_cols_exact(&w, depth, lines, depth));
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let bytes = 2.0 * 4.0 * (lines * depth) as f64;
        println!(
            "  {lines} lines x {depth}: {:.3} ms, {:.1} GB/s",
            best * 1e3,
            bytes / best / 1e9
        );
    }
}

/// Whole 3x3 convolution layers (patch packing, bias and the NCHW output included), as the
/// pipeline runs them: the VAE decoder's big stages and the UNet's first.
fn conv_layers(threads: usize) {
    let layers = [
        ("vae 128ch 512x512", 128, 512),
        ("vae 256ch 256x256", 256, 256),
        ("vae 512ch 128x128", 512, 128),
        ("unet 320ch 64x64", 320, 64),
    ];
    println!("whole 3x3 conv layers, {threads} threads, GFLOP/s of wall time (per busy core)");
    for (name, ch, size) in layers {
        let dev = Device::Cpu;
        let k = ch * 9;
        let w = Tensor::from_vec(values(ch * k), (ch, ch, 3, 3), &dev).expect("weight");
        let b = Tensor::from_vec(values(ch), ch, &dev).expect("bias");
        let x =
            Tensor::from_vec(values(ch * size * size), (1, ch, size, size), &dev).expect("input");
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let (m, n) = (ch, size * size);
        let mut row = format!("{name:34}");
        for dt in [DType::F32, DType::BF16] {
            if dt == DType::BF16 && !packed_gemm::available() {
                continue;
            }
            let conv = Conv2d::new(w.to_dtype(dt).expect("cast"), Some(b.clone()), cfg);
            let r = rate(m, n, k, || {
                conv.forward(&x).expect("conv");
            });
            row += &format!(" {dt:?} {:7.1} ({:6.1}/core)", r.0, r.1);
        }
        println!("{row}");
    }
}
