//! What `prepare` did, per stage: written to `prepare_report.json` and printed, so that a long
//! run's skips and failures can be checked afterwards rather than scrolled past.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;

/// One item (image, file) that a stage could not produce, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub path: PathBuf,
    pub reason: String,
}

impl Failure {
    pub fn new(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Outcome of a stage as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Every item was produced or already there.
    Ok,
    /// Some items failed; the others are done.
    Partial,
    /// The stage could not run at all (see `error`).
    Failed,
    /// This build cannot do the stage yet; `missing`/`notes` say what is left to do.
    NotBuilt,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    pub status: StageStatus,
    /// Items produced by this run.
    pub done: usize,
    /// Items already present (earlier run or user-supplied), left untouched.
    pub skipped: usize,
    pub failed: Vec<Failure>,
    /// Names or paths the stage needed and did not find.
    pub missing: Vec<String>,
    /// Stage-level error, when `status` is `failed` or `not_built`.
    pub error: Option<String>,
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl StageReport {
    pub fn new(stage: &str) -> Self {
        Self {
            stage: stage.to_owned(),
            status: StageStatus::Ok,
            done: 0,
            skipped: 0,
            failed: Vec::new(),
            missing: Vec::new(),
            error: None,
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    /// A stage that stopped before doing any item.
    pub fn failed(stage: &str, error: String) -> Self {
        let mut r = Self::new(stage);
        r.status = StageStatus::Failed;
        r.error = Some(error);
        r
    }

    /// Sets `status` from the counts unless the stage already set a stage-level one.
    pub fn settle(&mut self) {
        if self.status == StageStatus::Ok && !self.failed.is_empty() {
            self.status = StageStatus::Partial;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareReport {
    pub dataset_root: PathBuf,
    /// `K/N` when the run did one shard of the photos (`--shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    pub stages: Vec<StageReport>,
}

impl PrepareReport {
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.stage == name)
    }

    /// True when no stage failed or left items failed (not-built stages do not count).
    pub fn all_ok(&self) -> bool {
        self.stages
            .iter()
            .all(|s| matches!(s.status, StageStatus::Ok | StageStatus::NotBuilt))
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| crate::Error::msg(format!("cannot serialise the report: {e}")))?;
        crate::fsutil::write_atomic(path, &text)
    }

    /// Human summary: one line per stage, then up to `max_items` failures/missing per stage.
    pub fn summary(&self, max_items: usize) -> String {
        let mut s = String::new();
        match &self.shard {
            Some(k) => {
                let _ = writeln!(s, "prepare {} (shard {k}):", self.dataset_root.display());
            }
            None => {
                let _ = writeln!(s, "prepare {}:", self.dataset_root.display());
            }
        }
        for st in &self.stages {
            let status = match st.status {
                StageStatus::Ok => "ok",
                StageStatus::Partial => "partial",
                StageStatus::Failed => "FAILED",
                StageStatus::NotBuilt => "not built",
            };
            let _ = writeln!(
                s,
                "  {:<9} {:<9} done {:>6}  skipped {:>6}  failed {:>6}  missing {:>6}  ({:.1}s)",
                st.stage,
                status,
                st.done,
                st.skipped,
                st.failed.len(),
                st.missing.len(),
                st.seconds
            );
            if let Some(e) = &st.error {
                let _ = writeln!(s, "      error: {e}");
            }
            for n in &st.notes {
                let _ = writeln!(s, "      note: {n}");
            }
            for f in st.failed.iter().take(max_items) {
                let _ = writeln!(s, "      failed: {}: {}", f.path.display(), f.reason);
            }
            if st.failed.len() > max_items {
                let _ = writeln!(s, "      ... {} more failures", st.failed.len() - max_items);
            }
            for m in st.missing.iter().take(max_items) {
                let _ = writeln!(s, "      missing: {m}");
            }
            if st.missing.len() > max_items {
                let _ = writeln!(s, "      ... {} more missing", st.missing.len() - max_items);
            }
        }
        s
    }
}
