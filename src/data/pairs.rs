//! Pairs (`train.csv`, `test.csv`) and one pair's inputs, read from the dataset layout `prepare`
//! writes (see [`super::layout`]).

use std::path::Path;

use image::RgbImage;

use super::layout::{read_face_embedding, read_rgb, stem, DatasetLayout};
use crate::{Error, Result};

/// A (source, target) pair of file names as in `test.csv` (`from,to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub from: String,
    pub to: String,
}

impl Pair {
    /// `<from-stem>_2_<to-stem>.png`, the reference's output name (and the ground truth's, so
    /// that `evaluate` can match them by file name).
    pub fn out_name(&self) -> String {
        format!("{}_2_{}.png", stem(&self.from), stem(&self.to))
    }

    /// How a labelled grid names the pair's row: source image -> target image.
    pub fn label(&self) -> String {
        format!("{}  ->  {}", self.from, self.to)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npy;

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
