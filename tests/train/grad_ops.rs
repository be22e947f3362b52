//! Our own ops' backward passes (`mcld::ops`: conv_grad, attention::grad, norm::grad, geglu_grad,
//! linear_grad): finite differences in f64 through the same code,
//! and the f32 kernels against candle's composed ops computed in f64.

use candle_core::{DType, Tensor, Var};

use mcld::ops::conv_grad;

use crate::common::max_errs;
use crate::grad::{check_op, project, rand64};

/// (n, ci, h, w, co, k, stride, padding, dilation)
type ConvCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

fn op_conv(t: &[Tensor], c: ConvCase, bias: bool) -> Tensor {
    let (.., s, p, d) = c;
    conv_grad::conv2d(&t[0], &t[1], bias.then(|| &t[2]), p, s, d, 1)
        .unwrap()
        .expect("the conv op applies")
}

fn conv_inputs(c: ConvCase, seed: u64) -> Vec<Tensor> {
    let (n, ci, h, w, co, k, ..) = c;
    let scale = 1.0 / ((ci * k * k) as f64).sqrt();
    vec![
        rand64(seed, &[n, ci, h, w]),
        (rand64(seed + 1, &[co, ci, k, k]) * scale).unwrap(),
        rand64(seed + 2, &[co]),
    ]
}

/// Every path of the op: stride 1 padded (the flipped-weight input gradient), stride 2 with
/// height and width leaving different remainders (col2im; candle's own backward fails there),
/// 1x1, unpadded, dilated, and no bias.
#[test]
fn conv_op_gradients_match_finite_differences() {
    let cases: [(&str, ConvCase, bool); 6] = [
        ("3x3_s1_p1", (2, 3, 6, 7, 4, 3, 1, 1, 1), true),
        ("3x3_s2_p1", (1, 3, 6, 7, 4, 3, 2, 1, 1), true),
        ("1x1", (2, 5, 4, 3, 3, 1, 1, 0, 1), true),
        ("3x3_s1_p0", (1, 2, 6, 5, 3, 3, 1, 0, 1), false),
        ("3x3_s1_p1_d2", (1, 2, 7, 6, 3, 3, 1, 1, 2), true),
        ("1x1_s2", (1, 3, 5, 6, 2, 1, 2, 0, 1), false),
    ];
    for (i, (name, c, bias)) in cases.into_iter().enumerate() {
        let mut inputs = conv_inputs(c, 100 + 10 * i as u64);
        if !bias {
            inputs.pop();
        }
        check_op(&format!("conv_op_{name}"), &inputs, 30, &|t| {
            project(&op_conv(t, c, bias), 7 + i as u64)
        });
    }
}

/// Gradients of `project(conv(x, w) + b)` with respect to x, w, b, and the output.
fn conv_grads(inputs: &[Tensor], c: ConvCase, ours: bool) -> (Tensor, Vec<Tensor>) {
    let (.., s, p, d) = c;
    grads_projected(inputs, 999, &|t| {
        if ours {
            op_conv(t, c, true)
        } else {
            let co = t[2].dim(0).unwrap();
            let y = t[0].conv2d(&t[1], p, s, d, 1).unwrap();
            y.broadcast_add(&t[2].reshape((1, co, 1, 1)).unwrap())
                .unwrap()
        }
    })
}

/// The f32 op (packed kernels on AVX-512F) against candle's composed convolution in f64, on
/// shapes that are no multiple of the kernel's panels and, for the last two, several tiles.
/// Bound: max |ours - candle| <= 1e-5 max |candle| for the output and each gradient.
#[test]
fn conv_op_f32_matches_candle_composed_gradients() {
    let cases: [ConvCase; 6] = [
        (2, 16, 9, 11, 24, 3, 1, 1, 1),
        (2, 13, 10, 10, 40, 3, 2, 1, 1),
        (1, 33, 7, 9, 40, 1, 1, 0, 1),
        (1, 5, 8, 9, 7, 3, 1, 0, 1),
        (1, 64, 66, 64, 8, 3, 1, 1, 1),
        (1, 64, 66, 66, 8, 3, 2, 1, 1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let inputs = conv_inputs(c, 300 + 10 * i as u64);
        let f32s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        // The reference sees the same (f32-rounded) values.
        let f64s: Vec<Tensor> = f32s
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap())
            .collect();
        let (y, g) = conv_grads(&f32s, c, true);
        let (y_ref, g_ref) = conv_grads(&f64s, c, false);
        let mut worst = 0f64;
        for (what, got, want) in [
            ("y", &y, &y_ref),
            ("dx", &g[0], &g_ref[0]),
            ("dw", &g[1], &g_ref[1]),
            ("db", &g[2], &g_ref[2]),
        ] {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            println!("conv {c:?} {what}: max err {err:.2e}, relative {rel:.2e}");
            assert!(rel <= 1e-5, "conv {c:?} {what}: relative error {rel:.2e}");
            worst = worst.max(rel);
        }
        println!("conv {c:?}: worst relative error {worst:.2e}");
    }
}

/// Where candle's composed backward cannot run (stride 2, different remainders per axis), the
/// f32 op against the f64 op (itself checked against finite differences above).
#[test]
fn conv_op_f32_matches_f64_op_on_uneven_stride2() {
    let c: ConvCase = (2, 12, 9, 12, 20, 3, 2, 1, 1);
    let inputs = conv_inputs(c, 500);
    let f32s: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect();
    let f64s: Vec<Tensor> = f32s
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let (y, g) = conv_grads(&f32s, c, true);
    let (y_ref, g_ref) = conv_grads(&f64s, c, true);
    for (what, got, want) in [
        ("y", &y, &y_ref),
        ("dx", &g[0], &g_ref[0]),
        ("dw", &g[1], &g_ref[1]),
        ("db", &g[2], &g_ref[2]),
    ] {
        let (err, mx) = max_errs(got, want);
        let rel = err / mx.max(1e-30);
        println!("uneven stride 2 {what}: relative {rel:.2e}");
        assert!(rel <= 1e-5, "{what}: relative error {rel:.2e}");
    }
}

fn op_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    mcld::ops::attention::grad::attention(q, k, v)
        .unwrap()
        .expect("the attention op applies")
}

/// (B, T, heads * d) -> (B, heads, T, d) as a strided view, as the UNet's layers split heads.
fn heads(x: &Tensor, h: usize) -> Tensor {
    let (b, t, c) = x.dims3().unwrap();
    x.reshape((b, t, h, c / h))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

/// The attention op in f64 against finite differences: contiguous heads with dv != d, heads
/// read from strided views, one key (a constant softmax), and query rows in several blocks.
#[test]
fn attention_op_gradients_match_finite_differences() {
    let q = rand64(40, &[2, 3, 7, 4]);
    let k = rand64(41, &[2, 3, 5, 4]);
    let v = rand64(42, &[2, 3, 5, 6]);
    check_op("attention_op", &[q, k, v], 30, &|t| {
        project(&op_attention(&t[0], &t[1], &t[2]), 43)
    });
    let x = rand64(44, &[2, 6, 8]);
    let ctx = rand64(45, &[2, 9, 8]);
    check_op("attention_op_strided", &[x, ctx], 30, &|t| {
        let o = op_attention(&heads(&t[0], 2), &heads(&t[1], 2), &heads(&t[1], 2));
        project(&o, 46)
    });
    let q = rand64(47, &[1, 2, 4, 3]);
    let k = rand64(48, &[1, 2, 1, 3]);
    let v = rand64(49, &[1, 2, 1, 3]);
    check_op("attention_op_one_key", &[q, k, v], 30, &|t| {
        project(&op_attention(&t[0], &t[1], &t[2]), 50)
    });
    // 300 query rows over 450 keys: two blocks of query rows per head.
    let q = rand64(51, &[1, 2, 300, 4]);
    let k = rand64(52, &[1, 2, 450, 4]);
    let v = rand64(53, &[1, 2, 450, 4]);
    check_op("attention_op_blocks", &[q, k, v], 30, &|t| {
        project(&op_attention(&t[0], &t[1], &t[2]), 54)
    });
}

/// Gradients of a random projection of attention with respect to q, k, v, and the output.
fn attention_grads(inputs: &[Tensor], ours: bool) -> (Tensor, Vec<Tensor>) {
    grads_projected(inputs, 998, &|t| {
        if ours {
            op_attention(&t[0], &t[1], &t[2])
        } else {
            mcld::ops::attention::attention_chunked(&t[0], &t[1], &t[2], 1 << 26).unwrap()
        }
    })
}

/// The f32 op against candle's composed attention in f64, on the UNet's kinds of shapes
/// (self-attention over twice the tokens, as with the bank; a few cross-attention tokens).
/// Bound: max |ours - candle| <= 1e-5 max |candle| for the output and each gradient. On a CPU
/// with AVX-512 the forward pass is the packed kernel's, elsewhere the `gemm` crate's.
#[test]
fn attention_op_f32_matches_candle_composed_gradients() {
    let cases: [(usize, usize, usize, usize, usize); 4] = [
        (2, 4, 256, 512, 20),
        (2, 4, 256, 77, 40),
        (1, 2, 600, 4, 40),
        // Three blocks of query rows per head.
        (1, 2, 300, 1000, 24),
    ];
    for (i, (b, h, tq, tk, d)) in cases.into_iter().enumerate() {
        let seed = 600 + 10 * i as u64;
        let f32s: Vec<Tensor> = [(seed, tq), (seed + 1, tk), (seed + 2, tk)]
            .iter()
            .map(|&(s, t)| rand64(s, &[b, h, t, d]).to_dtype(DType::F32).unwrap())
            .collect();
        let f64s: Vec<Tensor> = f32s
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap())
            .collect();
        let (y, g) = attention_grads(&f32s, true);
        let (y_ref, g_ref) = attention_grads(&f64s, false);
        for (what, got, want) in [
            ("out", &y, &y_ref),
            ("dq", &g[0], &g_ref[0]),
            ("dk", &g[1], &g_ref[1]),
            ("dv", &g[2], &g_ref[2]),
        ] {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            println!("attention {b}x{h}x{tq}x{tk}x{d} {what}: relative {rel:.2e}");
            assert!(rel <= 1e-5, "attention {what}: relative error {rel:.2e}");
        }
    }
}

fn op_group_norm(t: &[Tensor], groups: usize, act: bool) -> Tensor {
    mcld::ops::norm::grad::group_norm(&t[0], groups, 1e-5, &t[1], &t[2], act)
        .unwrap()
        .expect("the group norm op applies")
}

fn op_layer_norm(t: &[Tensor]) -> Tensor {
    mcld::ops::norm::grad::layer_norm(&t[0], 1e-5, &t[1], &t[2])
        .unwrap()
        .expect("the layer norm op applies")
}

/// The norm ops in f64 against finite differences: GroupNorm with and without SiLU (several
/// channels per group), LayerNorm.
#[test]
fn norm_op_gradients_match_finite_differences() {
    for (i, act) in [false, true].into_iter().enumerate() {
        let seed = 700 + 10 * i as u64;
        let x = rand64(seed, &[2, 6, 3, 5]);
        let w = rand64(seed + 1, &[6]).affine(0.5, 1.0).unwrap();
        let b = rand64(seed + 2, &[6]);
        check_op(&format!("group_norm_op_act_{act}"), &[x, w, b], 30, &|t| {
            project(&op_group_norm(t, 3, act), seed + 3)
        });
    }
    let x = rand64(720, &[2, 5, 12]);
    let w = rand64(721, &[12]).affine(0.5, 1.0).unwrap();
    let b = rand64(722, &[12]);
    check_op("layer_norm_op", &[x, w, b], 30, &|t| {
        project(&op_layer_norm(t), 723)
    });
}

/// Gradients of a random projection of `f(x, w, b)` with respect to x, w, b, and the output.
fn grads_of(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    grads_projected(inputs, 997, f)
}

/// [`grads_of`] with the projection's seed.
fn grads_projected(
    inputs: &[Tensor],
    seed: u64,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&t);
    let r = rand64(seed, y.dims()).to_dtype(y.dtype()).unwrap();
    let store = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).unwrap().clone())
        .collect();
    (y, grads)
}

/// LayerNorm from candle's primitives (the reference of the op).
fn composed_layer_norm(t: &[Tensor]) -> Tensor {
    use candle_core::D;
    let mean = t[0].mean_keepdim(D::Minus1).unwrap();
    let xc = t[0].broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&t[1])
        .unwrap()
        .broadcast_add(&t[2])
        .unwrap()
}

/// The f32 norm ops against candle's composed ops in f64, on UNet-like shapes (planes longer
/// than the op's summation chunk included). Bound: max |ours - candle| <= 1e-5 max |candle|
/// for the output and each gradient.
#[test]
fn norm_ops_f32_match_candle_composed_gradients() {
    use candle_core::Module;
    type Case<'a> = (&'a str, Vec<usize>, usize, bool);
    let cases: [Case; 4] = [
        ("group_norm_silu", vec![2, 64, 16, 16], 32, true),
        ("group_norm", vec![1, 32, 64, 64], 32, false),
        ("group_norm_silu_wide_groups", vec![2, 40, 9, 7], 4, true),
        ("layer_norm", vec![2, 100, 320], 0, false),
    ];
    for (i, (name, dims, groups, act)) in cases.into_iter().enumerate() {
        let seed = 800 + 10 * i as u64;
        let c = if groups == 0 { dims[2] } else { dims[1] };
        let inputs = [
            rand64(seed, &dims).affine(2.0, 0.5).unwrap(),
            rand64(seed + 1, &[c]).affine(0.5, 1.0).unwrap(),
            rand64(seed + 2, &[c]),
        ];
        let f32s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let f64s: Vec<Tensor> = f32s
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap())
            .collect();
        let (y, g) = grads_of(&f32s, &|t| {
            if groups == 0 {
                op_layer_norm(t)
            } else {
                op_group_norm(t, groups, act)
            }
        });
        let (y_ref, g_ref) = grads_of(&f64s, &|t| {
            if groups == 0 {
                return composed_layer_norm(t);
            }
            let gn =
                candle_nn::GroupNorm::new(t[1].clone(), t[2].clone(), c, groups, 1e-5).unwrap();
            let y = gn.forward(&t[0]).unwrap();
            if act {
                candle_nn::ops::silu(&y).unwrap()
            } else {
                y
            }
        });
        for (what, got, want) in [
            ("y", &y, &y_ref),
            ("dx", &g[0], &g_ref[0]),
            ("dw", &g[1], &g_ref[1]),
            ("db", &g[2], &g_ref[2]),
        ] {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            println!("{name} {dims:?} {what}: relative {rel:.2e}");
            assert!(rel <= 1e-5, "{name} {what}: relative error {rel:.2e}");
        }
    }
}

fn op_geglu(h: &Tensor) -> Tensor {
    mcld::ops::geglu_grad::geglu(h)
        .unwrap()
        .expect("the geglu op applies")
}

/// GEGLU from candle's primitives (the reference of the op).
fn composed_geglu(h: &Tensor) -> Tensor {
    let inner = h.dim(2).unwrap() / 2;
    let a = h.narrow(2, 0, inner).unwrap();
    let gate = h.narrow(2, inner, inner).unwrap();
    (a * gate.gelu_erf().unwrap()).unwrap()
}

/// The GEGLU op in f64 against finite differences, and in f32 against candle's composed ops in
/// f64 (bound: max |ours - candle| <= 1e-5 max |candle| for the output and the gradient).
#[test]
fn geglu_op_gradients_match_finite_differences_and_candle() {
    let h = rand64(900, &[2, 3, 16]).affine(2.0, 0.0).unwrap();
    check_op("geglu_op", &[h], 40, &|t| project(&op_geglu(&t[0]), 901));
    let h = rand64(902, &[2, 300, 640])
        .affine(2.0, 0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (y, g) = grads_of(std::slice::from_ref(&h), &|t| op_geglu(&t[0]));
    let h64 = h.to_dtype(DType::F64).unwrap();
    let (y_ref, g_ref) = grads_of(&[h64], &|t| composed_geglu(&t[0]));
    for (what, got, want) in [("y", &y, &y_ref), ("dh", &g[0], &g_ref[0])] {
        let (err, mx) = max_errs(got, want);
        let rel = err / mx.max(1e-30);
        println!("geglu {what}: relative {rel:.2e}");
        assert!(rel <= 1e-5, "geglu {what}: relative error {rel:.2e}");
    }
}

fn op_linear(t: &[Tensor]) -> Tensor {
    mcld::ops::linear_grad::linear(&t[0], &t[1], t.get(2))
        .unwrap()
        .expect("the linear op applies")
}

/// candle's composed linear layer (what `candle_nn::Linear` does): the reference of the op.
fn composed_linear(t: &[Tensor]) -> Tensor {
    let y = t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap();
    match t.get(2) {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    }
}

/// The linear op in f64 against finite differences: a batch of sequences with bias, a plain
/// matrix without.
#[test]
fn linear_op_gradients_match_finite_differences() {
    let with_bias = [
        rand64(1000, &[2, 3, 5]),
        rand64(1001, &[4, 5]),
        rand64(1002, &[4]),
    ];
    check_op("linear_op_bias", &with_bias, 30, &|t| {
        project(&op_linear(t), 1003)
    });
    let plain = [rand64(1010, &[7, 6]), rand64(1011, &[3, 6])];
    check_op("linear_op", &plain, 30, &|t| project(&op_linear(t), 1013));
}

/// The f32 op (packed kernels on AVX-512F) against candle's composed linear layer in f64, on
/// transformer shapes and on sizes that are no multiple of the kernel's panels; then with an
/// input that is not a variable (no input gradient asked for; the others unchanged). Bound:
/// max |ours - candle| <= 1e-5 max |candle| for the output and each gradient.
#[test]
fn linear_op_f32_matches_candle_composed_gradients() {
    type Case = ([usize; 3], usize, bool);
    let cases: [Case; 4] = [
        ([2, 300, 320], 1280, true),
        ([1, 77, 768], 320, false),
        ([3, 17, 33], 40, true),
        ([1, 1024, 640], 320, true),
    ];
    for (i, (xd, n, bias)) in cases.into_iter().enumerate() {
        let seed = 1100 + 10 * i as u64;
        let k = xd[2];
        let mut inputs = vec![
            rand64(seed, &xd),
            (rand64(seed + 1, &[n, k]) * (1.0 / (k as f64).sqrt())).unwrap(),
        ];
        if bias {
            inputs.push(rand64(seed + 2, &[n]));
        }
        let f32s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let f64s: Vec<Tensor> = f32s
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap())
            .collect();
        let (y, g) = grads_of(&f32s, &op_linear);
        let (y_ref, g_ref) = grads_of(&f64s, &composed_linear);
        let names = ["dx", "dw", "db"];
        let mut pairs = vec![("y", &y, &y_ref)];
        for (j, name) in names.iter().enumerate().take(g.len()) {
            pairs.push((name, &g[j], &g_ref[j]));
        }
        for (what, got, want) in pairs {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            println!("linear {xd:?} x {n} {what}: relative {rel:.2e}");
            assert!(
                rel <= 1e-5,
                "linear {xd:?} {what}: relative error {rel:.2e}"
            );
        }
        // A constant input: the weight and bias gradients are the same, the input gets none.
        let vars: Vec<Var> = f32s[1..]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let mut t = vec![f32s[0].clone()];
        t.extend(vars.iter().map(|v| v.as_tensor().clone()));
        let y = op_linear(&t);
        let r = rand64(997, y.dims()).to_dtype(DType::F32).unwrap();
        let store = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            store.get(&t[0]).is_none(),
            "a constant input got a gradient"
        );
        for (j, v) in vars.iter().enumerate() {
            let (err, _) = max_errs(store.get(v.as_tensor()).unwrap(), &g[j + 1]);
            assert_eq!(err, 0.0, "linear {xd:?}: gradient {j} changed without dx");
        }
    }
}

/// Whether this CPU runs bf16 products (AVX-512 BF16); says so when it does not.
fn bf16_products_available() -> bool {
    let ok = mcld::ops::autocast::bf16_products().is_some();
    if !ok {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
    }
    ok
}

/// Inside a bf16-products scope (`ops::autocast`) the conv, attention and linear ops multiply
/// bf16-rounded operands with f32 accumulation, in the forward pass and in a backward pass run
/// after the scope ended: output and gradients within bf16's rounding of the f32 ops (bound 1e-2
/// of the largest value; operands carry 8 bits, attention's probabilities are rounded too; its
/// backward pass multiplies in f32 from the bf16 forward's statistics), and not equal to them
/// (the scope did apply).
#[test]
fn bf16_products_scope_rounds_conv_and_linear_operands() {
    if !bf16_products_available() {
        return;
    }
    let to32 = |ts: Vec<Tensor>| -> Vec<Tensor> {
        ts.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
    };
    let conv_case: ConvCase = (2, 16, 9, 11, 24, 3, 1, 1, 1);
    let conv_s2: ConvCase = (1, 13, 10, 10, 40, 3, 2, 1, 1);
    type Run<'a> = (&'a str, Vec<Tensor>, Box<dyn Fn(&[Tensor]) -> Tensor>);
    let runs: Vec<Run> = vec![
        (
            "conv 3x3 s1",
            to32(conv_inputs(conv_case, 1300)),
            Box::new(move |t: &[Tensor]| op_conv(t, conv_case, true)),
        ),
        (
            "conv 3x3 s2",
            to32(conv_inputs(conv_s2, 1310)),
            Box::new(move |t: &[Tensor]| op_conv(t, conv_s2, true)),
        ),
        (
            "attention",
            to32(vec![
                rand64(1330, &[2, 3, 300, 40]),
                rand64(1331, &[2, 3, 700, 40]),
                rand64(1332, &[2, 3, 700, 40]),
            ]),
            Box::new(|t: &[Tensor]| op_attention(&t[0], &t[1], &t[2])),
        ),
        (
            "linear",
            to32(vec![
                rand64(1320, &[2, 70, 96]),
                (rand64(1321, &[48, 96]) * 0.1).unwrap(),
                rand64(1322, &[48]),
            ]),
            Box::new(|t: &[Tensor]| op_linear(t)),
        ),
    ];
    for (name, inputs, f) in runs {
        let (y32, g32) = grads_of(&inputs, &|t| f(t));
        // The forward pass inside the scope; the backward after the scope ended.
        let (y, g) = grads_of(&inputs, &|t| {
            let _scope = mcld::ops::autocast::bf16_products().unwrap();
            f(t)
        });
        let mut pairs: Vec<(&str, &Tensor, &Tensor)> = vec![("y", &y, &y32)];
        let names = if name == "attention" {
            ["dq", "dk", "dv"]
        } else {
            ["dx", "dw", "db"]
        };
        for (j, what) in names.iter().enumerate() {
            pairs.push((*what, &g[j], &g32[j]));
        }
        for (what, got, want) in pairs {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            println!("{name} bf16 products {what}: relative {rel:.2e}");
            assert!(rel <= 1e-2, "{name} {what}: relative error {rel:.2e}");
            // The bias gradient is a plain sum: the same in both modes.
            if what != "db" {
                assert!(rel > 1e-6, "{name} {what}: bf16 products changed nothing");
            }
        }
    }
}

/// With operands that bf16 holds exactly (inputs, weights and the output gradient rounded
/// beforehand), bf16 products differ from f32 ones only in the order of the f32 sums: a packing
/// slip (a channel pair, a flipped tap, the padding of an odd channel count) would show far
/// above the 1e-5 bound. Conv 3x3 stride 1 (the flipped-weight input gradient), stride 2, 1x1,
/// odd channel counts throughout; and linear.
#[test]
fn bf16_products_on_bf16_values_equal_f32_products() {
    if !bf16_products_available() {
        return;
    }
    let round = |t: Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let grads = |inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, bf16: bool| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = {
            let _scope = bf16.then(|| mcld::ops::autocast::bf16_products().unwrap());
            f(&t)
        };
        let r = round(rand64(4242, y.dims()));
        let store = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| store.get(v.as_tensor()).unwrap().clone())
            .collect();
        (y, g)
    };
    let cases: [(&str, ConvCase); 4] = [
        ("conv 3x3 s1", (2, 13, 9, 11, 7, 3, 1, 1, 1)),
        ("conv 3x3 s1 wide", (1, 33, 6, 5, 19, 3, 1, 1, 1)),
        ("conv 3x3 s2", (1, 13, 10, 9, 11, 3, 2, 1, 1)),
        ("conv 1x1", (2, 15, 5, 6, 9, 1, 1, 0, 1)),
    ];
    type OpFn = Box<dyn Fn(&[Tensor]) -> Tensor>;
    type Run = (String, Vec<Tensor>, OpFn);
    let mut runs: Vec<Run> = cases
        .iter()
        .enumerate()
        .map(|(i, &(name, c))| {
            let inputs = conv_inputs(c, 1400 + 10 * i as u64);
            let f: OpFn = Box::new(move |t| op_conv(t, c, true));
            (name.to_string(), inputs, f)
        })
        .collect();
    runs.push((
        "linear".into(),
        vec![
            rand64(1490, &[2, 9, 37]),
            (rand64(1491, &[21, 37]) * 0.1).unwrap(),
            rand64(1492, &[21]),
        ],
        Box::new(op_linear),
    ));
    for (name, inputs, f) in runs {
        let inputs: Vec<Tensor> = inputs
            .into_iter()
            .map(|t| round(t.to_dtype(DType::F32).unwrap()))
            .collect();
        let (y32, g32) = grads(&inputs, &*f, false);
        let (y, g) = grads(&inputs, &*f, true);
        let mut pairs: Vec<(&str, &Tensor, &Tensor)> = vec![("y", &y, &y32)];
        for (j, what) in ["dx", "dw", "db"].iter().enumerate() {
            pairs.push((*what, &g[j], &g32[j]));
        }
        for (what, got, want) in pairs {
            let (err, mx) = max_errs(got, want);
            let rel = err / mx.max(1e-30);
            assert!(rel <= 1e-5, "{name} {what}: relative error {rel:.2e}");
        }
    }
}

/// The weight-gradient collector (`ops::weight_grads`): a conv and a linear layer, each used
/// twice (the in-place sum), plus a weight it was not told about. Collected gradients equal
/// candle's own bit for bit (first kept as computed, then one addition, as candle's
/// zeros + g1 + g2), never reach candle's store, and the uncollected weight still does.
#[test]
fn collected_weight_gradients_equal_candles_and_bypass_its_store() {
    use mcld::ops::weight_grads::{self, WeightGrads};
    use std::sync::Arc;
    let f32var = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
    let c: ConvCase = (2, 5, 6, 7, 5, 3, 1, 1, 1);
    let mut t = conv_inputs(c, 2100);
    let x = t.remove(0).to_dtype(DType::F32).unwrap();
    let (cw, cb) = (f32var(t.remove(0)), f32var(t.remove(0)));
    let (lw, lb) = (f32var(rand64(2110, &[7, 7])), f32var(rand64(2111, &[7])));
    let other = f32var(rand64(2112, &[4, 7]));
    let loss = || {
        let conv = |x: &Tensor| {
            op_conv(
                &[x.clone(), cw.as_tensor().clone(), cb.as_tensor().clone()],
                c,
                true,
            )
        };
        let lin =
            |x: &Tensor| op_linear(&[x.clone(), lw.as_tensor().clone(), lb.as_tensor().clone()]);
        let y = conv(&conv(&x).tanh().unwrap());
        let h = lin(&lin(&y).tanh().unwrap());
        let h = op_linear(&[h, other.as_tensor().clone()]);
        let r = rand64(2120, h.dims()).to_dtype(DType::F32).unwrap();
        (h * r).unwrap().sum_all().unwrap()
    };
    let collected = [&cw, &cb, &lw, &lb];
    let plain = loss().backward().unwrap();
    let sink = Arc::new(WeightGrads::new(collected.iter().map(|v| v.as_tensor())));
    let store = {
        let _scope = weight_grads::collect(&sink);
        loss().backward().unwrap()
    };
    for (i, v) in collected.iter().enumerate() {
        assert!(
            store.get(v.as_tensor()).is_none(),
            "weight {i} reached candle's store"
        );
        let got = sink.take(v.as_tensor()).expect("collected gradient");
        let want = plain.get(v.as_tensor()).unwrap();
        let (err, mx) = max_errs(&got, want);
        println!("weight {i}: max |collected - candle| {err:.1e} of {mx:.2e}");
        assert!(mx > 0.0 && err == 0.0, "weight {i}: differs by {err:e}");
    }
    let (err, mx) = max_errs(
        store.get(other.as_tensor()).expect("uncollected weight"),
        plain.get(other.as_tensor()).unwrap(),
    );
    assert!(mx > 0.0 && err == 0.0);
    assert!(weight_grads::current().is_none(), "scope did not end");
}
