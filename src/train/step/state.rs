//! The trainable state on disk: one safetensors file with every trainable tensor (f32), its
//! AdamW moments and per-tensor step counts, the step counts and the loss scale, written
//! atomically. Loading checks every
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

/// Keys of the scalars besides the per-tensor entries: training steps taken (f16 skips
/// included), optimizer updates applied, per-tensor AdamW step counts, loss scale.
const META_STEP: &str = "meta.step";
const META_UPDATES: &str = "meta.updates";
const META_PARAM_STEPS: &str = "meta.param_steps";
const META_LOSS_SCALE: &str = "meta.loss_scale";
const METAS: [&str; 4] = [META_STEP, META_UPDATES, META_PARAM_STEPS, META_LOSS_SCALE];

pub fn save(
    dir: &Path,
    params: &Params,
    opt: &AdamW,
    steps_taken: u64,
    scaler: Option<&LossScaler>,
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, var)) in params.trainable().iter().enumerate() {
        let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?) };
        map.insert(format!("param.{name}"), host(var.as_tensor())?);
        map.insert(format!("adam_m.{name}"), host(&opt.m[i])?);
        map.insert(format!("adam_v.{name}"), host(&opt.v[i])?);
    }
    map.insert(
        META_STEP.into(),
        Tensor::new(&[steps_taken as i64], &Device::Cpu)?,
    );
    map.insert(
        META_UPDATES.into(),
        Tensor::new(&[opt.step as i64], &Device::Cpu)?,
    );
    let counts: Vec<i64> = opt.param_steps.iter().map(|&s| s as i64).collect();
    map.insert(
        META_PARAM_STEPS.into(),
        Tensor::from_vec(counts, opt.param_steps.len(), &Device::Cpu)?,
    );
    if let Some(s) = scaler {
        map.insert(
            META_LOSS_SCALE.into(),
            Tensor::new(&[s.scale, s.tracker as f64], &Device::Cpu)?,
        );
    }
    let path = dir.join(STATE_FILE);
    let bytes = safetensors::serialize(map.iter().map(|(k, v)| (k.clone(), v)), None)
        .map_err(|e| Error::msg(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::fsutil::write_atomic(&path, &bytes)
}

/// Reads what [`save`] wrote into `params`, `opt` and `scaler`; returns the training steps
/// taken. A state written before the per-tensor counts existed gives every tensor the step
/// count (then the same for all).
pub fn load(
    dir: &Path,
    params: &Params,
    opt: &mut AdamW,
    scaler: Option<&mut LossScaler>,
) -> Result<u64> {
    let path = dir.join(STATE_FILE);
    let map = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::input(&path, format!("not a readable training state: {e}")))?;
    let get = |k: &str| -> Result<&Tensor> {
        map.get(k)
            .ok_or_else(|| Error::input(&path, format!("tensor {k} missing")))
    };
    if let Some(k) = map
        .keys()
        .find(|k| k.starts_with("meta.") && !METAS.contains(&k.as_str()))
    {
        return Err(Error::input(&path, format!("unknown entry {k}")));
    }
    let n = params.trainable().len();
    let tensors = map.keys().filter(|k| !k.starts_with("meta.")).count();
    if tensors != 3 * n {
        return Err(Error::input(
            &path,
            format!(
                "{tensors} tensors, the model's state has {}: saved by another configuration",
                3 * n
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
    let scalar =
        |t: &Tensor| -> Result<u64> { Ok(t.to_dtype(DType::I64)?.to_vec1::<i64>()?[0] as u64) };
    let steps = scalar(get(META_STEP)?)?;
    opt.step = match map.get(META_UPDATES) {
        Some(t) => scalar(t)?,
        None => steps,
    };
    opt.param_steps = match map.get(META_PARAM_STEPS) {
        Some(t) => {
            let v = t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            if v.len() != n {
                return Err(Error::input(
                    &path,
                    format!("{} AdamW step counts for {n} tensors", v.len()),
                ));
            }
            v.into_iter().map(|s| s as u64).collect()
        }
        None => vec![opt.step; n],
    };
    if let Some(s) = scaler {
        if let Some(t) = map.get(META_LOSS_SCALE) {
            let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            s.scale = v[0];
            s.tracker = v[1] as u64;
        }
    }
    Ok(steps)
}
