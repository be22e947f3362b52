//! Texture maps against MCLD's texture code (fixtures/metrics/texture.json): every intermediate,
//! exact where the fixture says exact, Telea-dependent outputs within its inpainted-pixel bound.

use crate::common;

use image::{GrayImage, RgbImage};
use mcld::person::texture::{
    atlas_to_normal, texture_atlas, texture_map, AtlasStages, TextureAssets, PARTS, TILE,
};

fn case_json() -> serde_json::Value {
    let p = common::fixture_path("metrics/texture.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Path (under `metrics/`) of a file the case JSON lists in `block` under a key ending in `stem`.
fn listed(block: &str, stem: &str) -> String {
    let json = case_json();
    let keys: Vec<&String> = json[block]
        .as_object()
        .unwrap_or_else(|| panic!("texture.json has no {block} block"))
        .keys()
        .filter(|k| k.ends_with(stem))
        .collect();
    assert_eq!(
        keys.len(),
        1,
        "texture.json {block}: keys ending in {stem}: {keys:?}"
    );
    keys[0].clone()
}

fn rgb(stem: &str) -> RgbImage {
    image::open(common::fixture_path(&format!(
        "metrics/{}",
        listed("expected", stem)
    )))
    .unwrap()
    .to_rgb8()
}

fn gray(stem: &str) -> GrayImage {
    image::open(common::fixture_path(&format!(
        "metrics/{}",
        listed("expected", stem)
    )))
    .unwrap()
    .to_luma8()
}

fn inputs() -> (RgbImage, RgbImage) {
    let load = |stem: &str| {
        image::open(common::fixture_path(&format!(
            "metrics/{}",
            listed("inputs", stem)
        )))
        .unwrap()
        .to_rgb8()
    };
    (load("photo.png"), load("iuv.png"))
}

/// Count of differing values (all channels), printed and asserted zero.
fn assert_exact(name: &str, got: &[u8], expected: &[u8]) {
    assert_eq!(got.len(), expected.len(), "{name}: size");
    let bad = got.iter().zip(expected).filter(|(a, b)| a != b).count();
    let worst = got
        .iter()
        .zip(expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    println!("{name}: {bad} differing values, max |diff| {worst} (exact required)");
    assert_eq!(bad, 0, "{name}: {bad} values differ (max |diff| {worst})");
}

/// Exact outside `inpainted`, mean |diff| over inpainted pixels and channels within `tol`.
fn assert_inpainted(name: &str, got: &RgbImage, expected: &RgbImage, inpainted: &[bool], tol: f64) {
    assert_eq!(got.dimensions(), expected.dimensions(), "{name}: size");
    let (mut outside_bad, mut sum, mut n, mut worst) = (0usize, 0f64, 0usize, 0u8);
    for ((g, e), &m) in got.pixels().zip(expected.pixels()).zip(inpainted) {
        for c in 0..3 {
            let d = g.0[c].abs_diff(e.0[c]);
            if m {
                sum += d as f64;
                n += 1;
                worst = worst.max(d);
            } else if d != 0 {
                outside_bad += 1;
            }
        }
    }
    let mean = sum / n.max(1) as f64;
    println!(
        "{name}: {} inpainted px, mean |diff| inside {mean:.4} (bound {tol}), max |diff| inside \
         {worst}, differing values elsewhere {outside_bad}",
        n / 3
    );
    assert_eq!(
        outside_bad, 0,
        "{name}: values outside the inpainted area differ"
    );
    assert!(mean <= tol, "{name}: mean |diff| {mean} > {tol}");
}

fn atlas_stages() -> AtlasStages {
    let (photo, iuv) = inputs();
    texture_atlas(&photo, &iuv, &TextureAssets::builtin().unwrap()).unwrap()
}

#[test]
fn texture_intermediates_match() {
    let case = common::load_case("metrics", "texture");
    let assets = TextureAssets::builtin().unwrap();
    let st = atlas_stages();

    let present = case.get("part_present").to_vec1::<u8>().unwrap();
    let minmax = case.get("part_minmax").to_vec2::<f64>().unwrap();
    assert_eq!(present.len(), PARTS);
    let mut worst_mm = 0f64;
    for p in 0..PARTS {
        let got = st.tiles[p].as_ref();
        assert_eq!(got.is_some(), present[p] != 0, "part {} presence", p + 1);
        match got {
            Some(t) => {
                let d = (t.minmax.0 - minmax[p][0])
                    .abs()
                    .max((t.minmax.1 - minmax[p][1]).abs());
                worst_mm = worst_mm.max(d);
            }
            None => assert!(minmax[p][0].is_nan() && minmax[p][1].is_nan()),
        }
    }
    println!("part_minmax: max |diff| {worst_mm:e} (exact required)");
    assert_eq!(worst_mm, 0.0);

    assert_exact(
        "atlas_scatter",
        st.atlas_rgb(|t| &t.scatter).as_raw(),
        rgb("/atlas_scatter.png").as_raw(),
    );
    assert_exact(
        "atlas_valid",
        st.atlas_gray(|t| &t.valid).as_raw(),
        gray("/atlas_valid.png").as_raw(),
    );
    let dilated = st.atlas_gray(|t| &t.dilated);
    assert_exact(
        "atlas_dilated",
        dilated.as_raw(),
        gray("/atlas_dilated.png").as_raw(),
    );
    let mask = st.atlas_gray(|t| &t.inpaint_mask);
    assert_exact(
        "atlas_inpaint_mask",
        mask.as_raw(),
        gray("/atlas_inpaint_mask.png").as_raw(),
    );

    // TextureInd = dilated * template, on the atlas (absent parts: dilated is 0).
    let mut ind = GrayImage::new(dilated.width(), dilated.height());
    for p in 1..=PARTS {
        let (r0, c0) = mcld::person::texture::tile_origin(p);
        let tpl = assets.template(p);
        for y in 0..TILE {
            for x in 0..TILE {
                let (ax, ay) = ((c0 + x) as u32, (r0 + y) as u32);
                let d = dilated.get_pixel(ax, ay).0[0];
                ind.put_pixel(ax, ay, image::Luma([d * tpl[y * TILE + x]]));
            }
        }
    }
    assert_exact("atlas_ind", ind.as_raw(), gray("/atlas_ind.png").as_raw());

    let inpainted: Vec<bool> = mask.as_raw().iter().map(|&m| m != 0).collect();
    let n_inpainted = inpainted.iter().filter(|&&m| m).count();
    let expected_n = case.json["inpainted_pixels"].as_u64().unwrap() as usize;
    println!("inpainted pixels: {n_inpainted} (fixture {expected_n})");
    assert_eq!(n_inpainted, expected_n);

    let tol_block = &case.json["tolerance"]["atlas_normalized_inpainted, atlas_final, texture"];
    let tol = tol_block["inpainted_pixels_mean_abs_diff"]
        .as_f64()
        .expect("inpainted_pixels_mean_abs_diff");
    assert_eq!(tol_block["unmasked_pixels"].as_str(), Some("exact"));
    assert_inpainted(
        "atlas_normalized_inpainted",
        &st.atlas_rgb(|t| &t.normalized_inpainted),
        &rgb("/atlas_normalized_inpainted.png"),
        &inpainted,
        tol,
    );
    let final_atlas = st.atlas_rgb(|t| &t.final_tile);
    assert_inpainted(
        "atlas_final",
        &final_atlas,
        &rgb("/atlas_final.png"),
        &inpainted,
        tol,
    );

    // Texture pixels whose source texel was inpainted.
    let texture = st.to_normal(&assets);
    let from_atlas = atlas_to_normal(&final_atlas, &assets).unwrap();
    assert_exact(
        "texture (tiles vs atlas)",
        texture.as_raw(),
        from_atlas.as_raw(),
    );
    let probe = index_probe();
    let lut_of = atlas_to_normal(&probe, &assets).unwrap();
    let tex_inpainted: Vec<bool> = lut_of
        .pixels()
        .map(|px| {
            let k = u32::from_le_bytes([px.0[0], px.0[1], px.0[2], 0]);
            k != 0 && inpainted[(k - 1) as usize]
        })
        .collect();
    assert_inpainted(
        "texture",
        &texture,
        &rgb("/texture.png"),
        &tex_inpainted,
        tol,
    );
}

/// An atlas whose pixel k (row-major) holds k + 1 in its three bytes, to see where texels land.
fn index_probe() -> RgbImage {
    let (w, h) = (4 * TILE as u32, 6 * TILE as u32);
    RgbImage::from_fn(w, h, |x, y| {
        let k = y * w + x + 1;
        let b = k.to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    })
}

#[test]
fn lookup_table_reproduces_expected_texture_exactly() {
    let assets = TextureAssets::builtin().unwrap();
    let got = atlas_to_normal(&rgb("/atlas_final.png"), &assets).unwrap();
    assert_exact(
        "Atlas2Normal(expected atlas_final)",
        got.as_raw(),
        rgb("/texture.png").as_raw(),
    );
}

#[test]
fn texture_map_is_the_normal_of_the_atlas() {
    let (photo, iuv) = inputs();
    let assets = TextureAssets::builtin().unwrap();
    let tex = texture_map(&photo, &iuv, &assets).unwrap();
    assert_eq!(tex.dimensions(), (512, 512));
    let st = texture_atlas(&photo, &iuv, &assets).unwrap();
    assert_exact("texture_map", tex.as_raw(), st.to_normal(&assets).as_raw());
}

#[test]
fn builtin_assets_are_the_shared_data_files() {
    let builtin = TextureAssets::builtin().unwrap();
    let files = TextureAssets::from_files(
        &common::fixture_path("../data/deepfashion/texture_bg_200.png"),
        &common::fixture_path("../data/uv_atlas2normal_200_512.safetensors"),
    )
    .unwrap();
    for p in 1..=PARTS {
        assert_eq!(builtin.template(p), files.template(p), "template {p}");
        assert!(
            builtin.template(p).iter().all(|&v| v == 0 || v == 255),
            "template {p} is not 0/255"
        );
    }
    let probe = index_probe();
    assert_eq!(
        atlas_to_normal(&probe, &builtin).unwrap(),
        atlas_to_normal(&probe, &files).unwrap()
    );
}

#[test]
fn no_person_is_an_error() {
    let (photo, iuv) = inputs();
    let mut empty = iuv.clone();
    for px in empty.pixels_mut() {
        px.0[2] = 0;
    }
    let err = texture_map(&photo, &empty, &TextureAssets::builtin().unwrap()).unwrap_err();
    assert!(err.to_string().contains("no person"), "{err}");
}

#[test]
fn size_mismatch_names_both_sizes() {
    let (photo, _) = inputs();
    let iuv = RgbImage::new(photo.width() + 1, photo.height());
    let err = texture_map(&photo, &iuv, &TextureAssets::builtin().unwrap()).unwrap_err();
    let msg = err.to_string();
    let a = format!("{}x{}", photo.width(), photo.height());
    let b = format!("{}x{}", photo.width() + 1, photo.height());
    assert!(msg.contains(&a) && msg.contains(&b), "{msg}");
}

#[test]
fn bad_lookup_table_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let lut = dir.path().join("lut.safetensors");
    std::fs::write(&lut, b"not safetensors").unwrap();
    let err = TextureAssets::from_files(
        &common::fixture_path("../data/deepfashion/texture_bg_200.png"),
        &lut,
    )
    .unwrap_err();
    assert!(err.to_string().contains("lut.safetensors"), "{err}");
}
