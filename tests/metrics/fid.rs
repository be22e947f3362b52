//! Frechet distance against `metrics/fid`: features from the fixture's SplitMix64 recipe.

use crate::common;

use candle_core::DType;
use mcld::metrics::fid::{frechet_distance, FeatureStats};

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u32 {
        (self.next() >> 56) as u32
    }
}

/// Integer codes k[i][j] of one feature set, row-major.
fn codes(seed: u64, n: usize, dim: usize, own_shift: u32) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    let off: Vec<u32> = (0..dim).map(|_| rng.byte() >> 3).collect();
    let mut k = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let g: Vec<u32> = (0..16).map(|_| rng.byte()).collect();
        for (j, o) in off.iter().enumerate() {
            let a = rng.byte();
            k.push(o + (a >> own_shift) + g[j % 16]);
        }
    }
    k
}

fn u32s(case: &common::Case, key: &str) -> Vec<u32> {
    case.get(key)
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

fn run_subcase(case: &common::Case, sub: &serde_json::Value) {
    let name = sub["name"].as_str().unwrap();
    let dim = sub["dim"].as_u64().unwrap() as usize;
    let mut stats = Vec::new();
    for side in ["real", "pred"] {
        let n = sub[format!("n_{side}")].as_u64().unwrap() as usize;
        let seed = sub[format!("seed_{side}")].as_u64().unwrap();
        let shift = sub[format!("own_shift_{side}")].as_u64().unwrap() as u32;
        let k = codes(seed, n, dim, shift);
        let sum: u64 = k.iter().map(|&v| v as u64).sum();
        assert_eq!(
            sum,
            sub[format!("k_sum_{side}")].as_u64().unwrap(),
            "{name} {side} k_sum"
        );
        let first = u32s(case, &format!("{name}.k_{side}.first_rows"));
        assert_eq!(&k[..2 * dim], &first[..], "{name} {side}: first rows");
        let full_key = format!("{name}.k_{side}");
        if case.tensors.contains_key(&full_key) {
            assert_eq!(k, u32s(case, &full_key), "{name} {side}: codes");
        }
        let feats: Vec<f32> = k.iter().map(|&v| v as f32 / 256.0).collect();
        let st = FeatureStats::from_features(&feats, n, dim).unwrap();
        let mu_exp = case
            .get(&format!("{name}.mu_{side}"))
            .to_vec1::<f32>()
            .unwrap();
        let mism = st.mu.iter().zip(&mu_exp).filter(|(a, b)| a != b).count();
        println!("{name}.mu_{side}: {mism} of {dim} entries differ (exact required)");
        assert_eq!(mism, 0, "{name}.mu_{side} must match exactly");
        stats.push(st);
    }
    let r = frechet_distance(&stats[0], &stats[1]).unwrap();
    let key = sub["expected_key"].as_str().unwrap();
    let exp = case.get(key).to_vec1::<f64>().unwrap()[0];
    let tol = sub["tolerance_rel"].as_f64().unwrap();
    let rel = (r.fid - exp).abs() / exp.abs();
    println!(
        "{name}: fid {} vs {key} {exp} (rel err {rel:.3e}, bound {tol:e}); mean_term {} (ref {}), \
         tr covmean {} (ref {}), offset {}",
        r.fid, r.mean_term, sub["mean_term"], r.trace_covmean, sub["trace_covmean"], r.offset_used
    );
    let tr_real = sub["trace_sigma_real"].as_f64().unwrap();
    let tr_pred = sub["trace_sigma_pred"].as_f64().unwrap();
    assert!(
        (r.trace_sigma_real - tr_real).abs() <= 1e-9 * tr_real,
        "{name}: tr sigma real"
    );
    assert!(
        (r.trace_sigma_pred - tr_pred).abs() <= 1e-9 * tr_pred,
        "{name}: tr sigma pred"
    );
    assert!(rel <= tol, "{name}: fid rel err {rel:.3e} exceeds {tol:e}");
    assert_eq!(
        r.offset_used,
        sub["fallback_offset_used"].as_bool().unwrap(),
        "{name}: offset rule"
    );
}

#[test]
fn fid_matches_reference_subcases() {
    let case = common::load_case("metrics", "fid");
    let subs = case.json["subcases"].as_array().expect("subcases");
    assert!(!subs.is_empty());
    for sub in subs {
        run_subcase(&case, sub);
    }
}

#[test]
fn fid_rejects_bad_input() {
    assert!(FeatureStats::from_features(&[0.0; 10], 3, 4).is_err());
    assert!(FeatureStats::from_features(&[0.0; 4], 1, 4).is_err());
    let mut v = vec![0.5f32; 12];
    v[5] = f32::NAN;
    let err = FeatureStats::from_features(&v, 3, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1"), "{err}");
    let a = FeatureStats::from_features(&[0.0, 1.0, 2.0, 3.0, 1.0, 1.0], 3, 2).unwrap();
    let b =
        FeatureStats::from_features(&[0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 5.0, 3.0, 3.0], 3, 3).unwrap();
    assert!(frechet_distance(&a, &b).is_err());
    // Same set: distance zero.
    let d = frechet_distance(&a, &a).unwrap();
    assert!(d.fid.abs() < 1e-12, "{}", d.fid);
}
