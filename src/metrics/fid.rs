//! Frechet distance between two Gaussian fits of feature sets (FID), as MCLD's
//! `compute_fid_deepfashion` defines it, with the matrix square root taken by a symmetric route.
//!
//! `tr sqrtm(S1 S2)` equals the sum of the square roots of the eigenvalues of
//! `S1^1/2 S2 S1^1/2`, a symmetric positive semi-definite matrix. Two symmetric
//! eigendecompositions in f64 give it without the complex Schur form scipy uses, and stay sound
//! when the covariances are singular (fewer samples than dimensions), where scipy <= 1.15 returns
//! garbage.

use faer::{Mat, Side};

use crate::{Error, Result};

/// Mean (float32, as numpy's mean of float32 features) and covariance (float64, divisor N-1).
#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub n: usize,
    pub mu: Vec<f32>,
    pub sigma: Mat<f64>,
}

impl FeatureStats {
    /// Statistics of `n` row-major feature vectors of dimension `dim`.
    pub fn from_features(features: &[f32], n: usize, dim: usize) -> Result<Self> {
        if features.len() != n * dim {
            return Err(Error::msg(format!(
                "fid: {} feature values, expected {n}x{dim}",
                features.len()
            )));
        }
        if n < 2 || dim == 0 {
            return Err(Error::msg(format!(
                "fid: need at least 2 feature vectors of non-zero size, got {n}x{dim}"
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(Error::msg(format!(
                "fid: feature row {} has a non-finite value",
                i / dim
            )));
        }
        // Sums in f64 then one rounding to f32: exact for the reference's float32 sums whenever
        // those are exact, and closer to the true mean otherwise.
        let mut sum = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        let mu: Vec<f32> = sum.iter().map(|&s| (s as f32) / (n as f32)).collect();
        // np.cov centres with the float64 mean.
        let mean64: Vec<f64> = sum.iter().map(|&s| s / n as f64).collect();
        let xc = Mat::<f64>::from_fn(n, dim, |i, j| features[i * dim + j] as f64 - mean64[j]);
        let mut sigma = xc.transpose() * &xc;
        let scale = 1.0 / (n as f64 - 1.0);
        for j in 0..dim {
            for i in 0..dim {
                sigma[(i, j)] *= scale;
            }
        }
        Ok(Self { n, mu, sigma })
    }

    pub fn dim(&self) -> usize {
        self.mu.len()
    }
}

/// FID and its parts.
#[derive(Debug, Clone)]
pub struct FidResult {
    pub fid: f64,
    /// `|mu1 - mu2|^2` with the difference taken in f32.
    pub mean_term: f64,
    pub trace_sigma_real: f64,
    pub trace_sigma_pred: f64,
    pub trace_covmean: f64,
    /// Whether the 1e-6 diagonal offset had to be added.
    pub offset_used: bool,
}

fn trace(m: &Mat<f64>) -> f64 {
    (0..m.nrows()).map(|i| m[(i, i)]).sum()
}

fn with_offset(m: &Mat<f64>, eps: f64) -> Mat<f64> {
    let mut o = m.clone();
    for i in 0..o.nrows() {
        o[(i, i)] += eps;
    }
    o
}

/// `tr sqrtm(s1 s2)` for symmetric PSD `s1`, `s2`; `None` if it is not finite.
pub fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<Option<f64>> {
    let n = s1.nrows();
    let eig = s1
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::msg(format!("fid: eigendecomposition failed: {e:?}")))?;
    let u = eig.U();
    let lam = eig.S().column_vector();
    // B = U diag(sqrt(max(l,0))); B^T S2 B is orthogonally similar to S1^1/2 S2 S1^1/2.
    let b = Mat::<f64>::from_fn(n, n, |i, j| u[(i, j)] * lam[j].max(0.0).sqrt());
    let c = b.transpose() * (s2 * &b);
    // Symmetrise against rounding before the symmetric solver reads one triangle.
    let c = Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (c[(i, j)] + c[(j, i)]));
    let ev = c
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| Error::msg(format!("fid: eigenvalues failed: {e:?}")))?;
    let t: f64 = ev.iter().map(|&v| v.max(0.0).sqrt()).sum();
    Ok(t.is_finite().then_some(t))
}

/// Frechet distance between the real (training-set) and generated statistics.
pub fn frechet_distance(real: &FeatureStats, pred: &FeatureStats) -> Result<FidResult> {
    let d = real.dim();
    if pred.dim() != d || real.sigma.nrows() != d || pred.sigma.nrows() != d {
        return Err(Error::msg(format!(
            "fid: feature dimensions differ (real {d}, generated {})",
            pred.dim()
        )));
    }
    let mean_term: f64 = real
        .mu
        .iter()
        .zip(&pred.mu)
        .map(|(a, b)| {
            let diff = (a - b) as f64;
            diff * diff
        })
        .sum();
    let (trace_covmean, offset_used) = match trace_sqrt_product(&real.sigma, &pred.sigma)? {
        Some(t) => (t, false),
        None => {
            let eps = 1e-6;
            let t = trace_sqrt_product(
                &with_offset(&real.sigma, eps),
                &with_offset(&pred.sigma, eps),
            )?
            .ok_or_else(|| Error::msg("fid: matrix square root is not finite"))?;
            (t, true)
        }
    };
    let trace_sigma_real = trace(&real.sigma);
    let trace_sigma_pred = trace(&pred.sigma);
    Ok(FidResult {
        fid: mean_term + trace_sigma_real + trace_sigma_pred - 2.0 * trace_covmean,
        mean_term,
        trace_sigma_real,
        trace_sigma_pred,
        trace_covmean,
        offset_used,
    })
}

/// FID between two feature sets given as row-major `(n, dim)` arrays.
pub fn fid_from_features(
    real: &[f32],
    n_real: usize,
    pred: &[f32],
    n_pred: usize,
    dim: usize,
) -> Result<FidResult> {
    let r = FeatureStats::from_features(real, n_real, dim)?;
    let p = FeatureStats::from_features(pred, n_pred, dim)?;
    frechet_distance(&r, &p)
}
