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
    use crate::conv_ops::{compare_conv, Route, CASES};

    #[test]
    fn cuda_conv_matches_the_cpu_op_in_f32_f16_bf16() {
        let Some(dev) = gpu() else { return };
        for (i, c) in CASES.into_iter().enumerate() {
            for (dt, bound) in CONV_BOUNDS {
                compare_conv(c, 100 + 10 * i as u64, dt, &dev, bound, Route::Cuda);
            }
        }
    }

    /// The network's entry point (`ops::conv::conv2d_forward`) with tracked CUDA tensors gives
    /// the CPU op's results too (it routes them to the cuDNN op).
    #[test]
    fn cuda_conv_entry_point_matches_the_cpu_op() {
        let Some(dev) = gpu() else { return };
        for (i, c) in CASES.into_iter().enumerate().take(4) {
            compare_conv(c, 200 + 10 * i as u64, DType::F32, &dev, 1e-5, Route::Entry);
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
