//! Construction of the training step for `mcld train`. The step itself (networks, loss,
//! backward, AdamW) is built in its own branch; until it lands here this says so.

use candle_core::{DType, Device};

use super::api::TrainStep;
use crate::config::TrainConfig;
use crate::{Error, Result};

/// What [`build_step`] answers while the step is not in this build.
pub const STEP_NOT_BUILT: &str = "training step not built in this branch";

/// The training step for `cfg` on `device` at compute precision `dtype`.
pub fn build_step(
    _cfg: &TrainConfig,
    _device: &Device,
    _dtype: DType,
) -> Result<Box<dyn TrainStep>> {
    Err(Error::msg(STEP_NOT_BUILT))
}

/// True for [`build_step`]'s "not built" answer (the CLI maps it to its not-built exit code).
pub fn is_not_built(e: &Error) -> bool {
    matches!(e, Error::Msg(m) if m == STEP_NOT_BUILT)
}
