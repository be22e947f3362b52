//! `mcld train --config FILE --dry-run`: everything a 26-hour job needs, checked in minutes
//! on the CPU (config, data lists, starting weights, output folder, resume), and the plan it
//! would follow (steps, epochs, batch, learning rates, what trains, checkpoints, memory),
//! without training.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::Serialize;

use super::checkpoint;
use super::cmd::{loop_config, startup_notes, TrainCommand};
use super::train_loop::EPOCH_SAVES_KEPT;
use crate::data::train_set::TrainSet;
use crate::train::step::init::{initial_weights, InitSources};
use crate::train::step::params::is_trainable;
use crate::{Error, Result};

/// Pairs decoded to check that the listed files read (evenly spread over the list).
pub const DECODE_SAMPLE: usize = 16;

/// Trainable and frozen sizes of one network.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetSize {
    pub trainable_tensors: usize,
    pub trainable_elems: usize,
    pub frozen_tensors: usize,
    pub frozen_elems: usize,
}

/// What a dry run found and planned.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunPlan {
    pub world: usize,
    pub pairs_listed: usize,
    pub pairs_usable: usize,
    pub pairs_missing_files: usize,
    pub decoded_ok: usize,
    pub decoded_tried: usize,
    pub validation_pairs: usize,
    pub steps: u64,
    pub steps_per_epoch: u64,
    pub epochs: u64,
    pub effective_batch: usize,
    /// (step, lr) at a few steps.
    pub lr_samples: Vec<(u64, f64)>,
    pub nets: BTreeMap<String, NetSize>,
    pub exp_dir: PathBuf,
    pub resume_from: Option<PathBuf>,
    /// Checkpoints that resuming would move aside (another timeline).
    pub would_set_aside: Vec<PathBuf>,
    pub estimated_memory_bytes: u64,
    pub notes: Vec<String>,
    /// The plan as printed.
    pub text: String,
}

/// Checks and plans; errors are the ones the real run would stop with.
pub fn dry_run(cmd: &TrainCommand) -> Result<DryRunPlan> {
    let cfg = cmd.load_config()?;
    let world = match cmd.nproc_per_node {
        Some(n) if n > 1 => n,
        _ => crate::train::dist::rank::RankInfo::from_env()?.world,
    };
    let (dtype, enc_dtype) = cmd.dtypes(&cfg)?;
    let lc = loop_config(&cfg, dtype, false, world, &cmd.config)?;
    let notes = startup_notes(&cfg, world, &lc.lr);

    // Data.
    let set = TrainSet::from_config(&cfg.data)?;
    let usable = set.len();
    let step_idx: Vec<usize> = if usable == 0 {
        Vec::new()
    } else {
        let n = DECODE_SAMPLE.min(usable);
        (0..n).map(|i| i * usable / n).collect()
    };
    let mut decode_errors = Vec::new();
    for &i in &step_idx {
        if let Err(e) = set.load(i) {
            decode_errors.push(e.to_string());
        }
    }
    let (val, _) = super::validate::validation_pairs(&cfg, cfg.data.val_bs.max(1))
        .unwrap_or((Vec::new(), None));

    // Weights (as the run loads them, on the CPU).
    let init = initial_weights(&InitSources {
        unet_dir: cfg.base_model_path.join("unet"),
        controlnet: cfg
            .pose_guider_pretrain
            .then(|| cfg.controlnet_openpose_path.clone()),
        cond_chan: cfg.cond_chan,
        seed: cfg.seed,
    })?;
    crate::train::step::setup::frozen_encoders(&cfg, &Device::Cpu, DType::F32)?;
    crate::train::step::setup::read_clip_std(&cfg.clip_std_path)?;
    let mut nets: BTreeMap<String, NetSize> = BTreeMap::new();
    for (name, t) in &init.tensors {
        let net = name.split('.').next().unwrap_or("").to_string();
        let e = nets.entry(net).or_default();
        if is_trainable(name) {
            e.trainable_tensors += 1;
            e.trainable_elems += t.elem_count();
        } else {
            e.frozen_tensors += 1;
            e.frozen_elems += t.elem_count();
        }
    }

    // Output folder and resume.
    let exp = lc.exp_dir.clone();
    std::fs::create_dir_all(&exp).map_err(|e| Error::io(&exp, e))?;
    let probe = exp.join(".mcld-dry-run-probe");
    std::fs::write(&probe, b"").map_err(|e| Error::io(&probe, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    if lc.resume == super::train_loop::Resume::No {
        if let Some(p) = checkpoint::latest(&exp)? {
            return Err(Error::msg(format!(
                "{} already holds checkpoints (newest {}); the run would refuse to start",
                exp.display(),
                p.display()
            )));
        }
    }
    let resume_from = lc.resume.resolve(&exp)?;
    let mut would_set_aside = Vec::new();
    if let Some(dir) = &resume_from {
        let st = checkpoint::read_state(dir)?;
        let inside = checkpoint::list_checkpoints(&exp)?
            .iter()
            .any(|(_, p)| p == dir);
        for (s, p) in checkpoint::list_checkpoints(&exp)? {
            if &p != dir && (s > st.step || !inside) {
                would_set_aside.push(p);
            }
        }
    }

    // Plan.
    let per_rank = usable / world.max(1);
    let micro_per_epoch = (per_rank / cfg.data.train_bs) as u64;
    let steps_per_epoch = micro_per_epoch / cfg.solver.gradient_accumulation_steps as u64;
    let steps = lc.max_train_steps;
    let epochs = if steps_per_epoch == 0 {
        0
    } else {
        steps.div_ceil(steps_per_epoch)
    };
    let effective_batch = cfg.data.train_bs * world * cfg.solver.gradient_accumulation_steps;
    let mut at: Vec<u64> = vec![
        1,
        2,
        cfg.solver.lr_warmup_steps as u64 + 1,
        steps / 10,
        steps / 2,
        steps,
    ];
    at.retain(|s| *s >= 1 && *s <= steps.max(1));
    at.sort();
    at.dedup();
    let lr_samples: Vec<(u64, f64)> = at.iter().map(|&s| (s, lc.lr_at(s - 1))).collect();
    let trainable: usize = nets.values().map(|n| n.trainable_elems).sum();
    let frozen: usize = nets.values().map(|n| n.frozen_elems).sum();
    let half = |d: DType| if d == DType::F32 { 4u64 } else { 2 };
    // f32 masters + two moments + f32 gradients, the compute copy, frozen tensors; the VAE and
    // CLIP (~84M + ~300M parameters in SD's) are not in `init`: counted from their files' sizes.
    let enc_bytes = file_sizes(&cfg.vae_model_path) + file_sizes(&cfg.image_encoder_path);
    let enc_bytes = enc_bytes / 4 * half(enc_dtype).min(4);
    let estimated_memory_bytes =
        trainable as u64 * (16 + half(dtype)) + frozen as u64 * half(dtype) + enc_bytes;

    let mut t = String::new();
    let _ = writeln!(
        t,
        "dry run of {} (nothing is trained)",
        cmd.config.display()
    );
    for n in &notes {
        let _ = writeln!(t, "  {n}");
    }
    let _ = writeln!(
        t,
        "data: {} pairs listed in {}, {} with all files present, {} skipped for a missing \
         file; {} of {} sampled pairs decode",
        usable + set.skipped.len(),
        set.csv().display(),
        usable,
        set.skipped.len(),
        step_idx.len() - decode_errors.len(),
        step_idx.len()
    );
    for e in decode_errors.iter().take(3) {
        let _ = writeln!(t, "  unreadable: {e}");
    }
    let _ = writeln!(
        t,
        "validation: {} of val_bs {} pairs usable",
        val.len(),
        cfg.data.val_bs
    );
    let _ = writeln!(
        t,
        "plan: {steps} steps, {steps_per_epoch} per epoch, {epochs} epochs; {world} rank(s) x \
         batch {} x accumulation {} = {effective_batch} samples per step",
        cfg.data.train_bs, cfg.solver.gradient_accumulation_steps
    );
    let _ = writeln!(
        t,
        "lr ({}, base {:.3e}{}): {}",
        lc.lr.schedule.name(),
        lc.lr.base_lr,
        if cfg.solver.scale_lr { ", scaled" } else { "" },
        lr_samples
            .iter()
            .map(|(s, l)| format!("step {s}: {l:.3e}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, n) in &nets {
        let _ = writeln!(
            t,
            "  {name}: trains {} tensors ({:.1}M values), frozen {} ({:.1}M)",
            n.trainable_tensors,
            n.trainable_elems as f64 / 1e6,
            n.frozen_tensors,
            n.frozen_elems as f64 / 1e6
        );
    }
    let _ = writeln!(
        t,
        "  VAE and image encoder frozen in {enc_dtype:?}; networks compute in {dtype:?}{}",
        if dtype == DType::F16 {
            " with loss scaling"
        } else {
            ""
        }
    );
    let _ = writeln!(
        t,
        "checkpoints: every {} steps into {}, newest {} kept; networks every {} epoch(s){}",
        lc.checkpointing_steps,
        exp.display(),
        lc.checkpoints_total_limit,
        lc.save_model_epoch_interval,
        if lc.save_model_epoch_interval == 0 {
            " (off)".to_string()
        } else {
            format!(", newest {EPOCH_SAVES_KEPT} kept")
        }
    );
    match &resume_from {
        Some(p) => {
            let _ = writeln!(t, "resume: from {}", p.display());
            if !would_set_aside.is_empty() {
                let _ = writeln!(
                    t,
                    "  {} later checkpoint(s) would be moved to abandoned-<step>-<time>/",
                    would_set_aside.len()
                );
            }
        }
        None => {
            let _ = writeln!(t, "resume: none, from the starting weights");
        }
    }
    let _ = writeln!(
        t,
        "memory: about {:.1} GiB per rank for weights, AdamW state and gradients, plus \
         activations (set solver.gradient_checkpointing to shrink those)",
        estimated_memory_bytes as f64 / (1u64 << 30) as f64
    );
    Ok(DryRunPlan {
        world,
        pairs_listed: usable + set.skipped.len(),
        pairs_usable: usable,
        pairs_missing_files: set.skipped.len(),
        decoded_ok: step_idx.len() - decode_errors.len(),
        decoded_tried: step_idx.len(),
        validation_pairs: val.len(),
        steps,
        steps_per_epoch,
        epochs,
        effective_batch,
        lr_samples,
        nets,
        exp_dir: exp,
        resume_from,
        would_set_aside,
        estimated_memory_bytes,
        notes,
        text: t,
    })
}

/// Total size of the files in a folder (not recursive), 0 when unreadable.
fn file_sizes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
