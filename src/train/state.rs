//! The trainable state on disk: one safetensors file with every trainable tensor (f32), its
//! AdamW moments, the step count and the loss scale, written atomically. Loading checks every
//! name and shape against the running model, so a state from another configuration is an error
//! naming the tensor, not a silent partial load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adamw::AdamW;
use super::params::Params;
use super::scaler::LossScaler;
use crate::{Error, Result};

/// File name of the trainable state inside a checkpoint folder.
pub const STATE_FILE: &str = "train_state.safetensors";

pub fn save(dir: &Path, params: &Params, opt: &AdamW, scaler: Option<&LossScaler>) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, var)) in params.trainable().iter().enumerate() {
        let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?) };
        map.insert(format!("param.{name}"), host(var.as_tensor())?);
        map.insert(format!("adam_m.{name}"), host(&opt.m[i])?);
        map.insert(format!("adam_v.{name}"), host(&opt.v[i])?);
    }
    map.insert(
        "meta.step".into(),
        Tensor::new(&[opt.step as i64], &Device::Cpu)?,
    );
    if let Some(s) = scaler {
        map.insert(
            "meta.loss_scale".into(),
            Tensor::new(&[s.scale, s.tracker as f64], &Device::Cpu)?,
        );
    }
    let path = dir.join(STATE_FILE);
    let bytes = safetensors::serialize(map.iter().map(|(k, v)| (k.clone(), v)), None)
        .map_err(|e| Error::msg(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::fsutil::write_atomic(&path, &bytes)
}

pub fn load(
    dir: &Path,
    params: &Params,
    opt: &mut AdamW,
    scaler: Option<&mut LossScaler>,
) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let map = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::input(&path, format!("not a readable training state: {e}")))?;
    let get = |k: &str| -> Result<&Tensor> {
        map.get(k)
            .ok_or_else(|| Error::input(&path, format!("tensor {k} missing")))
    };
    let expected =
        3 * params.trainable().len() + 1 + usize::from(map.contains_key("meta.loss_scale"));
    if map.len() != expected {
        return Err(Error::input(
            &path,
            format!(
                "{} tensors, the model's state has {expected}: saved by another configuration",
                map.len()
            ),
        ));
    }
    let dev = params.device().clone();
    for (i, (name, _)) in params.trainable().iter().enumerate() {
        params
            .set(name, get(&format!("param.{name}"))?)
            .map_err(|e| Error::input(&path, e.to_string()))?;
        let m = get(&format!("adam_m.{name}"))?;
        let v = get(&format!("adam_v.{name}"))?;
        if m.dims() != opt.m[i].dims() || v.dims() != opt.v[i].dims() {
            return Err(Error::input(
                &path,
                format!("AdamW moments of {name} have the wrong shape"),
            ));
        }
        opt.m[i] = m.to_dtype(DType::F32)?.to_device(&dev)?;
        opt.v[i] = v.to_dtype(DType::F32)?.to_device(&dev)?;
    }
    opt.step = get("meta.step")?.to_vec1::<i64>()?[0] as u64;
    if let Some(s) = scaler {
        if let Some(t) = map.get("meta.loss_scale") {
            let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            s.scale = v[0];
            s.tracker = v[1] as u64;
        }
    }
    Ok(())
}
