//! `--device` and `--dtype` parsing, shared by every subcommand.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N`. A CUDA request on a build without the `cuda` feature is an
/// error that says how to get one, rather than a silent fall-back to the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| Error::msg(format!("bad device '{s}': expected cpu, cuda or cuda:N")))?
    } else {
        return Err(Error::msg(format!(
            "bad device '{s}': expected cpu, cuda or cuda:N"
        )));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::msg(format!(
            "device '{s}' asked for, but this mcld was built without CUDA: \
             rebuild with `cargo build --release --features cuda` (see scripts/build-cuda.sh)"
        )));
    }
    let device = Device::new_cuda(ordinal)?;
    keep_freed_gpu_memory(&device);
    Ok(device)
}

/// High-water marks of this process's memory on a CUDA device, from the driver's memory pool
/// that candle's allocator draws on (cudarc allocates with `cuMemAllocAsync` where the device has
/// pools). A true peak, unlike nvidia-smi samples taken between phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemoryPeak {
    /// Bytes held by live buffers at the worst moment (PyTorch's `max_memory_allocated`).
    pub used: u64,
    /// Bytes the pool held at the worst moment (PyTorch's `max_memory_reserved`).
    pub reserved: u64,
}

/// The peaks since the process started or the last [`reset_gpu_memory_peak`]; `None` on the
/// CPU, on a build without CUDA, or where the driver gives no pool statistics.
pub fn gpu_memory_peak(device: &Device) -> Option<GpuMemoryPeak> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let pool = cuda_pool::current(device)?;
        Some(GpuMemoryPeak {
            used: cuda_pool::get(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: cuda_pool::get(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Starts the peaks of [`gpu_memory_peak`] again from the current use (after building the
/// networks, say). Returns whether the device has pool statistics to reset.
pub fn reset_gpu_memory_peak(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let Some(pool) = cuda_pool::current(device) else {
            return false;
        };
        // The driver only accepts 0 for the high-water marks: "reset to the current value".
        cuda_pool::set(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
            && cuda_pool::set(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// Lets the CUDA pool keep memory that tensors free, as PyTorch's caching allocator does.
///
/// The pool's default release threshold is 0: at every synchronisation (each host read of a
/// loss, each phase timing) the driver unmaps all free memory, and the next allocations map it
/// again. candle gives every op result a fresh buffer, so that is paid over and over.
/// `MCLD_CUDA_POOL_RELEASE=1` keeps the driver's default.
fn keep_freed_gpu_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        if std::env::var_os("MCLD_CUDA_POOL_RELEASE").is_some_and(|v| v == "1") {
            return;
        }
        if let Some(pool) = cuda_pool::current(device) {
            cuda_pool::set(pool, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The driver calls behind the pool statistics (cudarc's raw bindings, re-exported by candle).
#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    /// The device's current pool, when its context allocates from one.
    pub(super) fn current(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else {
            return None;
        };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return None;
        }
        ctx.bind_to_thread().ok()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        // SAFETY: the device handle comes from a live context; the driver writes the handle.
        unsafe { sys::cuDeviceGetMemPool(pool.as_mut_ptr(), ctx.cu_device()) }
            .result()
            .ok()?;
        // SAFETY: written by the successful call above.
        Some(unsafe { pool.assume_init() })
    }

    /// A 64-bit pool attribute (every statistic and the release threshold are cuuint64_t).
    pub(super) fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v = 0u64;
        // SAFETY: `pool` is a live pool handle and `attr` one of the 64-bit attributes.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
            .result()
            .ok()?;
        Some(v)
    }

    pub(super) fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, v: u64) -> bool {
        let mut v = v;
        // SAFETY: as in `get`; the driver reads the value.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
            .result()
            .is_ok()
    }
}

/// A device as `--device` spells it (`cpu`, `cuda:N`).
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses `f32`, `f16`, `bf16` (also `fp32`, `fp16`, the reference's spellings).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::msg(format!(
            "bad dtype '{other}': expected f32, f16 or bf16"
        ))),
    }
}

/// Keeps memory freed by tensors inside the process instead of handing it back to the kernel.
///
/// candle gives every op result a fresh buffer. glibc serves the large ones with `mmap` and unmaps
/// them on free, so each op pays the kernel to fault in and zero new pages: a third of the CPU
/// time of a UNet forward was system time. Serving every allocation from the heap and trimming it
/// only above 2 GiB of free top lets later ops reuse those pages (`cargo bench --bench unet`:
/// batch 1 21.8 s -> 13.3 s, peak RSS +3%). A `MALLOC_MMAP_MAX_` set in the environment wins, so
/// `MALLOC_MMAP_MAX_=65536` restores glibc's default. Returns whether the policy was applied; it
/// is a no-op off glibc.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_MAX_").is_some() {
            return false;
        }
        // SAFETY: mallopt only changes allocator tunables; both values are in glibc's range.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Lets candle's elementwise worker threads sleep as soon as an op ends.
///
/// candle runs large elementwise ops on its own barrier pool, whose workers spin for 25,000 rounds
/// after each op before parking. Between two elementwise ops our kernels run on rayon's threads,
/// and a spinning candle worker takes a core from them: on a 2-core machine the training step's
/// backward pass used two cores' worth of CPU time for one core's worth of progress. Inference,
/// whose elementwise ops often follow each other, gains from the spin, so the binary parks only
/// for training commands. Must run before the first candle op (the pool reads its setting
/// once); an explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment wins. Returns whether
/// it set the limit.
pub fn park_idle_workers() -> bool {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_some() {
        return false;
    }
    std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("fp16").unwrap(), DType::F16);
        assert!(parse_dtype("int8").is_err());
    }

    #[test]
    fn cpu_has_no_gpu_memory_peak() {
        assert_eq!(gpu_memory_peak(&Device::Cpu), None);
        assert!(!reset_gpu_memory_peak(&Device::Cpu));
    }
}
