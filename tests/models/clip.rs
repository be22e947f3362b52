//! CLIP preprocessing and vision model parity on `model/clip_vision`.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, check_output, load_case, Case, Tolerance};
use mcld::imageops::U8Image;
use mcld::models::clip::{self, ClipVisionModelWithProjection, Config, Preprocess};

fn weights(case: &Case) -> HashMap<String, Tensor> {
    let prefix = case.json["weight_prefix"].as_str().unwrap_or("");
    case.weights_with_prefix(prefix)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .collect()
}

fn model(case: &Case, w: HashMap<String, Tensor>) -> mcld::Result<ClipVisionModelWithProjection> {
    let cfg = Config::from_json_str(&case.json["config"].to_string()).unwrap();
    ClipVisionModelWithProjection::new(
        VarBuilder::from_tensors(w, DType::F32, &common::device()),
        &cfg,
    )
}

fn preprocess_cfg(case: &Case) -> Preprocess {
    let p = &case.json["params"];
    let arr = |k: &str| -> [f32; 3] {
        let v: Vec<f32> = p[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        [v[0], v[1], v[2]]
    };
    Preprocess {
        shortest_edge: p["shortest_edge"].as_u64().unwrap() as usize,
        crop_size: p["crop_size"].as_u64().unwrap() as usize,
        mean: arr("image_mean"),
        std: arr("image_std"),
    }
}

/// Input tags (`512x352`, ...) in the order `params.model_input` stacks them.
fn tags(case: &Case) -> Vec<String> {
    let order = case.json["params"]["model_input"].as_str().unwrap();
    let mut t: Vec<(usize, String)> = case
        .keys_with_prefix("input.image_")
        .iter()
        .map(|k| {
            let tag = k["input.image_".len()..].to_string();
            let pos = order
                .find(&format!("pixel_values_{tag}"))
                .unwrap_or_else(|| panic!("{tag} not in model_input"));
            (pos, tag)
        })
        .collect();
    t.sort();
    t.into_iter().map(|(_, s)| s).collect()
}

fn mean_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let case = load_case("model", "clip_vision");
    let pre = preprocess_cfg(&case);
    for tag in tags(&case) {
        let img = U8Image::from_tensor_hwc(case.get(&format!("input.image_{tag}"))).unwrap();
        let resized = pre.resize(&img).unwrap();
        let want = case.get(&format!("output.resized_u8_{tag}"));
        let got = resized.to_tensor_hwc(&common::device()).unwrap();
        // Exact for a Pillow-exact resize.
        assert_close(
            &format!("output.resized_u8_{tag}"),
            &got,
            want,
            Tolerance::Abs(0.0),
        );
        let key = format!("output.pixel_values_{tag}");
        let px = pre.apply(&img, &common::device()).unwrap();
        let tol = &case.json["tolerance"]["output.pixel_values_"];
        assert_close(
            &key,
            &px,
            case.get(&key),
            Tolerance::Abs(tol["max_abs_err"].as_f64().unwrap()),
        );
        let m = mean_abs(&px, case.get(&key));
        println!("{key}: mean_abs_err {m:.3e}");
        assert!(m <= tol["mean_abs_err"].as_f64().unwrap());
        // The default settings are MCLD's; with the fixture's own they agree.
        if pre == Preprocess::default() {
            let d = clip::preprocess(&img).unwrap();
            assert_close(&key, &d, &px, Tolerance::Abs(0.0));
        }
    }
}

#[test]
fn vision_model_matches_transformers() {
    let case = load_case("model", "clip_vision");
    let m = model(&case, weights(&case)).unwrap();
    let px: Vec<Tensor> = tags(&case)
        .iter()
        .map(|t| case.f32(&format!("output.pixel_values_{t}")))
        .collect();
    let out = m.forward(&Tensor::stack(&px, 0).unwrap()).unwrap();
    check_output(&case, "output.last_hidden_state", &out.last_hidden_state);
    check_output(&case, "output.image_embeds", &out.image_embeds);
}

#[test]
fn bad_inputs_are_errors() {
    let case = load_case("model", "clip_vision");
    let m = model(&case, weights(&case)).unwrap();
    let size = m.config.image_size;
    let x = Tensor::zeros((1, 4, size, size), DType::F32, &common::device()).unwrap();
    let e = m.forward(&x).unwrap_err().to_string();
    assert!(e.contains("pixel values"), "{e}");
    let gray = U8Image::new(300, 400, 1, vec![0; 120_000]).unwrap();
    let e = clip::preprocess(&gray).unwrap_err().to_string();
    assert!(e.contains("1 channels"), "{e}");
}

#[test]
fn missing_weight_is_named() {
    let case = load_case("model", "clip_vision");
    let mut w = weights(&case);
    w.remove("vision_model.embeddings.class_embedding").unwrap();
    let e = model(&case, w).unwrap_err().to_string();
    assert!(e.contains("vision_model.embeddings.class_embedding"), "{e}");
}

#[test]
fn full_clip_config_is_accepted() {
    let cfg = Config::from_json_str(
        r#"{"projection_dim": 768, "text_config": {}, "vision_config": {"hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}}"#,
    )
    .unwrap();
    assert_eq!(cfg.projection_dim, 768);
    assert_eq!(cfg.hidden_size, Config::vit_large_patch14().hidden_size);
}
