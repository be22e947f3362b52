//! `mcld download` against a loopback server started by each test: the Hub's resolve protocol
//! (as `hf-hub` reads it: ranged probe, ETag / X-Linked-Etag, X-Repo-Commit, Content-Range,
//! an absolute redirect to a CDN path for LFS files) and plain file serving for the mirrored
//! model zoos. The server counts requests and can cut a response mid-body.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use mcld::download::{self, Check, HubSettings, Member, Options, Origin, Root, Size, Source};
use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[derive(Clone)]
enum Kind {
    Plain,
    /// A git file of a Hub repo: served in place with its (fake git) ETag.
    HubSmall {
        etag: String,
    },
    /// An LFS file: the resolve URL redirects to `/cdn/SHA`.
    HubLfs {
        sha: String,
    },
    /// Answered with this status and no body (the Hub's 401 for a missing or private repo).
    Status(u16),
}

#[derive(Clone)]
struct Route {
    body: Vec<u8>,
    kind: Kind,
    /// Bodies still to be cut half-way (ranged probes of one byte are never cut).
    cuts: usize,
}

#[derive(Debug, Clone)]
struct Req {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    log: Mutex<Vec<Req>>,
}

struct Server {
    base: String,
    state: Arc<State>,
}

impl Server {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let (st, b) = (state.clone(), base.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, b) = (st.clone(), b.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &st, &b);
                });
            }
        });
        Self { base, state }
    }

    fn add(&self, path: String, body: Vec<u8>, kind: Kind) {
        self.state.routes.lock().unwrap().insert(
            path,
            Route {
                body,
                kind,
                cuts: 0,
            },
        );
    }

    /// A non-Hub URL as the mirror serves it (`/HOST/PATH`).
    fn mirror_file(&self, url: &str, body: Vec<u8>) {
        self.add(mirror_path(url), body, Kind::Plain);
    }

    fn hub_file(&self, repo: &str, file: &str, body: Vec<u8>) {
        let sha = sha256_hex(&body);
        let path = format!("/{repo}/resolve/main/{file}");
        if is_lfs(file) {
            self.add(format!("/cdn/{sha}"), body.clone(), Kind::Plain);
            self.add(path, body, Kind::HubLfs { sha });
        } else {
            let etag = sha[..40].to_string();
            self.add(path, body, Kind::HubSmall { etag });
        }
    }

    /// The repo info the Hub API gives for branch main: the list of the repo's files.
    fn hub_listing(&self, repo: &str, files: &[String]) {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings });
        self.add(
            format!("/api/models/{repo}/revision/main"),
            body.to_string().into_bytes(),
            Kind::Plain,
        );
    }

    /// An LFS file whose ETag promises other content than it serves.
    fn hub_file_with_wrong_etag(&self, repo: &str, file: &str, body: Vec<u8>) {
        let sha = sha256_hex(b"something else");
        self.add(format!("/cdn/{sha}"), body.clone(), Kind::Plain);
        self.add(
            format!("/{repo}/resolve/main/{file}"),
            body,
            Kind::HubLfs { sha },
        );
    }

    fn cut_next(&self, path: &str, n: usize) {
        self.state
            .routes
            .lock()
            .unwrap()
            .get_mut(path)
            .unwrap_or_else(|| panic!("no route {path}"))
            .cuts = n;
    }

    fn requests(&self) -> Vec<Req> {
        self.state.log.lock().unwrap().clone()
    }
}

fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".pth"]
        .iter()
        .any(|e| file.ends_with(e))
}

fn mirror_path(url: &str) -> String {
    format!("/{}", url.split_once("://").unwrap().1)
}

fn handle(conn: TcpStream, st: &State, base: &str) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
            if k.trim().eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    st.log.lock().unwrap().push(Req {
        path: path.clone(),
        range: range.clone(),
        auth,
    });
    let mut w = conn;
    let route = {
        let mut routes = st.routes.lock().unwrap();
        match routes.get_mut(&path) {
            None => None,
            Some(rt) => {
                let snapshot = rt.clone();
                let probe = range.as_deref() == Some("bytes=0-0");
                if rt.cuts > 0 && !probe && !matches!(rt.kind, Kind::HubLfs { .. }) {
                    rt.cuts -= 1;
                }
                Some((snapshot, probe))
            }
        }
    };
    let Some((rt, probe)) = route else {
        return write!(
            w,
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
    };
    let mut extra = String::new();
    match &rt.kind {
        Kind::Status(code) => {
            return write!(
                w,
                "HTTP/1.1 {code} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Kind::HubLfs { sha } => {
            return write!(
                w,
                "HTTP/1.1 302 Found\r\nLocation: {base}/cdn/{sha}\r\nX-Repo-Commit: {COMMIT}\r\n\
                 X-Linked-Etag: \"{sha}\"\r\nX-Linked-Size: {}\r\nETag: \"not-the-sha\"\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n",
                rt.body.len()
            );
        }
        Kind::HubSmall { etag } => {
            extra = format!("ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\n");
        }
        Kind::Plain => {}
    }
    let len = rt.body.len();
    let start = range
        .as_deref()
        .and_then(|v| v.strip_prefix("bytes="))
        .map(|v| {
            let (a, b) = v.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                len - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(len - 1))
        });
    let (status, lo, hi) = match start {
        Some((a, _)) if a >= len => {
            return write!(
                w,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Some((a, b)) => {
            extra += &format!("Content-Range: bytes {a}-{b}/{len}\r\n");
            ("206 Partial Content", a, b + 1)
        }
        None => ("200 OK", 0, len),
    };
    write!(
        w,
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        hi - lo
    )?;
    let cut = rt.cuts > 0 && !probe && hi - lo > 1;
    let end = if cut { lo + (hi - lo) / 2 } else { hi };
    w.write_all(&rt.body[lo..end])?;
    w.flush()?;
    if cut {
        w.shutdown(std::net::Shutdown::Both)?;
    }
    Ok(())
}

/// Distinct bytes for each file, big enough for several reads.
fn content(name: &str, len: usize) -> Vec<u8> {
    let seed = format!("{name}:");
    seed.bytes()
        .cycle()
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i / 251) as u8))
        .take(len)
        .collect()
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, body) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(body).unwrap();
    }
    w.finish().unwrap().into_inner()
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    pw: PathBuf,
    ck: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Self {
            pw: root.join("pretrained_weights"),
            ck: root.join("checkpoints"),
            root,
            _tmp: tmp,
        }
    }

    fn mcld(&self, server: &Server, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mcld"));
        c.arg("download")
            .arg("--dir")
            .arg(&self.pw)
            .arg("--ckpt_dir")
            .arg(&self.ck)
            .args(args);
        for v in [
            "HF_TOKEN",
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "MCLD_DOWNLOAD_MIRROR",
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            c.env_remove(v);
        }
        c.env("HF_ENDPOINT", &server.base)
            .env("HF_HOME", self.root.join("hf"))
            .env("MCLD_DOWNLOAD_MIRROR", &server.base);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn opts(&self, server: &Server) -> Options {
        Options {
            dir: self.pw.clone(),
            ckpt_dir: self.ck.clone(),
            mirror: Some(server.base.clone()),
            hub: HubSettings {
                endpoint: server.base.clone(),
                cache_dir: self.root.join("hf/hub"),
                token: None,
                offline: false,
            },
            progress: false,
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Files under `dir` whose names mark them as temporary.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy();
            n.ends_with(".part") || n.ends_with(".download")
        })
        .map(|e| e.into_path())
        .collect()
}

/// Serves every Hub file of the selected sources; multi-choice files only as their LAST choice
/// (the repo lacks the preferred one, as some do), so the fallback is exercised too. Listed
/// networks sit in a subfolder under other names than the loaders read, beside files that
/// match no network, and the repo's listing names them all.
fn serve_hub(server: &Server, sources: &[Source]) -> HashMap<String, Vec<u8>> {
    let mut served = HashMap::new();
    let mut listings: HashMap<&str, Vec<String>> = HashMap::new();
    for s in sources {
        match s.origin {
            Origin::Hub { repo, choices } => {
                let file = choices.last().unwrap();
                let body = content(
                    &format!("{repo}/{file}"),
                    if is_lfs(file) { 300_000 } else { 900 },
                );
                server.hub_file(repo, file, body.clone());
                served.insert(format!("{repo}/{file}"), body);
            }
            Origin::HubListed { repo, keys, .. } => {
                let file = listed_name(keys);
                let body = content(&format!("{repo}/{file}"), 200_000);
                server.hub_file(repo, &file, body.clone());
                served.insert(format!("{repo}/{file}"), body);
                let l = listings.entry(repo).or_insert_with(|| {
                    vec![
                        ".gitattributes".into(),
                        "README.md".into(),
                        "release/optimizer_state.bin".into(),
                    ]
                });
                l.push(file);
            }
            _ => {}
        }
    }
    for (repo, files) in listings {
        server.hub_listing(repo, &files);
    }
    served
}

/// Where the loopback release keeps a listed network (not the name the loaders read).
fn listed_name(keys: &[&str]) -> String {
    format!("release/stage2/{}-30000.pth", keys.last().unwrap())
}

fn rebase(p: &Path, pw: &Path) -> PathBuf {
    let rest = p
        .strip_prefix("./pretrained_weights")
        .unwrap_or_else(|_| panic!("{} is not under ./pretrained_weights", p.display()));
    pw.join(rest)
}

#[test]
fn list_shows_every_source_and_destination() {
    let server = Server::start();
    let env = Env::new();
    let o = env.mcld(&server, &["--list"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let opts = env.opts(&server);
    for s in download::SOURCES {
        assert!(out.contains(s.id), "{} missing:\n{out}", s.id);
        assert!(out.contains(s.group.name()));
        match s.origin {
            Origin::Hub { repo, .. } | Origin::HubListed { repo, .. } => {
                assert!(out.contains(repo), "{repo}:\n{out}")
            }
            Origin::Url { url, .. } | Origin::Zip { url, .. } => {
                assert!(out.contains(url), "{url}:\n{out}")
            }
        }
        let first = &download::destinations(s, &opts)[0];
        assert!(
            out.contains(&first.display().to_string()),
            "{}:\n{out}",
            first.display()
        );
    }
    assert!(
        out.contains("0cc3c7bd") && out.contains("optional"),
        "{out}"
    );
    assert!(server.requests().is_empty());
    let o = env.mcld(&server, &["--list", "--only", "prepare"], &[]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("model_final_844d15.pkl") && !out.contains("inception_v3"));
}

#[test]
fn unknown_group_is_refused_before_any_request() {
    let server = Server::start();
    let env = Env::new();
    let o = env.mcld(&server, &["--only", "inference,nonsense"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("'nonsense'") && err.contains("inference, train, prepare, evaluate"),
        "{err}"
    );
    assert!(server.requests().is_empty());
    assert!(!env.pw.exists() && !env.ck.exists());
}

#[test]
fn inference_files_land_where_the_pipeline_reads_them_then_come_from_the_cache() {
    let server = Server::start();
    let env = Env::new();
    let sources = download::select(&["inference".into()]).unwrap();
    let served = serve_hub(&server, &sources);
    let o = env.mcld(&server, &["--only", "inference"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    // A preferred choice the repo lacks was asked for, then the fallback.
    let reqs = server.requests();
    assert!(reqs
        .iter()
        .any(|r| r.path.ends_with("/image_encoder/model.safetensors")));

    let check_layout = || {
        let cfg_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/train/train.yaml");
        let mut cfg = mcld::config::TrainConfig::load(&cfg_path).unwrap();
        cfg.pretrained_base_model_path = rebase(&cfg.pretrained_base_model_path, &env.pw);
        cfg.pretrained_vae_path = rebase(&cfg.pretrained_vae_path, &env.pw);
        cfg.image_encoder_path = rebase(&cfg.image_encoder_path, &env.pw);
        let files = mcld::pipeline::weight_files::PipelineFiles::resolve(&env.ck, &cfg)
            .unwrap_or_else(|e| panic!("{e}"));
        for (p, key) in [
            (
                &files.denoising_unet,
                "Lotior/mcld/release/stage2/denoising_unet-30000.pth",
            ),
            (
                &files.image_proj,
                "Lotior/mcld/release/stage2/image_proj-30000.pth",
            ),
            (
                &files.unet_config,
                "stable-diffusion-v1-5/stable-diffusion-v1-5/unet/config.json",
            ),
        ] {
            assert_eq!(&std::fs::read(p).unwrap(), &served[key], "{}", p.display());
            assert!(
                std::fs::symlink_metadata(p).unwrap().is_file(),
                "{}",
                p.display()
            );
        }
        let enc = files.image_encoder_dir.join("pytorch_model.bin");
        assert_eq!(
            std::fs::read(&enc).unwrap(),
            served["lambdalabs/sd-image-variations-diffusers/image_encoder/pytorch_model.bin"]
        );
        assert!(leftovers(&env.pw).is_empty() && leftovers(&env.ck).is_empty());
    };
    check_layout();

    // A second run finds everything in place and makes no request.
    let before = server.requests().len();
    let o = env.mcld(&server, &["--only", "inference"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), before, "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 fetched"));

    // Offline, with the layout gone: everything comes back from the Hub cache.
    std::fs::remove_dir_all(&env.pw).unwrap();
    std::fs::remove_dir_all(&env.ck).unwrap();
    let o = env.mcld(
        &server,
        &["--only", "inference"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), before);
    check_layout();

    // Offline, a file that was never cached fails with the reason.
    let o = env.mcld(&server, &["--only", "train"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("unet/config.json"),
        "{err}"
    );
    assert_eq!(server.requests().len(), before);
}

#[test]
fn zoo_files_and_zip_members_come_from_the_mirror() {
    let server = Server::start();
    let env = Env::new();
    let mut pkl = None;
    for s in download::select(&["prepare".into()]).unwrap() {
        match s.origin {
            Origin::Url { url, .. } => {
                let body = content(url, 200_000);
                server.mirror_file(url, body.clone());
                pkl = Some(body);
            }
            Origin::Zip { url, members, .. } => {
                // The real pack nests its folder; an extra model is not wanted.
                let bodies: Vec<(String, Vec<u8>)> = members
                    .iter()
                    .map(|m| (format!("antelopev2/{}", m.name), content(m.name, 50_000)))
                    .chain([("antelopev2/1k3d68.onnx".into(), content("x", 10))])
                    .collect();
                let refs: Vec<(&str, &[u8])> = bodies
                    .iter()
                    .map(|(n, b)| (n.as_str(), b.as_slice()))
                    .collect();
                server.mirror_file(url, zip_of(&refs));
            }
            Origin::Hub { .. } | Origin::HubListed { .. } => {}
        }
    }
    let o = env.mcld(&server, &["--only", "prepare"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let weights = env.pw.join(mcld::models::densepose::WEIGHTS_FILE);
    assert_eq!(std::fs::read(&weights).unwrap(), pkl.unwrap());
    for name in [
        mcld::models::face::DETECTOR_ONNX,
        mcld::models::face::RECOGNISER_ONNX,
    ] {
        let p = mcld::models::face::find_model(&env.pw, name)
            .unwrap_or_else(|| panic!("{name} not found where prepare looks"));
        assert_eq!(std::fs::read(p).unwrap(), content(name, 50_000));
    }
    assert!(!env.pw.join("antelopev2/1k3d68.onnx").exists());
    assert!(leftovers(&env.pw).is_empty(), "{:?}", leftovers(&env.pw));
    let n = server.requests().len();
    let o = env.mcld(&server, &["--only", "prepare"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), n);
}

#[test]
fn checksum_failures_are_named_and_the_other_files_complete() {
    let server = Server::start();
    let env = Env::new();
    let mut refused = Vec::new();
    for s in download::select(&["evaluate".into()]).unwrap() {
        match s.origin {
            Origin::Url { url, .. } => {
                server.mirror_file(url, content(url, 70_000));
                refused.push((url, env.pw.join(s.dest)));
            }
            Origin::Zip {
                url,
                members,
                check,
            } => {
                let bodies: Vec<(String, Vec<u8>)> = members
                    .iter()
                    .map(|m| (m.name.to_string(), content(m.name, 30_000)))
                    .collect();
                let refs: Vec<(&str, &[u8])> = bodies
                    .iter()
                    .map(|(n, b)| (n.as_str(), b.as_slice()))
                    .collect();
                server.mirror_file(url, zip_of(&refs));
                if check != Check::None {
                    // PyPI's digest of the real wheel cannot match this one.
                    refused.push((url, env.pw.join(members[0].dest)));
                }
            }
            Origin::Hub { .. } | Origin::HubListed { .. } => {}
        }
    }
    assert!(refused.len() >= 3);
    let o = env.mcld(&server, &["--only", "evaluate"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for (url, dest) in &refused {
        let line = err
            .lines()
            .find(|l| l.contains(&mirror_path(url)))
            .unwrap_or_else(|| panic!("{url} not named:\n{err}"));
        assert!(line.contains("sha256 mismatch"), "{line}");
        assert!(!dest.exists(), "{} exists", dest.display());
    }
    assert!(err.contains("starting with 0cc3c7bd"), "{err}");
    assert!(
        mcld::metrics::face::find_models(&env.pw).is_some(),
        "{}",
        text(&o)
    );
    assert!(leftovers(&env.pw).is_empty(), "{:?}", leftovers(&env.pw));
    // The next run asks only for the refused files again.
    let n = server.requests().len();
    let o = env.mcld(&server, &["--only", "evaluate"], &[]);
    assert!(!o.status.success());
    let again = &server.requests()[n..];
    assert_eq!(again.len(), refused.len(), "{again:?}");
    assert!(!again.iter().any(|r| r.path.contains("buffalo_s")));
}

#[test]
fn interrupted_transfers_leave_no_final_file_and_resume() {
    let server = Server::start();
    let env = Env::new();
    let sources = download::select(&["densepose".into(), "vae".into()]).unwrap();
    let served = serve_hub(&server, &sources);
    let dp = sources
        .iter()
        .find_map(|s| match s.origin {
            Origin::Url { url, .. } => Some(url),
            _ => None,
        })
        .unwrap();
    let dp_body = content(dp, 400_000);
    server.mirror_file(dp, dp_body.clone());
    server.cut_next(&mirror_path(dp), 1);
    let vae = "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.bin";
    let cdn = format!("/cdn/{}", sha256_hex(&served[vae]));
    server.cut_next(&cdn, 1);

    let o = env.mcld(&server, &["--only", "densepose,vae"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&mirror_path(dp)) && err.contains("interrupted"),
        "{err}"
    );
    assert!(
        err.contains("sd-vae-ft-mse/resolve/main/diffusion_pytorch_model"),
        "{err}"
    );
    let dp_dest = env.pw.join("model_final_844d15.pkl");
    let vae_dest = env.pw.join("sd-vae-ft-mse/diffusion_pytorch_model.bin");
    assert!(!dp_dest.exists() && !vae_dest.exists());
    // The config file (not cut) completed despite the failures.
    assert!(env.pw.join("sd-vae-ft-mse/config.json").is_file());
    let part = env.pw.join(".model_final_844d15.pkl.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < dp_body.len() as u64, "{kept}");

    let n = server.requests().len();
    let o = env.mcld(&server, &["--only", "densepose,vae"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&dp_dest).unwrap(), dp_body);
    assert_eq!(std::fs::read(&vae_dest).unwrap(), served[vae]);
    let again = &server.requests()[n..];
    let resumed = |path: &str| {
        again.iter().any(|r| {
            r.path == path
                && r.range.as_deref().is_some_and(|v| {
                    v.strip_prefix("bytes=")
                        .and_then(|v| v.strip_suffix('-'))
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|start| start > 0)
                })
        })
    };
    assert!(resumed(&mirror_path(dp)), "{again:?}");
    assert!(resumed(&cdn), "{again:?}");
    assert!(leftovers(&env.pw).is_empty(), "{:?}", leftovers(&env.pw));
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn published_digests_are_checked_on_files_and_zip_members() {
    let server = Server::start();
    let env = Env::new();
    let body = content("weights", 80_000);
    let url = "https://example.org/models/w.pth";
    server.mirror_file(url, body.clone());
    let member = content("member", 20_000);
    let good_zip = "https://example.org/good.zip";
    let bad_zip = "https://example.org/bad.zip";
    let z = zip_of(&[
        ("pkg/weights/v0.1/m.pth", &member),
        ("pkg/weights/v0.0/m.pth", b"old"),
    ]);
    server.mirror_file(good_zip, z.clone());
    server.mirror_file(bad_zip, z.clone());
    let file_source = |check| Source {
        id: "w",
        group: download::Group::Evaluate,
        optional: false,
        what: "test file",
        root: Root::Pretrained,
        dest: "w.pth",
        origin: Origin::Url { url, check },
        size: Size::Exact(body.len() as u64),
    };
    let zip_source = |url: &'static str, dest: &'static str, sha: &'static str| Source {
        id: "z",
        group: download::Group::Evaluate,
        optional: false,
        what: "test zip",
        root: Root::Pretrained,
        dest: "",
        origin: Origin::Zip {
            url,
            check: Check::Sha256(leak(sha256_hex(&z))),
            members: Box::leak(Box::new([Member {
                name: "weights/v0.1/m.pth",
                dest,
                sha256: Some(sha),
            }])),
        },
        size: Size::Unknown,
    };
    let good_sha = leak(sha256_hex(&member));
    let sources = [
        file_source(Check::Sha256(leak(sha256_hex(&body)))),
        zip_source(good_zip, "z/m.pth", good_sha),
        zip_source(bad_zip, "bad/m.pth", leak("0".repeat(64))),
    ];
    let out = download::run(&sources, &env.opts(&server));
    assert_eq!(std::fs::read(env.pw.join("w.pth")).unwrap(), body);
    assert_eq!(std::fs::read(env.pw.join("z/m.pth")).unwrap(), member);
    assert_eq!(out.fetched.len(), 2, "{:?}", out.failed);
    assert_eq!(out.failed.len(), 1);
    let f = &out.failed[0];
    assert!(f.url.ends_with("/example.org/bad.zip"), "{f:?}");
    assert!(
        f.reason.contains("m.pth") && f.reason.contains("sha256 mismatch"),
        "{f:?}"
    );
    assert!(!env.pw.join("bad/m.pth").exists());
    assert!(leftovers(&env.pw).is_empty(), "{:?}", leftovers(&env.pw));

    // A wrong published digest on a plain file: refused, nothing under the final name.
    std::fs::remove_file(env.pw.join("w.pth")).unwrap();
    let out = download::run(
        &[file_source(Check::Sha256(leak("f".repeat(64))))],
        &env.opts(&server),
    );
    assert_eq!(out.failed.len(), 1);
    assert!(out.failed[0].reason.contains("sha256 mismatch"));
    assert!(!env.pw.join("w.pth").exists() && leftovers(&env.pw).is_empty());
}

/// Every `mcld download --only ...` that a message in the sources suggests names real groups
/// or ids (a renamed id must not leave stale hints behind).
#[test]
fn hints_in_messages_name_real_groups_and_ids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = 0;
    for e in walkdir::WalkDir::new(&src)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        if e.path().extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        for (i, _) in text.match_indices("download --only") {
            let rest = text[i + "download --only".len()..]
                .trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            let words: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ',')
                .collect();
            if words.is_empty() || words.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                continue; // a placeholder such as GROUP
            }
            let list: Vec<String> = words.split(',').map(str::to_string).collect();
            download::select(&list)
                .unwrap_or_else(|err| panic!("{}: `{words}`: {err}", e.path().display()));
            seen += 1;
        }
    }
    assert!(seen >= 8, "only {seen} hints found");
}

#[test]
fn hub_file_that_does_not_match_its_etag_is_refused() {
    let server = Server::start();
    let env = Env::new();
    let repo = "stabilityai/sd-vae-ft-mse";
    server.hub_file(repo, "config.json", content("cfg", 500));
    let weights = "diffusion_pytorch_model.safetensors";
    server.hub_file_with_wrong_etag(repo, weights, content("w", 100_000));
    let o = env.mcld(&server, &["--only", "vae"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.contains(&format!("{repo}/resolve/main/{weights}")))
        .unwrap_or_else(|| panic!("not named:\n{err}"));
    assert!(
        line.contains("sha256 mismatch") && line.contains("ETag"),
        "{line}"
    );
    assert!(!env.pw.join("sd-vae-ft-mse").join(weights).exists());
    assert!(env.pw.join("sd-vae-ft-mse/config.json").is_file());
    // The bad blob left the cache, so the next run asks the Hub again.
    let n = server.requests().len();
    let o = env.mcld(&server, &["--only", "vae"], &[]);
    assert!(!o.status.success());
    assert!(server.requests()[n..]
        .iter()
        .any(|r| r.path.ends_with(weights)));
}

#[test]
fn hf_token_goes_to_the_hub_and_nowhere_else() {
    let server = Server::start();
    let env = Env::new();
    let sources = download::select(&["sd15".into(), "densepose".into()]).unwrap();
    serve_hub(&server, &sources);
    for s in &sources {
        if let Origin::Url { url, .. } = s.origin {
            server.mirror_file(url, content(url, 1000));
        }
    }
    let o = env.mcld(
        &server,
        &["--only", "sd15,densepose"],
        &[("HF_TOKEN", "hf_secret")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let reqs = server.requests();
    let hub: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.contains("/resolve/"))
        .collect();
    assert!(!hub.is_empty());
    assert!(
        hub.iter()
            .all(|r| r.auth.as_deref() == Some("Bearer hf_secret")),
        "{hub:?}"
    );
    let zoo: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.contains("fbaipublicfiles"))
        .collect();
    assert!(
        !zoo.is_empty() && zoo.iter().all(|r| r.auth.is_none()),
        "{zoo:?}"
    );
}

/// The MCLD sources, picked from the release repo's listing.
fn mcld_sources() -> Vec<Source> {
    let s = download::select(&["mcld".into()]).unwrap();
    assert_eq!(s.len(), 4);
    assert!(s
        .iter()
        .all(|s| matches!(s.origin, Origin::HubListed { .. })));
    s
}

#[test]
fn mcld_weights_are_picked_from_the_listing_and_placed_under_the_loaders_names() {
    let server = Server::start();
    let env = Env::new();
    let repo = download::MCLD_REPO;
    let mut served = serve_hub(&server, &mcld_sources());
    // The pose guider also comes as safetensors one folder up: that one is preferred.
    let st = content("pose_guider.safetensors", 120_000);
    server.hub_file(repo, "release/pose_guider.safetensors", st.clone());
    let mut listing: Vec<String> = served
        .keys()
        .map(|k| k.strip_prefix(&format!("{repo}/")).unwrap().to_string())
        .collect();
    listing.push("release/pose_guider.safetensors".into());
    listing.push("README.md".into());
    server.hub_listing(repo, &listing);
    served.insert("st".into(), st);

    let o = env.mcld(&server, &["--only", "mcld"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    for (name, key) in [
        (
            "denoising_unet.pth",
            format!("{repo}/release/stage2/denoising_unet-30000.pth"),
        ),
        (
            "reference_unet.pth",
            format!("{repo}/release/stage2/reference_unet-30000.pth"),
        ),
        ("pose_guider.safetensors", "st".into()),
        (
            "image_projector.pth",
            format!("{repo}/release/stage2/image_proj-30000.pth"),
        ),
    ] {
        let p = env.ck.join(name);
        assert_eq!(std::fs::read(&p).unwrap(), served[&key], "{}", p.display());
    }
    // The repo was listed once for the four networks; the file matching no network not fetched.
    let reqs = server.requests();
    assert_eq!(
        reqs.iter().filter(|r| r.path.starts_with("/api/")).count(),
        1,
        "{reqs:?}"
    );
    assert!(!reqs.iter().any(|r| r.path.contains("optimizer_state")));
    assert!(!reqs
        .iter()
        .any(|r| r.path.ends_with("stage2/pose_guider-30000.pth")));
    assert!(leftovers(&env.ck).is_empty());
    // Placed files count as present: no request at all the second time.
    let n = server.requests().len();
    let o = env.mcld(&server, &["--only", "mcld"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), n);
}

#[test]
fn a_listing_without_the_weights_names_what_it_found_and_the_other_way_in() {
    let server = Server::start();
    let env = Env::new();
    let files: Vec<String> = ["README.md", "configs/inference.yaml", "model.ckpt"]
        .map(String::from)
        .to_vec();
    server.hub_listing(download::MCLD_REPO, &files);
    let o = env.mcld(&server, &["--only", "mcld"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("MCLD denoising UNet"))
        .unwrap_or_else(|| panic!("not named:\n{err}"));
    for want in [
        "README.md, configs/inference.yaml, model.ckpt",
        download::MCLD_DRIVE,
        "--ckpt_dir",
        "denoising_unet",
    ] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    assert_eq!(err.matches(download::MCLD_DRIVE).count(), 4, "{err}");
    assert!(!env.ck.exists() || std::fs::read_dir(&env.ck).unwrap().next().is_none());
    // Only the listing was asked for, once.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
}

#[test]
fn a_401_from_the_hub_says_gated_private_or_wrong_repo_id() {
    let server = Server::start();
    let env = Env::new();
    server.add(
        format!("/api/models/{}/revision/main", download::MCLD_REPO),
        Vec::new(),
        Kind::Status(401),
    );
    let o = env.mcld(&server, &["--only", "mcld"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HTTP 401") && err.contains("gated, private, or the repo id is wrong"),
        "{err}"
    );
}

#[test]
fn an_exact_published_size_is_checked() {
    let inception = download::SOURCES
        .iter()
        .find(|s| s.id == "inception")
        .unwrap();
    assert_eq!(inception.size, Size::Exact(108_949_747));

    let server = Server::start();
    let env = Env::new();
    let url = "https://example.org/models/sized.pth";
    let body = content("sized", 5_000);
    server.mirror_file(url, body.clone());
    let source = |size| Source {
        id: "sized",
        group: download::Group::Evaluate,
        optional: false,
        what: "test file",
        root: Root::Pretrained,
        dest: "sized.pth",
        origin: Origin::Url {
            url,
            check: Check::None,
        },
        size,
    };
    let out = download::run(&[source(Size::Exact(5_001))], &env.opts(&server));
    assert_eq!(out.failed.len(), 1);
    assert!(
        out.failed[0].reason.contains("size mismatch")
            && out.failed[0].reason.contains("5000")
            && out.failed[0].reason.contains("5001"),
        "{:?}",
        out.failed
    );
    assert!(!env.pw.join("sized.pth").exists() && leftovers(&env.pw).is_empty());
    let out = download::run(&[source(Size::Exact(5_000))], &env.opts(&server));
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(std::fs::read(env.pw.join("sized.pth")).unwrap(), body);
}

/// `train` reads the base models only: its hints must not pull the multi-GB MCLD checkpoints.
#[test]
fn train_hints_do_not_fetch_the_mcld_checkpoints() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/train");
    let mut seen = 0;
    for e in walkdir::WalkDir::new(&dir)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        if e.path().extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        for (i, _) in text.match_indices("download --only") {
            let words: String = text[i + "download --only".len()..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ',')
                .collect();
            let list: Vec<String> = words.split(',').map(str::to_string).collect();
            let picked = download::select(&list).unwrap();
            assert!(
                picked.iter().all(|s| s.root != Root::Checkpoints),
                "{}: `{words}` fetches MCLD checkpoints",
                e.path().display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "{seen}");
}

#[test]
fn the_weights_readme_promises_only_what_the_code_reads() {
    let readme = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pretrained_weights/README.md"),
    )
    .unwrap();
    assert!(readme.contains(mcld::models::face::DETECTOR_ONNX));
    assert!(!readme.contains("det_10g"), "{readme}");
}
