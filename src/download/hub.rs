//! Hub files through `hf-hub`'s blocking client: its cache layout (`blobs/`, `snapshots/`,
//! `refs/`) is the one `huggingface_hub` shares, so files other tools fetched are reused, and
//! its `.part` files resume an interrupted transfer with a `Range` request.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

use super::{place, sha256_file, Failure, FileBar, HubSettings};

pub(super) fn resolve_url(endpoint: &str, repo: &str, file: &str) -> String {
    format!("{endpoint}/{repo}/resolve/main/{file}")
}

pub(super) struct Hub {
    settings: HubSettings,
    cache: Cache,
    api: Option<Api>,
}

/// hf-hub calls `init` before each transfer attempt, then `update` once with the length of the
/// part already on disk (resumed, not transferred), then with each chunk received.
struct HubProgress<'a> {
    bar: &'a mut FileBar,
    resumed_next: bool,
}

impl<'a> HubProgress<'a> {
    fn new(bar: &'a mut FileBar) -> Self {
        Self {
            bar,
            resumed_next: false,
        }
    }
}

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.bar.set_total(size as u64);
        self.bar.restart_at(0);
        self.resumed_next = true;
    }
    fn update(&mut self, size: usize) {
        if std::mem::take(&mut self.resumed_next) {
            self.bar.restart_at(size as u64);
        } else {
            self.bar.inc(size as u64);
        }
    }
    fn finish(&mut self) {}
}

impl Hub {
    pub(super) fn new(settings: &HubSettings) -> crate::Result<Self> {
        let cache = Cache::new(settings.cache_dir.clone());
        let api = if settings.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(cache.clone())
                .with_endpoint(settings.endpoint.clone())
                .with_token(settings.token.clone())
                .with_progress(false)
                .with_user_agent("mcld", env!("CARGO_PKG_VERSION"))
                .build()
                .map_err(|e| crate::Error::msg(format!("Hugging Face client: {e}")))?;
            Some(api)
        };
        Ok(Self {
            settings: settings.clone(),
            cache,
            api,
        })
    }

    /// Places the first of `choices` (a file of the repo, where it goes) that the cache or the
    /// repo has.
    pub(super) fn fetch(
        &self,
        repo: &str,
        choices: &[(&str, PathBuf)],
        bar: &mut FileBar,
    ) -> Result<PathBuf, Failure> {
        let url = |file: &str| resolve_url(&self.settings.endpoint, repo, file);
        let fail = |file: &str, reason: String| Failure {
            url: url(file),
            reason,
        };
        let first = choices.first().map(|c| c.0).unwrap_or_default();
        let cached = self.cache.model(repo.to_string());
        for (c, dest) in choices {
            if let Some(p) = cached.get(c) {
                place(&p, dest).map_err(|e| {
                    fail(
                        c,
                        format!("cannot place {} from the cache: {e}", dest.display()),
                    )
                })?;
                return Ok(dest.clone());
            }
        }
        let Some(api) = &self.api else {
            return Err(fail(
                first,
                format!(
                    "not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                    self.settings.cache_dir.display()
                ),
            ));
        };
        let remote = api.repo(Repo::model(repo.to_string()));
        for (c, dest) in choices {
            match remote.download_with_progress(c, HubProgress::new(bar)) {
                Ok(pointer) => {
                    verify_lfs(&pointer).map_err(|r| fail(c, r))?;
                    place(&pointer, dest)
                        .map_err(|e| fail(c, format!("cannot place {}: {e}", dest.display())))?;
                    return Ok(dest.clone());
                }
                Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => {
                    continue
                }
                Err(e) => return Err(fail(c, describe(e, &self.settings.cache_dir))),
            }
        }
        Err(fail(
            first,
            format!(
                "HTTP 404: the repo has none of {} (on branch main)",
                choices.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
            ),
        ))
    }

    /// The paths of every file in the repo (branch main): the Hub's repo info, or offline the
    /// cached snapshot of main.
    pub(super) fn list(&self, repo: &str) -> Result<Vec<String>, Failure> {
        let fail = |reason: String| Failure {
            url: info_url(&self.settings.endpoint, repo),
            reason,
        };
        let Some(api) = &self.api else {
            return self.cached_listing(repo).ok_or_else(|| {
                fail(format!(
                    "no snapshot of {repo} in the Hugging Face cache {} and HF_HUB_OFFLINE is \
                     set, so its files cannot be listed",
                    self.settings.cache_dir.display()
                ))
            });
        };
        let info = api
            .repo(Repo::model(repo.to_string()))
            .info()
            .map_err(|e| fail(describe(e, &self.settings.cache_dir)))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// Files of the cached snapshot `refs/main` points to (as hf-hub and huggingface_hub lay
    /// it out: `models--OWNER--NAME/{refs,snapshots}`).
    fn cached_listing(&self, repo: &str) -> Option<Vec<String>> {
        let dir = self
            .settings
            .cache_dir
            .join(format!("models--{}", repo.replace('/', "--")));
        let commit = std::fs::read_to_string(dir.join("refs/main")).ok()?;
        let snap = dir.join("snapshots").join(commit.trim());
        let files: Vec<String> = walkdir::WalkDir::new(&snap)
            .follow_links(true)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| {
                let rel = e.path().strip_prefix(&snap).ok()?;
                Some(rel.to_string_lossy().replace('\\', "/"))
            })
            .collect();
        (!files.is_empty()).then_some(files)
    }
}

/// The Hub API address of a model repo's info (which lists its files).
pub(super) fn info_url(endpoint: &str, repo: &str) -> String {
    format!("{endpoint}/api/models/{repo}/revision/main")
}

fn describe(e: ApiError, cache: &Path) -> String {
    match e {
        ApiError::RequestError(e) => match *e {
            // The Hub answers 401, not 404, for a repo that does not exist.
            ureq::Error::Status(401, _) => "HTTP 401: the repo is gated, private, or the repo id \
                 is wrong (the Hub answers 401 for a repo that does not exist); for a gated or \
                 private repo set HF_TOKEN to a token of an account that has access"
                .to_string(),
            ureq::Error::Status(403, _) => "HTTP 403: the repo is gated or private; set HF_TOKEN \
                 to a token of an account that has accepted its terms"
                .to_string(),
            ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
            other => other.to_string(),
        },
        ApiError::IoError(e) => format!(
            "transfer interrupted ({e}); the partial file stays in {} and the next run resumes it",
            cache.display()
        ),
        other => other.to_string(),
    }
}

/// The Hub names an LFS blob by its SHA-256 (the ETag): check it, and drop a blob that does
/// not match so that the next run fetches it again.
fn verify_lfs(pointer: &Path) -> Result<(), String> {
    let blob = std::fs::canonicalize(pointer)
        .map_err(|e| format!("cached file {}: {e}", pointer.display()))?;
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let got = sha256_file(&blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    if got.eq_ignore_ascii_case(&etag) {
        return Ok(());
    }
    let _ = std::fs::remove_file(pointer);
    let _ = std::fs::remove_file(&blob);
    Err(format!(
        "sha256 mismatch: the file has {got}, the Hub's ETag says {etag} (removed from the cache)"
    ))
}
