//! Face projector (Perceiver resampler) against the `resampler` fixture and the projector inside
//! `reference_write_read`.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use mcld::models::resampler::{Config, Resampler};

/// A composite case keeps each module's config under `modules`, a single-module case at the top.
fn config(case: &common::Case, module: &str) -> Config {
    let m = &case.json["modules"][module]["config"];
    let v = if m.is_null() { &case.json["config"] } else { m };
    serde_json::from_value(v.clone()).expect("resampler config")
}

fn run_case(case_name: &str, prefix: &str, module: &str) {
    let case = common::load_case("model", case_name);
    let cfg = config(&case, module);
    let vb = VarBuilder::from_tensors(case.weights_with_prefix(prefix), DType::F32, &Device::Cpu);
    let r = Resampler::new(vb, &cfg).unwrap();
    let out = r.forward(&case.f32("input.face_emb")).unwrap();
    common::check_output(&case, "output.face_tokens", &out);
}

#[test]
fn resampler_fixture() {
    run_case("resampler", "", "image_proj");
}

#[test]
fn resampler_inside_reference_write_read() {
    run_case("reference_write_read", "image_proj.", "image_proj");
}

#[test]
fn bad_input_is_named() {
    let case = common::load_case("model", "resampler");
    let cfg = config(&case, "image_proj");
    let vb = VarBuilder::from_tensors(case.weights_with_prefix(""), DType::F32, &Device::Cpu);
    let r = Resampler::new(vb, &cfg).unwrap();
    let bad = candle_core::Tensor::zeros((1, 1, 128), DType::F32, &Device::Cpu).unwrap();
    let e = r.forward(&bad).unwrap_err().to_string();
    assert!(e.contains("512"), "{e}");
    let mut w = case.weights_with_prefix("");
    w.remove("layers.1.0.to_kv.weight");
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let e = Resampler::new(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains("layers.1.0.to_kv.weight"), "{e}");
}
