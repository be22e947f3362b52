//! detectron2's ResNet (FrozenBN, optional STRIDE_IN_1X1) and FPN with the p6 max-pool level.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::Config;
use crate::ops::conv::conv2d_forward;
use crate::{Error, Result};

/// detectron2 `FrozenBatchNorm2d` at inference: a fixed per-channel affine.
#[derive(Debug, Clone)]
pub struct FrozenBn {
    scale: Tensor,
    shift: Tensor,
}

impl FrozenBn {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let w = vb.get(c, "weight")?;
        let b = vb.get(c, "bias")?;
        let mean = vb.get(c, "running_mean")?;
        let var = vb.get(c, "running_var")?;
        // Same order of operations as FrozenBatchNorm2d.forward.
        let scale = w.mul(&(var + 1e-5)?.sqrt()?.recip()?)?;
        let shift = b.sub(&mean.mul(&scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }
}

impl Module for FrozenBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

/// A detectron2 `Conv2d`: convolution with optional bias and a FrozenBN named `norm`.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bias: Option<Tensor>,
    /// `[Cout, Cin]` for 1x1 stride-1 convs, run as a plain matmul.
    pointwise: Option<Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
}

#[allow(clippy::too_many_arguments)]
impl ConvBn {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
        norm: bool,
    ) -> Result<Self> {
        if groups == 0 || !cin.is_multiple_of(groups) {
            return Err(Error::msg(format!(
                "conv {}: {cin} input channels do not split into {groups} groups",
                vb.prefix()
            )));
        }
        let weight = vb.get((cout, cin / groups, k, k), "weight")?;
        let bias = if bias {
            Some(vb.get(cout, "bias")?)
        } else {
            None
        };
        // FrozenBN is a per-output-channel affine: fold it into the kernel and bias.
        let (weight, bias) = if norm {
            let bn = FrozenBn::new(vb.pp("norm"), cout)?;
            let w = weight.broadcast_mul(&bn.scale.reshape((cout, 1, 1, 1))?)?;
            let shift = bn.shift.reshape(cout)?;
            let b = match bias {
                Some(b) => (b.mul(&bn.scale.reshape(cout)?)? + shift)?,
                None => shift,
            };
            (w, Some(b))
        } else {
            (weight, bias)
        };
        let pointwise = (k == 1 && padding == 0 && groups == 1 && stride == 1)
            .then(|| weight.reshape((cout, cin)))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            pointwise,
            stride,
            padding,
            dilation,
            groups,
        })
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.pointwise {
            Some(w) => {
                let (n, c, h, wd) = x.dims4()?;
                let flat = x.reshape((n, c, h * wd))?;
                w.broadcast_left(n)?
                    .matmul(&flat)?
                    .reshape((n, (), h, wd))?
            }
            None => {
                return conv2d_forward(
                    x,
                    &self.weight,
                    self.bias.as_ref(),
                    self.padding,
                    self.stride,
                    self.dilation,
                    self.groups,
                )
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone)]
enum Block {
    Bottleneck {
        conv1: ConvBn,
        conv2: ConvBn,
        conv3: ConvBn,
        shortcut: Option<ConvBn>,
    },
    Basic {
        conv1: ConvBn,
        conv2: ConvBn,
        shortcut: Option<ConvBn>,
    },
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (branch, shortcut) = match self {
            Block::Bottleneck {
                conv1,
                conv2,
                conv3,
                shortcut,
            } => {
                let y = conv1.forward(x)?.relu()?;
                let y = conv2.forward(&y)?.relu()?;
                (conv3.forward(&y)?, shortcut)
            }
            Block::Basic {
                conv1,
                conv2,
                shortcut,
            } => {
                let y = conv1.forward(x)?.relu()?;
                (conv2.forward(&y)?, shortcut)
            }
        };
        let sc = match shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        (branch + sc)?.relu()
    }
}

/// ResNet stem + res2..res5 (only as deep as the FPN needs).
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    pub out_channels: Vec<usize>,
}

impl ResNet {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let r = &cfg.model.resnets;
        let blocks: [usize; 4] = match r.depth {
            18 => [2, 2, 2, 2],
            34 | 50 => [3, 4, 6, 3],
            101 => [3, 4, 23, 3],
            152 => [3, 8, 36, 3],
            d => return Err(Error::msg(format!("ResNet depth {d} is not supported"))),
        };
        let basic = r.depth < 50;
        if r.norm != "FrozenBN" {
            return Err(Error::msg(format!(
                "MODEL.RESNETS.NORM {:?}: only FrozenBN is supported at inference",
                r.norm
            )));
        }
        let stem = ConvBn::new(
            vb.pp("stem.conv1"),
            3,
            r.stem_out_channels,
            7,
            2,
            3,
            1,
            1,
            false,
            true,
        )?;
        let mut in_ch = r.stem_out_channels;
        let mut out_ch = r.res2_out_channels;
        let mut bott = r.num_groups * r.width_per_group;
        let mut stages = Vec::new();
        let mut out_channels = Vec::new();
        for (si, &n) in blocks.iter().enumerate() {
            let stage_vb = vb.pp(format!("res{}", si + 2));
            let dilation = if si == 3 { r.res5_dilation } else { 1 };
            let first_stride = if si == 0 || dilation == 2 { 1 } else { 2 };
            let mut stage = Vec::new();
            for b in 0..n {
                let bvb = stage_vb.pp(b.to_string());
                let stride = if b == 0 { first_stride } else { 1 };
                let shortcut = if in_ch != out_ch {
                    Some(ConvBn::new(
                        bvb.pp("shortcut"),
                        in_ch,
                        out_ch,
                        1,
                        stride,
                        0,
                        1,
                        1,
                        false,
                        true,
                    )?)
                } else {
                    None
                };
                let block = if basic {
                    Block::Basic {
                        conv1: ConvBn::new(
                            bvb.pp("conv1"),
                            in_ch,
                            out_ch,
                            3,
                            stride,
                            1,
                            1,
                            1,
                            false,
                            true,
                        )?,
                        conv2: ConvBn::new(
                            bvb.pp("conv2"),
                            out_ch,
                            out_ch,
                            3,
                            1,
                            1,
                            1,
                            1,
                            false,
                            true,
                        )?,
                        shortcut,
                    }
                } else {
                    let (s1, s3) = if r.stride_in_1x1 {
                        (stride, 1)
                    } else {
                        (1, stride)
                    };
                    Block::Bottleneck {
                        conv1: ConvBn::new(
                            bvb.pp("conv1"),
                            in_ch,
                            bott,
                            1,
                            s1,
                            0,
                            1,
                            1,
                            false,
                            true,
                        )?,
                        conv2: ConvBn::new(
                            bvb.pp("conv2"),
                            bott,
                            bott,
                            3,
                            s3,
                            dilation,
                            dilation,
                            r.num_groups,
                            false,
                            true,
                        )?,
                        conv3: ConvBn::new(
                            bvb.pp("conv3"),
                            bott,
                            out_ch,
                            1,
                            1,
                            0,
                            1,
                            1,
                            false,
                            true,
                        )?,
                        shortcut,
                    }
                };
                stage.push(block);
                in_ch = out_ch;
            }
            stages.push(stage);
            out_channels.push(out_ch);
            out_ch *= 2;
            bott *= 2;
        }
        Ok(Self {
            stem,
            stages,
            out_channels,
        })
    }

    /// res2..res5 feature maps for a `[1, 3, H, W]` input.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(x)?.relu()?;
        // Zero padding equals -inf padding here: the input is post-ReLU.
        let x = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut x = x.max_pool2d_with_stride(3, 2)?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                x = b.forward(&x)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }
}

/// FPN over res2..res5 giving p2..p5, plus p6 = p5 subsampled by 2 (LastLevelMaxPool).
#[derive(Debug, Clone)]
pub struct Fpn {
    bottom_up: ResNet,
    lateral: Vec<ConvBn>,
    output: Vec<ConvBn>,
    avg_fuse: bool,
}

impl Fpn {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let bottom_up = ResNet::new(vb.pp("bottom_up"), cfg)?;
        let f = &cfg.model.fpn;
        let names = ["res2", "res3", "res4", "res5"];
        if f.in_features.len() != 4 || f.in_features.iter().zip(names).any(|(a, b)| a != b) {
            return Err(Error::msg(format!(
                "MODEL.FPN.IN_FEATURES {:?}: only res2..res5 is supported",
                f.in_features
            )));
        }
        let avg_fuse = match f.fuse_type.as_str() {
            "sum" => false,
            "avg" => true,
            t => {
                return Err(Error::msg(format!(
                    "MODEL.FPN.FUSE_TYPE {t:?} is not sum/avg"
                )))
            }
        };
        let mut lateral = Vec::new();
        let mut output = Vec::new();
        for (i, &cin) in bottom_up.out_channels.iter().enumerate() {
            let lvl = i + 2;
            lateral.push(ConvBn::new(
                vb.pp(format!("fpn_lateral{lvl}")),
                cin,
                f.out_channels,
                1,
                1,
                0,
                1,
                1,
                true,
                false,
            )?);
            output.push(ConvBn::new(
                vb.pp(format!("fpn_output{lvl}")),
                f.out_channels,
                f.out_channels,
                3,
                1,
                1,
                1,
                1,
                true,
                false,
            )?);
        }
        Ok(Self {
            bottom_up,
            lateral,
            output,
            avg_fuse,
        })
    }

    /// p2..p6 for a padded `[1, 3, H, W]` image (H, W multiples of 32).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let feats = self.bottom_up.forward(x)?;
        let mut prev = self.lateral[3].forward(&feats[3])?;
        let mut outs = vec![self.output[3].forward(&prev)?];
        for i in (0..3).rev() {
            let (_, _, h, w) = prev.dims4()?;
            let top_down = prev.upsample_nearest2d(h * 2, w * 2)?;
            let lat = self.lateral[i].forward(&feats[i])?;
            prev = (lat + top_down)?;
            if self.avg_fuse {
                prev = (prev / 2.0)?;
            }
            outs.insert(0, self.output[i].forward(&prev)?);
        }
        let p5 = &outs[3];
        let (_, _, h, w) = p5.dims4()?;
        let ih: Vec<u32> = (0..h).step_by(2).map(|v| v as u32).collect();
        let iw: Vec<u32> = (0..w).step_by(2).map(|v| v as u32).collect();
        let dev = p5.device();
        let p6 = p5
            .index_select(&Tensor::new(ih.as_slice(), dev)?, 2)?
            .index_select(&Tensor::new(iw.as_slice(), dev)?, 3)?;
        outs.push(p6);
        Ok(outs)
    }
}
