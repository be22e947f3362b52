//! DensePose R-CNN (detectron2) in candle: photo -> IUV image.
//!
//! Stages follow detectron2's `DefaultPredictor` on `densepose_rcnn_R_*_FPN_*` configs: test-time
//! resize, ResNet+FPN, RPN, Fast R-CNN box head, then the DensePose decoder, head and chart
//! predictor; `iuv` turns the first instance into MCLD's IUV image.

pub mod boxes;
pub mod config;
pub mod head;
pub mod iuv;
pub mod predictor;
pub mod resnet;
pub mod roi;
pub mod rpn;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::Config;
use head::{Decoder, DensePoseHead};
use iuv::{resize_pil_bilinear, shortest_edge_size, ChartResult, Image3};
use predictor::{ChartOutput, ChartPredictor};
use resnet::Fpn;
use roi::{BoxHead, BoxOutputs, Detections, HostMap, RoiPooler};
use rpn::{Proposals, Rpn, RpnLevel};

use crate::{Error, Result};

/// The model input after resize, normalisation and padding.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    pub resized: Image3,
    /// `[1, 3, Hp, Wp]`, padded to a multiple of 32.
    pub tensor: Tensor,
}

/// Everything one forward pass computes, for inspection and parity tests.
#[derive(Debug, Clone)]
pub struct Trace {
    pub pre: Preprocessed,
    pub fpn: Vec<Tensor>,
    pub rpn_levels: Vec<RpnLevel>,
    pub proposals: Proposals,
    pub box_outputs: BoxOutputs,
    /// Detections in resized-input coordinates.
    pub detections: Detections,
    /// Boxes scaled back to the original photo (detector_postprocess), same order as scores.
    pub boxes_orig: Vec<[f32; 4]>,
    pub scores: Vec<f32>,
    pub classes: Vec<usize>,
    pub densepose: Option<DensePoseTrace>,
}

#[derive(Debug, Clone)]
pub struct DensePoseTrace {
    pub decoder: Option<Tensor>,
    pub pooled: Tensor,
    pub head: Tensor,
    pub chart: ChartOutput,
}

#[derive(Debug, Clone)]
pub struct DensePose {
    cfg: Config,
    device: Device,
    backbone: Fpn,
    rpn: Rpn,
    box_head: BoxHead,
    decoder: Option<Decoder>,
    dp_pooler: RoiPooler,
    dp_head: DensePoseHead,
    predictor: ChartPredictor,
    roi_levels: Vec<u32>,
}

fn parse_levels(names: &[String], what: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for n in names {
        let l: u32 = n
            .strip_prefix('p')
            .and_then(|s| s.parse().ok())
            .filter(|l| (2..=6).contains(l))
            .ok_or_else(|| Error::msg(format!("{what}: {n:?} is not an FPN level p2..p6")))?;
        if let Some(&prev) = out.last() {
            if l != prev + 1 {
                return Err(Error::msg(format!("{what}: levels must be consecutive")));
            }
        }
        out.push(l);
    }
    if out.is_empty() {
        return Err(Error::msg(format!("{what} is empty")));
    }
    Ok(out)
}

impl DensePose {
    /// Builds the model; weight names are detectron2's state-dict names.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        if !cfg.model.densepose_on {
            return Err(Error::msg("MODEL.DENSEPOSE_ON is false"));
        }
        let device = vb.device().clone();
        let backbone = Fpn::new(vb.pp("backbone"), cfg)?;
        let rpn_levels = parse_levels(&cfg.model.rpn.in_features, "MODEL.RPN.IN_FEATURES")?;
        if rpn_levels[0] != 2 {
            return Err(Error::msg("MODEL.RPN.IN_FEATURES must start at p2"));
        }
        let rpn = Rpn::new(vb.pp("proposal_generator"), cfg)?;
        let roi_levels = parse_levels(
            &cfg.model.roi_heads.in_features,
            "MODEL.ROI_HEADS.IN_FEATURES",
        )?;
        if roi_levels[0] != 2 {
            return Err(Error::msg("MODEL.ROI_HEADS.IN_FEATURES must start at p2"));
        }
        let box_head = BoxHead::new(vb.pp("roi_heads"), cfg, roi_levels.clone())?;
        let dp = &cfg.model.roi_densepose_head;
        let (decoder, dp_pooler, head_in) = if dp.decoder_on {
            let dec = Decoder::new(vb.pp("roi_heads.decoder"), cfg, &roi_levels)?;
            let lvl = dp.decoder_common_stride.trailing_zeros();
            let pooler = RoiPooler::new(
                &dp.pooler_type,
                dp.pooler_resolution,
                dp.pooler_sampling_ratio,
                vec![lvl],
            )?;
            (Some(dec), pooler, dp.decoder_num_classes)
        } else {
            let pooler = RoiPooler::new(
                &dp.pooler_type,
                dp.pooler_resolution,
                dp.pooler_sampling_ratio,
                roi_levels.clone(),
            )?;
            (None, pooler, cfg.model.fpn.out_channels)
        };
        let dp_head = DensePoseHead::new(vb.pp("roi_heads.densepose_head"), cfg, head_in)?;
        let predictor = ChartPredictor::new(vb.pp("roi_heads.densepose_predictor"), cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            device,
            backbone,
            rpn,
            box_head,
            decoder,
            dp_pooler,
            dp_head,
            predictor,
            roi_levels,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn rpn(&self) -> &Rpn {
        &self.rpn
    }

    /// ResizeShortestEdge (Pillow bilinear), BGR mean/std, zero padding to /32.
    pub fn preprocess(&self, bgr: &Image3) -> Result<Preprocessed> {
        if bgr.h == 0 || bgr.w == 0 {
            return Err(Error::msg(format!("empty image ({}x{})", bgr.h, bgr.w)));
        }
        let (oh, ow) = shortest_edge_size(
            bgr.h,
            bgr.w,
            self.cfg.input.min_size_test,
            self.cfg.input.max_size_test,
        );
        let resized = if (oh, ow) == (bgr.h, bgr.w) {
            bgr.clone()
        } else {
            resize_pil_bilinear(bgr, oh, ow)?
        };
        Ok(Preprocessed {
            tensor: self.normalize_pad(&resized)?,
            resized,
        })
    }

    /// Mean/std normalisation and padding of an already resized BGR image.
    pub fn normalize_pad(&self, img: &Image3) -> Result<Tensor> {
        let (h, w) = (img.h, img.w);
        let hp = h.div_ceil(32) * 32;
        let wp = w.div_ceil(32) * 32;
        let mut out = vec![0f32; 3 * hp * wp];
        let m = &self.cfg.model;
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let v = img.data[(y * w + x) * 3 + c] as f32;
                    out[(c * hp + y) * wp + x] = (v - m.pixel_mean[c]) / m.pixel_std[c];
                }
            }
        }
        Ok(Tensor::from_vec(out, (1, 3, hp, wp), &self.device)?)
    }

    /// p2..p6 of a `[1, 3, Hp, Wp]` tensor.
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.backbone.forward(x)
    }

    /// Box head on given proposals: raw outputs and the test-time detections (input coords).
    pub fn detect(
        &self,
        fpn: &[Tensor],
        proposals: &[[f32; 4]],
        image_hw: (usize, usize),
    ) -> Result<(BoxOutputs, Detections)> {
        let maps = self.roi_maps(fpn)?;
        let out = self.box_head.predict(&maps, proposals, &self.device)?;
        let det = self.box_head.inference(&out, proposals, image_hw)?;
        Ok((out, det))
    }

    fn roi_maps(&self, fpn: &[Tensor]) -> Result<Vec<HostMap>> {
        self.roi_levels
            .iter()
            .map(|&l| {
                let t = fpn
                    .get(l as usize - 2)
                    .ok_or_else(|| Error::msg(format!("feature p{l} is missing")))?;
                HostMap::from_tensor(t)
            })
            .collect()
    }

    /// DensePose branch on boxes in input coordinates.
    pub fn densepose(&self, fpn: &[Tensor], boxes: &[[f32; 4]]) -> Result<DensePoseTrace> {
        let (decoder, maps) = match &self.decoder {
            Some(d) => {
                let n = self.roi_levels.len();
                let levels = fpn.get(..n).ok_or_else(|| {
                    Error::msg(format!(
                        "DensePose decoder needs {n} levels, got {}",
                        fpn.len()
                    ))
                })?;
                let out = d.forward(levels)?;
                let map = HostMap::from_tensor(&out)?;
                (Some(out), vec![map])
            }
            None => (None, self.roi_maps(fpn)?),
        };
        let pooled = self.dp_pooler.pool(&maps, boxes, &self.device)?;
        let head = self.dp_head.forward(&pooled)?;
        let chart = self.predictor.forward(&head)?;
        Ok(DensePoseTrace {
            decoder,
            pooled,
            head,
            chart,
        })
    }

    /// The whole predictor on a BGR photo, DensePose for every detection.
    pub fn run(&self, bgr: &Image3) -> Result<Trace> {
        self.run_with(bgr, usize::MAX)
    }

    /// As `run`, with the DensePose branch on the first `dp_limit` detections only: each
    /// instance's branch is independent of the others, so the kept ones are unchanged.
    pub fn run_with(&self, bgr: &Image3, dp_limit: usize) -> Result<Trace> {
        let pre = self.preprocess(bgr)?;
        let fpn = self.features(&pre.tensor)?;
        self.run_on_features(bgr, pre, fpn, dp_limit)
    }

    /// Everything after the backbone for one photo whose `[1, C, H, W]` features are given.
    pub fn run_on_features(
        &self,
        bgr: &Image3,
        pre: Preprocessed,
        fpn: Vec<Tensor>,
        dp_limit: usize,
    ) -> Result<Trace> {
        let hw = (pre.resized.h, pre.resized.w);
        let rpn_levels = self.rpn.head(&fpn)?;
        let proposals = self.rpn.proposals(&rpn_levels, hw)?;
        let (box_outputs, detections) = self.detect(&fpn, &proposals.boxes, hw)?;
        let sx = (bgr.w as f64 / hw.1 as f64) as f32;
        let sy = (bgr.h as f64 / hw.0 as f64) as f32;
        let (oh, ow) = (bgr.h as f32, bgr.w as f32);
        let mut boxes_orig = Vec::new();
        let mut scores = Vec::new();
        let mut classes = Vec::new();
        let mut kept = Vec::new();
        for (i, b) in detections.boxes.iter().enumerate() {
            let s = boxes::clip_box(&[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], oh, ow);
            if s[2] - s[0] > 0.0 && s[3] - s[1] > 0.0 {
                boxes_orig.push(s);
                scores.push(detections.scores[i]);
                classes.push(detections.classes[i]);
                kept.push(*b);
            }
        }
        kept.truncate(dp_limit);
        let densepose = if kept.is_empty() {
            None
        } else {
            Some(self.densepose(&fpn, &kept)?)
        };
        Ok(Trace {
            pre,
            fpn,
            rpn_levels,
            proposals,
            box_outputs,
            detections,
            boxes_orig,
            scores,
            classes,
            densepose,
        })
    }

    /// Several photos, DensePose on the first `dp_limit` detections of each. Photos whose padded
    /// inputs have the same size share one backbone+FPN pass (a batch of N); padding is never
    /// enlarged, so each photo sees exactly the input it would see alone.
    pub fn run_batch(&self, photos: &[&Image3], dp_limit: usize) -> Result<Vec<Trace>> {
        let pres = photos
            .iter()
            .map(|p| self.preprocess(p))
            .collect::<Result<Vec<_>>>()?;
        let mut fpns: Vec<Option<Vec<Tensor>>> = vec![None; photos.len()];
        let mut done = vec![false; photos.len()];
        for i in 0..photos.len() {
            if done[i] {
                continue;
            }
            let dims = pres[i].tensor.dims().to_vec();
            let group: Vec<usize> = (i..photos.len())
                .filter(|&j| !done[j] && pres[j].tensor.dims() == dims.as_slice())
                .collect();
            let inputs: Vec<&Tensor> = group.iter().map(|&j| &pres[j].tensor).collect();
            let x = Tensor::cat(&inputs, 0)?;
            let feats = self.features(&x)?;
            for (k, &j) in group.iter().enumerate() {
                let per = feats
                    .iter()
                    .map(|f| f.narrow(0, k, 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                fpns[j] = Some(per);
                done[j] = true;
            }
        }
        pres.into_iter()
            .zip(fpns)
            .zip(photos)
            .map(|((pre, fpn), bgr)| {
                let fpn = fpn.ok_or_else(|| Error::msg("batch lost an image"))?;
                self.run_on_features(bgr, pre, fpn, dp_limit)
            })
            .collect()
    }

    /// Chart result of instance `i` of a trace (at its box in the original photo).
    pub fn chart_result(trace: &Trace, i: usize) -> Result<ChartResult> {
        let dp = trace
            .densepose
            .as_ref()
            .ok_or_else(|| Error::msg("no person detected"))?;
        let b = trace
            .boxes_orig
            .get(i)
            .ok_or_else(|| Error::msg(format!("instance {i} does not exist")))?;
        let c = &dp.chart;
        iuv::chart_result(
            &c.coarse_segm.get(i)?,
            &c.fine_segm.get(i)?,
            &c.u.get(i)?,
            &c.v.get(i)?,
            b,
        )
    }

    /// Photo -> `[I, U, V]` image of the highest-scoring person (None when nobody is found).
    pub fn iuv(&self, bgr: &Image3) -> Result<Option<Vec<u8>>> {
        let trace = self.run_with(bgr, 1)?;
        Self::iuv_of_trace(&trace, bgr)
    }

    /// As `iuv` for several photos, sharing backbone passes (see `run_batch`).
    pub fn iuv_batch(&self, photos: &[&Image3]) -> Result<Vec<Option<Vec<u8>>>> {
        let traces = self.run_batch(photos, 1)?;
        traces
            .iter()
            .zip(photos)
            .map(|(t, p)| Self::iuv_of_trace(t, p))
            .collect()
    }

    /// MCLD's IUV image of a trace's first instance.
    pub fn iuv_of_trace(trace: &Trace, bgr: &Image3) -> Result<Option<Vec<u8>>> {
        if trace.densepose.is_none() {
            return Ok(None);
        }
        let chart = Self::chart_result(trace, 0)?;
        Ok(Some(iuv::iuv_image(
            &chart,
            &trace.boxes_orig[0],
            bgr.h,
            bgr.w,
        )))
    }
}

/// Loads a model from a safetensors file with detectron2 names (the fixtures' format).
pub fn load_safetensors(
    path: &std::path::Path,
    cfg: &Config,
    device: &Device,
) -> Result<DensePose> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::weights(path, e.to_string()))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    DensePose::new(vb, cfg).map_err(|e| Error::weights(path, e.to_string()))
}

/// Loads a model from any weight file the crate reads: detectron2's `.pkl` (through the
/// restricted pickle reader, never executing pickle code), safetensors or a PyTorch checkpoint.
/// Names are detectron2's state-dict names; extra entries (e.g. `pixel_mean`) are ignored.
pub fn load_weights(path: &std::path::Path, cfg: &Config, device: &Device) -> Result<DensePose> {
    // Cast on the host: candle's CUDA casts lack int32 -> f32, and unused entries stay there.
    let tensors = crate::weights::load(path, &Device::Cpu)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    DensePose::new(vb, cfg).map_err(|e| Error::weights(path, e.to_string()))
}

/// Config used when none is named (relative to the working directory; the same file is also
/// compiled in for a binary run elsewhere).
pub const DEFAULT_CONFIG: &str = "configs/densepose/densepose_rcnn_R_101_FPN_DL_s1x.yaml";
/// The checkpoint MCLD uses, expected in the pretrained folder.
pub const WEIGHTS_FILE: &str = "model_final_844d15.pkl";
/// detectron2 DensePose model zoo entry of `densepose_rcnn_R_101_FPN_DL_s1x`.
pub const WEIGHTS_URL: &str = "https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_101_FPN_DL_s1x/165712116/model_final_844d15.pkl";

/// The config named by the user, else the shipped one; also says where it came from.
pub fn load_config(path: Option<&Path>) -> Result<(Config, String)> {
    match path {
        Some(p) => Ok((Config::from_yaml_file(p)?, p.display().to_string())),
        None if Path::new(DEFAULT_CONFIG).is_file() => Ok((
            Config::from_yaml_file(Path::new(DEFAULT_CONFIG))?,
            DEFAULT_CONFIG.to_owned(),
        )),
        None => Ok((
            Config::builtin_r101_dl()?,
            "built-in densepose_rcnn_R_101_FPN_DL_s1x.yaml".to_owned(),
        )),
    }
}

/// Builds the model, or says where to get the checkpoint when it is absent.
pub fn load_model(cfg: &Config, weights: &Path, device: &Device) -> Result<DensePose> {
    if !weights.is_file() {
        return Err(Error::weights(
            weights,
            format!(
                "DensePose weights not found. `mcld download --only densepose` fetches \
                 {WEIGHTS_FILE} (DensePose R-CNN R-101-FPN DL s1x from the detectron2 \
                 DensePose model zoo, {WEIGHTS_URL}) to {} (or name another file with \
                 --densepose-weights)",
                weights.display()
            ),
        ));
    }
    load_weights(weights, cfg, device)
}
