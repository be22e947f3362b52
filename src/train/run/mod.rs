//! The training run around any [`TrainStep`](super::step::api::TrainStep): the loop itself
//! ([`train_loop`]: epochs, accumulation, logs, checkpoints, validation, resume, stop), the
//! learning-rate schedule ([`lr`]), run checkpoint folders ([`checkpoint`]), the loss curve
//! ([`plot`]), validation grids ([`validate`]), and the commands that drive it: `mcld train`
//! ([`cmd`], [`dry_run`]) and `mcld demo --train` ([`demo`]). Ranks are reached only through
//! [`Collective`](super::dist::collective::Collective).

pub mod checkpoint;
pub mod cmd;
pub mod demo;
pub mod dry_run;
pub mod lr;
pub mod plot;
pub mod train_loop;
pub mod validate;
