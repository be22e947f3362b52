//! The bf16 kernels against an f64 product of the same bf16-rounded operands.
//!
//! Bound: each product of two bf16 values is exact in f32 (8 x 8 significant bits), so the only
//! error is the f32 summation: |c - ref| <= k * 2^-24 * sum_k |a b| covers any order of adding.
//! Against the f32 operands before rounding, bf16 adds at most 2^-8 relative per factor, so
//! |c - ref_f32| <= (2^-7 + k 2^-24) * sum_k |a b|.

use half::bf16;
use mcld::ops::packed_gemm::{self, Kind, PackedA, PackedB};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

fn round(v: f32) -> f64 {
    bf16::from_f32(v).to_f64()
}

/// Worst |c - ref| / bound over the product, for the given f64 element readers.
#[allow(clippy::too_many_arguments)]
fn check(
    m: usize,
    n: usize,
    k: usize,
    c: &[f32],
    ldc: usize,
    init: &[f32],
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> f64 {
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut mag) = (init[i * ldc + j] as f64, init[i * ldc + j].abs() as f64);
            let (mut raw, mut raw_mag) = (exact, mag);
            for kk in 0..k {
                let (x, y) = (a(i, kk), b(kk, j));
                exact += round(x) * round(y);
                mag += (round(x) * round(y)).abs();
                raw += x as f64 * y as f64;
                raw_mag += (x as f64 * y as f64).abs();
            }
            let got = c[i * ldc + j] as f64;
            let bound = (k as f64 + 1.0) * 2f64.powi(-24) * mag + 1e-30;
            let bound_raw = (2f64.powi(-7) + (k as f64 + 1.0) * 2f64.powi(-24)) * raw_mag + 1e-30;
            worst = worst.max((got - exact).abs() / bound);
            assert!(
                (got - raw).abs() <= bound_raw,
                "({i},{j}) k={k}: {got} vs f32-operand product {raw} (bound {bound_raw})"
            );
        }
    }
    worst
}

/// (m, n, k) with edges in every direction: partial panels, odd k, a k over one block,
/// vector tails.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (12, 32, 2),
    (13, 33, 3),
    (7, 50, 40),
    (30, 17, 257),
    (25, 70, 300),
    (40, 64, 31),
];

#[test]
fn bf16_matmul_matches_f64_for_every_packing() {
    if !packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16 (the f32 path is used there)");
        return;
    }
    for &(m, n, k) in SHAPES {
        let ld_a = k + 3;
        let ld_c = n + 5;
        let a = values(m * ld_a, 1 + m as u64);
        let b_rows = values(k * (n + 2), 2 + n as u64);
        let b_cols = values(n * (k + 1), 3 + k as u64);
        let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let b16: Vec<bf16> = b_cols.iter().map(|&v| bf16::from_f32(v)).collect();
        let init = values(m * ld_c, 4);
        let ar = |i: usize, kk: usize| a[i * ld_a + kk];
        let brow = |kk: usize, j: usize| b_rows[kk * (n + 2) + j];
        let bcol = |kk: usize, j: usize| b_cols[j * (k + 1) + kk];
        let pa = PackedA::from_f32_rows(&a, m, k, ld_a);
        let pa16 = PackedA::from_bf16_rows(&a16, m, k, ld_a);
        let pb_rows = PackedB::from_f32_rows(&b_rows, k, n, n + 2);
        let pb_cols = PackedB::from_f32_cols(&b_cols, k, n, k + 1);
        let pb16 = PackedB::from_bf16_cols(&b16, k, n, k + 1);
        let zero = vec![0f32; m * ld_c];
        for (name, pa, pb, by_rows) in [
            ("f32 rows x f32 rows", &pa, &pb_rows, true),
            ("bf16 rows x f32 cols", &pa16, &pb_cols, false),
            ("f32 rows x bf16 cols", &pa, &pb16, false),
        ] {
            for accumulate in [false, true] {
                for parallel in [false, true] {
                    let mut c = init.clone();
                    let r = if parallel {
                        packed_gemm::matmul_parallel(pa, pb, &mut c, ld_c, accumulate)
                    } else {
                        packed_gemm::matmul(pa, pb, &mut c, ld_c, accumulate)
                    };
                    r.unwrap();
                    let base = if accumulate { &init } else { &zero };
                    let worst = if by_rows {
                        check(m, n, k, &c, ld_c, base, ar, brow)
                    } else {
                        check(m, n, k, &c, ld_c, base, ar, bcol)
                    };
                    assert!(
                        worst <= 1.0,
                        "{name} m{m} n{n} k{k} acc={accumulate} par={parallel}: {worst} x bound"
                    );
                    // Padding columns of C stay as they were.
                    for i in 0..m {
                        assert_eq!(
                            &c[i * ld_c + n..i * ld_c + ld_c],
                            &init[i * ld_c + n..i * ld_c + ld_c]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_packing_rounds_to_nearest_even() {
    if !packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
        return;
    }
    // Products with a one-hot operand read each packed value back exactly; every packer (vector
    // groups of 16/32 and scalar tails) must round as `half` does, ties to even included.
    let n = 70;
    let mut v = values(n, 9);
    v[0] = 1.0 + 2f32.powi(-8); // tie: down to 1.0
    v[1] = 1.0 + 3.0 * 2f32.powi(-8); // tie: up to 1 + 2^-6
    v[2] = -(1.0 + 2f32.powi(-8));
    v[3] = 3.0e38; // large, still finite in bf16
    v[40] = 1.0 + 2f32.powi(-8);
    v[41] = 1.0 + 3.0 * 2f32.powi(-8);
    v[69] = 1.0e-30; // a small normal number
    let eye: Vec<f32> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    let want: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let run = |a: &PackedA, b: &PackedB| {
        let mut c = vec![0f32; a.rows() * b.cols()];
        packed_gemm::matmul(a, b, &mut c, b.cols(), false).unwrap();
        c
    };
    let id_a = PackedA::from_f32_rows(&eye, n, n, n);
    let id_b = PackedB::from_f32_rows(&eye, n, n, n);
    let got = [
        (
            "A from f32 rows",
            run(&PackedA::from_f32_rows(&v, 1, n, n), &id_b),
        ),
        (
            "B from f32 cols",
            run(&id_a, &PackedB::from_f32_cols(&v, n, 1, n)),
        ),
    ];
    for (what, c) in got {
        assert_eq!(c, want, "{what}");
    }
    // The row-interleaving packer (conv patches): a 2 x n block with rows of v and -v.
    let two: Vec<f32> = v.iter().copied().chain(v.iter().map(|x| -x)).collect();
    let pb = PackedB::from_f32_rows(&two, 2, n, n);
    let c = run(&PackedA::from_f32_rows(&[1.0, 0.0, 0.0, 1.0], 2, 2, 2), &pb);
    let neg: Vec<f32> = want.iter().map(|x| -x).collect();
    assert_eq!(&c[..n], &want[..]);
    assert_eq!(&c[n..], &neg[..]);
}

/// `ops::linear::Linear` with a bf16 weight (the CPU bf16 mode) on f32 inputs of rank 2-4,
/// contiguous or not, against f64 of the rounded operands; tracked inputs fall back to candle
/// with the weight widened, so training never meets the kernel.
#[test]
fn linear_with_bf16_weight() {
    use candle_core::{DType, Device, Module, Tensor, Var};
    use mcld::ops::linear::Linear;
    if !packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
        return;
    }
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (70, 33), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 70, &dev).unwrap();
    let w16 = w.to_dtype(DType::BF16).unwrap();
    let lin = Linear::new(w16.clone(), Some(b.clone()));
    assert!(lin.is_bf16_mixed());
    // The weight is kept packed; unpacking gives it back bit for bit.
    assert_eq!(
        lin.weight().unwrap().to_vec2::<half::bf16>().unwrap(),
        w16.to_vec2::<half::bf16>().unwrap()
    );
    let f64_of = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 33), &dev).unwrap();
    let xt = Tensor::randn(0f32, 1.0, (2, 33, 7), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    for x in [x.clone(), x.flatten_to(1).unwrap(), xt] {
        let got = lin.forward(&x).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let (x64, w64) = (f64_of(&x), f64_of(&w16));
        let want = x64
            .broadcast_matmul(&w64.t().unwrap())
            .unwrap()
            .broadcast_add(&b.to_dtype(DType::F64).unwrap())
            .unwrap();
        let mag = x64
            .abs()
            .unwrap()
            .broadcast_matmul(&w64.abs().unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&b.to_dtype(DType::F64).unwrap().abs().unwrap())
            .unwrap();
        let excess = (got.to_dtype(DType::F64).unwrap() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .sub(&(mag * (34.0 * 2f64.powi(-24))).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(excess <= 0.0, "{:?}: {excess} over the bound", x.dims());
    }
    // A tracked input takes candle's path with the weight widened (same values).
    let v = Var::from_tensor(&x).unwrap();
    let tracked = lin.forward(v.as_tensor()).unwrap();
    let plain = Linear::new(w16.to_dtype(DType::F32).unwrap(), Some(b))
        .forward(&x)
        .unwrap();
    let diff = (tracked - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

/// A right operand filled pair row by pair row (`interleave_pairs` + `put_pairs`, in pieces
/// that cross panel edges) inside a reused, dirty buffer gives the product of `from_f32_rows`
/// bit for bit, including the padding columns of a narrow last panel.
#[test]
fn bf16_operand_filled_in_a_reused_buffer() {
    if !packed_gemm::available() {
        eprintln!("skipped: this CPU lacks AVX-512 BF16");
        return;
    }
    let mut buf = vec![u32::MAX; 7];
    for &(m, n, k) in &[(13, 70, 9), (5, 32, 4), (12, 33, 257), (3, 1, 2)] {
        let a = values(m * k, 5);
        let b = values(k * n, 6 + n as u64);
        let pa = PackedA::from_f32_rows(&a, m, k, k);
        let mut pb = PackedB::in_buffer(std::mem::take(&mut buf), Kind::Bf16Pairs, k, n);
        let mut row = vec![0u32; n];
        for p in 0..k.div_ceil(2) {
            let hi = (2 * p + 1 < k).then(|| &b[(2 * p + 1) * n..(2 * p + 2) * n]);
            packed_gemm::interleave_pairs(&b[2 * p * n..(2 * p + 1) * n], hi, &mut row);
            // Pieces of 1, 19, 40, ... columns: some inside a panel, some across its edge.
            let mut j = 0;
            for len in [1usize, 19, 40].into_iter().cycle() {
                if j >= n {
                    break;
                }
                let len = len.min(n - j);
                pb.put_pairs(p, j, &row[j..j + len]);
                j += len;
            }
        }
        let want = PackedB::from_f32_rows(&b, k, n, n);
        let (mut got_c, mut want_c) = (vec![0f32; m * n], vec![0f32; m * n]);
        packed_gemm::matmul(&pa, &pb, &mut got_c, n, false).unwrap();
        packed_gemm::matmul(&pa, &want, &mut want_c, n, false).unwrap();
        assert_eq!(got_c, want_c, "m{m} n{n} k{k}");
        buf = pb.into_buffer();
        buf.iter_mut().for_each(|v| *v = 0x7fc0_7fc0); // NaN pairs: must not leak into the next
    }
}

/// The f32 kernel ([`Kind::F32`]) against an f64 product of the same f32 operands: FMA
/// accumulation in f32, |c - ref| <= (k + 1) 2^-24 sum |a b|; both right-operand packings,
/// with and without accumulation and threads; the packed operands unpack bit for bit.
#[test]
fn f32_matmul_matches_f64() {
    if !packed_gemm::available_f32() {
        eprintln!("skipped: this CPU lacks AVX-512F");
        return;
    }
    for &(m, n, k) in SHAPES {
        let (ld_a, ld_c) = (k + 3, n + 5);
        let a = values(m * ld_a, 7 + m as u64);
        let b_rows = values(k * n, 8 + n as u64);
        let b_cols = values(n * k, 9 + k as u64);
        let init = values(m * ld_c, 10);
        let pa = PackedA::from_f32_rows_exact(&a, m, k, ld_a);
        let pr = PackedB::from_f32_rows_exact(&b_rows, k, n, n);
        let pc = PackedB::from_f32_cols_exact(&b_cols, k, n, k);
        assert_eq!(pc.to_f32_cols(), b_cols);
        let a_dense: Vec<f32> = (0..m)
            .flat_map(|i| a[i * ld_a..i * ld_a + k].to_vec())
            .collect();
        assert_eq!(pa.to_f32_rows(), a_dense);
        for (pb, by_rows) in [(&pr, true), (&pc, false)] {
            for accumulate in [false, true] {
                for parallel in [false, true] {
                    let mut c = init.clone();
                    let r = if parallel {
                        packed_gemm::matmul_parallel(&pa, pb, &mut c, ld_c, accumulate)
                    } else {
                        packed_gemm::matmul(&pa, pb, &mut c, ld_c, accumulate)
                    };
                    r.unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let base = if accumulate {
                                init[i * ld_c + j] as f64
                            } else {
                                0.0
                            };
                            let (mut exact, mut mag) = (base, base.abs());
                            for kk in 0..k {
                                let bv = if by_rows {
                                    b_rows[kk * n + j]
                                } else {
                                    b_cols[j * k + kk]
                                };
                                let t = a[i * ld_a + kk] as f64 * bv as f64;
                                exact += t;
                                mag += t.abs();
                            }
                            let bound = (k as f64 + 1.0) * 2f64.powi(-24) * mag;
                            let got = c[i * ld_c + j] as f64;
                            assert!(
                                (got - exact).abs() <= bound,
                                "m{m} n{n} k{k} ({i},{j}) rows={by_rows} acc={accumulate}: {got} vs {exact}"
                            );
                        }
                        assert_eq!(
                            &c[i * ld_c + n..(i + 1) * ld_c],
                            &init[i * ld_c + n..(i + 1) * ld_c]
                        );
                    }
                }
            }
        }
        // Mixed kinds are refused.
        let p16 = PackedB::from_f32_rows(&b_rows, k, n, n);
        let mut c = vec![0f32; m * n];
        assert!(packed_gemm::matmul(&pa, &p16, &mut c, n, false).is_err());
    }
}

/// An f32 layer packs its weight for the f32 kernel (AVX-512F): within the f32 summation bound
/// of an f64 product, weight recoverable bit for bit; a training variable stays unpacked so its
/// gradient flows.
#[test]
fn linear_with_f32_weight() {
    use candle_core::{DType, Device, Module, Tensor, Var};
    use mcld::ops::linear::Linear;
    if !packed_gemm::available_f32() {
        eprintln!("skipped: this CPU lacks AVX-512F");
        return;
    }
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (70, 33), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 70, &dev).unwrap();
    let lin = Linear::new(w.clone(), Some(b.clone()));
    assert!(!lin.is_bf16_mixed());
    assert_eq!(
        lin.weight().unwrap().to_vec2::<f32>().unwrap(),
        w.to_vec2::<f32>().unwrap()
    );
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 33), &dev).unwrap();
    let xt = Tensor::randn(0f32, 1.0, (2, 33, 7), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    for x in [
        x.clone(),
        x.flatten_to(1).unwrap(),
        xt,
        x.narrow(0, 0, 1).unwrap(),
    ] {
        let got = lin.forward(&x).unwrap();
        let (x64, w64, b64) = (f64_of(&x), f64_of(&w), f64_of(&b));
        let want = x64
            .broadcast_matmul(&w64.t().unwrap())
            .unwrap()
            .broadcast_add(&b64)
            .unwrap();
        let mag = x64
            .abs()
            .unwrap()
            .broadcast_matmul(&w64.abs().unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&b64.abs().unwrap())
            .unwrap();
        let excess = (f64_of(&got) - &want)
            .unwrap()
            .abs()
            .unwrap()
            .sub(&(mag * (34.0 * 2f64.powi(-24))).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(excess <= 0.0, "{:?}: {excess} over the bound", x.dims());
    }
    let vw = Var::from_tensor(&w).unwrap();
    let trained = Linear::new(vw.as_tensor().clone(), Some(b));
    let grads = trained
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        grads.get(vw.as_tensor()).is_some(),
        "no gradient reached the weight"
    );
}

/// A left operand packed from a transposed view (`from_f32_cols_exact`, tiled and parallel for
/// large ones) holds exactly the rows of the explicit transpose, small and large, with a
/// source stride wider than the rows and sizes that leave partial tiles and panels; a right
/// operand packed from lines likewise (parallel for large ones).
#[test]
fn f32_left_operand_from_columns_is_the_transpose() {
    // 700 rows pad to 708, past the last whole tile of 32 (a tile of padding rows only).
    for (m, k, ld) in [
        (5, 3, 7),
        (37, 70, 41),
        (1030, 97, 1040),
        (300, 333, 300),
        (700, 9, 700),
    ] {
        let src = values(k * ld, 20 + m as u64);
        let packed = PackedA::from_f32_cols_exact(&src, m, k, ld);
        let rows: Vec<f32> = (0..m)
            .flat_map(|i| (0..k).map(move |p| (i, p)))
            .map(|(i, p)| src[p * ld + i])
            .collect();
        assert_eq!(packed.rows(), m);
        assert_eq!(packed.depth(), k);
        assert_eq!(packed.to_f32_rows(), rows, "{m} x {k} at stride {ld}");
        let explicit = PackedA::from_f32_rows_exact(&rows, m, k, k);
        if packed_gemm::available_f32() {
            let n = 19;
            let b = PackedB::from_f32_rows_exact(&values(k * n, 21), k, n, n);
            let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            packed_gemm::matmul_parallel(&packed, &b, &mut c1, n, false).unwrap();
            packed_gemm::matmul_parallel(&explicit, &b, &mut c2, n, false).unwrap();
            assert_eq!(c1, c2, "{m} x {k}: products differ");
        }
        // The right operand from the same lines (packed panel by panel in parallel when large).
        let (n, depth) = (k, m.min(ld));
        let b = PackedB::from_f32_cols_exact(&src, depth, n, ld);
        let lines: Vec<f32> = (0..n)
            .flat_map(|j| src[j * ld..j * ld + depth].to_vec())
            .collect();
        assert_eq!(b.to_f32_cols(), lines, "right operand {depth} x {n}");
    }
}
