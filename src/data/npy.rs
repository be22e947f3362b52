//! Minimal `.npy` (format 1.0-3.0) reading and writing for float arrays: all the dataset needs.

use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a little-endian float32/float64 C-order array as f32 with its shape.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = crate::fsutil::read(path)?;
    parse_f32(&bytes).map_err(|m| Error::input(path, format!("bad .npy file: {m}")))
}

/// [`read_f32`] on bytes in memory (an upload); `name` only labels the errors.
pub fn parse_f32_named(bytes: &[u8], name: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    parse_f32(bytes).map_err(|m| Error::input(name, format!("bad .npy file: {m}")))
}

fn parse_f32(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err("missing NUMPY magic".into());
    }
    let major = b[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = b.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<String> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?;
        Some(rest.trim_start().to_string())
    };
    let descr = field("descr").ok_or("no descr")?;
    let descr = descr.trim_start_matches('\'');
    let width = if descr.starts_with("<f4") {
        4
    } else if descr.starts_with("<f8") {
        8
    } else {
        return Err(format!(
            "expected little-endian float32 or float64, got {}",
            descr.split('\'').next().unwrap_or("")
        ));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_txt = field("shape").ok_or("no shape")?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {inner:?}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[start + hlen..];
    if data.len() < n * width {
        return Err(format!(
            "truncated data: shape {shape:?} needs {} bytes, found {}",
            n * width,
            data.len()
        ));
    }
    let out = if width == 4 {
        data.chunks_exact(4)
            .take(n)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .take(n)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    };
    Ok((shape, out))
}

/// Writes a float32 C-order array atomically (format 1.0, as numpy.save does).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::msg(format!(
            "npy {}: shape {shape:?} does not hold {} values",
            path.display(),
            data.len()
        )));
    }
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Pad so that the data starts on a 64-byte boundary, newline-terminated.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * n);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    crate::fsutil::write_atomic(path, &out)
}
