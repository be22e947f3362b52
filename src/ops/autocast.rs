//! bf16 products for CPU training, as a scope on the calling thread (torch.autocast's model).
//!
//! Inside a [`bf16_products`] scope the training ops (convolution, linear) round their
//! matrix-product operands to bf16 and accumulate in f32 on the AVX-512 BF16 kernels, in the
//! forward and the backward pass; weights, activations, norms, softmax and gradients stay f32.
//! Each op reads the scope when the forward pass builds it and keeps that choice for its
//! backward pass, so a backward run later (or a recomputed segment) multiplies as its forward did.
//! A scope rather than a flag threaded through every layer: the networks are the inference ones.

use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    static BF16: Cell<bool> = const { Cell::new(false) };
}

/// How a training op multiplies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Products {
    /// In the tensors' own type.
    #[default]
    Exact,
    /// f32 operands rounded to bf16 (to nearest even), f32 accumulation.
    Bf16,
}

impl Products {
    /// The choice of the innermost scope on this thread.
    pub fn current() -> Self {
        if BF16.with(Cell::get) {
            Products::Bf16
        } else {
            Products::Exact
        }
    }
}

/// While alive, training ops built on this thread use [`Products::Bf16`].
#[must_use = "the scope ends when this value is dropped"]
pub struct Bf16Scope {
    prev: bool,
    /// Tied to the thread whose flag it set.
    _thread: PhantomData<*const ()>,
}

impl Drop for Bf16Scope {
    fn drop(&mut self) {
        BF16.with(|f| f.set(self.prev));
    }
}

/// Opens a bf16-products scope; `None` where the CPU lacks the AVX-512 BF16 kernel.
pub fn bf16_products() -> Option<Bf16Scope> {
    if !super::packed_gemm::available() {
        return None;
    }
    let prev = BF16.with(|f| f.replace(true));
    Some(Bf16Scope {
        prev,
        _thread: PhantomData,
    })
}
