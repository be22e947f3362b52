//! `mcld serve` over HTTP on 127.0.0.1, with the tiny weights and inputs `mcld demo --workdir`
//! writes: the page, the gallery, a generation (progress events, result bytes equal to the
//! `mcld infer` line the page shows), no reload on the second one, the queue and cancel, and
//! every refused input. The real-browser test drives headless Chromium through the page.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `mcld demo --workdir` once per test run: tiny checkpoints, config, inputs, pose gallery.
fn demo_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-demo");
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(env!("CARGO_BIN_EXE_mcld"))
            .args(["demo", "--steps", "1", "--workdir"])
            .arg(&dir)
            .arg("--out")
            .arg(dir.join("demo.png"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mcld demo --workdir failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// A running `mcld serve` (killed on drop) and what it printed.
pub struct Server {
    child: Child,
    pub url: String,
    pub port: u16,
    log: Arc<Mutex<String>>,
    pub spawned: Instant,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        let d = demo_dir();
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mcld"))
            .arg("serve")
            .args(["--port", "0", "--ckpt_dir"])
            .arg(d.join("checkpoints"))
            .arg("--config_path")
            .arg(d.join("train.yaml"))
            .arg("--pretrained_dir")
            .arg(d.join("pretrained_weights"))
            .arg("--poses")
            .arg(d.join("poses"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        std::thread::spawn(move || for _ in out.lines() {});
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}; log: {}", log.lock().unwrap()))
            .trim_end_matches('/')
            .to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child,
            url,
            port,
            log,
            spawned,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        response(ureq::get(&format!("{}{path}", self.url)).call())
    }

    pub fn json(&self, path: &str) -> (u16, Value) {
        let (s, b) = self.get(path);
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    pub fn post(&self, path: &str) -> (u16, Value) {
        let (s, b) = response(ureq::post(&format!("{}{path}", self.url)).call());
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    pub fn submit(&self, form: Form) -> (u16, Value) {
        let (ct, body) = form.finish();
        let (s, b) = response(
            ureq::post(&format!("{}/api/jobs", self.url))
                .set("Content-Type", &ct)
                .send_bytes(&body),
        );
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// Waits until the networks are loaded.
    pub fn ready(&self) -> Value {
        let t = Instant::now();
        loop {
            let (_, s) = self.json("/api/status");
            match s["model"]["state"].as_str() {
                Some("ready") => return s,
                Some("failed") => panic!("networks failed: {s}"),
                _ => {}
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "not ready: {s}; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every event of a job until its last one (or until `stop` says so).
    pub fn events_until(&self, id: &str, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let resp = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(300))
            .build()
            .get(&format!("{}/api/jobs/{id}/events", self.url))
            .call()
            .unwrap();
        assert_eq!(resp.content_type(), "text/event-stream");
        let mut events = Vec::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let ev: Value = serde_json::from_str(data.trim()).unwrap();
            let terminal = matches!(ev["state"].as_str(), Some("done" | "failed" | "cancelled"));
            let halt = stop(&ev);
            events.push(ev);
            if terminal || halt {
                break;
            }
        }
        events
    }

    pub fn events(&self, id: &str) -> Vec<Value> {
        self.events_until(id, |_| false)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn response(r: Result<ureq::Response, ureq::Error>) -> (u16, Vec<u8>) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).unwrap();
    (status, body)
}

/// A multipart/form-data body.
#[derive(Default, Clone)]
pub struct Form {
    body: Vec<u8>,
}

const BOUNDARY: &str = "mcld-test-boundary-7d1f";

impl Form {
    pub fn text(mut self, name: &str, value: &str) -> Self {
        write!(
            self.body,
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
        .unwrap();
        self
    }

    pub fn file(mut self, name: &str, file_name: &str, bytes: &[u8]) -> Self {
        write!(
            self.body,
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
             filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        self.body.extend_from_slice(bytes);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn finish(mut self) -> (String, Vec<u8>) {
        write!(self.body, "--{BOUNDARY}--\r\n").unwrap();
        (
            format!("multipart/form-data; boundary={BOUNDARY}"),
            self.body,
        )
    }
}

/// The demo's sample inputs (source.png, texture.png, face.npy, pose.png).
pub fn demo_inputs() -> PathBuf {
    demo_dir().join("inputs")
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(demo_inputs().join(name)).unwrap()
}

/// The demo's source photo, texture map and face embedding, a gallery pose, a seed.
fn demo_form(steps: usize, seed: u64) -> Form {
    Form::default()
        .file("source", "source.png", &input("source.png"))
        .file("texture", "texture.png", &input("texture.png"))
        .file("face", "face.npy", &input("face.npy"))
        .text("pose", "demo_target.png")
        .text("seed", &seed.to_string())
        .text("steps", &steps.to_string())
}

fn job_id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job id in {v}"))
        .to_string()
}

#[test]
fn page_status_and_gallery() {
    let s = Server::start(&[]);
    // Time to first page: from spawning the process to the page's bytes.
    let t = Instant::now();
    let (code, page) = loop {
        let r = ureq::get(&format!("{}/", s.url)).call();
        if let Ok(r) = r {
            break response(Ok(r));
        }
        assert!(t.elapsed() < Duration::from_secs(30));
    };
    eprintln!(
        "time to first page: {:.0} ms after spawning",
        s.spawned.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(code, 200);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("<title>mcld"), "{page}");
    for (path, kind) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let r = ureq::get(&format!("{}{path}", s.url)).call().unwrap();
        assert!(r.content_type().starts_with(kind), "{path}");
        assert!(r.header("content-security-policy").is_some());
    }
    let st = s.ready();
    assert_eq!(st["model"]["untrained"], true, "{st}");
    assert_eq!(st["gallery"], 2, "{st}");
    let (code, list) = s.json("/api/poses");
    assert_eq!(code, 200);
    assert_eq!(
        list["names"],
        serde_json::json!(["demo_source.png", "demo_target.png"])
    );
    let (code, list) = s.json("/api/poses?q=TARGET");
    assert_eq!((code, list["total"].as_u64()), (200, Some(1)));
    let (code, png) = s.get("/api/poses/demo_target.png");
    assert_eq!(code, 200);
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!(img.height(), 192);
}

#[test]
fn generation_equals_infer_and_second_one_reloads_nothing() {
    let s = Server::start(&[]);
    s.ready();
    let form = demo_form(2, 7).text("guidance", "2.5");
    let (code, sub) = s.submit(form);
    assert_eq!(code, 202, "{sub}");
    let id = job_id(&sub);
    let events = s.events(&id);
    assert_eq!(events[0]["state"], "queued", "{events:?}");
    let steps: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["step"].is_u64())
        .map(|e| (e["step"].as_u64().unwrap(), e["steps"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps, vec![(1, 2), (2, 2)], "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["state"] == "running" && e["eta"].is_f64()));
    let done = events.last().unwrap();
    assert_eq!(done["state"], "done", "{events:?}; log: {}", s.log());
    assert_eq!(done["untrained"], true);
    let (code, served) = s.get(&format!("/api/jobs/{id}/result.png"));
    assert_eq!(code, 200);

    // The command line the page shows, run where the uploaded files are, writes these bytes.
    let command = done["command"].as_str().unwrap();
    assert!(command.starts_with("mcld infer "), "{command}");
    assert!(!command.contains('\''), "{command}");
    let work = tempfile::tempdir().unwrap();
    for f in ["source.png", "texture.png", "face.npy"] {
        std::fs::copy(demo_dir().join("inputs").join(f), work.path().join(f)).unwrap();
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    let out = Command::new(env!("CARGO_BIN_EXE_mcld"))
        .args(&words[1..])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read(work.path().join("result.png")).unwrap();
    assert!(
        written == served,
        "the served result differs from `{command}`"
    );
    for flag in ["--seed 7", "--steps 2", "--guidance 2.5", "--pose /"] {
        assert!(command.contains(flag), "{flag} missing from {command}");
    }

    // A second generation reuses the loaded networks.
    let before = s.json("/api/status").1;
    let t = Instant::now();
    let (code, sub) = s.submit(demo_form(2, 8));
    assert_eq!(code, 202);
    let events = s.events(&job_id(&sub));
    assert_eq!(events.last().unwrap()["state"], "done");
    let after = s.json("/api/status").1;
    eprintln!(
        "second generation {:.2}s, network loads {} -> {}",
        t.elapsed().as_secs_f64(),
        before["network_loads"],
        after["network_loads"]
    );
    assert_eq!(before["network_loads"], 1, "{before}");
    assert_eq!(after["network_loads"], 1, "{after}");
    assert_eq!(after["generations"], 2);
    assert!(
        !s.log().contains("networks loaded in")
            || s.log().matches("networks loaded in").count() == 1
    );
}

#[test]
fn queue_positions_cancel_and_bound() {
    let s = Server::start(&["--max-queue", "1"]);
    s.ready();
    // A long job, followed until its first step.
    let (code, a) = s.submit(demo_form(1000, 1));
    assert_eq!(code, 202, "{a}");
    let a = job_id(&a);
    let first = s.events_until(&a, |e| e["step"].is_u64());
    assert!(first.last().unwrap()["step"].is_u64(), "{first:?}");

    let (code, b) = s.submit(demo_form(1, 2));
    assert_eq!(code, 202, "{b}");
    assert_eq!(b["position"], 1);
    let b = job_id(&b);
    let (code, c) = s.submit(demo_form(1, 3));
    assert_eq!(code, 503, "{c}");
    assert!(
        c["error"].as_str().unwrap().contains("queue is full"),
        "{c}"
    );

    let (code, r) = s.post(&format!("/api/jobs/{b}/cancel"));
    assert_eq!(code, 200, "{r}");
    let ev = s.events(&b);
    assert_eq!(ev.last().unwrap()["state"], "cancelled", "{ev:?}");
    assert!(ev.iter().all(|e| e["state"] != "running"));

    let (code, r) = s.post(&format!("/api/jobs/{a}/cancel"));
    assert_eq!(code, 202, "{r}");
    let ev = s.events(&a);
    assert_eq!(ev.last().unwrap()["state"], "cancelled", "{ev:?}");
    let last_step = ev.iter().filter_map(|e| e["step"].as_u64()).max().unwrap();
    assert!(last_step < 1000, "cancel did not stop the sampler");
    let (code, _) = s.get(&format!("/api/jobs/{a}/result.png"));
    assert_eq!(code, 404);
    let (code, r) = s.post(&format!("/api/jobs/{a}/cancel"));
    assert_eq!(code, 409, "{r}");
    let (code, r) = s.post("/api/jobs/0123456789abcdef/cancel");
    assert_eq!(code, 404, "{r}");

    // The queue moves on: a new job runs to the end.
    let (code, d) = s.submit(demo_form(1, 4));
    assert_eq!(code, 202, "{d}");
    let ev = s.events(&job_id(&d));
    assert_eq!(ev.last().unwrap()["state"], "done", "{ev:?}");
}

/// The status line of a GET of `path` exactly as written.
fn raw_get(s: &Server, path: &str) -> String {
    let mut t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        t,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        s.port
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(t).read_line(&mut line).unwrap();
    line
}

/// A request whose declared body exceeds the limit, sent without its body: the answer comes
/// from the headers alone. Returns the status line.
fn raw_declared_oversize(s: &Server, bytes: usize) -> String {
    let mut t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        t,
        "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: multipart/form-data; \
         boundary={BOUNDARY}\r\nContent-Length: {bytes}\r\n\r\n",
        s.port
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(t).read_line(&mut line).unwrap();
    line
}

/// An upload over the limit streamed in chunks (no length given): the server stops reading.
fn raw_streamed_oversize(s: &Server, bytes: usize) -> String {
    let t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut w = t.try_clone().unwrap();
    let port = s.port;
    let writer = std::thread::spawn(move || {
        let head = format!(
            "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: \
             multipart/form-data; boundary={BOUNDARY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let part = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"source\"; \
             filename=\"big.png\"\r\n\r\n"
        );
        let _ = w.write_all(head.as_bytes());
        let _ = write!(w, "{:x}\r\n{part}\r\n", part.len());
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..bytes.div_ceil(chunk.len()) {
            if write!(w, "{:x}\r\n", chunk.len()).is_err()
                || w.write_all(&chunk).is_err()
                || w.write_all(b"\r\n").is_err()
            {
                return;
            }
        }
        let _ = w.write_all(b"0\r\n\r\n");
    });
    let mut line = String::new();
    BufReader::new(t).read_line(&mut line).unwrap();
    let _ = writer.join();
    line
}

#[test]
fn bad_requests_are_refused_and_the_server_stays_up() {
    let s = Server::start(&["--max-upload-mb", "2"]);
    s.ready();
    let src = input("source.png");
    let tex = input("texture.png");
    let photo = image::load_from_memory(&src).unwrap();
    let mut jpeg = Vec::new();
    photo
        .to_rgb8()
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let truncated = &jpeg[..jpeg.len() / 2];
    let npy_short = {
        let p = tempfile::NamedTempFile::new().unwrap();
        mcld::data::npy::write_f32(p.path(), &[3], &[1.0, 2.0, 3.0]).unwrap();
        std::fs::read(p.path()).unwrap()
    };
    let base = || {
        Form::default()
            .file("source", "source.png", &src)
            .file("texture", "texture.png", &tex)
            .text("steps", "1")
    };
    let gallery = |name: &str| base().text("pose", name);
    let cases: Vec<(&str, Form, u16, &str)> = vec![
        (
            "no source",
            Form::default().text("pose", "demo_target.png"),
            400,
            "no source photo",
        ),
        (
            "source not an image",
            Form::default()
                .file("source", "notes.png", b"hello, not an image")
                .text("pose", "demo_target.png"),
            400,
            "cannot decode image",
        ),
        (
            "truncated JPEG",
            Form::default()
                .file("source", "cut.jpg", truncated)
                .text("pose", "demo_target.png"),
            400,
            "truncated JPEG",
        ),
        (
            "empty file",
            Form::default()
                .file("source", "empty.png", b"")
                .text("pose", "demo_target.png"),
            400,
            "empty",
        ),
        ("no pose", base(), 400, "no target pose"),
        (
            "two poses",
            gallery("demo_target.png").file("pose_iuv", "p.png", &src),
            400,
            "one target pose",
        ),
        (
            "relative path",
            gallery("../../etc/passwd"),
            400,
            "not a path",
        ),
        ("absolute path", gallery("/etc/passwd"), 400, "not a path"),
        (
            "hidden file",
            gallery(".demo_target.png"),
            400,
            "not a path",
        ),
        (
            "unknown pose",
            gallery("nobody.png"),
            404,
            "not in the gallery",
        ),
        (
            "photo as IUV",
            base().file("pose_iuv", "photo.png", &src),
            400,
            "not a DensePose IUV image",
        ),
        (
            "bad texture",
            Form::default()
                .file("source", "source.png", &src)
                .file("texture", "t.png", b"\x89PNG\r\n\x1a\n cut")
                .text("pose", "demo_target.png"),
            400,
            "texture",
        ),
        (
            "bad embedding",
            gallery("demo_target.png").file("face", "f.npy", b"\x93NUMPY garbage"),
            400,
            "bad .npy",
        ),
        (
            "short embedding",
            gallery("demo_target.png").file("face", "f.npy", &npy_short),
            400,
            "512",
        ),
        (
            "bad seed",
            gallery("demo_target.png").text("seed", "abc"),
            400,
            "seed",
        ),
        (
            "zero steps",
            Form::default()
                .file("source", "source.png", &src)
                .text("pose", "demo_target.png")
                .text("steps", "0"),
            400,
            "steps",
        ),
        (
            "too many steps",
            Form::default()
                .file("source", "source.png", &src)
                .text("pose", "demo_target.png")
                .text("steps", "5000"),
            400,
            "steps",
        ),
        (
            "guidance not a number",
            gallery("demo_target.png").text("guidance", "NaN"),
            400,
            "guidance",
        ),
        (
            "unknown field",
            gallery("demo_target.png").text("path", "/etc/passwd"),
            400,
            "unknown form field",
        ),
        (
            "field twice",
            gallery("demo_target.png")
                .text("seed", "1")
                .text("seed", "2"),
            400,
            "twice",
        ),
        (
            "photo and texture for one region",
            gallery("demo_target.png")
                .file("garment_upper", "a.png", &src)
                .file("garment_texture_upper", "b.png", &tex),
            400,
            "not both",
        ),
        (
            "two identities",
            gallery("demo_target.png")
                .file("face_from", "a.png", &src)
                .file("face_emb", "e.npy", &input("face.npy")),
            400,
            "not both",
        ),
        ("not multipart", Form::default(), 400, ""),
    ];
    for (what, form, status, needle) in cases {
        let (code, body) = if what == "not multipart" {
            let (c, b) = response(
                ureq::post(&format!("{}/api/jobs", s.url))
                    .set("Content-Type", "application/json")
                    .send_string("{\"source\": \"/etc/passwd\"}"),
            );
            (c, serde_json::from_slice(&b).unwrap_or(Value::Null))
        } else {
            s.submit(form)
        };
        assert_eq!(code, status, "{what}: {body}");
        if !needle.is_empty() {
            let msg = body["error"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
        }
    }

    // Refused inside the job, reported on the page: a donor texture of the wrong size.
    let mut small = Vec::new();
    image::imageops::crop_imm(&photo.to_rgb8(), 0, 0, 300, 200)
        .to_image()
        .write_to(
            &mut std::io::Cursor::new(&mut small),
            image::ImageFormat::Png,
        )
        .unwrap();
    let (code, sub) =
        s.submit(gallery("demo_target.png").file("garment_texture_upper", "small.png", &small));
    assert_eq!(code, 202, "{sub}");
    let ev = s.events(&job_id(&sub));
    let last = ev.last().unwrap();
    assert_eq!(last["state"], "failed", "{ev:?}");
    assert!(
        last["message"].as_str().unwrap().contains("512x512"),
        "{last}"
    );

    // Gallery and job routes refuse paths.
    for path in [
        "/api/poses/..%2F..%2Fetc%2Fpasswd",
        "/api/poses/%2Fetc%2Fpasswd",
    ] {
        let (code, b) = s.get(path);
        assert_eq!(code, 400, "{path}: {}", String::from_utf8_lossy(&b));
    }
    // Sent verbatim (an HTTP client would resolve the dots first).
    for (path, code) in [
        ("/api/poses/..", 400),
        ("/api/poses/%2E%2E", 400),
        ("/api/poses/../../etc/passwd", 404),
        ("/api/jobs/../../../etc/passwd", 404),
    ] {
        let line = raw_get(&s, path);
        assert!(line.contains(&format!(" {code} ")), "{path}: {line}");
    }
    for path in ["/api/jobs/nope/result.png", "/etc/passwd"] {
        let (code, _) = s.get(path);
        assert_eq!(code, 404, "{path}");
    }

    // Oversized uploads: declared, and streamed without a length.
    let line = raw_declared_oversize(&s, 3 << 20);
    assert!(line.contains(" 413 "), "{line}");
    let line = raw_streamed_oversize(&s, 3 << 20);
    assert!(line.contains(" 413 "), "{line}");

    // Another site's page cannot use the server.
    let (code, _) = response(
        ureq::get(&format!("{}/api/status", s.url))
            .set("Host", &format!("evil.example:{}", s.port))
            .call(),
    );
    assert_eq!(code, 403);
    // (a small body: the refusal comes before it is read)
    let (ct, body) = Form::default().text("pose", "demo_target.png").finish();
    let (code, _) = response(
        ureq::post(&format!("{}/api/jobs", s.url))
            .set("Content-Type", &ct)
            .set("Origin", "http://evil.example")
            .send_bytes(&body),
    );
    assert_eq!(code, 403);

    // Still up, and still generating.
    let (code, sub) = s.submit(demo_form(1, 5));
    assert_eq!(code, 202, "{sub}");
    let ev = s.events(&job_id(&sub));
    assert_eq!(
        ev.last().unwrap()["state"],
        "done",
        "{ev:?}; log: {}",
        s.log()
    );
}
