//! DensePose chart predictor (four transposed convs + bilinear upscale) and PyTorch's bilinear.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::Config;
use crate::{Error, Result};

/// `F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)` of
/// `[N, C, H, W]`. On the CPU the host loop below (torch's float arithmetic; the fixtures pin it);
/// elsewhere candle's kernel, so decoder maps never make a round trip through host memory (same
/// taps, weights computed in double; `tests/prepare_densepose.rs` bounds the difference).
pub fn upsample_bilinear_by(x: &Tensor, factor: usize) -> Result<Tensor> {
    if x.device().is_cpu() {
        return upsample_bilinear_host(x, factor);
    }
    let f = factor as f64;
    Ok(x.upsample_bilinear2d_with_scale(f, f, false)?)
}

/// The host-side `upsample_bilinear_by`, on whatever device `x` lives (result on the same one).
pub fn upsample_bilinear_host(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow, inv) = (h * factor, w * factor, 1.0 / factor as f32);
    let data = x
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = bilinear_host(&data, n * c, h, w, oh, ow, inv, inv);
    Ok(Tensor::from_vec(out, (n, c, oh, ow), x.device())?)
}

/// Source indices and weights along one axis (PyTorch's `compute_indices_weights_linear`).
fn axis_weights(insz: usize, outsz: usize, scale: f32) -> Vec<(usize, usize, f32, f32)> {
    (0..outsz)
        .map(|i| {
            let src = scale * (i as f32 + 0.5) - 0.5;
            let src = if src < 0.0 { 0.0 } else { src };
            let i0 = (src as usize).min(insz - 1);
            let i1 = if i0 < insz - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// The sampling grid of one `h x w -> oh x ow` bilinear resize, so that single output pixels
/// can be evaluated with exactly the arithmetic of the full resize.
#[derive(Debug, Clone)]
pub struct BilinearGrid {
    w: usize,
    ys: Vec<(usize, usize, f32, f32)>,
    xs: Vec<(usize, usize, f32, f32)>,
}

impl BilinearGrid {
    pub fn new(h: usize, w: usize, oh: usize, ow: usize, scale_h: f32, scale_w: f32) -> Self {
        Self {
            w,
            ys: axis_weights(h, oh, scale_h),
            xs: axis_weights(w, ow, scale_w),
        }
    }

    /// Output pixel `(oy, ox)` of one `h x w` plane.
    #[inline]
    pub fn at(&self, plane: &[f32], oy: usize, ox: usize) -> f32 {
        let (y0, y1, hy0, hy1) = self.ys[oy];
        let (x0, x1, wx0, wx1) = self.xs[ox];
        let (r0, r1) = (y0 * self.w, y1 * self.w);
        let t0 = plane[r0 + x0] * wx0 + plane[r0 + x1] * wx1;
        let t1 = plane[r1 + x0] * wx0 + plane[r1 + x1] * wx1;
        t0 * hy0 + t1 * hy1
    }

    /// Every output pixel of `planes` planes, planes in parallel.
    pub fn resize(&self, data: &[f32], planes: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let (oh, ow) = (self.ys.len(), self.xs.len());
        let inp = data.len() / planes.max(1);
        let mut out = vec![0f32; planes * oh * ow];
        if oh * ow == 0 {
            return out;
        }
        out.par_chunks_mut(oh * ow)
            .zip(data.par_chunks(inp.max(1)))
            .for_each(|(dst, src)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[oy * ow + ox] = self.at(src, oy, ox);
                    }
                }
            });
        out
    }
}

/// Host bilinear over `planes` planes of `h x w`.
#[allow(clippy::too_many_arguments)]
pub fn bilinear_host(
    data: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    scale_h: f32,
    scale_w: f32,
) -> Vec<f32> {
    BilinearGrid::new(h, w, oh, ow, scale_h, scale_w).resize(data, planes)
}

/// The four chart outputs of a batch of instances, each `[N, *, S, S]`.
#[derive(Debug, Clone)]
pub struct ChartOutput {
    pub coarse_segm: Tensor,
    pub fine_segm: Tensor,
    pub u: Tensor,
    pub v: Tensor,
}

#[derive(Debug, Clone)]
struct Deconv {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
}

impl Deconv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> Result<Self> {
        if k < 2 {
            return Err(Error::msg(
                "ROI_DENSEPOSE_HEAD.DECONV_KERNEL must be at least 2",
            ));
        }
        Ok(Self {
            weight: vb.get((cin, cout, k, k), "weight")?,
            bias: vb.get(cout, "bias")?,
            padding: k / 2 - 1,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose2d(&self.weight, self.padding, 0, 2, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

/// `DensePoseChartPredictor` (confidences disabled).
#[derive(Debug, Clone)]
pub struct ChartPredictor {
    coarse: Deconv,
    fine: Deconv,
    u: Deconv,
    v: Deconv,
    up_scale: usize,
}

impl ChartPredictor {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let dp = &cfg.model.roi_densepose_head;
        let cin = dp.conv_head_dim;
        let k = dp.deconv_kernel;
        let np = dp.num_patches + 1;
        Ok(Self {
            coarse: Deconv::new(
                vb.pp("ann_index_lowres"),
                cin,
                dp.num_coarse_segm_channels,
                k,
            )?,
            fine: Deconv::new(vb.pp("index_uv_lowres"), cin, np, k)?,
            u: Deconv::new(vb.pp("u_lowres"), cin, np, k)?,
            v: Deconv::new(vb.pp("v_lowres"), cin, np, k)?,
            up_scale: dp.up_scale,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<ChartOutput> {
        let up = |t: Tensor| upsample_bilinear_by(&t, self.up_scale);
        Ok(ChartOutput {
            coarse_segm: up(self.coarse.forward(x)?)?,
            fine_segm: up(self.fine.forward(x)?)?,
            u: up(self.u.forward(x)?)?,
            v: up(self.v.forward(x)?)?,
        })
    }
}
