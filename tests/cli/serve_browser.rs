//! The page of `mcld serve` in a real browser: headless Chromium (Debian's `chromium`) driven
//! by `browser/drive.cjs` through playwright-core (pinned in `browser/package-lock.json`,
//! installed once into target/mcld-test-cache/). It uploads the demo photo, picks a gallery
//! pose, clicks Generate, waits for the result image and saves a screenshot; no console error
//! may be logged.
//!
//! Without Chromium, node or the npm registry the test fails, naming what is missing and how to
//! install it (`.ci/run` installs the browser when it is missing): it never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::serve::Server;

fn missing(why: &str) -> ! {
    panic!(
        "the browser test of mcld serve cannot run: {why}. Install it (Debian: apt-get install -y \
         chromium nodejs npm; .ci/run does so when it is missing)"
    );
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MCLD_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn works(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// playwright-core as pinned by the lock file, installed with `npm ci` once.
fn playwright(here: &Path) -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let lock = std::fs::read(here.join("package-lock.json")).map_err(|e| e.to_string())?;
    // Keyed by the lock file, so a new pin installs afresh.
    let key: u32 = lock
        .iter()
        .fold(2166136261u32, |h, b| (h ^ *b as u32).wrapping_mul(16777619));
    let dir = target.join(format!("mcld-test-cache/playwright-{key:08x}"));
    if dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(here.join(f), dir.join(f)).map_err(|e| e.to_string())?;
    }
    let out = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("npm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "npm ci of playwright-core failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir)
}

#[test]
fn serve_page_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        missing("no Chromium (/usr/bin/chromium)");
    };
    if !works("node", "--version") || !works("npm", "--version") {
        missing("no node/npm to drive the browser with playwright-core");
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cli/browser");
    let pw = match playwright(&here) {
        Ok(p) => p,
        Err(e) => missing(&e),
    };
    let s = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let shot = std::env::var_os("MCLD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| work.path().join("page.png"));
    let inputs = super::serve::demo_inputs();
    let out = Command::new("node")
        .arg(here.join("drive.cjs"))
        .arg(format!("{}/", s.url))
        .arg(inputs.join("source.png"))
        .arg(inputs.join("texture.png"))
        .arg(&shot)
        .env("PLAYWRIGHT_DIR", &pw)
        .env("CHROMIUM", &chromium)
        .env("USER_DATA_DIR", work.path().join("profile"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser run failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        s.log()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("browser: {report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["seen"]["result"], serde_json::json!([512, 512]));
    assert!(report["seen"]["pose"].as_u64() > Some(0), "{report}");
    assert!(report["seen"]["source"].as_u64() > Some(0), "{report}");
    assert_eq!(report["seen"]["badge"], true);
    assert!(report["seen"]["command"]
        .as_str()
        .unwrap()
        .starts_with("mcld infer"));
    let png = image::open(&shot).unwrap();
    let (w, h) = (png.width(), png.height());
    assert!(w >= 1000 && h >= 800, "{w}x{h}");
}
