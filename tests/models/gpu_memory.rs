//! The CUDA pool's high-water marks (`mcld::device::gpu_memory_peak`), which the benches report
//! as peak GPU memory: they must see a buffer that is already freed, since a sample taken after
//! a phase would not. Runs on `MCLD_TEST_DEVICE` (scripts/gpu-run.sh sets `cuda`); on the CPU
//! there are no figures to report.

use candle_core::{DType, Tensor};
use mcld::device::{gpu_memory_peak, reset_gpu_memory_peak};

use crate::common;

#[test]
fn gpu_memory_peak_sees_a_freed_buffer() {
    let dev = common::device();
    if !dev.is_cuda() {
        assert_eq!(gpu_memory_peak(&dev), None);
        assert!(!reset_gpu_memory_peak(&dev));
        return;
    }
    assert!(
        reset_gpu_memory_peak(&dev),
        "no pool statistics on this GPU"
    );
    let before = gpu_memory_peak(&dev).unwrap();
    const BYTES: u64 = 256 << 20;
    let t = Tensor::ones((BYTES / 4) as usize, DType::F32, &dev).unwrap();
    assert_eq!(t.max_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
    drop(t);
    dev.synchronize().unwrap();
    let after = gpu_memory_peak(&dev).unwrap();
    println!("pool peaks: before {before:?}, after a freed 256 MiB buffer {after:?}");
    assert!(
        after.used >= before.used + BYTES,
        "peak {after:?} missed a 256 MiB buffer (before {before:?})"
    );
    assert!(after.reserved >= after.used, "{after:?}");
    assert!(reset_gpu_memory_peak(&dev));
    let reset = gpu_memory_peak(&dev).unwrap();
    assert!(reset.used < after.used, "reset left {reset:?}");
}
