//! The training step: what one optimizer step does to the networks, on a batch the loop hands
//! it ([`api`] is the contract with the loop). Starting weights ([`init`]) and the step's
//! assembly from a config ([`setup`]), the MCLD step itself ([`trainer`]: frozen VAE and CLIP,
//! the random draws, loss scaling), the objective ([`loss`]), the trainable tensors
//! ([`params`]), the optimizer ([`adamw`]), the f16 loss scaler ([`scaler`]) and the step's own
//! state on disk ([`state`]: weights, moments, scale). Nothing here knows about epochs, files of
//! a dataset, checkpoints folders or ranks.

pub mod adamw;
pub mod api;
pub mod init;
pub mod loss;
pub mod params;
pub mod scaler;
pub mod setup;
pub mod state;
pub mod trainer;
