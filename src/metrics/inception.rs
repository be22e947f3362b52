//! Inception-V3 up to the 2048-d average pool, in two flavours sharing one set of blocks:
//!
//! * [`Flavor::Torchvision`]: torchvision's ImageNet network run as MCLD's FID extractor
//!   (bilinear resize to 299x299 without antialias, MCLD's per-channel affine);
//! * [`Flavor::PtInception`]: the TF-ported network pytorch-fid uses
//!   (`pt_inception-2015-12-05-6726825d.pth`): same resize, then `2x - 1`, and TF's pooling in
//!   the branch pools (average without the padded zeros; max in the last block).
//!
//! Weight names are torchvision's `Inception3` state dict (`Mixed_5b.branch1x1.conv.weight`,
//! `....bn.running_var`, ...), which the pytorch-fid file shares; `AuxLogits.*` and `fc.*`
//! are not needed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::ChwImage;
use crate::ops::conv::conv2d_forward;
use crate::{Error, Result};

/// BatchNorm epsilon of torchvision's BasicConv2d.
const BN_EPS: f64 = 1e-3;
/// Input side the network is run at.
pub const INPUT_SIZE: usize = 299;
/// ImageNet (mean, std) per RGB channel.
const IMAGENET: [(f64, f64); 3] = [(0.485, 0.229), (0.456, 0.224), (0.406, 0.225)];

/// conv (no bias) -> BatchNorm (eval) -> ReLU, with BN as the per-channel affine torch's CPU
/// kernel applies (`x * w/sqrt(var+eps) + (b - mean * w/sqrt(var+eps))`).
#[derive(Debug, Clone)]
struct BasicConv2d {
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl BasicConv2d {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let weight = vb.pp("conv").get((cout, cin, k.0, k.1), "weight")?;
        let bn = vb.pp("bn");
        let w = bn.get(cout, "weight")?;
        let b = bn.get(cout, "bias")?;
        let mean = bn.get(cout, "running_mean")?;
        let var = bn.get(cout, "running_var")?;
        let alpha = w.div(&(var + BN_EPS)?.sqrt()?)?;
        let shift = b.sub(&mean.mul(&alpha)?)?;
        Ok(Self {
            weight,
            scale: alpha.reshape((1, cout, 1, 1))?,
            shift: shift.reshape((1, cout, 1, 1))?,
            stride,
            pad,
        })
    }

    fn square(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::new(vb, cin, cout, (k, k), stride, (pad, pad))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.pad;
        let y = if ph == pw {
            conv2d_forward(x, &self.weight, None, ph, self.stride, 1, 1)?
        } else {
            let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            conv2d_forward(&x, &self.weight, None, 0, self.stride, 1, 1)?
        };
        Ok(y.broadcast_mul(&self.scale)?
            .broadcast_add(&self.shift)?
            .relu()?)
    }
}

/// Which network: the two differ only in input scaling and the branch pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// torchvision's ImageNet Inception-V3 as MCLD uses it (what the paper reports).
    #[default]
    Torchvision,
    /// pytorch-fid's TF port (the "standard" FID network of other papers).
    PtInception,
}

impl Flavor {
    /// The `--fid-backbone` name.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Torchvision => "torchvision",
            Flavor::PtInception => "pt_inception",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "torchvision" => Ok(Flavor::Torchvision),
            "pt_inception" => Ok(Flavor::PtInception),
            _ => Err(Error::msg(format!(
                "unknown FID backbone `{s}` (expected torchvision or pt_inception)"
            ))),
        }
    }

    /// Pool of the A/C/E blocks' `branch_pool`; `last_e` is `Mixed_7c`.
    fn branch_pool(self, last_e: bool) -> Pool {
        match (self, last_e) {
            (Flavor::Torchvision, _) => Pool::AvgWithPad,
            (Flavor::PtInception, false) => Pool::AvgWithoutPad,
            (Flavor::PtInception, true) => Pool::Max,
        }
    }
}

/// 3x3, stride 1, padding 1 pools of the branch_pool paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// torch's default `count_include_pad=True`.
    AvgWithPad,
    /// `count_include_pad=False`, as TF averages.
    AvgWithoutPad,
    /// `F.max_pool2d(x, 3, 1, padding=1)`.
    Max,
}

impl Pool {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Pool::AvgWithPad => {
                let x = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                Ok(x.avg_pool2d_with_stride(3, 1)?)
            }
            Pool::AvgWithoutPad => {
                let (_, _, h, w) = x.dims4()?;
                let avg = Pool::AvgWithPad.forward(x)?;
                // 9 / (number of real pixels under the window), per output position.
                let span =
                    |n: usize, i: usize| -> f32 { (i.min(1) + 1 + usize::from(i + 1 < n)) as f32 };
                let scale: Vec<f32> = (0..h)
                    .flat_map(|i| (0..w).map(move |j| 9.0 / (span(h, i) * span(w, j))))
                    .collect();
                let scale =
                    Tensor::from_vec(scale, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
                Ok(avg.broadcast_mul(&scale)?)
            }
            // Edge replication is exact for a max: the copies are already under the window
            // (torch pads with -inf, which never wins either).
            Pool::Max => {
                let x = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
                Ok(x.max_pool2d_with_stride(3, 1)?)
            }
        }
    }
}

fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

#[derive(Debug, Clone)]
struct InceptionA {
    b1x1: BasicConv2d,
    b5x5: [BasicConv2d; 2],
    b3x3dbl: [BasicConv2d; 3],
    pool: BasicConv2d,
    pool_kind: Pool,
}

impl InceptionA {
    fn new(vb: VarBuilder, cin: usize, pool_features: usize, pool_kind: Pool) -> Result<Self> {
        Ok(Self {
            pool_kind,
            b1x1: BasicConv2d::square(vb.pp("branch1x1"), cin, 64, 1, 1, 0)?,
            b5x5: [
                BasicConv2d::square(vb.pp("branch5x5_1"), cin, 48, 1, 1, 0)?,
                BasicConv2d::square(vb.pp("branch5x5_2"), 48, 64, 5, 1, 2)?,
            ],
            b3x3dbl: [
                BasicConv2d::square(vb.pp("branch3x3dbl_1"), cin, 64, 1, 1, 0)?,
                BasicConv2d::square(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                BasicConv2d::square(vb.pp("branch3x3dbl_3"), 96, 96, 3, 1, 1)?,
            ],
            pool: BasicConv2d::square(vb.pp("branch_pool"), cin, pool_features, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b5x5, x)?;
        let c = chain(&self.b3x3dbl, x)?;
        let d = self.pool.forward(&self.pool_kind.forward(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

fn chain(layers: &[BasicConv2d], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for l in layers {
        h = l.forward(&h)?;
    }
    Ok(h)
}

#[derive(Debug, Clone)]
struct InceptionB {
    b3x3: BasicConv2d,
    b3x3dbl: [BasicConv2d; 3],
}

impl InceptionB {
    fn new(vb: VarBuilder, cin: usize) -> Result<Self> {
        Ok(Self {
            b3x3: BasicConv2d::square(vb.pp("branch3x3"), cin, 384, 3, 2, 0)?,
            b3x3dbl: [
                BasicConv2d::square(vb.pp("branch3x3dbl_1"), cin, 64, 1, 1, 0)?,
                BasicConv2d::square(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                BasicConv2d::square(vb.pp("branch3x3dbl_3"), 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3.forward(x)?;
        let b = chain(&self.b3x3dbl, x)?;
        let c = max_pool_3x3_s2(x)?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

#[derive(Debug, Clone)]
struct InceptionC {
    b1x1: BasicConv2d,
    b7x7: [BasicConv2d; 3],
    b7x7dbl: [BasicConv2d; 5],
    pool: BasicConv2d,
    pool_kind: Pool,
}

impl InceptionC {
    fn new(vb: VarBuilder, cin: usize, c7: usize, pool_kind: Pool) -> Result<Self> {
        let row = |vb: VarBuilder, i, o| BasicConv2d::new(vb, i, o, (1, 7), 1, (0, 3));
        let col = |vb: VarBuilder, i, o| BasicConv2d::new(vb, i, o, (7, 1), 1, (3, 0));
        Ok(Self {
            pool_kind,
            b1x1: BasicConv2d::square(vb.pp("branch1x1"), cin, 192, 1, 1, 0)?,
            b7x7: [
                BasicConv2d::square(vb.pp("branch7x7_1"), cin, c7, 1, 1, 0)?,
                row(vb.pp("branch7x7_2"), c7, c7)?,
                col(vb.pp("branch7x7_3"), c7, 192)?,
            ],
            b7x7dbl: [
                BasicConv2d::square(vb.pp("branch7x7dbl_1"), cin, c7, 1, 1, 0)?,
                col(vb.pp("branch7x7dbl_2"), c7, c7)?,
                row(vb.pp("branch7x7dbl_3"), c7, c7)?,
                col(vb.pp("branch7x7dbl_4"), c7, c7)?,
                row(vb.pp("branch7x7dbl_5"), c7, 192)?,
            ],
            pool: BasicConv2d::square(vb.pp("branch_pool"), cin, 192, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b7x7, x)?;
        let c = chain(&self.b7x7dbl, x)?;
        let d = self.pool.forward(&self.pool_kind.forward(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

#[derive(Debug, Clone)]
struct InceptionD {
    b3x3: [BasicConv2d; 2],
    b7x7x3: [BasicConv2d; 4],
}

impl InceptionD {
    fn new(vb: VarBuilder, cin: usize) -> Result<Self> {
        Ok(Self {
            b3x3: [
                BasicConv2d::square(vb.pp("branch3x3_1"), cin, 192, 1, 1, 0)?,
                BasicConv2d::square(vb.pp("branch3x3_2"), 192, 320, 3, 2, 0)?,
            ],
            b7x7x3: [
                BasicConv2d::square(vb.pp("branch7x7x3_1"), cin, 192, 1, 1, 0)?,
                BasicConv2d::new(vb.pp("branch7x7x3_2"), 192, 192, (1, 7), 1, (0, 3))?,
                BasicConv2d::new(vb.pp("branch7x7x3_3"), 192, 192, (7, 1), 1, (3, 0))?,
                BasicConv2d::square(vb.pp("branch7x7x3_4"), 192, 192, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = chain(&self.b3x3, x)?;
        let b = chain(&self.b7x7x3, x)?;
        let c = max_pool_3x3_s2(x)?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

#[derive(Debug, Clone)]
struct InceptionE {
    b1x1: BasicConv2d,
    b3x3_1: BasicConv2d,
    b3x3_2a: BasicConv2d,
    b3x3_2b: BasicConv2d,
    b3x3dbl_1: BasicConv2d,
    b3x3dbl_2: BasicConv2d,
    b3x3dbl_3a: BasicConv2d,
    b3x3dbl_3b: BasicConv2d,
    pool: BasicConv2d,
    pool_kind: Pool,
}

impl InceptionE {
    fn new(vb: VarBuilder, cin: usize, pool_kind: Pool) -> Result<Self> {
        let row = |vb: VarBuilder, i, o| BasicConv2d::new(vb, i, o, (1, 3), 1, (0, 1));
        let col = |vb: VarBuilder, i, o| BasicConv2d::new(vb, i, o, (3, 1), 1, (1, 0));
        Ok(Self {
            pool_kind,
            b1x1: BasicConv2d::square(vb.pp("branch1x1"), cin, 320, 1, 1, 0)?,
            b3x3_1: BasicConv2d::square(vb.pp("branch3x3_1"), cin, 384, 1, 1, 0)?,
            b3x3_2a: row(vb.pp("branch3x3_2a"), 384, 384)?,
            b3x3_2b: col(vb.pp("branch3x3_2b"), 384, 384)?,
            b3x3dbl_1: BasicConv2d::square(vb.pp("branch3x3dbl_1"), cin, 448, 1, 1, 0)?,
            b3x3dbl_2: BasicConv2d::square(vb.pp("branch3x3dbl_2"), 448, 384, 3, 1, 1)?,
            b3x3dbl_3a: row(vb.pp("branch3x3dbl_3a"), 384, 384)?,
            b3x3dbl_3b: col(vb.pp("branch3x3dbl_3b"), 384, 384)?,
            pool: BasicConv2d::square(vb.pp("branch_pool"), cin, 192, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = self.b3x3_1.forward(x)?;
        let b = Tensor::cat(&[self.b3x3_2a.forward(&b)?, self.b3x3_2b.forward(&b)?], 1)?;
        let c = self.b3x3dbl_2.forward(&self.b3x3dbl_1.forward(x)?)?;
        let c = Tensor::cat(
            &[self.b3x3dbl_3a.forward(&c)?, self.b3x3dbl_3b.forward(&c)?],
            1,
        )?;
        let d = self.pool.forward(&self.pool_kind.forward(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

#[derive(Debug, Clone)]
enum Block {
    Conv(BasicConv2d),
    MaxPool,
    A(InceptionA),
    B(InceptionB),
    C(InceptionC),
    D(InceptionD),
    E(InceptionE),
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Block::Conv(c) => c.forward(x),
            Block::MaxPool => max_pool_3x3_s2(x),
            Block::A(b) => b.forward(x),
            Block::B(b) => b.forward(x),
            Block::C(b) => b.forward(x),
            Block::D(b) => b.forward(x),
            Block::E(b) => b.forward(x),
        }
    }
}

/// Inception-V3 feature extractor (2048-d pool output).
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    blocks: Vec<(&'static str, Block)>,
    device: Device,
    flavor: Flavor,
}

impl InceptionV3 {
    /// torchvision's network; `vb` points at the root of an `Inception3` state dict.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::with_flavor(vb, Flavor::Torchvision)
    }

    /// Either network; both read the same state-dict names.
    pub fn with_flavor(vb: VarBuilder, flavor: Flavor) -> Result<Self> {
        let sq = |name: &str, i, o, k, s, p| -> Result<Block> {
            Ok(Block::Conv(BasicConv2d::square(
                vb.pp(name),
                i,
                o,
                k,
                s,
                p,
            )?))
        };
        let pool = flavor.branch_pool(false);
        let a = |name: &'static str, cin, pf| -> Result<(&'static str, Block)> {
            Ok((name, Block::A(InceptionA::new(vb.pp(name), cin, pf, pool)?)))
        };
        let c = |name: &'static str, c7| -> Result<(&'static str, Block)> {
            Ok((name, Block::C(InceptionC::new(vb.pp(name), 768, c7, pool)?)))
        };
        let blocks = vec![
            ("Conv2d_1a_3x3", sq("Conv2d_1a_3x3", 3, 32, 3, 2, 0)?),
            ("Conv2d_2a_3x3", sq("Conv2d_2a_3x3", 32, 32, 3, 1, 0)?),
            ("Conv2d_2b_3x3", sq("Conv2d_2b_3x3", 32, 64, 3, 1, 1)?),
            ("maxpool1", Block::MaxPool),
            ("Conv2d_3b_1x1", sq("Conv2d_3b_1x1", 64, 80, 1, 1, 0)?),
            ("Conv2d_4a_3x3", sq("Conv2d_4a_3x3", 80, 192, 3, 1, 0)?),
            ("maxpool2", Block::MaxPool),
            a("Mixed_5b", 192, 32)?,
            a("Mixed_5c", 256, 64)?,
            a("Mixed_5d", 288, 64)?,
            (
                "Mixed_6a",
                Block::B(InceptionB::new(vb.pp("Mixed_6a"), 288)?),
            ),
            c("Mixed_6b", 128)?,
            c("Mixed_6c", 160)?,
            c("Mixed_6d", 160)?,
            c("Mixed_6e", 192)?,
            (
                "Mixed_7a",
                Block::D(InceptionD::new(vb.pp("Mixed_7a"), 768)?),
            ),
            (
                "Mixed_7b",
                Block::E(InceptionE::new(
                    vb.pp("Mixed_7b"),
                    1280,
                    flavor.branch_pool(false),
                )?),
            ),
            (
                "Mixed_7c",
                Block::E(InceptionE::new(
                    vb.pp("Mixed_7c"),
                    2048,
                    flavor.branch_pool(true),
                )?),
            ),
        ];
        Ok(Self {
            blocks,
            device: vb.device().clone(),
            flavor,
        })
    }

    /// Builds the network from a state dict read from `source` (named in errors): BatchNorm's
    /// `num_batches_tracked` counters and the unused `AuxLogits.*`/`fc.*` are tolerated, any
    /// other unused or missing tensor is an error.
    pub fn from_state_dict(
        mut tensors: HashMap<String, Tensor>,
        source: &Path,
        flavor: Flavor,
        device: &Device,
    ) -> Result<Self> {
        tensors.retain(|k, _| !k.ends_with("num_batches_tracked"));
        let w =
            crate::weights::StrictWeights::new(tensors, source).allow_unused(["AuxLogits.", "fc."]);
        let net = Self::with_flavor(w.var_builder(DType::F32, device), flavor)
            .map_err(|e| Error::weights(source, e.to_string()))?;
        w.finish()?;
        Ok(net)
    }

    /// Reads a `.pth` (torchvision's or pytorch-fid's file) or `.safetensors` state dict with
    /// the safe reader.
    pub fn load(path: &Path, flavor: Flavor, device: &Device) -> Result<Self> {
        let tensors = crate::weights::load(path, &Device::Cpu)?;
        Self::from_state_dict(tensors, path, flavor, device)
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// 2048-d features of a preprocessed `(N, 3, 299, 299)` batch (see [`preprocess`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_hook(x, |_, _| Ok(()))
    }

    /// Like [`Self::forward`], handing every block output (and the pooled features, as
    /// `avgpool`) to `hook` for inspection.
    pub fn forward_with_hook(
        &self,
        x: &Tensor,
        mut hook: impl FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h < 75 || w < 75 {
            return Err(Error::msg(format!(
                "inception: expected a (N,3,299,299) batch, got {:?}",
                x.dims()
            )));
        }
        let mut h = x.clone();
        for (name, block) in &self.blocks {
            h = block.forward(&h)?;
            hook(name, &h)?;
        }
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        hook("avgpool", &pooled)?;
        Ok(pooled)
    }

    /// Features of `[0,1]` images of any size: the flavour's preprocessing ([`preprocess`] or
    /// [`preprocess_pt`]) then [`Self::forward`].
    pub fn features(&self, images: &[ChwImage]) -> Result<Tensor> {
        let batch = images
            .iter()
            .map(|im| match self.flavor {
                Flavor::Torchvision => preprocess(im, &self.device),
                Flavor::PtInception => preprocess_pt(im, &self.device),
            })
            .collect::<Result<Vec<_>>>()?;
        self.forward(&Tensor::cat(&batch, 0)?)
    }
}

/// `F.interpolate(x, size, mode="bilinear", align_corners=False)` without antialias, in f32 as
/// torch's CPU kernel computes it.
pub fn resize_bilinear(img: &ChwImage, out_h: usize, out_w: usize) -> Result<ChwImage> {
    if out_h == 0 || out_w == 0 || img.height == 0 || img.width == 0 {
        return Err(Error::msg("resize_bilinear: empty size"));
    }
    let axis = |inp: usize, out: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|d| {
                let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
                let i0 = src as usize;
                let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
                let l1 = src - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ys = axis(img.height, out_h);
    let xs = axis(img.width, out_w);
    let mut data = Vec::with_capacity(img.channels * out_h * out_w);
    for c in 0..img.channels {
        let p = img.plane(c);
        let at = |y: usize, x: usize| p[y * img.width + x];
        for &(y0, y1, h0, h1) in &ys {
            for &(x0, x1, w0, w1) in &xs {
                let top = w0 * at(y0, x0) + w1 * at(y0, x1);
                let bot = w0 * at(y1, x0) + w1 * at(y1, x1);
                data.push(h0 * top + h1 * bot);
            }
        }
    }
    ChwImage::new(img.channels, out_h, out_w, data)
}

/// MCLD's input transform on `[0,1]` RGB: resize to 299x299, then per channel
/// `x * (std/0.5) + (mean-0.5)/0.5` (torchvision's `transform_input` formula, f32 constants).
pub fn preprocess(img: &ChwImage, device: &Device) -> Result<Tensor> {
    if img.channels != 3 {
        return Err(Error::msg(format!(
            "inception: expected an RGB image, got {} channels",
            img.channels
        )));
    }
    let mut r = resize_bilinear(img, INPUT_SIZE, INPUT_SIZE)?;
    let n = INPUT_SIZE * INPUT_SIZE;
    for (c, &(mean, std)) in IMAGENET.iter().enumerate() {
        let a = (std / 0.5) as f32;
        let b = ((mean - 0.5) / 0.5) as f32;
        for v in &mut r.data[c * n..(c + 1) * n] {
            *v = *v * a + b;
        }
    }
    r.to_tensor(device)
}

/// pytorch-fid's input transform on `[0,1]` RGB: resize to 299x299, then `2x - 1` in f32.
pub fn preprocess_pt(img: &ChwImage, device: &Device) -> Result<Tensor> {
    if img.channels != 3 {
        return Err(Error::msg(format!(
            "pt_inception: expected an RGB image, got {} channels",
            img.channels
        )));
    }
    let mut r = resize_bilinear(img, INPUT_SIZE, INPUT_SIZE)?;
    for v in &mut r.data {
        *v = *v * 2.0 - 1.0;
    }
    r.to_tensor(device)
}
