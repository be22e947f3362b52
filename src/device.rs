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
    Ok(Device::new_cuda(ordinal)?)
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
}
