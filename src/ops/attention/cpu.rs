//! Fused scaled dot-product attention for f32 on the CPU.
//!
//! The generic path (`ops::attention::attention_chunked`) materialises up to 2^26 scores per slice and makes
//! four passes over them through memory (scale, softmax's max/exp/sum, cast, matmul), with
//! glibc's scalar `expf` taking 11% of a SD-1.5 UNet forward. Here each task takes a block of
//! query rows of one head whose scores fit in the cache (about 128k floats): one matmul writes
//! the scaled scores, the softmax runs in place with a vectorised exp, and a second matmul
//! writes the block's output straight into the result. Tasks run in parallel.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::ops::host::{with_f32, zeroed, SharedOut};
use crate::ops::packed_gemm::{self, Kind, PackedA, PackedB, MR};

/// Scores per task block: about 512 KiB, inside a core's L2.
const BLOCK_SCORES: usize = 1 << 17;

/// `softmax(q k^T / sqrt(d)) v` for (B, H, Tq, d) x (B, H, Tk, d) x (B, H, Tk, dv) f32 CPU
/// tensors without gradient tracking; `None` where that does not hold. With `bf16` (and a CPU
/// that has AVX-512 BF16) both products take bf16 operands with f32 accumulation, as PyTorch's
/// CPU attention does in bf16; scores and the softmax stay f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bf16: bool,
) -> candle_core::Result<Option<Tensor>> {
    let applies = [q, k, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op());
    if !applies || q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Ok(None);
    }
    let Some((b, h, tq, tk, d, dv)) = super::qkv_dims(q, k, v)? else {
        return Ok(None);
    };
    // Heads are read where they lie (the (B, T, heads*d) projections split by a view) and the
    // output is written as (B, Tq, heads, dv), which is what merging the heads wants: no copies
    // around the kernel. Only the last dimension must be dense.
    let (q, k, v) = (
        super::dense_rows(q)?,
        super::dense_rows(k)?,
        super::dense_rows(v)?,
    );
    let strides = |t: &Tensor| {
        let st = t.stride();
        Strides {
            batch: st[0],
            head: st[1],
            row: st[2],
        }
    };
    let shape = Shape {
        heads: h,
        bh: b * h,
        tq,
        tk,
        d,
        dv,
        q: strides(&q),
        k: strides(&k),
        v: strides(&v),
    };
    let use_bf16 = bf16 && packed_gemm::available();
    let out = with_f32(&q, |qs| {
        with_f32(&k, |ks| {
            with_f32(&v, |vs| {
                if use_bf16 {
                    run_packed(Kind::Bf16Pairs, &shape, qs, ks, vs)
                        .map_err(candle_core::Error::wrap)
                } else if packed_gemm::available_f32() {
                    run_packed(Kind::F32, &shape, qs, ks, vs).map_err(candle_core::Error::wrap)
                } else {
                    Ok(run(&shape, qs, ks, vs))
                }
            })
        })
    })????;
    let out = Tensor::from_vec(out, (b, tq, h, dv), q.device())?;
    Ok(Some(out.transpose(1, 2)?))
}

/// Element strides of a (B, heads, T, d) operand whose rows are dense.
#[derive(Debug, Clone, Copy)]
struct Strides {
    batch: usize,
    head: usize,
    row: usize,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    heads: usize,
    bh: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    q: Strides,
    k: Strides,
    v: Strides,
}

impl Shape {
    /// Offset of row `r` of head `bh` (batch-major) in an operand with strides `st`.
    fn at(&self, st: Strides, bh: usize, r: usize) -> usize {
        bh / self.heads * st.batch + bh % self.heads * st.head + r * st.row
    }

    /// Output row stride: (B, Tq, heads, dv) rows hold every head.
    fn out_row(&self) -> usize {
        self.heads * self.dv
    }

    /// Offset of output row `r` of head `bh`.
    fn out_at(&self, bh: usize, r: usize) -> usize {
        (bh / self.heads * self.tq + r) * self.out_row() + bh % self.heads * self.dv
    }

    /// Span of `rows` rows of an operand from their first element.
    fn span(rows: usize, row_stride: usize, width: usize) -> usize {
        if rows == 0 {
            0
        } else {
            (rows - 1) * row_stride + width
        }
    }
}

/// All heads; each task owns one block of one head's output rows.
fn run(s: &Shape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; s.bh * s.tq * s.dv];
    if out.is_empty() {
        return out;
    }
    let rows = (BLOCK_SCORES / s.tk).clamp(1, s.tq);
    let blocks = s.tq.div_ceil(rows);
    let scale = 1.0 / (s.d as f32).sqrt();
    let dst = SharedOut::new(&mut out);
    (0..s.bh * blocks).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(scores, sums): &mut (Vec<f32>, Vec<f32>), task| {
            let (head, blk) = (task / blocks, task % blocks);
            let r0 = blk * rows;
            let n = rows.min(s.tq - r0);
            scores.resize(n * s.tk, 0.0);
            let qh = &q[s.at(s.q, head, r0)..][..Shape::span(n, s.q.row, s.d)];
            let kh = &k[s.at(s.k, head, 0)..][..Shape::span(s.tk, s.k.row, s.d)];
            let vh = &v[s.at(s.v, head, 0)..][..Shape::span(s.tk, s.v.row, s.dv)];
            // SAFETY: operands are the slices above with their row strides; the scores buffer
            // holds n x tk; the output block (rows r0..r0+n, columns of this head) is inside
            // `out` and written by this task alone.
            unsafe {
                gemm::gemm(
                    n,
                    s.tk,
                    s.d,
                    scores.as_mut_ptr(),
                    1,
                    s.tk as isize,
                    false,
                    qh.as_ptr(),
                    1,
                    s.q.row as isize,
                    kh.as_ptr(),
                    s.k.row as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            // Unnormalised weights; the normalisation goes on the n x dv output rows.
            sums.clear();
            sums.extend(
                scores
                    .chunks_exact_mut(s.tk)
                    .map(|row| exp_scaled_sum(row, scale)),
            );
            unsafe {
                let o = dst.get().add(s.out_at(head, r0));
                gemm::gemm(
                    n,
                    s.dv,
                    s.tk,
                    o,
                    1,
                    s.out_row() as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    s.tk as isize,
                    vh.as_ptr(),
                    1,
                    s.v.row as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            normalise_rows(s, &dst, head, r0, sums.iter().copied());
        },
    );
    out
}

/// Divides output rows `r0..` of `head` by their softmax sums (one reciprocal each).
fn normalise_rows(
    s: &Shape,
    dst: &SharedOut,
    head: usize,
    r0: usize,
    sums: impl IntoIterator<Item = f32>,
) {
    for (i, sum) in sums.into_iter().enumerate() {
        let inv = 1.0 / sum;
        // SAFETY: callers own the rows r0.. (one per sum) of this head's columns in the output.
        let o =
            unsafe { std::slice::from_raw_parts_mut(dst.get().add(s.out_at(head, r0 + i)), s.dv) };
        for x in o {
            *x *= inv;
        }
    }
}

/// [`run`] through `ops::packed_gemm` (bf16 operands, or f32 ones with its f32 kernel): each head's
/// keys and values are packed once, then blocks of query rows (a multiple of the kernel's row
/// panel) run in parallel.
fn run_packed(kind: Kind, s: &Shape, q: &[f32], k: &[f32], v: &[f32]) -> crate::Result<Vec<f32>> {
    run_packed_stats(kind, s, q, k, v, None)
}

/// The packed forward pass of the training op (`super::grad`): the output (B, Tq, heads, dv)
/// and each query row's log-sum-exp of the scaled scores, batch-major by head. `dims` is
/// (B x heads, heads, Tq, Tk, d, dv), `strides` the (batch, head, row) strides of q, k, v.
pub(super) fn packed_forward(
    kind: Kind,
    (bh, heads, tq, tk, d, dv): (usize, usize, usize, usize, usize, usize),
    strides: [[usize; 3]; 3],
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> crate::Result<(Vec<f32>, Vec<f64>)> {
    let st = |i: usize| Strides {
        batch: strides[i][0],
        head: strides[i][1],
        row: strides[i][2],
    };
    let shape = Shape {
        heads,
        bh,
        tq,
        tk,
        d,
        dv,
        q: st(0),
        k: st(1),
        v: st(2),
    };
    let mut lse = zeroed(bh * tq, 0f64);
    let out = run_packed_stats(kind, &shape, q, k, v, Some(&mut lse))?;
    Ok((out, lse))
}

fn run_packed_stats(
    kind: Kind,
    s: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: Option<&mut [f64]>,
) -> crate::Result<Vec<f32>> {
    let rows_a = |src: &[f32], m: usize, k: usize, ld: usize| match kind {
        Kind::Bf16Pairs => PackedA::from_f32_rows(src, m, k, ld),
        Kind::F32 => PackedA::from_f32_rows_exact(src, m, k, ld),
    };
    let mut out = vec![0f32; s.bh * s.tq * s.dv];
    if out.is_empty() {
        return Ok(out);
    }
    let packed: Vec<(PackedB, PackedB)> = (0..s.bh)
        .into_par_iter()
        .map(|head| {
            let kh = &k[s.at(s.k, head, 0)..][..Shape::span(s.tk, s.k.row, s.d)];
            let vh = &v[s.at(s.v, head, 0)..][..Shape::span(s.tk, s.v.row, s.dv)];
            match kind {
                Kind::Bf16Pairs => (
                    PackedB::from_f32_cols(kh, s.d, s.tk, s.k.row),
                    PackedB::from_f32_rows(vh, s.tk, s.dv, s.v.row),
                ),
                Kind::F32 => (
                    PackedB::from_f32_cols_exact(kh, s.d, s.tk, s.k.row),
                    PackedB::from_f32_rows_exact(vh, s.tk, s.dv, s.v.row),
                ),
            }
        })
        .collect();
    let rows = (BLOCK_SCORES / s.tk / MR * MR).clamp(MR.min(s.tq), s.tq);
    let blocks = s.tq.div_ceil(rows);
    let scale = 1.0 / (s.d as f32).sqrt();
    let dst = SharedOut::new(&mut out);
    let lse_dst = lse.map(|l| (SharedOut::new(l), l.len()));
    (0..s.bh * blocks).into_par_iter().try_for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(scores, sums, words): &mut (Vec<f32>, Vec<(f32, f32)>, Vec<u32>), task| {
            let (head, blk) = (task / blocks, task % blocks);
            let (kt, vp) = &packed[head];
            let r0 = blk * rows;
            let n = rows.min(s.tq - r0);
            let qh = &q[s.at(s.q, head, r0)..][..Shape::span(n, s.q.row, s.d)];
            let qa = rows_a(qh, n, s.d, s.q.row);
            let pa = match kind {
                // The scores are rounded to bf16 into the second product's left operand.
                Kind::Bf16Pairs => {
                    scores.resize(n * s.tk, 0.0);
                    packed_gemm::matmul(&qa, kt, scores, s.tk, false)?;
                    sums.clear();
                    sums.extend(
                        scores
                            .chunks_exact_mut(s.tk)
                            .map(|row| exp_scaled_sum_max(row, scale)),
                    );
                    rows_a(scores, n, s.tk, s.tk)
                }
                // In f32 they are written in the second product's left operand directly.
                Kind::F32 => {
                    let mut pa = PackedA::f32_in_buffer(std::mem::take(words), n, s.tk);
                    let (rows_f32, ld) = pa.f32_rows_mut();
                    packed_gemm::matmul(&qa, kt, rows_f32, ld, false)?;
                    sums.clear();
                    sums.extend(
                        rows_f32
                            .chunks_mut(ld)
                            .take(n)
                            .map(|row| exp_scaled_sum_max(&mut row[..s.tk], scale)),
                    );
                    pa
                }
            };
            // SAFETY: rows r0..r0+n, columns of this head, are inside `out` and written by this
            // task alone (other tasks write other columns of the same rows, hence the raw call).
            unsafe {
                packed_gemm::matmul_raw(
                    &pa,
                    vp,
                    dst.get().add(s.out_at(head, r0)),
                    s.out_row(),
                    false,
                    false,
                )?;
            }
            if kind == Kind::F32 {
                *words = pa.into_buffer();
            }
            if let Some((ptr, len)) = lse_dst {
                assert!(
                    head * s.tq + r0 + n <= len,
                    "attention statistics out of range"
                );
                // SAFETY: rows r0..r0+n of this head's statistics, in range (checked) and
                // written by this task alone; the buffer outlives the parallel loop.
                let l =
                    unsafe { std::slice::from_raw_parts_mut(ptr.get().add(head * s.tq + r0), n) };
                for (l, &(sum, max)) in l.iter_mut().zip(sums.iter()) {
                    *l = max as f64 + (sum as f64).ln();
                }
            }
            // The softmax's normalisation, on the n x dv output instead of the n x tk weights.
            normalise_rows(s, &dst, head, r0, sums.iter().map(|&(sum, _)| sum));
            Ok::<(), crate::Error>(())
        },
    )?;
    Ok(out)
}

/// `softmax(scale * row)` in place: [`exp_scaled_sum`], then one multiplication by the sum's
/// reciprocal (the bf16 path's arithmetic; [`softmax_in_place`] is torch's).
pub fn softmax_scaled_in_place(row: &mut [f32], scale: f32) {
    let inv = 1.0 / exp_scaled_sum(row, scale);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// The unnormalised softmax of `scale * row` (scale > 0): `x <- exp(scale x - max)` with the max
/// of the scaled row, returning the sum, in two passes over the row (max; exp and sum, 16
/// lanes at a time). The bf16 attention divides its output rows by the sum instead of
/// normalising the probabilities. A row that is all -inf or holds a NaN gives NaNs.
pub fn exp_scaled_sum(row: &mut [f32], scale: f32) -> f32 {
    exp_scaled_sum_max(row, scale).0
}

/// [`exp_scaled_sum`], also returning the shift (the scaled row's max): `max + ln(sum)` is the
/// row's log-sum-exp, which the training op keeps for its backward pass.
pub fn exp_scaled_sum_max(row: &mut [f32], scale: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { exp_scaled_sum_avx512(row, scale) };
        }
    }
    exp_scaled_sum_portable(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_scaled_sum_avx512(row: &mut [f32], scale: f32) -> (f32, f32) {
    exp_scaled_sum_portable(row, scale)
}

#[inline(always)]
fn exp_scaled_sum_portable(row: &mut [f32], scale: f32) -> (f32, f32) {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (x, mi) in c.iter().zip(m.iter_mut()) {
            *mi = mi.max(*x);
        }
    }
    for x in chunks.remainder() {
        m[0] = m[0].max(*x);
    }
    // Rounding is monotonic, so the max of the scaled values is the scaled max.
    let max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
    if !max.is_finite() {
        // All -inf: torch's arithmetic (NaNs everywhere), as `softmax_in_place`. A NaN elsewhere
        // passes through the exp into the sum, which spreads it over the row.
        for x in row.iter_mut() {
            *x = (*x * scale - max).exp();
        }
        return (row.iter().sum(), max);
    }
    let mut lanes = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for (x, s) in c.iter_mut().zip(lanes.iter_mut()) {
            *x = exp_approx(*x * scale - max);
            *s += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_approx(*x * scale - max);
        lanes[0] += *x;
    }
    (lanes.iter().sum(), max)
}

/// `x <- exp(x - max) / sum`, as torch's softmax computes it (a division, not a reciprocal).
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !max.is_finite() {
        // All -inf (or NaN present): let the arithmetic produce what torch would (NaNs).
        for x in row.iter_mut() {
            *x = (*x - max).exp();
        }
    } else {
        exp_shifted(row, max);
    }
    let sum: f32 = row.iter().sum();
    for x in row.iter_mut() {
        *x /= sum;
    }
}

/// `x <- exp(x - shift)` over a slice, with AVX-512 or AVX2+FMA where the CPU has them.
pub fn exp_shifted(xs: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { exp_shifted_avx512(xs, shift) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { exp_shifted_avx2(xs, shift) };
            return;
        }
    }
    exp_shifted_portable(xs, shift);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_shifted_avx512(xs: &mut [f32], shift: f32) {
    exp_shifted_portable(xs, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &mut [f32], shift: f32) {
    exp_shifted_portable(xs, shift)
}

#[inline(always)]
fn exp_shifted_portable(xs: &mut [f32], shift: f32) {
    for x in xs.iter_mut() {
        *x = exp_approx(*x - shift);
    }
}

/// exp(x) for x <= 0 (softmax's shifted scores) to within 2 ulp, written so the compiler
/// vectorises it: a round-to-nearest multiple of ln 2 taken out exactly (Cody-Waite split), a
/// degree-6 polynomial for the rest, the power of two put into the exponent bits. Inputs below
/// -87.3 give 0 (the true value is subnormal); NaN stays NaN; positive inputs are outside the
/// domain and give exp(0).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer in float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 0.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Minimax coefficients of exp on [-ln2/2, ln2/2] (Cephes' expf).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold n exactly (t lies in [2^23, 2^24)), so integer arithmetic on
    // the bits builds 2^n; `n as i32` would be a saturating cast the compiler keeps scalar.
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e * pow2
    }
}
