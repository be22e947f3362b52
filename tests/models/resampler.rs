//! Face projector parity on the `resampler` fixture, and its input/weight errors.

use crate::common;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{check_output, load_case, Case};
use mcld::models::resampler::{Config, Resampler};

fn config(case: &Case) -> Config {
    serde_json::from_value(case.json["config"].clone()).expect("resampler config")
}

fn build(case: &Case) -> Resampler {
    let prefix = case.json["weight_prefix"].as_str().unwrap_or("");
    let vb = VarBuilder::from_tensors(
        case.weights_with_prefix(prefix),
        DType::F32,
        &common::device(),
    );
    Resampler::new(vb, &config(case)).unwrap()
}

#[test]
fn resampler_matches_fixture() {
    let case = load_case("model", "resampler");
    let r = build(&case);
    let out = r.forward(case.get("input.face_emb")).unwrap();
    check_output(&case, "output.face_tokens", &out);
}

#[test]
fn flat_embedding_is_one_token() {
    let case = load_case("model", "resampler");
    let r = build(&case);
    let x = case.get("input.face_emb");
    let flat = x.squeeze(1).unwrap();
    let a = r.forward(x).unwrap();
    let b = r.forward(&flat).unwrap();
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn wrong_embedding_width_is_an_error() {
    let case = load_case("model", "resampler");
    let r = build(&case);
    let e_dim = config(&case).embedding_dim;
    let x = Tensor::zeros((1, 1, e_dim + 1), DType::F32, &common::device()).unwrap();
    let e = r.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("resampler") && e.contains(&format!("{}", e_dim + 1)),
        "{e}"
    );
}

#[test]
fn missing_weight_is_named() {
    let case = load_case("model", "resampler");
    let mut w = case.weights_with_prefix("");
    w.remove("layers.1.0.to_kv.weight")
        .expect("fixture has the key");
    let vb = VarBuilder::from_tensors(w, DType::F32, &common::device());
    let e = Resampler::new(vb, &config(&case)).unwrap_err().to_string();
    assert!(e.contains("layers.1.0.to_kv.weight"), "{e}");
}

#[test]
fn mcld_config_shapes() {
    // The real projector's shapes, on zero weights: (B,1,512) -> (B,16,768).
    let cfg = mcld::presets::projector(mcld::presets::Size::Full, 768);
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let r = Resampler::new(vb, &cfg).unwrap();
    let x = Tensor::zeros((2, 1, 512), DType::F32, &common::device()).unwrap();
    assert_eq!(r.forward(&x).unwrap().dims(), &[2, 16, 768]);
}
