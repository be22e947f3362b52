//! The `densepose` stage of `prepare`: every photo of `train/` and `test/` without an IUV PNG
//! goes through the model, built once. Decoding (rayon) and PNG writing run on their own threads
//! so the model does not wait on I/O; same-size photos share one backbone pass on the GPU.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use candle_core::{DType, Device};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::data::{derived_path, list_photos, Part};
use crate::models::densepose::iuv::{save_iuv_png, Image3};
use crate::models::densepose::{load_config, load_model, DensePose};
use crate::prepare::report::{Failure, StageReport, StageStatus};
use crate::rank::Shard;
use crate::{Error, Result};

/// Photos in which no person was found, one file name a line, kept in each `*_densepose/`
/// folder so that a resumed run does not run them again (delete it to retry them). A run of
/// one shard (`--shard K/N`) keeps its own list, `no_person.shard-K-of-N.txt`, so that shards
/// running at once never rewrite each other's; every run reads them all.
pub const NO_PERSON_FILE: &str = "no_person.txt";
const NO_PERSON_STEM: &str = "no_person";

#[derive(Debug, Clone)]
pub struct DenseposeOptions {
    /// detectron2 YAML; `None`: [`crate::models::densepose::DEFAULT_CONFIG`], else the compiled-in copy.
    pub config: Option<PathBuf>,
    /// `.pkl` (detectron2), `.safetensors` or a PyTorch checkpoint with detectron2 names.
    pub weights: PathBuf,
    pub device: Device,
    /// Requested precision; the stage runs in float32 whatever is asked (see `run_stage`).
    pub dtype: DType,
    /// Photos per backbone pass; `None`: 1 on the CPU (no gain there), 4 on a GPU.
    pub batch: Option<usize>,
    /// The photos this run does.
    pub shard: Shard,
}

/// One photo to process.
#[derive(Debug, Clone)]
pub struct Job {
    pub photo: PathBuf,
    pub out: PathBuf,
}

/// What became of one job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Written,
    NoPerson,
    Failed(String),
}

fn read_no_person(path: &Path) -> Result<BTreeSet<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Every no-person list of a `*_densepose/` folder: [`NO_PERSON_FILE`] and the shards' lists.
fn read_all_no_person(dir: &Path) -> Result<BTreeSet<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let shard_prefix = format!("{NO_PERSON_STEM}.shard-");
    let mut all = BTreeSet::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == NO_PERSON_FILE || name.starts_with(&shard_prefix) && name.ends_with(".txt") {
            all.extend(read_no_person(&e.path())?);
        }
    }
    Ok(all)
}

fn write_no_person(path: &Path, names: &BTreeSet<String>) -> Result<()> {
    let mut text = String::new();
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Runs the jobs in order of `jobs`; `no_person` is called (on this thread) for each photo with
/// nobody in it as soon as it is known. Returns one outcome per job.
pub fn run_jobs(
    model: &DensePose,
    jobs: &[Job],
    batch: usize,
    bar: &ProgressBar,
    no_person: &mut dyn FnMut(usize),
) -> Vec<Outcome> {
    let batch = batch.max(1);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; jobs.len()];
    type Decoded = Vec<(usize, Result<Image3>)>;
    std::thread::scope(|s| {
        let (img_tx, img_rx) = mpsc::sync_channel::<Decoded>(2);
        let (png_tx, png_rx) = mpsc::sync_channel::<(usize, Vec<u8>, usize, usize)>(2 * batch);
        let (res_tx, res_rx) = mpsc::channel::<(usize, Outcome)>();
        s.spawn(move || {
            let idx: Vec<usize> = (0..jobs.len()).collect();
            for chunk in idx.chunks(batch) {
                let decoded: Decoded = chunk
                    .par_iter()
                    .map(|&i| (i, Image3::read_bgr(&jobs[i].photo)))
                    .collect();
                if img_tx.send(decoded).is_err() {
                    break;
                }
            }
        });
        let writer_res = res_tx.clone();
        s.spawn(move || {
            for (i, iuv, h, w) in png_rx {
                let o = match save_iuv_png(&iuv, h, w, &jobs[i].out) {
                    Ok(()) => Outcome::Written,
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                bar.inc(1);
                if writer_res.send((i, o)).is_err() {
                    break;
                }
            }
        });
        let mut finish = |i: usize, o: Outcome| {
            if o == Outcome::NoPerson {
                no_person(i);
            }
            bar.inc(1);
            let _ = res_tx.send((i, o));
        };
        for decoded in img_rx {
            let mut ok = Vec::new();
            for (i, r) in decoded {
                match r {
                    Ok(img) => ok.push((i, img)),
                    Err(e) => finish(i, Outcome::Failed(e.to_string())),
                }
            }
            if ok.is_empty() {
                continue;
            }
            let imgs: Vec<&Image3> = ok.iter().map(|(_, im)| im).collect();
            // A batch that fails is retried photo by photo, so one bad photo fails only itself.
            let results: Vec<Result<Option<Vec<u8>>>> = match model.iuv_batch(&imgs) {
                Ok(v) => v.into_iter().map(Ok).collect(),
                Err(e) if imgs.len() == 1 => vec![Err(e)],
                Err(_) => imgs.iter().map(|im| model.iuv(im)).collect(),
            };
            for ((i, img), r) in ok.iter().zip(results) {
                match r {
                    Ok(Some(iuv)) => {
                        if png_tx.send((*i, iuv, img.h, img.w)).is_err() {
                            finish(*i, Outcome::Failed("PNG writer stopped".into()));
                        }
                    }
                    Ok(None) => finish(*i, Outcome::NoPerson),
                    Err(e) => finish(
                        *i,
                        Outcome::Failed(format!("DensePose on {}: {e}", jobs[*i].photo.display())),
                    ),
                }
            }
        }
        drop(png_tx);
        drop(res_tx);
        for (i, o) in res_rx {
            outcomes[i] = Some(o);
        }
    });
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Failed("not processed".into())))
        .collect()
}

/// The stage: lists the work, builds the model only when there is some, runs it, reports.
pub fn run_stage(root: &Path, opts: &DenseposeOptions, bar: &ProgressBar) -> Result<StageReport> {
    let mut rep = StageReport::new("densepose");
    let mut jobs = Vec::new();
    // Per job: (part index, photo name), for the no-person lists.
    let mut owner = Vec::new();
    // Per part: this run's own no-person list (path, names), which only this run writes.
    let mut registries: Vec<(PathBuf, BTreeSet<String>)> = Vec::new();
    let mut earlier = 0;
    for (pi, part) in Part::ALL.into_iter().enumerate() {
        let dir = root.join(format!("{}_densepose", part.dir()));
        let np_path = dir.join(opts.shard.file_name(NO_PERSON_STEM, "txt"));
        let known = read_all_no_person(&dir)?;
        let own = read_no_person(&np_path)?;
        for name in list_photos(root, part)? {
            if !opts.shard.owns_name(&name) {
                continue;
            }
            let out = derived_path(root, part, "densepose", &name, "png");
            if out.is_file() {
                rep.skipped += 1;
            } else if known.contains(&name) {
                rep.skipped += 1;
                earlier += 1;
            } else {
                jobs.push(Job {
                    photo: root.join(part.dir()).join(&name),
                    out,
                });
                owner.push((pi, name));
            }
        }
        registries.push((np_path, own));
    }
    if earlier > 0 {
        rep.notes.push(format!(
            "{earlier} photos were found to have no person in an earlier run and are skipped \
             (listed in *_densepose/{NO_PERSON_STEM}*.txt; delete those files to run them again)"
        ));
    }
    if jobs.is_empty() {
        return Ok(rep);
    }
    let cant_start = |mut rep: StageReport, e: Error| {
        rep.status = StageStatus::Failed;
        rep.error = Some(format!("{e}; {} IUV images not made", jobs.len()));
        rep.missing = jobs.iter().map(|j| j.out.display().to_string()).collect();
        Ok(rep)
    };
    let (cfg, cfg_src) = match load_config(opts.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return cant_start(rep, e),
    };
    let model = match load_model(&cfg, &opts.weights, &opts.device) {
        Ok(m) => m,
        Err(e) => return cant_start(rep, e),
    };
    if opts.dtype != DType::F32 {
        rep.notes.push(format!(
            "--dtype {:?} ignored here: DensePose runs in float32 like the reference (part \
             labels are argmaxes that lower precision flips)",
            opts.dtype
        ));
    }
    let batch = opts
        .batch
        .unwrap_or(if opts.device.is_cpu() { 1 } else { 4 });
    rep.notes.push(format!(
        "config {cfg_src}, weights {}, device {:?}, {batch} photos per backbone pass",
        opts.weights.display(),
        opts.device
    ));
    bar.set_length(jobs.len() as u64);
    let mut np_error: Option<Error> = None;
    let mut record = |j: usize| {
        let (pi, name) = &owner[j];
        let (path, set) = &mut registries[*pi];
        set.insert(name.clone());
        if let Err(e) = write_no_person(path, set) {
            np_error.get_or_insert(e);
        }
    };
    let outcomes = run_jobs(&model, &jobs, batch, bar, &mut record);
    let mut no_person = Vec::new();
    for (job, o) in jobs.iter().zip(outcomes) {
        match o {
            Outcome::Written => rep.done += 1,
            Outcome::NoPerson => no_person.push(job.photo.display().to_string()),
            Outcome::Failed(reason) => rep.failed.push(Failure::new(&job.photo, reason)),
        }
    }
    if !no_person.is_empty() {
        rep.notes.push(format!(
            "{} photos have no person detected: no IUV written (as the reference skips them), \
             recorded in *_densepose/{}",
            no_person.len(),
            opts.shard.file_name(NO_PERSON_STEM, "txt")
        ));
        for p in no_person {
            rep.notes.push(format!("no person: {p}"));
        }
    }
    if let Some(e) = np_error {
        rep.notes.push(format!(
            "could not record the no-person photos ({e}); a later run will retry them"
        ));
    }
    Ok(rep)
}
