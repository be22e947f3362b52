//! Gradient buckets: the many gradient tensors of a step flattened into a few large f32 buffers,
//! so that a collective moves a handful of big messages instead of thousands of small ones, then
//! split back into tensors of the original shapes and dtypes.
//!
//! Plain tensor code on any device: the NCCL collective uses it on the GPU, the tests on the CPU.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Upper bound of one bucket, in bytes of f32 (a tensor larger than this gets a bucket alone).
pub const BUCKET_BYTES: usize = 256 << 20;

/// Splits tensors of `sizes` elements (in order) into consecutive index ranges whose sizes sum to
/// at most `max_elems` each. A tensor larger than `max_elems` forms a bucket of its own. Every
/// index is in exactly one range, in order; no range is empty. `max_elems` 0 counts as 1.
pub fn plan(sizes: &[usize], max_elems: usize) -> Vec<Range<usize>> {
    let max_elems = max_elems.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut filled = 0usize;
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled.saturating_add(n) > max_elems {
            out.push(start..i);
            start = i;
            filled = 0;
        }
        filled = filled.saturating_add(n);
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// The tensors as one contiguous 1-D f32 tensor on the first one's device, in order (element
/// `k` of tensor `i` in row-major order follows everything of tensors `0..i`). Tensors without
/// elements take no kernel launch (CUDA refuses empty ones). Errors on an empty list.
pub fn flatten(tensors: &[Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::msg("bucket: nothing to flatten"));
    };
    let parts = tensors
        .iter()
        .filter(|t| t.elem_count() > 0)
        .map(|t| Ok(t.flatten_all()?.to_dtype(DType::F32)?))
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, first.device())?);
    }
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// The inverse of [`flatten`]: consecutive pieces of the 1-D `flat` with the shapes and dtypes of
/// `like`. The pieces are views of `flat` where the dtype is f32; a tensor without elements comes
/// back as itself.
pub fn split(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let total: usize = like.iter().map(|t| t.elem_count()).sum();
    if flat.rank() != 1 || flat.elem_count() != total {
        return Err(Error::msg(format!(
            "bucket: a flat buffer of shape {:?} cannot be split into tensors of {total} elements",
            flat.dims()
        )));
    }
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            if n == 0 {
                return Ok(t.clone());
            }
            let piece = flat
                .narrow(0, at, n)?
                .reshape(t.dims())?
                .to_dtype(t.dtype())?;
            at += n;
            Ok(piece)
        })
        .collect()
}
