//! DensePose feature path: the Panoptic-FPN style decoder and the DeepLab / V1ConvX heads.

use candle_core::{Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};

use super::config::Config;
use super::predictor::upsample_bilinear_by;
use super::resnet::ConvBn;
use crate::{Error, Result};

/// Sums per-level conv(+x2 bilinear) towers of p2..p5 at stride 4, then a 1x1 predictor.
#[derive(Debug, Clone)]
pub struct Decoder {
    towers: Vec<Vec<(ConvBn, bool)>>,
    predictor: ConvBn,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &Config, levels: &[u32]) -> Result<Self> {
        let dp = &cfg.model.roi_densepose_head;
        let cin = cfg.model.fpn.out_channels;
        let common = dp.decoder_common_stride;
        if !common.is_power_of_two() {
            return Err(Error::msg("DECODER_COMMON_STRIDE must be a power of two"));
        }
        let common_log = common.trailing_zeros() as i64;
        let mut towers = Vec::new();
        for &l in levels {
            let n = (l as i64 - common_log).max(1) as usize;
            let up = (1usize << l) != common;
            let mut ops = Vec::new();
            for k in 0..n {
                let ci = if k == 0 { cin } else { dp.decoder_conv_dims };
                // Module indices skip the Upsample entries of the nn.Sequential.
                let idx = if up { 2 * k } else { k };
                let conv = ConvBn::new(
                    vb.pp(format!("p{l}.{idx}")),
                    ci,
                    dp.decoder_conv_dims,
                    3,
                    1,
                    1,
                    1,
                    1,
                    true,
                    false,
                )?;
                ops.push((conv, up));
            }
            towers.push(ops);
        }
        let predictor = ConvBn::new(
            vb.pp("predictor"),
            dp.decoder_conv_dims,
            dp.decoder_num_classes,
            1,
            1,
            0,
            1,
            1,
            true,
            false,
        )?;
        Ok(Self { towers, predictor })
    }

    /// `feats`: p2..p5 as `[1, C, H, W]`.
    pub fn forward(&self, feats: &[Tensor]) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for (tower, f) in self.towers.iter().zip(feats) {
            let mut x = f.clone();
            for (conv, up) in tower {
                x = conv.forward(&x)?.relu()?;
                if *up {
                    x = upsample_bilinear_by(&x, 2)?;
                }
            }
            acc = Some(match acc {
                None => x,
                Some(a) => (a + x)?,
            });
        }
        let acc = acc.ok_or_else(|| Error::msg("decoder got no feature levels"))?;
        Ok(self.predictor.forward(&acc)?)
    }
}

/// Conv (no bias) + GroupNorm(32) + ReLU.
#[derive(Debug, Clone)]
struct ConvGn {
    conv: ConvBn,
    gn: GroupNorm,
}

impl ConvGn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.gn.forward(&self.conv.forward(x)?)?.relu()
    }
}

#[derive(Debug, Clone)]
struct Aspp {
    branches: Vec<ConvGn>,
    pooling: ConvGn,
    project: ConvBn,
}

impl Aspp {
    fn new(vb: VarBuilder, cin: usize, cout: usize, rates: [usize; 3]) -> Result<Self> {
        let gn = |vb: VarBuilder| candle_nn::group_norm(32, cout, 1e-5, vb);
        let mut branches = vec![ConvGn {
            conv: ConvBn::new(vb.pp("convs.0.0"), cin, cout, 1, 1, 0, 1, 1, false, false)?,
            gn: gn(vb.pp("convs.0.1"))?,
        }];
        for (i, r) in rates.iter().enumerate() {
            branches.push(ConvGn {
                conv: ConvBn::new(
                    vb.pp(format!("convs.{}.0", i + 1)),
                    cin,
                    cout,
                    3,
                    1,
                    *r,
                    *r,
                    1,
                    false,
                    false,
                )?,
                gn: gn(vb.pp(format!("convs.{}.1", i + 1)))?,
            });
        }
        let pooling = ConvGn {
            conv: ConvBn::new(vb.pp("convs.4.1"), cin, cout, 1, 1, 0, 1, 1, false, false)?,
            gn: gn(vb.pp("convs.4.2"))?,
        };
        let project = ConvBn::new(
            vb.pp("project.0"),
            5 * cout,
            cout,
            1,
            1,
            0,
            1,
            1,
            false,
            false,
        )?;
        Ok(Self {
            branches,
            pooling,
            project,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut outs = Vec::new();
        for b in &self.branches {
            outs.push(b.forward(x)?);
        }
        let pooled = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let p = self.pooling.forward(&pooled)?;
        // Bilinear from 1x1 is a broadcast.
        let (n, c, _, _) = p.dims4()?;
        outs.push(p.broadcast_as((n, c, h, w))?.contiguous()?);
        let cat = Tensor::cat(&outs, 1)?;
        Ok(self.project.forward(&cat)?.relu()?)
    }
}

/// DensePose's embedded-Gaussian non-local block (2D, sub-sampled, GN on the output conv).
/// Not covered by a fixture: the published DL configs leave `NONLOCAL_ON` at 0.
#[derive(Debug, Clone)]
struct NonLocal {
    g: ConvBn,
    theta: ConvBn,
    phi: ConvBn,
    w: ConvBn,
    w_norm: GroupNorm,
    inter: usize,
}

impl NonLocal {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let inter = (c / 2).max(1);
        let conv =
            |vb: VarBuilder, i: usize, o: usize| ConvBn::new(vb, i, o, 1, 1, 0, 1, 1, true, false);
        Ok(Self {
            g: conv(vb.pp("g.0"), c, inter)?,
            theta: conv(vb.pp("theta"), c, inter)?,
            phi: conv(vb.pp("phi.0"), c, inter)?,
            w: conv(vb.pp("W.0"), inter, c)?,
            w_norm: candle_nn::group_norm(32, c, 1e-5, vb.pp("W.1"))?,
            inter,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let g = self.g.forward(x)?.max_pool2d(2)?;
        let phi = self.phi.forward(x)?.max_pool2d(2)?;
        let g = g
            .reshape((b, self.inter, ()))?
            .transpose(1, 2)?
            .contiguous()?;
        let theta = self
            .theta
            .forward(x)?
            .reshape((b, self.inter, ()))?
            .transpose(1, 2)?
            .contiguous()?;
        let phi = phi.reshape((b, self.inter, ()))?.contiguous()?;
        let f = candle_nn::ops::softmax_last_dim(&theta.matmul(&phi)?)?;
        let y = f
            .matmul(&g)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, self.inter, h, w))?;
        let wy = self.w_norm.forward(&self.w.forward(&y)?)?;
        Ok((wy + x)?)
    }
}

/// `DensePoseDeepLabHead` (ASPP 6/12/56, optional non-local, stacked conv/GN/ReLU) or
/// `DensePoseV1ConvXHead`.
#[derive(Debug, Clone)]
pub struct DensePoseHead {
    aspp: Option<Aspp>,
    nonlocal: Option<NonLocal>,
    convs: Vec<(ConvBn, Option<GroupNorm>)>,
}

impl DensePoseHead {
    pub fn new(vb: VarBuilder, cfg: &Config, cin: usize) -> Result<Self> {
        let dp = &cfg.model.roi_densepose_head;
        let k = dp.conv_head_kernel;
        let hidden = dp.conv_head_dim;
        let deeplab = match dp.name.as_str() {
            "DensePoseDeepLabHead" => true,
            "DensePoseV1ConvXHead" => false,
            n => return Err(Error::msg(format!("DensePose head {n:?} is not supported"))),
        };
        let gn = deeplab && dp.deeplab.norm == "GN";
        if deeplab && !gn && !dp.deeplab.norm.is_empty() {
            return Err(Error::msg(format!(
                "ROI_DENSEPOSE_HEAD.DEEPLAB.NORM {:?} is not GN or empty",
                dp.deeplab.norm
            )));
        }
        let aspp = if deeplab {
            Some(Aspp::new(vb.pp("ASPP"), cin, cin, [6, 12, 56])?)
        } else {
            None
        };
        let nonlocal = if deeplab && dp.deeplab.nonlocal_on != 0 {
            Some(NonLocal::new(vb.pp("NLBlock"), cin)?)
        } else {
            None
        };
        let mut convs = Vec::new();
        let mut c = cin;
        for i in 0..dp.num_stacked_convs {
            let lvb = vb.pp(format!("body_conv_fcn{}", i + 1));
            let conv = ConvBn::new(lvb.clone(), c, hidden, k, 1, k / 2, 1, 1, !gn, false)?;
            let norm = if gn {
                Some(candle_nn::group_norm(32, hidden, 1e-5, lvb.pp("norm"))?)
            } else {
                None
            };
            convs.push((conv, norm));
            c = hidden;
        }
        Ok(Self {
            aspp,
            nonlocal,
            convs,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = match &self.aspp {
            Some(a) => a.forward(x)?,
            None => x.clone(),
        };
        if let Some(nl) = &self.nonlocal {
            x = nl.forward(&x)?;
        }
        for (conv, norm) in &self.convs {
            x = conv.forward(&x)?;
            if let Some(n) = norm {
                x = n.forward(&x)?;
            }
            x = x.relu()?;
        }
        Ok(x)
    }
}
