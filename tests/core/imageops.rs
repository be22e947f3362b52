//! Pillow/torch resize parity on `metrics/resize` (see its JSON for the semantics).

use crate::common;

use common::{fixture_path, load_case, Case};
use mcld::imageops::{self, AaMode, Filter, U8Image};

fn png(rel: &str) -> U8Image {
    U8Image::open_rgb(&fixture_path(&format!("metrics/{rel}"))).unwrap()
}

/// The input named in the JSON's `inputs` whose key matches `pred`.
fn input_key(case: &Case, pred: impl Fn(&str) -> bool) -> String {
    case.json["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .find(|k| pred(k))
        .unwrap_or_else(|| panic!("resize.json: no matching input"))
        .clone()
}

fn max_abs_diff(a: &U8Image, b: &U8Image) -> u8 {
    assert_eq!(
        (a.width, a.height, a.channels),
        (b.width, b.height, b.channels)
    );
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

fn tol_max_abs(case: &Case, key: &str) -> u8 {
    case.json["tolerance"][key]["max_abs"]
        .as_u64()
        .unwrap_or_else(|| panic!("resize.json: no max_abs tolerance for {key}")) as u8
}

/// Every `resize/gt_*.png` in the expected block, as (file, tag).
fn gt_files(case: &Case) -> Vec<String> {
    let mut v: Vec<String> = case.json["expected"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("resize/gt_") && k.ends_with(".png"))
        .cloned()
        .collect();
    v.sort();
    assert!(!v.is_empty(), "resize.json lists no gt_*.png");
    v
}

#[test]
fn pillow_bicubic_matches_ground_truth_resizes() {
    let case = load_case("metrics", "resize");
    let src = png(&input_key(&case, |k| k.ends_with("_decoded.png")));
    for gt in gt_files(&case) {
        let want = png(&gt);
        let got = src
            .resize(want.width, want.height, Filter::Bicubic)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        let name = gt.trim_start_matches("resize/");
        let n_diff = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        println!("{name}: max_abs_err {d} ({n_diff} bytes differ)");
        assert!(d <= tol_max_abs(&case, name), "{name}: max diff {d}");
        assert_eq!(n_diff, 0, "{name}: a Pillow port must be exact");
    }
}

/// Our JPEG decode is libjpeg-turbo's (mozjpeg build), so the photo decodes to the fixture's
/// Pillow pixels exactly, and the ground truth made from it equals the reference's.
#[test]
fn jpeg_decode_matches_libjpeg_turbo() {
    let case = load_case("metrics", "resize");
    let ours = png(&input_key(&case, |k| k.ends_with(".jpg")));
    let turbo = png(&input_key(&case, |k| k.ends_with("_decoded.png")));
    let d = max_abs_diff(&ours, &turbo);
    let n_diff = ours
        .data
        .iter()
        .zip(&turbo.data)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "jpeg_decode: max_abs_err {d}, {n_diff} bytes differ (fixture tolerance {})",
        tol_max_abs(&case, "jpeg_decode")
    );
    assert_eq!(n_diff, 0, "JPEG decode must equal libjpeg-turbo's");
    for gt in gt_files(&case) {
        let want = png(&gt);
        let got = ours
            .resize(want.width, want.height, Filter::Bicubic)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        println!("{gt} from our JPEG decode: max_abs_err {d}");
        assert_eq!(d, 0, "{gt}: ground truth from our decode must be exact");
    }
}

fn decoded_planes(case: &Case) -> (Vec<f32>, usize, usize) {
    let img = png(&input_key(case, |k| k.starts_with("resize/decoded_")));
    let (h, w) = (img.height, img.width);
    let mut x = vec![0f32; 3 * h * w];
    for (i, px) in img.data.chunks(3).enumerate() {
        for c in 0..3 {
            x[c * h * w + i] = px[c] as f32 / 255.0;
        }
    }
    (x, h, w)
}

#[test]
fn torch_bicubic_antialias_matches() {
    let case = load_case("metrics", "resize");
    let (x, h, w) = decoded_planes(&case);
    let keys = case.keys_with_prefix("torch_y_");
    assert!(!keys.is_empty());
    for key in keys {
        // `torch_y_<tag>[.rows<a>to<b>]`; the full output size is that of torch_q_<tag>.png.
        let (tag, rows) = match key["torch_y_".len()..].split_once(".rows") {
            Some((t, r)) => {
                let (a, b) = r.split_once("to").unwrap();
                (
                    t.to_string(),
                    Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap())),
                )
            }
            None => (key["torch_y_".len()..].to_string(), None),
        };
        let q = png(&format!("resize/torch_q_{tag}.png"));
        let (oh, ow) = (q.height, q.width);
        let y = imageops::interpolate_aa(&x, 3, (h, w), (oh, ow), AaMode::Bicubic).unwrap();
        let y = candle_core::Tensor::from_vec(y, (3, oh, ow), &candle_core::Device::Cpu).unwrap();
        let y = match rows {
            Some((a, b)) => y.narrow(1, a, b - a + 1).unwrap(),
            None => y,
        };
        let tol = case.json["tolerance"][&key]["abs"].as_f64().unwrap();
        common::assert_close(&key, &y, case.get(&key), common::Tolerance::Abs(tol));
    }
}

fn q_tags(case: &Case) -> Vec<String> {
    let mut tags: Vec<String> = case.json["expected"]
        .as_object()
        .unwrap()
        .keys()
        .flat_map(|k| k.split(", "))
        .filter_map(|k| {
            k.strip_prefix("resize/torch_q_")
                .and_then(|s| s.strip_suffix(".png"))
                .filter(|s| !s.contains('_') && !s.contains('{'))
                .map(str::to_string)
        })
        .collect();
    tags.sort();
    tags.dedup();
    assert!(!tags.is_empty());
    tags
}

/// Compares HWC bytes with torch_q (exact off near-step pixels, +-1 on them); returns the
/// worst off-step difference and the number of off-step mismatches.
fn compare_q(tag: &str, got: &U8Image, rows: std::ops::Range<usize>) -> (u8, usize) {
    let want = png(&format!("resize/torch_q_{tag}.png"));
    let near = png(&format!("resize/torch_q_{tag}_near_step.png"));
    let row = want.width * 3;
    let (mut worst, mut bad) = (0u8, 0usize);
    for (i, y) in rows.enumerate() {
        let g = &got.data[i * row..(i + 1) * row];
        let e = &want.data[y * row..(y + 1) * row];
        let n = &near.data[y * row..(y + 1) * row];
        for ((g, e), n) in g.iter().zip(e).zip(n) {
            let d = g.abs_diff(*e);
            if *n == 0 {
                worst = worst.max(d);
                bad += usize::from(d > 0);
            } else {
                assert!(d <= 1, "torch_q_{tag}: diff {d} at a near-step pixel");
            }
        }
    }
    (worst, bad)
}

fn quantize_chw(y: &candle_core::Tensor) -> U8Image {
    let (c, h, w) = y.dims3().unwrap();
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut data = vec![0u8; h * w * c];
    for i in 0..h * w {
        for ch in 0..c {
            data[i * c + ch] = imageops::quantize_trunc(v[ch * h * w + i]);
        }
    }
    U8Image::new(w, h, c, data).unwrap()
}

#[test]
fn truncating_quantisation_of_torch_output_matches() {
    // The quantisation alone, on torch's own float output.
    let case = load_case("metrics", "resize");
    for tag in q_tags(&case) {
        for key in case.keys_with_prefix(&format!("torch_y_{tag}")) {
            let first = key
                .split_once(".rows")
                .map(|(_, r)| r.split_once("to").unwrap().0.parse::<usize>().unwrap())
                .unwrap_or(0);
            let q = quantize_chw(case.get(&key));
            let (worst, bad) = compare_q(&tag, &q, first..first + q.height);
            println!("{key} quantised: max_abs_err off near-step pixels {worst}");
            assert_eq!((worst, bad), (0, 0), "{key}: truncation must be exact");
        }
    }
}

/// Saturated white areas need torch's weights bit for bit: a sum of 1 - 1.2e-7 truncates 255 to
/// 254 (about 70 pixels did before the kernel used torch's fused multiply-adds).
#[test]
fn truncating_quantisation_end_to_end_matches() {
    let case = load_case("metrics", "resize");
    let (x, h, w) = decoded_planes(&case);
    for tag in q_tags(&case) {
        let want = png(&format!("resize/torch_q_{tag}.png"));
        let t =
            candle_core::Tensor::from_vec(x.clone(), (3, h, w), &candle_core::Device::Cpu).unwrap();
        let got =
            U8Image::from_rgb(&imageops::generated_to_rgb(&t, (want.height, want.width)).unwrap());
        let (worst, bad) = compare_q(&tag, &got, 0..want.height);
        println!("torch_q_{tag}: max_abs_err off near-step pixels {worst} ({bad} pixels)");
        assert_eq!(
            worst, 0,
            "torch_q_{tag}: must be exact off near-step pixels"
        );
    }
}

#[test]
fn pillow_bilinear_and_identity() {
    // Same size is a copy; bilinear of a constant image stays constant (weights sum to one).
    let img = U8Image::new(5, 4, 3, (0..60).map(|v| v as u8).collect()).unwrap();
    assert_eq!(img.resize(5, 4, Filter::Bicubic).unwrap(), img);
    let flat = U8Image::new(7, 9, 1, vec![77; 63]).unwrap();
    for f in [
        Filter::Bilinear,
        Filter::Bicubic,
        Filter::Lanczos,
        Filter::Box,
        Filter::Hamming,
    ] {
        let r = flat.resize(3, 13, f).unwrap();
        assert!(r.data.iter().all(|&v| v == 77), "{f:?}");
    }
    // Torch bilinear 2x downscale without antialias averages 2x2 blocks.
    let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let y = imageops::interpolate_bilinear(&x, 1, (4, 4), (2, 2)).unwrap();
    assert_eq!(y, vec![2.5, 4.5, 10.5, 12.5]);
}

#[test]
fn bad_inputs_are_errors() {
    assert!(U8Image::new(4, 4, 3, vec![0; 47]).is_err());
    let img = U8Image::new(4, 4, 3, vec![0; 48]).unwrap();
    assert!(img.resize(0, 4, Filter::Bicubic).is_err());
    assert!(imageops::interpolate_aa(&[0.0; 10], 1, (3, 3), (2, 2), AaMode::Bicubic).is_err());
    let t = candle_core::Tensor::zeros(
        (4, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = imageops::generated_to_rgb(&t, (4, 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("(3, H, W)"), "{e}");
    let missing = std::path::Path::new("/nonexistent/photo.jpg");
    let e = imageops::open_rgb(missing).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/photo.jpg"), "{e}");
}

#[test]
fn the_embedded_font_draws_text() {
    use image::{Rgb, RgbImage};
    use mcld::imageops::text::{draw_text, text_size};
    let (w, h) = text_size("step 1000", 16);
    assert!(w > 40 && h > 8, "{w}x{h}");
    assert!(text_size("step 10000", 16).0 > w);
    let mut img = RgbImage::from_pixel(200, 40, Rgb([255, 255, 255]));
    draw_text(&mut img, (4, 4), "loss 0.123", 20, Rgb([0, 0, 0])).unwrap();
    let inked = img.pixels().filter(|p| p[0] < 128).count();
    assert!(inked > 50, "{inked} dark pixels");
    // Nothing drawn outside the text's box.
    let (tw, th) = text_size("loss 0.123", 20);
    for (x, y, p) in img.enumerate_pixels() {
        if x > 4 + tw + 2 || y > 4 + th + 2 {
            assert_eq!(p, &Rgb([255, 255, 255]), "({x}, {y})");
        }
    }
}

#[test]
fn labelled_grid_lays_out_title_header_rows_and_fitted_cells() {
    use image::{Rgb, RgbImage};
    use mcld::imageops::grid::{
        labelled_grid, GridLayout, GridRow, MIN_CELL, ROW_BAND, TITLE_BAND,
    };
    // A tall panel (person-shaped) and a small square one: cells are MIN_CELL whatever the size.
    let tall = RgbImage::from_pixel(44, 64, Rgb([200, 30, 30]));
    let square = RgbImage::from_pixel(64, 64, Rgb([30, 30, 200]));
    let rows: Vec<GridRow> = (0..3)
        .map(|i| GridRow {
            label: format!("pair {i}: a.jpg -> b.jpg"),
            panels: vec![tall.clone(), square.clone()],
        })
        .collect();
    let img = labelled_grid(
        "validation at step 7 - seed 42",
        &["source", "generated"],
        &rows,
        64,
    )
    .unwrap();
    let layout = GridLayout {
        columns: 2,
        rows: 3,
        cell: MIN_CELL,
    };
    assert_eq!(img.dimensions(), layout.size());
    let dark_in = |x0: u32, y0: u32, w: u32, h: u32| {
        (y0..y0 + h).any(|y| {
            (x0..x0 + w).any(|x| img.get_pixel(x, y)[1] < 120 && img.get_pixel(x, y)[0] < 120)
        })
    };
    // Title, header and each row's label are inked.
    assert!(dark_in(0, 0, img.width(), TITLE_BAND));
    assert!(dark_in(
        0,
        TITLE_BAND,
        img.width(),
        layout.row_label_top(0) - TITLE_BAND
    ));
    for r in 0..3 {
        assert!(
            dark_in(0, layout.row_label_top(r), img.width(), ROW_BAND),
            "row {r}"
        );
    }
    // The tall panel keeps its aspect: filled in the middle, background at the sides.
    let (x, y) = layout.cell_origin(2, 0);
    let c = MIN_CELL / 2;
    assert_eq!(img.get_pixel(x + c, y + c), &Rgb([200, 30, 30]));
    assert_ne!(img.get_pixel(x + 5, y + c), &Rgb([200, 30, 30]));
    let (x, y) = layout.cell_origin(1, 1);
    assert_eq!(img.get_pixel(x + 5, y + 5), &Rgb([30, 30, 200]));
    // A row with the wrong number of panels is an error, not a panic.
    let bad = [GridRow {
        label: "x".into(),
        panels: vec![tall],
    }];
    let e = labelled_grid("t", &["a", "b"], &bad, 64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 panels for 2 columns"), "{e}");
}
