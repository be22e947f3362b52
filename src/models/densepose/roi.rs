//! ROIAlign pooling over FPN levels and the Fast R-CNN box head.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::boxes::{apply_deltas, batched_nms, clip_box};
use super::config::Config;
use crate::{Error, Result};

/// A feature map held on the host for ROIAlign: `[C, H, W]` row-major.
#[derive(Debug, Clone)]
pub struct HostMap {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl HostMap {
    /// From a `[1, C, H, W]` or `[C, H, W]` tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = if t.rank() == 4 {
            t.squeeze(0)?
        } else {
            t.clone()
        };
        let (c, h, w) = t.dims3()?;
        // A view into a batch would otherwise bring the whole batch's storage to the host.
        let t = if t.device().is_cpu() {
            t
        } else {
            t.force_contiguous()?
        };
        let data = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(Self { c, h, w, data })
    }
}

/// torchvision `roi_align` (aligned or not) of one box on one map; out `[C, P, P]` appended.
pub fn roi_align_one(
    map: &HostMap,
    b: &[f32; 4],
    scale: f32,
    pooled: usize,
    sampling: usize,
    aligned: bool,
    out: &mut Vec<f32>,
) {
    let off = if aligned { 0.5f32 } else { 0.0 };
    let x0 = b[0] * scale - off;
    let y0 = b[1] * scale - off;
    let x1 = b[2] * scale - off;
    let y1 = b[3] * scale - off;
    let mut rw = x1 - x0;
    let mut rh = y1 - y0;
    if !aligned {
        rw = rw.max(1.0);
        rh = rh.max(1.0);
    }
    let bin_h = rh / pooled as f32;
    let bin_w = rw / pooled as f32;
    let gh = if sampling > 0 {
        sampling
    } else {
        (rh / pooled as f32).ceil() as usize
    };
    let gw = if sampling > 0 {
        sampling
    } else {
        (rw / pooled as f32).ceil() as usize
    };
    let count = ((gh * gw) as f32).max(1.0);
    let (hh, ww) = (map.h as f32, map.w as f32);
    // Bilinear taps shared by every channel: (offsets, weights) per output bin and sample.
    let mut taps: Vec<([usize; 4], [f32; 4])> = Vec::with_capacity(pooled * pooled * gh * gw);
    for ph in 0..pooled {
        for pw in 0..pooled {
            for iy in 0..gh {
                let y = y0 + ph as f32 * bin_h + (iy as f32 + 0.5) * bin_h / gh as f32;
                for ix in 0..gw {
                    let x = x0 + pw as f32 * bin_w + (ix as f32 + 0.5) * bin_w / gw as f32;
                    if y < -1.0 || y > hh || x < -1.0 || x > ww {
                        taps.push(([0; 4], [0.0; 4]));
                        continue;
                    }
                    let mut y = y.max(0.0);
                    let mut x = x.max(0.0);
                    let mut yl = y as usize;
                    let yh;
                    if yl >= map.h - 1 {
                        yl = map.h - 1;
                        yh = yl;
                        y = yl as f32;
                    } else {
                        yh = yl + 1;
                    }
                    let mut xl = x as usize;
                    let xh;
                    if xl >= map.w - 1 {
                        xl = map.w - 1;
                        xh = xl;
                        x = xl as f32;
                    } else {
                        xh = xl + 1;
                    }
                    let ly = y - yl as f32;
                    let lx = x - xl as f32;
                    let hy = 1.0 - ly;
                    let hx = 1.0 - lx;
                    taps.push((
                        [
                            yl * map.w + xl,
                            yl * map.w + xh,
                            yh * map.w + xl,
                            yh * map.w + xh,
                        ],
                        [hy * hx, hy * lx, ly * hx, ly * lx],
                    ));
                }
            }
        }
    }
    let per_bin = gh * gw;
    for c in 0..map.c {
        let plane = &map.data[c * map.h * map.w..(c + 1) * map.h * map.w];
        for bin in 0..pooled * pooled {
            let mut acc = 0f32;
            for (p, w) in &taps[bin * per_bin..(bin + 1) * per_bin] {
                acc += w[0] * plane[p[0]]
                    + w[1] * plane[p[1]]
                    + w[2] * plane[p[2]]
                    + w[3] * plane[p[3]];
            }
            out.push(acc / count);
        }
    }
}

/// detectron2 `ROIPooler`: each box pooled from its FPN level (canonical 224 at level 4).
#[derive(Debug, Clone)]
pub struct RoiPooler {
    pub resolution: usize,
    pub sampling: usize,
    pub aligned: bool,
    /// FPN levels of the maps handed to `pool`, e.g. `[2, 3, 4, 5]`.
    pub levels: Vec<u32>,
}

impl RoiPooler {
    pub fn new(kind: &str, resolution: usize, sampling: usize, levels: Vec<u32>) -> Result<Self> {
        let aligned = match kind {
            "ROIAlign" => false,
            "ROIAlignV2" => true,
            k => {
                return Err(Error::msg(format!(
                    "pooler type {k:?} is not ROIAlign/ROIAlignV2"
                )))
            }
        };
        Ok(Self {
            resolution,
            sampling,
            aligned,
            levels,
        })
    }

    fn level_of(&self, b: &[f32; 4]) -> usize {
        if self.levels.len() == 1 {
            return 0;
        }
        let min = self.levels[0] as f32;
        let max = *self.levels.last().unwrap_or(&self.levels[0]) as f32;
        let area = (b[2] - b[0]) * (b[3] - b[1]);
        let size = area.sqrt();
        let lvl = (4.0f32 + (size / 224.0 + 1e-8).log2()).floor();
        (lvl.clamp(min, max) - min) as usize
    }

    /// Pools every box: `[N, C, R, R]` on `device`.
    pub fn pool(&self, maps: &[HostMap], boxes: &[[f32; 4]], device: &Device) -> Result<Tensor> {
        if maps.len() != self.levels.len() {
            return Err(Error::msg(format!(
                "ROIPooler has {} levels but got {} maps",
                self.levels.len(),
                maps.len()
            )));
        }
        let c = maps[0].c;
        let r = self.resolution;
        // Boxes are independent: pooled in parallel, concatenated in order.
        use rayon::prelude::*;
        let per_box: Vec<Vec<f32>> = boxes
            .par_iter()
            .map(|b| {
                let li = self.level_of(b);
                let scale = 1.0f32 / (1u32 << self.levels[li]) as f32;
                let mut out = Vec::with_capacity(c * r * r);
                roi_align_one(
                    &maps[li],
                    b,
                    scale,
                    r,
                    self.sampling,
                    self.aligned,
                    &mut out,
                );
                out
            })
            .collect();
        let out = per_box.concat();
        Ok(Tensor::from_vec(out, (boxes.len(), c, r, r), device)?)
    }
}

/// Detections of one image.
#[derive(Debug, Clone)]
pub struct Detections {
    /// Boxes in the resized input's coordinates.
    pub boxes: Vec<[f32; 4]>,
    pub scores: Vec<f32>,
    pub classes: Vec<usize>,
}

/// Raw box-predictor outputs, rows following the proposals.
#[derive(Debug, Clone)]
pub struct BoxOutputs {
    pub cls_logits: Tensor,
    pub bbox_deltas: Tensor,
}

/// `FastRCNNConvFCHead` (FC only) + `FastRCNNOutputLayers` + test-time inference.
#[derive(Debug, Clone)]
pub struct BoxHead {
    pub pooler: RoiPooler,
    fcs: Vec<Linear>,
    cls_score: Linear,
    bbox_pred: Linear,
    num_classes: usize,
    weights: [f32; 4],
    score_thresh: f32,
    nms_thresh: f64,
    topk: usize,
}

impl BoxHead {
    pub fn new(vb: VarBuilder, cfg: &Config, levels: Vec<u32>) -> Result<Self> {
        let b = &cfg.model.roi_box_head;
        let c = cfg.model.fpn.out_channels;
        let pooler = RoiPooler::new(
            &b.pooler_type,
            b.pooler_resolution,
            b.pooler_sampling_ratio,
            levels,
        )?;
        let mut fcs = Vec::new();
        let mut din = c * b.pooler_resolution * b.pooler_resolution;
        for i in 0..b.num_fc {
            fcs.push(candle_nn::linear(
                din,
                b.fc_dim,
                vb.pp(format!("box_head.fc{}", i + 1)),
            )?);
            din = b.fc_dim;
        }
        let nc = cfg.model.roi_heads.num_classes;
        if b.bbox_reg_weights.len() != 4 {
            return Err(Error::msg(
                "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS needs 4 values",
            ));
        }
        Ok(Self {
            pooler,
            fcs,
            cls_score: candle_nn::linear(din, nc + 1, vb.pp("box_predictor.cls_score"))?,
            bbox_pred: candle_nn::linear(din, nc * 4, vb.pp("box_predictor.bbox_pred"))?,
            num_classes: nc,
            weights: [
                b.bbox_reg_weights[0],
                b.bbox_reg_weights[1],
                b.bbox_reg_weights[2],
                b.bbox_reg_weights[3],
            ],
            score_thresh: cfg.model.roi_heads.score_thresh_test,
            nms_thresh: cfg.model.roi_heads.nms_thresh_test,
            topk: cfg.test.detections_per_image,
        })
    }

    /// Class logits and box deltas per proposal.
    pub fn predict(
        &self,
        maps: &[HostMap],
        proposals: &[[f32; 4]],
        device: &Device,
    ) -> Result<BoxOutputs> {
        let x = self.pooler.pool(maps, proposals, device)?;
        let mut x = x.flatten_from(1)?;
        for fc in &self.fcs {
            x = fc.forward(&x)?.relu()?;
        }
        Ok(BoxOutputs {
            cls_logits: self.cls_score.forward(&x)?,
            bbox_deltas: self.bbox_pred.forward(&x)?,
        })
    }

    /// `fast_rcnn_inference_single_image`: decode, clip, threshold, per-class NMS, top-k.
    pub fn inference(
        &self,
        out: &BoxOutputs,
        proposals: &[[f32; 4]],
        image_hw: (usize, usize),
    ) -> Result<Detections> {
        if proposals.is_empty() {
            // candle's CUDA softmax cannot launch on zero rows.
            return Ok(Detections {
                boxes: Vec::new(),
                scores: Vec::new(),
                classes: Vec::new(),
            });
        }
        let probs = candle_nn::ops::softmax_last_dim(&out.cls_logits)?.to_vec2::<f32>()?;
        let deltas = out.bbox_deltas.to_vec2::<f32>()?;
        let (ih, iw) = (image_hw.0 as f32, image_hw.1 as f32);
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut cats = Vec::new();
        for (i, p) in proposals.iter().enumerate() {
            let finite = probs[i].iter().all(|v| v.is_finite());
            let mut decoded = Vec::with_capacity(self.num_classes);
            for k in 0..self.num_classes {
                let d = [
                    deltas[i][4 * k],
                    deltas[i][4 * k + 1],
                    deltas[i][4 * k + 2],
                    deltas[i][4 * k + 3],
                ];
                decoded.push(apply_deltas(&d, p, &self.weights));
            }
            if !finite || decoded.iter().flatten().any(|v| !v.is_finite()) {
                continue;
            }
            for (k, b) in decoded.iter().enumerate() {
                let s = probs[i][k];
                if s > self.score_thresh {
                    boxes.push(clip_box(b, ih, iw));
                    scores.push(s);
                    cats.push(k);
                }
            }
        }
        let keep = batched_nms(&boxes, &scores, &cats, self.nms_thresh);
        let keep = &keep[..keep.len().min(self.topk)];
        Ok(Detections {
            boxes: keep.iter().map(|&i| boxes[i]).collect(),
            scores: keep.iter().map(|&i| scores[i]).collect(),
            classes: keep.iter().map(|&i| cats[i]).collect(),
        })
    }
}
