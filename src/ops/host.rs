//! Raw access to f32 CPU tensors for the hand-written CPU kernels (`conv`, `attention::cpu`, the norms).

use candle_core::Tensor;

/// Values per parallel task of the elementwise kernels (norms, GEGLU): large enough to amortise
/// the task, small enough to split a 64x64 UNet activation across threads.
pub(crate) const CHUNK: usize = 1 << 15;

/// Runs `f` on a contiguous f32 CPU tensor's data (from its start offset).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            Ok(f(&v[layout.start_offset()..]))
        }
        _ => candle_core::bail!("CPU kernel: expected an f32 CPU tensor"),
    }
}

/// An output buffer shared by parallel tasks that each write a disjoint part of it.
pub(crate) struct SharedOut<T = f32>(*mut T);

// Copy for any element type (a derive would ask `T: Copy` of the pointee).
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}

// SAFETY: users guarantee that tasks write disjoint elements and that the buffer outlives them.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    pub(crate) fn from_ptr(ptr: *mut T) -> Self {
        Self(ptr)
    }

    /// A method, so closures capture the `Sync` wrapper rather than its raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Values from which [`zeroed`] and [`grow_zeroed`] write in parallel.
const PARALLEL_ZERO: usize = 1 << 18;

/// `n` copies of `zero`, written by the thread pool when `n` is large. A fresh buffer's first
/// touch (page faults and zeroing, several GiB per training step) is otherwise serial work on
/// the calling thread while the other workers wait.
pub(crate) fn zeroed<T: Copy + Send + Sync>(n: usize, zero: T) -> Vec<T> {
    let mut v = Vec::new();
    grow_zeroed(&mut v, n, zero);
    v
}

/// `buf.resize(n, zero)` with the new part written as in [`zeroed`] (what `buf` held is kept).
pub(crate) fn grow_zeroed<T: Copy + Send + Sync>(buf: &mut Vec<T>, n: usize, zero: T) {
    use rayon::prelude::*;
    let more = n.saturating_sub(buf.len());
    if more < PARALLEL_ZERO {
        buf.resize(n, zero);
    } else {
        buf.reserve_exact(more);
        buf.par_extend(rayon::iter::repeat_n(zero, more).with_min_len(PARALLEL_ZERO / 4));
    }
}
