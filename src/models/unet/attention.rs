//! Transformer2DModel / BasicTransformerBlock / Attention, with MCLD's two additions as plain
//! arguments: the reference bank (self-attention keys/values extended by the reference UNet's
//! states) and IP-adapter cross-attention on the trailing face tokens.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::conv::Conv2d;

use super::resnet::conv;
use super::{BankMode, ReferenceBank};
use crate::models::layers::{group_norm, layer_norm};
use crate::models::layers::{linear, linear_no_bias};
use crate::ops::attention::{attention_bf16, merge_heads, split_heads};
use crate::ops::linear::Linear;
use crate::ops::norm::{GroupNorm, LayerNorm};
use crate::{Error, Result};

/// IP-adapter settings of a denoising UNet's cross-attentions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IpAdapter {
    /// How many trailing context tokens are face tokens.
    pub num_tokens: usize,
    /// Weight of the face attention in the sum.
    #[serde(default = "IpAdapter::default_scale")]
    pub scale: f64,
}

impl IpAdapter {
    /// The face-attention weight MCLD trains and samples with.
    pub const MCLD_SCALE: f64 = 0.5;

    fn default_scale() -> f64 {
        Self::MCLD_SCALE
    }

    /// MCLD's adapter for a projector producing `num_tokens` face tokens.
    pub fn mcld(num_tokens: usize) -> Self {
        Self {
            num_tokens,
            scale: Self::MCLD_SCALE,
        }
    }
}

/// What a forward pass does with the self-attention inputs; threaded through explicitly so the
/// model itself holds no state between calls.
pub(crate) struct RunCtx<'a> {
    /// Reference role: collects the norm1 output of each transformer block.
    pub record: Option<&'a mut Vec<(String, Tensor)>>,
    /// Denoising role: the bank to read, and how.
    pub bank: Option<(&'a ReferenceBank, BankMode<'a>)>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    ip: Option<(Linear, Linear, IpAdapter)>,
    heads: usize,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        ip: Option<IpAdapter>,
    ) -> Result<Self> {
        let ip = match ip {
            Some(cfg) => {
                let p = vb.pp("processor");
                Some((
                    linear_no_bias(ctx_dim, dim, p.pp("to_k_ip"))?,
                    linear_no_bias(ctx_dim, dim, p.pp("to_v_ip"))?,
                    cfg,
                ))
            }
            None => None,
        };
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out").pp("0"))?,
            ip,
            heads,
        })
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let h = self.heads;
        let o = attention_bf16(
            &split_heads(q, h)?,
            &split_heads(k, h)?,
            &split_heads(v, h)?,
            self.to_q.is_bf16_mixed(),
        )?;
        Ok(merge_heads(&o)?)
    }

    /// Attention of `x` over `kv` (before projections), without the output projection.
    fn core(&self, x: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        self.attend(&q, &self.to_k.forward(kv)?, &self.to_v.forward(kv)?)
    }

    /// Self-attention; `extra` (same batch as `x`) is appended to the keys/values.
    pub fn self_attn(&self, x: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let o = match extra {
            None => self.core(x, x)?,
            Some(e) => self.core(x, &Tensor::cat(&[x, e], 1)?)?,
        };
        Ok(self.to_out.forward(&o)?)
    }

    /// Cross-attention; with IP weights, the last `num_tokens` context tokens are attended
    /// separately through `to_k_ip`/`to_v_ip` and added with `scale`.
    pub fn cross_attn(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let o = match &self.ip {
            None => self.core(x, ctx)?,
            Some((k_ip, v_ip, cfg)) => {
                let t = ctx.dim(1)?;
                if t <= cfg.num_tokens {
                    return Err(Error::msg(format!(
                        "IP cross-attention: context has {t} tokens, needs more than the {} face tokens",
                        cfg.num_tokens
                    )));
                }
                let rest = ctx.narrow(1, 0, t - cfg.num_tokens)?;
                let face = ctx.narrow(1, t - cfg.num_tokens, cfg.num_tokens)?;
                let q = self.to_q.forward(x)?;
                let main =
                    self.attend(&q, &self.to_k.forward(&rest)?, &self.to_v.forward(&rest)?)?;
                let ip = self.attend(&q, &k_ip.forward(&face)?, &v_ip.forward(&face)?)?;
                (main + (ip * cfg.scale)?)?
            }
        };
        Ok(self.to_out.forward(&o)?)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`), exact (erf) GELU as torch's default.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        // With gradient tracking: the custom op with its own backward pass.
        let fused = if h.track_op() && crate::ops::train_ops_enabled() {
            match crate::ops::geglu_grad::geglu(&h)? {
                Some(y) => Some(y),
                // CUDA tensors (builds with the `cuda` feature only).
                None => crate::ops::cuda::geglu::geglu(&h)?,
            }
        } else {
            crate::ops::geglu::geglu(&h)?
        };
        if let Some(y) = fused {
            return Ok(self.out.forward(&y)?);
        }
        let inner = h.dim(candle_core::D::Minus1)? / 2;
        let a = h.narrow(candle_core::D::Minus1, 0, inner)?;
        let gate = h.narrow(candle_core::D::Minus1, inner, inner)?;
        Ok(self.out.forward(&(a * gate.gelu_erf()?)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    /// Full module name, the key of this block's bank entry.
    name: String,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        name: String,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        ip: Option<IpAdapter>,
    ) -> Result<Self> {
        Ok(Self {
            name,
            norm1: layer_norm(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, None)?,
            norm2: layer_norm(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx_dim, heads, ip)?,
            norm3: layer_norm(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, run: &mut RunCtx) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        if let Some(rec) = run.record.as_deref_mut() {
            rec.push((self.name.clone(), n.clone()));
        }
        let a = match run.bank {
            None => self.attn1.self_attn(&n, None)?,
            Some((bank, mode)) => self.read_bank(&n, bank, mode)?,
        };
        let x = (x + a)?;
        let x = (&x + self.attn2.cross_attn(&self.norm2.forward(&x)?, ctx)?)?;
        Ok((&x + self.ff.forward(&self.norm3.forward(&x)?)?)?)
    }

    /// Reference attention: samples whose `mode.ignore` flag is false attend to [own, bank];
    /// the others (the unconditional CFG half, dropped references) use plain self-attention.
    fn read_bank(&self, n: &Tensor, bank: &ReferenceBank, mode: BankMode) -> Result<Tensor> {
        let b = n.dim(0)?;
        let entry = bank.get(&self.name).ok_or_else(|| {
            Error::msg(format!(
                "reference bank has no entry for block {}",
                self.name
            ))
        })?;
        if mode.ignore.len() != b {
            return Err(Error::msg(format!(
                "reference attention: {} bank flags for a batch of {b}",
                mode.ignore.len()
            )));
        }
        let (bb, bt, bc) = entry.dims3()?;
        if bc != n.dim(2)? {
            return Err(Error::msg(format!(
                "reference bank entry {} has {bc} channels, the block has {}",
                self.name,
                n.dim(2)?
            )));
        }
        let reads: Vec<u32> = (0..b as u32)
            .filter(|&i| !mode.ignore[i as usize])
            .collect();
        let reading = reads.len();
        if reading == 0 {
            return self.attn1.self_attn(n, None);
        }
        // A leading run of ignoring samples (CFG's [uncond, cond]) is a slice; any other mask
        // gathers the reading samples and scatters the results back.
        let plain = mode.ignore.iter().take_while(|&&x| x).count();
        let leading = plain + reading == b;
        let gather = |t: &Tensor, idx: &[u32]| -> Result<Tensor> {
            let i = Tensor::from_vec(idx.to_vec(), idx.len(), t.device())?;
            Ok(t.index_select(&i, 0)?)
        };
        let entry = if bb == b {
            if leading {
                entry.narrow(0, plain, reading)?
            } else {
                gather(entry, &reads)?
            }
        } else if bb == reading {
            entry.clone()
        } else if bb == 1 {
            entry.broadcast_as((reading, bt, bc))?.contiguous()?
        } else {
            return Err(Error::msg(format!(
                "reference bank entry {} has batch {bb}; expected {b}, {reading} or 1",
                self.name
            )));
        };
        let entry = if mode.fp16_round {
            entry.to_dtype(DType::F16)?.to_dtype(n.dtype())?
        } else {
            entry.to_dtype(n.dtype())?
        };
        if leading {
            let own = n.narrow(0, plain, reading)?;
            let read = self.attn1.self_attn(&own, Some(&entry))?;
            if plain == 0 {
                return Ok(read);
            }
            let plain = self.attn1.self_attn(&n.narrow(0, 0, plain)?, None)?;
            return Ok(Tensor::cat(&[plain, read], 0)?);
        }
        let ignores: Vec<u32> = (0..b as u32).filter(|&i| mode.ignore[i as usize]).collect();
        let read = self.attn1.self_attn(&gather(n, &reads)?, Some(&entry))?;
        let plain = self.attn1.self_attn(&gather(n, &ignores)?, None)?;
        // Row i of [plain, read] is sample order[i]; invert that to restore the batch order.
        let mut back = vec![0u32; b];
        for (row, &s) in ignores.iter().chain(&reads).enumerate() {
            back[s as usize] = row as u32;
        }
        gather(&Tensor::cat(&[plain, read], 0)?, &back)
    }
}

/// `Transformer2DModel` (continuous input): GroupNorm(eps 1e-6), proj_in, blocks, proj_out,
/// residual.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub ctx_dim: usize,
    pub groups: usize,
    pub layers: usize,
    pub linear_proj: bool,
    pub ip: Option<IpAdapter>,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, name: &str, s: &TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let proj = |vb: VarBuilder| -> Result<Proj> {
            Ok(if s.linear_proj {
                Proj::Linear(linear(c, c, vb)?)
            } else {
                Proj::Conv(conv(vb, c, c, 1, 1)?)
            })
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    format!("{name}.transformer_blocks.{i}"),
                    c,
                    s.ctx_dim,
                    s.heads,
                    s.ip,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(s.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj(vb.pp("proj_in"))?,
            blocks,
            proj_out: proj(vb.pp("proj_out"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, ctx: &Tensor, run: &mut RunCtx) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let to_map = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(p) => to_tokens(p.forward(&n)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(n)?)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx, run)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_map(t)?)?,
            Proj::Linear(p) => to_map(p.forward(&t)?)?,
        };
        Ok((out + x)?)
    }
}
