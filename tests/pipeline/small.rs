//! The `pipeline_small` fixture: the full MCLD sampling loop (reference UNet once, 4 guided DDIM
//! steps, VAE decode) on tiny random weights, every step compared; then the same case with the
//! networks in f16 and bf16 against the f32 reference image.

use crate::common;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use mcld::models::mcld::{Mcld, McldConfig};
use mcld::models::unet::IpAdapter;
use mcld::models::vae;
use mcld::pipeline::mcld::Precision;
use mcld::pipeline::sampler::{decode, denoise, Conditioning, StepRecord};
use mcld::scheduler::ddim::{DdimConfig, DdimScheduler};

fn module_vb(case: &common::Case, m: &str, prec: Precision) -> VarBuilder<'static> {
    let prefix = case.json["modules"][m]["prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let w = prec.round(case.weights_with_prefix(&prefix)).unwrap();
    prec.var_builder(VarBuilder::from_tensors(w, prec.compute, &common::device()))
}

fn cfg<T: serde::de::DeserializeOwned>(case: &common::Case, m: &str) -> T {
    serde_json::from_value(case.json["modules"][m]["config"].clone()).unwrap()
}

/// Runs the case at the precision the pipeline uses for `dtype` on the CPU; returns steps,
/// latents and image.
fn run_case(case: &common::Case, dtype: DType) -> (Vec<StepRecord>, Tensor, Tensor) {
    let prec = Precision::new(&common::device(), dtype);
    let dtype = prec.compute;
    let ipj = &case.json["modules"]["denoising_unet"]["ip_adapter"];
    let mcfg = McldConfig {
        unet: cfg(case, "denoising_unet"),
        pose_guider: cfg(case, "pose_guider"),
        image_proj: cfg(case, "image_proj"),
        ip: IpAdapter {
            num_tokens: ipj["num_tokens"].as_u64().unwrap() as usize,
            scale: ipj["scale"].as_f64().unwrap(),
        },
    };
    let ucfg_r: mcld::models::unet::Config = cfg(case, "reference_unet");
    assert_eq!(ucfg_r, mcfg.unet, "one UNet config for both roles");
    // The composite case's weights under their module prefixes, as `Mcld::new` takes them.
    let parts: std::collections::HashMap<String, Tensor> = case
        .tensors
        .iter()
        .filter(|(k, _)| Mcld::PARTS.iter().any(|p| k.starts_with(&format!("{p}."))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let nets = Mcld::new(
        prec.var_builder(VarBuilder::from_tensors(
            prec.round(parts).unwrap(),
            dtype,
            &common::device(),
        )),
        &mcfg,
    )
    .unwrap();
    let vae = vae::AutoencoderKL::new(module_vb(case, "vae", prec), &cfg(case, "vae")).unwrap();
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
        |_, _| Ok(()),
    )
    .unwrap();
    let image = decode(&vae, &latents, dtype).unwrap();
    (steps, latents, image)
}

#[test]
fn pipeline_small_matches_every_step() {
    let case = common::load_case("model", "pipeline_small");
    let (steps, latents, image) = run_case(&case, DType::F32);
    for (i, s) in steps.iter().enumerate() {
        common::check_output(&case, &format!("output.step{i}.noise_pred"), &s.noise_pred);
        common::check_output(&case, &format!("output.step{i}.latents"), &s.latents);
    }
    common::check_output(&case, "output.latents", &latents);
    common::check_output(&case, "output.image", &image);
}

/// PSNR (data range 1) and max abs error of an image in [0, 1] against the f32 reference.
fn image_error(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.dims(), want.dims());
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    let mse = d
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let max = d
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let psnr = if mse.is_nan() {
        f64::NAN
    } else {
        -10.0 * mse.max(1e-20).log10()
    };
    (psnr, max)
}

/// Half precision has no bit-level reference, so the bound is on the final image, where
/// precision shows: one 8-bit level is 1/255, and PSNR 40 dB is an RMS error of 1% of the range
/// (about 2.5 levels), below what anyone sees; f16's unit roundoff (2^-11) leaves ample room.
/// bf16 keeps 8 bits of mantissa (roundoff 2^-8, itself one 8-bit level per operation), so over
/// four UNet passes and a decode it is held to 30 dB (RMS 3%, about 8 levels). NaN fails both.
/// On a CPU with AVX-512 BF16 every matmul, convolution and attention product takes bf16
/// operands (f32 accumulation, f32 activations); elsewhere bf16 means bf16-rounded weights with
/// f32 arithmetic (`Precision`). The bound is the same.
fn half_case(dtype: DType, min_psnr: f64) {
    let case = common::load_case("model", "pipeline_small");
    let (_, latents, image) = run_case(&case, dtype);
    let want = case.f32("output.image");
    let (psnr, max_err) = image_error(&image, &want);
    let (lat_err, lat_max) = common::max_errs(&latents, &case.f32("output.latents"));
    println!(
        "{dtype:?} ({}): image PSNR {psnr:.2} dB vs f32 reference (bound >= {min_psnr} dB), \
         max abs err {max_err:.3e} ({:.1} levels of 255); latents max abs err {lat_err:.3e} \
         (max|expected| {lat_max:.3e})",
        Precision::new(&common::device(), dtype).describe(),
        max_err * 255.0,
    );
    assert!(
        psnr >= min_psnr,
        "{dtype:?}: PSNR {psnr:.2} dB < {min_psnr} dB"
    );
}

#[test]
fn pipeline_small_f16_close_to_f32() {
    half_case(DType::F16, 40.0);
}

#[test]
fn pipeline_small_bf16_close_to_f32() {
    half_case(DType::BF16, 30.0);
}
