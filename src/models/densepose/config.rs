//! detectron2 config for DensePose R-CNN inference: the subset of keys the test-time model reads,
//! with detectron2's and DensePose's defaults, from a YAML file that may chain `_BASE_` files.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// Root of a detectron2 `CfgNode` (only inference keys; unknown keys are ignored).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct Config {
    pub model: ModelCfg,
    pub input: InputCfg,
    pub test: TestCfg,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct ModelCfg {
    pub pixel_mean: Vec<f32>,
    pub pixel_std: Vec<f32>,
    pub resnets: ResNetCfg,
    pub fpn: FpnCfg,
    pub anchor_generator: AnchorCfg,
    pub proposal_generator: ProposalGenCfg,
    pub rpn: RpnCfg,
    pub roi_heads: RoiHeadsCfg,
    pub roi_box_head: BoxHeadCfg,
    pub densepose_on: bool,
    pub roi_densepose_head: DensePoseHeadCfg,
}

impl Default for ModelCfg {
    fn default() -> Self {
        Self {
            pixel_mean: vec![103.53, 116.28, 123.675],
            pixel_std: vec![1.0, 1.0, 1.0],
            resnets: Default::default(),
            fpn: Default::default(),
            anchor_generator: Default::default(),
            proposal_generator: Default::default(),
            rpn: Default::default(),
            roi_heads: Default::default(),
            roi_box_head: Default::default(),
            densepose_on: true,
            roi_densepose_head: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct ResNetCfg {
    pub depth: usize,
    pub out_features: Vec<String>,
    pub num_groups: usize,
    pub norm: String,
    pub width_per_group: usize,
    pub stride_in_1x1: bool,
    pub res5_dilation: usize,
    pub res2_out_channels: usize,
    pub stem_out_channels: usize,
    pub deform_on_per_stage: Vec<bool>,
}

impl Default for ResNetCfg {
    fn default() -> Self {
        Self {
            depth: 50,
            out_features: vec!["res4".into()],
            num_groups: 1,
            norm: "FrozenBN".into(),
            width_per_group: 64,
            stride_in_1x1: true,
            res5_dilation: 1,
            res2_out_channels: 256,
            stem_out_channels: 64,
            deform_on_per_stage: vec![false; 4],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct FpnCfg {
    pub in_features: Vec<String>,
    pub out_channels: usize,
    pub norm: String,
    pub fuse_type: String,
}

impl Default for FpnCfg {
    fn default() -> Self {
        Self {
            in_features: vec![],
            out_channels: 256,
            norm: String::new(),
            fuse_type: "sum".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct AnchorCfg {
    pub sizes: Vec<Vec<f64>>,
    pub aspect_ratios: Vec<Vec<f64>>,
    pub offset: f64,
}

impl Default for AnchorCfg {
    fn default() -> Self {
        Self {
            sizes: vec![vec![32.0, 64.0, 128.0, 256.0, 512.0]],
            aspect_ratios: vec![vec![0.5, 1.0, 2.0]],
            offset: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct ProposalGenCfg {
    pub min_size: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct RpnCfg {
    pub head_name: String,
    pub in_features: Vec<String>,
    pub bbox_reg_weights: Vec<f32>,
    pub pre_nms_topk_test: usize,
    pub post_nms_topk_test: usize,
    pub nms_thresh: f64,
    pub conv_dims: Vec<i64>,
}

impl Default for RpnCfg {
    fn default() -> Self {
        Self {
            head_name: "StandardRPNHead".into(),
            in_features: vec!["res4".into()],
            bbox_reg_weights: vec![1.0; 4],
            pre_nms_topk_test: 6000,
            post_nms_topk_test: 1000,
            nms_thresh: 0.7,
            conv_dims: vec![-1],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct RoiHeadsCfg {
    pub num_classes: usize,
    pub in_features: Vec<String>,
    pub score_thresh_test: f32,
    pub nms_thresh_test: f64,
}

impl Default for RoiHeadsCfg {
    fn default() -> Self {
        Self {
            num_classes: 80,
            in_features: vec!["res4".into()],
            score_thresh_test: 0.05,
            nms_thresh_test: 0.5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct BoxHeadCfg {
    pub name: String,
    pub bbox_reg_weights: Vec<f32>,
    pub pooler_resolution: usize,
    pub pooler_sampling_ratio: usize,
    pub pooler_type: String,
    pub num_fc: usize,
    pub fc_dim: usize,
    pub num_conv: usize,
    pub conv_dim: usize,
    pub norm: String,
    pub cls_agnostic_bbox_reg: bool,
}

impl Default for BoxHeadCfg {
    fn default() -> Self {
        Self {
            name: String::new(),
            bbox_reg_weights: vec![10.0, 10.0, 5.0, 5.0],
            pooler_resolution: 14,
            pooler_sampling_ratio: 0,
            pooler_type: "ROIAlignV2".into(),
            num_fc: 0,
            fc_dim: 1024,
            num_conv: 0,
            conv_dim: 256,
            norm: String::new(),
            cls_agnostic_bbox_reg: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct DensePoseHeadCfg {
    pub name: String,
    pub num_stacked_convs: usize,
    pub num_patches: usize,
    pub deconv_kernel: usize,
    pub conv_head_dim: usize,
    pub conv_head_kernel: usize,
    pub up_scale: usize,
    pub heatmap_size: usize,
    pub pooler_type: String,
    pub pooler_resolution: usize,
    pub pooler_sampling_ratio: usize,
    pub num_coarse_segm_channels: usize,
    pub decoder_on: bool,
    pub decoder_num_classes: usize,
    pub decoder_conv_dims: usize,
    pub decoder_norm: String,
    pub decoder_common_stride: usize,
    pub deeplab: DeepLabCfg,
    pub predictor_name: String,
    pub uv_confidence: EnabledCfg,
    pub segm_confidence: EnabledCfg,
}

impl Default for DensePoseHeadCfg {
    fn default() -> Self {
        Self {
            name: "DensePoseV1ConvXHead".into(),
            num_stacked_convs: 8,
            num_patches: 24,
            deconv_kernel: 4,
            conv_head_dim: 512,
            conv_head_kernel: 3,
            up_scale: 2,
            heatmap_size: 112,
            pooler_type: "ROIAlignV2".into(),
            pooler_resolution: 28,
            pooler_sampling_ratio: 2,
            num_coarse_segm_channels: 2,
            decoder_on: true,
            decoder_num_classes: 256,
            decoder_conv_dims: 256,
            decoder_norm: String::new(),
            decoder_common_stride: 4,
            deeplab: Default::default(),
            predictor_name: "DensePoseChartWithConfidencePredictor".into(),
            uv_confidence: Default::default(),
            segm_confidence: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct DeepLabCfg {
    pub norm: String,
    pub nonlocal_on: i64,
}

impl Default for DeepLabCfg {
    fn default() -> Self {
        Self {
            norm: "GN".into(),
            nonlocal_on: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct EnabledCfg {
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct InputCfg {
    pub min_size_test: usize,
    pub max_size_test: usize,
    pub format: String,
}

impl Default for InputCfg {
    fn default() -> Self {
        Self {
            min_size_test: 800,
            max_size_test: 1333,
            format: "BGR".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", default)]
pub struct TestCfg {
    pub detections_per_image: usize,
}

impl Default for TestCfg {
    fn default() -> Self {
        Self {
            detections_per_image: 100,
        }
    }
}

/// Merges `over` into `base` key by key, as detectron2's `merge_from_file` does for mappings.
fn merge(base: &mut serde_yaml::Value, over: serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Reads a YAML file with its `_BASE_` chain (relative to the file); `depth` stops cycles.
fn load_merged(path: &Path, depth: usize) -> Result<serde_yaml::Value> {
    if depth > 16 {
        return Err(Error::config(
            path,
            "_BASE_ chain deeper than 16 (a cycle?)",
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut own: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
    if own.is_null() {
        return Ok(serde_yaml::Value::Mapping(Default::default()));
    }
    let base = match own.as_mapping_mut() {
        Some(m) => m.remove("_BASE_"),
        None => return Err(Error::config(path, "top level is not a mapping")),
    };
    let Some(base) = base else {
        return Ok(own);
    };
    let base_rel = base
        .as_str()
        .ok_or_else(|| Error::config(path, "_BASE_ is not a string"))?;
    let base_path: PathBuf = path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(base_rel);
    let mut merged = load_merged(&base_path, depth + 1)?;
    merge(&mut merged, own);
    Ok(merged)
}

impl Config {
    /// Loads a detectron2 YAML (following `_BASE_`) over the built-in defaults.
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let merged = load_merged(path, 0)?;
        Self::from_yaml_value(merged, path)
    }

    /// Loads a YAML file, then applies `KEY.PATH: value` overrides (as `cfg.merge_from_list`).
    pub fn from_yaml_file_with(
        path: &Path,
        overrides: &[(String, serde_yaml::Value)],
    ) -> Result<Self> {
        let mut merged = load_merged(path, 0)?;
        for (key, value) in overrides {
            let mut nested = value.clone();
            for part in key.rsplit('.') {
                let mut m = serde_yaml::Mapping::new();
                m.insert(serde_yaml::Value::String(part.to_string()), nested);
                nested = serde_yaml::Value::Mapping(m);
            }
            merge(&mut merged, nested);
        }
        Self::from_yaml_value(merged, path)
    }

    fn from_yaml_value(v: serde_yaml::Value, path: &Path) -> Result<Self> {
        let cfg: Config = serde_path_to_error::deserialize(v)
            .map_err(|e| Error::config(path, format!("{}: {}", e.path(), e.inner())))?;
        cfg.validate().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// Checks the combinations this port supports, so a bad config fails before any weight loads.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        if m.pixel_mean.len() != 3 || m.pixel_std.len() != 3 {
            return Err("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD need 3 values".into());
        }
        if m.pixel_std.contains(&0.0) {
            return Err("MODEL.PIXEL_STD has a zero".into());
        }
        if !matches!(m.resnets.depth, 18 | 34 | 50 | 101 | 152) {
            return Err(format!(
                "MODEL.RESNETS.DEPTH {} is not 18/34/50/101/152",
                m.resnets.depth
            ));
        }
        if m.resnets.deform_on_per_stage.iter().any(|d| *d) {
            return Err(
                "deformable convolutions (MODEL.RESNETS.DEFORM_ON_PER_STAGE) are not supported"
                    .into(),
            );
        }
        if m.fpn.in_features.is_empty() {
            return Err(
                "MODEL.FPN.IN_FEATURES is empty: only ResNet+FPN backbones are supported".into(),
            );
        }
        if !m.fpn.norm.is_empty() {
            return Err(format!("MODEL.FPN.NORM {:?} is not supported", m.fpn.norm));
        }
        if m.rpn.head_name != "StandardRPNHead" || m.rpn.conv_dims != [-1] {
            return Err("only StandardRPNHead with CONV_DIMS [-1] is supported".into());
        }
        if m.anchor_generator.aspect_ratios.is_empty() || m.anchor_generator.sizes.is_empty() {
            return Err("MODEL.ANCHOR_GENERATOR needs SIZES and ASPECT_RATIOS".into());
        }
        if m.roi_box_head.num_conv != 0 || m.roi_box_head.num_fc == 0 {
            return Err(
                "only FastRCNNConvFCHead with NUM_CONV 0 and NUM_FC > 0 is supported".into(),
            );
        }
        if m.roi_box_head.cls_agnostic_bbox_reg {
            return Err("CLS_AGNOSTIC_BBOX_REG is not supported".into());
        }
        for t in [
            &m.roi_box_head.pooler_type,
            &m.roi_densepose_head.pooler_type,
        ] {
            if t != "ROIAlign" && t != "ROIAlignV2" {
                return Err(format!("pooler type {t:?} is not ROIAlign/ROIAlignV2"));
            }
        }
        let dp = &m.roi_densepose_head;
        if dp.name != "DensePoseDeepLabHead" && dp.name != "DensePoseV1ConvXHead" {
            return Err(format!(
                "ROI_DENSEPOSE_HEAD.NAME {:?} is not supported",
                dp.name
            ));
        }
        if dp.uv_confidence.enabled || dp.segm_confidence.enabled {
            return Err("DensePose confidence estimation is not supported".into());
        }
        if dp.decoder_on && !dp.decoder_norm.is_empty() {
            return Err("ROI_DENSEPOSE_HEAD.DECODER_NORM is not supported".into());
        }
        if self.input.format != "BGR" {
            return Err(format!(
                "INPUT.FORMAT {:?}: only BGR is supported",
                self.input.format
            ));
        }
        Ok(())
    }

    /// Parses a fully merged config dumped as JSON (as the fixtures store it).
    pub fn from_json_value(v: &serde_json::Value) -> Result<Self> {
        let cfg: Config = serde_path_to_error::deserialize(v.clone())
            .map_err(|e| Error::config("<json>", format!("{}: {}", e.path(), e.inner())))?;
        cfg.validate().map_err(|m| Error::config("<json>", m))?;
        Ok(cfg)
    }
}

/// The shipped `configs/densepose/` pair, compiled in so that an installed binary run away from
/// the source tree still finds the model it was written for.
const BUILTIN_BASE: &str = include_str!("../../../configs/densepose/Base-DensePose-RCNN-FPN.yaml");
const BUILTIN_R101_DL: &str =
    include_str!("../../../configs/densepose/densepose_rcnn_R_101_FPN_DL_s1x.yaml");

impl Config {
    /// `densepose_rcnn_R_101_FPN_DL_s1x.yaml` over its base, from the compiled-in copies.
    pub fn builtin_r101_dl() -> Result<Self> {
        let name = Path::new("<built-in densepose_rcnn_R_101_FPN_DL_s1x.yaml>");
        let parse = |text: &str| -> Result<serde_yaml::Value> {
            serde_yaml::from_str(text).map_err(|e| Error::config(name, e.to_string()))
        };
        let mut merged = parse(BUILTIN_BASE)?;
        let mut own = parse(BUILTIN_R101_DL)?;
        if let Some(m) = own.as_mapping_mut() {
            m.remove("_BASE_");
        }
        merge(&mut merged, own);
        Self::from_yaml_value(merged, name)
    }
}
