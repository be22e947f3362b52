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
