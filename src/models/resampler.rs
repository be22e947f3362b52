//! MCLD's face projector (SPEC §3): the IP-Adapter-plus Perceiver resampler ("image_proj_model")
//! that turns an ArcFace embedding into face tokens for the decoupled cross-attention.
//!
//! LayerNorm and softmax come from `ops::norm` and `ops::attention` (built from primitives) because the projector is
//! trained and candle's fused versions drop gradients.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::models::layers::layer_norm;
use crate::models::layers::{linear, linear_no_bias};
use crate::ops::attention::{attention_bf16, merge_heads, split_heads};
use crate::ops::linear::Linear;
use crate::ops::norm::LayerNorm;
use crate::{Error, Result};

const LN_EPS: f64 = 1e-5;

/// `Resampler` constructor arguments; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    pub embedding_dim: usize,
    pub output_dim: usize,
    #[serde(default = "default_ff_mult")]
    pub ff_mult: usize,
    /// IP-Adapter options MCLD does not use; only their off values are accepted.
    #[serde(default)]
    pub apply_pos_emb: bool,
    #[serde(default)]
    pub num_latents_mean_pooled: usize,
}

fn default_ff_mult() -> usize {
    4
}

impl Config {
    /// The projector's shape read off its weights (the released file has no config): width and
    /// queries from `latents`, depth from the layer count, heads of 64 as IP-Adapter uses.
    /// `prefix` is prepended to every key; errors name `source`.
    pub fn from_weights(t: &HashMap<String, Tensor>, prefix: &str, source: &Path) -> Result<Self> {
        let dims = |k: &str| -> Result<Vec<usize>> {
            t.get(&format!("{prefix}{k}"))
                .map(|x| x.dims().to_vec())
                .ok_or_else(|| {
                    Error::weights(source, format!("face projector: tensor {k} missing"))
                })
        };
        let lat = dims("latents")?;
        let proj_in = dims("proj_in.weight")?;
        let proj_out = dims("proj_out.weight")?;
        let to_q = dims("layers.0.0.to_q.weight")?;
        let ff = dims("layers.0.1.1.weight")?;
        if lat.len() != 3 || proj_in.len() != 2 || proj_out.len() != 2 || to_q.len() != 2 {
            return Err(Error::weights(
                source,
                "face projector: unexpected tensor ranks",
            ));
        }
        if to_q[0] == 0 || lat[2] == 0 {
            return Err(Error::weights(source, "face projector: zero-width tensors"));
        }
        let depth = (0..)
            .take_while(|i| t.contains_key(&format!("{prefix}layers.{i}.0.to_q.weight")))
            .count();
        let dim_head = 64.min(to_q[0]);
        Ok(Self {
            dim: lat[2],
            depth,
            dim_head,
            heads: to_q[0] / dim_head,
            num_queries: lat[1],
            embedding_dim: proj_in[1],
            output_dim: proj_out[0],
            ff_mult: ff[0] / lat[2],
            apply_pos_emb: false,
            num_latents_mean_pooled: 0,
        })
    }
}

#[derive(Debug, Clone)]
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    inner: usize,
}

impl PerceiverAttention {
    fn new(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let inner = cfg.dim_head * cfg.heads;
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), cfg.dim, LN_EPS)?,
            norm2: layer_norm(vb.pp("norm2"), cfg.dim, LN_EPS)?,
            to_q: linear_no_bias(cfg.dim, inner, vb.pp("to_q"))?,
            to_kv: linear_no_bias(cfg.dim, 2 * inner, vb.pp("to_kv"))?,
            to_out: linear_no_bias(inner, cfg.dim, vb.pp("to_out"))?,
            heads: cfg.heads,
            inner,
        })
    }

    /// Queries from the latents; keys/values from [features, latents] so the queries also
    /// attend to each other.
    fn forward(&self, x: &Tensor, latents: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let l = self.norm2.forward(latents)?;
        let q = self.to_q.forward(&l)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &l], 1)?)?;
        let k = kv.narrow(D::Minus1, 0, self.inner)?;
        let v = kv.narrow(D::Minus1, self.inner, self.inner)?;
        let (q, k, v) = (
            split_heads(&q, self.heads)?,
            split_heads(&k, self.heads)?,
            split_heads(&v, self.heads)?,
        );
        let out = merge_heads(&attention_bf16(&q, &k, &v, self.to_q.is_bf16_mixed())?)?;
        self.to_out.forward(&out)
    }
}

/// LayerNorm, Linear(dim, dim * mult), exact GELU, Linear(dim * mult, dim); keys 0, 1, 3.
#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let hidden = cfg.dim * cfg.ff_mult;
        Ok(Self {
            norm: layer_norm(vb.pp("0"), cfg.dim, LN_EPS)?,
            fc1: linear_no_bias(cfg.dim, hidden, vb.pp("1"))?,
            fc2: linear_no_bias(hidden, cfg.dim, vb.pp("3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(&self.norm.forward(x)?)?.gelu_erf()?;
        self.fc2.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    proj_out: Linear,
    norm_out: LayerNorm,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    embedding_dim: usize,
}

impl Resampler {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if cfg.apply_pos_emb || cfg.num_latents_mean_pooled != 0 {
            return Err(Error::msg(
                "resampler: apply_pos_emb / num_latents_mean_pooled are not supported (MCLD uses neither)",
            ));
        }
        let build = || -> candle_core::Result<Self> {
            let latents = vb.get((1, cfg.num_queries, cfg.dim), "latents")?;
            let proj_in = linear(cfg.embedding_dim, cfg.dim, vb.pp("proj_in"))?;
            let proj_out = linear(cfg.dim, cfg.output_dim, vb.pp("proj_out"))?;
            let norm_out = layer_norm(vb.pp("norm_out"), cfg.output_dim, LN_EPS)?;
            let vbl = vb.pp("layers");
            let layers = (0..cfg.depth)
                .map(|i| {
                    let vbi = vbl.pp(i.to_string());
                    Ok((
                        PerceiverAttention::new(vbi.pp("0"), cfg)?,
                        FeedForward::new(vbi.pp("1"), cfg)?,
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Self {
                latents,
                proj_in,
                proj_out,
                norm_out,
                layers,
                embedding_dim: cfg.embedding_dim,
            })
        };
        build().map_err(|e| Error::msg(format!("resampler (image_proj_model): {e}")))
    }

    /// Face embeddings (B, N, embedding_dim), or (B, embedding_dim) taken as N = 1, to
    /// (B, num_queries, output_dim) face tokens.
    pub fn forward(&self, face_emb: &Tensor) -> Result<Tensor> {
        let x = match face_emb.dims() {
            [_, e] if *e == self.embedding_dim => face_emb.unsqueeze(1)?,
            [_, _, e] if *e == self.embedding_dim => face_emb.clone(),
            d => {
                return Err(Error::msg(format!(
                    "resampler: expected face embeddings of shape (B, 1, {}), got {d:?}",
                    self.embedding_dim
                )))
            }
        };
        let b = x.dim(0)?;
        let x = self.proj_in.forward(&x)?;
        let (_, q, d) = self.latents.dims3()?;
        let mut latents = self
            .latents
            .to_dtype(x.dtype())?
            .broadcast_as((b, q, d))?
            .contiguous()?;
        for (attn, ff) in &self.layers {
            latents = (attn.forward(&x, &latents)? + &latents)?;
            latents = (ff.forward(&latents)? + &latents)?;
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&latents)?)?)
    }
}
