//! GroupNorm (with the SiLU that usually follows) and LayerNorm as candle custom ops with fused
//! backward passes, for training on the CPU.
//!
//! Composed from candle's primitives, a GroupNorm + SiLU is about ten ops forward and twenty
//! backward, each a pass over the activation through freshly allocated memory. Here the forward
//! pass is two passes per group (statistics in f64; scale, shift, activation) and the backward
//! pass recomputes the statistics and takes two more: one forming the activation's gradient
//! and the per-channel sums, one applying
//! `dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))` with `g = dy * weight`.
//! The weight and bias gradients are those sums, reduced over the batch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::elem::{slice, with_data, Elem};
use crate::ops::host::zeroed;

/// Values summed in `T` before they are added into an f64 total.
const SUM_CHUNK: usize = 256;

/// Mean and population variance of `xs`, in f64 (two passes).
fn mean_var<T: Elem>(xs: &[T]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let sum: f64 = xs
        .chunks(SUM_CHUNK)
        .map(|c| c.iter().fold(T::zero(), |a, &x| a + x).to_f64())
        .sum();
    let mean = sum / n;
    let m = T::from_f64(mean);
    let sq: f64 = xs
        .chunks(SUM_CHUNK)
        .map(|c| {
            c.iter()
                .fold(T::zero(), |a, &x| {
                    let d = x - m;
                    a + d * d
                })
                .to_f64()
        })
        .sum();
    (mean, sq / n)
}

/// SiLU's derivative at `y`, from its gate `s = sigmoid(y)`.
#[inline(always)]
fn silu_grad<T: Elem>(y: T, s: T) -> T {
    let one = T::from_f64(1.0);
    s * (one + y * (one - s))
}

/// GroupNorm over `n` images of `c` channels of `plane` values.
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    n: usize,
    c: usize,
    plane: usize,
    groups: usize,
    eps: f64,
    act: bool,
}

impl GroupNormOp {
    fn per_group(&self) -> usize {
        self.c / self.groups
    }

    fn forward<T: Elem>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (cg, plane) = (self.per_group(), self.plane);
        let mut out = zeroed(x.len(), T::zero());
        out.par_chunks_mut(cg * plane)
            .zip(x.par_chunks(cg * plane))
            .enumerate()
            .for_each(|(task, (o, s))| {
                let (mean, var) = mean_var(s);
                let rstd = 1.0 / (var + self.eps).sqrt();
                let c0 = task % self.groups * cg;
                let m = T::from_f64(mean);
                for (ch, (oc, sc)) in o.chunks_mut(plane).zip(s.chunks(plane)).enumerate() {
                    let scale = T::from_f64(rstd * w[c0 + ch].to_f64());
                    let shift = b[c0 + ch];
                    for (d, &v) in oc.iter_mut().zip(sc) {
                        let y = (v - m) * scale + shift;
                        *d = if self.act { y * T::sigmoid(y) } else { y };
                    }
                }
            });
        out
    }

    /// The gradients of x, the weight and the bias.
    fn backward<T: Elem>(&self, x: &[T], w: &[T], b: &[T], dz: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (cg, plane) = (self.per_group(), self.plane);
        let count = (cg * plane).max(1) as f64;
        let mut dx = zeroed(x.len(), T::zero());
        // Per (image, channel): sum of dy and of dy * x_hat.
        let mut sums = vec![(0f64, 0f64); self.n * self.c];
        dx.par_chunks_mut(cg * plane)
            .zip(sums.par_chunks_mut(cg))
            .zip(x.par_chunks(cg * plane).zip(dz.par_chunks(cg * plane)))
            .enumerate()
            .for_each(|(task, ((dxg, sg), (xg, dzg)))| {
                let (mean, var) = mean_var(xg);
                let rstd = 1.0 / (var + self.eps).sqrt();
                let (m, r) = (T::from_f64(mean), T::from_f64(rstd));
                let c0 = task % self.groups * cg;
                let (mut mg, mut mgx) = (0f64, 0f64);
                for ch in 0..cg {
                    let (gamma, beta) = (w[c0 + ch], b[c0 + ch]);
                    let range = ch * plane..(ch + 1) * plane;
                    let (mut sdy, mut sdyx) = (0f64, 0f64);
                    let chunks = dxg[range.clone()]
                        .chunks_mut(SUM_CHUNK)
                        .zip(xg[range.clone()].chunks(SUM_CHUNK))
                        .zip(dzg[range].chunks(SUM_CHUNK));
                    for ((dc, xc), gc) in chunks {
                        let (mut a, mut ax) = (T::zero(), T::zero());
                        for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                            let xh = (v - m) * r;
                            let dy = if self.act {
                                let y = xh * gamma + beta;
                                g * silu_grad(y, T::sigmoid(y))
                            } else {
                                g
                            };
                            *d = dy;
                            a += dy;
                            ax += dy * xh;
                        }
                        sdy += a.to_f64();
                        sdyx += ax.to_f64();
                    }
                    sg[ch] = (sdy, sdyx);
                    mg += gamma.to_f64() * sdy;
                    mgx += gamma.to_f64() * sdyx;
                }
                let (mg, mgx) = (T::from_f64(mg / count), T::from_f64(mgx / count));
                for ch in 0..cg {
                    let gamma = w[c0 + ch];
                    let range = ch * plane..(ch + 1) * plane;
                    for (d, &v) in dxg[range.clone()].iter_mut().zip(&xg[range]) {
                        let xh = (v - m) * r;
                        *d = r * (gamma * *d - mg - xh * mgx);
                    }
                }
            });
        let mut dw = vec![T::zero(); self.c];
        let mut db = vec![T::zero(); self.c];
        for ch in 0..self.c {
            let (sb, sw) = (0..self.n).fold((0f64, 0f64), |(a, b2), i| {
                let (dy, dyx) = sums[i * self.c + ch];
                (a + dy, b2 + dyx)
            });
            db[ch] = T::from_f64(sb);
            dw[ch] = T::from_f64(sw);
        }
        (dx, dw, db)
    }
}

/// LayerNorm over rows of `d` values.
#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    d: usize,
    eps: f64,
}

/// Rows per parallel task of the LayerNorm kernels.
fn rows_per_task(d: usize) -> usize {
    ((1 << 15) / d.max(1)).max(1)
}

impl LayerNormOp {
    fn forward<T: Elem>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let d = self.d;
        let mut out = zeroed(x.len(), T::zero());
        let per = rows_per_task(d) * d;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, s)| {
                for (orow, srow) in o.chunks_exact_mut(d).zip(s.chunks_exact(d)) {
                    let (mean, var) = mean_var(srow);
                    let (m, r) = (
                        T::from_f64(mean),
                        T::from_f64(1.0 / (var + self.eps).sqrt()),
                    );
                    for (((o, &v), &g), &bb) in orow.iter_mut().zip(srow).zip(w).zip(b) {
                        *o = (v - m) * r * g + bb;
                    }
                }
            });
        out
    }

    fn backward<T: Elem>(&self, x: &[T], w: &[T], dz: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let d = self.d;
        let per = rows_per_task(d) * d;
        let mut dx = zeroed(x.len(), T::zero());
        // Per task: partial weight and bias gradients, reduced below.
        let partial: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(dz.par_chunks(per)))
            .map(|(dxc, (xc, dzc))| {
                let mut pw = vec![T::zero(); d];
                let mut pb = vec![T::zero(); d];
                for ((dxr, xr), dzr) in dxc
                    .chunks_exact_mut(d)
                    .zip(xc.chunks_exact(d))
                    .zip(dzc.chunks_exact(d))
                {
                    let (mean, var) = mean_var(xr);
                    let (m, r) = (
                        T::from_f64(mean),
                        T::from_f64(1.0 / (var + self.eps).sqrt()),
                    );
                    let (mut sg, mut sgx) = (T::zero(), T::zero());
                    for j in 0..d {
                        let xh = (xr[j] - m) * r;
                        let dy = dzr[j];
                        let g = dy * w[j];
                        sg += g;
                        sgx += g * xh;
                        pw[j] += dy * xh;
                        pb[j] += dy;
                    }
                    let n = T::from_f64(d as f64);
                    let (mg, mgx) = (sg / n, sgx / n);
                    for j in 0..d {
                        let xh = (xr[j] - m) * r;
                        dxr[j] = r * (dzr[j] * w[j] - mg - xh * mgx);
                    }
                }
                (pw, pb)
            })
            .collect();
        let mut dw = vec![0f64; d];
        let mut db = vec![0f64; d];
        for (pw, pb) in &partial {
            for j in 0..d {
                dw[j] += pw[j].to_f64();
                db[j] += pb[j].to_f64();
            }
        }
        let back = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        (dx, back(dw), back(db))
    }
}

/// Either norm, as one custom op type.
#[derive(Debug, Clone, Copy)]
enum NormOp {
    Group(GroupNormOp),
    Layer(LayerNormOp),
}

impl NormOp {
    fn fwd_t<T: Elem>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        shape: &Shape,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match self {
            NormOp::Group(g) => g.forward(x, w, b),
            NormOp::Layer(l) => l.forward(x, w, b),
        };
        Ok((T::to_cpu_storage_owned(out), shape.clone()))
    }

    fn bwd_t<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        dz: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_data::<T, _>(x, |xs| {
            with_data::<T, _>(w, |ws| {
                with_data::<T, _>(b, |bs| {
                    with_data::<T, _>(dz, |dzs| match self {
                        NormOp::Group(g) => g.backward(xs, ws, bs, dzs),
                        NormOp::Layer(l) => l.backward(xs, ws, dzs),
                    })
                })
            })
        })????;
        let dev = x.device();
        let keep = |v: Vec<T>, t: &Tensor| -> candle_core::Result<Option<Tensor>> {
            if t.track_op() {
                Tensor::from_vec(v, t.shape(), dev).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((keep(dx, x)?, keep(dw, w)?, keep(db, b)?))
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        match self {
            NormOp::Group(_) => "mcld-group-norm",
            NormOp::Layer(_) => "mcld-layer-norm",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => {
                self.fwd_t::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, l1.shape())
            }
            DType::F64 => {
                self.fwd_t::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, l1.shape())
            }
            dt => candle_core::bail!("norm op: no kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dz: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, w, b, dz),
            DType::F64 => self.bwd_t::<f64>(x, w, b, dz),
            dt => candle_core::bail!("norm op: no kernel for {dt:?}"),
        }
    }
}

/// Whether the op takes these tensors: f32 or f64 on the CPU, all of one dtype.
fn applies(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// GroupNorm of a (B, C, ...) tensor with per-channel `weight` and `bias`, then SiLU when `act`,
/// as the custom op; `None` where it does not apply (the caller composes the ops instead).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    act: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) || x.rank() < 2 {
        return Ok(None);
    }
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 || weight.dims() != [c] || bias.dims() != [c] {
        return Ok(None);
    }
    let op = NormOp::Group(GroupNormOp {
        n,
        c,
        plane: x.elem_count() / (n * c).max(1),
        groups,
        eps,
        act,
    });
    if x.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        op,
    )?))
}

/// LayerNorm over the last dimension with `weight` and `bias`, as the custom op; `None` where
/// it does not apply.
pub fn layer_norm(
    x: &Tensor,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) || x.rank() == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        return Ok(None);
    }
    let op = NormOp::Layer(LayerNormOp { d, eps });
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        op,
    )?))
}
