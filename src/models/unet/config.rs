//! The UNet's `config.json` (diffusers' `UNet2DConditionModel` keys, diffusers' defaults) and
//! its validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A value diffusers accepts either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    pub(crate) fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i],
        }
    }
    fn check_len(&self, key: &str, n: usize) -> Result<()> {
        match self {
            PerBlock::Many(v) if v.len() != n => Err(Error::msg(format!(
                "UNet config: {key} has {} entries, block_out_channels has {n}",
                v.len()
            ))),
            _ => Ok(()),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_three() -> usize {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock {
    PerBlock::One(2)
}
fn d_tlayers() -> PerBlock {
    PerBlock::One(1)
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// The keys of diffusers' `UNet2DConditionModel` `config.json` this model uses (others are
/// ignored), with diffusers' defaults. `attention_head_dim` is the head COUNT in SD-1.x
/// configs, as diffusers interprets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Accepted for completeness: attention scores are always taken in f32 here.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

impl Config {
    /// Parses a diffusers `config.json` and validates it; errors name the file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Config = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not a UNet2DConditionModel config: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::config(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Head count of block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub(crate) fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// Rejects configs this implementation cannot honour and inconsistent widths, naming the
    /// key and the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("UNet config: {m}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("down_block_types: unsupported block {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("up_block_types: unsupported block {t:?}"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return bad(format!(
                "mid_block_type {:?} unsupported (only UNetMidBlock2DCrossAttn)",
                self.mid_block_type
            ));
        }
        self.layers_per_block.check_len("layers_per_block", n)?;
        self.transformer_layers_per_block
            .check_len("transformer_layers_per_block", n)?;
        self.attention_head_dim.check_len("attention_head_dim", n)?;
        if let Some(h) = &self.num_attention_heads {
            h.check_len("num_attention_heads", n)?;
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return bad("norm_num_groups is 0".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % g != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups = {g}"
                ));
            }
            let h = self.heads(i);
            let key = if self.num_attention_heads.is_some() {
                "num_attention_heads"
            } else {
                "attention_head_dim"
            };
            if h == 0 || c % h != 0 {
                return bad(format!(
                    "{key} = {h} (head count) does not divide block_out_channels[{i}] = {c}"
                ));
            }
        }
        match &self.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(v) if v.iter().all(|x| x == false) => {}
            v => return bad(format!("only_cross_attention = {v} is not supported")),
        }
        if self.dual_cross_attention {
            return bad("dual_cross_attention = true is not supported".into());
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "act_fn = {:?} is not supported (silu)",
                self.act_fn
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return bad(format!(
                "resnet_time_scale_shift = {:?} is not supported (default)",
                self.resnet_time_scale_shift
            ));
        }
        if self.time_embedding_type != "positional" {
            return bad(format!(
                "time_embedding_type = {:?} is not supported (positional)",
                self.time_embedding_type
            ));
        }
        for (key, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
        ] {
            if set {
                return bad(format!("{key} is set; only null is supported"));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad(format!(
                "conv_in_kernel = {} / conv_out_kernel = {} must be odd",
                self.conv_in_kernel, self.conv_out_kernel
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.cross_attention_dim == 0 {
            return bad(
                "in_channels, out_channels and cross_attention_dim must be positive".into(),
            );
        }
        Ok(())
    }
}
