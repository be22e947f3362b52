//! The training loop of `mcld train` (SPEC §4), around any [`TrainStep`]: seeded epochs sharded
//! over ranks, gradient accumulation, diffusers' learning-rate schedules, gradients averaged
//! over ranks, a JSON line per optimizer step, atomic checkpoints kept to the last N, the four
//! networks every N epochs, exact resume, a non-finite loss stop and a clean stop on a signal.
//!
//! Resume is exact because nothing the loop does depends on history it does not store: the
//! data order is a function of (seed, epoch, rank), the position in it is in `state.json`, and
//! every random draw of a step comes from `step_rngs(seed, step, rank, micro)`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::checkpoint::{self, CheckpointState};
use super::lr::LrScheduler;
use crate::data::train_set::{DataPos, Loader, LoaderOptions, SkippedPair, TrainSet};
use crate::train::dist::collective::Collective;
use crate::train::step::api::{step_rngs, Grads, StepStats, TrainStep};
use crate::{Error, Result};

/// Where a run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From scratch; refused when the experiment folder already holds checkpoints.
    No,
    /// From the newest checkpoint of the experiment folder, from scratch when there is none.
    Latest,
    /// From this checkpoint folder, or from the newest `checkpoint-N` inside this folder (what
    /// the reference's train.py takes).
    Path(PathBuf),
}

impl Resume {
    /// The config's `resume_from_checkpoint`: empty, `latest`, or a folder.
    pub fn parse(s: &str) -> Self {
        match s.trim() {
            "" => Resume::No,
            "latest" => Resume::Latest,
            p => Resume::Path(PathBuf::from(p)),
        }
    }

    /// The checkpoint folder this resume starts from, if any (`exp_dir` for `latest`).
    pub fn resolve(&self, exp_dir: &Path) -> Result<Option<PathBuf>> {
        match self {
            Resume::No => Ok(None),
            Resume::Latest => checkpoint::latest(exp_dir),
            Resume::Path(p) => {
                if p.join(checkpoint::STATE_FILE).is_file() {
                    return Ok(Some(p.clone()));
                }
                if !p.is_dir() {
                    return Err(Error::input(p, "resume_from_checkpoint: no such folder"));
                }
                checkpoint::latest(p)?.map(Some).ok_or_else(|| {
                    Error::input(
                        p,
                        format!(
                            "resume_from_checkpoint: neither a checkpoint folder (no {}) nor a \
                             folder holding checkpoint-N folders",
                            checkpoint::STATE_FILE
                        ),
                    )
                })
            }
        }
    }
}

/// Everything the loop needs besides the step and the data.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub seed: u64,
    /// Samples per micro-batch on each rank.
    pub train_bs: usize,
    pub grad_accum: usize,
    pub max_train_steps: u64,
    /// Learning rate per applied update.
    pub lr: LrScheduler,
    /// Checkpoint every this many steps (0: only at the end and on a stop).
    pub checkpointing_steps: u64,
    pub checkpoints_total_limit: usize,
    /// Validation hook every this many steps, at steps 1, 1 + n, ... (0: never); the loss curve
    /// is redrawn after every log line.
    pub validation_steps: u64,
    /// `{output_dir}/{exp_name}`.
    pub exp_dir: PathBuf,
    pub resume: Resume,
    /// Batches decoded ahead of the step.
    pub prefetch: usize,
    /// Progress bar and messages on stderr (rank 0).
    pub progress: bool,
    /// f16 with loss scaling: a non-finite loss is the scaler's business (the step skips).
    pub loss_scaling: bool,
    /// Write the four networks every this many epochs (`save_model_epoch_interval`; 0 or
    /// `no_save`: never), keeping the newest [`EPOCH_SAVES_KEPT`] of each.
    pub save_model_epoch_interval: u64,
}

impl LoopConfig {
    /// Learning rate of the update after `updates` applied updates.
    pub fn lr_at(&self, updates: u64) -> f64 {
        self.lr.lr(updates)
    }
}

/// Epoch saves kept per network (the reference's `total_limit=3`).
pub const EPOCH_SAVES_KEPT: usize = 3;

/// Called by rank 0 at each validation step (the validation grid); failures are reported, not
/// fatal.
pub trait TrainHooks {
    fn validate(&mut self, _step: u64, _model: &dyn TrainStep, _exp_dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// No validation.
#[derive(Debug, Default)]
pub struct NoHooks;
impl TrainHooks for NoHooks {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopReason {
    /// `max_train_steps` reached.
    Finished,
    /// A stop was asked for (SIGINT/SIGTERM); a checkpoint of the last step was written.
    Interrupted,
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub step: u64,
    pub reason: StopReason,
    pub resumed_from: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// Pairs skipped: missing files when the set was opened, plus those any rank failed to
    /// decode (gathered from every rank when the run ends; each pair once, rank 0's first).
    pub skipped: Vec<SkippedPair>,
    /// Checkpoint or validation problems that did not stop the run.
    pub warnings: Vec<String>,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
struct LogLine {
    step: u64,
    epoch: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    samples_per_s: f64,
    steps_per_s: f64,
    samples: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_scale: Option<f64>,
    skipped_step: bool,
}

pub const LOG_FILE: &str = "train_log.jsonl";
pub const LOSS_CURVE: &str = "loss_curve.png";
pub const REPORT_FILE: &str = "train_report.json";

/// Runs the loop until `max_train_steps`, an error, or `stop` (checked between steps, agreed by
/// all ranks). Only rank 0 writes into `exp_dir`.
pub fn train_loop(
    model: &mut dyn TrainStep,
    set: Arc<TrainSet>,
    cfg: &LoopConfig,
    coll: &dyn Collective,
    stop: &AtomicBool,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainOutcome> {
    let mut run = LoopState::start(model, set, cfg, coll)?;
    while model.step_count() < cfg.max_train_steps {
        let t0 = Instant::now();
        let done = model.step_count();
        let local = run.accumulate(model, done)?;
        let agreed = run.agree(&local, stop)?;
        run.check_loss(agreed.loss, done)?;
        let grads = run.average(local, &agreed)?;
        let (lr, stats) = run.apply(model, &grads, done)?;
        let step = model.step_count();
        let all_pos = run.record(step, agreed.loss, lr, &stats, t0)?;
        let last = step >= cfg.max_train_steps;
        run.save(model, step, last, agreed.stop_now, &all_pos)?;
        run.validate(model, hooks, step);
        run.outcome.step = step;
        run.steps_run += 1;
        if agreed.stop_now && !last {
            run.outcome.reason = StopReason::Interrupted;
            break;
        }
    }
    run.finish(model)
}

/// What the loop carries from one step to the next, with rank 0's open outputs.
struct LoopState<'a> {
    cfg: &'a LoopConfig,
    coll: &'a dyn Collective,
    rank: usize,
    world: usize,
    /// Rank 0: the one that writes the log, the curve, checkpoints and the report.
    main: bool,
    outcome: TrainOutcome,
    /// This rank's place in the data after the last batch read.
    pos: DataPos,
    samples_seen: u64,
    /// The f16 loss scale of the last step that reported one (for `state.json`).
    loss_scale: Option<f64>,
    loader: Loader,
    /// Skipped pairs already reported, so each is reported once.
    seen_skips: BTreeSet<(String, String)>,
    bar: indicatif::ProgressBar,
    log_path: PathBuf,
    /// Rank 0: `train_log.jsonl`, open for appending.
    log: Option<std::fs::File>,
    /// The curve's points, kept here so that redrawing after each log line does not re-read
    /// the log.
    curve: Vec<super::plot::LogPoint>,
    /// The epoch of the last batch read: a batch from a later one means an epoch ended.
    batch_epoch: u64,
    last_epoch_save: Option<u64>,
    steps_run: u64,
    /// Samples of one optimizer step over all ranks and micro-batches.
    per_step_samples: u64,
}

/// What every rank learns from the others after its micro-batches.
struct Agreement {
    /// The mean loss over ranks.
    loss: f64,
    /// Some rank was asked to stop.
    stop_now: bool,
    /// Per tensor: some rank got a gradient for it.
    has_grad: Vec<bool>,
}

/// Where a run starts in the data, from its checkpoint or from scratch.
struct Start {
    pos: DataPos,
    samples_seen: u64,
    loss_scale: Option<f64>,
}

impl<'a> LoopState<'a> {
    /// Setup: checks the batch sizes, finds where to start (resuming the step's state), prepares
    /// rank 0's outputs, starts the data loader, the progress bar and the log.
    fn start(
        model: &mut dyn TrainStep,
        set: Arc<TrainSet>,
        cfg: &'a LoopConfig,
        coll: &'a dyn Collective,
    ) -> Result<Self> {
        let rank = coll.rank();
        let world = coll.world();
        let main = rank == 0;
        if cfg.train_bs == 0 || cfg.grad_accum == 0 {
            return Err(Error::msg(format!(
                "train_bs ({}) and gradient_accumulation_steps ({}) must be at least 1",
                cfg.train_bs, cfg.grad_accum
            )));
        }
        let mut outcome = TrainOutcome {
            step: 0,
            reason: StopReason::Finished,
            resumed_from: None,
            last_checkpoint: None,
            skipped: set.skipped.clone(),
            warnings: Vec::new(),
        };
        let start = resume(model, cfg, rank, world, &mut outcome)?;

        let log_path = cfg.exp_dir.join(LOG_FILE);
        let curve = if main {
            prepare_outputs(cfg, &log_path, model.step_count())?
        } else {
            Vec::new()
        };
        let loader = Loader::start(
            set.clone(),
            LoaderOptions {
                seed: cfg.seed,
                rank,
                world,
                batch_size: cfg.train_bs,
                prefetch: cfg.prefetch,
            },
            start.pos,
        )?;
        let seen_skips = outcome
            .skipped
            .iter()
            .map(|s| (s.from.clone(), s.to.clone()))
            .collect();
        let bar = progress_bar(cfg, main, model.step_count());
        let log = if main {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|e| Error::io(&log_path, e))?,
            )
        } else {
            None
        };
        Ok(Self {
            cfg,
            coll,
            rank,
            world,
            main,
            outcome,
            pos: start.pos,
            samples_seen: start.samples_seen,
            loss_scale: start.loss_scale,
            loader,
            seen_skips,
            bar,
            log_path,
            log,
            curve,
            batch_epoch: start.pos.epoch,
            last_epoch_save: None,
            steps_run: 0,
            per_step_samples: (world * cfg.train_bs * cfg.grad_accum) as u64,
        })
    }

    /// Forward and backward over the micro-batches of the step after `done` (writing the
    /// networks when an epoch due a save ended, reporting skipped pairs): this rank's mean
    /// gradients.
    fn accumulate(&mut self, model: &mut dyn TrainStep, done: u64) -> Result<Grads> {
        let cfg = self.cfg;
        let mut acc: Option<Grads> = None;
        for micro in 0..cfg.grad_accum {
            let lb = self.loader.next_batch()?;
            if lb.after.epoch > self.batch_epoch {
                // Epoch `batch_epoch` ended with the last step (train.py saves the networks
                // after each epoch's loop).
                if self.main
                    && epoch_save_due(cfg, self.batch_epoch)
                    && self.last_epoch_save != Some(done)
                {
                    self.epoch_save(model, done);
                }
                self.batch_epoch = lb.after.epoch;
            }
            self.note_skipped(lb.skipped);
            self.pos = lb.after;
            let mut rngs = step_rngs(cfg.seed, done, self.rank, micro);
            let g = model.grads(&lb.batch, &mut rngs)?;
            acc = Some(match acc {
                None => g,
                Some(a) => a.add(&g)?,
            });
        }
        let acc = acc.ok_or_else(|| Error::msg("no micro-batch"))?;
        acc.scale(1.0 / cfg.grad_accum as f64)
    }

    /// Pairs the loader skipped, each reported (rank 0) and recorded once.
    fn note_skipped(&mut self, skipped: Vec<SkippedPair>) {
        for s in skipped {
            if self.seen_skips.insert((s.from.clone(), s.to.clone())) {
                if self.main && self.cfg.progress {
                    self.bar
                        .suspend(|| eprintln!("skipped pair {} -> {}: {}", s.from, s.to, s.reason));
                }
                self.outcome.skipped.push(s);
            }
        }
    }

    /// One exchange carries the loss, whether any rank was asked to stop, and which tensors
    /// got a gradient (DDP with find_unused_parameters: a tensor without one on every rank
    /// stays untouched).
    fn agree(&self, local: &Grads, stop: &AtomicBool) -> Result<Agreement> {
        let world = self.world;
        let mut mine = vec![local.loss, f64::from(stop.load(Ordering::SeqCst))];
        if world > 1 {
            mine.extend(local.flags().iter().map(|&h| f64::from(h)));
        }
        let flags = self.coll.all_gather_f64(&mine)?;
        let loss = flags.iter().map(|v| v[0]).sum::<f64>() / world as f64;
        let stop_now = flags.iter().any(|v| v[1] != 0.0);
        let has_grad: Vec<bool> = if world > 1 {
            (0..local.tensors.len())
                .map(|i| {
                    flags
                        .iter()
                        .any(|v| v.get(2 + i).is_some_and(|&h| h != 0.0))
                })
                .collect()
        } else {
            local.flags()
        };
        Ok(Agreement {
            loss,
            stop_now,
            has_grad,
        })
    }

    /// A non-finite loss stops the run before the step is applied (unless the f16 scaler
    /// handles it by skipping the step).
    fn check_loss(&self, loss: f64, done: u64) -> Result<()> {
        if !loss.is_finite() && !self.cfg.loss_scaling {
            return Err(self.fail(format!(
                "non-finite loss ({loss}) at step {}; the run stopped without applying it",
                done + 1
            )));
        }
        Ok(())
    }

    /// The mean over ranks of this rank's `local` gradients (`local` itself for one rank).
    fn average(&self, local: Grads, agreed: &Agreement) -> Result<Grads> {
        let world = self.world;
        if world == 1 {
            return Ok(local);
        }
        let summed = self.coll.all_reduce_sum(&local.tensors)?;
        Grads {
            tensors: summed,
            has_grad: agreed.has_grad.clone(),
            loss: agreed.loss,
            samples: local.samples * world,
        }
        .scale(1.0 / world as f64)
        .map(|mut g| {
            g.loss = agreed.loss;
            g
        })
    }

    /// The optimizer step at the schedule's learning rate; a non-finite gradient norm (outside
    /// f16 loss scaling) stops the run. Returns the learning rate and the step's stats.
    fn apply(
        &mut self,
        model: &mut dyn TrainStep,
        grads: &Grads,
        done: u64,
    ) -> Result<(f64, StepStats)> {
        let lr = self.cfg.lr_at(model.updates_applied());
        let stats = model.apply(grads, lr)?;
        if !stats.grad_norm.is_finite() && !self.cfg.loss_scaling {
            return Err(self.fail(format!(
                "non-finite gradient norm ({}) at step {}; the weights are no longer usable",
                stats.grad_norm,
                done + 1
            )));
        }
        self.loss_scale = stats.loss_scale.or(self.loss_scale);
        self.samples_seen += self.per_step_samples;
        Ok((lr, stats))
    }

    /// Logging: every rank's data position (for rank 0's `state.json`, returned), rank 0's log
    /// line and redrawn curve, the progress bar.
    fn record(
        &mut self,
        step: u64,
        loss: f64,
        lr: f64,
        stats: &StepStats,
        t0: Instant,
    ) -> Result<Vec<Vec<f64>>> {
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        // Positions of every rank, for rank 0's state.json.
        let all_pos = self
            .coll
            .all_gather_f64(&[self.pos.epoch as f64, self.pos.pos as f64])?;
        if let Some(f) = self.log.as_mut() {
            let line = LogLine {
                step,
                epoch: self.pos.epoch,
                loss,
                lr,
                grad_norm: stats.grad_norm,
                samples_per_s: self.per_step_samples as f64 / dt,
                steps_per_s: 1.0 / dt,
                samples: self.samples_seen,
                loss_scale: stats.loss_scale,
                skipped_step: stats.skipped,
            };
            let mut s = serde_json::to_string(&line)
                .map_err(|e| Error::msg(format!("train log line: {e}")))?;
            s.push('\n');
            f.write_all(s.as_bytes())
                .and_then(|()| f.flush())
                .map_err(|e| Error::io(&self.log_path, e))?;
            if let Some(p) = super::plot::parse_line(&s) {
                self.curve.push(p);
            }
            refresh_curve(self.cfg, &self.curve, &mut self.outcome.warnings);
        }
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {:.1} samples/s",
            self.per_step_samples as f64 / dt
        ));
        Ok(all_pos)
    }

    /// Checkpointing (rank 0): the networks when the run ends inside an epoch due a save, and
    /// the run checkpoint every `checkpointing_steps`, at the last step and on a stop. A failed
    /// checkpoint is a warning of the run, except the last one, which is an error.
    fn save(
        &mut self,
        model: &dyn TrainStep,
        step: u64,
        last: bool,
        stop_now: bool,
        all_pos: &[Vec<f64>],
    ) -> Result<()> {
        let cfg = self.cfg;
        if !self.main {
            return Ok(());
        }
        if last && epoch_save_due(cfg, self.pos.epoch) && self.last_epoch_save != Some(step) {
            // The run ends inside an epoch: train.py still saves after breaking out of it.
            self.epoch_save(model, step);
        }
        let periodic = cfg.checkpointing_steps > 0 && step.is_multiple_of(cfg.checkpointing_steps);
        if !(periodic || last || stop_now) {
            return Ok(());
        }
        let state = CheckpointState {
            step,
            epoch: self.pos.epoch,
            data: all_pos
                .iter()
                .map(|v| DataPos {
                    epoch: v[0] as u64,
                    pos: v[1] as u64,
                })
                .collect(),
            loss_scale: self.loss_scale,
            seed: cfg.seed,
            world_size: self.world,
            train_bs: cfg.train_bs,
            gradient_accumulation_steps: cfg.grad_accum,
            samples_seen: self.samples_seen,
        };
        match write_and_prune(model, cfg, &state) {
            Ok(p) => {
                self.outcome.last_checkpoint = Some(p);
            }
            Err(e) => {
                let kept = match &self.outcome.last_checkpoint {
                    Some(p) => format!("the previous checkpoint {} is kept", p.display()),
                    None => "there is no earlier checkpoint".into(),
                };
                let msg = format!("checkpoint at step {step} could not be written: {e}; {kept}");
                if last || stop_now {
                    self.bar.abandon();
                    return Err(Error::msg(msg));
                }
                self.bar.suspend(|| eprintln!("warning: {msg}"));
                self.outcome.warnings.push(msg);
            }
        }
        Ok(())
    }

    /// The four networks as `{exp_dir}/{name}-{step}.safetensors`, the newest
    /// [`EPOCH_SAVES_KEPT`] of each kept; a failure is a warning of the run.
    fn epoch_save(&mut self, model: &dyn TrainStep, step: u64) {
        let dir = &self.cfg.exp_dir;
        if let Err(e) = checkpoint::write_epoch_weights(dir, model, step, EPOCH_SAVES_KEPT) {
            let msg = format!("networks of step {step} (epoch save) could not be written: {e}");
            self.bar.suspend(|| eprintln!("warning: {msg}"));
            self.outcome.warnings.push(msg);
        }
        self.last_epoch_save = Some(step);
    }

    /// Validation (rank 0) at steps 1, 1 + n, ...; a failure is a warning of the run.
    fn validate(&mut self, model: &dyn TrainStep, hooks: &mut dyn TrainHooks, step: u64) {
        let cfg = self.cfg;
        let due = cfg.validation_steps > 0 && (step - 1).is_multiple_of(cfg.validation_steps);
        if self.main && due {
            if let Err(e) = hooks.validate(step, model, &cfg.exp_dir) {
                let msg = format!("validation at step {step} failed: {e}");
                self.bar.suspend(|| eprintln!("warning: {msg}"));
                self.outcome.warnings.push(msg);
            }
        }
    }

    /// The error that stops the run at a bad step, naming the last good checkpoint.
    fn fail(&self, what: String) -> Error {
        self.bar.abandon();
        Error::msg(format!(
            "{what}. {}",
            match &self.outcome.last_checkpoint {
                Some(p) => format!("The last good checkpoint is {}", p.display()),
                None => "No checkpoint was written yet".into(),
            }
        ))
    }

    /// Finish: every rank's skipped pairs, the loader stopped, and rank 0's last curve and
    /// `train_report.json`.
    fn finish(mut self, model: &dyn TrainStep) -> Result<TrainOutcome> {
        let cfg = self.cfg;
        let main = self.main;
        self.outcome.step = model.step_count();
        // Every rank reaches this point at the same step; rank 0's report gets the others' skips.
        let own = self.outcome.skipped.len();
        self.outcome.skipped =
            gather_skipped(self.coll, std::mem::take(&mut self.outcome.skipped))?;
        if main && cfg.progress {
            for s in &self.outcome.skipped[own..] {
                self.bar.suspend(|| {
                    eprintln!(
                        "skipped pair {} -> {} (on another rank): {}",
                        s.from, s.to, s.reason
                    )
                });
            }
        }
        self.bar.finish_and_clear();
        drop(self.loader);
        let mut outcome = self.outcome;
        if main {
            if self.steps_run == 0 {
                // Resumed at or past max_train_steps: nothing ran, the checkpoint is the result.
                say(
                    cfg,
                    main,
                    &format!(
                        "nothing to do: the run is at step {} of {}",
                        outcome.step, cfg.max_train_steps
                    ),
                );
            }
            refresh_curve(cfg, &self.curve, &mut outcome.warnings);
            let json = serde_json::to_vec_pretty(&outcome)
                .map_err(|e| Error::msg(format!("train report: {e}")))?;
            crate::fsutil::write_atomic(&cfg.exp_dir.join(REPORT_FILE), &json)?;
        }
        Ok(outcome)
    }
}

/// A message on stderr from rank 0 when the run shows progress.
fn say(cfg: &LoopConfig, main: bool, msg: &str) {
    if main && cfg.progress {
        eprintln!("{msg}");
    }
}

/// Resume: refuses to start from scratch over existing checkpoints; from a checkpoint, checks
/// it against this run, loads the step's state, sets later checkpoints aside (rank 0) and
/// returns the data position; from scratch, the start of the data.
fn resume(
    model: &mut dyn TrainStep,
    cfg: &LoopConfig,
    rank: usize,
    world: usize,
    outcome: &mut TrainOutcome,
) -> Result<Start> {
    let main = rank == 0;
    if cfg.resume == Resume::No {
        if let Some(p) = checkpoint::latest(&cfg.exp_dir)? {
            return Err(Error::msg(format!(
                "{} already holds checkpoints (newest {}); continue it with \
                 --resume_from_checkpoint latest, or choose another output_dir/exp_name",
                cfg.exp_dir.display(),
                p.display()
            )));
        }
    }
    let from = cfg.resume.resolve(&cfg.exp_dir)?;
    let Some(dir) = &from else {
        if model.step_count() != 0 {
            return Err(Error::msg(format!(
                "the training step starts at step {} but no checkpoint is being resumed",
                model.step_count()
            )));
        }
        return Ok(Start {
            pos: DataPos::default(),
            samples_seen: 0,
            loss_scale: None,
        });
    };
    let st = checkpoint::read_state(dir)?;
    let bad = |what: String| Error::input(dir.join(checkpoint::STATE_FILE), what);
    if st.world_size != world {
        return Err(bad(format!(
            "written by {} ranks, this run has {world}; resume with the same number of \
             processes",
            st.world_size
        )));
    }
    if st.seed != cfg.seed {
        return Err(bad(format!(
            "written with seed {}, the config says {}; the data order would change",
            st.seed, cfg.seed
        )));
    }
    if st.train_bs != cfg.train_bs || st.gradient_accumulation_steps != cfg.grad_accum {
        say(
            cfg,
            main,
            &format!(
                "note: the checkpoint trained with train_bs {} x {} accumulation, this run uses \
                 {} x {}",
                st.train_bs, st.gradient_accumulation_steps, cfg.train_bs, cfg.grad_accum
            ),
        );
    }
    model.load_state(&dir.join(checkpoint::TRAIN_STATE_DIR))?;
    if main {
        // Newer checkpoints belong to the abandoned continuation of this one: keep them
        // out of `latest`'s reach.
        if let Some(moved) = checkpoint::set_aside_after(&cfg.exp_dir, dir, st.step)? {
            say(
                cfg,
                main,
                &format!(
                    "resuming from step {}: the later checkpoints of the run that went on from \
                     there were moved to {}",
                    st.step,
                    moved.display()
                ),
            );
            outcome.warnings.push(format!(
                "later checkpoints moved to {} (resumed from step {})",
                moved.display(),
                st.step
            ));
        }
    }
    if model.step_count() != st.step {
        return Err(bad(format!(
            "state.json says step {}, the saved training state is at step {}",
            st.step,
            model.step_count()
        )));
    }
    let pos = *st
        .data
        .get(rank)
        .ok_or_else(|| bad(format!("no data position for rank {rank}")))?;
    outcome.resumed_from = Some(dir.clone());
    outcome.last_checkpoint = Some(dir.clone());
    say(
        cfg,
        main,
        &format!(
            "resuming from {} (step {}, epoch {})",
            dir.display(),
            st.step,
            st.epoch
        ),
    );
    Ok(Start {
        pos,
        samples_seen: st.samples_seen,
        loss_scale: st.loss_scale,
    })
}

/// Rank 0's experiment folder made ready: created, unfinished checkpoints removed, the log cut
/// back to the step the run starts from (later lines belong to steps to be redone). Returns the
/// curve's points so far.
fn prepare_outputs(
    cfg: &LoopConfig,
    log_path: &Path,
    step: u64,
) -> Result<Vec<super::plot::LogPoint>> {
    std::fs::create_dir_all(&cfg.exp_dir).map_err(|e| Error::io(&cfg.exp_dir, e))?;
    for p in checkpoint::clean_stale(&cfg.exp_dir)? {
        say(
            cfg,
            true,
            &format!("removed the unfinished {}", p.display()),
        );
    }
    trim_log(log_path, step)?;
    super::plot::read_log(log_path)
}

/// Rank 0's bar when the run shows progress, starting at `step`; hidden otherwise.
fn progress_bar(cfg: &LoopConfig, main: bool, step: u64) -> indicatif::ProgressBar {
    if !(main && cfg.progress) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(cfg.max_train_steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "train [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
    ) {
        b.set_style(style);
    }
    b.set_position(step);
    b.reset_eta();
    b
}

/// Every rank's skipped pairs, in rank order, each pair once (the first rank's record kept).
fn gather_skipped(coll: &dyn Collective, mine: Vec<SkippedPair>) -> Result<Vec<SkippedPair>> {
    if coll.world() == 1 {
        return Ok(mine);
    }
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| Error::msg(format!("skipped pairs of rank {}: {e}", coll.rank())))?;
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    for (rank, part) in coll.all_gather_bytes(&bytes)?.iter().enumerate() {
        let theirs: Vec<SkippedPair> = serde_json::from_slice(part).map_err(|e| {
            Error::msg(format!(
                "collective: the skipped pairs rank {rank} sent do not read: {e}"
            ))
        })?;
        for s in theirs {
            if seen.insert((s.from.clone(), s.to.clone())) {
                all.push(s);
            }
        }
    }
    Ok(all)
}

/// Whether the end of (0-based) `epoch` writes the networks.
fn epoch_save_due(cfg: &LoopConfig, epoch: u64) -> bool {
    cfg.save_model_epoch_interval > 0 && (epoch + 1).is_multiple_of(cfg.save_model_epoch_interval)
}

/// A run checkpoint of `state`, then the oldest beyond `checkpoints_total_limit` removed.
fn write_and_prune(
    model: &dyn TrainStep,
    cfg: &LoopConfig,
    state: &CheckpointState,
) -> Result<PathBuf> {
    let p = checkpoint::write_checkpoint(&cfg.exp_dir, model, state)?;
    checkpoint::prune(&cfg.exp_dir, cfg.checkpoints_total_limit)?;
    Ok(p)
}

/// Redraws the loss curve (atomically); a failure is a warning of the run, reported once.
fn refresh_curve(cfg: &LoopConfig, pts: &[super::plot::LogPoint], warnings: &mut Vec<String>) {
    let name = cfg
        .exp_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "train".into());
    if let Err(e) = super::plot::write_curve(pts, &name, &cfg.exp_dir.join(LOSS_CURVE)) {
        let msg = format!("loss curve: {e}");
        if !warnings.contains(&msg) {
            warnings.push(msg);
        }
    }
}

/// Keeps the log lines of steps up to `step` (and drops a line cut by a kill).
fn trim_log(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::new();
    let mut changed = false;
    for line in text.lines() {
        let s = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match s {
            Some(s) if s <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => changed = true,
        }
    }
    if changed || !text.ends_with('\n') && !text.is_empty() {
        crate::fsutil::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}
