//! The training step against the `train_step` fixture (MCLD's train.py on tiny weights).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use mcld::models::mcld::{Mcld, McldConfig};
use mcld::models::unet::IpAdapter;
use mcld::models::{pose_guider, resampler, unet};
use mcld::scheduler::ddim::{DdimConfig, DdimScheduler};
use mcld::train::step::adamw::{AdamW, AdamWConfig};
use mcld::train::step::loss::{mcld_loss, LossInputs, LossOptions};
use mcld::train::step::params::{is_trainable, Params};

use crate::common::{self, check_output, load_case, Case};

fn json_at<T: serde::de::DeserializeOwned>(case: &Case, pointer: &str) -> T {
    serde_json::from_value(case.json.pointer(pointer).unwrap().clone()).unwrap()
}

/// The fixture's networks and scheduler, read from its JSON (no shape assumed).
pub fn fixture_setup(case: &Case, dtype: DType) -> (Params, McldConfig, DdimScheduler) {
    let m = &case.json["modules"];
    let ip = &m["denoising_unet"]["ip_adapter"];
    let cfg = McldConfig {
        unet: json_at::<unet::Config>(case, "/modules/denoising_unet/config"),
        pose_guider: json_at::<pose_guider::Config>(case, "/modules/pose_guider/config"),
        image_proj: json_at::<resampler::Config>(case, "/modules/image_proj/config"),
        ip: IpAdapter {
            num_tokens: ip["num_tokens"].as_u64().unwrap() as usize,
            scale: ip["scale"].as_f64().unwrap(),
        },
    };
    let weights: HashMap<String, Tensor> = case
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let params = Params::with_dtype(weights, is_trainable, &common::device(), dtype).unwrap();
    let sched: DdimConfig = json_at(case, "/scheduler_config");
    (params, cfg, DdimScheduler::new(sched).unwrap())
}

/// The fixture's loss inputs, owned (pose as the guider sees it, u8 / 255).
pub struct FixtureInputs {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub ref_latents: Tensor,
    pub clip_src: Tensor,
    pub clip_tex: Tensor,
    pub face: Tensor,
    pub pose: Tensor,
}

impl FixtureInputs {
    pub fn load(case: &Case, dtype: DType) -> Self {
        let t = |k: &str| case.f32(k).to_dtype(dtype).unwrap();
        Self {
            latents: t("input.latents"),
            noise: t("input.noise"),
            timesteps: case.get("input.timesteps").clone(),
            ref_latents: t("input.ref_latents"),
            clip_src: t("input.clip_src_embeds"),
            clip_tex: t("input.clip_tex_embeds"),
            face: t("input.face_emb"),
            pose: (case.f32("input.pose_image_u8") / 255.0).unwrap(),
        }
    }

    /// Borrowed inputs; without the bank for an unconditional step.
    pub fn inputs(&self, with_bank: bool) -> LossInputs<'_> {
        LossInputs {
            latents: &self.latents,
            noise: &self.noise,
            timesteps: &self.timesteps,
            ref_latents: with_bank.then_some(&self.ref_latents),
            clip_src: &self.clip_src,
            clip_tex: &self.clip_tex,
            face_emb: &self.face,
            pose: &self.pose,
        }
    }
}

#[test]
fn train_step_matches_reference() {
    let case = load_case("model", "train_step");
    let p = &case.json["params"];
    let (params, cfg, sched) = fixture_setup(&case, DType::F32);
    assert_eq!(
        params.frozen().len() as u64,
        p["frozen_reference_params"].as_u64().unwrap(),
        "frozen tensor count"
    );
    assert_eq!(
        params.trainable().len() as u64,
        p["params_with_grad"]["tensors"].as_u64().unwrap(),
        "trainable tensor count"
    );
    assert_eq!(
        params.trainable_elems() as u64,
        p["params_with_grad"]["elements"].as_u64().unwrap()
    );

    let vb = params.var_builder(DType::F32, true).unwrap();
    let nets = Mcld::new(vb, &cfg).unwrap();
    let fx = FixtureInputs::load(&case, DType::F32);
    let inp = fx.inputs(true);
    let opts = LossOptions {
        snr_gamma: p["snr_gamma"].as_f64().unwrap(),
        bank_fp16_round: true,
    };
    let out = mcld_loss(&nets, &sched, &inp, opts, None).unwrap();
    check_output(&case, "output.noisy_latents", &out.noisy_latents);
    check_output(&case, "output.target", &out.target);
    check_output(&case, "output.face_mask", &out.face_mask);
    check_output(&case, "output.mse_loss_weights", &out.weights);
    check_output(&case, "output.model_pred", &out.model_pred);
    check_output(&case, "output.loss_per_sample", &out.loss_per_sample);
    check_output(&case, "output.loss", &out.loss.reshape(1).unwrap());

    let store = out.loss.backward().unwrap();
    let grads: Vec<Tensor> = params
        .trainable()
        .iter()
        .map(|(n, v)| {
            store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient"))
                .clone()
        })
        .collect();
    let grad_keys = case.keys_with_prefix("output.grad.");
    assert!(!grad_keys.is_empty());
    for key in &grad_keys {
        let name = key.strip_prefix("output.grad.").unwrap();
        let i = params.index_of(name).unwrap();
        check_output(&case, key, &grads[i]);
    }

    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: p["betas"][0].as_f64().unwrap(),
            beta2: p["betas"][1].as_f64().unwrap(),
            weight_decay: p["weight_decay"].as_f64().unwrap(),
            eps: p["eps"].as_f64().unwrap(),
            max_grad_norm: p["max_grad_norm"].as_f64().unwrap(),
        },
        params.trainable(),
    )
    .unwrap();
    let before: HashMap<String, Tensor> = case
        .keys_with_prefix("output.param_after.")
        .iter()
        .map(|k| {
            let n = k.strip_prefix("output.param_after.").unwrap();
            (n.to_string(), params.get(n).unwrap().copy().unwrap())
        })
        .collect();
    let norm = opt
        .step(params.trainable(), &grads, p["lr"].as_f64().unwrap())
        .unwrap();
    check_output(
        &case,
        "output.grad_norm",
        &Tensor::new(&[norm as f32], &common::device()).unwrap(),
    );
    for key in case.keys_with_prefix("output.param_after.") {
        let n = key.strip_prefix("output.param_after.").unwrap();
        let after = params.get(n).unwrap();
        check_output(&case, &key, &after);
        let upd_key = format!("output.update.{n}");
        if case.tensors.contains_key(&upd_key) {
            check_output(&case, &upd_key, &(&before[n] - &after).unwrap());
        }
    }
}
