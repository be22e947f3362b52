//! CLIP image encoder (transformers' `CLIPVisionModelWithProjection`) and the
//! `CLIPImageProcessor` preprocessing MCLD feeds it. Written here instead of reusing
//! candle-transformers' vision model because that one returns neither `last_hidden_state` nor
//! the projection, and silently invents a random class embedding when the key is missing.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::conv::Conv2d;
use serde::Deserialize;

use crate::imageops::{Filter, U8Image};
use crate::models::layers::layer_norm;
use crate::models::layers::{linear, linear_no_bias};
use crate::ops::attention::{attention_bf16, merge_heads, split_heads};
use crate::ops::linear::Linear;
use crate::ops::norm::LayerNorm;
use crate::{Error, Result};

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

/// The vision part of a transformers CLIP config. `from_json_str` accepts a
/// `CLIPVisionConfig` (image_encoder/config.json) or a full `CLIPConfig` with `vision_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl Config {
    /// CLIP ViT-L/14 with a 768-d projection (sd-image-variations' image encoder).
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&s).map_err(|e| Error::config(path, e.to_string()))
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let mut v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| Error::msg(e.to_string()))?;
        if let Some(vision) = v.get("vision_config").cloned() {
            let proj = v.get("projection_dim").cloned();
            v = vision;
            if let (Some(p), Some(obj)) = (proj, v.as_object_mut()) {
                obj.entry("projection_dim").or_insert(p);
            }
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| Error::msg(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::msg(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::msg(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::msg(format!(
                "hidden_act {:?} is not supported (quick_gelu, gelu)",
                self.hidden_act
            )));
        }
        Ok(())
    }

    fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: layer_norm(vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            q: linear(d, d, a.pp("q_proj"))?,
            k: linear(d, d, a.pp("k_proj"))?,
            v: linear(d, d, a.pp("v_proj"))?,
            out: linear(d, d, a.pp("out_proj"))?,
            ln2: layer_norm(vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: linear(d, i, vb.pp("mlp.fc1"))?,
            fc2: linear(i, d, vb.pp("mlp.fc2"))?,
            heads: c.num_attention_heads,
            quick_gelu: c.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let q = split_heads(&h.apply(&self.q)?, self.heads)?;
        let k = split_heads(&h.apply(&self.k)?, self.heads)?;
        let v = split_heads(&h.apply(&self.v)?, self.heads)?;
        let a =
            merge_heads(&attention_bf16(&q, &k, &v, self.q.is_bf16_mixed())?)?.apply(&self.out)?;
        let x = (x + a)?;
        let h = self.ln2.forward(&x)?.apply(&self.fc1)?;
        let h = if self.quick_gelu {
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            h.gelu_erf()?
        };
        Ok((x + h.apply(&self.fc2)?)?)
    }
}

/// Outputs of the vision model.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Encoder output before `post_layernorm`, (B, 1 + patches, hidden).
    pub last_hidden_state: Tensor,
    /// `visual_projection(post_layernorm(last_hidden_state[:, 0]))`, (B, projection_dim).
    pub image_embeds: Tensor,
}

#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    patch: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    projection: Linear,
    pub config: Config,
}

impl ClipVisionModelWithProjection {
    /// `vb` at the state dict's root (`vision_model.*`, `visual_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            patch: candle_nn::conv2d_no_bias(
                cfg.num_channels,
                d,
                cfg.patch_size,
                conv_cfg,
                emb.pp("patch_embedding"),
            )
            .map(Conv2d::from)?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((cfg.num_positions(), d), "position_embedding.weight")?,
            pre_ln: layer_norm(vm.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(vm.pp(format!("encoder.layers.{i}")), cfg))
                .collect::<Result<Vec<_>>>()?,
            post_ln: layer_norm(vm.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            projection: linear_no_bias(d, cfg.projection_dim, vb.pp("visual_projection"))?,
            config: cfg.clone(),
        })
    }

    /// Loads safetensors files (e.g. `image_encoder/model.safetensors`); errors name the file.
    pub fn load(files: &[&Path], cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let (vb, shown) = crate::weights::mmap_safetensors(files, dtype, device)?;
        Self::new(vb, cfg).map_err(|e| Error::weights(&shown, e.to_string()))
    }

    /// Normalised pixels (B, C, image_size, image_size) -> hidden states and image embeddings.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let c = &self.config;
        let dims = pixels.dims();
        if dims.len() != 4
            || dims[1] != c.num_channels
            || dims[2] != c.image_size
            || dims[3] != c.image_size
        {
            return Err(Error::msg(format!(
                "CLIP: pixel values must be (B, {}, {}, {}), got {dims:?}",
                c.num_channels, c.image_size, c.image_size
            )));
        }
        let b = dims[0];
        let patches = pixels
            .apply(&self.patch)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .expand((b, 1, c.hidden_size))?
            .to_dtype(patches.dtype())?;
        let mut x = Tensor::cat(&[cls, patches], 1)?
            .broadcast_add(&self.position_embedding)?
            .apply(&self.pre_ln)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        let pooled = self.post_ln.forward(&x.i((.., 0, ..))?)?;
        let image_embeds = pooled.apply(&self.projection)?;
        Ok(VisionOutput {
            last_hidden_state: x,
            image_embeds,
        })
    }
}

/// `CLIPImageProcessor` settings (MCLD uses the defaults of sd-image-variations).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub shortest_edge: usize,
    pub crop_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Preprocess {
    // CLIP's published constants, kept digit for digit as transformers spells them.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop_size: 224,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl Preprocess {
    /// Shortest side to `shortest_edge` (long side `int(edge * long / short)`), Pillow bicubic.
    pub fn resize(&self, img: &U8Image) -> Result<U8Image> {
        if img.channels != 3 {
            return Err(Error::msg(format!(
                "CLIP preprocessing expects an RGB image, got {} channels",
                img.channels
            )));
        }
        let (w, h) = (img.width, img.height);
        let short = w.min(h);
        let long = w.max(h);
        let s = self.shortest_edge;
        let new_long = (s as f64 * long as f64 / short as f64) as usize;
        let (nw, nh) = if w <= h { (s, new_long) } else { (new_long, s) };
        img.resize(nw, nh, Filter::Bicubic)
    }

    /// uint8 RGB image -> (3, crop, crop) f32 pixel values on `device`.
    pub fn apply(&self, img: &U8Image, device: &Device) -> Result<Tensor> {
        let r = self.resize(img)?;
        let cs = self.crop_size;
        if r.width < cs || r.height < cs {
            return Err(Error::msg(format!(
                "CLIP preprocessing: resized image {}x{} is smaller than the {cs} crop",
                r.width, r.height
            )));
        }
        let top = (r.height - cs) / 2;
        let left = (r.width - cs) / 2;
        let mut out = vec![0f32; 3 * cs * cs];
        for y in 0..cs {
            let row = &r.data[((top + y) * r.width + left) * 3..][..cs * 3];
            for (x, px) in row.chunks(3).enumerate() {
                for ch in 0..3 {
                    // transformers rescales in float64, casts to float32, then normalises.
                    let v = (px[ch] as f64 * (1.0 / 255.0)) as f32;
                    out[ch * cs * cs + y * cs + x] = (v - self.mean[ch]) / self.std[ch];
                }
            }
        }
        Ok(Tensor::from_vec(out, (3, cs, cs), device)?)
    }
}

/// Default CLIP preprocessing of an RGB image: (3, 224, 224) on the CPU.
pub fn preprocess(img: &U8Image) -> Result<Tensor> {
    Preprocess::default().apply(img, &Device::Cpu)
}
