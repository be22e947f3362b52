//! Seeded random weights at the sizes of [`super`]: the inference set in memory
//! ([`RandomPipeline`], what `mcld bench pipeline` times), or written in the exact on-disk
//! layout of the real files so that the pipeline and training run, loading included, without
//! any download (`mcld demo`, `mcld demo --train`, the tests). The weights are untrained: the
//! images are noise. Every tensor depends only on its seed and name, so the files are the same
//! on every run and machine.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::Size;
use crate::config::{write_yaml, InferenceConfig, TrainConfig, INFERENCE_YAML, TRAIN_YAML};
use crate::models::clip::{self, ClipVisionModelWithProjection};
use crate::models::mcld::{Mcld, McldConfig};
use crate::models::pose_guider::PoseGuider;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::{self, AutoencoderKL};
use crate::weights::random::RandomWeights;
use crate::weights::{files, prefixed_var_builder};
use crate::{Error, Result};

/// Random VAE weights that also answer the VAE's probe of its mid-block attention.
fn vae_weights(seed: u64, cfg: &vae::Config) -> RandomWeights {
    let bottleneck = cfg.block_out_channels.last().copied().unwrap_or(1);
    RandomWeights::new(seed).with_vae_mid_attention("", bottleneck)
}

/// The inference set at one size: MCLD's four networks, the VAE and the CLIP image encoder,
/// each from its own source seeded `31 * seed + k`, k = 1 to 6 in that order.
#[derive(Debug, Clone)]
pub struct RandomPipeline {
    pub size: Size,
    pub mcld: McldConfig,
    pub vae: vae::Config,
    pub clip: clip::Config,
    seed: u64,
}

impl RandomPipeline {
    pub fn new(size: Size, seed: u64) -> Result<Self> {
        Ok(Self {
            size,
            mcld: super::mcld(size)?,
            vae: super::vae(size)?,
            clip: super::clip(size)?,
            seed,
        })
    }

    fn seed(&self, k: u64) -> u64 {
        self.seed.wrapping_mul(31).wrapping_add(k)
    }

    /// MCLD's parts with their weight-name prefixes, in [`Mcld::PARTS`] order (k = 1 to 4).
    pub fn parts(&self) -> [(&'static str, RandomWeights); 4] {
        std::array::from_fn(|i| (Mcld::PARTS[i], RandomWeights::new(self.seed(i as u64 + 1))))
    }

    /// The builder [`Mcld::new`] takes, in `dtype` on `device`.
    pub fn mcld_var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let parts = self.parts().map(|(p, w)| (p, w.var_builder(dtype, device)));
        prefixed_var_builder(parts, dtype, device)
    }

    pub fn vae_weights(&self) -> RandomWeights {
        vae_weights(self.seed(5), &self.vae)
    }

    pub fn clip_weights(&self) -> RandomWeights {
        RandomWeights::new(self.seed(6))
    }

    /// Writes the set as the pipeline loads it: the four MCLD checkpoints into `ckpt_dir`, the
    /// UNet's config into `base_dir` (its weights come from the checkpoints), and the VAE and
    /// CLIP model folders.
    pub fn write(
        &self,
        ckpt_dir: &Path,
        base_dir: &Path,
        vae_dir: &Path,
        clip_dir: &Path,
    ) -> Result<()> {
        write_json(
            &base_dir.join(files::UNET_CONFIG),
            &super::unet_json(self.size),
        )?;
        let parts = self.parts().map(|(p, w)| (p, w.recording()));
        let vb = prefixed_var_builder(
            parts
                .iter()
                .map(|(p, w)| (*p, w.clone().var_builder(DType::F32, &Device::Cpu))),
            DType::F32,
            &Device::Cpu,
        );
        Mcld::new(vb, &self.mcld)?;
        for ((_, w), file) in parts.iter().zip(files::MCLD_CHECKPOINTS) {
            save_recorded(&ckpt_dir.join(file.safetensors), w)?;
        }
        write_net_dir(vae_dir, Net::Vae, self.size, self.vae_weights())?;
        write_net_dir(clip_dir, Net::Clip, self.size, self.clip_weights())
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
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

/// Builds a network on `weights` and saves every tensor it asked for.
fn save_random(
    path: &Path,
    weights: RandomWeights,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<()> {
    let weights = weights.recording();
    build(weights.clone().var_builder(DType::F32, &Device::Cpu))?;
    save_recorded(path, &weights)
}

/// The single-network model folders.
#[derive(Debug, Clone, Copy)]
enum Net {
    Unet,
    Vae,
    Clip,
}

/// A model folder: `config.json` and the weights `weights` gives the network at `size`.
fn write_net_dir(dir: &Path, net: Net, size: Size, weights: RandomWeights) -> Result<()> {
    let (config, file) = match net {
        Net::Unet => (super::unet_json(size), files::DIFFUSERS_WEIGHTS[0]),
        Net::Vae => (super::vae_json(size), files::DIFFUSERS_WEIGHTS[0]),
        Net::Clip => (super::clip_json(size), files::TRANSFORMERS_WEIGHTS[0]),
    };
    write_json(&dir.join(files::CONFIG), &config)?;
    save_random(&dir.join(file), weights, |vb| match net {
        Net::Unet => UNet2DConditionModel::new(vb, &super::unet(size)?).map(drop),
        Net::Vae => AutoencoderKL::new(vb, &super::vae(size)?).map(drop),
        Net::Clip => ClipVisionModelWithProjection::new(vb, &super::clip(size)?).map(drop),
    })
}

/// What [`write_tiny_layout`] produced.
#[derive(Debug, Clone)]
pub struct TinyLayout {
    pub ckpt_dir: PathBuf,
    /// A training config pointing at the tiny base models (and at `dataset_root`).
    pub config_path: PathBuf,
}

/// Written beside the tiny checkpoints, so that `mcld serve` can label what it shows as the
/// output of untrained weights.
pub const UNTRAINED_MARKER: &str = "UNTRAINED_DEMO_WEIGHTS.txt";
const UNTRAINED_NOTE: &str = "These checkpoints are tiny seeded random weights written by `mcld \
demo`: they exercise the whole pipeline, and what they generate is noise.\n";

/// Writes the tiny inference set (seed 0) under `root`: MCLD checkpoints (`checkpoints/`), base
/// models (`pretrained_weights/`), `inference.yaml` with `steps` DDIM steps and `train.yaml`
/// pointing at them, with `data.root_dir` = `dataset_root`.
pub fn write_tiny_layout(root: &Path, dataset_root: &Path, steps: usize) -> Result<TinyLayout> {
    let ckpt = root.join("checkpoints");
    let pre = root.join("pretrained_weights");
    RandomPipeline::new(Size::Tiny, 0)?.write(
        &ckpt,
        &pre.join("sd15"),
        &pre.join("vae"),
        &pre.join("image_encoder"),
    )?;
    crate::fsutil::write_atomic(&ckpt.join(UNTRAINED_MARKER), UNTRAINED_NOTE.as_bytes())?;
    let mut infer: InferenceConfig = INFERENCE_YAML.parse()?;
    infer.num_inference_steps = steps;
    let infer_path = root.join("inference.yaml");
    write_yaml(&infer_path, &infer)?;
    let mut cfg: TrainConfig = TRAIN_YAML.parse()?;
    cfg.data.root_dir = dataset_root.to_path_buf();
    cfg.pretrained_base_model_path = pre.join("sd15");
    cfg.pretrained_vae_path = pre.join("vae");
    cfg.image_encoder_path = pre.join("image_encoder");
    cfg.inference_config = infer_path;
    cfg.exp_name = "tiny".into();
    let config_path = root.join("train.yaml");
    write_yaml(&config_path, &cfg)?;
    Ok(TinyLayout {
        ckpt_dir: ckpt,
        config_path,
    })
}

/// Writes the tiny training base under `root/pretrained_weights/` in the real layout
/// (`sd-image-variations-diffusers/{unet,image_encoder}`, `sd-vae-ft-mse`,
/// `control_v11p_sd15_seg`; seeds 11 to 14), `root/clip_std.npy` and `root/train.yaml` (data
/// under `dataset_root`, runs under `root/exp_output`); returns the config's path.
pub fn write_tiny_train_base(root: &Path, dataset_root: &Path) -> Result<PathBuf> {
    let size = Size::Tiny;
    let pre = root.join("pretrained_weights");
    let base = pre.join(files::IMAGE_VARIATIONS_DIR);
    let vae_dir = pre.join(files::VAE_DIR);
    let nets = [
        (
            base.join(files::UNET_DIR),
            Net::Unet,
            RandomWeights::new(11),
        ),
        (
            base.join(files::IMAGE_ENCODER_DIR),
            Net::Clip,
            RandomWeights::new(12),
        ),
        (
            vae_dir.clone(),
            Net::Vae,
            vae_weights(13, &super::vae(size)?),
        ),
    ];
    for (dir, net, weights) in nets {
        write_net_dir(&dir, net, size, weights)?;
    }
    let pcfg = super::mcld(size)?.pose_guider;
    let controlnet = pre
        .join(files::CONTROLNET_SEG_DIR)
        .join(files::DIFFUSERS_WEIGHTS[0]);
    save_random(&controlnet, RandomWeights::new(14), |vb| {
        PoseGuider::new(vb.pp("controlnet_cond_embedding"), &pcfg).map(drop)
    })?;
    // Per-dimension CLIP embedding stds of a plausible size (the real file's are ~0.1-0.6).
    let d = super::clip(size)?.projection_dim;
    let std: Vec<f32> = (0..d).map(|i| 0.2 + 0.4 * (i as f32 / d as f32)).collect();
    let clip_std = root.join("clip_std.npy");
    crate::data::npy::write_f32(&clip_std, &[d], &std)?;

    let mut cfg: TrainConfig = TRAIN_YAML.parse()?;
    cfg.data.root_dir = dataset_root.to_path_buf();
    cfg.data.train_width = 64;
    cfg.data.train_height = 64;
    cfg.data.train_bs = 2;
    // Three validation rows: fewer than train.yaml's 8 keeps the tests quick, and differs
    // from the former hard-coded 4 so that the key is seen to count.
    cfg.data.val_bs = 3;
    cfg.base_model_path = base.clone();
    cfg.vae_model_path = vae_dir.clone();
    cfg.image_encoder_path = base.join(files::IMAGE_ENCODER_DIR);
    cfg.controlnet_openpose_path = controlnet;
    cfg.pretrained_base_model_path = base;
    cfg.pretrained_vae_path = vae_dir;
    cfg.clip_std_path = clip_std;
    cfg.weight_dtype = "fp32".into();
    cfg.solver.mixed_precision = "no".into();
    cfg.data.num_processes = 1;
    cfg.device = "cpu".into();
    cfg.output_dir = root.join("exp_output");
    cfg.exp_name = "tiny".into();
    let path = root.join("train.yaml");
    write_yaml(&path, &cfg)?;
    Ok(path)
}
