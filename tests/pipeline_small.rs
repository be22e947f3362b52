//! The `pipeline_small` fixture: the full MCLD sampling loop (reference UNet once, 4 guided DDIM
//! steps, VAE decode) on tiny random weights, every step compared.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mcld::models::unet::{IpAdapter, UNet2DConditionModel};
use mcld::models::{pose_guider, resampler, unet, vae};
use mcld::pipeline::sampler::{decode, denoise, Conditioning, McldNets};
use mcld::scheduler::ddim::{DdimConfig, DdimScheduler};

fn module_vb(case: &common::Case, m: &str) -> VarBuilder<'static> {
    let prefix = case.json["modules"][m]["prefix"]
        .as_str()
        .unwrap()
        .to_string();
    VarBuilder::from_tensors(case.weights_with_prefix(&prefix), DType::F32, &Device::Cpu)
}

fn cfg<T: serde::de::DeserializeOwned>(case: &common::Case, m: &str) -> T {
    serde_json::from_value(case.json["modules"][m]["config"].clone()).unwrap()
}

#[test]
fn pipeline_small_matches_every_step() {
    let case = common::load_case("model", "pipeline_small");
    let ucfg_r: unet::Config = cfg(&case, "reference_unet");
    let ucfg_d: unet::Config = cfg(&case, "denoising_unet");
    let ipj = &case.json["modules"]["denoising_unet"]["ip_adapter"];
    let ip = IpAdapter {
        num_tokens: ipj["num_tokens"].as_u64().unwrap() as usize,
        scale: ipj["scale"].as_f64().unwrap(),
    };
    let nets = McldNets {
        reference_unet: UNet2DConditionModel::new_reference(
            module_vb(&case, "reference_unet"),
            &ucfg_r,
        )
        .unwrap(),
        denoising_unet: UNet2DConditionModel::new_denoising(
            module_vb(&case, "denoising_unet"),
            &ucfg_d,
            ip,
        )
        .unwrap(),
        pose_guider: pose_guider::PoseGuider::new(
            module_vb(&case, "pose_guider"),
            &cfg(&case, "pose_guider"),
        )
        .unwrap(),
        image_proj: resampler::Resampler::new(
            module_vb(&case, "image_proj"),
            &cfg(&case, "image_proj"),
        )
        .unwrap(),
    };
    let vae = vae::AutoencoderKL::new(module_vb(&case, "vae"), &cfg(&case, "vae")).unwrap();
    let sc: DdimConfig = serde_json::from_value(case.json["scheduler_config"].clone()).unwrap();
    let mut sched = DdimScheduler::new(sc).unwrap();
    let params = &case.json["params"];
    sched
        .set_timesteps(params["num_inference_steps"].as_u64().unwrap() as usize)
        .unwrap();
    let want_t: Vec<usize> = params["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(sched.timesteps(), &want_t[..]);

    let cond = Conditioning {
        clip_src: case.f32("input.clip_src_embeds"),
        clip_tex: case.f32("input.clip_tex_embeds"),
        face: case.f32("input.face_emb"),
        ref_latents: case.f32("input.ref_latents"),
        pose: (case.f32("input.pose_image_u8") / 255.0).unwrap(),
    };
    let guidance = params["guidance_scale"].as_f64().unwrap();
    let (latents, steps) = denoise(
        &nets,
        &sched,
        &cond,
        &case.f32("input.init_noise"),
        guidance,
        |_, _| {},
    )
    .unwrap();
    for (i, s) in steps.iter().enumerate() {
        common::check_output(&case, &format!("output.step{i}.noise_pred"), &s.noise_pred);
        common::check_output(&case, &format!("output.step{i}.latents"), &s.latents);
    }
    common::check_output(&case, "output.latents", &latents);
    let image: Tensor = decode(&vae, &latents).unwrap();
    common::check_output(&case, "output.image", &image);
}
