//! Noise schedulers (SPEC §4-5). Only DDIM is needed: training adds noise with it and inference
//! samples with it, both configured like diffusers' `DDIMScheduler`.

pub mod ddim;

pub use ddim::{
    BetaSchedule, DdimConfig, DdimScheduler, DdimStepOutput, PredictionType, TimestepSpacing,
};
