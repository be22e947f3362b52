//! Plain HTTP(S) files (model zoos, GitHub releases, PyPI): a `.NAME.part` beside the
//! destination grows across runs (resumed with `Range`, restarted when the server will not
//! resume), is checked, then renamed; zips are unpacked member by member the same way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sources::{name_hash_prefix, Check, Member, Size};
use super::{sha256_file, temp_beside, Failure, FileBar};

pub(super) struct Http {
    agent: ureq::Agent,
    mirror: Option<String>,
}

/// `bytes START-END/TOTAL` -> (START, TOTAL when stated).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

impl Http {
    pub(super) fn new(mirror: Option<String>) -> Self {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("mcld/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent,
            mirror: mirror.map(|m| m.trim_end_matches('/').to_string()),
        }
    }

    /// `https://HOST/PATH` -> `MIRROR/HOST/PATH` when a mirror is set.
    pub(super) fn url_for(&self, url: &str) -> String {
        match &self.mirror {
            Some(m) => {
                let rest = url.split_once("://").map_or(url, |(_, r)| r);
                format!("{m}/{rest}")
            }
            None => url.to_string(),
        }
    }

    fn refuse_offline(&self, url: &str, offline: bool) -> Result<(), Failure> {
        if offline {
            return Err(Failure {
                url: url.to_string(),
                reason: "HF_HUB_OFFLINE is set, so nothing is fetched".into(),
            });
        }
        Ok(())
    }

    /// One plain file to `dest`, checked before it gets its name.
    pub(super) fn fetch_file(
        &self,
        url: &str,
        (check, size): (Check, Size),
        dest: &Path,
        offline: bool,
        bar: &mut FileBar,
    ) -> Result<(), Failure> {
        let from = self.url_for(url);
        self.refuse_offline(&from, offline)?;
        let fail = |reason: String| Failure {
            url: from.clone(),
            reason,
        };
        let part = temp_beside(dest, "part");
        self.transfer(&from, &part, bar).map_err(fail)?;
        if let Err(r) = check_file(&part, check, url).and_then(|()| check_size(&part, size)) {
            let _ = std::fs::remove_file(&part);
            return Err(fail(r));
        }
        std::fs::rename(&part, dest)
            .map_err(|e| fail(format!("cannot rename {} into place: {e}", part.display())))
    }

    /// A zip's wanted members into `root`; the archive itself is deleted afterwards.
    pub(super) fn fetch_zip(
        &self,
        url: &str,
        check: Check,
        members: &[Member],
        root: &Path,
        offline: bool,
        bar: &mut FileBar,
    ) -> Result<Vec<PathBuf>, Failure> {
        let from = self.url_for(url);
        self.refuse_offline(&from, offline)?;
        let fail = |reason: String| Failure {
            url: from.clone(),
            reason,
        };
        let name = url.rsplit('/').next().unwrap_or("download.zip");
        let part = temp_beside(&root.join(name), "part");
        self.transfer(&from, &part, bar).map_err(fail)?;
        let res = check_file(&part, check, url).and_then(|()| extract(&part, members, root));
        // Checked or not, a finished archive is not kept: a bad one is fetched anew next time.
        let _ = std::fs::remove_file(&part);
        res.map_err(fail)
    }

    /// Completes `part` from `url`: resumes from its length when the server honours `Range`,
    /// else starts over. An interrupted transfer keeps `part` for the next run.
    fn transfer(&self, url: &str, part: &Path, bar: &mut FileBar) -> Result<(), String> {
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        for attempt in 0..2 {
            let have = part.metadata().map(|m| m.len()).unwrap_or(0);
            // Byte counts and resume offsets are of the file itself, never of a compressed body.
            let mut req = self.agent.get(url).set("Accept-Encoding", "identity");
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                // The part is as long as the file or longer: start over.
                Err(ureq::Error::Status(416, _)) if have > 0 && attempt == 0 => {
                    let _ = std::fs::remove_file(part);
                    continue;
                }
                Err(ureq::Error::Status(code, r)) => {
                    return Err(format!("HTTP {code} {}", r.status_text()))
                }
                Err(e) => return Err(e.to_string()),
            };
            let (offset, total) = if resp.status() == 206 {
                match resp.header("Content-Range").and_then(parse_content_range) {
                    Some((start, total)) if start == have => (start, total),
                    _ if attempt == 0 => {
                        let _ = std::fs::remove_file(part);
                        continue;
                    }
                    _ => return Err("the server answered with a range it was not asked for".into()),
                }
            } else {
                let len = resp
                    .header("Content-Length")
                    .and_then(|v| v.trim().parse().ok());
                (0, len)
            };
            let file = if offset == 0 {
                std::fs::File::create(part)
            } else {
                std::fs::OpenOptions::new().append(true).open(part)
            }
            .map_err(|e| format!("{}: {e}", part.display()))?;
            if let Some(t) = total {
                bar.set_total(t);
            }
            bar.restart_at(offset);
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut r = resp.into_reader();
            let mut buf = vec![0u8; 1 << 18];
            let mut got = offset;
            let kept = |got: u64| {
                format!(
                    "after {got}{} bytes; {} is kept and the next run resumes it",
                    total.map(|t| format!(" of {t}")).unwrap_or_default(),
                    part.display()
                )
            };
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = w.flush();
                        return Err(format!("transfer interrupted ({e}) {}", kept(got)));
                    }
                };
                w.write_all(&buf[..n])
                    .map_err(|e| format!("{}: {e}", part.display()))?;
                got += n as u64;
                bar.inc(n as u64);
            }
            let f = w
                .into_inner()
                .map_err(|e| format!("{}: {e}", part.display()))?;
            f.sync_all()
                .map_err(|e| format!("{}: {e}", part.display()))?;
            if let Some(t) = total {
                if got != t {
                    return Err(format!("connection closed {}", kept(got)));
                }
            }
            return Ok(());
        }
        Err("the server does not resume, and starting over failed".into())
    }
}

/// What the source publishes, checked on the finished part.
fn check_file(path: &Path, check: Check, url: &str) -> Result<(), String> {
    let want = match check {
        Check::None => return Ok(()),
        Check::Sha256(h) => h.to_ascii_lowercase(),
        Check::NamePrefix => name_hash_prefix(url)
            .ok_or_else(|| format!("no hash in the file name of {url}"))?
            .to_ascii_lowercase(),
    };
    let got = sha256_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if got.starts_with(&want) {
        return Ok(());
    }
    Err(match check {
        Check::NamePrefix => format!(
            "sha256 mismatch: the file has {got}, its name promises one starting with {want} \
             (the download was discarded)"
        ),
        _ => format!(
            "sha256 mismatch: the file has {got}, the source publishes {want} (the download \
             was discarded)"
        ),
    })
}

/// Writes each member to `root/DEST` through a checked temp file.
fn extract(zip_path: &Path, members: &[Member], root: &Path) -> Result<Vec<PathBuf>, String> {
    let f = std::fs::File::open(zip_path).map_err(|e| format!("{}: {e}", zip_path.display()))?;
    let mut z = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| format!("not a readable zip: {e}"))?;
    let mut out = Vec::new();
    for m in members {
        let suffix = format!("/{}", m.name);
        let idx = (0..z.len())
            .find(|&i| {
                matches!(z.name_for_index(i), Some(Ok(n)) if n == m.name || n.ends_with(&suffix))
            })
            .ok_or_else(|| format!("the archive has no {}", m.name))?;
        let dest = root.join(m.dest);
        let tmp = temp_beside(&dest, "part");
        let res = (|| -> Result<(), String> {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let mut entry = z
                .by_index(idx)
                .map_err(|e| format!("{} in the archive: {e}", m.name))?;
            let io = |e: std::io::Error| format!("unpacking {}: {e}", m.name);
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
            std::io::copy(&mut entry, &mut w).map_err(io)?;
            w.into_inner()
                .map_err(|e| io(e.into_error()))?
                .sync_all()
                .map_err(io)?;
            if let Some(h) = m.sha256 {
                check_file(&tmp, Check::Sha256(h), m.name)
                    .map_err(|e| format!("{}: {e}", m.name))?;
            }
            std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        out.push(dest);
    }
    Ok(out)
}

/// A size the source publishes exactly must be the file's.
fn check_size(path: &Path, size: Size) -> Result<(), String> {
    let Size::Exact(want) = size else {
        return Ok(());
    };
    let got = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "size mismatch: the file has {got} bytes, the source publishes {want}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_mirror() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let h = Http::new(Some("http://127.0.0.1:9/m/".into()));
        assert_eq!(
            h.url_for("https://download.pytorch.org/models/a-1234abcd.pth"),
            "http://127.0.0.1:9/m/download.pytorch.org/models/a-1234abcd.pth"
        );
        assert_eq!(Http::new(None).url_for("https://x/y"), "https://x/y");
    }
}
