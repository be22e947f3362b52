//! Learning-rate schedules as the reference gets them: diffusers' `get_scheduler(name,
//! num_warmup_steps = warmup x accum, num_training_steps = max x accum)` (train.py line 475),
//! wrapped by accelerate, with `scale_lr` (line 442).
//!
//! accelerate's scheduler wrapper steps the schedule once per process at every optimizer step
//! (`split_batches` off) and not at all when the f16 loss scaler skipped the step, so after `k`
//! applied updates on `world` ranks the schedule stands at `k * world`. [`LrScheduler::lr`]
//! takes `k` and applies that factor.

use std::f64::consts::PI;

use crate::{Error, Result};

/// The schedule names `solver.lr_scheduler` accepts (diffusers' `SchedulerType`, less
/// `piecewise_constant`, which needs `step_rules` that train.py never passes).
pub const SCHEDULES: [&str; 6] = [
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

impl Schedule {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "cosine_with_restarts" => Schedule::CosineWithRestarts,
            "polynomial" => Schedule::Polynomial,
            other => {
                return Err(Error::msg(format!(
                    "unknown lr_scheduler {other:?}; valid: {}",
                    SCHEDULES.join(", ")
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::CosineWithRestarts => "cosine_with_restarts",
            Schedule::Polynomial => "polynomial",
        }
    }
}

/// A schedule with get_scheduler's defaults (`num_cycles` 0.5 for cosine and 1 for restarts,
/// `power` 1, `lr_end` 1e-7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrScheduler {
    pub schedule: Schedule,
    /// The optimizer's lr (after `scale_lr`).
    pub base_lr: f64,
    /// `num_warmup_steps` as passed to get_scheduler (warm-up x accumulation).
    pub warmup: u64,
    /// `num_training_steps` as passed to get_scheduler (max steps x accumulation).
    pub total: u64,
    /// Schedule steps per applied update (accelerate: the number of processes).
    pub per_update: u64,
}

impl LrScheduler {
    /// The reference's call: warm-up and total multiplied by the accumulation steps; `lr`
    /// multiplied by accumulation x batch x world size when `scale_lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_solver(
        name: &str,
        learning_rate: f64,
        scale_lr: bool,
        warmup_steps: u64,
        max_train_steps: u64,
        grad_accum: usize,
        train_bs: usize,
        world: usize,
    ) -> Result<Self> {
        let schedule = Schedule::parse(name)?;
        let base_lr = if scale_lr {
            learning_rate * (grad_accum * train_bs * world) as f64
        } else {
            learning_rate
        };
        if schedule == Schedule::Polynomial && base_lr < POLY_LR_END {
            return Err(Error::msg(format!(
                "lr_scheduler polynomial: lr_end ({POLY_LR_END}) must be smaller than the \
                 initial lr ({base_lr})"
            )));
        }
        Ok(Self {
            schedule,
            base_lr,
            warmup: warmup_steps * grad_accum as u64,
            total: max_train_steps * grad_accum as u64,
            per_update: world.max(1) as u64,
        })
    }

    /// Learning rate of the update after `updates` applied updates.
    pub fn lr(&self, updates: u64) -> f64 {
        self.base_lr * self.lambda(updates.saturating_mul(self.per_update))
    }

    /// diffusers' multiplier at schedule step `step` (torch's LambdaLR: lr = base x lambda).
    pub fn lambda(&self, step: u64) -> f64 {
        let (w, n) = (self.warmup, self.total);
        let warm = |s: u64| s as f64 / w.max(1) as f64;
        let progress = |s: u64| (s - w) as f64 / n.saturating_sub(w).max(1) as f64;
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup if step < w => warm(step),
            Schedule::ConstantWithWarmup => 1.0,
            _ if step < w => warm(step),
            Schedule::Linear => {
                (n as f64 - step as f64).max(0.0) / n.saturating_sub(w).max(1) as f64
            }
            Schedule::Cosine => {
                let cycles = 0.5;
                (0.5 * (1.0 + (PI * cycles * 2.0 * progress(step)).cos())).max(0.0)
            }
            Schedule::CosineWithRestarts => {
                let p = progress(step);
                if p >= 1.0 {
                    return 0.0;
                }
                let cycles = 1.0;
                (0.5 * (1.0 + (PI * ((cycles * p) % 1.0)).cos())).max(0.0)
            }
            Schedule::Polynomial => {
                let init = self.base_lr;
                if step > n {
                    return POLY_LR_END / init;
                }
                let range = init - POLY_LR_END;
                let decay_steps = n as f64 - w as f64;
                if decay_steps <= 0.0 {
                    return POLY_LR_END / init;
                }
                let remaining = 1.0 - (step - w) as f64 / decay_steps;
                (range * remaining.powf(POLY_POWER) + POLY_LR_END) / init
            }
        }
    }
}

/// get_scheduler's polynomial defaults.
const POLY_LR_END: f64 = 1e-7;
const POLY_POWER: f64 = 1.0;
