//! AutoencoderKL parity on `model/vae` (tiny SD-layout VAE).

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use common::{check_output, load_case, Case};
use mcld::models::vae::{AutoencoderKL, Config};

fn weights(case: &Case) -> HashMap<String, Tensor> {
    let prefix = case.json["weight_prefix"].as_str().unwrap_or("");
    case.weights_with_prefix(prefix)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .collect()
}

fn model(case: &Case, w: HashMap<String, Tensor>) -> mcld::Result<AutoencoderKL> {
    let cfg = Config::from_json_str(&case.json["config"].to_string()).unwrap();
    AutoencoderKL::new(
        VarBuilder::from_tensors(w, DType::F32, &common::device()),
        &cfg,
    )
}

#[test]
fn vae_matches_diffusers() {
    let case = load_case("model", "vae");
    let vae = model(&case, weights(&case)).unwrap();
    let (mean, logvar) = vae.encode(&case.f32("input.image")).unwrap();
    check_output(&case, "output.latent_mean", &mean);
    check_output(&case, "output.latent_logvar", &logvar);
    let decoded = vae.decode(&mean).unwrap();
    check_output(&case, "output.decoded", &decoded);
}

#[test]
fn sample_uses_given_noise() {
    let dev = common::device();
    let mean = Tensor::new(&[1f32, 2.0], &dev).unwrap();
    let logvar = Tensor::new(&[0f32, 2.0f32.ln() * 2.0], &dev).unwrap();
    let noise = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
    let s = AutoencoderKL::sample(&mean, &logvar, &noise)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        (s[0] - 1.5).abs() < 1e-6 && (s[1] - 0.0).abs() < 1e-6,
        "{s:?}"
    );
}

#[test]
fn wrong_channel_count_is_an_error() {
    let case = load_case("model", "vae");
    let vae = model(&case, weights(&case)).unwrap();
    let x = Tensor::zeros((1, 4, 16, 16), DType::F32, &common::device()).unwrap();
    let e = vae.encode(&x).unwrap_err().to_string();
    assert!(e.contains("4 channels"), "{e}");
    let z = Tensor::zeros((1, 3, 4, 4), DType::F32, &common::device()).unwrap();
    let e = vae.decode(&z).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
}

#[test]
fn missing_weight_is_named() {
    let case = load_case("model", "vae");
    let mut w = weights(&case);
    w.remove("decoder.mid_block.attentions.0.to_k.weight")
        .unwrap();
    let e = model(&case, w).unwrap_err().to_string();
    assert!(
        e.contains("decoder.mid_block.attentions.0.to_k.weight"),
        "{e}"
    );
}

#[test]
fn old_attention_names_load() {
    // Pre-0.14 diffusers checkpoints name the mid-block attention query/key/value/proj_attn.
    let case = load_case("model", "vae");
    let renamed: HashMap<String, Tensor> = weights(&case)
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q", "attentions.0.query")
                .replace("attentions.0.to_k", "attentions.0.key")
                .replace("attentions.0.to_v", "attentions.0.value")
                .replace("attentions.0.to_out.0", "attentions.0.proj_attn");
            (k, v)
        })
        .collect();
    let vae = model(&case, renamed).unwrap();
    let (mean, _) = vae.encode(&case.f32("input.image")).unwrap();
    check_output(&case, "output.latent_mean", &mean);
}

#[test]
fn bad_config_is_an_error() {
    let e = Config::from_json_str(r#"{"block_out_channels": [8], "act_fn": "gelu"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gelu"), "{e}");
    let e = AutoencoderKL::load(
        &[std::path::Path::new("/nonexistent/vae.safetensors")],
        &Config::from_json_str(r#"{"block_out_channels": [32]}"#).unwrap(),
        DType::F32,
        &common::device(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/vae.safetensors"), "{e}");
}
