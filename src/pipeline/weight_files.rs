//! Where the pipeline's weights live, resolved up front so that a missing file is reported
//! together with the whole expected layout instead of failing half-way through loading.

use std::path::{Path, PathBuf};

use crate::config::TrainConfig;
use crate::weights::files;
use crate::{Error, Result};

/// Paths of every file the inference pipeline loads.
#[derive(Debug, Clone)]
pub struct PipelineFiles {
    pub denoising_unet: PathBuf,
    pub reference_unet: PathBuf,
    pub pose_guider: PathBuf,
    pub image_proj: PathBuf,
    /// UNet `config.json` (SD-1.5's, as the reference builds both UNets from it).
    pub unet_config: PathBuf,
    /// VAE folder (`config.json` + weights).
    pub vae_dir: PathBuf,
    /// CLIP image encoder folder (`config.json` + weights).
    pub image_encoder_dir: PathBuf,
}

/// First existing `dir/stem.ext` over the extensions we read (our safetensors first).
fn find_ckpt(dir: &Path, stems: &[&str]) -> Option<PathBuf> {
    for s in stems {
        for ext in ["safetensors", "pth", "bin"] {
            let p = dir.join(format!("{s}.{ext}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn has_weights(dir: &Path, stems: &[&str]) -> bool {
    stems.iter().any(|s| dir.join(s).is_file())
}

impl PipelineFiles {
    /// Resolves the MCLD checkpoints in `ckpt_dir` and the base models named by the training
    /// config (`pretrained_base_model_path`, `pretrained_vae_path`, `image_encoder_path`).
    pub fn resolve(ckpt_dir: &Path, cfg: &TrainConfig) -> Result<Self> {
        let mut missing = Vec::new();
        let mut need = |found: Option<PathBuf>, what: String| -> PathBuf {
            found.unwrap_or_else(|| {
                missing.push(what);
                PathBuf::new()
            })
        };
        let denoising_unet = need(
            find_ckpt(ckpt_dir, &[files::DENOISING_UNET.stem]),
            format!(
                "{}/denoising_unet.pth (or .safetensors)",
                ckpt_dir.display()
            ),
        );
        let reference_unet = need(
            find_ckpt(ckpt_dir, &[files::REFERENCE_UNET.stem]),
            format!(
                "{}/reference_unet.pth (or .safetensors)",
                ckpt_dir.display()
            ),
        );
        let pose_guider = need(
            find_ckpt(ckpt_dir, &[files::POSE_GUIDER.stem]),
            format!("{}/pose_guider.pth (or .safetensors)", ckpt_dir.display()),
        );
        let image_proj = need(
            find_ckpt(
                ckpt_dir,
                &[files::IMAGE_PROJECTOR.stem, files::IMAGE_PROJ_MODEL.stem],
            ),
            format!(
                "{}/image_projector.pth or image_proj_model.pth (or .safetensors)",
                ckpt_dir.display()
            ),
        );
        let base = &cfg.pretrained_base_model_path;
        let unet_config = [base.join(files::UNET_CONFIG), base.join(files::CONFIG)]
            .into_iter()
            .find(|p| p.is_file());
        let unet_config = need(
            unet_config,
            format!("{}/unet/config.json (SD-1.5)", base.display()),
        );
        let vae_dir = cfg.pretrained_vae_path.clone();
        if !(vae_dir.join(files::CONFIG).is_file()
            && has_weights(&vae_dir, &files::DIFFUSERS_WEIGHTS))
        {
            missing.push(format!(
                "{}/config.json + diffusion_pytorch_model.safetensors|.bin (sd-vae-ft-mse)",
                vae_dir.display()
            ));
        }
        let image_encoder_dir = cfg.image_encoder_path.clone();
        if !(image_encoder_dir.join(files::CONFIG).is_file()
            && has_weights(&image_encoder_dir, &files::TRANSFORMERS_WEIGHTS))
        {
            missing.push(format!(
                "{}/config.json + model.safetensors|pytorch_model.bin (CLIP ViT-L/14 image encoder)",
                image_encoder_dir.display()
            ));
        }
        if !missing.is_empty() {
            return Err(Error::msg(format!(
                "missing weight files:\n  {}\n\nexpected layout:\n{}\n\
                 `mcld download --only inference` fetches them into this layout",
                missing.join("\n  "),
                EXPECTED_LAYOUT
            )));
        }
        Ok(Self {
            denoising_unet,
            reference_unet,
            pose_guider,
            image_proj,
            unet_config,
            vae_dir,
            image_encoder_dir,
        })
    }
}

/// Shown whenever a file is missing.
pub const EXPECTED_LAYOUT: &str =
    "  checkpoints/denoising_unet.pth        MCLD release (or our .safetensors)
  checkpoints/reference_unet.pth
  checkpoints/pose_guider.pth
  checkpoints/image_projector.pth       (the loader also accepts image_proj_model.pth)
  pretrained_weights/stable-diffusion-v1-5/unet/config.json
  pretrained_weights/sd-vae-ft-mse/{config.json, diffusion_pytorch_model.safetensors}
  pretrained_weights/sd-image-variations-diffusers/image_encoder/{config.json, pytorch_model.bin}
(the pretrained paths come from the training config: pretrained_base_model_path,
 pretrained_vae_path, image_encoder_path)";

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path) -> TrainConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/train/train.yaml");
        let mut c = TrainConfig::load(&p).unwrap();
        c.pretrained_base_model_path = root.join("sd15");
        c.pretrained_vae_path = root.join("vae");
        c.image_encoder_path = root.join("enc");
        c
    }

    fn touch(p: PathBuf) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn lists_every_missing_file_then_resolves() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let ck = d.path().join("ckpt");
        let e = PipelineFiles::resolve(&ck, &c).unwrap_err().to_string();
        for what in [
            "denoising_unet.pth",
            "reference_unet.pth",
            "pose_guider.pth",
            "image_proj_model.pth",
            "unet/config.json",
            "sd-vae-ft-mse",
            "image encoder",
            "expected layout",
        ] {
            assert!(e.contains(what), "{what} not in: {e}");
        }
        touch(ck.join("denoising_unet.pth"));
        touch(ck.join("reference_unet.safetensors"));
        touch(ck.join("pose_guider.pth"));
        touch(ck.join("image_proj_model.pth"));
        touch(d.path().join("sd15/unet/config.json"));
        touch(d.path().join("vae/config.json"));
        touch(d.path().join("vae/diffusion_pytorch_model.safetensors"));
        touch(d.path().join("enc/config.json"));
        let e = PipelineFiles::resolve(&ck, &c).unwrap_err().to_string();
        let listed = e.split("expected layout").next().unwrap();
        assert!(
            listed.contains("image encoder") && !listed.contains("denoising_unet"),
            "{e}"
        );
        touch(d.path().join("enc/pytorch_model.bin"));
        let f = PipelineFiles::resolve(&ck, &c).unwrap();
        assert!(f.reference_unet.ends_with("reference_unet.safetensors"));
        assert!(f.image_proj.ends_with("image_proj_model.pth"));
    }
}
