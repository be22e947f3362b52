//! Inception-V3 FID features against `metrics/inception_fid` (features and debug block means).

use crate::common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use mcld::metrics::inception::{preprocess, InceptionV3};
use mcld::metrics::ChwImage;

fn model(case: &common::Case, dev: &Device) -> InceptionV3 {
    let name = case.json["weights_file"]["name"]
        .as_str()
        .expect("weights_file.name");
    let path = common::fixture_path(&format!("metrics/weights/{name}"));
    let tensors = candle_core::safetensors::load(&path, dev).unwrap();
    InceptionV3::new(VarBuilder::from_tensors(tensors, DType::F32, dev)).unwrap()
}

#[test]
fn inception_features_match_torchvision() {
    let case = common::load_case("metrics", "inception_fid");
    let dev = Device::Cpu;
    let net = model(&case, &dev);
    let images: Vec<ChwImage> = case.json["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|p| {
            let rel = format!("metrics/{}", p.as_str().unwrap());
            ChwImage::load_rgb(&common::fixture_path(&rel)).unwrap()
        })
        .collect();
    let batch: Vec<Tensor> = images
        .iter()
        .map(|im| preprocess(im, &dev).unwrap())
        .collect();

    // Debug block means of the first image.
    let rows = batch[0].narrow(2, 0, 8).unwrap().squeeze(0).unwrap();
    common::check_output(&case, "debug.image0.input299.rows0to7", &rows);
    let mut means: BTreeMap<String, Tensor> = BTreeMap::new();
    let first = net
        .forward_with_hook(&batch[0], |name, t| {
            let m = if t.rank() == 4 {
                t.mean(D::Minus1)?.mean(D::Minus1)?
            } else {
                t.clone()
            };
            means.insert(name.to_string(), m.squeeze(0)?);
            Ok(())
        })
        .unwrap();
    let keys = case.keys_with_prefix("debug.image0.block");
    assert_eq!(keys.len(), means.len(), "one debug entry per block");
    for key in &keys {
        let block = key.split('.').nth(3).unwrap();
        let got = means
            .get(block)
            .unwrap_or_else(|| panic!("no block {block}"));
        common::check_output(&case, key, got);
    }

    // All images, batched as the evaluator does.
    let feats = net.forward(&Tensor::cat(&batch, 0).unwrap()).unwrap();
    common::check_output(&case, "features", &feats);
    let again = net.features(&images[..1]).unwrap();
    let (e, _) = common::max_errs(&again, &first);
    assert!(e < 1e-3, "features() and forward() disagree by {e}");
}

#[test]
fn inception_reports_bad_weights_and_input() {
    let case = common::load_case("metrics", "inception_fid");
    let dev = Device::Cpu;
    let name = case.json["weights_file"]["name"].as_str().unwrap();
    let path = common::fixture_path(&format!("metrics/weights/{name}"));
    let mut tensors = candle_core::safetensors::load(&path, &dev).unwrap();
    tensors.remove("Mixed_6c.branch7x7dbl_3.bn.running_var");
    let err = InceptionV3::new(VarBuilder::from_tensors(tensors, DType::F32, &dev))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Mixed_6c.branch7x7dbl_3.bn.running_var"),
        "{err}"
    );
    let net = model(&case, &dev);
    let grey = Tensor::zeros((1, 1, 299, 299), DType::F32, &dev).unwrap();
    assert!(net.forward(&grey).is_err());
    let g = ChwImage::new(1, 10, 10, vec![0.0; 100]).unwrap();
    assert!(preprocess(&g, &dev).is_err());
}
