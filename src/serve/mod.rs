//! `mcld serve`: a page on localhost to re-pose and dress people, on the networks of
//! `mcld infer` loaded once and kept. One binary, no Python, nothing fetched from the internet:
//! the page (HTML, CSS, JS) is built into the binary.
//!
//! Threads: the HTTP side runs on a small tokio runtime and only decodes uploads and moves
//! bytes; one worker thread owns the networks and runs the jobs one at a time, in queue order.

pub mod engine;
pub mod gallery;
pub mod http;
pub mod jobs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::pipeline::mcld::{Phase, Progress};
use crate::{Error, Result};
use engine::{Engine, EngineConfig};
use gallery::Gallery;
use jobs::{Event, Job, Queue};

/// Everything `mcld serve` needs, as plain values.
#[derive(Debug, Clone)]
pub struct ServeRequest {
    /// Address to listen on (anything but loopback prints a warning).
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    pub ckpt_dir: PathBuf,
    pub config_path: PathBuf,
    pub pretrained_dir: PathBuf,
    /// As given on the command line (`cpu`, `cuda:0`; `f32`, `bf16`), for the reproducing line.
    pub device: String,
    pub dtype: String,
    /// The pose gallery; `None`: the config's dataset `test_densepose/` when it exists.
    pub poses: Option<PathBuf>,
    /// Jobs that may wait behind the running one.
    pub max_queue: usize,
    /// Largest request body, in bytes.
    pub max_upload: usize,
    /// Full-size networks on random weights instead of checkpoints.
    pub random_weights: bool,
}

/// Where the networks are.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ModelState {
    Loading,
    Ready {
        load_seconds: f64,
        untrained: bool,
        default_steps: usize,
        default_guidance: f64,
    },
    Failed {
        message: String,
    },
}

/// What the HTTP handlers and the worker share.
pub struct Shared {
    pub queue: Queue,
    pub model: Mutex<ModelState>,
    pub gallery: Option<Gallery>,
    pub max_upload: usize,
    /// Network loads so far and generations finished: a second generation adds no load.
    pub loads: std::sync::atomic::AtomicUsize,
    pub generations: std::sync::atomic::AtomicUsize,
    pub started: Instant,
    pub device: String,
    pub dtype: String,
    /// Host names a request may be addressed to (loopback binding: DNS rebinding guard).
    pub allowed_hosts: Option<Vec<String>>,
}

/// Resident memory of this process in MiB (Linux; `None` elsewhere).
pub fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn is_loopback(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The default gallery: the config's `test_densepose/`, when the config reads and it exists.
fn default_poses(a: &ServeRequest) -> Option<PathBuf> {
    let cfg = crate::config::TrainConfig::load(&a.config_path).ok()?;
    let dir = cfg.data.root_dir.join("test_densepose");
    dir.is_dir().then_some(dir)
}

/// `mcld serve`.
pub fn run(a: &ServeRequest) -> Result<()> {
    // Settings are checked before anything is loaded or bound.
    crate::device::parse_device(&a.device)?;
    crate::device::parse_dtype(&a.dtype)?;
    if a.max_upload == 0 {
        return Err(Error::msg("the upload limit must be at least 1 MB"));
    }
    let poses = match &a.poses {
        Some(p) => Some(p.clone()),
        None => default_poses(a),
    };
    let gallery = match &poses {
        Some(p) => {
            let g = Gallery::open(p)?;
            eprintln!("pose gallery: {} images in {}", g.len(), g.root().display());
            Some(g)
        }
        None => {
            eprintln!(
                "no pose gallery (--poses DIR, or a config whose dataset has test_densepose/): \
                 the page takes uploaded poses only"
            );
            None
        }
    };
    let loopback = is_loopback(&a.host);
    let shared = Arc::new(Shared {
        queue: Queue::new(a.max_queue),
        model: Mutex::new(ModelState::Loading),
        gallery,
        max_upload: a.max_upload,
        loads: Default::default(),
        generations: Default::default(),
        started: Instant::now(),
        device: a.device.clone(),
        dtype: a.dtype.clone(),
        allowed_hosts: None,
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::msg(format!("cannot start the async runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((a.host.as_str(), a.port)))
        .map_err(|e| Error::msg(format!("cannot listen on {}:{}: {e}", a.host, a.port)))?;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::msg(format!("listening socket: {e}")))?;
    let mut shared = shared;
    if loopback {
        let port = addr.port();
        Arc::get_mut(&mut shared)
            .expect("not shared yet")
            .allowed_hosts = Some(
            ["127.0.0.1", "localhost", "[::1]"]
                .iter()
                .flat_map(|h| [format!("{h}:{port}"), h.to_string()])
                .collect(),
        );
    } else {
        eprintln!(
            "WARNING: listening on {addr}, not on a loopback address: anyone who can reach this \
             machine can open the page, upload photos and run generations (there is no login). \
             Use the default --host 127.0.0.1 unless that is what you want."
        );
    }

    let cfg = EngineConfig {
        ckpt_dir: a.ckpt_dir.clone(),
        config_path: a.config_path.clone(),
        pretrained_dir: a.pretrained_dir.clone(),
        device: a.device.clone(),
        dtype: a.dtype.clone(),
        random_weights: a.random_weights,
    };
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("mcld-serve-worker".into())
            .spawn(move || worker(shared, cfg))
            .map_err(|e| Error::msg(format!("cannot start the worker thread: {e}")))?
    };

    let shown = if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}/", addr.port())
    } else {
        format!("http://{addr}/")
    };
    // Tests and scripts read this line for the address (with --port 0).
    println!("mcld serve: listening on {shown} (the networks load in the background)");
    let app = http::router(shared.clone());
    let served = rt.block_on(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("mcld serve: stopping");
            })
            .await
    });
    shared.queue.close();
    // A running generation is not waited for: the process exits with it.
    drop(worker);
    served.map_err(|e| Error::msg(format!("server: {e}")))
}

/// Reports the sampler's progress as job events; a cancel request stops the run at the next
/// phase or step.
struct JobProgress<'a> {
    job: &'a Job,
    start: Instant,
    sample_start: Option<Instant>,
}

impl JobProgress<'_> {
    fn check(&self) -> Result<()> {
        if self.job.cancel_requested() {
            Err(Error::msg("cancelled"))
        } else {
            Ok(())
        }
    }

    fn running(&self, phase: &str) -> Result<()> {
        self.job.push(Event::Running {
            phase: phase.into(),
            step: None,
            steps: None,
            elapsed: self.start.elapsed().as_secs_f64(),
            eta: None,
        });
        self.check()
    }
}

impl Progress for JobProgress<'_> {
    fn phase(&mut self, phase: Phase) -> Result<()> {
        let what = match phase {
            Phase::Condition => "encoding the source and texture (CLIP, VAE)",
            Phase::Sample => {
                self.sample_start = Some(Instant::now());
                "sampling"
            }
            Phase::Decode => "decoding",
        };
        self.running(what)
    }

    fn step(&mut self, i: usize, n: usize) -> Result<()> {
        let per_step = self
            .sample_start
            .map(|t| t.elapsed().as_secs_f64() / i.max(1) as f64);
        self.job.push(Event::Running {
            phase: "sampling".into(),
            step: Some(i),
            steps: Some(n),
            elapsed: self.start.elapsed().as_secs_f64(),
            // The decode after the last step is not counted: it is one more step's worth or so.
            eta: per_step.map(|s| s * (n - i) as f64),
        });
        self.check()
    }
}

fn set_model(shared: &Shared, m: ModelState) {
    *shared.model.lock().unwrap_or_else(|p| p.into_inner()) = m;
}

/// The worker thread: loads the networks, then runs jobs until the queue closes.
fn worker(shared: Arc<Shared>, cfg: EngineConfig) {
    use std::sync::atomic::Ordering;
    let t = Instant::now();
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Engine::load(cfg)))
        .unwrap_or_else(|_| Err(Error::msg("loading the networks panicked")));
    let mut engine = match loaded {
        Ok(e) => {
            let (steps, guidance) = e.defaults();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "mcld serve: networks loaded in {secs:.1}s ({}){}",
                e.pipeline.precision.describe(),
                if e.untrained {
                    "; UNTRAINED demo weights: results are noise"
                } else {
                    ""
                }
            );
            set_model(
                &shared,
                ModelState::Ready {
                    load_seconds: secs,
                    untrained: e.untrained,
                    default_steps: steps,
                    default_guidance: guidance,
                },
            );
            shared
                .loads
                .store(e.loads.load(Ordering::Relaxed), Ordering::Relaxed);
            Some(e)
        }
        Err(e) => {
            eprintln!("mcld serve: the networks failed to load: {e}");
            set_model(
                &shared,
                ModelState::Failed {
                    message: e.to_string(),
                },
            );
            None
        }
    };
    while let Some(job) = shared.queue.next() {
        let Some(request) = job.take_request() else {
            shared.queue.finish(&job);
            continue;
        };
        let Some(engine) = engine.as_mut() else {
            job.push(Event::Failed {
                message: "the networks failed to load (see the server's log)".into(),
            });
            shared.queue.finish(&job);
            continue;
        };
        let start = Instant::now();
        *job.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(start);
        let mut progress = JobProgress {
            job: &job,
            start,
            sample_start: None,
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            progress.running("preparing the inputs")?;
            let p = JobProgress {
                job: &job,
                start,
                sample_start: None,
            };
            engine.run(&request, &mut |what: &str| p.running(what), &mut progress)
        }))
        .unwrap_or_else(|_| Err(Error::msg("internal error: the generation panicked")));
        shared
            .loads
            .store(engine.loads.load(Ordering::Relaxed), Ordering::Relaxed);
        match ran {
            Ok(out) => {
                let id = &job.id;
                let ev = Event::Done {
                    result: format!("/api/jobs/{id}/result.png"),
                    pose: format!("/api/jobs/{id}/pose.png"),
                    pose_iuv: format!("/api/jobs/{id}/pose_iuv.png"),
                    command: out.command.clone(),
                    command_note: out.command_note.clone(),
                    seconds: start.elapsed().as_secs_f64(),
                    untrained: engine.untrained,
                };
                job.set_output(out);
                shared.generations.fetch_add(1, Ordering::Relaxed);
                job.push(ev);
            }
            Err(_) if job.cancel_requested() => job.push(Event::Cancelled),
            Err(e) => job.push(Event::Failed {
                message: e.to_string(),
            }),
        }
        shared.queue.finish(&job);
    }
}
