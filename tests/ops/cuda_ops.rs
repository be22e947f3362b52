//! The training ops for CUDA tensors (`ops::cuda`: cuDNN convolution, blocked attention) on a
//! GPU against the CPU training ops in f64 on the same values: the output and every gradient,
//! in f32 (bound 1e-5 of the largest reference value; TF32 must be off, as
//! scripts/gpu-run.sh runs these with NVIDIA_TF32_OVERRIDE=0), f16 and bf16 (bounds from
//! their rounding: the inputs are rounded alike, so what remains is the rounding of results
//! and, in attention, of the probabilities before their products).
//!
//! They run on `MCLD_TEST_DEVICE` when it names a CUDA device (no usable GPU then fails the
//! test), else on CUDA device 0 when one is usable; otherwise they say on stderr that they
//! skipped. Every test name contains `cuda` (scripts/gpu-run.sh selects them by that).

use candle_core::{DType, Device, Tensor};

use crate::blocked_attention::{compare_attention, ATTN_CASES};
use crate::common;

/// The GPU to test on, or `None` (skipped, said on stderr) where none is asked for and none is
/// usable. `MCLD_TEST_DEVICE=cuda` without a usable GPU panics in `common::device`.
fn gpu() -> Option<Device> {
    match std::env::var("MCLD_TEST_DEVICE") {
        Ok(s) if !s.trim().is_empty() => {
            let d = common::device();
            if d.is_cuda() {
                Some(d)
            } else {
                eprintln!("skipped: MCLD_TEST_DEVICE={s} is no CUDA device");
                None
            }
        }
        _ => match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: no usable GPU ({e}); set MCLD_TEST_DEVICE=cuda to require one");
                None
            }
        },
    }
}

/// Bounds (relative to the largest reference value) per dtype for the convolution, whose only
/// roundings are the results' own.
#[cfg(feature = "cudnn")]
const CONV_BOUNDS: [(DType, f64); 3] =
    [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)];

#[cfg(feature = "cudnn")]
mod conv {
    use super::*;
    use crate::grad_check::{compare, rand};
    use mcld::ops::{conv::conv2d_forward, conv_grad, cuda};

    /// (name, n, ci, h, w, co, k, stride, padding, dilation, bias)
    type Case = (
        &'static str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
    );

    /// 3x3 stride 1 padded; 3x3 stride 2 whose height and width leave different remainders;
    /// 1x1; dilation 2; unpadded without bias; and enough channels for tensor-core algorithms.
    const CASES: [Case; 6] = [
        ("3x3_s1_p1", 2, 8, 12, 10, 16, 3, 1, 1, 1, true),
        ("3x3_s2_p1_uneven", 2, 8, 13, 10, 12, 3, 2, 1, 1, true),
        ("1x1", 2, 16, 9, 7, 8, 1, 1, 0, 1, true),
        ("3x3_p2_d2", 1, 6, 11, 9, 10, 3, 1, 2, 2, true),
        ("3x3_p0_nobias", 1, 5, 8, 9, 7, 3, 1, 0, 1, false),
        ("3x3_64ch", 2, 64, 24, 20, 64, 3, 1, 1, 1, true),
    ];

    fn inputs(c: Case, seed: u64) -> Vec<Tensor> {
        let (_, n, ci, h, w, co, k, .., bias) = c;
        let scale = 1.0 / ((ci * k * k) as f64).sqrt();
        let mut t = vec![
            rand(seed, &[n, ci, h, w]),
            (rand(seed + 1, &[co, ci, k, k]) * scale).unwrap(),
        ];
        if bias {
            t.push(rand(seed + 2, &[co]));
        }
        t
    }

    fn run(c: Case, t: &[Tensor], entry: bool) -> Tensor {
        let (.., s, p, d, _) = c;
        let b = t.get(2);
        if entry {
            return conv2d_forward(&t[0], &t[1], b, p, s, d, 1).unwrap();
        }
        let y = if t[0].device().is_cuda() {
            cuda::conv::conv2d(&t[0], &t[1], b, p, s, d, 1)
        } else {
            conv_grad::conv2d(&t[0], &t[1], b, p, s, d, 1)
        };
        y.unwrap().expect("the conv op applies")
    }

    /// The cuDNN op's output and gradients in `dt` on the GPU against the CPU op in f64
    /// (through the network's entry point `conv2d_forward` when `entry`).
    fn compare_conv(c: Case, seed: u64, dt: DType, dev: &Device, bound: f64, entry: bool) {
        let what = ["out", "dx", "dw", "db"];
        let what = &what[..if c.10 { 4 } else { 3 }];
        let name = format!("cudnn conv {}{}", c.0, if entry { " (entry)" } else { "" });
        let ours = |t: &[Tensor]| run(c, t, entry);
        let reference = |t: &[Tensor]| run(c, t, false);
        compare(
            &name,
            what,
            &inputs(c, seed),
            dt,
            dev,
            bound,
            &ours,
            &reference,
        );
    }

    #[test]
    fn cuda_conv_matches_the_cpu_op_in_f32_f16_bf16() {
        let Some(dev) = gpu() else { return };
        for (i, c) in CASES.into_iter().enumerate() {
            for (dt, bound) in CONV_BOUNDS {
                compare_conv(c, 100 + 10 * i as u64, dt, &dev, bound, false);
            }
        }
    }

    /// The network's entry point (`ops::conv::conv2d_forward`) with tracked CUDA tensors gives
    /// the CPU op's results too (it routes them to the cuDNN op).
    #[test]
    fn cuda_conv_entry_point_matches_the_cpu_op() {
        let Some(dev) = gpu() else { return };
        for (i, c) in CASES.into_iter().enumerate().take(4) {
            compare_conv(c, 200 + 10 * i as u64, DType::F32, &dev, 1e-5, true);
        }
    }
}

/// The blocked attention on the GPU: self, cross with dv != d, several query blocks. Bounds
/// as on the CPU (`blocked_attention`): f32 1e-5, f16 3e-3, bf16 2e-2.
#[test]
fn cuda_attention_matches_the_cpu_op_in_f32_f16_bf16() {
    let Some(dev) = gpu() else { return };
    for (i, c) in ATTN_CASES.into_iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        compare_attention(c, seed, DType::F32, &dev, 1e-5);
        compare_attention(c, seed, DType::F16, &dev, 3e-3);
        compare_attention(c, seed, DType::BF16, &dev, 2e-2);
    }
}

/// The network's entry point (`ops::attention::attention`) with tracked CUDA tensors against
/// the CPU op (it routes them to the blocked op).
#[test]
fn cuda_attention_entry_point_matches_the_cpu_op() {
    let Some(dev) = gpu() else { return };
    use crate::blocked_attention::{attn_inputs, cpu_op};
    use crate::grad_check::{assert_rel, grads_of};
    let c = ATTN_CASES[1];
    let t = attn_inputs(c, 400);
    let ours: Vec<Tensor> = t
        .iter()
        .map(|t| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap())
        .collect();
    let refs: Vec<Tensor> = t
        .iter()
        .map(|t| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        })
        .collect();
    let f = |t: &[Tensor]| mcld::ops::attention::attention(&t[0], &t[1], &t[2]).unwrap();
    let (y, g) = grads_of(&ours, DType::F32, &f);
    let (y_ref, g_ref) = grads_of(&refs, DType::F32, &cpu_op);
    assert!(y.device().is_cuda());
    assert_rel("attention entry out", &y, &y_ref, 1e-5);
    for (i, what) in ["dq", "dk", "dv"].iter().enumerate() {
        assert_rel(&format!("attention entry {what}"), &g[i], &g_ref[i], 1e-5);
    }
}

/// GroupNorm(+SiLU) and LayerNorm on the GPU (the ops the networks take for tracked CUDA
/// tensors) against the CPU ops in f64. Bounds as on the CPU (`tensor_ops`).
#[test]
fn cuda_norms_match_the_cpu_ops_in_f32_f16_bf16() {
    let Some(dev) = gpu() else { return };
    for (dt, bound) in crate::tensor_ops::BOUNDS {
        crate::tensor_ops::compare_norms(dt, &dev, bound, true);
    }
}

/// GEGLU on the GPU against the CPU op in f64, bounds as for the norms.
#[test]
fn cuda_geglu_matches_the_cpu_op_in_f32_f16_bf16() {
    let Some(dev) = gpu() else { return };
    for (dt, bound) in crate::tensor_ops::BOUNDS {
        crate::tensor_ops::compare_geglu(dt, &dev, bound, true);
    }
}
