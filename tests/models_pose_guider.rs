//! Pose guider against the `pose_guider` fixture (and the one inside `reference_write_read`).

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use mcld::models::pose_guider::{Config, PoseGuider};

/// A composite case keeps each module's config under `modules`, a single-module case at the top.
fn config(case: &common::Case, module: &str) -> Config {
    let m = &case.json["modules"][module]["config"];
    let v = if m.is_null() { &case.json["config"] } else { m };
    serde_json::from_value(v.clone()).expect("pose guider config")
}

fn run_case(case_name: &str, prefix: &str, module: &str) {
    let case = common::load_case("model", case_name);
    let cfg = config(&case, module);
    let vb = VarBuilder::from_tensors(case.weights_with_prefix(prefix), DType::F32, &Device::Cpu);
    let pg = PoseGuider::new(vb, &cfg).unwrap();
    let pose = (case.f32("input.pose_image_u8") / 255.0).unwrap();
    let out = pg.forward(&pose).unwrap();
    common::check_output(&case, "output.pose_fea", &out);
}

#[test]
fn pose_guider_fixture() {
    run_case("pose_guider", "", "pose_guider");
}

#[test]
fn pose_guider_inside_reference_write_read() {
    run_case("reference_write_read", "pose_guider.", "pose_guider");
}

#[test]
fn wrong_channels_and_missing_weight_are_named() {
    let case = common::load_case("model", "pose_guider");
    let cfg = config(&case, "pose_guider");
    let vb = VarBuilder::from_tensors(case.weights_with_prefix(""), DType::F32, &Device::Cpu);
    let pg = PoseGuider::new(vb, &cfg).unwrap();
    let bad = candle_core::Tensor::zeros((1, 4, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let e = pg.forward(&bad).unwrap_err().to_string();
    assert!(e.contains("3 input channels"), "{e}");

    let mut w = case.weights_with_prefix("");
    w.remove("blocks.3.weight");
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let e = PoseGuider::new(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains("blocks.3.weight"), "{e}");
}
