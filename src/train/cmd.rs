//! `mcld train --config configs/train/train.yaml`: the config with the command line's
//! overrides, the rank from the launcher's environment, the data, the step, SIGINT/SIGTERM, then
//! the loop.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::DType;

use super::collective::{RankInfo, SingleProcess};
use super::run::{train_loop, LoopConfig, NoHooks, Resume, StopReason, TrainOutcome};
use crate::config::TrainConfig;
use crate::data::train_set::TrainSet;
use crate::{Error, Result};

/// The command line of `mcld train`: the config plus what people change per run.
#[derive(Debug, Clone, Default)]
pub struct TrainCommand {
    pub config: PathBuf,
    pub max_train_steps: Option<usize>,
    pub output_dir: Option<PathBuf>,
    pub checkpointing_steps: Option<usize>,
    pub validation_steps: Option<usize>,
    pub resume_from_checkpoint: Option<String>,
    pub train_bs: Option<usize>,
    /// cpu, cuda, cuda:N; default the config's `device` (cuda = the GPU of LOCAL_RANK).
    pub device: Option<String>,
    /// f32, f16, bf16; default the config's `weight_dtype`.
    pub dtype: Option<String>,
}

impl TrainCommand {
    /// The config file with the overrides applied (checked like the file itself).
    pub fn load_config(&self) -> Result<TrainConfig> {
        let mut cfg = TrainConfig::load(&self.config)?;
        let bad = |k: &str| Err(Error::config(&self.config, format!("--{k}: expected >= 1")));
        if let Some(v) = self.max_train_steps {
            cfg.solver.max_train_steps = v;
        }
        if let Some(v) = &self.output_dir {
            cfg.output_dir = v.clone();
        }
        if let Some(v) = self.checkpointing_steps {
            cfg.checkpointing_steps = v;
        }
        if let Some(v) = self.validation_steps {
            cfg.val.validation_steps = v;
        }
        if let Some(v) = &self.resume_from_checkpoint {
            cfg.resume_from_checkpoint = v.clone();
        }
        if let Some(v) = self.train_bs {
            if v == 0 {
                return bad("train_bs");
            }
            cfg.data.train_bs = v;
        }
        if cfg.solver.gradient_accumulation_steps == 0 {
            return Err(Error::config(
                &self.config,
                "key `solver.gradient_accumulation_steps`: expected >= 1",
            ));
        }
        Ok(cfg)
    }
}

/// The loop's settings from a training config.
pub fn loop_config(cfg: &TrainConfig, dtype: DType, progress: bool) -> LoopConfig {
    LoopConfig {
        seed: cfg.seed,
        train_bs: cfg.data.train_bs,
        grad_accum: cfg.solver.gradient_accumulation_steps,
        max_train_steps: cfg.solver.max_train_steps as u64,
        learning_rate: cfg.solver.learning_rate,
        lr_warmup_steps: cfg.solver.lr_warmup_steps as u64,
        checkpointing_steps: cfg.checkpointing_steps as u64,
        checkpoints_total_limit: cfg.checkpoints_total_limit,
        validation_steps: cfg.val.validation_steps as u64,
        exp_dir: cfg.output_dir.join(&cfg.exp_name),
        resume: Resume::parse(&cfg.resume_from_checkpoint),
        prefetch: 2 * cfg.solver.gradient_accumulation_steps.max(1),
        progress,
        loss_scaling: dtype == DType::F16,
    }
}

fn config_dtype(cfg: &TrainConfig) -> &'static str {
    match cfg.weight_dtype.as_str() {
        "fp16" => "f16",
        "bf16" => "bf16",
        _ => "f32",
    }
}

/// Runs `mcld train`.
pub fn run(cmd: &TrainCommand) -> Result<TrainOutcome> {
    let cfg = cmd.load_config()?;
    let rank = RankInfo::from_env()?;
    if rank.world > 1 {
        // TODO(nccl): an NCCL `Collective` for one process per GPU.
        return Err(Error::msg(format!(
            "WORLD_SIZE={}: multi-process training needs the NCCL collective, which is not \
             built yet; run one process (unset WORLD_SIZE/RANK)",
            rank.world
        )));
    }
    let device_name = cmd.device.clone().unwrap_or_else(|| cfg.device.clone());
    let device_name = if device_name == "cuda" && rank.world > 1 {
        format!("cuda:{}", rank.local_rank)
    } else {
        device_name
    };
    let device = crate::device::parse_device(&device_name)?;
    let dtype_name = cmd
        .dtype
        .clone()
        .unwrap_or_else(|| config_dtype(&cfg).to_string());
    let dtype = crate::device::parse_dtype(&dtype_name)?;

    let set = TrainSet::from_config(&cfg.data)?;
    let progress = rank.is_main();
    if progress && !set.skipped.is_empty() {
        eprintln!(
            "{} of {} pairs in {} have a missing file and are skipped (listed in the run's \
             train_report.json); first: {}",
            set.skipped.len(),
            set.skipped.len() + set.len(),
            set.csv().display(),
            set.skipped[0].path.display()
        );
    }
    let mut step = super::build_step(&cfg, &device, dtype)?;

    let stop = install_stop_signals()?;

    let lc = loop_config(&cfg, dtype, progress);
    let outcome = train_loop(
        step.as_mut(),
        Arc::new(set),
        &lc,
        &SingleProcess,
        &stop,
        &mut NoHooks,
    )?;
    if progress {
        let ck = outcome
            .last_checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into());
        match outcome.reason {
            StopReason::Finished => {
                eprintln!("trained to step {}; last checkpoint {ck}", outcome.step)
            }
            StopReason::Interrupted => eprintln!(
                "stopped at step {} on request; checkpoint {ck}; continue with \
                 --resume_from_checkpoint latest",
                outcome.step
            ),
        }
        if !outcome.skipped.is_empty() || !outcome.warnings.is_empty() {
            eprintln!(
                "{} pairs skipped, {} warnings: see {}",
                outcome.skipped.len(),
                outcome.warnings.len(),
                lc.exp_dir.join(super::run::REPORT_FILE).display()
            );
        }
    }
    Ok(outcome)
}

/// A flag set by SIGINT or SIGTERM, which the loop checks between steps (it finishes the step,
/// writes a checkpoint and returns). A second signal ends the process at once (status 130).
pub fn install_stop_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so the first signal finds the flag still false and only sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| Error::msg(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(stop)
}
