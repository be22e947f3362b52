//! The names of the files in a model folder and of MCLD's checkpoints, in one place: the loaders
//! look for them, `mcld download`'s table fetches them and `presets::tree` writes them.

// The names are macros as well as constants so that `concat!` can build the subfolder paths the
// download table needs as constants too.
macro_rules! config_json {
    () => {
        "config.json"
    };
}
macro_rules! diffusers_safetensors {
    () => {
        "diffusion_pytorch_model.safetensors"
    };
}
macro_rules! diffusers_bin {
    () => {
        "diffusion_pytorch_model.bin"
    };
}
macro_rules! transformers_safetensors {
    () => {
        "model.safetensors"
    };
}
macro_rules! transformers_bin {
    () => {
        "pytorch_model.bin"
    };
}

/// A diffusers or transformers model folder's config.
pub const CONFIG: &str = config_json!();

/// A diffusers model's single weight file (UNet, VAE, ControlNet), safetensors first: the order
/// the loaders try them in and `mcld download` chooses in.
pub const DIFFUSERS_WEIGHTS: [&str; 2] = [diffusers_safetensors!(), diffusers_bin!()];

/// A transformers model's single weight file (the CLIP image encoder), safetensors first.
pub const TRANSFORMERS_WEIGHTS: [&str; 2] = [transformers_safetensors!(), transformers_bin!()];

/// The UNet subfolder of a diffusers pipeline repo (SD-1.5, sd-image-variations-diffusers).
pub const UNET_DIR: &str = "unet";
pub const UNET_CONFIG: &str = concat!("unet/", config_json!());
pub const UNET_WEIGHTS: [&str; 2] = [
    concat!("unet/", diffusers_safetensors!()),
    concat!("unet/", diffusers_bin!()),
];

/// The CLIP image encoder subfolder of sd-image-variations-diffusers.
pub const IMAGE_ENCODER_DIR: &str = "image_encoder";
pub const IMAGE_ENCODER_CONFIG: &str = concat!("image_encoder/", config_json!());
pub const IMAGE_ENCODER_WEIGHTS: [&str; 2] = [
    concat!("image_encoder/", transformers_safetensors!()),
    concat!("image_encoder/", transformers_bin!()),
];

/// One of MCLD's checkpoint files: `stem.safetensors` (ours) or `stem.pth` (the release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub stem: &'static str,
    pub safetensors: &'static str,
    pub pth: &'static str,
}

macro_rules! checkpoint {
    ($stem:literal) => {
        Checkpoint {
            stem: $stem,
            safetensors: concat!($stem, ".safetensors"),
            pth: concat!($stem, ".pth"),
        }
    };
}

pub const REFERENCE_UNET: Checkpoint = checkpoint!("reference_unet");
pub const DENOISING_UNET: Checkpoint = checkpoint!("denoising_unet");
pub const POSE_GUIDER: Checkpoint = checkpoint!("pose_guider");
pub const IMAGE_PROJECTOR: Checkpoint = checkpoint!("image_projector");
/// The face projector's name in the reference's own checkpoints.
pub const IMAGE_PROJ_MODEL: Checkpoint = checkpoint!("image_proj_model");

/// The base-model folders under `pretrained_weights/`, as `mcld download` lays them out and
/// `configs/train/train.yaml` names them.
pub const SD15_DIR: &str = "stable-diffusion-v1-5";
pub const VAE_DIR: &str = "sd-vae-ft-mse";
pub const IMAGE_VARIATIONS_DIR: &str = "sd-image-variations-diffusers";
pub const CONTROLNET_SEG_DIR: &str = "control_v11p_sd15_seg";

/// MCLD's four checkpoint files in the order of `models::mcld::Mcld::PARTS`.
pub const MCLD_CHECKPOINTS: [Checkpoint; 4] =
    [REFERENCE_UNET, DENOISING_UNET, POSE_GUIDER, IMAGE_PROJECTOR];
