//! `mcld download`: fetches the models the other commands read, checks them and puts them where
//! those commands look (the table in [`sources`]).
//!
//! - Hub files go through the `hf-hub` client and its cache (`HF_ENDPOINT`, `HF_HOME`,
//!   `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`), then are hard-linked (else copied) into the
//!   layout. LFS files are checked against their ETag, which the Hub sets to their SHA-256.
//! - Everything else is plain HTTP(S), resumed from a `.NAME.part` file beside the destination
//!   with a `Range` request; `--mirror` / `MCLD_DOWNLOAD_MIRROR` fetch `https://HOST/PATH` from
//!   `MIRROR/HOST/PATH` instead (an offline mirror, or the tests' loopback server).
//! - A file gets its final name only once complete and checked (temp file + rename), so a
//!   destination that exists is taken as done and a second run makes no request at all.
//! - A failure is reported with its URL and reason and the other files still complete.

mod http;
mod hub;
pub mod sources;

use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use sources::{
    name_hash_prefix, pick_listed, Check, Group, Member, Origin, Root, Size, Source, MCLD_DRIVE,
    MCLD_REPO, SOURCES, WEIGHT_EXTENSIONS,
};

use crate::{Error, Result};

/// Environment variable standing in for `--mirror`.
pub const MIRROR_ENV: &str = "MCLD_DOWNLOAD_MIRROR";

/// What `mcld download` is asked for, as plain values.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    /// Comma-separated groups (inference, train, prepare, evaluate) or source ids from --list;
    /// default: every group (optional sources only when named).
    pub only: Vec<String>,
    /// Where the base and preprocessing models go (the other commands' --pretrained_dir).
    pub dir: PathBuf,
    /// Where the MCLD checkpoints go (the other commands' --ckpt_dir).
    pub ckpt_dir: PathBuf,
    /// Print the table of sources (repo or URL, files, destination, size, check) and exit.
    pub list: bool,
    /// Fetch every non-Hub https://HOST/PATH from MIRROR/HOST/PATH instead (default: the
    /// MCLD_DOWNLOAD_MIRROR environment variable). The Hub follows HF_ENDPOINT.
    pub mirror: Option<String>,
}

/// How to reach the Hugging Face Hub, read from the environment as `huggingface_hub` does.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    /// The `hub/` cache folder (blobs, snapshots, refs).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: Hub files come from the cache only, and nothing else is fetched.
    pub offline: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubSettings {
    pub fn from_env() -> Result<Self> {
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let hf_home = match env_nonempty("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => {
                let cache = env_nonempty("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .ok_or_else(|| {
                        Error::msg(
                            "no Hugging Face cache folder: set HF_HOME (or HOME) so that Hub \
                             downloads have somewhere to live",
                        )
                    })?;
                cache.join("huggingface")
            }
        };
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(Self {
            endpoint,
            cache_dir,
            token,
            offline,
        })
    }
}

/// Everything one run needs besides the sources.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub ckpt_dir: PathBuf,
    pub mirror: Option<String>,
    pub hub: HubSettings,
    /// Draw progress bars (on a terminal only, in any case).
    pub progress: bool,
}

impl Options {
    fn root(&self, r: Root) -> &Path {
        match r {
            Root::Pretrained => &self.dir,
            Root::Checkpoints => &self.ckpt_dir,
        }
    }
}

/// The sources `--only` names (groups or ids, in table order); all non-optional ones when empty.
pub fn select(only: &[String]) -> Result<Vec<Source>> {
    let words: Vec<&str> = only
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if words.is_empty() {
        return Ok(SOURCES.iter().filter(|s| !s.optional).copied().collect());
    }
    let mut ids: Vec<&str> = SOURCES.iter().map(|s| s.id).collect();
    ids.dedup();
    for w in &words {
        if Group::parse(w).is_none() && !ids.contains(w) {
            return Err(Error::msg(format!(
                "unknown download group or id '{w}'; groups: {}; ids: {}",
                Group::ALL.map(Group::name).join(", "),
                ids.join(", ")
            )));
        }
    }
    Ok(SOURCES
        .iter()
        .filter(|s| words.contains(&s.id) || (!s.optional && words.contains(&s.group.name())))
        .copied()
        .collect())
}

/// Where a source's files end up; for a Hub source, one path per choice.
pub fn destinations(s: &Source, opts: &Options) -> Vec<PathBuf> {
    let root = opts.root(s.root);
    match s.origin {
        Origin::Hub { choices, .. } => choices.iter().map(|c| root.join(s.dest).join(c)).collect(),
        Origin::HubListed { names, .. } => names
            .iter()
            .flat_map(|n| {
                WEIGHT_EXTENSIONS
                    .iter()
                    .map(move |e| root.join(s.dest).join(format!("{n}.{e}")))
            })
            .collect(),
        Origin::Url { .. } => vec![root.join(s.dest)],
        Origin::Zip { members, .. } => members.iter().map(|m| root.join(m.dest)).collect(),
    }
}

/// Whether the files are already in place (then nothing is fetched).
fn present(s: &Source, opts: &Options) -> Option<Vec<PathBuf>> {
    let dests = destinations(s, opts);
    match s.origin {
        Origin::Hub { .. } | Origin::HubListed { .. } => {
            dests.into_iter().find(|p| p.is_file()).map(|p| vec![p])
        }
        Origin::Url { .. } => {
            let p = &dests[0];
            let ok = match (p.metadata(), s.size) {
                (Ok(m), Size::Exact(n)) => m.is_file() && m.len() == n,
                (Ok(m), _) => m.is_file(),
                (Err(_), _) => false,
            };
            ok.then_some(dests)
        }
        Origin::Zip { .. } => dests.iter().all(|p| p.is_file()).then_some(dests),
    }
}

/// The URL a source is fetched from (Hub: its first choice), for messages.
pub fn source_url(s: &Source, hub_endpoint: &str) -> String {
    match s.origin {
        Origin::Hub { repo, choices } => hub::resolve_url(hub_endpoint, repo, choices[0]),
        Origin::HubListed { repo, .. } => hub::info_url(hub_endpoint, repo),
        Origin::Url { url, .. } | Origin::Zip { url, .. } => url.to_string(),
    }
}

/// A file that could not be fetched.
#[derive(Debug, Clone)]
pub struct Failure {
    pub url: String,
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub fetched: Vec<PathBuf>,
    pub present: Vec<PathBuf>,
    pub failed: Vec<Failure>,
    /// Bytes that came over the network in this run.
    pub bytes: u64,
}

/// The overall bar and the current file's bar.
struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
}

impl Bars {
    fn new(visible: bool, total: u64, files: usize) -> Self {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        overall.set_prefix(format!("{files} files"));
        Self { multi, overall }
    }

    fn say(&self, line: String) {
        if self.multi.is_hidden() {
            println!("{line}");
        } else {
            self.multi.suspend(|| println!("{line}"));
        }
    }

    fn file(&self, label: &str, estimate: Option<u64>) -> FileBar {
        let bar = self.multi.add(ProgressBar::new(estimate.unwrap_or(0)));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        FileBar {
            bar,
            overall: self.overall.clone(),
            counted_len: estimate.unwrap_or(0),
            counted_pos: 0,
            transferred: 0,
        }
    }
}

/// One file's bar; keeps the overall bar's length and position in step with it.
pub(crate) struct FileBar {
    bar: ProgressBar,
    overall: ProgressBar,
    /// This file's share of the overall length (the estimate until the size is known).
    counted_len: u64,
    /// This file's share of the overall position.
    counted_pos: u64,
    /// Bytes received over the network (not counting a resumed part already on disk).
    transferred: u64,
}

impl FileBar {
    fn set_total(&mut self, total: u64) {
        self.bar.set_length(total);
        let len = self.overall.length().unwrap_or(0);
        self.overall
            .set_length(len.saturating_sub(self.counted_len) + total);
        self.counted_len = total;
    }

    /// Starts (again) at `pos` bytes, e.g. the part already on disk when resuming.
    fn restart_at(&mut self, pos: u64) {
        self.bar.set_position(pos);
        let p = self.overall.position();
        self.overall
            .set_position(p.saturating_sub(self.counted_pos) + pos);
        self.counted_pos = pos;
    }

    fn inc(&mut self, n: u64) {
        self.bar.inc(n);
        self.overall.inc(n);
        self.counted_pos += n;
        self.transferred += n;
    }

    /// Removes the bar; an unfinished file's remainder leaves the overall length.
    fn done(self) -> u64 {
        self.bar.finish_and_clear();
        if self.counted_pos < self.counted_len {
            let len = self.overall.length().unwrap_or(0);
            self.overall
                .set_length(len.saturating_sub(self.counted_len - self.counted_pos));
        }
        self.transferred
    }
}

/// Fetches `sources` (skipping what is in place) and reports every file; failures do not stop
/// the others.
pub fn run(sources: &[Source], opts: &Options) -> Outcome {
    let mut out = Outcome::default();
    let mut todo = Vec::new();
    for s in sources {
        match present(s, opts) {
            Some(paths) => out.present.extend(paths),
            None => todo.push(*s),
        }
    }
    let total: u64 = todo.iter().filter_map(|s| s.size.estimate()).sum();
    let bars = Bars::new(opts.progress, total, todo.len());
    if !out.present.is_empty() {
        bars.say(format!(
            "{} file(s) already in place (delete one to fetch it again)",
            out.present.len()
        ));
    }
    let mut hub_client: Option<std::result::Result<hub::Hub, String>> = None;
    // One listing per repo, shared by the networks picked from it.
    let mut listings: std::collections::HashMap<&str, std::result::Result<Vec<String>, Failure>> =
        Default::default();
    let http_client = http::Http::new(opts.mirror.clone());
    for s in &todo {
        let url = source_url(s, &opts.hub.endpoint);
        let label = match s.origin {
            Origin::Hub { choices, .. } => choices[0].rsplit('/').next().unwrap_or(s.id),
            Origin::HubListed { names, .. } => names[0],
            Origin::Url { url, .. } | Origin::Zip { url, .. } => {
                url.rsplit('/').next().unwrap_or(s.id)
            }
        };
        let mut bar = bars.file(label, s.size.estimate());
        let res = match s.origin {
            Origin::Hub { repo, choices } => {
                let client = hub_client
                    .get_or_insert_with(|| hub::Hub::new(&opts.hub).map_err(|e| e.to_string()));
                match client {
                    Ok(h) => {
                        let dir = opts.root(s.root).join(s.dest);
                        let choices: Vec<(&str, PathBuf)> =
                            choices.iter().map(|c| (*c, dir.join(c))).collect();
                        h.fetch(repo, &choices, &mut bar).map(|p| vec![p])
                    }
                    Err(e) => Err(Failure {
                        url: url.clone(),
                        reason: e.clone(),
                    }),
                }
            }
            Origin::HubListed { repo, keys, names } => {
                let client = hub_client
                    .get_or_insert_with(|| hub::Hub::new(&opts.hub).map_err(|e| e.to_string()));
                match client {
                    Ok(h) => listings
                        .entry(repo)
                        .or_insert_with(|| h.list(repo))
                        .clone()
                        .and_then(|listing| match pick_listed(&listing, keys) {
                            Some(file) => {
                                let ext = file.rsplit('.').next().unwrap_or_default();
                                let dest = opts.root(s.root).join(s.dest).join(format!(
                                    "{}.{}",
                                    names[0],
                                    ext.to_ascii_lowercase()
                                ));
                                h.fetch(repo, &[(file, dest)], &mut bar).map(|p| vec![p])
                            }
                            None => Err(Failure {
                                url: url.clone(),
                                reason: none_listed(s, keys, &listing, opts.root(s.root)),
                            }),
                        }),
                    Err(e) => Err(Failure {
                        url: url.clone(),
                        reason: e.clone(),
                    }),
                }
            }
            Origin::Url { url: u, check } => {
                let dest = opts.root(s.root).join(s.dest);
                http_client
                    .fetch_file(u, (check, s.size), &dest, opts.hub.offline, &mut bar)
                    .map(|()| vec![dest])
            }
            Origin::Zip {
                url: u,
                check,
                members,
            } => http_client.fetch_zip(
                u,
                check,
                members,
                opts.root(s.root),
                opts.hub.offline,
                &mut bar,
            ),
        };
        out.bytes += bar.done();
        match res {
            Ok(paths) => {
                for p in &paths {
                    bars.say(format!("fetched  {}", p.display()));
                }
                out.fetched.extend(paths);
            }
            Err(f) => {
                bars.say(format!("FAILED   {}: {}", f.url, f.reason));
                out.failed.push(f);
            }
        }
    }
    bars.overall.finish_and_clear();
    out
}

/// Why a listed repo gave nothing for one network: what it holds, and the other way in.
fn none_listed(s: &Source, keys: &[&str], listing: &[String], root: &Path) -> String {
    const SHOWN: usize = 12;
    let mut found = listing
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if listing.len() > SHOWN {
        found.push_str(&format!(", ... ({} files in all)", listing.len()));
    }
    if listing.is_empty() {
        found = "no files".into();
    }
    format!(
        "the repo has no file for the {} (a name containing {} ending in .{}); it lists: \
         {found}. The authors publish the checkpoints in a Google Drive folder linked from \
         their README ({MCLD_DRIVE}): put denoising_unet.pth, reference_unet.pth, \
         pose_guider.pth and image_projector.pth in {} or point --ckpt_dir at their folder",
        s.what,
        keys.join(" or "),
        WEIGHT_EXTENSIONS.join(", ."),
        root.display()
    )
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// A rough size in the units sites state them (decimal).
fn rough(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("about {:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("about {} MB", (bytes as f64 / 1e6).round())
    }
}

/// The table as `--list` prints it, with the destinations under the given folders.
pub fn list_table(sources: &[Source], opts_dir: &Path, ckpt_dir: &Path, endpoint: &str) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "mcld download sources (groups: {}; --only takes a group or an id)\n",
        Group::ALL.map(Group::name).join(", ")
    );
    for s in sources {
        let root = match s.root {
            Root::Pretrained => opts_dir,
            Root::Checkpoints => ckpt_dir,
        };
        let size = match s.size {
            Size::Unknown => "size unknown".to_string(),
            Size::About(n) => rough(n),
            Size::Exact(n) => format!("{n} bytes"),
        };
        let optional = if s.optional {
            format!(" (optional: only with --only {})", s.id)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "{:<9} {:<14} {} [{size}]{optional}",
            s.group.name(),
            s.id,
            s.what
        );
        let check_text = |c: Check, url: &str| match c {
            Check::None => "none published".to_string(),
            Check::Sha256(h) => format!("sha256 {h}"),
            Check::NamePrefix => format!(
                "sha256 starts with {} (from the file name)",
                name_hash_prefix(url).unwrap_or("?")
            ),
        };
        match s.origin {
            Origin::Hub { repo, choices } => {
                let _ = writeln!(t, "    from   {endpoint}/{repo}");
                let _ = writeln!(t, "    file   {}", choices.join(", else "));
                let fallback = if choices.len() > 1 {
                    " (or the fallback's name)"
                } else {
                    ""
                };
                let _ = writeln!(
                    t,
                    "    to     {}{fallback}",
                    root.join(s.dest).join(choices[0]).display()
                );
                let _ = writeln!(t, "    check  sha256 = the Hub's ETag (LFS files)");
            }
            Origin::HubListed { repo, keys, names } => {
                let _ = writeln!(t, "    from   {endpoint}/{repo}");
                let _ = writeln!(
                    t,
                    "    file   the listed file whose name contains {} (.{}, in that order; any \
                     folder)",
                    keys.join(" or "),
                    WEIGHT_EXTENSIONS.join(", .")
                );
                let _ = writeln!(
                    t,
                    "    to     {} (or the .pth / .bin the repo has)",
                    root.join(s.dest)
                        .join(format!("{}.{}", names[0], WEIGHT_EXTENSIONS[0]))
                        .display()
                );
                let _ = writeln!(t, "    check  sha256 = the Hub's ETag (LFS files)");
            }
            Origin::Url { url, check } => {
                let _ = writeln!(t, "    from   {url}");
                let _ = writeln!(t, "    to     {}", root.join(s.dest).display());
                let _ = writeln!(t, "    check  {}", check_text(check, url));
            }
            Origin::Zip {
                url,
                check,
                members,
            } => {
                let _ = writeln!(t, "    from   {url}");
                let _ = writeln!(t, "    check  {}", check_text(check, url));
                for m in members {
                    let sha = m
                        .sha256
                        .map(|h| format!(" (sha256 {h})"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        t,
                        "    unzip  {} -> {}{sha}",
                        m.name,
                        root.join(m.dest).display()
                    );
                }
            }
        }
    }
    t
}

/// `mcld download`.
pub fn run_request(a: &DownloadRequest) -> Result<()> {
    let sources = if a.list && a.only.is_empty() {
        SOURCES.to_vec()
    } else {
        select(&a.only)?
    };
    if a.list {
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        print!("{}", list_table(&sources, &a.dir, &a.ckpt_dir, &endpoint));
        return Ok(());
    }
    let opts = Options {
        dir: a.dir.clone(),
        ckpt_dir: a.ckpt_dir.clone(),
        mirror: a.mirror.clone().or_else(|| env_nonempty(MIRROR_ENV)),
        hub: HubSettings::from_env()?,
        progress: true,
    };
    let out = run(&sources, &opts);
    println!(
        "download: {} fetched ({} transferred), {} already in place, {} failed",
        out.fetched.len(),
        human(out.bytes),
        out.present.len(),
        out.failed.len()
    );
    if out.failed.is_empty() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "{} download(s) failed (rerun `mcld download` to retry; partial files resume):\n  {}",
        out.failed.len(),
        out.failed
            .iter()
            .map(|f| format!("{}: {}", f.url, f.reason))
            .collect::<Vec<_>>()
            .join("\n  ")
    )))
}

/// Moves a finished file in: hard link (no second copy of a multi-GB blob) else copy, through
/// a temp name so that the destination is never partial.
fn place(src: &Path, dest: &Path) -> std::io::Result<()> {
    let src = std::fs::canonicalize(src)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = temp_beside(dest, "download");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(&src, &tmp).is_err() {
        std::fs::copy(&src, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
    }
    std::fs::rename(&tmp, dest).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `DIR/.NAME.EXT` beside `path`: hidden, and stable across runs so that a part can resume.
fn temp_beside(path: &Path, ext: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    path.with_file_name(format!(".{name}.{ext}"))
}

/// Lower-case hex SHA-256 of a file.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_group_and_id() {
        let all = select(&[]).unwrap();
        assert!(all.iter().all(|s| !s.optional));
        assert!(all.iter().any(|s| s.group == Group::Train));
        let ev = select(&["evaluate".into()]).unwrap();
        assert!(ev.iter().all(|s| s.group == Group::Evaluate && !s.optional));
        let pt = select(&["evaluate".into(), "pt_inception".into()]).unwrap();
        assert_eq!(pt.len(), ev.len() + 1);
        let e = select(&["inferense".into()]).unwrap_err().to_string();
        assert!(e.contains("inferense") && e.contains("inference"), "{e}");
    }

    #[test]
    fn temp_names_are_hidden_siblings() {
        let t = temp_beside(Path::new("/a/b/model.pkl"), "part");
        assert_eq!(t, Path::new("/a/b/.model.pkl.part"));
    }
}
