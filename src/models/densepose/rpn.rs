//! Anchors, the standard RPN head and test-time proposal selection (detectron2 semantics).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::boxes::{apply_deltas, batched_nms, clip_box};
use super::config::Config;
use super::resnet::ConvBn;
use crate::{Error, Result};

/// Per-level cell anchors, `(x0, y0, x1, y1)` around the origin; sizes outer, ratios inner.
pub fn cell_anchors(sizes: &[f64], ratios: &[f64]) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for &s in sizes {
        let area = s * s;
        for &a in ratios {
            let w = (area / a).sqrt();
            let h = a * w;
            out.push([
                (-w / 2.0) as f32,
                (-h / 2.0) as f32,
                (w / 2.0) as f32,
                (h / 2.0) as f32,
            ]);
        }
    }
    out
}

/// RPN proposals of one image, sorted by objectness logit (input-image coordinates).
#[derive(Debug, Clone)]
pub struct Proposals {
    pub boxes: Vec<[f32; 4]>,
    pub logits: Vec<f32>,
}

/// Raw RPN head outputs of one level: logits `[A, H, W]`, deltas `[A*4, H, W]`.
#[derive(Debug, Clone)]
pub struct RpnLevel {
    pub logits: Tensor,
    pub deltas: Tensor,
}

#[derive(Debug, Clone)]
pub struct Rpn {
    conv: ConvBn,
    objectness: ConvBn,
    deltas: ConvBn,
    /// Cell anchors per level and the level strides.
    pub cell_anchors: Vec<Vec<[f32; 4]>>,
    strides: Vec<usize>,
    offset: f64,
    pre_topk: usize,
    post_topk: usize,
    nms_thresh: f64,
    min_size: f32,
    weights: [f32; 4],
}

impl Rpn {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let c = cfg.model.fpn.out_channels;
        let r = &cfg.model.rpn;
        let ag = &cfg.model.anchor_generator;
        let mut strides = Vec::new();
        for f in &r.in_features {
            let lvl: u32 = f
                .strip_prefix('p')
                .and_then(|s| s.parse().ok())
                .filter(|l| (2..=6).contains(l))
                .ok_or_else(|| Error::msg(format!("MODEL.RPN.IN_FEATURES: {f:?} is not p2..p6")))?;
            strides.push(1usize << lvl);
        }
        let nl = strides.len();
        let pick = |v: &Vec<Vec<f64>>, name: &str| -> Result<Vec<Vec<f64>>> {
            match v.len() {
                1 => Ok(vec![v[0].clone(); nl]),
                n if n == nl => Ok(v.clone()),
                n => Err(Error::msg(format!(
                    "MODEL.ANCHOR_GENERATOR.{name} has {n} lists for {nl} RPN levels"
                ))),
            }
        };
        let sizes = pick(&ag.sizes, "SIZES")?;
        let ratios = pick(&ag.aspect_ratios, "ASPECT_RATIOS")?;
        let cell: Vec<Vec<[f32; 4]>> = sizes
            .iter()
            .zip(&ratios)
            .map(|(s, a)| cell_anchors(s, a))
            .collect();
        let a = cell[0].len();
        if cell.iter().any(|c| c.len() != a) {
            return Err(Error::msg(
                "RPN levels need the same number of anchors per cell",
            ));
        }
        if r.bbox_reg_weights.len() != 4 {
            return Err(Error::msg("MODEL.RPN.BBOX_REG_WEIGHTS needs 4 values"));
        }
        let vbh = vb.pp("rpn_head");
        Ok(Self {
            conv: ConvBn::new(vbh.pp("conv"), c, c, 3, 1, 1, 1, 1, true, false)?,
            objectness: ConvBn::new(
                vbh.pp("objectness_logits"),
                c,
                a,
                1,
                1,
                0,
                1,
                1,
                true,
                false,
            )?,
            deltas: ConvBn::new(
                vbh.pp("anchor_deltas"),
                c,
                a * 4,
                1,
                1,
                0,
                1,
                1,
                true,
                false,
            )?,
            cell_anchors: cell,
            strides,
            offset: ag.offset,
            pre_topk: r.pre_nms_topk_test,
            post_topk: r.post_nms_topk_test,
            nms_thresh: r.nms_thresh,
            min_size: cfg.model.proposal_generator.min_size,
            weights: [
                r.bbox_reg_weights[0],
                r.bbox_reg_weights[1],
                r.bbox_reg_weights[2],
                r.bbox_reg_weights[3],
            ],
        })
    }

    /// Head outputs on the given levels (`[1, C, H, W]` each, p2 first).
    pub fn head(&self, feats: &[Tensor]) -> Result<Vec<RpnLevel>> {
        if feats.len() < self.strides.len() {
            return Err(Error::msg(format!(
                "RPN wants {} feature levels, got {}",
                self.strides.len(),
                feats.len()
            )));
        }
        let mut out = Vec::new();
        for f in &feats[..self.strides.len()] {
            let t = self.conv.forward(f)?.relu()?;
            out.push(RpnLevel {
                logits: self.objectness.forward(&t)?.squeeze(0)?,
                deltas: self.deltas.forward(&t)?.squeeze(0)?,
            });
        }
        Ok(out)
    }

    /// detectron2's `find_top_rpn_proposals` at test time; `image_hw` is the unpadded size.
    pub fn proposals(&self, levels: &[RpnLevel], image_hw: (usize, usize)) -> Result<Proposals> {
        if levels.len() != self.strides.len() {
            return Err(Error::msg(format!(
                "RPN has {} levels, got outputs for {}",
                self.strides.len(),
                levels.len()
            )));
        }
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut lvl_ids = Vec::new();
        for (li, lv) in levels.iter().enumerate() {
            let (na, h, w) = lv.logits.dims3()?;
            // (H, W, A) flattening, as the permute in the RPN does; deltas as (H, W, A, 4).
            let logits = lv
                .logits
                .permute((1, 2, 0))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let deltas = lv
                .deltas
                .reshape((na, 4, h, w))?
                .permute((2, 3, 0, 1))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let stride = self.strides[li] as f32;
            let mut flat: Vec<(f32, usize)> = logits.iter().copied().zip(0..).collect();
            let k = self.pre_topk.min(flat.len());
            flat.sort_by(|p, q| q.0.total_cmp(&p.0));
            flat.truncate(k);
            let off = self.offset as f32;
            for (s, idx) in flat {
                let a = idx % na;
                let cell = idx / na;
                let (y, x) = (cell / w, cell % w);
                let sx = x as f32 * stride + off;
                let sy = y as f32 * stride + off;
                let ca = self.cell_anchors[li][a];
                let anchor = [sx + ca[0], sy + ca[1], sx + ca[2], sy + ca[3]];
                let d = [
                    deltas[idx * 4],
                    deltas[idx * 4 + 1],
                    deltas[idx * 4 + 2],
                    deltas[idx * 4 + 3],
                ];
                boxes.push(apply_deltas(&d, &anchor, &self.weights));
                scores.push(s);
                lvl_ids.push(li);
            }
        }
        let (ih, iw) = (image_hw.0 as f32, image_hw.1 as f32);
        let mut kb = Vec::new();
        let mut ks = Vec::new();
        let mut kl = Vec::new();
        for ((b, s), l) in boxes.into_iter().zip(scores).zip(lvl_ids) {
            if !(b.iter().all(|v| v.is_finite()) && s.is_finite()) {
                continue;
            }
            let c = clip_box(&b, ih, iw);
            if c[2] - c[0] > self.min_size && c[3] - c[1] > self.min_size {
                kb.push(c);
                ks.push(s);
                kl.push(l);
            }
        }
        let keep = batched_nms(&kb, &ks, &kl, self.nms_thresh);
        let keep = &keep[..keep.len().min(self.post_topk)];
        Ok(Proposals {
            boxes: keep.iter().map(|&i| kb[i]).collect(),
            logits: keep.iter().map(|&i| ks[i]).collect(),
        })
    }
}
