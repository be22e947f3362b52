//! One place for the sizes the networks are built at without a download: the released ones
//! (SD-1.5 UNet, sd-vae-ft-mse, the CLIP ViT-L/14 image encoder, MCLD's 1280-wide face
//! projector), the UNet at half width and the tiny sizes of the demos and tests; [`tree`] writes
//! them as model folders and checkpoints with seeded random weights.
//!
//! A size is kept as the `config.json` a folder of that model holds, and its typed config is
//! parsed from it, so the folders [`tree`] writes are exactly what the loaders read.

pub mod tree;

use serde_json::{json, Value};

use crate::models::mcld::McldConfig;
use crate::models::{clip, resampler, unet, vae};
use crate::{Error, Result};

/// How big the networks are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A few thousand weights a network: the demos and the tests.
    Tiny,
    /// The released sizes with every UNet channel count halved (four times fewer UNet
    /// weights); the VAE, CLIP and the projector keep their released sizes.
    Half,
    /// The released sizes.
    Full,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::msg(format!("built-in {what} config: {e}")))
}

/// The UNet's diffusers `config.json`; `Full` is `stable-diffusion-v1-5/unet/config.json`.
pub fn unet_json(size: Size) -> Value {
    match size {
        Size::Tiny => json!({
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
        }),
        Size::Full => json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        }),
        Size::Half => {
            let mut v = unet_json(Size::Full);
            if let Some(c) = v["block_out_channels"].as_array_mut() {
                for x in c {
                    *x = json!(x.as_u64().unwrap_or(0) / 2);
                }
            }
            v
        }
    }
}

/// The UNet config of `size`, validated.
pub fn unet(size: Size) -> Result<unet::Config> {
    let c: unet::Config = parse("UNet", unet_json(size))?;
    c.validate()?;
    Ok(c)
}

/// The VAE's diffusers `config.json`; released: `sd-vae-ft-mse/config.json`.
pub fn vae_json(size: Size) -> Value {
    match size {
        Size::Tiny => json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "block_out_channels": [8, 8, 16, 16],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4
        }),
        Size::Half | Size::Full => json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 256,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }),
    }
}

pub fn vae(size: Size) -> Result<vae::Config> {
    parse("VAE", vae_json(size))
}

/// The CLIP image encoder's transformers `config.json` (vision tower keys); released:
/// `sd-image-variations-diffusers/image_encoder/config.json`, ViT-L/14 with 768-d embeddings,
/// the UNets' cross-attention width.
pub fn clip_json(size: Size) -> Value {
    match size {
        Size::Tiny => json!({
            "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3,
            "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
        }),
        Size::Half | Size::Full => json!({
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "projection_dim": 768,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05
        }),
    }
}

pub fn clip(size: Size) -> Result<clip::Config> {
    clip::Config::from_json_str(&clip_json(size).to_string())
}

/// The face projector making tokens of `output_dim` (the UNet's cross-attention width). The
/// released one (the file has no config): 16 queries of width 1280, 4 layers of 20 heads x 64,
/// 512-d ArcFace input.
pub fn projector(size: Size, output_dim: usize) -> resampler::Config {
    let mcld = resampler::Config {
        dim: 1280,
        depth: 4,
        dim_head: 64,
        heads: 20,
        num_queries: 16,
        embedding_dim: 512,
        output_dim,
        ff_mult: 4,
        apply_pos_emb: false,
        num_latents_mean_pooled: 0,
    };
    match size {
        Size::Tiny => resampler::Config {
            dim: 64,
            depth: 1,
            heads: 1,
            ..mcld
        },
        Size::Half | Size::Full => mcld,
    }
}

/// MCLD's four networks at `size` (the pose guider follows the UNet's first width).
pub fn mcld(size: Size) -> Result<McldConfig> {
    let u = unet(size)?;
    let p = projector(size, u.cross_attention_dim);
    Ok(McldConfig::new(u, p))
}
