//! LPIPS v0.1 with the AlexNet trunk, as `lpips.LPIPS(net="alex")(pred, gt, normalize=True)`.
//!
//! Weight names follow the original files: torchvision's `alexnet` state dict for the trunk
//! (`features.{0,3,6,8,10}.{weight,bias}`) and lpips' `alex.pth` for the linear heads
//! (`lin{k}.model.1.weight`; the newer `lins.{k}.model.1.weight` spelling is accepted too).

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Conv2dConfig, Module, VarBuilder};

use crate::models::layers::conv2d;
use crate::ops::conv::{conv2d_forward, Conv2d};

use crate::Result;

/// (torchvision index, in, out, kernel, stride, padding) of the five AlexNet convolutions.
const ALEX_CONVS: [(usize, usize, usize, usize, usize, usize); 5] = [
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
];

/// lpips v0.1 ScalingLayer constants (RGB).
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// torchvision AlexNet `features` up to the fifth ReLU, returning the five ReLU outputs.
#[derive(Debug, Clone)]
pub struct AlexTrunk {
    convs: Vec<Conv2d>,
}

impl AlexTrunk {
    /// `vb` points at the state dict root (the keys are `features.N.*`). Half-precision weights
    /// are widened to the builder's dtype.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("features");
        let mut convs = Vec::with_capacity(5);
        for (idx, cin, cout, k, stride, padding) in ALEX_CONVS {
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            convs.push(conv2d(cin, cout, k, cfg, vb.pp(idx.to_string()))?);
        }
        Ok(Self { convs })
    }

    /// The five taps (after each ReLU) for a normalised `(N, 3, H, W)` input.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut taps = Vec::with_capacity(5);
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            if i == 1 || i == 2 {
                h = h.max_pool2d_with_stride(3, 2)?;
            }
            h = conv.forward(&h)?.relu()?;
            taps.push(h.clone());
        }
        Ok(taps)
    }
}

/// The LPIPS v0.1 metric.
#[derive(Debug, Clone)]
pub struct Lpips {
    trunk: AlexTrunk,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

/// Per-pair LPIPS values and the contribution of each of the five layers.
#[derive(Debug, Clone)]
pub struct LpipsOutput {
    /// `(N,)`
    pub lpips: Tensor,
    /// `(N, 5)`
    pub per_layer: Tensor,
}

impl Lpips {
    /// Trunk and linear heads from one builder holding both state dicts' keys.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::from_parts(vb.clone(), vb)
    }

    /// Trunk (torchvision `alexnet` keys) and heads (lpips `alex.pth` keys) from separate files.
    pub fn from_parts(trunk_vb: VarBuilder, lin_vb: VarBuilder) -> Result<Self> {
        let trunk = AlexTrunk::new(trunk_vb)?;
        let mut lins = Vec::with_capacity(5);
        for (k, &(_, _, cout, _, _, _)) in ALEX_CONVS.iter().enumerate() {
            let old = format!("lin{k}.model.1.weight");
            let name = if lin_vb.contains_tensor(&old)
                || !lin_vb.contains_tensor(&format!("lins.{k}.model.1.weight"))
            {
                old
            } else {
                format!("lins.{k}.model.1.weight")
            };
            lins.push(lin_vb.get((1, cout, 1, 1), &name)?);
        }
        let dev = lin_vb.device();
        let dtype = lin_vb.dtype();
        let shift = Tensor::from_slice(&SHIFT, (1, 3, 1, 1), dev)?.to_dtype(dtype)?;
        let scale = Tensor::from_slice(&SCALE, (1, 3, 1, 1), dev)?.to_dtype(dtype)?;
        Ok(Self {
            trunk,
            lins,
            shift,
            scale,
        })
    }

    pub fn device(&self) -> &Device {
        self.shift.device()
    }

    /// `[0,1]` images -> `[-1,1]` -> ScalingLayer.
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.shift.dtype())?;
        let x = ((x * 2.0)? - 1.0)?;
        Ok(x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?)
    }

    /// LPIPS between two `(N, 3, H, W)` batches of `[0,1]` images (order as MCLD calls it:
    /// generated first, ground truth second; the distance is symmetric anyway).
    pub fn forward(&self, pred: &Tensor, gt: &Tensor) -> Result<LpipsOutput> {
        let (n, c, h, w) = pred.dims4()?;
        if gt.dims() != pred.dims() || c != 3 {
            return Err(crate::Error::msg(format!(
                "lpips: expected two (N,3,H,W) batches of the same shape, got {:?} and {:?}",
                pred.dims(),
                gt.dims()
            )));
        }
        if h < 32 || w < 32 {
            return Err(crate::Error::msg(format!(
                "lpips: images of {h}x{w} are too small for the AlexNet trunk"
            )));
        }
        let both = Tensor::cat(&[self.prepare(pred)?, self.prepare(gt)?], 0)?;
        let taps = self.trunk.forward(&both)?;
        let mut layers = Vec::with_capacity(5);
        for (f, lin) in taps.iter().zip(&self.lins) {
            let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?;
            let f = f.broadcast_div(&(norm + 1e-10)?)?;
            let d = (f.narrow(0, 0, n)? - f.narrow(0, n, n)?)?.sqr()?;
            let l = conv2d_forward(&d, lin, None, 0, 1, 1, 1)?;
            layers.push(l.flatten_from(1)?.mean(D::Minus1)?);
        }
        let per_layer = Tensor::stack(&layers, 1)?;
        let lpips = per_layer.sum(1)?;
        Ok(LpipsOutput {
            lpips: lpips.to_dtype(DType::F32)?,
            per_layer: per_layer.to_dtype(DType::F32)?,
        })
    }
}
