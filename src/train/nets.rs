//! Builds the MCLD network set from a prefixed weight source (`reference_unet.*`,
//! `denoising_unet.*`, `pose_guider.*`, `image_proj.*`), the layout of the training state.

use candle_core::DType;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::models::unet::{IpAdapter, UNet2DConditionModel};
use crate::models::{pose_guider, resampler, unet};
use crate::pipeline::sampler::McldNets;
use crate::Result;

/// Shapes of the four trained networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetsConfig {
    pub unet: unet::Config,
    pub pose_guider: pose_guider::Config,
    pub image_proj: resampler::Config,
    /// IP-adapter scale of the face attention (MCLD: 0.5); the token count is the projector's
    /// query count.
    pub ip_scale: f64,
}

impl NetsConfig {
    /// MCLD at full size on an SD-1.5 UNet config.
    pub fn mcld(unet: unet::Config) -> Self {
        let pg = pose_guider::Config::mcld(unet.block_out_channels[0]);
        Self {
            unet,
            pose_guider: pg,
            image_proj: resampler::Config::mcld(),
            ip_scale: 0.5,
        }
    }

    pub fn ip(&self) -> IpAdapter {
        IpAdapter {
            num_tokens: self.image_proj.num_queries,
            scale: self.ip_scale,
        }
    }
}

/// The four networks from a prefixed builder; `dtype` is the builder's.
pub fn build_nets(vb: &VarBuilder, cfg: &NetsConfig, dtype: DType) -> Result<McldNets> {
    Ok(McldNets {
        reference_unet: UNet2DConditionModel::new_reference(vb.pp("reference_unet"), &cfg.unet)?,
        denoising_unet: UNet2DConditionModel::new_denoising(
            vb.pp("denoising_unet"),
            &cfg.unet,
            cfg.ip(),
        )?,
        pose_guider: pose_guider::PoseGuider::new(vb.pp("pose_guider"), &cfg.pose_guider)?,
        image_proj: resampler::Resampler::new(vb.pp("image_proj"), &cfg.image_proj)?,
        dtype,
    })
}
