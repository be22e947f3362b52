//! The training run's starting weights, from the real files as the reference's `train.py`
//! builds them (SPEC §4): both UNets from `sd-image-variations-diffusers/unet`, fresh
//! IP-adapter projections in the denoising UNet, the pose guider from
//! `control_v11p_sd15_seg`'s `controlnet_cond_embedding.*` with a zero `conv_out`, and a fresh
//! face projector. Every network is built once against its tensors with the strict loader, so a
//! missing, unexpected or misshaped tensor is reported with its file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::models::mcld::McldConfig;
use crate::models::unet::{self, UNet2DConditionModel};
use crate::models::{pose_guider, resampler};
use crate::weights::random::RandomWeights;
use crate::weights::{ModelDir, StrictWeights};
use crate::{Error, Result};

/// Where the starting weights come from.
#[derive(Debug, Clone)]
pub struct InitSources {
    /// The diffusers UNet folder (`{base_model_path}/unet`).
    pub unet_dir: PathBuf,
    /// ControlNet weights whose `controlnet_cond_embedding.*` seed the pose guider; `None`
    /// initialises the pose guider as torch would (the reference's `pose_guider_pretrain: false`).
    pub controlnet: Option<PathBuf>,
    /// Input channels of the pose guider with ControlNet weights (`cond_chan`, train.py line
    /// 357); without, the class default 3 (line 369).
    pub cond_chan: usize,
    /// Seed of the fresh tensors (IP projections, projector, pose guider without ControlNet).
    pub seed: u64,
}

/// Starting weights under composite names, and the network shapes they imply.
pub struct InitialWeights {
    pub cfg: McldConfig,
    pub tensors: HashMap<String, Tensor>,
    /// Names of tensors that were freshly initialised (not read from a file).
    pub fresh: Vec<String>,
}

/// torch's default initialisation of a fresh `nn.Linear` / `nn.Conv2d` tensor
/// (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
/// biases alike), drawn from `rng`.
fn torch_uniform(dims: &[usize], fan_in: usize, rng: &mut StdRng) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// Every (name, shape) a network asks its builder for, in sorted order.
fn requested_shapes(
    build: impl FnOnce(candle_nn::VarBuilder) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let rw = RandomWeights::new(0).recording();
    build(rw.clone().var_builder(DType::F32, &Device::Cpu))?;
    let mut v: Vec<(String, Vec<usize>)> = rw
        .recorded()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    v.sort();
    Ok(v)
}

/// A fresh face projector as IP-Adapter's `Resampler.__init__` leaves it: `latents` randn /
/// sqrt(dim), LayerNorms (names with `norm`, and the feed-forward's leading `*.1.0.*`) at 1/0,
/// Linear layers torch-default.
pub fn fresh_projector(
    cfg: &resampler::Config,
    rng: &mut StdRng,
) -> Result<HashMap<String, Tensor>> {
    let shapes = requested_shapes(|vb| resampler::Resampler::new(vb, cfg).map(|_| ()))?;
    let by_name: HashMap<&str, &Vec<usize>> = shapes.iter().map(|(k, d)| (k.as_str(), d)).collect();
    let mut out = HashMap::new();
    for (name, dims) in &shapes {
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let is_norm = module.contains("norm") || module.ends_with(".1.0");
        let t = if name == "latents" {
            let n: usize = dims.iter().product();
            let s = 1.0 / (cfg.dim as f32).sqrt();
            let v: Vec<f32> = (0..n)
                .map(|_| s * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
                .collect();
            Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?
        } else if is_norm {
            let fill = if leaf == "weight" { 1.0 } else { 0.0 };
            Tensor::full(fill, dims.as_slice(), &Device::Cpu)?
        } else if leaf == "weight" {
            torch_uniform(dims, dims[1..].iter().product(), rng)?
        } else {
            let w = by_name
                .get(format!("{module}.weight").as_str())
                .ok_or_else(|| Error::msg(format!("projector init: no weight beside {name}")))?;
            torch_uniform(dims, w[1..].iter().product(), rng)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// A pose guider initialised as torch initialises its convolutions, `conv_out` zero.
pub fn fresh_pose_guider(
    cfg: &pose_guider::Config,
    rng: &mut StdRng,
) -> Result<HashMap<String, Tensor>> {
    let shapes = requested_shapes(|vb| pose_guider::PoseGuider::new(vb, cfg).map(|_| ()))?;
    let by_name: HashMap<&str, &Vec<usize>> = shapes.iter().map(|(k, d)| (k.as_str(), d)).collect();
    let mut out = HashMap::new();
    for (name, dims) in &shapes {
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let t = if module == "conv_out" {
            Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let w = by_name
                .get(format!("{module}.weight").as_str())
                .copied()
                .unwrap_or(dims);
            let fan_in = if leaf == "weight" {
                dims[1..].iter().product()
            } else {
                w[1..].iter().product()
            };
            torch_uniform(dims, fan_in, rng)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Builds `build` against `tensors` strictly (allowing unused keys under `allow`) and returns
/// the tensors it used; errors name `source`.
fn strict_subset(
    tensors: HashMap<String, Tensor>,
    source: &Path,
    allow: &[&str],
    build: impl FnOnce(candle_nn::VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let w = StrictWeights::new(tensors, source).allow_unused(allow.iter().map(|s| s.to_string()));
    build(w.var_builder(DType::F32, &Device::Cpu))
        .map_err(|e| Error::weights(source, e.to_string()))?;
    w.finish()?;
    Ok(w.requested()
        .into_iter()
        .filter_map(|k| w.tensors().get(&k).map(|t| (k, t.clone())))
        .collect())
}

fn insert_prefixed(
    out: &mut HashMap<String, Tensor>,
    prefix: &str,
    tensors: HashMap<String, Tensor>,
) {
    for (k, v) in tensors {
        out.insert(format!("{prefix}{k}"), v);
    }
}

/// The ControlNet weight file: the configured one, else its folder's other usual name (the
/// reference's config names the `.bin`, `mcld download` fetches the `.safetensors`).
fn controlnet_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::weights::files::DIFFUSERS_WEIGHTS
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::weights(
                path,
                "ControlNet weights not found (nor diffusion_pytorch_model.safetensors/.bin \
                 beside it); `mcld download --only train` fetches control_v11p_sd15_seg",
            )
        })
}

/// Loads and assembles the starting weights.
pub fn initial_weights(src: &InitSources) -> Result<InitialWeights> {
    let dir = ModelDir::open(&src.unet_dir).map_err(|e| {
        Error::msg(format!(
            "{e} (the training base UNet; `mcld download --only train` fetches \
             sd-image-variations-diffusers)"
        ))
    })?;
    let ucfg = unet::Config::from_json_file(&dir.config)?;
    let base = dir.load(&Device::Cpu)?;
    let base_src = match dir.weights.as_slice() {
        [one] => one.clone(),
        _ => dir.dir.clone(),
    };
    let mut rng = StdRng::seed_from_u64(src.seed);
    let proj = crate::presets::projector(crate::presets::Size::Full, ucfg.cross_attention_dim);
    let mut cfg = McldConfig::new(ucfg.clone(), proj);
    let mut out = HashMap::new();
    let mut fresh = Vec::new();

    // Reference UNet: everything but the unused output head.
    let reference = strict_subset(
        base.clone(),
        &base_src,
        &["conv_norm_out.", "conv_out."],
        |vb| UNet2DConditionModel::new_reference(vb, &ucfg).map(|_| ()),
    )?;
    insert_prefixed(&mut out, "reference_unet.", reference);

    // Denoising UNet: the base plus fresh bias-free IP projections beside every attn2.to_k.
    let mut den = base;
    let mut ip_keys: Vec<(String, Vec<usize>)> = den
        .iter()
        .filter(|(k, _)| k.ends_with(".attn2.to_k.weight"))
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    ip_keys.sort();
    for (k, dims) in ip_keys {
        let stem = k.trim_end_matches("to_k.weight");
        for which in ["to_k_ip", "to_v_ip"] {
            let name = format!("{stem}processor.{which}.weight");
            let t = torch_uniform(&dims, dims[1], &mut rng)?;
            fresh.push(format!("denoising_unet.{name}"));
            den.insert(name, t);
        }
    }
    let ip = cfg.ip;
    let den = strict_subset(den, &base_src, &[], |vb| {
        UNet2DConditionModel::new_denoising(vb, &ucfg, ip).map(|_| ())
    })?;
    insert_prefixed(&mut out, "denoising_unet.", den);

    // Pose guider.
    let pg = match &src.controlnet {
        Some(path) => {
            let path = &controlnet_file(path)?;
            let all = crate::weights::load(path, &Device::Cpu)?;
            let mut pg: HashMap<String, Tensor> = all
                .into_iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("controlnet_cond_embedding.")
                        .map(|s| (s.to_string(), v))
                })
                .collect();
            if pg.is_empty() {
                return Err(Error::weights(
                    path,
                    "no controlnet_cond_embedding.* tensors (is this a ControlNet checkpoint?)",
                ));
            }
            // The seg ControlNet's embedding is MCLD's pose guider with cond_chan 3. As train.py
            // (load_state_dict(strict=False) without conv_out), what the ControlNet does not
            // hold in the right shape stays freshly initialised: conv_out zero, and `conv_in1`
            // for another cond_chan.
            cfg.pose_guider = pose_guider::Config {
                conditioning_channels: src.cond_chan,
                ..pose_guider::Config::mcld(ucfg.block_out_channels[0])
            };
            // Its own generator: the other fresh tensors draw as they did before.
            let mut pg_rng = StdRng::seed_from_u64(src.seed ^ 0x706F_7365);
            let fresh_pg = fresh_pose_guider(&cfg.pose_guider, &mut pg_rng)?;
            let mut used = HashMap::new();
            for (k, t) in fresh_pg {
                match pg.remove(&k) {
                    Some(w) if !k.starts_with("conv_out.") && w.dims() == t.dims() => {
                        used.insert(k, w);
                    }
                    Some(w) if !k.starts_with("conv_out.") => {
                        return Err(Error::weights(
                            path,
                            format!(
                                "controlnet_cond_embedding.{k} has shape {:?}, the pose guider \
                                 wants {:?}",
                                w.dims(),
                                t.dims()
                            ),
                        ));
                    }
                    Some(_) => {
                        used.insert(k, t);
                    }
                    None => {
                        fresh.push(format!("pose_guider.{k}"));
                        used.insert(k, t);
                    }
                }
            }
            used
        }
        None => {
            cfg.pose_guider = pose_guider::Config::class_default(ucfg.block_out_channels[0]);
            let t = fresh_pose_guider(&cfg.pose_guider, &mut rng)?;
            fresh.extend(t.keys().map(|k| format!("pose_guider.{k}")));
            t
        }
    };
    insert_prefixed(&mut out, "pose_guider.", pg);

    let proj = fresh_projector(&cfg.image_proj, &mut rng)?;
    fresh.extend(proj.keys().map(|k| format!("image_proj.{k}")));
    insert_prefixed(&mut out, "image_proj.", proj);
    fresh.sort();
    Ok(InitialWeights {
        cfg,
        tensors: out,
        fresh,
    })
}
