//! The face projector ("image_proj_model"): IP-Adapter's Perceiver resampler, turning one
//! ArcFace embedding into `num_queries` tokens for the decoupled cross-attention.

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::nn::{attention, merge_heads, split_heads, LayerNorm};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    pub embedding_dim: usize,
    pub output_dim: usize,
    #[serde(default = "four")]
    pub ff_mult: usize,
}

fn four() -> usize {
    4
}

impl Config {
    /// MCLD's: width 1280, 4 layers, 20 heads of 64, 16 queries, 512 -> 768.
    pub fn mcld() -> Self {
        Self {
            dim: 1280,
            depth: 4,
            dim_head: 64,
            heads: 20,
            num_queries: 16,
            embedding_dim: 512,
            output_dim: 768,
            ff_mult: 4,
        }
    }
}

const LN_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
}

impl PerceiverAttention {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let inner = cfg.dim_head * cfg.heads;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), cfg.dim, LN_EPS)?,
            norm2: LayerNorm::new(vb.pp("norm2"), cfg.dim, LN_EPS)?,
            to_q: candle_nn::linear_no_bias(cfg.dim, inner, vb.pp("to_q"))?,
            to_kv: candle_nn::linear_no_bias(cfg.dim, 2 * inner, vb.pp("to_kv"))?,
            to_out: candle_nn::linear_no_bias(inner, cfg.dim, vb.pp("to_out"))?,
            heads: cfg.heads,
        })
    }

    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let l = self.norm2.forward(latents)?;
        let q = self.to_q.forward(&l)?;
        // Keys and values see the features and the queries themselves.
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &l], 1)?)?;
        let inner = kv.dim(D::Minus1)? / 2;
        let k = kv.narrow(D::Minus1, 0, inner)?;
        let v = kv.narrow(D::Minus1, inner, inner)?;
        let o = attention(
            &split_heads(&q, self.heads)?,
            &split_heads(&k, self.heads)?,
            &split_heads(&v, self.heads)?,
        )?;
        Ok(self.to_out.forward(&merge_heads(&o)?)?)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let hidden = cfg.dim * cfg.ff_mult;
        Ok(Self {
            norm: LayerNorm::new(vb.pp("0"), cfg.dim, LN_EPS)?,
            up: candle_nn::linear_no_bias(cfg.dim, hidden, vb.pp("1"))?,
            down: candle_nn::linear_no_bias(hidden, cfg.dim, vb.pp("3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.up.forward(&self.norm.forward(x)?)?.gelu_erf()?;
        Ok(self.down.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    proj_out: Linear,
    norm_out: LayerNorm,
    embedding_dim: usize,
}

impl Resampler {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let latents = vb.get((1, cfg.num_queries, cfg.dim), "latents")?;
        let proj_in = candle_nn::linear(cfg.embedding_dim, cfg.dim, vb.pp("proj_in"))?;
        let layers = (0..cfg.depth)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                Ok((
                    PerceiverAttention::new(l.pp("0"), cfg)?,
                    FeedForward::new(l.pp("1"), cfg)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = candle_nn::linear(cfg.dim, cfg.output_dim, vb.pp("proj_out"))?;
        let norm_out = LayerNorm::new(vb.pp("norm_out"), cfg.output_dim, LN_EPS)?;
        Ok(Self {
            latents,
            proj_in,
            layers,
            proj_out,
            norm_out,
            embedding_dim: cfg.embedding_dim,
        })
    }

    /// `x`: (B, N, embedding_dim) face embeddings -> (B, num_queries, output_dim) face tokens.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, e) = x.dims3().map_err(|_| {
            Error::msg(format!(
                "face projector expects (B, N, {}), got shape {:?}",
                self.embedding_dim,
                x.dims()
            ))
        })?;
        if e != self.embedding_dim {
            return Err(Error::msg(format!(
                "face projector expects {}-d embeddings, got shape {:?}",
                self.embedding_dim,
                x.dims()
            )));
        }
        let x = self.proj_in.forward(x)?;
        let (_, q, d) = self.latents.dims3()?;
        let mut lat = self.latents.broadcast_as((b, q, d))?.contiguous()?;
        for (attn, ff) in &self.layers {
            lat = (attn.forward(&x, &lat)? + &lat)?;
            lat = (ff.forward(&lat)? + &lat)?;
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&lat)?)?)
    }
}
