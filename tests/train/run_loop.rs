//! `mcld train`'s loop, data and checkpoints, driven by a small stand-in for the training step
//! (a linear model on per-channel means of the batch tensors, with momentum and random noise
//! from the step's generator), on tiny datasets these tests write: broken pairs skipped and
//! counted, deterministic prefetch order, bit-exact resume after SIGKILL, a clean stop on
//! SIGTERM, 2 ranks = 1 rank with twice the batch, the non-finite-loss stop, checkpoint
//! atomicity and keep-last-N, and truncated JPEGs refused wherever photos are read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use mcld::data::train_set::{DataPos, Loader, LoaderOptions, TrainSet, Walk};
use mcld::train::dist::collective::{LocalGroup, SingleProcess};
use mcld::train::dist::rank::RankInfo;
use mcld::train::dist::tcp::TcpCollective;
use mcld::train::run::checkpoint::{self, CheckpointState};
use mcld::train::run::lr::LrScheduler;
use mcld::train::run::train_loop::{
    train_loop, LoopConfig, NoHooks, Resume, StopReason, TrainOutcome,
};
use mcld::train::step::api::{Grads, Net, StepRngs, StepStats, TrainBatch, TrainStep};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

const D: usize = 16;
const SIZE: (usize, usize) = (16, 16);

// ---------------------------------------------------------------------------------------------
// The stand-in step.

/// Linear regression on 16 per-sample features with SGD + momentum. Its loss depends on every
/// batch tensor and on the step's random generator, so a wrong batch, a wrong order or a wrong
/// generator changes the weights.
#[derive(Debug, Clone, Default)]
struct Lin {
    w: Vec<f32>,
    m: Vec<f32>,
    steps: u64,
    noise: f32,
    nan_at: Option<u64>,
    fail_save_at: Option<u64>,
    fail_grads_at: Option<u64>,
    delay: Duration,
}

impl Lin {
    fn new(noise: f32) -> Self {
        Self {
            w: (0..D).map(|i| (i as f32 * 0.37).sin() * 0.1).collect(),
            m: vec![0.0; D],
            noise,
            ..Default::default()
        }
    }
}

fn features(b: &TrainBatch) -> mcld::Result<Vec<[f64; D]>> {
    let means = |t: &Tensor| -> mcld::Result<Vec<Vec<f32>>> {
        Ok(t.flatten_from(2)?.mean(2)?.to_vec2::<f32>()?)
    };
    let parts = [
        means(&b.target)?,
        means(&b.texture)?,
        means(&b.clip_src)?,
        means(&b.clip_tex)?,
        means(&b.pose)?,
        means(&b.face)?,
    ];
    Ok((0..b.len())
        .map(|i| {
            let mut f = [0f64; D];
            let mut k = 0;
            for p in &parts {
                for v in &p[i] {
                    f[k] = *v as f64;
                    k += 1;
                }
            }
            f
        })
        .collect())
}

impl TrainStep for Lin {
    fn grads(&mut self, batch: &TrainBatch, rngs: &mut StepRngs) -> mcld::Result<Grads> {
        let rng = &mut rngs.local;
        if self.fail_grads_at == Some(self.steps) {
            return Err(mcld::Error::msg("stand-in step failure"));
        }
        std::thread::sleep(self.delay);
        let feats = features(batch)?;
        let n = feats.len() as f64;
        let mut g = [0f64; D];
        let mut loss = 0f64;
        for f in &feats {
            let eps: f64 = rng.sample::<f64, _>(StandardNormal) * self.noise as f64;
            let pred: f64 = f
                .iter()
                .zip(&self.w)
                .map(|(a, b)| a * *b as f64)
                .sum::<f64>()
                + eps;
            let y = 0.5 * f[0] + f[8] - 0.3 * f[12] + 0.1;
            let r = pred - y;
            loss += r * r / n;
            for j in 0..D {
                g[j] += 2.0 * r * f[j] / n;
            }
        }
        if self.nan_at == Some(self.steps) {
            loss = f64::NAN;
        }
        let g: Vec<f32> = g.iter().map(|v| *v as f32).collect();
        Ok(Grads {
            tensors: vec![Tensor::from_vec(g, D, &Device::Cpu)?],
            has_grad: vec![true],
            loss,
            samples: feats.len(),
        })
    }

    fn apply(&mut self, grads: &Grads, lr: f64) -> mcld::Result<StepStats> {
        let g = grads.tensors[0].to_vec1::<f32>()?;
        let norm = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        for ((w, m), g) in self.w.iter_mut().zip(&mut self.m).zip(&g) {
            *m = 0.9 * *m + (*g as f64 * clip) as f32;
            *w -= (lr * (*m as f64 + 0.01 * *w as f64)) as f32;
        }
        self.steps += 1;
        Ok(StepStats {
            loss: grads.loss,
            grad_norm: norm,
            lr,
            skipped: false,
            loss_scale: None,
        })
    }

    fn step_count(&self) -> u64 {
        self.steps
    }

    fn weights(&self, net: Net) -> mcld::Result<HashMap<String, Tensor>> {
        let i = Net::ALL.iter().position(|n| *n == net).unwrap();
        let t = Tensor::from_vec(self.w[4 * i..4 * i + 4].to_vec(), 4, &Device::Cpu)?;
        Ok([("w".to_string(), t)].into())
    }

    fn save_state(&self, dir: &Path) -> mcld::Result<()> {
        if self.fail_save_at == Some(self.steps) {
            return Err(mcld::Error::msg("No space left on device (simulated)"));
        }
        let t: HashMap<String, Tensor> = [
            (
                "w".to_string(),
                Tensor::from_vec(self.w.clone(), D, &Device::Cpu)?,
            ),
            (
                "m".to_string(),
                Tensor::from_vec(self.m.clone(), D, &Device::Cpu)?,
            ),
        ]
        .into();
        candle_core::safetensors::save(&t, dir.join("lin.safetensors"))?;
        std::fs::write(dir.join("steps.txt"), self.steps.to_string())
            .map_err(|e| mcld::Error::io(dir, e))
    }

    fn load_state(&mut self, dir: &Path) -> mcld::Result<()> {
        let t = candle_core::safetensors::load(dir.join("lin.safetensors"), &Device::Cpu)?;
        self.w = t["w"].to_vec1()?;
        self.m = t["m"].to_vec1()?;
        let s =
            std::fs::read_to_string(dir.join("steps.txt")).map_err(|e| mcld::Error::io(dir, e))?;
        self.steps = s.trim().parse().unwrap();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tiny datasets.

fn photo_name(i: usize) -> String {
    format!("fashionWOMENDressesid{:08}01_{}front.jpg", i / 2, i % 2 + 1)
}

fn stem(name: &str) -> String {
    name.trim_end_matches(".jpg").to_string()
}

fn pattern(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) ^ (x * y + seed);
        image::Rgb([
            (v % 251) as u8,
            ((v / 3 + seed * 17) % 253) as u8,
            ((x * 11 + seed * 5) % 255) as u8,
        ])
    })
}

/// `n` photos (24x32 JPEGs) with IUV, texture and (except photo 1) face files, and the pairs
/// (i, i+1) and (i, i+3) mod n.
fn dataset(root: &Path, n: usize) -> Vec<(String, String)> {
    for d in ["train", "train_densepose", "train_texture", "train_face"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..n {
        let name = photo_name(i);
        pattern(24, 32, i as u32)
            .save(root.join("train").join(&name))
            .unwrap();
        let iuv = image::RgbImage::from_fn(24, 32, |x, y| {
            image::Rgb([
                (x * 10) as u8,
                (y * 8) as u8,
                ((x + y + i as u32) % 25) as u8,
            ])
        });
        iuv.save(
            root.join("train_densepose")
                .join(format!("{}.png", stem(&name))),
        )
        .unwrap();
        pattern(16, 16, 100 + i as u32)
            .save(
                root.join("train_texture")
                    .join(format!("{}.png", stem(&name))),
            )
            .unwrap();
        if i != 1 {
            let v: Vec<f32> = (0..512).map(|k| ((k + i) as f32 * 0.01).cos()).collect();
            mcld::data::npy::write_f32(
                &root.join("train_face").join(format!("{}.npy", stem(&name))),
                &[512],
                &v,
            )
            .unwrap();
        }
    }
    let mut pairs = Vec::new();
    for i in 0..n {
        for k in [1, 3] {
            pairs.push((photo_name(i), photo_name((i + k) % n)));
        }
    }
    write_csv(root, &pairs);
    pairs
}

fn write_csv(root: &Path, pairs: &[(String, String)]) {
    let mut s = String::from("from,to\n");
    for (a, b) in pairs {
        s.push_str(&format!("{a},{b}\n"));
    }
    std::fs::write(root.join("train.csv"), s).unwrap();
}

fn open_set(root: &Path) -> Arc<TrainSet> {
    Arc::new(TrainSet::open(root, &root.join("train.csv"), SIZE).unwrap())
}

fn truncate_third(path: &Path) {
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..b.len() / 3]).unwrap();
}

fn loop_cfg(exp: &Path, max: u64, bs: usize) -> LoopConfig {
    LoopConfig {
        seed: 7,
        train_bs: bs,
        grad_accum: 2,
        max_train_steps: max,
        lr: lr_schedule("constant_with_warmup", 0.05, 3, max),
        checkpointing_steps: 1,
        checkpoints_total_limit: 3,
        validation_steps: 4,
        exp_dir: exp.to_path_buf(),
        resume: Resume::Latest,
        prefetch: 2,
        progress: false,
        loss_scaling: false,
        save_model_epoch_interval: 0,
    }
}

/// A schedule for one rank and no accumulation.
fn lr_schedule(name: &str, lr: f64, warmup: u64, max: u64) -> LrScheduler {
    LrScheduler::from_solver(name, lr, false, warmup, max, 1, 1, 1).unwrap()
}

fn run_single(model: &mut Lin, set: Arc<TrainSet>, cfg: &LoopConfig) -> mcld::Result<TrainOutcome> {
    train_loop(
        model,
        set,
        cfg,
        &SingleProcess,
        &AtomicBool::new(false),
        &mut NoHooks,
    )
}

/// Every tensor of the four network files of a checkpoint, as raw f32 bits.
fn checkpoint_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for net in Net::ALL {
        let t = candle_core::safetensors::load(dir.join(net.file_name()), &Device::Cpu).unwrap();
        let mut keys: Vec<_> = t.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let v: Vec<f32> = t[&k].flatten_all().unwrap().to_vec1().unwrap();
            out.push((
                format!("{}:{k}", net.file_name()),
                v.iter().map(|x| x.to_bits()).collect(),
            ));
        }
    }
    let st = candle_core::safetensors::load(
        dir.join(checkpoint::TRAIN_STATE_DIR)
            .join("lin.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for k in ["w", "m"] {
        let v: Vec<f32> = st[k].to_vec1().unwrap();
        out.push((
            format!("state:{k}"),
            v.iter().map(|x| x.to_bits()).collect(),
        ));
    }
    out
}

fn log_losses(exp: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(exp.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Data.

#[test]
fn broken_pairs_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pairs = dataset(root, 8);
    // Photo 5's texture is gone (found at open); photo 6 is a JPEG cut to a third (found when
    // decoded); photo 2's face file is not a .npy (unreadable, not missing).
    let tex5 = root
        .join("train_texture")
        .join(format!("{}.png", stem(&photo_name(5))));
    std::fs::remove_file(&tex5).unwrap();
    let cut = root.join("train").join(photo_name(6));
    truncate_third(&cut);
    let face2 = root
        .join("train_face")
        .join(format!("{}.npy", stem(&photo_name(2))));
    std::fs::write(&face2, b"garbage").unwrap();

    let set = open_set(root);
    // Pairs with photo 5 as source lack its texture: 2 of 16.
    assert_eq!(set.skipped.len(), 2, "{:?}", set.skipped);
    assert_eq!(set.len(), pairs.len() - 2);
    for s in &set.skipped {
        assert_eq!(s.from, photo_name(5));
        assert_eq!(s.path, tex5);
        assert_eq!(s.reason, "file not found");
    }
    // Photo 1 has no face file: zeros, and the pair is kept.
    let i1 = set
        .pairs()
        .iter()
        .position(|p| p.from == photo_name(1))
        .unwrap();
    let s1 = set.load(i1).unwrap();
    assert_eq!(
        s1.face
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let i0 = set
        .pairs()
        .iter()
        .position(|p| p.from == photo_name(0))
        .unwrap();
    let s0 = set.load(i0).unwrap();
    assert!(
        s0.face
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1.0
    );
    assert_eq!(s0.target.dims(), &[3, SIZE.0, SIZE.1]);
    assert_eq!(s0.clip_src.dims(), &[3, 224, 224]);

    // A full training run: the decode failures are skipped, recorded once each, and reported.
    let exp = root.join("exp");
    let cfg = loop_cfg(&exp, 6, 2);
    let out = run_single(&mut Lin::new(0.1), set.clone(), &cfg).unwrap();
    assert_eq!((out.step, out.reason), (6, StopReason::Finished));
    let expect_bad: std::collections::BTreeSet<(String, String)> = set
        .pairs()
        .iter()
        .filter(|p| p.from == photo_name(6) || p.to == photo_name(6) || p.from == photo_name(2))
        .map(|p| (p.from.clone(), p.to.clone()))
        .collect();
    let decoded_bad: Vec<_> = out
        .skipped
        .iter()
        .filter(|s| s.reason != "file not found")
        .collect();
    let got: std::collections::BTreeSet<(String, String)> = decoded_bad
        .iter()
        .map(|s| (s.from.clone(), s.to.clone()))
        .collect();
    // 6 epochs x 14 pairs / (2 x 2) per step covers every pair at least once.
    assert_eq!(got, expect_bad, "{decoded_bad:?}");
    assert_eq!(got.len(), decoded_bad.len(), "each pair recorded once");
    for s in &decoded_bad {
        if s.path == cut {
            assert!(s.reason.contains("truncated"), "{}", s.reason);
        } else {
            assert_eq!(s.path, face2, "{s:?}");
            assert!(
                s.reason.contains(".npy") || s.reason.contains("magic"),
                "{}",
                s.reason
            );
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("train_report.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["skipped"].as_array().unwrap().len(),
        out.skipped.len()
    );
    println!(
        "skipped at open: {}, while decoding: {} (of {} pairs)",
        set.skipped.len(),
        decoded_bad.len(),
        pairs.len()
    );
}

#[test]
fn no_usable_pair_is_an_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4);
    std::fs::remove_dir_all(root.join("train_texture")).unwrap();
    let e = TrainSet::open(root, &root.join("train.csv"), SIZE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no usable training pair") && e.contains("train_texture") && e.contains("8"),
        "{e}"
    );
    assert!(e.contains("train.csv"), "{e}");

    // Every photo present but truncated: the loader says nothing could be read.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4);
    for i in 0..4 {
        truncate_third(&root.join("train").join(photo_name(i)));
    }
    let set = open_set(root);
    let exp = root.join("exp");
    let e = run_single(&mut Lin::new(0.0), set, &loop_cfg(&exp, 3, 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could be read") && e.contains("truncated"),
        "{e}"
    );
    assert!(checkpoint::latest(&exp).unwrap().is_none());

    // Fewer usable pairs than one batch.
    let dir2 = tempfile::tempdir().unwrap();
    dataset(dir2.path(), 2); // 4 pairs
    let e = run_single(
        &mut Lin::new(0.0),
        open_set(dir2.path()),
        &loop_cfg(&dir2.path().join("exp"), 2, 5),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("fewer than one batch of train_bs 5"), "{e}");

    // An empty CSV.
    write_csv(root, &[]);
    let e = TrainSet::open(root, &root.join("train.csv"), SIZE)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no pairs"), "{e}");
}

fn batch_bits(b: &TrainBatch) -> Vec<u32> {
    [
        &b.target,
        &b.texture,
        &b.clip_src,
        &b.clip_tex,
        &b.pose,
        &b.face,
    ]
    .iter()
    .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    .map(|v| v.to_bits())
    .collect()
}

#[test]
fn prefetch_order_is_deterministic_and_shards_are_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let opts = |prefetch| LoaderOptions {
        seed: 11,
        rank: 0,
        world: 1,
        batch_size: 3,
        prefetch,
    };
    // 12 pairs, batches of 3: 4 per epoch; 10 batches run into the third epoch.
    let mut walk = Walk::new(&set, opts(1), DataPos::default());
    let direct: Vec<(Vec<u32>, DataPos)> = (0..10)
        .map(|_| {
            let b = walk.next_batch().unwrap();
            (batch_bits(&b.batch), b.after)
        })
        .collect();
    assert_eq!(direct[3].1, DataPos { epoch: 0, pos: 12 });
    assert_eq!(direct[4].1, DataPos { epoch: 1, pos: 3 });
    for prefetch in [1, 4, 16] {
        let mut l = Loader::start(set.clone(), opts(prefetch), DataPos::default()).unwrap();
        for (i, (bits, after)) in direct.iter().enumerate() {
            let b = l.next_batch().unwrap();
            assert_eq!(&b.after, after, "prefetch {prefetch}, batch {i}");
            assert!(
                &batch_bits(&b.batch) == bits,
                "prefetch {prefetch}, batch {i} differs"
            );
        }
    }
    // Starting at a saved position gives the rest of the same sequence.
    let mut l = Loader::start(set.clone(), opts(3), direct[5].1).unwrap();
    for (bits, after) in &direct[6..] {
        let b = l.next_batch().unwrap();
        assert_eq!(&b.after, after);
        assert!(&batch_bits(&b.batch) == bits);
    }
    // Epochs are reshuffled, the same for every rank; rank shards split each epoch.
    let e0 = set.epoch_order(11, 0);
    let e1 = set.epoch_order(11, 1);
    assert_ne!(e0, e1);
    assert_ne!(e0, set.epoch_order(12, 0));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..set.len()).collect::<Vec<_>>());
    for world in [2, 3] {
        let mut all: Vec<usize> = (0..world)
            .flat_map(|r| set.shard(11, 1, r, world))
            .collect();
        all.sort();
        assert_eq!(all, (0..set.len()).collect::<Vec<_>>(), "world {world}");
    }
}

// ---------------------------------------------------------------------------------------------
// Resume, signals.

const CHILD_EXP: &str = "MCLD_TRAIN_LOOP_CHILD_EXP";
const CHILD_DATA: &str = "MCLD_TRAIN_LOOP_CHILD_DATA";
const CHILD_SIGNALS: &str = "MCLD_TRAIN_LOOP_CHILD_SIGNALS";
const RESUME_STEPS: u64 = 24;

fn resume_cfg(exp: &Path) -> LoopConfig {
    let mut c = loop_cfg(exp, RESUME_STEPS, 2);
    c.validation_steps = 5;
    c
}

fn slow_lin() -> Lin {
    let mut m = Lin::new(0.3);
    m.delay = Duration::from_millis(15);
    m
}

/// Not a test on its own: the training run of the child processes the resume tests start
/// (with `--ignored`); it fails when their variables are unset.
#[test]
#[ignore = "helper: run by the resume tests in a child process"]
fn zz_child_training_run() {
    let (exp, data) = child_vars(CHILD_EXP, CHILD_DATA);
    let stop = if std::env::var_os(CHILD_SIGNALS).is_some() {
        mcld::train::run::cmd::install_stop_signals().unwrap()
    } else {
        Arc::new(AtomicBool::new(false))
    };
    let set = open_set(Path::new(&data));
    let out = train_loop(
        &mut slow_lin(),
        set,
        &resume_cfg(Path::new(&exp)),
        &SingleProcess,
        &stop,
        &mut NoHooks,
    )
    .unwrap();
    std::fs::write(
        Path::new(&exp).join("child_outcome.json"),
        serde_json::to_string(&out).unwrap(),
    )
    .unwrap();
}

/// The two variables a child entry point needs; a clear failure when it is run without them.
fn child_vars(a: &str, b: &str) -> (std::ffi::OsString, std::ffi::OsString) {
    match (std::env::var_os(a), std::env::var_os(b)) {
        (Some(x), Some(y)) => (x, y),
        _ => panic!("a child helper: its parent test sets {a} and {b}; run that test instead"),
    }
}

/// The command line that runs one `#[ignore]`d child entry point of this binary.
fn child_command(name: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    c
}

/// The step number of the newest checkpoint folder (by name, no file read: safe while a child
/// writes and prunes).
fn newest_step_now(exp: &Path) -> u64 {
    checkpoint::list_checkpoints(exp)
        .ok()
        .and_then(|v| v.last().map(|(s, _)| *s))
        .unwrap_or(0)
}

/// Runs `spawn` up to `tries` times, each time waiting until the child has written a checkpoint
/// past a random step in 1..end-1, then a random `jitter` of milliseconds, then SIGKILL; then
/// lets one more child finish the run (unless one already did). Returns (target, newest
/// checkpoint after the kill) per kill.
fn kill_at_random_checkpoints(
    exp: &Path,
    end: u64,
    tries: usize,
    jitter: std::ops::Range<u64>,
    rng: &mut StdRng,
    spawn: &dyn Fn() -> std::process::Child,
) -> Vec<(u64, u64)> {
    let mut kills = Vec::new();
    for _ in 0..tries {
        let mut child = spawn();
        let from = newest_step_now(exp);
        // Kill after a checkpoint with at least one step still to go after it.
        if from + 2 >= end {
            let st = child.wait().unwrap();
            assert!(st.success(), "child failed: {st}");
            break;
        }
        let target = rng.random_range(from + 1..end - 1);
        let t0 = std::time::Instant::now();
        let mut finished = false;
        while newest_step_now(exp) < target {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "child failed: {st}");
                finished = true;
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "child made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(jitter.clone())));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills.push((target, latest_step(exp)));
    }
    if latest_step(exp) < end {
        let st = spawn().wait().unwrap();
        assert!(st.success(), "the finishing child failed: {st}");
    }
    kills
}

/// The kills landed between the first checkpoint and the end, and the run that finished was
/// resumed from such a checkpoint (its report says from which).
fn assert_resumed_mid_run(exp: &Path, end: u64, kills: &[(u64, u64)]) {
    assert!(
        kills.iter().any(|(_, s)| *s >= 1 && *s < end),
        "no kill landed between the first checkpoint and the end: {kills:?}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exp.join(mcld::train::run::train_loop::REPORT_FILE)).unwrap(),
    )
    .unwrap();
    let from = report["resumed_from"]
        .as_str()
        .unwrap_or_else(|| panic!("the finishing run did not resume: {report}"));
    let step = checkpoint::read_state(Path::new(from)).map(|s| s.step);
    // The folder may since have been pruned; its name carries the step.
    let step = step.unwrap_or_else(|_| {
        from.rsplit("checkpoint-")
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap()
    });
    assert!(
        step >= 1 && step < end,
        "resumed from step {step}, not mid-run"
    );
    println!("the finishing run resumed from {from} (step {step} of {end})");
}

fn spawn_child(exp: &Path, data: &Path, signals: bool) -> std::process::Child {
    let mut c = child_command("run_loop::zz_child_training_run");
    c.env(CHILD_EXP, exp)
        .env(CHILD_DATA, data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if signals {
        c.env(CHILD_SIGNALS, "1");
    }
    c.spawn().unwrap()
}

fn latest_step(exp: &Path) -> u64 {
    checkpoint::latest(exp)
        .unwrap()
        .map(|p| checkpoint::read_state(&p).unwrap().step)
        .unwrap_or(0)
}

/// The uninterrupted run the interrupted ones must match.
fn reference_run(root: &Path, set: Arc<TrainSet>) -> PathBuf {
    let exp = root.join("reference");
    let out = run_single(&mut slow_lin(), set, &resume_cfg(&exp)).unwrap();
    assert_eq!(out.step, RESUME_STEPS);
    exp
}

#[test]
fn resume_after_sigkill_at_random_points_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let reference = reference_run(root, set.clone());

    let seed: u64 = rand::random();
    println!("kill seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let exp = root.join("killed");
    let kills = kill_at_random_checkpoints(&exp, RESUME_STEPS, 6, 0..20, &mut rng, &|| {
        spawn_child(&exp, root, false)
    });
    println!("SIGKILLs (target step, newest checkpoint after): {kills:?}");
    assert_resumed_mid_run(&exp, RESUME_STEPS, &kills);
    let a = checkpoint_bits(&checkpoint::checkpoint_dir(&reference, RESUME_STEPS));
    let b = checkpoint_bits(&checkpoint::checkpoint_dir(&exp, RESUME_STEPS));
    assert_eq!(a, b, "final weights differ from the uninterrupted run");
    // The log holds each step once, with the uninterrupted run's losses.
    assert_eq!(log_losses(&exp), log_losses(&reference));
    let sa = checkpoint::read_state(&checkpoint::checkpoint_dir(&reference, RESUME_STEPS)).unwrap();
    let sb = checkpoint::read_state(&checkpoint::checkpoint_dir(&exp, RESUME_STEPS)).unwrap();
    assert_eq!(sa, sb);
    // Nothing half-written is left, and only the last three checkpoints are kept.
    let names: Vec<String> = std::fs::read_dir(&exp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| !n.contains('.')), "{names:?}");
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let reference = reference_run(root, set.clone());
    let exp = root.join("termed");
    let mut child = spawn_child(&exp, root, true);
    // Wait for the first checkpoint, so the handler is surely installed, then SIGTERM.
    let t0 = std::time::Instant::now();
    while latest_step(&exp) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "child made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("child_outcome.json")).unwrap())
            .unwrap();
    let step = out["step"].as_u64().unwrap();
    println!("stopped at step {step} of {RESUME_STEPS}");
    if step < RESUME_STEPS {
        assert_eq!(out["reason"], "Interrupted");
        // The checkpoint of the step it stopped at is there.
        assert_eq!(latest_step(&exp), step);
    }
    // Resuming finishes with the uninterrupted run's weights.
    std::fs::remove_file(exp.join("child_outcome.json")).unwrap();
    let mut m = slow_lin();
    m.delay = Duration::ZERO;
    run_single(&mut m, set, &resume_cfg(&exp)).unwrap();
    assert_eq!(
        checkpoint_bits(&checkpoint::checkpoint_dir(&reference, RESUME_STEPS)),
        checkpoint_bits(&checkpoint::checkpoint_dir(&exp, RESUME_STEPS))
    );
}

// ---------------------------------------------------------------------------------------------
// Ranks.

#[test]
fn two_ranks_of_batch_b_equal_one_rank_of_batch_2b() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 8); // 16 pairs: 2 steps of 2 x 4 samples per epoch either way
    let set = open_set(root);
    let steps = 7;
    let one = root.join("one");
    let mut cfg1 = loop_cfg(&one, steps, 4);
    cfg1.checkpointing_steps = 0;
    run_single(&mut Lin::new(0.0), set.clone(), &cfg1).unwrap();

    let two = root.join("two");
    let group = LocalGroup::new(2);
    let handles: Vec<_> = group
        .into_iter()
        .map(|rank| {
            let set = set.clone();
            let mut cfg = loop_cfg(&two, steps, 2);
            cfg.checkpointing_steps = 0;
            std::thread::spawn(move || {
                let mut m = Lin::new(0.0);
                let out = train_loop(
                    &mut m,
                    set,
                    &cfg,
                    &rank,
                    &AtomicBool::new(false),
                    &mut NoHooks,
                );
                (out.map(|o| o.step), m.w)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, (out, _)) in results.iter().enumerate() {
        assert_eq!(out.as_ref().unwrap(), &steps, "rank {r}");
    }
    // Both ranks hold the same weights, equal to the single rank's within float rounding.
    assert_eq!(results[0].1, results[1].1);
    let a = checkpoint_bits(&checkpoint::checkpoint_dir(&one, steps));
    let b = checkpoint_bits(&checkpoint::checkpoint_dir(&two, steps));
    let mut worst = 0f32;
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
            worst = worst.max((x - y).abs() / x.abs().max(1e-3));
        }
    }
    println!("2 ranks x 2 vs 1 rank x 4, {steps} steps: worst relative difference {worst:e}");
    assert!(worst < 1e-5, "{worst}");
    // Only rank 0 wrote: one log line per step.
    assert_eq!(log_losses(&two).len(), steps as usize);
    let st = checkpoint::read_state(&checkpoint::checkpoint_dir(&two, steps)).unwrap();
    assert_eq!((st.world_size, st.data.len()), (2, 2));

    // A rank that fails stops the other with an error instead of a hang.
    let group = LocalGroup::new(2);
    let handles: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(r, rank)| {
            let set = set.clone();
            let mut cfg = loop_cfg(&root.join("dies"), steps, 2);
            cfg.checkpointing_steps = 0;
            std::thread::spawn(move || {
                let mut m = Lin::new(0.0);
                if r == 1 {
                    m.fail_grads_at = Some(3);
                }
                let res = train_loop(
                    &mut m,
                    set,
                    &cfg,
                    &rank,
                    &AtomicBool::new(false),
                    &mut NoHooks,
                );
                drop(rank);
                res.map(|o| o.step)
            })
        })
        .collect();
    let errs: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err().to_string())
        .collect();
    assert!(errs[0].contains("rank 1 stopped"), "{}", errs[0]);
    assert!(errs[1].contains("stand-in step failure"), "{}", errs[1]);
}

/// A pair that only rank 1 reads and cannot decode is in rank 0's report: every rank's skips
/// are gathered when the run ends (each pair once), and both ranks return the same list.
#[test]
fn a_pair_rank_1_skips_is_in_rank_0s_report() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 8);
    let clean = open_set(root);
    // One step of 2 micro-batches of 2: each rank reads the first 4 readable pairs of its
    // shard of epoch 0. Break the face file of a photo that is the source of a pair among
    // rank 1's first 4 and of none among rank 0's first 8.
    let from = |i: usize| clean.pairs()[i].from.clone();
    let r0: Vec<String> = clean
        .shard(7, 0, 0, 2)
        .into_iter()
        .take(8)
        .map(from)
        .collect();
    let r1: Vec<String> = clean
        .shard(7, 0, 1, 2)
        .into_iter()
        .take(4)
        .map(from)
        .collect();
    let bad = r1
        .iter()
        .find(|p| !r0.contains(p))
        .expect("a source that only rank 1 reads in step 1")
        .clone();
    let face = root.join("train_face").join(format!("{}.npy", stem(&bad)));
    std::fs::write(&face, b"garbage").unwrap();
    let set = open_set(root);
    assert!(
        set.skipped.is_empty(),
        "found when decoded, not when opened"
    );

    let exp = root.join("exp");
    let handles: Vec<_> = LocalGroup::new(2)
        .into_iter()
        .map(|rank| {
            let set = set.clone();
            let mut cfg = loop_cfg(&exp, 1, 2);
            cfg.checkpointing_steps = 0;
            std::thread::spawn(move || {
                train_loop(
                    &mut Lin::new(0.0),
                    set,
                    &cfg,
                    &rank,
                    &AtomicBool::new(false),
                    &mut NoHooks,
                )
            })
        })
        .collect();
    let outs: Vec<TrainOutcome> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let pairs = |o: &TrainOutcome| -> Vec<(String, String)> {
        o.skipped
            .iter()
            .map(|s| (s.from.clone(), s.to.clone()))
            .collect()
    };
    assert!(!outs[0].skipped.is_empty());
    assert_eq!(pairs(&outs[0]), pairs(&outs[1]));
    for s in &outs[0].skipped {
        assert_eq!((s.from.as_str(), &s.path), (bad.as_str(), &face), "{s:?}");
        assert!(
            s.reason.contains(".npy") || s.reason.contains("magic"),
            "{}",
            s.reason
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("train_report.json")).unwrap())
            .unwrap();
    let listed = report["skipped"].as_array().unwrap();
    assert_eq!(listed.len(), outs[0].skipped.len());
    assert_eq!(listed[0]["from"], bad.as_str());
    assert_eq!(listed[0]["path"], face.display().to_string());
    println!(
        "rank 1 skipped {} pair(s) of {bad}; rank 0's report lists them",
        listed.len()
    );
}

/// `all_gather_bytes`: every rank gets every rank's bytes, in rank order, whatever their
/// lengths (empty included): one process, ranks as threads, ranks over TCP.
#[test]
fn all_gather_bytes_returns_every_ranks_bytes_in_rank_order() {
    use mcld::train::dist::collective::Collective;
    let msg = |r: usize| -> Vec<u8> { (0..r * 3).map(|i| (i * 7 + r) as u8).collect() };
    assert_eq!(
        SingleProcess.all_gather_bytes(b"abc").unwrap(),
        vec![b"abc".to_vec()]
    );
    let expect: Vec<Vec<u8>> = (0..3).map(msg).collect();
    let handles: Vec<_> = LocalGroup::new(3)
        .into_iter()
        .enumerate()
        .map(|(r, rank)| {
            std::thread::spawn(move || {
                let a = rank.all_gather_bytes(&msg(r)).unwrap();
                // Mixed with the other operations, in the same order on every rank.
                let f = rank.all_gather_f64(&[r as f64]).unwrap();
                (a, f)
            })
        })
        .collect();
    for h in handles {
        let (a, f) = h.join().unwrap();
        assert_eq!(a, expect);
        assert_eq!(f, vec![vec![0.0], vec![1.0], vec![2.0]]);
    }

    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let handles: Vec<_> = (0..3)
        .map(|r| {
            std::thread::spawn(move || {
                let info = RankInfo {
                    rank: r,
                    world: 3,
                    local_rank: r,
                    master_addr: Some("127.0.0.1".into()),
                    master_port: Some(port),
                };
                let c = TcpCollective::connect(&info, Duration::from_secs(30)).unwrap();
                let a = c.all_gather_bytes(&msg(r)).unwrap();
                let f = c.all_gather_f64(&[r as f64, 0.5]).unwrap();
                (a, f)
            })
        })
        .collect();
    for h in handles {
        let (a, f) = h.join().unwrap();
        assert_eq!(a, expect);
        assert_eq!(f, vec![vec![0.0, 0.5], vec![1.0, 0.5], vec![2.0, 0.5]]);
    }
}

const TCP_EXP: &str = "MCLD_TRAIN_LOOP_TCP_EXP";
const TCP_FAIL: &str = "MCLD_TRAIN_LOOP_TCP_FAIL";
const TCP_STEPS: u64 = 7;

/// Not a test on its own: one rank of the multi-process tests (run with `--ignored` by them;
/// fails when their variables are unset).
#[test]
#[ignore = "helper: run by the multi-process tests in child processes"]
fn zz_child_tcp_rank() {
    let (exp, data) = child_vars(TCP_EXP, CHILD_DATA);
    let info = RankInfo::from_env().unwrap();
    let coll = TcpCollective::connect(&info, Duration::from_secs(60)).unwrap();
    let mut m = Lin::new(0.0);
    if std::env::var_os(TCP_FAIL).is_some() && info.rank == 1 {
        m.fail_grads_at = Some(3);
    }
    let mut cfg = loop_cfg(Path::new(&exp), TCP_STEPS, 2);
    cfg.checkpointing_steps = 0;
    let set = open_set(Path::new(&data));
    let r = train_loop(
        &mut m,
        set,
        &cfg,
        &coll,
        &AtomicBool::new(false),
        &mut NoHooks,
    );
    if let Err(e) = r {
        eprintln!("rank {} error: {e}", info.rank);
        std::process::exit(3);
    }
}

fn spawn_ranks(exp: &Path, data: &Path, fail: bool) -> Vec<std::process::Child> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (0..2)
        .map(|r| {
            let mut c = child_command("run_loop::zz_child_tcp_rank");
            c.env(TCP_EXP, exp)
                .env(CHILD_DATA, data)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            if fail {
                c.env(TCP_FAIL, "1");
            }
            c.spawn().unwrap()
        })
        .collect()
}

#[test]
fn two_rank_processes_over_tcp_equal_one_rank_and_a_dead_rank_stops_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 8);
    let set = open_set(root);
    let one = root.join("one");
    let mut cfg1 = loop_cfg(&one, TCP_STEPS, 4);
    cfg1.checkpointing_steps = 0;
    run_single(&mut Lin::new(0.0), set, &cfg1).unwrap();

    let two = root.join("two");
    for c in spawn_ranks(&two, root, false) {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = checkpoint_bits(&checkpoint::checkpoint_dir(&one, TCP_STEPS));
    let b = checkpoint_bits(&checkpoint::checkpoint_dir(&two, TCP_STEPS));
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|((_, va), (_, vb))| va.iter().zip(vb))
        .map(|(x, y)| {
            let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
            (x - y).abs() / x.abs().max(1e-3)
        })
        .fold(0f32, f32::max);
    println!("2 processes x 2 vs 1 rank x 4: worst relative difference {worst:e}");
    assert!(worst < 1e-5, "{worst}");

    // Rank 1 fails at its fourth step: rank 0 ends with an error, no hang.
    let t0 = std::time::Instant::now();
    let outs: Vec<_> = spawn_ranks(&root.join("dies"), root, true)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert!(t0.elapsed() < Duration::from_secs(120));
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert_eq!(outs[0].status.code(), Some(3), "{err0}");
    assert!(err0.contains("lost rank 1"), "{err0}");
    let err1 = String::from_utf8_lossy(&outs[1].stderr);
    assert!(err1.contains("stand-in step failure"), "{err1}");
}

#[test]
fn rank_contract_comes_from_the_torchrun_variables() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(RankInfo::from_vars(env(&[])).unwrap(), RankInfo::single());
    let r = RankInfo::from_vars(env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!((r.rank, r.world, r.local_rank), (3, 4, 1));
    assert_eq!(
        (r.master_addr.as_deref(), r.master_port),
        (Some("node0"), Some(29500))
    );
    let e = RankInfo::from_vars(env(&[("RANK", "4"), ("WORLD_SIZE", "4")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK=4"), "{e}");
    let e = RankInfo::from_vars(env(&[("RANK", "0"), ("WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MASTER_ADDR"), "{e}");
    let e = RankInfo::from_vars(env(&[("WORLD_SIZE", "two")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("WORLD_SIZE"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Faults and checkpoints.

#[test]
fn non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4);
    let set = open_set(root);
    let exp = root.join("exp");
    let mut cfg = loop_cfg(&exp, 10, 2);
    cfg.checkpointing_steps = 2;
    let mut m = Lin::new(0.1);
    m.nan_at = Some(4); // the fifth step
    let e = run_single(&mut m, set.clone(), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite loss") && e.contains("step 5"), "{e}");
    assert!(e.contains("checkpoint-4"), "{e}");
    assert_eq!(m.steps, 4, "the bad step was not applied");
    assert_eq!(latest_step(&exp), 4);
    // The log stops at the last good step.
    assert_eq!(log_losses(&exp).last().unwrap().0, 4);
    // f16 with loss scaling leaves the decision to the step (here it applies; the real step
    // skips and lowers the scale).
    let exp2 = root.join("f16");
    let mut cfg2 = loop_cfg(&exp2, 6, 2);
    cfg2.loss_scaling = true;
    let mut m = Lin::new(0.1);
    m.nan_at = Some(2);
    assert_eq!(run_single(&mut m, set, &cfg2).unwrap().step, 6);
}

#[test]
fn checkpoints_are_atomic_complete_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4);
    let set = open_set(root);
    let exp = root.join("exp");
    // Leftovers of a killed run: a half-written folder, a half-deleted one, and a folder with
    // a checkpoint's name but no state.json; none of them counts.
    std::fs::create_dir_all(exp.join("checkpoint-9.tmp")).unwrap();
    std::fs::create_dir_all(exp.join("checkpoint-1.del")).unwrap();
    std::fs::create_dir_all(exp.join("checkpoint-50")).unwrap();
    assert!(checkpoint::latest(&exp).unwrap().is_none());

    let mut cfg = loop_cfg(&exp, 7, 2);
    cfg.checkpoints_total_limit = 3;
    let mut m = Lin::new(0.1);
    m.fail_save_at = Some(6); // the write at step 6 fails (disk full)
    let out = run_single(&mut m, set.clone(), &cfg).unwrap();
    assert_eq!(out.step, 7);
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    let w = &out.warnings[0];
    assert!(
        w.contains("step 6") && w.contains("No space left") && w.contains("checkpoint-5 is kept"),
        "{w}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&exp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    // Steps 4, 5, 7 kept (6 failed); stale .tmp/.del removed; the stray folder left alone.
    assert_eq!(
        names,
        [
            "checkpoint-4",
            "checkpoint-5",
            "checkpoint-50",
            "checkpoint-7"
        ]
    );
    for s in [4, 5, 7] {
        let d = checkpoint::checkpoint_dir(&exp, s);
        for net in Net::ALL {
            assert!(d.join(net.file_name()).is_file(), "{}", d.display());
        }
        assert!(d
            .join(checkpoint::TRAIN_STATE_DIR)
            .join("lin.safetensors")
            .is_file());
        let st: CheckpointState = checkpoint::read_state(&d).unwrap();
        assert_eq!((st.step, st.seed, st.world_size, st.train_bs), (s, 7, 1, 2));
        assert_eq!(st.samples_seen, s * 2 * 2);
    }
    // The network files hold the released names and the weights of that step.
    let w7 = candle_core::safetensors::load(
        checkpoint::checkpoint_dir(&exp, 7).join("denoising_unet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(w7["w"].to_vec1::<f32>().unwrap(), m.w[4..8].to_vec());
    assert!(exp.join("loss_curve.png").is_file());
    let png = image::open(exp.join("loss_curve.png")).unwrap();
    assert!(png.width() > 100);

    // A failed write leaves nothing behind: no checkpoint-6, no temp folder.
    assert!(!exp.join("checkpoint-6").exists() && !exp.join("checkpoint-6.tmp").exists());

    // Starting from scratch over existing checkpoints is refused; a path resumes from there.
    let mut cfg_new = cfg.clone();
    cfg_new.resume = Resume::No;
    let e = run_single(&mut Lin::new(0.1), set.clone(), &cfg_new)
        .unwrap_err()
        .to_string();
    assert!(e.contains("latest"), "{e}");
    let mut cfg_path = cfg.clone();
    cfg_path.resume = Resume::Path(checkpoint::checkpoint_dir(&exp, 5));
    cfg_path.max_train_steps = 7;
    let mut m2 = Lin::new(0.1);
    let out = run_single(&mut m2, set, &cfg_path).unwrap();
    assert_eq!(out.resumed_from, Some(checkpoint::checkpoint_dir(&exp, 5)));
    assert_eq!(
        m2.w, m.w,
        "steps 6-7 redone from checkpoint-5 give the same weights"
    );
}

// ---------------------------------------------------------------------------------------------
// Truncated JPEGs.

fn big_jpeg(path: &Path) {
    // A photo-sized JPEG (750x1101, DeepFashion's size) with detail in every block.
    pattern(750, 1101, 3).save(path).unwrap();
}

#[test]
fn truncated_jpeg_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("photo.jpg");
    big_jpeg(&p);
    let full = mcld::imageops::open_image(&p).unwrap();
    assert_eq!((full.width(), full.height()), (750, 1101));
    truncate_third(&p);
    let e = mcld::imageops::open_rgb(&p).unwrap_err().to_string();
    assert!(e.contains("photo.jpg") && e.contains("truncated"), "{e}");
    // The split stage's check refuses it too.
    let e = mcld::prepare::split::check_jpeg(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("photo.jpg") && e.contains("truncated"), "{e}");
}

#[test]
fn prepare_texture_reports_a_truncated_photo_as_failed() {
    use mcld::prepare::{run_prepare, PrepareOptions, Stage};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let name = "fashionWOMENDressesid0000000101_1front.jpg";
    std::fs::create_dir_all(root.join("train")).unwrap();
    std::fs::create_dir_all(root.join("train_densepose")).unwrap();
    let photo = root.join("train").join(name);
    big_jpeg(&photo);
    truncate_third(&photo);
    // An IUV of the photo's size with one body part, so only the photo can be at fault.
    let iuv = image::RgbImage::from_fn(750, 1101, |x, y| {
        let inside = (200..500).contains(&x) && (300..900).contains(&y);
        image::Rgb(if inside { [100, 120, 2] } else { [0, 0, 0] })
    });
    iuv.save(
        root.join("train_densepose")
            .join(format!("{}.png", stem(name))),
    )
    .unwrap();
    let mut o = PrepareOptions::new(root, root.join("pretrained_weights"));
    o.stages = vec![Stage::Texture];
    let rep = run_prepare(&o).unwrap();
    let tx = rep.stage("texture").unwrap();
    let tex = root
        .join("train_texture")
        .join(format!("{}.png", stem(name)));
    assert!(!tex.exists(), "a texture was made from a truncated photo");
    // The texture assets are built into the binary: a stage error is a failure, not a skip.
    assert!(tx.error.is_none(), "texture stage failed: {tx:?}");
    assert_eq!(tx.done, 0, "{tx:?}");
    assert_eq!(tx.failed.len(), 1, "{tx:?}");
    assert!(tx.failed[0].path.ends_with(name), "{tx:?}");
    assert!(
        tx.failed[0].reason.contains("truncated"),
        "{}",
        tx.failed[0].reason
    );
    println!("texture stage: {}", tx.failed[0].reason);
}

// ---------------------------------------------------------------------------------------------
// The command.

fn train_yaml(dir: &Path, root: &Path) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(here.join("configs/train/train.yaml")).unwrap();
    let text = text.replace(
        "root_dir: \"./dataset/fashion/\"",
        &format!("root_dir: {:?}", root.display().to_string()),
    );
    let p = dir.join("train.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn command_line_overrides_the_config_and_checks_the_data_first() {
    use mcld::train::run::cmd::{loop_config, TrainCommand};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let cfg_path = train_yaml(dir.path(), &root);
    let cmd = TrainCommand {
        config: cfg_path.clone(),
        max_train_steps: Some(5),
        output_dir: Some(dir.path().join("out")),
        checkpointing_steps: Some(2),
        validation_steps: Some(3),
        resume_from_checkpoint: Some("latest".into()),
        train_bs: Some(4),
        ..Default::default()
    };
    let cfg = cmd.load_config().unwrap();
    assert_eq!(cfg.checkpoints_total_limit, 3);
    let lc = loop_config(&cfg, candle_core::DType::F32, false, 1, &cfg_path).unwrap();
    assert_eq!(
        (
            lc.max_train_steps,
            lc.checkpointing_steps,
            lc.validation_steps,
            lc.train_bs
        ),
        (5, 2, 3, 4)
    );
    assert_eq!(lc.resume, Resume::Latest);
    assert_eq!(lc.exp_dir, dir.path().join("out").join("mcld"));
    let none = TrainCommand {
        config: cfg_path.clone(),
        ..Default::default()
    };
    let base = none.load_config().unwrap();
    assert_eq!(
        loop_config(&base, candle_core::DType::F32, false, 1, &cfg_path)
            .unwrap()
            .resume,
        Resume::No
    );
    assert_eq!(base.data.train_bs, 12);

    // The binary, kebab-case spellings: no train.csv under the root yet, named in the error.
    let out = assert_cmd::Command::cargo_bin("mcld")
        .unwrap()
        .args(["train", "--config"])
        .arg(&cfg_path)
        .args([
            "--max-train-steps",
            "2",
            "--train-bs",
            "1",
            "--device",
            "cpu",
        ])
        .arg("--output-dir")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.csv"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The real MCLD step (tiny random base models in the real layout) through the loop.

const REAL_CHILD: &str = "MCLD_TEST_REAL_STEP_ROOT";
const REAL_DTYPE: &str = "MCLD_TEST_REAL_STEP_DTYPE";
const REAL_STEPS: u64 = 6;

fn real_cfg(exp: &Path, dtype: candle_core::DType) -> LoopConfig {
    let mut c = loop_cfg(exp, REAL_STEPS, 2);
    c.grad_accum = 1;
    c.lr = lr_schedule("constant", 1e-3, 1, REAL_STEPS);
    c.loss_scaling = dtype == candle_core::DType::F16;
    c
}

/// The tiny base under `root` (written once) and the training step built from it.
fn real_step(root: &Path, dtype: candle_core::DType) -> (Box<dyn TrainStep>, Arc<TrainSet>) {
    let cfg_path = root.join("train.yaml");
    if !cfg_path.exists() {
        mcld::presets::tree::write_tiny_train_base(root, &root.join("data")).unwrap();
    }
    let cfg = mcld::config::TrainConfig::load(&cfg_path).unwrap();
    let mut step = mcld::train::step::setup::build_trainer(&cfg, &Device::Cpu, dtype).unwrap();
    if let Some(s) = step.scaler.as_mut() {
        // Grow the scale every 2 clean steps, so the scaler's state changes along the run and
        // a resume that lost it would show.
        s.growth_interval = 2;
    }
    let data = root.join("data");
    let size = (cfg.data.train_height, cfg.data.train_width);
    let set = Arc::new(TrainSet::open(&data, &data.join("train.csv"), size).unwrap());
    (Box::new(step), set)
}

fn run_real(root: &Path, exp: &Path, dtype: candle_core::DType) -> TrainOutcome {
    let (mut step, set) = real_step(root, dtype);
    train_loop(
        step.as_mut(),
        set,
        &real_cfg(exp, dtype),
        &SingleProcess,
        &AtomicBool::new(false),
        &mut NoHooks,
    )
    .unwrap()
}

fn dtype_name(d: candle_core::DType) -> &'static str {
    if d == candle_core::DType::F16 {
        "f16"
    } else {
        "f32"
    }
}

/// Not a test on its own: the real-step run of the child processes below (run with
/// `--ignored`; fails when their variables are unset).
#[test]
#[ignore = "helper: run by the real-step resume tests in a child process"]
fn zz_child_real_step_run() {
    let (root, exp) = child_vars(REAL_CHILD, CHILD_EXP);
    let dtype = match std::env::var(REAL_DTYPE).as_deref() {
        Ok("f16") => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    };
    run_real(Path::new(&root), Path::new(&exp), dtype);
}

/// The network files and the step's own state (weights, AdamW moments, step) as raw bits.
fn real_checkpoint_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let mut files: Vec<PathBuf> = Net::ALL.iter().map(|n| dir.join(n.file_name())).collect();
    files.push(
        dir.join(checkpoint::TRAIN_STATE_DIR)
            .join(mcld::train::step::state::STATE_FILE),
    );
    let mut out = Vec::new();
    for f in files {
        let t = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
        let mut keys: Vec<_> = t.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let v = t[&k].flatten_all().unwrap();
            let bits: Vec<u32> = match v.dtype() {
                candle_core::DType::F32 => v
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                _ => v
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| [x.to_bits() as u32, (x.to_bits() >> 32) as u32])
                    .collect(),
            };
            out.push((format!("{}:{k}", f.display()), bits));
        }
    }
    out
}

/// SIGKILL at random moments of a real (tiny) MCLD training run, resumed each time with
/// `resume: latest`: the final weights, AdamW state (moments, per-tensor step counts), loss
/// scaler and per-step losses equal an uninterrupted run's bit for bit, and the finishing run
/// did resume from a checkpoint in the middle.
fn real_step_resumes_bit_exactly(dtype: candle_core::DType) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(&root.join("data"), 6);
    let reference = root.join("reference");
    assert_eq!(run_real(root, &reference, dtype).step, REAL_STEPS);

    let seed: u64 = rand::random();
    println!("kill seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let exp = root.join("killed");
    let spawn = || {
        child_command("run_loop::zz_child_real_step_run")
            .env(REAL_CHILD, root)
            .env(CHILD_EXP, &exp)
            .env(REAL_DTYPE, dtype_name(dtype))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let kills = kill_at_random_checkpoints(&exp, REAL_STEPS, 3, 0..300, &mut rng, &spawn);
    println!("SIGKILLs (target step, newest checkpoint after): {kills:?}");
    assert_resumed_mid_run(&exp, REAL_STEPS, &kills);
    let a = real_checkpoint_bits(&checkpoint::checkpoint_dir(&reference, REAL_STEPS));
    let b = real_checkpoint_bits(&checkpoint::checkpoint_dir(&exp, REAL_STEPS));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (_, vb)) in a.iter().zip(&b) {
        assert!(va == vb, "{ka} differs from the uninterrupted run");
    }
    assert_eq!(log_losses(&exp), log_losses(&reference));
    let sa = checkpoint::read_state(&checkpoint::checkpoint_dir(&reference, REAL_STEPS)).unwrap();
    let sb = checkpoint::read_state(&checkpoint::checkpoint_dir(&exp, REAL_STEPS)).unwrap();
    assert_eq!(sa, sb);
    if dtype == candle_core::DType::F16 {
        // The scaler grew along the run (every 2 clean steps), so its resumed state mattered.
        let s = sa.loss_scale.unwrap();
        assert!(s > 65536.0, "loss scale {s}");
    }
}

#[test]
fn real_step_resumes_bit_exactly_after_sigkill() {
    real_step_resumes_bit_exactly(candle_core::DType::F32);
}

#[test]
fn real_f16_step_with_loss_scaler_resumes_bit_exactly_after_sigkill() {
    real_step_resumes_bit_exactly(candle_core::DType::F16);
}

// ---------------------------------------------------------------------------------------------
// Resume sources, abandoned timelines, epoch saves, the dry run.

/// `resume_from_checkpoint` takes a checkpoint folder, a folder holding `checkpoint-N` folders
/// (the newest is used, as train.py does) or `latest`; anything else is an error naming it.
#[test]
fn resume_takes_a_checkpoint_a_folder_of_checkpoints_or_latest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let exp = root.join("exp");
    let mut c = loop_cfg(&exp, 4, 2);
    c.resume = Resume::No;
    c.checkpoints_total_limit = 10;
    run_single(&mut Lin::new(0.1), set.clone(), &c).unwrap();
    assert_eq!(
        Resume::Path(exp.clone()).resolve(&exp).unwrap(),
        Some(checkpoint::checkpoint_dir(&exp, 4))
    );
    assert_eq!(
        Resume::Path(checkpoint::checkpoint_dir(&exp, 2))
            .resolve(&exp)
            .unwrap(),
        Some(checkpoint::checkpoint_dir(&exp, 2))
    );
    assert_eq!(
        Resume::Latest.resolve(&exp).unwrap(),
        Some(checkpoint::checkpoint_dir(&exp, 4))
    );
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = Resume::Path(empty.clone())
        .resolve(&exp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty") && e.contains("checkpoint"), "{e}");
    // A new experiment started from the reference-style folder continues its newest state.
    let exp2 = root.join("exp2");
    let mut c2 = loop_cfg(&exp2, 6, 2);
    c2.resume = Resume::Path(exp.clone());
    let out = run_single(&mut Lin::new(0.1), set, &c2).unwrap();
    assert_eq!(out.resumed_from, Some(checkpoint::checkpoint_dir(&exp, 4)));
    assert_eq!(out.step, 6);
}

/// Resuming from an older checkpoint moves the newer ones (another timeline) aside, so
/// `latest` never picks them, even when the resumed run dies before its next checkpoint.
#[test]
fn resuming_an_older_checkpoint_sets_the_abandoned_timeline_aside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let exp = root.join("exp");
    let mut c = loop_cfg(&exp, 6, 2);
    c.checkpoints_total_limit = 10;
    run_single(&mut Lin::new(0.1), set.clone(), &c).unwrap();
    let first_run = checkpoint_bits(&checkpoint::checkpoint_dir(&exp, 6));
    // Resume from step 3; the step after fails before any new checkpoint.
    let mut m = Lin::new(0.1);
    m.fail_grads_at = Some(3);
    let mut c3 = c.clone();
    c3.resume = Resume::Path(checkpoint::checkpoint_dir(&exp, 3));
    assert!(run_single(&mut m, set.clone(), &c3).is_err());
    let steps: Vec<u64> = checkpoint::list_checkpoints(&exp)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert_eq!(
        checkpoint::latest(&exp).unwrap(),
        Some(checkpoint::checkpoint_dir(&exp, 3))
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(&exp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("abandoned-3-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let moved: Vec<u64> = checkpoint::list_checkpoints(&aside[0])
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(moved, vec![4, 5, 6]);
    // `latest` now continues from 3 and, the run being deterministic, ends where the first did.
    let mut cl = c.clone();
    cl.resume = Resume::Latest;
    let out = run_single(&mut Lin::new(0.1), set, &cl).unwrap();
    assert_eq!(out.resumed_from, Some(checkpoint::checkpoint_dir(&exp, 3)));
    assert_eq!(
        checkpoint_bits(&checkpoint::checkpoint_dir(&exp, 6)),
        first_run
    );
}

/// `save_model_epoch_interval` + `no_save`: after every N-th epoch (and when the run ends inside
/// an epoch that is due), the four networks as `{name}-{step}.safetensors`, the newest 3 kept.
#[test]
fn networks_are_saved_every_n_epochs_keeping_three() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 6);
    let set = open_set(root);
    let per_epoch = (set.len() / 2) as u64;
    assert!(per_epoch >= 2, "{} usable pairs", set.len());
    let max = 3 * per_epoch + 1;
    let saved = |interval: u64, no_save: bool| -> (PathBuf, Vec<u64>) {
        let exp = root.join(format!("exp-{interval}-{no_save}"));
        let mut c = loop_cfg(&exp, max, 2);
        c.grad_accum = 1;
        c.save_model_epoch_interval = if no_save { 0 } else { interval };
        run_single(&mut Lin::new(0.1), set.clone(), &c).unwrap();
        let steps: Vec<u64> = checkpoint::epoch_saves(&exp, "denoising_unet")
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        (exp, steps)
    };
    // Epochs end after steps per_epoch, 2 per_epoch, 3 per_epoch; the run ends in epoch 4.
    let (exp, every) = saved(1, false);
    assert_eq!(
        every,
        vec![2 * per_epoch, 3 * per_epoch, max],
        "kept the newest 3"
    );
    for net in Net::ALL {
        let stem = checkpoint::epoch_stem(net);
        let f = exp.join(format!("{stem}-{}.safetensors", 3 * per_epoch));
        let t = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
        let c = candle_core::safetensors::load(
            checkpoint::checkpoint_dir(&exp, 3 * per_epoch).join(net.file_name()),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            t["w"].to_vec1::<f32>().unwrap(),
            c["w"].to_vec1::<f32>().unwrap(),
            "{stem}"
        );
    }
    let (_, second) = saved(2, false);
    assert_eq!(second, vec![2 * per_epoch, max]);
    let (_, none) = saved(1, true);
    assert!(none.is_empty(), "{none:?}");
}

/// `mcld train --dry-run` checks the config, data, weights and folder and prints the plan,
/// training nothing; a missing weight file stops it naming the file.
#[test]
fn dry_run_checks_everything_and_prints_the_plan_without_training() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(&root.join("data"), 6);
    let cfg_path = mcld::presets::tree::write_tiny_train_base(root, &root.join("data")).unwrap();
    let out = assert_cmd::Command::cargo_bin("mcld")
        .unwrap()
        .args(["train", "--dry-run", "--config"])
        .arg(&cfg_path)
        .args(["--max-train-steps", "10"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    println!("{text}");
    for want in [
        "dry run",
        "pairs listed",
        "sampled pairs decode",
        "10 steps",
        "lr (constant",
        "reference_unet: trains",
        "checkpoints: every",
        "memory: about",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    let cfg = mcld::config::TrainConfig::load(&cfg_path).unwrap();
    let exp = cfg.output_dir.join(&cfg.exp_name);
    assert!(checkpoint::list_checkpoints(&exp).unwrap().is_empty());
    assert!(!exp.join(mcld::train::run::train_loop::LOG_FILE).exists());
    let plan = mcld::train::run::dry_run::dry_run(&mcld::train::run::cmd::TrainCommand {
        config: cfg_path.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(plan.pairs_usable, open_set(&root.join("data")).len());
    assert_eq!(plan.decoded_ok, plan.decoded_tried);
    assert_eq!(plan.effective_batch, cfg.data.train_bs);
    assert!(plan.nets["reference_unet"].frozen_tensors > 0);
    assert_eq!(plan.nets["denoising_unet"].frozen_tensors, 0);
    // A missing weight file is named.
    std::fs::remove_file(&cfg.controlnet_openpose_path).unwrap();
    let out = assert_cmd::Command::cargo_bin("mcld")
        .unwrap()
        .args(["train", "--dry-run", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("control_v11p_sd15_seg"), "{err}");
}
