//! Telea inpainting against `cv2.inpaint(..., 3, INPAINT_TELEA)` of OpenCV 4.8.1
//! (fixtures/metrics/telea.json): exact outside the mask, mean |diff| inside within tolerance.

use crate::common;

use mcld::person::telea::{inpaint_gray, inpaint_rgb, inpaint_telea};

fn read_json(rel: &str) -> serde_json::Value {
    let p = common::fixture_path(rel);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(rel: &str) -> image::DynamicImage {
    image::open(common::fixture_path(&format!("metrics/{rel}"))).unwrap()
}

/// (pixels outside the mask that differ, mean |diff| inside, max |diff| inside).
fn compare(got: &[u8], expected: &[u8], mask: &[u8], channels: usize) -> (usize, f64, u8) {
    assert_eq!(got.len(), expected.len());
    let (mut outside_bad, mut sum, mut n, mut mx) = (0usize, 0f64, 0usize, 0u8);
    for (p, &m) in mask.iter().enumerate() {
        for c in 0..channels {
            let (g, e) = (got[p * channels + c], expected[p * channels + c]);
            let d = g.abs_diff(e);
            if m != 0 {
                sum += d as f64;
                n += 1;
                mx = mx.max(d);
            } else if d != 0 {
                outside_bad += 1;
            }
        }
    }
    (outside_bad, sum / n.max(1) as f64, mx)
}

#[test]
fn telea_matches_opencv_4_8() {
    let case = read_json("metrics/telea.json");
    let tol = case["tolerance"]["inside_mask"]["max_mean_abs_diff"]
        .as_f64()
        .expect("tolerance.inside_mask.max_mean_abs_diff");
    let items = case["items"].as_array().expect("items");
    assert!(!items.is_empty());
    for item in items {
        let name = item["name"].as_str().unwrap();
        let channels = item["channels"].as_u64().unwrap() as usize;
        let (w, h) = (
            item["width"].as_u64().unwrap() as u32,
            item["height"].as_u64().unwrap() as u32,
        );
        let mask = load(item["mask"].as_str().unwrap()).to_luma8();
        assert_eq!(mask.dimensions(), (w, h), "{name}: mask size");
        let masked = mask.pixels().filter(|p| p.0[0] != 0).count();
        assert_eq!(
            masked as u64,
            item["masked_pixels"].as_u64().unwrap(),
            "{name}: masked pixel count"
        );
        let img = load(item["image"].as_str().unwrap());
        let exp = load(item["expected"].as_str().unwrap());
        let (got, expected) = match channels {
            3 => (
                inpaint_rgb(&img.to_rgb8(), &mask, 3.0).unwrap().into_raw(),
                exp.to_rgb8().into_raw(),
            ),
            1 => (
                inpaint_gray(&img.to_luma8(), &mask, 3.0)
                    .unwrap()
                    .into_raw(),
                exp.to_luma8().into_raw(),
            ),
            c => panic!("{name}: unexpected channel count {c}"),
        };
        let (outside_bad, mean, mx) = compare(&got, &expected, mask.as_raw(), channels);
        println!(
            "{name}: {channels} ch, {masked} masked px: mean |diff| inside {mean:.4} (bound {tol}), \
             max |diff| inside {mx}, differing values outside {outside_bad}"
        );
        assert_eq!(outside_bad, 0, "{name}: pixels outside the mask changed");
        assert!(mean <= tol, "{name}: mean |diff| inside {mean} > {tol}");
    }
}

#[test]
fn telea_empty_mask_is_identity() {
    let img: Vec<u8> = (0..5 * 4 * 3).map(|v| v as u8).collect();
    let out = inpaint_telea(&img, 5, 4, 3, &[0; 20], 3.0).unwrap();
    assert_eq!(out, img);
}

/// OpenCV's fill adds 0.5 before rounding half to even and feeds filled pixels back into the
/// gradient term, so a flat hole comes back near, not exactly at, the flat value.
#[test]
fn telea_fills_a_flat_hole_near_the_flat_value() {
    let (w, h) = (12usize, 9usize);
    let img = vec![77u8; w * h];
    let mut mask = vec![0u8; w * h];
    let mut holed = img.clone();
    for y in 3..6 {
        for x in 4..8 {
            mask[y * w + x] = 255;
            holed[y * w + x] = 0;
        }
    }
    let out = inpaint_telea(&holed, w, h, 1, &mask, 3.0).unwrap();
    for (p, (&o, &m)) in out.iter().zip(mask.iter()).enumerate() {
        if m == 0 {
            assert_eq!(o, img[p], "pixel {p} outside the hole changed");
        } else {
            assert!(
                (72..=82).contains(&o),
                "pixel {p} filled with {o}, far from 77"
            );
        }
    }
}

#[test]
fn telea_rejects_bad_input() {
    let err = inpaint_telea(&[0; 12], 2, 2, 3, &[0; 3], 3.0).unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");
    let err = inpaint_telea(&[0; 8], 2, 2, 2, &[0; 4], 3.0).unwrap_err();
    assert!(err.to_string().contains("channels"), "{err}");
    let err = inpaint_telea(&[0; 11], 2, 2, 3, &[0; 4], 3.0).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    let err = inpaint_rgb(
        &image::RgbImage::new(4, 3),
        &image::GrayImage::new(3, 4),
        3.0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("4x3"), "{err}");
}

/// One-pixel-wide and fully masked images must not panic; a fully masked image has no known
/// pixel to fill from and comes back unchanged, as in OpenCV.
#[test]
fn telea_handles_degenerate_shapes() {
    let col: Vec<u8> = vec![10, 20, 0, 40, 50];
    let out = inpaint_telea(&col, 1, 5, 1, &[0, 0, 255, 0, 0], 3.0).unwrap();
    assert_eq!((out[0], out[1], out[3], out[4]), (10, 20, 40, 50));
    let row: Vec<u8> = (0..15).map(|v| v as u8 * 10).collect();
    inpaint_telea(&row, 5, 1, 3, &[255, 0, 0, 0, 255], 3.0).unwrap();
    let img = vec![9u8; 12];
    assert_eq!(inpaint_telea(&img, 4, 3, 1, &[1; 12], 3.0).unwrap(), img);
    assert_eq!(inpaint_telea(&[7], 1, 1, 1, &[255], 3.0).unwrap(), vec![7]);
}

/// Stopping early must not change any needed pixel: compare with the full run on every item.
#[test]
fn telea_needed_pixels_match_the_full_run() {
    use mcld::person::telea::inpaint_telea_needed;
    let case = read_json("metrics/telea.json");
    for item in case["items"].as_array().expect("items") {
        let name = item["name"].as_str().unwrap();
        let channels = item["channels"].as_u64().unwrap() as usize;
        let mask = load(item["mask"].as_str().unwrap()).to_luma8();
        let (w, h) = mask.dimensions();
        let img = load(item["image"].as_str().unwrap());
        let raw = if channels == 3 {
            img.to_rgb8().into_raw()
        } else {
            img.to_luma8().into_raw()
        };
        let (w, h) = (w as usize, h as usize);
        // Needed: a band around the left third, so the march has to stop part-way.
        let needed: Vec<u8> = (0..w * h).map(|p| (p % w < w / 3) as u8).collect();
        let full = inpaint_telea(&raw, w, h, channels, mask.as_raw(), 3.0).unwrap();
        let part = inpaint_telea_needed(&raw, w, h, channels, mask.as_raw(), 3.0, &needed).unwrap();
        let mut checked = 0;
        for p in 0..w * h {
            if needed[p] != 0 || mask.as_raw()[p] == 0 {
                for c in 0..channels {
                    assert_eq!(
                        part[p * channels + c],
                        full[p * channels + c],
                        "{name} px {p}"
                    );
                }
                checked += 1;
            }
        }
        let skipped = (0..w * h)
            .filter(|&p| mask.as_raw()[p] != 0 && needed[p] == 0)
            .filter(|&p| (0..channels).any(|c| part[p * channels + c] != full[p * channels + c]))
            .count();
        println!("{name}: {checked} pixels identical, {skipped} unneeded pixels left unfilled");
    }
}
