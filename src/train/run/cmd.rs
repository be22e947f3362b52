//! `mcld train --config configs/train/train.yaml`: the config with the command line's
//! overrides, the rank from the launcher's environment, the data, the step, SIGINT/SIGTERM, then
//! the loop.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::DType;

use super::lr::LrScheduler;
use super::train_loop::{train_loop, LoopConfig, Resume, StopReason, TrainOutcome};
use super::validate::ValidationHook;
use crate::config::TrainConfig;
use crate::data::train_set::TrainSet;
use crate::train::dist::collective::{Collective, SingleProcess};
use crate::train::dist::rank::{Backend, RankInfo};
use crate::train::dist::tcp::TcpCollective;
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
    /// f32, f16, bf16 for the trained networks and the frozen encoders alike; default
    /// `solver.mixed_precision` for the networks and `weight_dtype` for the encoders.
    pub dtype: Option<String>,
    /// Check everything and print the plan without training.
    pub dry_run: bool,
    /// Start this many local ranks (processes) and wait for them; ignored inside a launched
    /// rank (WORLD_SIZE set).
    pub nproc_per_node: Option<usize>,
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
        Ok(cfg)
    }

    /// The compute dtype of the trained networks and the dtype of the frozen encoders.
    pub fn dtypes(&self, cfg: &TrainConfig) -> Result<(DType, DType)> {
        match &self.dtype {
            Some(d) => {
                let d = crate::device::parse_dtype(d)?;
                Ok((d, d))
            }
            None => Ok((
                crate::train::step::setup::mixed_precision_dtype(cfg),
                crate::train::step::setup::config_dtype(cfg),
            )),
        }
    }
}

/// The learning-rate schedule of a config for `world` ranks (an unknown `lr_scheduler` is an
/// error naming the key and the valid ones).
pub fn lr_scheduler(cfg: &TrainConfig, world: usize, path: &Path) -> Result<LrScheduler> {
    let s = &cfg.solver;
    LrScheduler::from_solver(
        &s.lr_scheduler,
        s.learning_rate,
        s.scale_lr,
        s.lr_warmup_steps as u64,
        s.max_train_steps as u64,
        s.gradient_accumulation_steps,
        cfg.data.train_bs,
        world,
    )
    .map_err(|e| Error::config(path, format!("key `solver.lr_scheduler`: {e}")))
}

/// The loop's settings from a training config, for `world` ranks.
pub fn loop_config(
    cfg: &TrainConfig,
    dtype: DType,
    progress: bool,
    world: usize,
    path: &Path,
) -> Result<LoopConfig> {
    Ok(LoopConfig {
        seed: cfg.seed,
        train_bs: cfg.data.train_bs,
        grad_accum: cfg.solver.gradient_accumulation_steps,
        max_train_steps: cfg.solver.max_train_steps as u64,
        lr: lr_scheduler(cfg, world, path)?,
        checkpointing_steps: cfg.checkpointing_steps as u64,
        checkpoints_total_limit: cfg.checkpoints_total_limit,
        validation_steps: cfg.val.validation_steps as u64,
        exp_dir: cfg.output_dir.join(&cfg.exp_name),
        resume: Resume::parse(&cfg.resume_from_checkpoint),
        prefetch: 2 * cfg.solver.gradient_accumulation_steps.max(1),
        progress,
        loss_scaling: dtype == DType::F16,
        save_model_epoch_interval: if cfg.no_save {
            0
        } else {
            cfg.save_model_epoch_interval as u64
        },
    })
}

/// What rank 0 says at start-up about the config: keys it does not follow (and what happens
/// instead), and a launched world size other than `data.num_processes`.
pub fn startup_notes(cfg: &TrainConfig, world: usize, lr: &LrScheduler) -> Vec<String> {
    let mut out = cfg.notes();
    if cfg.data.num_processes != world {
        out.push(format!(
            "warning: config `data.num_processes` is {} but {world} rank(s) were launched; the \
             run uses {world} (effective batch {} = train_bs {} x {world} x accumulation {})",
            cfg.data.num_processes,
            cfg.data.train_bs * world * cfg.solver.gradient_accumulation_steps,
            cfg.data.train_bs,
            cfg.solver.gradient_accumulation_steps
        ));
    }
    if world > 1 && lr.schedule != super::lr::Schedule::Constant {
        out.push(format!(
            "lr_scheduler {}: as under accelerate, the schedule advances {world} steps per \
             update (one per process)",
            lr.schedule.name()
        ));
    }
    out
}

/// `mcld train`: starts the local ranks with `--nproc-per-node N` (outside a launcher), else
/// runs this process's rank.
pub fn run_or_launch(cmd: &TrainCommand) -> Result<()> {
    if cmd.dry_run {
        let plan = super::dry_run::dry_run(cmd)?;
        println!("{}", plan.text);
        return Ok(());
    }
    match cmd.nproc_per_node.filter(|n| *n > 1) {
        Some(n) if std::env::var_os("WORLD_SIZE").is_none() => launch_local(n),
        _ => run(cmd).map(|_| ()),
    }
}

/// Runs this process's rank of `mcld train`.
pub fn run(cmd: &TrainCommand) -> Result<TrainOutcome> {
    let cfg = cmd.load_config()?;
    let rank = RankInfo::from_env()?;
    let device_name = cmd.device.clone().unwrap_or_else(|| cfg.device.clone());
    let device_name = if device_name == "cuda" && rank.world > 1 {
        format!("cuda:{}", rank.local_rank)
    } else {
        device_name
    };
    let device = crate::device::parse_device(&device_name)?;
    let (dtype, enc_dtype) = cmd.dtypes(&cfg)?;
    let lc = loop_config(&cfg, dtype, rank.is_main(), rank.world, &cmd.config)?;
    if rank.is_main() {
        for n in startup_notes(&cfg, rank.world, &lc.lr) {
            eprintln!("{n}");
        }
    }
    let backend = Backend::from_vars(|k| std::env::var(k).ok(), rank.world, device.is_cuda())?;
    let coll: Box<dyn Collective> = match backend {
        Backend::Single => Box::new(SingleProcess),
        Backend::Tcp => Box::new(TcpCollective::connect(&rank, RENDEZVOUS)?),
        Backend::Nccl { timeout } => nccl_collective(&rank, &device, timeout)?,
    };

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
    let mut step: Box<dyn crate::train::step::api::TrainStep> = Box::new(
        crate::train::step::setup::build_trainer_with(&cfg, &device, dtype, enc_dtype)?,
    );

    let stop = install_stop_signals()?;

    let outcome = train_loop(
        step.as_mut(),
        Arc::new(set),
        &lc,
        coll.as_ref(),
        &stop,
        &mut ValidationHook::new(&cfg, &device, dtype, progress),
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
                lc.exp_dir.join(super::train_loop::REPORT_FILE).display()
            );
        }
    }
    Ok(outcome)
}

/// How long the ranks wait for each other at the rendezvous.
const RENDEZVOUS: std::time::Duration = std::time::Duration::from_secs(600);

#[cfg(feature = "nccl")]
fn nccl_collective(
    rank: &RankInfo,
    device: &candle_core::Device,
    timeout: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::train::dist::nccl::NcclCollective::connect(
        rank, device, RENDEZVOUS, timeout,
    )?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_collective(
    rank: &RankInfo,
    _device: &candle_core::Device,
    _timeout: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    Err(Error::msg(format!(
        "rank {} of {}: ranks on GPUs sum their gradients with NCCL, and this mcld was built \
         without it; rebuild with `--features cuda,nccl` (scripts/build-cuda.sh with \
         MCLD_CUDA_FEATURES=cuda,cudnn,nccl), or set MCLD_COLLECTIVE=tcp to sum them in host \
         memory over TCP (slow)",
        rank.rank, rank.world
    )))
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

/// `--nproc-per-node N`: starts N copies of this command line as ranks 0..N of one node
/// (torchrun's variables, a free local port), waits for all of them, and fails if any failed.
/// SIGTERM is passed on to the ranks; SIGINT from a terminal reaches them directly.
pub fn launch_local(n: usize) -> Result<()> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::msg(format!("no free local port for the ranks: {e}")))?
        .port();
    let exe = std::env::current_exe()
        .map_err(|e| Error::msg(format!("cannot find the mcld binary: {e}")))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let int = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, int)
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()))
        .map_err(|e| Error::msg(format!("cannot install the signal handler: {e}")))?;
    let mut children = Vec::new();
    for r in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| Error::msg(format!("cannot start rank {r}: {e}")))?;
        children.push(Some(child));
    }
    let mut failed = Vec::new();
    let mut forwarded = false;
    while children.iter().any(|c| c.is_some()) {
        if !forwarded && term.load(std::sync::atomic::Ordering::SeqCst) {
            forwarded = true;
            for c in children.iter().flatten() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
        for (r, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        if !st.success() {
                            failed.push(format!("rank {r}: {st}"));
                        }
                        *slot = None;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        failed.push(format!("rank {r}: {e}"));
                        *slot = None;
                    }
                }
            }
        }
        if !failed.is_empty() {
            // A dead rank would leave the others waiting for it: end them (checkpoints are
            // atomic, so nothing half-written stays).
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "training ranks failed: {}",
            failed.join(", ")
        )))
    }
}
