//! Tiny random-weight checkpoints in the exact on-disk layout of the real ones, so that the
//! whole pipeline (loading included) can run without any download: used by `mcld demo` and by
//! the command-line tests. The images they produce are noise: the weights are untrained.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::json;

use crate::models::mcld::{Mcld, McldConfig};
use crate::models::{clip, resampler, unet, vae};
use crate::weights::prefixed_var_builder;
use crate::weights::random::RandomWeights;
use crate::{Error, Result};

/// Written beside the tiny checkpoints, so that `mcld serve` can label what it shows as the
/// output of untrained weights.
pub const UNTRAINED_MARKER: &str = "UNTRAINED_DEMO_WEIGHTS.txt";
const UNTRAINED_NOTE: &str = "These checkpoints are tiny seeded random weights written by `mcld \
demo`: they exercise the whole pipeline, and what they generate is noise.\n";

/// What [`write_tiny_layout`] produced.
#[derive(Debug, Clone)]
pub struct TinyLayout {
    pub ckpt_dir: PathBuf,
    /// A training config pointing at the tiny base models (and at `dataset_root`).
    pub config_path: PathBuf,
}

pub(crate) fn unet_json() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
        "flip_sin_to_cos": true,
        "freq_shift": 0
    })
}

pub(crate) fn vae_json() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4
    })
}

pub(crate) fn clip_json() -> serde_json::Value {
    json!({
        "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3,
        "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    })
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
    crate::fsutil::write_atomic(path, s.as_bytes())
}

/// Saves what a recording [`RandomWeights`] handed out.
fn save_recorded(path: &Path, weights: &RandomWeights) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    candle_core::safetensors::save(&weights.recorded(), path)
        .map_err(|e| Error::weights(path, e.to_string()))
}

/// Builds a model on seeded random weights (see [`RandomWeights`]) and saves what it fetched.
pub(crate) fn save_random(
    path: &Path,
    weights: RandomWeights,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<()> {
    let weights = weights.recording();
    build(weights.clone().var_builder(DType::F32, &Device::Cpu))?;
    save_recorded(path, &weights)
}

/// Writes tiny checkpoints (`checkpoints/`), base models (`pretrained_weights/`) and configs
/// under `root`.
/// `dataset_root` goes into the training config's `data.root_dir`; `steps` into the inference
/// config. The weights are seeded random values (the same every time): only their shapes and
/// names matter here.
pub fn write_tiny_layout(root: &Path, dataset_root: &Path, steps: usize) -> Result<TinyLayout> {
    let ckpt = root.join("checkpoints");
    let pre = root.join("pretrained_weights");
    let ucfg: unet::Config =
        serde_json::from_value(unet_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_json(&pre.join("sd15/unet/config.json"), &unet_json())?;
    let rcfg = resampler::Config {
        dim: 64,
        depth: 1,
        dim_head: 64,
        heads: 1,
        num_queries: 16,
        embedding_dim: 512,
        output_dim: ucfg.cross_attention_dim,
        ff_mult: 4,
        ..resampler::Config::mcld()
    };
    // One seeded source per part, saved as one checkpoint file per part.
    let parts = [
        (Mcld::REFERENCE_UNET, 1, "reference_unet.safetensors"),
        (Mcld::DENOISING_UNET, 2, "denoising_unet.safetensors"),
        (Mcld::POSE_GUIDER, 3, "pose_guider.safetensors"),
        (Mcld::IMAGE_PROJ, 4, "image_projector.safetensors"),
    ]
    .map(|(prefix, seed, file)| (prefix, RandomWeights::new(seed).recording(), file));
    let vb = prefixed_var_builder(
        parts
            .iter()
            .map(|(p, w, _)| (*p, w.clone().var_builder(DType::F32, &Device::Cpu))),
        DType::F32,
        &Device::Cpu,
    );
    Mcld::new(vb, &McldConfig::new(ucfg, rcfg))?;
    for (_, w, file) in &parts {
        save_recorded(&ckpt.join(file), w)?;
    }
    crate::fsutil::write_atomic(&ckpt.join(UNTRAINED_MARKER), UNTRAINED_NOTE.as_bytes())?;
    let vcfg: vae::Config =
        serde_json::from_value(vae_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_json(&pre.join("vae/config.json"), &vae_json())?;
    let vae_weights = RandomWeights::new(5)
        .with_vae_mid_attention("", *vcfg.block_out_channels.last().unwrap_or(&1));
    save_random(
        &pre.join("vae/diffusion_pytorch_model.safetensors"),
        vae_weights,
        |vb| vae::AutoencoderKL::new(vb, &vcfg).map(|_| ()),
    )?;
    let ccfg = clip::Config::from_json_str(&clip_json().to_string())?;
    write_json(&pre.join("image_encoder/config.json"), &clip_json())?;
    save_random(
        &pre.join("image_encoder/model.safetensors"),
        RandomWeights::new(6),
        |vb| clip::ClipVisionModelWithProjection::new(vb, &ccfg).map(|_| ()),
    )?;

    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut infer: crate::config::InferenceConfig = crate::config::parse_yaml(
        include_str!("../../configs/inference/inference.yaml"),
        &here.join("configs/inference/inference.yaml"),
    )?;
    infer.num_inference_steps = steps;
    let infer_text = serde_yaml::to_string(&infer).map_err(|e| Error::msg(e.to_string()))?;
    let infer_path = root.join("inference.yaml");
    crate::fsutil::write_atomic(&infer_path, infer_text.as_bytes())?;
    let mut cfg: crate::config::TrainConfig = crate::config::parse_yaml(
        include_str!("../../configs/train/train.yaml"),
        &here.join("configs/train/train.yaml"),
    )?;
    cfg.data.root_dir = dataset_root.to_path_buf();
    cfg.pretrained_base_model_path = pre.join("sd15");
    cfg.pretrained_vae_path = pre.join("vae");
    cfg.image_encoder_path = pre.join("image_encoder");
    cfg.inference_config = infer_path;
    cfg.exp_name = "tiny".into();
    let text = serde_yaml::to_string(&cfg).map_err(|e| Error::msg(e.to_string()))?;
    let config_path = root.join("train.yaml");
    crate::fsutil::write_atomic(&config_path, text.as_bytes())?;
    Ok(TinyLayout {
        ckpt_dir: ckpt,
        config_path,
    })
}
