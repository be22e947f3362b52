//! The job queue: one generation runs at a time on the worker thread, the others wait in a
//! bounded queue. Each job keeps the log of everything that happened to it, so a browser that
//! subscribes late (or reconnects) still sees every event, in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

use super::engine::{JobOutput, JobRequest};

/// Finished jobs kept with their images, newest last; older ones are forgotten.
const KEEP_FINISHED: usize = 32;

/// One thing that happened to a job, as the page receives it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Event {
    /// Waiting; `position` 1 runs next.
    Queued {
        position: usize,
    },
    /// Running: a preparation phase, or step `step` of `steps` of the sampler.
    Running {
        phase: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        steps: Option<usize>,
        elapsed: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        eta: Option<f64>,
    },
    Done {
        result: String,
        pose: String,
        pose_iuv: String,
        command: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        command_note: Option<String>,
        seconds: f64,
        untrained: bool,
    },
    Failed {
        message: String,
    },
    Cancelled,
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Done { .. } | Event::Failed { .. } | Event::Cancelled
        )
    }
}

pub struct Job {
    pub id: String,
    request: Mutex<Option<JobRequest>>,
    events: Mutex<Vec<Event>>,
    /// The number of events so far; the event streams wait on it.
    count: watch::Sender<usize>,
    cancel: AtomicBool,
    output: Mutex<Option<Arc<JobOutput>>>,
    pub started: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding a lock must not take every later request down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Job {
    fn new(id: String, request: JobRequest) -> Self {
        Self {
            id,
            request: Mutex::new(Some(request)),
            events: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            cancel: AtomicBool::new(false),
            output: Mutex::new(None),
            started: Mutex::new(None),
        }
    }

    pub fn push(&self, e: Event) {
        let mut ev = lock(&self.events);
        if ev.last().is_some_and(|l| l.is_terminal()) {
            return;
        }
        ev.push(e);
        self.count.send_replace(ev.len());
    }

    pub fn event(&self, i: usize) -> Option<Event> {
        lock(&self.events).get(i).cloned()
    }

    pub fn last_event(&self) -> Option<Event> {
        lock(&self.events).last().cloned()
    }

    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    pub fn is_finished(&self) -> bool {
        self.last_event().is_some_and(|e| e.is_terminal())
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The request, handed to the worker once.
    pub fn take_request(&self) -> Option<JobRequest> {
        lock(&self.request).take()
    }

    pub fn set_output(&self, o: JobOutput) {
        *lock(&self.output) = Some(Arc::new(o));
    }

    pub fn output(&self) -> Option<Arc<JobOutput>> {
        lock(&self.output).clone()
    }
}

/// What a cancel request did.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Taken out of the queue.
    Dequeued,
    /// Running: it stops at its next step.
    Requested,
    AlreadyFinished,
    NotFound,
}

#[derive(Default)]
struct Inner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    closed: bool,
}

pub struct Queue {
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Jobs that may wait behind the running one.
    pub max_waiting: usize,
}

/// The queue is full: the request is refused, nothing is kept.
#[derive(Debug)]
pub struct QueueFull(pub usize);

impl Queue {
    pub fn new(max_waiting: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            max_waiting,
        }
    }

    fn new_id(inner: &Inner) -> String {
        loop {
            let id = format!("{:016x}", rand::random::<u64>());
            if !inner.jobs.contains_key(&id) {
                return id;
            }
        }
    }

    pub fn submit(&self, request: JobRequest) -> Result<Arc<Job>, QueueFull> {
        let mut inner = lock(&self.inner);
        if inner.waiting.len() >= self.max_waiting {
            return Err(QueueFull(self.max_waiting));
        }
        let job = Arc::new(Job::new(Self::new_id(&inner), request));
        inner.waiting.push_back(job.clone());
        inner.jobs.insert(job.id.clone(), job.clone());
        job.push(Event::Queued {
            position: inner.waiting.len(),
        });
        self.wake.notify_all();
        Ok(job)
    }

    /// Blocks until a job is waiting (it becomes the running one), or returns `None` once the
    /// queue is closed.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.closed {
                return None;
            }
            if let Some(job) = inner.waiting.pop_front() {
                inner.running = Some(job.clone());
                Self::announce_positions(&inner);
                return Some(job);
            }
            inner = self.wake.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn announce_positions(inner: &Inner) {
        for (i, j) in inner.waiting.iter().enumerate() {
            j.push(Event::Queued { position: i + 1 });
        }
    }

    fn retire(inner: &mut Inner, id: &str) {
        inner.finished.push_back(id.to_string());
        while inner.finished.len() > KEEP_FINISHED {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }

    /// The running job is over (its last event already pushed).
    pub fn finish(&self, job: &Job) {
        let mut inner = lock(&self.inner);
        if inner.running.as_ref().is_some_and(|r| r.id == job.id) {
            inner.running = None;
        }
        Self::retire(&mut inner, &job.id);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.inner).jobs.get(id).cloned()
    }

    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let mut inner = lock(&self.inner);
        let Some(job) = inner.jobs.get(id).cloned() else {
            return CancelOutcome::NotFound;
        };
        if job.is_finished() {
            return CancelOutcome::AlreadyFinished;
        }
        if let Some(i) = inner.waiting.iter().position(|j| j.id == id) {
            inner.waiting.remove(i);
            job.take_request();
            job.push(Event::Cancelled);
            Self::announce_positions(&inner);
            Self::retire(&mut inner, id);
            return CancelOutcome::Dequeued;
        }
        job.cancel.store(true, Ordering::Relaxed);
        CancelOutcome::Requested
    }

    /// (waiting, running)
    pub fn counts(&self) -> (usize, bool) {
        let inner = lock(&self.inner);
        (inner.waiting.len(), inner.running.is_some())
    }

    /// Stops the worker once the running job is over; waiting jobs are dropped.
    pub fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::mcld::SampleOptions;
    use crate::serve::engine::{PoseInput, Upload};

    fn req() -> JobRequest {
        let up = Upload {
            name: "a.png".into(),
            image: image::RgbImage::new(1, 1),
            digest: String::new(),
        };
        JobRequest {
            source: up.clone(),
            pose: PoseInput::Iuv(up),
            texture: None,
            face: None,
            face_from: None,
            face_emb: None,
            garments: vec![],
            seed: 0,
            options: SampleOptions::default(),
        }
    }

    #[test]
    fn positions_move_up_and_the_queue_is_bounded() {
        let q = Queue::new(2);
        let a = q.submit(req()).unwrap();
        let b = q.submit(req()).unwrap();
        assert_eq!(b.last_event(), Some(Event::Queued { position: 2 }));
        assert!(q.submit(req()).is_err());
        let first = q.next().unwrap();
        assert_eq!(first.id, a.id);
        assert_eq!(b.last_event(), Some(Event::Queued { position: 1 }));
        let c = q.submit(req()).unwrap();
        assert_eq!(q.cancel(&b.id), CancelOutcome::Dequeued);
        assert_eq!(b.last_event(), Some(Event::Cancelled));
        assert_eq!(c.last_event(), Some(Event::Queued { position: 1 }));
        assert_eq!(q.cancel(&a.id), CancelOutcome::Requested);
        assert!(a.cancel_requested());
        a.push(Event::Cancelled);
        q.finish(&a);
        assert_eq!(q.cancel(&a.id), CancelOutcome::AlreadyFinished);
        assert_eq!(q.cancel("nope"), CancelOutcome::NotFound);
        assert_eq!(q.counts(), (1, false));
    }
}
