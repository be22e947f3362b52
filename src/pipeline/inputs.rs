//! One test pair's inputs, read from the dataset layout `prepare` writes (SPEC §2):
//! `test/NAME.jpg`, `test_densepose/STEM.png`, `test_texture/STEM.png`, `test_face/STEM.npy`.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::{Error, Result};

/// A (source, target) pair of file names as in `test.csv` (`from,to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub from: String,
    pub to: String,
}

fn stem(name: &str) -> &str {
    Path::new(name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name)
}

impl Pair {
    /// `<from-stem>_2_<to-stem>.png`, the reference's output name (and the ground truth's, so
    /// that `evaluate` can match them by file name).
    pub fn out_name(&self) -> String {
        format!("{}_2_{}.png", stem(&self.from), stem(&self.to))
    }
}

/// Reads a pairs CSV with header `from,to`; errors name the file and the line.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, l)| l.trim().to_string())
        .unwrap_or_default();
    let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
    let (fi, ti) = match (
        cols.iter().position(|c| *c == "from"),
        cols.iter().position(|c| *c == "to"),
    ) {
        (Some(f), Some(t)) => (f, t),
        _ => {
            return Err(Error::input(
                path,
                format!("expected a header with columns `from,to`, got {header:?}"),
            ))
        }
    };
    let mut pairs = Vec::new();
    for (i, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(|c| c.trim()).collect();
        match (f.get(fi), f.get(ti)) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => pairs.push(Pair {
                from: a.to_string(),
                to: b.to_string(),
            }),
            _ => {
                return Err(Error::input(
                    path,
                    format!("line {}: expected `from,to`, got {line:?}", i + 1),
                ))
            }
        }
    }
    Ok(pairs)
}

/// Where one split's files live.
#[derive(Debug, Clone)]
pub struct DatasetLayout {
    pub root: PathBuf,
    /// `train` or `test`.
    pub split: String,
}

impl DatasetLayout {
    pub fn new(root: impl Into<PathBuf>, split: &str) -> Self {
        Self {
            root: root.into(),
            split: split.to_string(),
        }
    }
    pub fn photo(&self, name: &str) -> PathBuf {
        self.root.join(&self.split).join(name)
    }
    pub fn pose(&self, name: &str) -> PathBuf {
        self.root
            .join(format!("{}_densepose", self.split))
            .join(format!("{}.png", stem(name)))
    }
    pub fn texture(&self, name: &str) -> PathBuf {
        self.root
            .join(format!("{}_texture", self.split))
            .join(format!("{}.png", stem(name)))
    }
    pub fn face(&self, name: &str) -> PathBuf {
        self.root
            .join(format!("{}_face", self.split))
            .join(format!("{}.npy", stem(name)))
    }
}

/// Everything the pipeline needs for one pair, decoded.
#[derive(Debug, Clone)]
pub struct PairInputs {
    pub pair: Pair,
    /// Source photo, RGB.
    pub source: RgbImage,
    /// Target IUV image as stored (R = V, G = U, B = I).
    pub pose: RgbImage,
    /// Source texture map, RGB.
    pub texture: RgbImage,
    /// Source face embedding (512 values; zeros where no face was found, as the reference does).
    pub face: Vec<f32>,
    /// Ground-truth target photo, RGB.
    pub target: RgbImage,
    /// True when the face embedding file was absent and zeros stand in.
    pub face_missing: bool,
}

/// Decodes an image file as RGB, naming the file on failure.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    if !path.exists() {
        return Err(Error::input(path, "file not found"));
    }
    crate::imageops::open_rgb(path)
}

/// Reads all inputs of a pair. A missing or unreadable photo, pose or texture is an error naming
/// the file; a missing face embedding is zeros (SPEC §2).
pub fn load_pair(layout: &DatasetLayout, pair: &Pair) -> Result<PairInputs> {
    let source = read_rgb(&layout.photo(&pair.from))?;
    let target = read_rgb(&layout.photo(&pair.to))?;
    let pose = read_rgb(&layout.pose(&pair.to))?;
    let texture = read_rgb(&layout.texture(&pair.from))?;
    let fp = layout.face(&pair.from);
    let (face, face_missing) = if fp.exists() {
        (read_face_embedding(&fp)?, false)
    } else {
        (vec![0f32; 512], true)
    };
    Ok(PairInputs {
        pair: pair.clone(),
        source,
        pose,
        texture,
        face,
        target,
        face_missing,
    })
}

/// A face embedding `.npy`: 512 values, float32 or float64, shape (512,) or (1, 512).
pub fn read_face_embedding(path: &Path) -> Result<Vec<f32>> {
    let (shape, data) = npy::read_f32(path)?;
    if data.len() != 512 {
        return Err(Error::input(
            path,
            format!("expected a 512-d face embedding, got shape {shape:?}"),
        ));
    }
    Ok(data)
}

/// Minimal `.npy` (format 1.0-3.0) reading and writing for float arrays: all the dataset needs.
pub mod npy {
    use std::path::Path;

    use crate::{Error, Result};

    const MAGIC: &[u8] = b"\x93NUMPY";

    /// Reads a little-endian float32/float64 C-order array as f32 with its shape.
    pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
        let bytes = crate::fsutil::read(path)?;
        parse_f32(&bytes).map_err(|m| Error::input(path, format!("bad .npy file: {m}")))
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
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_name_matches_reference() {
        let p = Pair {
            from: "fashionMENDenimid0000008001_1front.jpg".into(),
            to: "fashionMENDenimid0000008001_2side.jpg".into(),
        };
        assert_eq!(
            p.out_name(),
            "fashionMENDenimid0000008001_1front_2_fashionMENDenimid0000008001_2side.png"
        );
    }

    #[test]
    fn pairs_csv_parses_and_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.csv");
        std::fs::write(&p, "from,to\na.jpg,b.jpg\nc.jpg,d.jpg\n").unwrap();
        let v = read_pairs(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to, "d.jpg");
        std::fs::write(&p, "from,to\na.jpg,b.jpg\nbroken\n").unwrap();
        let e = read_pairs(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("t.csv"), "{e}");
        std::fs::write(&p, "a,b\n").unwrap();
        assert!(read_pairs(&p).unwrap_err().to_string().contains("header"));
    }

    #[test]
    fn npy_round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.npy");
        let v: Vec<f32> = (0..512).map(|i| i as f32 * 0.5 - 3.0).collect();
        npy::write_f32(&p, &[512], &v).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 4 * 512) % 64, 0);
        assert_eq!(read_face_embedding(&p).unwrap(), v);
        npy::write_f32(&p, &[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let (s, _) = npy::read_f32(&p).unwrap();
        assert_eq!(s, vec![2, 3]);
        let e = read_face_embedding(&p).unwrap_err().to_string();
        assert!(e.contains("512") && e.contains("f.npy"), "{e}");
        std::fs::write(&p, b"not numpy").unwrap();
        assert!(read_face_embedding(&p)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn float64_npy_is_read() {
        // numpy.save of np.zeros((1, 512)) (float64), as the reference's fallback would write.
        let mut header =
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 512), }".to_string();
        let total = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - total % 64) % 64));
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        for i in 0..512 {
            b.extend_from_slice(&(i as f64).to_le_bytes());
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("z.npy");
        std::fs::write(&p, b).unwrap();
        let v = read_face_embedding(&p).unwrap();
        assert_eq!(v[511], 511.0);
    }
}
