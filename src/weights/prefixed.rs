//! Several weight sources as one `VarBuilder`, each under a name prefix: a composite model (the
//! MCLD network set, whose four parts ship as four files) asks for `part.key` and the part's own
//! source answers `key`, so its errors and strict report still name that part's file.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

struct Prefixed {
    /// (prefix with its trailing dot, source).
    parts: Vec<(String, VarBuilder<'static>)>,
}

impl Prefixed {
    fn route<'a>(
        &'a self,
        name: &'a str,
    ) -> candle_core::Result<(&'a VarBuilder<'static>, &'a str)> {
        self.parts
            .iter()
            .find_map(|(p, vb)| name.strip_prefix(p.as_str()).map(|rest| (vb, rest)))
            .ok_or_else(|| {
                let known: Vec<&str> = self.parts.iter().map(|(p, _)| p.as_str()).collect();
                candle_core::Error::Msg(format!(
                    "tensor `{name}` belongs to no weight source (prefixes {known:?})"
                ))
            })
    }
}

impl SimpleBackend for Prefixed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (vb, rest) = self.route(name)?;
        vb.get_with_hints_dtype(s, rest, h, dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (vb, rest) = self.route(name)?;
        vb.get_unchecked_dtype(rest, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.route(name)
            .map(|(vb, rest)| vb.contains_tensor(rest))
            .unwrap_or(false)
    }
}

/// One `VarBuilder` over `parts`: a tensor named `prefix.key` comes from the part registered
/// under `prefix` as `key`. Each part keeps its own device; `dtype` and `device` are what the
/// combined builder reports.
pub fn prefixed_var_builder<S: Into<String>>(
    parts: impl IntoIterator<Item = (S, VarBuilder<'static>)>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let parts = parts
        .into_iter()
        .map(|(p, vb)| {
            let mut p: String = p.into();
            if !p.ends_with('.') {
                p.push('.');
            }
            (p, vb)
        })
        .collect();
    let backend: Box<dyn SimpleBackend> = Box::new(Prefixed { parts });
    VarBuilder::from_backend(backend, dtype, device.clone())
}
