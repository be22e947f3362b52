//! Matrix products of bf16 operands with f32 accumulation and an f32 result, for CPUs with
//! AVX-512 BF16 (`vdpbf16ps`): what `--dtype bf16` computes its matmuls, convolutions and
//! attention with on the CPU.
//!
//! Why our own: `gemm` 0.19 has no bf16 path, and `gemmkit` (the one crate with a `vdpbf16ps`
//! kernel) returns its product in bf16, which would round attention scores before the softmax
//! and every convolution's output before its bias and residual. PyTorch's CPU bf16 kernels
//! accumulate in f32 too.
//!
//! The same blocking and packing also serve f32 operands ([`Kind::F32`]: one f32 per word
//! instead of a pair, an FMA kernel, AVX-512F only), so `--dtype f32` gets weights packed once
//! per model instead of on every call of the `gemm` crate, and no repacked copy of them.
//!
//! Operands are packed once per product: the left one row by row (the kernel reads [`MR`] rows
//! side by side), the right one in panels of [`NR`] columns, both as k-pairs (two bf16 in one
//! u32, the lower k in the low half) because `vdpbf16ps` multiplies pairs and adds both
//! products into one f32 lane. f32 inputs are rounded to bf16 to nearest-even while packing
//! (the vector path treats f32 subnormals as zero, as `vcvtneps2bf16` does).

use super::host::{grow_zeroed, zeroed};
use half::bf16;
use std::mem::MaybeUninit;

/// Rows per left panel (12 x 2 accumulators of 16 lanes + 2 right vectors + 1 broadcast fit
/// the 32 vector registers).
pub const MR: usize = 12;
/// Columns per right panel (two 16-lane vectors).
pub const NR: usize = 32;
/// k-pairs per block: a right micro-panel of 128 x 32 pairs is 16 KiB, half of L1.
const KC_PAIRS: usize = 128;
/// Left rows per block: 384 rows x 128 pairs is 192 KiB, well inside L2.
const MC: usize = 32 * MR;
/// Right columns per block: the 384 x 256 block of C (384 KiB) stays in L2 over the depth.
const NC: usize = 8 * NR;

/// What a packed operand's u32 words hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Two bf16 values of consecutive depth (the lower one in the low half).
    Bf16Pairs,
    /// One f32 value (its bits).
    F32,
}

impl Kind {
    /// Words per depth of k.
    fn units(self, k: usize) -> usize {
        match self {
            Kind::Bf16Pairs => k.div_ceil(2),
            Kind::F32 => k,
        }
    }

    /// The kind a layer packs its `rank`-dimensional weight as, if any: a bf16 or f32 CPU
    /// weight that is not a training variable (its gradient needs candle's ops), on a CPU with
    /// that kind's kernel.
    pub fn for_weight(w: &candle_core::Tensor, rank: usize) -> Option<Kind> {
        let kind = match w.dtype() {
            candle_core::DType::BF16 => Kind::Bf16Pairs,
            candle_core::DType::F32 => Kind::F32,
            _ => return None,
        };
        let packable = w.device().is_cpu()
            && w.rank() == rank
            && !w.is_variable()
            && !w.track_op()
            && kind.available();
        packable.then_some(kind)
    }

    /// Whether this CPU runs this kind's kernel.
    pub fn available(self) -> bool {
        match self {
            Kind::Bf16Pairs => available(),
            Kind::F32 => available_f32(),
        }
    }
}

/// Whether this CPU runs the f32 kernel (AVX-512F; other CPUs keep the `gemm` crate).
pub fn available_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the bf16 kernels (checked at run time; other CPUs keep the f32 path).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two bf16 bit patterns as one k-pair word (the lower depth in the low half).
#[inline]
pub(crate) fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// `v` rounded to bf16 (to nearest even; NaN stays NaN, quietened) as `half` rounds, without
/// branches on ordinary values so that loops over it vectorise.
#[inline]
pub(crate) fn bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) | 0x40) as u16
    } else {
        ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

/// The left operand (m x k), row by row: `data[i * stride + p]`, padded with zero rows to a
/// whole number of `MR`-row panels. Packing is a contiguous copy or conversion per row (no
/// transposition); the kernel reads its `MR` rows side by side.
#[derive(Debug, Clone)]
pub struct PackedA {
    kind: Kind,
    m: usize,
    k: usize,
    /// Words per row (k-pairs, or k for f32).
    pairs: usize,
    /// u32 per row: `pairs` rounded up to an odd number of 64-byte lines, so the `MR` rows the
    /// kernel reads side by side fall in different L1 sets (a row of 4096 pairs would put all
    /// twelve in one set: attention's probabilities times values ran at half speed).
    stride: usize,
    data: Vec<u32>,
}

/// The right operand (k x n) in panels of `NR` columns: `data[(panel * pairs + p) * NR + j]`.
#[derive(Debug, Clone)]
pub struct PackedB {
    kind: Kind,
    k: usize,
    n: usize,
    /// Words per column (k-pairs, or k for f32).
    pairs: usize,
    data: Vec<u32>,
}

impl PackedA {
    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(MR)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// From f32 rows: element (i, kk) at `src[i * ld + kk]`.
    pub fn from_f32_rows(src: &[f32], m: usize, k: usize, ld: usize) -> Self {
        Self::from_lines(Kind::Bf16Pairs, src, m, k, ld, convert_pairs)
    }

    /// From f32 rows kept in f32 ([`Kind::F32`]): element (i, kk) at `src[i * ld + kk]`.
    pub fn from_f32_rows_exact(src: &[f32], m: usize, k: usize, ld: usize) -> Self {
        Self::from_lines(Kind::F32, src, m, k, ld, f32_words)
    }

    /// From f32 columns kept in f32 ([`Kind::F32`]): element (i, kk) at `src[kk * ld + i]`, e.g.
    /// an output gradient read as its transpose. Transposed in tiles of 32 x 32 (a row-by-row
    /// gather would stride through the whole source for every row), tiles of rows in parallel.
    pub fn from_f32_cols_exact(src: &[f32], m: usize, k: usize, ld: usize) -> Self {
        const TILE: usize = 32;
        check_span(src.len(), k, m, ld);
        let stride = row_stride(k);
        let mut data = zeroed(m.div_ceil(MR) * MR * stride, 0u32);
        let fill = |(t, rows): (usize, &mut [u32])| {
            let i0 = t * TILE;
            let n = TILE.min(m.saturating_sub(i0));
            if n == 0 {
                // A tile of the zero rows padding the last panel.
                return;
            }
            for p0 in (0..k).step_by(TILE) {
                for p in p0..(p0 + TILE).min(k) {
                    let line = &src[p * ld + i0..p * ld + i0 + n];
                    for (r, &v) in line.iter().enumerate() {
                        rows[r * stride + p] = v.to_bits();
                    }
                }
            }
        };
        each_chunk(&mut data, TILE * stride, m * k, fill);
        Self {
            kind: Kind::F32,
            m,
            k,
            pairs: k,
            stride,
            data,
        }
    }

    /// An m x k [`Kind::F32`] operand in `buf`'s allocation (a scratch reused from call to
    /// call), to be written in place through [`PackedA::f32_rows_mut`] (e.g. as a product's
    /// output) before it is used.
    pub fn f32_in_buffer(mut buf: Vec<u32>, m: usize, k: usize) -> Self {
        let stride = row_stride(k);
        grow_zeroed(&mut buf, m.div_ceil(MR) * MR * stride, 0);
        Self {
            kind: Kind::F32,
            m,
            k,
            pairs: k,
            stride,
            data: buf,
        }
    }

    /// The rows of an [`Kind::F32`] operand as f32, and their stride: row i is
    /// `[i * stride..][..k]`.
    pub fn f32_rows_mut(&mut self) -> (&mut [f32], usize) {
        assert_eq!(self.kind, Kind::F32, "f32_rows_mut of a bf16 operand");
        (bytemuck::cast_slice_mut(&mut self.data), self.stride)
    }

    /// The allocation back, for the next [`PackedA::f32_in_buffer`].
    pub fn into_buffer(self) -> Vec<u32> {
        self.data
    }

    /// The inverse of [`PackedA::from_f32_rows_exact`]: m rows of k values, row-major.
    pub fn to_f32_rows(&self) -> Vec<f32> {
        assert_eq!(self.kind, Kind::F32, "to_f32_rows of a bf16 operand");
        let mut out = Vec::with_capacity(self.m * self.k);
        for i in 0..self.m {
            let row = &self.data[i * self.stride..i * self.stride + self.k];
            out.extend(row.iter().map(|&w| f32::from_bits(w)));
        }
        out
    }

    /// The inverse of [`PackedA::from_bf16_rows`]: m rows of k bf16 values, row-major.
    pub fn to_bf16_rows(&self) -> Vec<bf16> {
        assert_eq!(self.kind, Kind::Bf16Pairs, "to_bf16_rows of an f32 operand");
        let mut out = vec![bf16::ZERO; self.m * self.k];
        for (i, row) in out.chunks_exact_mut(self.k.max(1)).enumerate().take(self.m) {
            for (kk, v) in row.iter_mut().enumerate() {
                let word = self.data[i * self.stride + kk / 2];
                *v = bf16::from_bits((word >> (16 * (kk % 2))) as u16);
            }
        }
        out
    }

    /// From bf16 rows (weights stored in bf16): element (i, kk) at `src[i * ld + kk]`; a plain
    /// copy of each row.
    pub fn from_bf16_rows(src: &[bf16], m: usize, k: usize, ld: usize) -> Self {
        Self::from_lines(Kind::Bf16Pairs, src, m, k, ld, bf16_pairs)
    }

    /// An m x k [`Kind::Bf16Pairs`] operand written in place by `fill(first, rows, stride)`
    /// for blocks of `block` rows in parallel: row `first + i` is `rows[i * stride..]`, its
    /// k-pair words first; whatever `fill` leaves alone stays zero. For packers that reorder as
    /// they convert (a convolution's weight), with no intermediate copy.
    pub fn bf16_pairs_by_blocks(
        m: usize,
        k: usize,
        block: usize,
        fill: impl Fn(usize, &mut [u32], usize) + Sync,
    ) -> Self {
        let pairs = k.div_ceil(2);
        let stride = row_stride(pairs);
        let block = block.max(1);
        let mut data = zeroed(m.div_ceil(MR) * MR * stride, 0u32);
        if pairs > 0 && m > 0 {
            let run = |(b, rows): (usize, &mut [u32])| {
                let first = b * block;
                let n = block.min(m - first);
                fill(first, &mut rows[..n * stride], stride)
            };
            each_chunk(&mut data[..m * stride], block * stride, m * k, run);
        }
        Self {
            kind: Kind::Bf16Pairs,
            m,
            k,
            pairs,
            stride,
            data,
        }
    }

    fn from_lines<T: Sync>(
        kind: Kind,
        src: &[T],
        m: usize,
        k: usize,
        ld: usize,
        to_pairs: impl Fn(&[T], &mut [u32]) + Sync,
    ) -> Self {
        check_span(src.len(), m, k, ld);
        let pairs = kind.units(k);
        let stride = row_stride(pairs);
        let mut data = zeroed(m.div_ceil(MR) * MR * stride, 0u32);
        let fill =
            |(i, row): (usize, &mut [u32])| to_pairs(&src[i * ld..i * ld + k], &mut row[..pairs]);
        if pairs > 0 {
            each_chunk(&mut data[..m * stride], stride, m * k, fill);
        }
        Self {
            kind,
            m,
            k,
            pairs,
            stride,
            data,
        }
    }
}

impl PackedB {
    pub fn cols(&self) -> usize {
        self.n
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// From f32 rows kept in f32 ([`Kind::F32`]): element (kk, j) at `src[kk * ld + j]`.
    pub fn from_f32_rows_exact(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        check_span(src.len(), k, n, ld);
        let mut b = Self::in_buffer(Vec::new(), Kind::F32, k, n);
        if k * n >= PARALLEL_PACK && k > 0 {
            // Panel by panel: each reads a strip of NR columns from every row.
            use rayon::prelude::*;
            b.data
                .par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    let j0 = panel * NR;
                    let w = NR.min(n - j0);
                    for (kk, dst) in out.chunks_exact_mut(NR).enumerate() {
                        let line: &[u32] = bytemuck::cast_slice(&src[kk * ld + j0..][..w]);
                        dst[..w].copy_from_slice(line);
                    }
                });
        } else {
            for kk in 0..k {
                b.put_f32(kk, 0, &src[kk * ld..kk * ld + n]);
            }
        }
        b
    }

    /// From f32 columns kept in f32 ([`Kind::F32`]): element (kk, j) at `src[j * ld + kk]`.
    pub fn from_f32_cols_exact(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let data = pack_lines_f32(src, n, k, ld);
        Self {
            kind: Kind::F32,
            k,
            n,
            pairs: k,
            data,
        }
    }

    /// The inverse of [`PackedB::from_f32_cols_exact`]: n lines of k values, row-major.
    pub fn to_f32_cols(&self) -> Vec<f32> {
        assert_eq!(self.kind, Kind::F32, "to_f32_cols of a bf16 operand");
        let mut out = zeroed(self.n * self.k, 0f32);
        for (j, line) in out.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            let (panel, lane) = (j / NR, j % NR);
            for (kk, v) in line.iter_mut().enumerate() {
                *v = f32::from_bits(self.data[(panel * self.pairs + kk) * NR + lane]);
            }
        }
        out
    }

    /// From f32 rows: element (kk, j) at `src[kk * ld + j]` (a row-major k x n matrix).
    pub fn from_f32_rows(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        check_span(src.len(), k, n, ld);
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = zeroed(panels * pairs * NR, 0u32);
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the features were just checked; reads stay inside the checked span and
            // writes inside `data`, sized for every panel.
            unsafe { x86::pack_b_rows(src, k, n, ld, pairs, &mut data) };
            return Self {
                kind: Kind::Bf16Pairs,
                k,
                n,
                pairs,
                data,
            };
        }
        for panel in 0..panels {
            let j0 = panel * NR;
            let w = NR.min(n - j0);
            for p in 0..pairs {
                let r0 = &src[2 * p * ld + j0..2 * p * ld + j0 + w];
                let r1 = (2 * p + 1 < k).then(|| &src[(2 * p + 1) * ld + j0..][..w]);
                let dst = &mut data[(panel * pairs + p) * NR..][..NR];
                for j in 0..w {
                    let hi = r1.map_or(0, |r| bits(r[j]));
                    dst[j] = pair(bits(r0[j]), hi);
                }
            }
        }
        Self {
            kind: Kind::Bf16Pairs,
            k,
            n,
            pairs,
            data,
        }
    }

    /// A k x n operand in `buf`'s allocation (a scratch reused from call to call, so nothing is
    /// zeroed or allocated per product), to be filled with [`PackedB::put_pairs`]: every pair
    /// row's n columns must be put before the product; the padding columns of the last panel
    /// are zeroed here.
    pub fn in_buffer(mut buf: Vec<u32>, kind: Kind, k: usize, n: usize) -> Self {
        let pairs = kind.units(k);
        let panels = n.div_ceil(NR);
        grow_zeroed(&mut buf, panels * pairs * NR, 0);
        if !n.is_multiple_of(NR) {
            let last = panels - 1;
            for p in 0..pairs {
                buf[(last * pairs + p) * NR + n % NR..(last * pairs + p + 1) * NR].fill(0);
            }
        }
        Self {
            kind,
            k,
            n,
            pairs,
            data: buf,
        }
    }

    /// The allocation back, for the next [`PackedB::in_buffer`].
    pub fn into_buffer(self) -> Vec<u32> {
        self.data
    }

    /// Writes f32 values into depth row `p` of an [`Kind::F32`] operand from column `j` on.
    #[inline]
    pub fn put_f32(&mut self, p: usize, j: usize, src: &[f32]) {
        debug_assert_eq!(self.kind, Kind::F32);
        let words: &[u32] = bytemuck::cast_slice(src);
        self.put_pairs(p, j, words);
    }

    /// Writes words into row `p` from column `j` on: already paired values (see
    /// [`interleave_pairs`]), or f32 bits for a [`Kind::F32`] operand.
    #[inline]
    pub fn put_pairs(&mut self, p: usize, j: usize, src: &[u32]) {
        assert!(
            p < self.pairs && j + src.len() <= self.n,
            "bf16 pack: pair row {p}, columns {j}..{} outside {} x {}",
            j + src.len(),
            self.pairs,
            self.n
        );
        let (mut j, mut src) = (j, src);
        while !src.is_empty() {
            let (panel, lane) = (j / NR, j % NR);
            let len = (NR - lane).min(src.len());
            let at = (panel * self.pairs + p) * NR + lane;
            self.data[at..at + len].copy_from_slice(&src[..len]);
            (j, src) = (j + len, &src[len..]);
        }
    }

    /// The inverse of [`PackedB::from_bf16_cols`]: n lines of k bf16 values, row-major.
    pub fn to_bf16_cols(&self) -> Vec<bf16> {
        assert_eq!(self.kind, Kind::Bf16Pairs, "to_bf16_cols of an f32 operand");
        let mut out = vec![bf16::ZERO; self.n * self.k];
        for (j, line) in out.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            let (panel, lane) = (j / NR, j % NR);
            for (kk, v) in line.iter_mut().enumerate() {
                let word = self.data[(panel * self.pairs + kk / 2) * NR + lane];
                *v = bf16::from_bits((word >> (16 * (kk % 2))) as u16);
            }
        }
        out
    }

    /// From f32 columns: element (kk, j) at `src[j * ld + kk]` (the transpose of a row-major
    /// n x k matrix, e.g. attention keys or a linear layer's `[out, in]` weight).
    pub fn from_f32_cols(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let data = pack_lines(src, n, k, ld, NR, Kind::Bf16Pairs, convert_pairs);
        Self {
            kind: Kind::Bf16Pairs,
            k,
            n,
            pairs: k.div_ceil(2),
            data,
        }
    }

    /// From bf16 columns: element (kk, j) at `src[j * ld + kk]` (a linear layer's bf16 weight).
    pub fn from_bf16_cols(src: &[bf16], k: usize, n: usize, ld: usize) -> Self {
        let data = pack_lines(src, n, k, ld, NR, Kind::Bf16Pairs, bf16_pairs);
        Self {
            kind: Kind::Bf16Pairs,
            k,
            n,
            pairs: k.div_ceil(2),
            data,
        }
    }
}

/// Packs `lines` lines of k values (line i at `src[i * ld..]`) into panels of `width` lines:
/// pair p of line i lands at `[(i / width * pairs + p) * width + i % width]`.
fn pack_lines<T: Sync>(
    src: &[T],
    lines: usize,
    k: usize,
    ld: usize,
    width: usize,
    kind: Kind,
    to_pairs: impl Fn(&[T], &mut [u32]) + Sync,
) -> Vec<u32> {
    check_span(src.len(), lines, k, ld);
    let pairs = kind.units(k);
    let mut data = zeroed(lines.div_ceil(width) * pairs * width, 0u32);
    if pairs == 0 {
        return data;
    }
    // One panel at a time: its lines converted side by side, then written pair by pair so
    // the stores run contiguously through the panel. Large operands (weights packed on every
    // training step) panel by panel in parallel.
    let pack = |conv: &mut Vec<u32>, (panel, out): (usize, &mut [u32])| {
        let i0 = panel * width;
        let n = width.min(lines - i0);
        for (r, line) in conv.chunks_exact_mut(pairs).take(n).enumerate() {
            let i = i0 + r;
            to_pairs(&src[i * ld..i * ld + k], line);
        }
        for (p, dst) in out.chunks_exact_mut(width).enumerate() {
            for (r, d) in dst.iter_mut().take(n).enumerate() {
                *d = conv[r * pairs + p];
            }
        }
    };
    if lines * k >= PARALLEL_PACK {
        use rayon::prelude::*;
        data.par_chunks_exact_mut(pairs * width)
            .enumerate()
            .for_each_init(|| vec![0u32; width * pairs], pack);
    } else {
        let mut conv = vec![0u32; width * pairs];
        for job in data.chunks_exact_mut(pairs * width).enumerate() {
            pack(&mut conv, job);
        }
    }
    data
}

/// [`pack_lines`] of f32 words into `NR`-line panels, transposed straight from the source into
/// fresh memory (no scratch copy, no zeroing pass first): blocks of 16 depths by 16 lines, each
/// read as 16 runs and written as 16 runs, transposed in registers where AVX-512 is there.
fn pack_lines_f32(src: &[f32], lines: usize, k: usize, ld: usize) -> Vec<u32> {
    const KB: usize = 16;
    check_span(src.len(), lines, k, ld);
    let len = lines.div_ceil(NR) * k * NR;
    let mut data: Vec<u32> = Vec::with_capacity(len);
    let fast = available_f32();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fast;
    let pack = |(panel, out): (usize, &mut [MaybeUninit<u32>])| {
        let i0 = panel * NR;
        let n = NR.min(lines - i0);
        for p0 in (0..k).step_by(KB) {
            let kb = KB.min(k - p0);
            for r0 in (0..NR).step_by(16) {
                let rows = n.saturating_sub(r0).min(16);
                #[cfg(target_arch = "x86_64")]
                if fast && kb == KB && rows == 16 {
                    let from = &src[(i0 + r0) * ld + p0..][..15 * ld + KB];
                    let to = &mut out[p0 * NR + r0..][..(KB - 1) * NR + 16];
                    // SAFETY: AVX-512F is present (`fast`); both slices hold every element
                    // the 16 x 16 block reads and writes.
                    unsafe { x86::transpose_16x16(from, ld, to, NR) };
                    continue;
                }
                for q in 0..kb {
                    let dst = &mut out[(p0 + q) * NR + r0..][..16];
                    for (r, d) in dst.iter_mut().enumerate() {
                        let v = if r < rows {
                            src[(i0 + r0 + r) * ld + p0 + q].to_bits()
                        } else {
                            0
                        };
                        d.write(v);
                    }
                }
            }
        }
    };
    each_chunk(
        &mut data.spare_capacity_mut()[..len],
        k * NR,
        lines * k,
        pack,
    );
    // SAFETY: the packer wrote every word of every panel: all depths (blocks of 16), all NR
    // lanes (two halves of 16, the lanes past the last line as zeros).
    unsafe { data.set_len(len) };
    data
}

/// `f((index, chunk))` over `data` in chunks of `len` words: on rayon's pool for operands of at
/// least [`PARALLEL_PACK`] values (`values`), else on this thread.
fn each_chunk<T: Send>(
    data: &mut [T],
    len: usize,
    values: usize,
    f: impl Fn((usize, &mut [T])) + Send + Sync,
) {
    use rayon::prelude::*;
    if values >= PARALLEL_PACK {
        data.par_chunks_mut(len).enumerate().for_each(f);
    } else {
        data.chunks_mut(len).enumerate().for_each(f);
    }
}

/// Values from which an operand is packed in parallel.
const PARALLEL_PACK: usize = 1 << 16;

/// `dst[p] = src[p]`'s bits: an [`Kind::F32`] operand's words.
fn f32_words(src: &[f32], dst: &mut [u32]) {
    dst.copy_from_slice(bytemuck::cast_slice(&src[..dst.len()]));
}

/// `dst[p] = pair(src[2p], src[2p + 1])` of bf16 values (a missing last element is zero).
fn bf16_pairs(src: &[bf16], dst: &mut [u32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = pair(c[0].to_bits(), c[1].to_bits());
    }
    if let [.., last] = src {
        if src.len() % 2 == 1 {
            dst[src.len() / 2] = pair(last.to_bits(), 0);
        }
    }
}

/// Words per packed left row: `units` rounded up to an odd number of 64-byte lines.
fn row_stride(units: usize) -> usize {
    let lines = units.div_ceil(16);
    16 * (lines + 1 - lines % 2)
}

/// Panics on a slice too short for `rows` rows of `cols` at stride `ld` (a caller bug).
fn check_span(len: usize, rows: usize, cols: usize, ld: usize) {
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    };
    assert!(
        len >= need && (rows <= 1 || ld >= cols),
        "bf16 pack: {rows} x {cols} at stride {ld} needs {need} values, have {len}"
    );
}

/// `dst[j] = pair(lo[j], hi[j])` rounded to bf16 (`hi` absent: zeros): two f32 lines, e.g. two
/// channels of an image row, as one line of k-pairs. Rounds as the packers do.
pub fn interleave_pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    assert!(
        lo.len() >= dst.len() && hi.is_none_or(|h| h.len() >= dst.len()),
        "bf16 interleave: {} values wanted",
        dst.len()
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were just checked; reads and writes stay within dst.len().
        done = unsafe { x86::interleave_pairs(lo, hi, dst) };
    }
    for j in done..dst.len() {
        let h = hi.map_or(0, |h| bits(h[j]));
        dst[j] = pair(bits(lo[j]), h);
    }
}

/// `dst[p] = pair(src[2p], src[2p + 1])` rounded to bf16 (a missing last element is zero).
fn convert_pairs(src: &[f32], dst: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were just checked; the function reads and writes in bounds.
        done = unsafe { x86::convert_pairs(src, dst) };
    }
    for p in done..dst.len() {
        let hi = src.get(2 * p + 1).map_or(0, |&v| bits(v));
        dst[p] = pair(bits(src[2 * p]), hi);
    }
}

/// `c = a b` (or `c += a b` when `accumulate`) for the row-major f32 block `c` with row stride
/// `ldc` (at least `b.cols()`), on this thread. Errors if the CPU lacks the kernels.
pub fn matmul(
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> crate::Result<()> {
    check_span(c.len(), a.m, b.n, ldc);
    // SAFETY: `c` spans m rows of n columns at stride ldc and is borrowed exclusively.
    unsafe { matmul_raw(a, b, c.as_mut_ptr(), ldc, accumulate, false) }
}

/// [`matmul`] split across rayon's threads by panels of whichever side has more.
pub fn matmul_parallel(
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> crate::Result<()> {
    check_span(c.len(), a.m, b.n, ldc);
    // SAFETY: as in `matmul`.
    unsafe { matmul_raw(a, b, c.as_mut_ptr(), ldc, accumulate, true) }
}

/// [`matmul`] on a raw block, for callers whose parallel tasks write interleaved blocks of one
/// buffer (convolution tiles: disjoint column ranges of the same rows).
///
/// # Safety
/// `c` points at `a.rows()` rows of `b.cols()` writable f32 at stride `ldc`, which nothing else
/// reads or writes during the call.
pub unsafe fn matmul_raw(
    a: &PackedA,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> crate::Result<()> {
    if a.k != b.k || a.kind != b.kind {
        return Err(crate::Error::msg(format!(
            "packed matmul: operands differ ({} of {:?} vs {} of {:?})",
            a.k, a.kind, b.k, b.kind
        )));
    }
    if b.n > ldc && a.m > 1 {
        return Err(crate::Error::msg(format!(
            "bf16 matmul: row stride {ldc} below the {} columns",
            b.n
        )));
    }
    if !a.kind.available() {
        return Err(crate::Error::msg(match a.kind {
            Kind::Bf16Pairs => "bf16 matmul: this CPU lacks AVX-512 BF16 (use --dtype f32)",
            Kind::F32 => "packed f32 matmul: this CPU lacks AVX-512F",
        }));
    }
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        if !parallel || threads <= 1 || a.panels().max(b.panels()) < 2 {
            // SAFETY: features checked above; the block is the caller's.
            unsafe { x86::matmul(a, 0..a.panels(), b, 0..b.panels(), c, ldc, accumulate) };
            return Ok(());
        }
        let ptr = super::host::SharedOut::from_ptr(c);
        let by_rows = a.panels() >= b.panels();
        let total = if by_rows { a.panels() } else { b.panels() };
        let chunks = (4 * threads).min(total);
        (0..chunks).into_par_iter().for_each(|t| {
            let r = t * total / chunks..(t + 1) * total / chunks;
            let (ra, rb) = if by_rows {
                (r, 0..b.panels())
            } else {
                (0..a.panels(), r)
            };
            // SAFETY: features checked above; each task writes the rows (or columns) of its own
            // panels only, which no other task touches.
            unsafe { x86::matmul(a, ra, b, rb, ptr.get(), ldc, accumulate) };
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (c, accumulate, parallel);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Kind, PackedA, PackedB, KC_PAIRS, MC, MR, NC, NR};

    /// Converts whole groups of 16 pairs; returns how many pairs it wrote.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_pairs(src: &[f32], dst: &mut [u32]) -> usize {
        let groups = (src.len() / 32).min(dst.len() / 16);
        for g in 0..groups {
            let lo = _mm512_loadu_ps(src.as_ptr().add(32 * g));
            let hi = _mm512_loadu_ps(src.as_ptr().add(32 * g + 16));
            // Low 16 bf16 lanes from `lo`, high from `hi`: element order is source order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * g) as *mut _, v);
        }
        groups * 16
    }

    /// Whole groups of 16 of [`super::interleave_pairs`]; returns how many it wrote.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_pairs(
        lo: &[f32],
        hi: Option<&[f32]>,
        dst: &mut [u32],
    ) -> usize {
        let cvt = |p: *const f32| -> __m512i {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
            _mm512_cvtepu16_epi32(h)
        };
        let groups = dst.len() / 16;
        for g in 0..groups {
            let l = cvt(lo.as_ptr().add(16 * g));
            let v = match hi {
                Some(h) => _mm512_or_si512(l, _mm512_slli_epi32::<16>(cvt(h.as_ptr().add(16 * g)))),
                None => l,
            };
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * g) as *mut _, v);
        }
        groups * 16
    }

    /// Packs a row-major k x n f32 matrix into `NR`-column panels of k-pairs; `data` is zeroed
    /// and sized for every panel. Whole groups of 16 columns go through the vector unit.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_b_rows(
        src: &[f32],
        k: usize,
        n: usize,
        ld: usize,
        pairs: usize,
        data: &mut [u32],
    ) {
        let cvt = |p: *const f32| -> __m512i {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
            _mm512_cvtepu16_epi32(h)
        };
        let s = src.as_ptr();
        for panel in 0..n.div_ceil(NR) {
            let j0 = panel * NR;
            let w = NR.min(n - j0);
            let groups = w / 16;
            for p in 0..pairs {
                let dst = data.as_mut_ptr().add((panel * pairs + p) * NR);
                let r0 = s.add(2 * p * ld + j0);
                let has_r1 = 2 * p + 1 < k;
                let r1 = s.add(if has_r1 { (2 * p + 1) * ld + j0 } else { 0 });
                for g in 0..groups {
                    let lo = cvt(r0.add(16 * g));
                    let v = if has_r1 {
                        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(cvt(r1.add(16 * g))))
                    } else {
                        lo
                    };
                    _mm512_storeu_si512(dst.add(16 * g) as *mut _, v);
                }
                for j in groups * 16..w {
                    let hi = if has_r1 { super::bits(*r1.add(j)) } else { 0 };
                    *dst.add(j) = super::pair(super::bits(*r0.add(j)), hi);
                }
            }
        }
    }

    /// The product restricted to left panels `pa` and right panels `pb`.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 present; `c` spans `a.m` rows of `b.n` columns at stride `ldc`; no
    /// other thread writes the block of those panels meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn matmul(
        a: &PackedA,
        pa: Range<usize>,
        b: &PackedB,
        pb: Range<usize>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let pairs = a.pairs;
        if pairs == 0 {
            if !accumulate {
                for i in pa.start * MR..(pa.end * MR).min(a.m) {
                    for j in pb.start * NR..(pb.end * NR).min(b.n) {
                        *c.add(i * ldc + j) = 0.0;
                    }
                }
            }
            return;
        }
        // Blocks of C (MC rows x NC columns) stay in L2 while the whole depth runs over them;
        // within a depth block the right micro-panel (16 KiB) stays in L1 across the rows.
        let (mc_panels, nc_panels) = (MC / MR, NC / NR);
        for jc in (pb.start..pb.end).step_by(nc_panels) {
            let jc_end = (jc + nc_panels).min(pb.end);
            for ic in (pa.start..pa.end).step_by(mc_panels) {
                let ic_end = (ic + mc_panels).min(pa.end);
                let mut k0 = 0;
                while k0 < pairs {
                    let kc = KC_PAIRS.min(pairs - k0);
                    let acc = accumulate || k0 > 0;
                    for jp in jc..jc_end {
                        let bp = b.data.as_ptr().add((jp * b.pairs + k0) * NR);
                        let cols = NR.min(b.n - jp * NR);
                        for ip in ic..ic_end {
                            let t = Tile {
                                kc,
                                b: bp,
                                c: c.add(ip * MR * ldc + jp * NR),
                                ldc,
                                rows: MR.min(a.m - ip * MR),
                                cols,
                                accumulate: acc,
                            };
                            panel(a, ip, k0, &t);
                        }
                    }
                    k0 += kc;
                }
            }
        }
    }

    /// One micro-kernel call for left panel `ip` from pair `k0`; a narrow last panel
    /// (attention's 40-wide values: 32 + 8) costs half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn panel(a: &PackedA, ip: usize, k0: usize, t: &Tile) {
        let ap = a.data.as_ptr().add(ip * MR * a.stride + k0);
        match (a.kind, t.cols <= 16) {
            (Kind::Bf16Pairs, true) => micro_half(t, ap, a.stride),
            (Kind::Bf16Pairs, false) => micro(t, ap, a.stride),
            (Kind::F32, true) => micro_half_f32(t, ap, a.stride),
            (Kind::F32, false) => micro_f32(t, ap, a.stride),
        }
    }

    /// One block of C: `kc` pairs of the right micro-panel `b` into `rows` x `cols` of `c`.
    pub(super) struct Tile {
        kc: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    }

    /// Left element (r, p) of a micro-panel (rows at stride `rs`), broadcast to every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn a_at(a: *const u32, rs: usize, r: usize, p: usize) -> __m512bh {
        std::mem::transmute(_mm512_set1_epi32(*a.add(r * rs + p) as i32))
    }

    /// One `MR x NR` block of C.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn micro(t: &Tile, a: *const u32, rs: usize) {
        let mut c0 = [_mm512_setzero_ps(); MR];
        let mut c1 = [_mm512_setzero_ps(); MR];
        for p in 0..t.kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(t.b.add(p * NR) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(t.b.add(p * NR + 16) as *const _));
            for r in 0..MR {
                let av = a_at(a, rs, r, p);
                c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
            }
        }
        store(t, &c0, Some(&c1));
    }

    /// [`micro`] for panels with at most 16 valid columns: only the first vector of each pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn micro_half(t: &Tile, a: *const u32, rs: usize) {
        let mut c0 = [_mm512_setzero_ps(); MR];
        for p in 0..t.kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(t.b.add(p * NR) as *const _));
            for (r, acc) in c0.iter_mut().enumerate() {
                *acc = _mm512_dpbf16_ps(*acc, a_at(a, rs, r, p), b0);
            }
        }
        store(t, &c0, None);
    }

    /// [`micro`] for f32 words: one FMA per element instead of a pair's dot product.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro_f32(t: &Tile, a: *const u32, rs: usize) {
        let mut c0 = [_mm512_setzero_ps(); MR];
        let mut c1 = [_mm512_setzero_ps(); MR];
        let (a, b) = (a as *const f32, t.b as *const f32);
        for p in 0..t.kc {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r * rs + p));
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
            }
        }
        store(t, &c0, Some(&c1));
    }

    /// [`micro_half`] for f32 words.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro_half_f32(t: &Tile, a: *const u32, rs: usize) {
        let mut c0 = [_mm512_setzero_ps(); MR];
        let (a, b) = (a as *const f32, t.b as *const f32);
        for p in 0..t.kc {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            for (r, acc) in c0.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * rs + p)), b0, *acc);
            }
        }
        store(t, &c0, None);
    }

    /// Writes (or adds) the accumulators of one block to C: `hi` holds columns 16..32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(t: &Tile, lo: &[__m512; MR], hi: Option<&[__m512; MR]>) {
        let (m0, m1) = (mask(t.cols), mask(t.cols.saturating_sub(16)));
        for r in 0..t.rows {
            let row = t.c.add(r * t.ldc);
            let mut v0 = lo[r];
            if t.accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            if let Some(hi) = hi {
                let mut v1 = hi[r];
                if t.accumulate {
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }

    /// `to[q * ts + r] = from[r * fs + q]` for a 16 x 16 block of words: 16 row loads, four
    /// rounds of shuffles (pairs, quads, 128-bit lanes twice), 16 row stores.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_16x16(
        from: &[f32],
        fs: usize,
        to: &mut [std::mem::MaybeUninit<u32>],
        ts: usize,
    ) {
        assert!(from.len() > 15 * fs + 15 && to.len() > 15 * ts + 15);
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(from.as_ptr().add(i * fs)));
        // t[2j] / t[2j+1]: rows 2j and 2j+1 interleaved, depths {0,1} / {2,3} of each lane.
        let mut t = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
            t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
        }
        // u[4g + d]: rows 4g..4g+4 at depth d of each 128-bit lane (depths d, d+4, d+8, d+12).
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b) = (4 * g, 4 * g + 2);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(t[a], t[b]);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[a], t[b]);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[a + 1], t[b + 1]);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[a + 1], t[b + 1]);
        }
        let dst = to.as_mut_ptr() as *mut f32;
        for d in 0..4 {
            // Lanes 0 and 2 / 1 and 3 of rows 0..8 and of rows 8..16, then joined.
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[d], u[4 + d]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[d], u[4 + d]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + d], u[12 + d]);
            let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + d], u[12 + d]);
            _mm512_storeu_ps(dst.add(d * ts), _mm512_shuffle_f32x4::<0x88>(v0, w0));
            _mm512_storeu_ps(dst.add((d + 4) * ts), _mm512_shuffle_f32x4::<0x88>(v1, w1));
            _mm512_storeu_ps(dst.add((d + 8) * ts), _mm512_shuffle_f32x4::<0xDD>(v0, w0));
            _mm512_storeu_ps(dst.add((d + 12) * ts), _mm512_shuffle_f32x4::<0xDD>(v1, w1));
        }
    }

    /// Lanes `0..cols.min(16)` of a 16-lane vector.
    #[inline]
    fn mask(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }
}
