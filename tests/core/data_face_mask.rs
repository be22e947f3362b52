//! Face mask parity on `metrics/face_mask`.

use crate::common;

use candle_core::{Device, Tensor};
use common::{assert_close, fixture_path, load_case, Tolerance};
use mcld::data::face_mask::{face_mask, face_mask_file};
use mcld::imageops::{Filter, U8Image};

fn hw(t: &Tensor) -> (usize, usize) {
    t.dims2().unwrap()
}

#[test]
fn face_mask_matches_reference() {
    let case = load_case("metrics", "face_mask");
    let iuv_path = fixture_path("metrics/face_mask/iuv.png");
    let image_size = hw(case.get("mask_512"));
    let latent_size = hw(case.get("mask_64"));

    // The intermediate Pillow resize of the pose image.
    let iuv = U8Image::open_rgb(&iuv_path).unwrap();
    let want = U8Image::open_rgb(&fixture_path("metrics/face_mask/pose_512.png")).unwrap();
    assert_eq!((want.height, want.width), image_size);
    let got = iuv
        .resize(image_size.1, image_size.0, Filter::Bicubic)
        .unwrap();
    let d = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    println!("pose_512.png: max_abs_err {d}");
    let tol = case.json["tolerance"]["pose_512.png"]["max_abs"]
        .as_u64()
        .unwrap() as u8;
    assert!(d <= tol);
    assert_eq!(d, 0, "a Pillow port must be exact");

    let m = face_mask_file(&iuv_path, image_size, latent_size).unwrap();
    let t = |v: &[u8], (h, w): (usize, usize)| {
        Tensor::from_vec(v.to_vec(), (h, w), &Device::Cpu).unwrap()
    };
    assert_close(
        "mask_512",
        &t(&m.image, image_size),
        case.get("mask_512"),
        Tolerance::Abs(0.0),
    );
    assert_close(
        "mask_64",
        &t(&m.latent, latent_size),
        case.get("mask_64"),
        Tolerance::Abs(0.0),
    );
    let lt = m.latent_tensor(&Device::Cpu).unwrap();
    assert_eq!(lt.dims(), &[1, latent_size.0, latent_size.1]);
    println!(
        "mask pixels: {} at image size, {} at latent size",
        m.image.iter().map(|&v| v as usize).sum::<usize>(),
        m.latent.iter().map(|&v| v as usize).sum::<usize>()
    );
}

#[test]
fn bad_iuv_is_an_error() {
    let gray = U8Image::new(8, 8, 1, vec![23; 64]).unwrap();
    let e = face_mask(&gray, (16, 16), (2, 2)).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken_iuv.png");
    std::fs::write(&p, b"not a png").unwrap();
    let e = face_mask_file(&p, (16, 16), (2, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken_iuv.png"), "{e}");
}
