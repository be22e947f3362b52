//! Gradients on the training path: finite-difference checks (f64) of every op the trained
//! networks use in place of candle's fused or broken-backward ones, of the whole tiny MCLD loss
//! with respect to weights of each network, and coverage (every trainable tensor gets a
//! gradient, no frozen one does).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::SeedableRng;

use mcld::models::layers::layer_norm;
use mcld::models::mcld::Mcld;
use mcld::models::unet::nearest_resize;
use mcld::ops::attention::{attention, attention_chunked};
use mcld::train::step::loss::{mcld_loss, LossOptions};
use mcld::train::step::trainer::randn;

use crate::common::load_case;
use crate::step::{fixture_setup, FixtureInputs};

pub(crate) fn rand64(seed: u64, dims: &[usize]) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    randn(&mut rng, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

pub(crate) fn vec64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Central differences of scalar `f` at `x0` on up to `probes` evenly spread entries, against
/// the autograd gradient `g`. Errors are relative to max(1e-3, max|g|).
pub(crate) fn fd_check(
    name: &str,
    x0: &Tensor,
    g: &Tensor,
    probes: usize,
    f: &dyn Fn(&Tensor) -> f64,
) {
    let flat = vec64(x0);
    let gv = vec64(g);
    assert_eq!(flat.len(), gv.len(), "{name}: gradient shape");
    let scale = gv.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let n = flat.len();
    let step = (n / probes.max(1)).max(1);
    let h = 1e-5;
    let mut worst = 0f64;
    for idx in (0..n).step_by(step) {
        let mut p = flat.clone();
        p[idx] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x0.shape(), &Device::Cpu).unwrap());
        p[idx] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x0.shape(), &Device::Cpu).unwrap());
        let fd = (fp - fm) / (2.0 * h);
        worst = worst.max((fd - gv[idx]).abs() / scale);
    }
    println!("{name}: worst |fd - grad| / max|grad| = {worst:.2e}");
    assert!(
        worst < 1e-5,
        "{name}: finite differences disagree ({worst:.2e})"
    );
}

/// Gradient of `f` (built from tensors) with respect to each of `inputs`, then FD checks.
pub(crate) fn check_op(
    name: &str,
    inputs: &[Tensor],
    probes: usize,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let store = f(&ts).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = store
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: input {i} has no gradient"));
        let at = |x: &Tensor| -> f64 {
            let mut xs: Vec<Tensor> = inputs.to_vec();
            xs[i] = x.clone();
            f(&xs).to_scalar::<f64>().unwrap()
        };
        fd_check(&format!("{name}[{i}]"), &inputs[i], g, probes, &at);
    }
}

/// Projects an output onto fixed random weights so every output entry matters.
pub(crate) fn project(y: &Tensor, seed: u64) -> Tensor {
    let r = rand64(seed, y.dims());
    (y * r).unwrap().sum_all().unwrap()
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    let x = rand64(1, &[2, 5, 12]);
    let w = rand64(2, &[12]).affine(0.5, 1.0).unwrap();
    let b = rand64(3, &[12]);
    check_op("layer_norm", &[x, w, b], 40, &|t| {
        let map = HashMap::from([
            ("weight".to_string(), t[1].clone()),
            ("bias".to_string(), t[2].clone()),
        ]);
        let vb = VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
        let ln = layer_norm(vb, 12, 1e-5).unwrap();
        project(&ln.forward(&t[0]).unwrap(), 4)
    });
}

#[test]
fn group_norm_gradients_match_finite_differences() {
    let x = rand64(5, &[2, 8, 3, 5]);
    let w = rand64(6, &[8]).affine(0.5, 1.0).unwrap();
    let b = rand64(7, &[8]);
    check_op("group_norm", &[x, w, b], 40, &|t| {
        let gn = candle_nn::GroupNorm::new(t[1].clone(), t[2].clone(), 8, 4, 1e-6).unwrap();
        project(&gn.forward(&t[0]).unwrap(), 8)
    });
}

#[test]
fn attention_gradients_match_finite_differences() {
    let q = rand64(9, &[2, 3, 7, 4]);
    let k = rand64(10, &[2, 3, 5, 4]);
    let v = rand64(11, &[2, 3, 5, 4]);
    check_op("attention", &[q.clone(), k.clone(), v.clone()], 30, &|t| {
        project(&attention(&t[0], &t[1], &t[2]).unwrap(), 12)
    });
    // The sliced path (query rows in several chunks) as well.
    check_op("attention_sliced", &[q, k, v], 30, &|t| {
        project(
            &attention_chunked(&t[0], &t[1], &t[2], 2 * 3 * 5 * 2).unwrap(),
            12,
        )
    });
}

#[test]
fn nearest_resize_accumulates_gradients() {
    // The input is used twice (as the UNet's skip and upsample paths do); candle's own
    // upsample_nearest2d would overwrite one of the two contributions.
    let x = rand64(13, &[1, 2, 3, 5]);
    check_op("nearest_resize_2x", std::slice::from_ref(&x), 30, &|t| {
        let up = nearest_resize(&t[0], 6, 10).unwrap();
        (project(&up, 14) + project(&t[0], 15)).unwrap()
    });
    // Odd target sizes (a skip of odd size).
    check_op("nearest_resize_odd", &[x], 30, &|t| {
        project(&nearest_resize(&t[0], 7, 11).unwrap(), 16)
    });
}

#[test]
fn conv_geglu_silu_gradients_match_finite_differences() {
    let x = rand64(17, &[1, 3, 6, 7]);
    let w = (rand64(18, &[4, 3, 3, 3]) * 0.3).unwrap();
    let b = rand64(19, &[4]);
    check_op("conv2d_stride2_pad1", &[x, w, b], 30, &|t| {
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        // Our convolution (height 6 and width 7 leave different remainders at stride 2, the
        // case candle's own backward gets wrong).
        let conv = mcld::ops::conv::Conv2d::new(t[1].clone(), Some(t[2].clone()), cfg);
        project(&conv.forward(&t[0]).unwrap().silu().unwrap(), 20)
    });
    let h = rand64(21, &[2, 3, 8]);
    check_op("geglu", &[h], 30, &|t| {
        let a = t[0].narrow(2, 0, 4).unwrap();
        let gate = t[0].narrow(2, 4, 4).unwrap();
        project(&(a * gate.gelu_erf().unwrap()).unwrap(), 22)
    });
}

#[test]
fn bank_round_trip_rounds_the_gradient_to_f16() {
    // The reference copies the bank with .to(float16); autograd casts the gradient back, so the
    // reference UNet receives an f16-rounded gradient (the fixture notes' `bank_backward`).
    let x = Var::from_tensor(&rand64(23, &[64]).to_dtype(DType::F32).unwrap()).unwrap();
    let up = (rand64(24, &[64]) * 1e-3)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let y = x
        .as_tensor()
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let g = (y * &up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .clone();
    let want = up
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        g.to_vec1::<f32>().unwrap(),
        want.to_vec1::<f32>().unwrap(),
        "gradient through the f16 round trip is the f16-rounded upstream gradient"
    );
    assert_ne!(
        g.to_vec1::<f32>().unwrap(),
        up.to_vec1::<f32>().unwrap(),
        "the rounding is visible at this scale"
    );
}

/// The whole tiny MCLD loss in f64 (bank rounding off) against finite differences, with
/// respect to weights in each of the four networks, including the reference UNet's, whose
/// gradient arrives only through the bank.
#[test]
fn mcld_loss_gradients_match_finite_differences() {
    let case = load_case("model", "train_step");
    let (params, cfg, sched) = fixture_setup(&case, DType::F64);
    let fx = FixtureInputs::load(&case, DType::F64);
    let opts = LossOptions {
        snr_gamma: 5.0,
        bank_fp16_round: false,
    };
    let loss_with = |overrides: &HashMap<String, Tensor>, tracked: bool| -> Tensor {
        for (k, v) in overrides {
            params.set(k, v).unwrap();
        }
        let vb = params.var_builder(DType::F64, tracked).unwrap();
        let nets = Mcld::new(vb, &cfg).unwrap();
        let inp = fx.inputs(true);
        mcld_loss(&nets, &sched, &inp, opts, None).unwrap().loss
    };
    let watched = [
        "reference_unet.down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k.weight",
        "reference_unet.mid_block.resnets.0.conv1.weight",
        "denoising_unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_k_ip.weight",
        "denoising_unet.up_blocks.2.upsamplers.0.conv.weight",
        "denoising_unet.down_blocks.2.resnets.0.conv_shortcut.weight",
        "denoising_unet.down_blocks.0.attentions.0.norm.weight",
        "pose_guider.conv_in.weight",
        "image_proj.latents",
        "image_proj.layers.0.0.norm1.weight",
    ];
    let store = loss_with(&HashMap::new(), true).backward().unwrap();
    for name in watched {
        let i = params
            .index_of(name)
            .unwrap_or_else(|| panic!("{name} is not trainable"));
        let var = &params.trainable()[i].1;
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .to_dtype(DType::F64)
            .unwrap();
        let x0 = var.as_tensor().copy().unwrap();
        let at = |x: &Tensor| -> f64 {
            let l = loss_with(&HashMap::from([(name.to_string(), x.clone())]), false);
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        fd_check(name, &x0, &g, 6, &at);
        params.set(name, &x0).unwrap();
    }
}

/// Every trainable tensor receives a gradient, nonzero except where MCLD's structure makes it
/// exactly zero; no frozen tensor is reached.
#[test]
fn every_trainable_tensor_gets_a_gradient_and_no_frozen_one_does() {
    let case = load_case("model", "train_step");
    let (params, cfg, sched) = fixture_setup(&case, DType::F32);
    let vb = params.var_builder(DType::F32, true).unwrap();
    let nets = Mcld::new(vb, &cfg).unwrap();
    let fx = FixtureInputs::load(&case, DType::F32);
    let inp = fx.inputs(true);
    let store = mcld_loss(&nets, &sched, &inp, LossOptions::default(), None)
        .unwrap()
        .loss
        .backward()
        .unwrap();
    let mut with_grad = 0;
    let mut zero = Vec::new();
    for (name, var) in params.trainable() {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("trainable {name} received no gradient"));
        with_grad += 1;
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if s == 0.0 {
            zero.push(name.clone());
        }
    }
    // A cross-attention whose non-face context is one token (the reference UNet's everywhere,
    // CLIP(source) in the denoising UNet's down blocks, CLIP(texture) in its up blocks) has a
    // softmax over one key, constantly 1: its keys get exactly zero gradient (the fixture notes
    // say so). In the reference UNet no IP branch shares the queries, so the queries and the
    // norm2 that only feeds them get none either. The denoising mid block attends to two
    // tokens and must have a gradient. Nothing else may be zero.
    for name in &zero {
        let reference = name.starts_with("reference_unet.");
        let one_token_keys =
            name.ends_with("attn2.to_k.weight") && (reference || !name.contains("mid_block"));
        let reference_queries = reference
            && (name.ends_with("attn2.to_q.weight")
                || name.ends_with(".norm2.weight")
                || name.ends_with(".norm2.bias"));
        assert!(
            one_token_keys || reference_queries,
            "{name} has an all-zero gradient"
        );
    }
    // Frozen tensors are plain tensors, not variables: candle's store may hold a by-product
    // value for them (it fills in every op argument), but nothing reads or applies it; the
    // trainer test checks they never change.
    for (name, t) in params.frozen() {
        assert!(!t.is_variable(), "frozen {name} is a variable");
        assert!(
            params.index_of(name).is_none(),
            "frozen {name} is trainable"
        );
    }
    println!(
        "gradient coverage: {with_grad}/{} trainable tensors, {} structurally zero, {} frozen",
        params.trainable().len(),
        zero.len(),
        params.frozen().len()
    );
    assert_eq!(with_grad, params.trainable().len());
    assert!(!params.frozen().is_empty());
}

/// Activation checkpointing recomputes each UNet block in the backward pass: the gradients must
/// be those of the plain backward pass, with and without the reference bank. In f64, so that
/// the bound (1e-10 relative) sees any slip far below f32's summation-order noise (in f32 the
/// worst weight differed by 1.1e-5 relative, one of 1,316).
#[test]
fn checkpointed_gradients_equal_plain_ones() {
    use mcld::ops::recompute::Tape;
    let case = load_case("model", "train_step");
    let (params, cfg, sched) = fixture_setup(&case, DType::F64);
    let vb = params.var_builder(DType::F64, true).unwrap();
    let nets = Mcld::new(vb, &cfg).unwrap();
    let fx = FixtureInputs::load(&case, DType::F64);
    for with_bank in [true, false] {
        let inp = fx.inputs(with_bank);
        // f16 rounding of the bank gradient would turn float noise into visible steps.
        let opts = LossOptions {
            snr_gamma: 5.0,
            bank_fp16_round: false,
        };
        let plain_out = mcld_loss(&nets, &sched, &inp, opts, None).unwrap();
        let plain = plain_out.loss.backward().unwrap();
        let tape = Tape::new();
        let ck_out = mcld_loss(&nets, &sched, &inp, opts, Some(&tape)).unwrap();
        assert!(tape.len() >= 9, "every block is a segment ({})", tape.len());
        // Same forward, up to float noise.
        let (l0, l1) = (
            plain_out.loss.to_scalar::<f64>().unwrap(),
            ck_out.loss.to_scalar::<f64>().unwrap(),
        );
        assert!(
            (l0 - l1).abs() <= 1e-12 * l0.abs(),
            "forward differs: {l0} vs {l1}"
        );
        let ck = tape.backward(&ck_out.loss).unwrap();
        let mut worst = 0f64;
        let mut reached = 0;
        for (name, var) in params.trainable() {
            let a = plain.get(var.as_tensor());
            let b = ck.get(var.as_tensor());
            assert_eq!(
                a.is_some(),
                b.is_some(),
                "{name}: gradient presence differs"
            );
            if let (Some(a), Some(b)) = (a, b) {
                reached += 1;
                let (err, mx) = crate::common::max_errs(b, a);
                let rel = err / mx.max(1e-12);
                if rel > 1e-10 {
                    println!("{name}: relative difference {rel:.2e} (max|plain| {mx:.2e})");
                }
                worst = worst.max(rel);
            }
        }
        println!("bank {with_bank}: {reached} gradients, worst relative difference {worst:.2e}");
        assert!(
            worst <= 1e-10,
            "checkpointed gradients differ by {worst:.2e}"
        );
        if !with_bank {
            // The unconditional step never runs the reference UNet.
            assert!(params
                .trainable()
                .iter()
                .filter(|(n, _)| n.starts_with("reference_unet."))
                .all(|(_, v)| ck.get(v.as_tensor()).is_none()));
        }
    }
}

/// The tape with glue between segments (glue reading segment outputs, glue with its own weights,
/// one glue tensor feeding two segments, a segment fed another's output directly, and an input
/// variable feeding glue): gradients of every weight and of the input equal the plain backward
/// pass's (f64, 1e-12 relative).
#[test]
fn tape_with_glue_between_segments_matches_the_plain_backward() {
    use mcld::ops::recompute::Tape;
    let var = |seed: u64, dims: &[usize]| Var::from_tensor(&rand64(seed, dims)).unwrap();
    let x = var(700, &[3, 5]);
    let (wa, wb, wc, wd, we) = (
        var(701, &[5, 5]),
        var(702, &[5, 5]),
        var(703, &[5, 5]),
        var(704, &[5, 5]),
        var(705, &[5, 5]),
    );
    let ws = [&x, &wa, &wb, &wc, &wd, &we];
    type SegFn = Box<dyn Fn(&[Tensor]) -> Tensor>;
    let loss_of = |tape: Option<&Tape<'_>>| -> Tensor {
        let seg = |inputs: Vec<Tensor>, f: SegFn| -> Tensor {
            match tape {
                Some(t) => t
                    .run(inputs, move |i: &[Tensor]| Ok(vec![f(i)]))
                    .unwrap()
                    .remove(0),
                None => f(&inputs),
            }
        };
        let x = x.as_tensor();
        // Glue from the input, shared by two segments.
        let shared = x.matmul(wa.as_tensor()).unwrap().tanh().unwrap();
        let wb_ = wb.as_tensor().clone();
        let s1 = seg(
            vec![x.clone(), shared.clone()],
            Box::new(move |i| (i[0].matmul(&wb_).unwrap().tanh().unwrap() * &i[1]).unwrap()),
        );
        // Glue reading a segment output, with its own weight.
        let g1 = (s1.matmul(wc.as_tensor()).unwrap().sin().unwrap() + &shared).unwrap();
        let wd_ = wd.as_tensor().clone();
        let s2 = seg(
            vec![g1, shared, s1.clone()],
            Box::new(move |i| {
                ((i[0].matmul(&wd_).unwrap() + &i[1])
                    .unwrap()
                    .tanh()
                    .unwrap()
                    + &i[2])
                    .unwrap()
            }),
        );
        let we_ = we.as_tensor().clone();
        let s3 = seg(
            vec![s2.clone()],
            Box::new(move |i| i[0].matmul(&we_).unwrap().cos().unwrap()),
        );
        (s3.sqr().unwrap().sum_all().unwrap() + (s2 * 0.5).unwrap().sum_all().unwrap()).unwrap()
    };
    let plain = loss_of(None).backward().unwrap();
    let tape = Tape::new();
    let loss = loss_of(Some(&tape));
    assert_eq!(tape.len(), 3);
    let taped = tape.backward(&loss).unwrap();
    for (i, w) in ws.iter().enumerate() {
        let a = vec64(plain.get(w.as_tensor()).unwrap());
        let b = vec64(
            taped
                .get(w.as_tensor())
                .unwrap_or_else(|| panic!("tensor {i}: no gradient through the tape")),
        );
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            err <= 1e-12 * scale,
            "tensor {i}: gradient differs by {err:.2e}"
        );
    }
}
