//! Tiny random base models in the real training layout (`sd-image-variations-diffusers/unet`,
//! its `image_encoder`, `sd-vae-ft-mse`, `control_v11p_sd15_seg`), plus `clip_std.npy` and a
//! `train.yaml` pointing at them: what the training demo and the training tests start from.

use std::path::{Path, PathBuf};

use crate::models::unet::{self, UNet2DConditionModel};
use crate::models::{clip, pose_guider, vae};
use crate::pipeline::tiny::{clip_json, save_random, unet_json, vae_json, write_json};
use crate::weights::random::RandomWeights;
use crate::{Error, Result};

/// Writes the tiny training base under `root/pretrained_weights/` and `root/train.yaml`
/// (data under `dataset_root`, runs under `root/exp_output`); returns the config's path.
pub fn write_tiny_train_base(root: &Path, dataset_root: &Path) -> Result<PathBuf> {
    let pre = root.join("pretrained_weights");
    let base = pre.join("sd-image-variations-diffusers");
    let ucfg: unet::Config =
        serde_json::from_value(unet_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_json(&base.join("unet/config.json"), &unet_json())?;
    save_random(
        &base.join("unet/diffusion_pytorch_model.safetensors"),
        RandomWeights::new(11),
        |vb| UNet2DConditionModel::new(vb, &ucfg).map(|_| ()),
    )?;
    let ccfg = clip::Config::from_json_str(&clip_json().to_string())?;
    write_json(&base.join("image_encoder/config.json"), &clip_json())?;
    save_random(
        &base.join("image_encoder/model.safetensors"),
        RandomWeights::new(12),
        |vb| clip::ClipVisionModelWithProjection::new(vb, &ccfg).map(|_| ()),
    )?;
    let vcfg: vae::Config =
        serde_json::from_value(vae_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_json(&pre.join("sd-vae-ft-mse/config.json"), &vae_json())?;
    let vae_weights = RandomWeights::new(13)
        .with_vae_mid_attention("", *vcfg.block_out_channels.last().unwrap_or(&1));
    save_random(
        &pre.join("sd-vae-ft-mse/diffusion_pytorch_model.safetensors"),
        vae_weights,
        |vb| vae::AutoencoderKL::new(vb, &vcfg).map(|_| ()),
    )?;
    let pcfg = pose_guider::Config::mcld(ucfg.block_out_channels[0]);
    let controlnet = pre.join("control_v11p_sd15_seg/diffusion_pytorch_model.safetensors");
    save_random(&controlnet, RandomWeights::new(14), |vb| {
        pose_guider::PoseGuider::new(vb.pp("controlnet_cond_embedding"), &pcfg).map(|_| ())
    })?;
    // Per-dimension CLIP embedding stds of a plausible size (the real file's are ~0.1-0.6).
    let d = ccfg.projection_dim;
    let std: Vec<f32> = (0..d).map(|i| 0.2 + 0.4 * (i as f32 / d as f32)).collect();
    let clip_std = root.join("clip_std.npy");
    crate::data::npy::write_f32(&clip_std, &[d], &std)?;

    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cfg: crate::config::TrainConfig = crate::config::parse_yaml(
        include_str!("../../configs/train/train.yaml"),
        &here.join("configs/train/train.yaml"),
    )?;
    cfg.data.root_dir = dataset_root.to_path_buf();
    cfg.data.train_width = 64;
    cfg.data.train_height = 64;
    cfg.data.train_bs = 2;
    // Three validation rows: fewer than train.yaml's 8 keeps the tests quick, and differs
    // from the former hard-coded 4 so that the key is seen to count.
    cfg.data.val_bs = 3;
    cfg.base_model_path = base.clone();
    cfg.vae_model_path = pre.join("sd-vae-ft-mse");
    cfg.image_encoder_path = base.join("image_encoder");
    cfg.controlnet_openpose_path = controlnet;
    cfg.pretrained_base_model_path = base;
    cfg.pretrained_vae_path = pre.join("sd-vae-ft-mse");
    cfg.clip_std_path = clip_std;
    cfg.weight_dtype = "fp32".into();
    cfg.device = "cpu".into();
    cfg.output_dir = root.join("exp_output");
    cfg.exp_name = "tiny".into();
    let text = serde_yaml::to_string(&cfg).map_err(|e| Error::msg(e.to_string()))?;
    let path = root.join("train.yaml");
    crate::fsutil::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
