//! The down, mid and up blocks of the SD UNet (with or without cross-attention).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::{RunCtx, Transformer2D, TransformerSpec};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::Result;

/// Settings every block shares.
pub struct BlockCommon {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        name: &str,
        cin: usize,
        cout: usize,
        layers: usize,
        common: &BlockCommon,
        attn: Option<&TransformerSpec>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let c_in = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(i.to_string()),
                c_in,
                cout,
                common.temb,
                common.groups,
                common.eps,
                common.output_scale_factor,
            )?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(
                    vb.pp("attentions").pp(i.to_string()),
                    &format!("{name}.attentions.{i}"),
                    spec,
                )?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, p)?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the skip states it contributes, in order.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        run: &mut RunCtx,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, ctx, run)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        ch: usize,
        common: &BlockCommon,
        spec: &TransformerSpec,
        num_layers: usize,
    ) -> Result<Self> {
        let res = |i: usize| {
            ResnetBlock2D::new(
                vb.pp("resnets").pp(i.to_string()),
                ch,
                ch,
                common.temb,
                common.groups,
                common.eps,
                common.output_scale_factor,
            )
        };
        let first = res(0)?;
        let layers = (0..num_layers)
            .map(|i| {
                Ok((
                    Transformer2D::new(
                        vb.pp("attentions").pp(i.to_string()),
                        &format!("mid_block.attentions.{i}"),
                        spec,
                    )?,
                    res(i + 1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        run: &mut RunCtx,
    ) -> Result<Tensor> {
        let mut h = self.first.forward(x, temb)?;
        for (a, r) in &self.layers {
            h = a.forward(&h, ctx, run)?;
            h = r.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        name: &str,
        cin: usize,
        prev_out: usize,
        cout: usize,
        layers: usize,
        common: &BlockCommon,
        attn: Option<&TransformerSpec>,
        upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let res_in = if i == 0 { prev_out } else { cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(i.to_string()),
                res_in + skip,
                cout,
                common.temb,
                common.groups,
                common.eps,
                common.output_scale_factor,
            )?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(
                    vb.pp("attentions").pp(i.to_string()),
                    &format!("{name}.attentions.{i}"),
                    spec,
                )?);
            }
        }
        let upsampler = if upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end; `up_size` is the spatial size to upsample to.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        run: &mut RunCtx,
        up_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let s = skips
                .pop()
                .ok_or_else(|| crate::Error::msg("UNet up block ran out of skip connections"))?;
            h = r.forward(&Tensor::cat(&[&h, &s], 1)?, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, ctx, run)?;
            }
        }
        if let Some(u) = &self.upsampler {
            let (_, _, hh, ww) = h.dims4()?;
            h = u.forward(&h, up_size.unwrap_or((2 * hh, 2 * ww)))?;
        }
        Ok(h)
    }
}
