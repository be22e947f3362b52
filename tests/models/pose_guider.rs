//! Pose guider parity on the `pose_guider` fixture, and its input/weight errors.

use crate::common;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{check_output, load_case, Case};
use mcld::models::pose_guider::{Config, PoseGuider};

fn config(case: &Case) -> Config {
    serde_json::from_value(case.json["config"].clone()).expect("pose guider config")
}

fn build(case: &Case) -> PoseGuider {
    let prefix = case.json["weight_prefix"].as_str().unwrap_or("");
    let vb = VarBuilder::from_tensors(
        case.weights_with_prefix(prefix),
        DType::F32,
        &common::device(),
    );
    PoseGuider::new(vb, &config(case)).unwrap()
}

#[test]
fn pose_guider_matches_fixture() {
    let case = load_case("model", "pose_guider");
    let pg = build(&case);
    let out = pg
        .forward_u8(case.get("input.pose_image_u8"), DType::F32)
        .unwrap();
    check_output(&case, "output.pose_fea", &out);
}

#[test]
fn wrong_channel_count_is_an_error() {
    let case = load_case("model", "pose_guider");
    let pg = build(&case);
    let x = Tensor::zeros((1, 4, 16, 16), DType::F32, &common::device()).unwrap();
    let e = pg.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("pose guider") && e.contains("[1, 4, 16, 16]"),
        "{e}"
    );
    let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &common::device()).unwrap();
    let e = pg.forward_u8(&x, DType::F32).unwrap_err().to_string();
    assert!(e.contains("uint8"), "{e}");
}

#[test]
fn missing_weight_is_named() {
    let case = load_case("model", "pose_guider");
    let mut w = case.weights_with_prefix("");
    w.remove("blocks.3.weight")
        .expect("fixture has blocks.3.weight");
    let vb = VarBuilder::from_tensors(w, DType::F32, &common::device());
    let e = PoseGuider::new(vb, &config(&case)).unwrap_err().to_string();
    assert!(e.contains("blocks.3.weight"), "{e}");
}

#[test]
fn wrong_weight_shape_is_named() {
    let case = load_case("model", "pose_guider");
    let mut cfg = config(&case);
    // conv_in's output width: its weight in the file then has the wrong shape. (Changing the
    // input channels would look for MCLD's `conv_in1` instead, a missing tensor.)
    cfg.block_out_channels[0] += 1;
    let vb = VarBuilder::from_tensors(case.weights_with_prefix(""), DType::F32, &common::device());
    let e = PoseGuider::new(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains("conv_in.weight"), "{e}");
}
