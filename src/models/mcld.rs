//! MCLD's network set (SPEC §3) as one value: the reference UNet, the denoising UNet, the pose
//! guider and the face projector, built from one weight source whose names carry the part
//! (`reference_unet.*`, `denoising_unet.*`, `pose_guider.*`, `image_proj.*`, as the composite
//! fixtures name them), with the conditioning every caller shares: face tokens, stage contexts,
//! the reference bank, pose features and the noise prediction. Inference, the benches, the tiny
//! checkpoints and training build it the same way, so the IP-adapter settings come from one place.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::models::pose_guider::{self, PoseGuider};
use crate::models::resampler::{self, Resampler};
use crate::models::unet::{
    self, BankGuidance, DenoiseInput, IpAdapter, ReferenceBank, StageContexts, UNet2DConditionModel,
};
use crate::{Error, Result};

/// The shapes of the four networks and how the denoising UNet reads the face tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McldConfig {
    pub unet: unet::Config,
    pub pose_guider: pose_guider::Config,
    pub image_proj: resampler::Config,
    pub ip: IpAdapter,
}

impl McldConfig {
    /// MCLD's set around a UNet and a projector: the pose guider ends at the UNet's first width,
    /// the IP-adapter reads one token per projector query at MCLD's scale.
    pub fn new(unet: unet::Config, image_proj: resampler::Config) -> Self {
        // An empty channel list gives 0 here and is refused by `validate`.
        let c0 = unet.block_out_channels.first().copied().unwrap_or(0);
        Self {
            pose_guider: pose_guider::Config::mcld(c0),
            ip: IpAdapter::mcld(image_proj.num_queries),
            unet,
            image_proj,
        }
    }

    /// Rejects parts that cannot work together, naming both sides.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        let bad = |m: String| Err(Error::msg(format!("MCLD config: {m}")));
        if self.ip.num_tokens != self.image_proj.num_queries {
            return bad(format!(
                "ip.num_tokens = {} but the face projector makes {} tokens (num_queries)",
                self.ip.num_tokens, self.image_proj.num_queries
            ));
        }
        if self.image_proj.output_dim != self.unet.cross_attention_dim {
            return bad(format!(
                "face projector output_dim = {} but the UNet's cross_attention_dim = {}",
                self.image_proj.output_dim, self.unet.cross_attention_dim
            ));
        }
        let c0 = self.unet.block_out_channels[0]; // non-empty: checked by unet.validate()
        if self.pose_guider.conditioning_embedding_channels != c0 {
            return bad(format!(
                "pose guider conditioning_embedding_channels = {} but the UNet's \
                 block_out_channels[0] = {c0}",
                self.pose_guider.conditioning_embedding_channels
            ));
        }
        Ok(())
    }
}

/// The face input of a forward: ArcFace embeddings (projected here) or ready face tokens (the
/// sampler projects once per batch; guidance's unconditional half uses zero tokens).
#[derive(Debug, Clone, Copy)]
pub enum FaceCond<'a> {
    /// (B, 1, 512) or (B, 512).
    Embeddings(&'a Tensor),
    /// (B, num_tokens, cross_attention_dim).
    Tokens(&'a Tensor),
}

/// The pose input of a forward: IUV images in [0, 1] or ready pose-guider features.
#[derive(Debug, Clone, Copy)]
pub enum PoseCond<'a> {
    /// (B, 3, H, W).
    Image(&'a Tensor),
    /// (B, C0, H/8, W/8), the pose guider's output.
    Features(&'a Tensor),
}

/// Inputs of one noise prediction.
#[derive(Debug, Clone)]
pub struct McldInput<'a> {
    /// Noisy latents (B, 4, h, w).
    pub latents: &'a Tensor,
    /// One per sample, or one for all.
    pub timesteps: &'a Tensor,
    /// CLIP image embedding of the source photos (B, 1, D).
    pub clip_src: &'a Tensor,
    /// CLIP image embedding of the texture maps (B, 1, D).
    pub clip_tex: &'a Tensor,
    pub face: FaceCond<'a>,
    pub pose: PoseCond<'a>,
    /// The reference UNet's bank (see [`Mcld::reference_bank`]); `None` reads no bank.
    pub bank: Option<&'a ReferenceBank>,
    /// Which samples ignore the bank (guidance's unconditional half, dropped references).
    pub bank_guidance: BankGuidance,
    /// Round the bank to f16 before reading it, as MCLD does (default true).
    pub bank_fp16_round: bool,
}

impl<'a> McldInput<'a> {
    /// Every sample reads the bank, when one is set.
    pub fn new(
        latents: &'a Tensor,
        timesteps: &'a Tensor,
        clip_src: &'a Tensor,
        clip_tex: &'a Tensor,
        face: FaceCond<'a>,
        pose: PoseCond<'a>,
    ) -> Self {
        Self {
            latents,
            timesteps,
            clip_src,
            clip_tex,
            face,
            pose,
            bank: None,
            bank_guidance: BankGuidance::AllSamples,
            bank_fp16_round: true,
        }
    }
}

/// The four networks; every method casts its inputs to the networks' dtype.
#[derive(Debug, Clone)]
pub struct Mcld {
    pub reference_unet: UNet2DConditionModel,
    pub denoising_unet: UNet2DConditionModel,
    pub pose_guider: PoseGuider,
    pub image_proj: Resampler,
    cfg: McldConfig,
    dtype: DType,
}

impl Mcld {
    /// Weight-name prefixes of the parts (what `vb` in [`Mcld::new`] must carry).
    pub const REFERENCE_UNET: &'static str = "reference_unet";
    pub const DENOISING_UNET: &'static str = "denoising_unet";
    pub const POSE_GUIDER: &'static str = "pose_guider";
    pub const IMAGE_PROJ: &'static str = "image_proj";
    pub const PARTS: [&'static str; 4] = [
        Self::REFERENCE_UNET,
        Self::DENOISING_UNET,
        Self::POSE_GUIDER,
        Self::IMAGE_PROJ,
    ];

    /// Builds the four networks from `vb`, whose names carry the part prefixes (see
    /// [`crate::weights::prefixed_var_builder`] for one file per part). The networks compute
    /// in `vb`'s dtype.
    pub fn new(vb: VarBuilder, cfg: &McldConfig) -> Result<Self> {
        cfg.validate()?;
        let reference_unet =
            UNet2DConditionModel::new_reference(vb.pp(Self::REFERENCE_UNET), &cfg.unet)?;
        let denoising_unet =
            UNet2DConditionModel::new_denoising(vb.pp(Self::DENOISING_UNET), &cfg.unet, cfg.ip)?;
        let pose_guider = PoseGuider::new(vb.pp(Self::POSE_GUIDER), &cfg.pose_guider)?;
        let image_proj = Resampler::new(vb.pp(Self::IMAGE_PROJ), &cfg.image_proj)?;
        Ok(Self {
            reference_unet,
            denoising_unet,
            pose_guider,
            image_proj,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &McldConfig {
        &self.cfg
    }

    /// The dtype the networks' weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Face embeddings (B, 1, 512) to face tokens (B, num_tokens, D).
    pub fn face_tokens(&self, face_emb: &Tensor) -> Result<Tensor> {
        self.image_proj.forward(&face_emb.to_dtype(self.dtype)?)
    }

    /// MCLD's stage contexts: down [src, face], mid [src, tex, face], up [tex, face].
    pub fn contexts(
        &self,
        clip_src: &Tensor,
        clip_tex: &Tensor,
        face_tokens: &Tensor,
    ) -> Result<StageContexts> {
        let (src, tex, face) = (
            clip_src.to_dtype(self.dtype)?,
            clip_tex.to_dtype(self.dtype)?,
            face_tokens.to_dtype(self.dtype)?,
        );
        Ok(StageContexts {
            down: Tensor::cat(&[&src, &face], 1)?,
            mid: Tensor::cat(&[&src, &tex, &face], 1)?,
            up: Tensor::cat(&[&tex, &face], 1)?,
        })
    }

    /// The reference UNet on the texture latents at t = 0 with CLIP(source) as context.
    pub fn reference_bank(&self, ref_latents: &Tensor, clip_src: &Tensor) -> Result<ReferenceBank> {
        let b = ref_latents.dim(0)?;
        let t0 = Tensor::zeros(b, DType::I64, ref_latents.device())?;
        self.reference_unet.forward_reference(
            &ref_latents.to_dtype(self.dtype)?,
            &t0,
            &clip_src.to_dtype(self.dtype)?,
        )
    }

    /// Pose-guider features of IUV images in [0, 1].
    pub fn pose_features(&self, pose: &Tensor) -> Result<Tensor> {
        self.pose_guider.forward(&pose.to_dtype(self.dtype)?)
    }

    /// The denoising UNet's prediction, in the networks' dtype.
    pub fn forward(&self, inp: &McldInput) -> Result<Tensor> {
        let face = match inp.face {
            FaceCond::Embeddings(e) => self.face_tokens(e)?,
            FaceCond::Tokens(t) => t.clone(),
        };
        let contexts = self.contexts(inp.clip_src, inp.clip_tex, &face)?;
        let pose = match inp.pose {
            PoseCond::Image(p) => self.pose_features(p)?,
            PoseCond::Features(f) => f.clone(),
        };
        let latents = inp.latents.to_dtype(self.dtype)?;
        let mut d = DenoiseInput::new(&latents, inp.timesteps, &contexts);
        d.pose_features = Some(&pose);
        d.bank = inp.bank;
        d.guidance = inp.bank_guidance.clone();
        d.bank_fp16_round = inp.bank_fp16_round;
        self.denoising_unet.forward_denoise(&d)
    }
}
