//! Shared helpers for the fixture tests: where the fixtures are, loading a case, and the
//! tolerance rules of `../shared/fixtures/*/README.md`. A missing fixture is a failure, not a skip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Fixture root: `$MCLD_FIXTURES`, else `../shared/fixtures` next to the repository.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MCLD_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// Device the fixture cases run on: `MCLD_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), else the CPU.
/// scripts/gpu-run.sh sets it to run the model, pipeline and training fixtures on a GPU with
/// the tolerances they have on the CPU; an unusable value fails the test rather than falling
/// back to the CPU.
pub fn device() -> Device {
    match std::env::var("MCLD_TEST_DEVICE") {
        Ok(s) if !s.trim().is_empty() => {
            mcld::device::parse_device(&s).unwrap_or_else(|e| panic!("MCLD_TEST_DEVICE={s}: {e}"))
        }
        _ => Device::Cpu,
    }
}

/// Path of a file under the fixture root; panics (fails the test) when it is missing.
pub fn fixture_path(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(
        p.exists(),
        "fixture file {} is missing (set MCLD_FIXTURES to the fixture root)",
        p.display()
    );
    p
}

/// One fixture case: its JSON and its tensors (all on the test [`device`]).
pub struct Case {
    pub name: String,
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
    pub safetensors_path: PathBuf,
}

/// Loads `<group>/<case>.json` and `<group>/<case>.safetensors`.
pub fn load_case(group: &str, case: &str) -> Case {
    let jp = fixture_path(&format!("{group}/{case}.json"));
    let sp = fixture_path(&format!("{group}/{case}.safetensors"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(&sp, &device()).unwrap();
    Case {
        name: case.to_string(),
        json,
        tensors,
        safetensors_path: sp,
    }
}

impl Case {
    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: tensor {key} missing from the fixture", self.name))
    }

    /// The tensor as f32 (fixtures store uint8 images and int64 timesteps too).
    pub fn f32(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::F32).unwrap()
    }

    /// Every tensor key starting with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut k: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// Tensors under `prefix`, with the prefix stripped (a module's weights in a composite case).
    pub fn weights_with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect()
    }

    /// The model fixtures' tolerance for an output: exact key, else longest prefix, else default.
    pub fn tolerance(&self, output: &str) -> Tolerance {
        let tol = &self.json["tolerance"];
        let obj = tol.as_object().expect("tolerance block");
        let mut best: Option<(&String, &serde_json::Value)> = None;
        for (k, v) in obj {
            if k == "default" {
                continue;
            }
            if (output == k || output.starts_with(k.as_str()))
                && best.map(|(b, _)| k.len() > b.len()).unwrap_or(true)
            {
                best = Some((k, v));
            }
        }
        let v = best.map(|(_, v)| v).unwrap_or(&tol["default"]);
        if let Some(r) = v.get("rel_to_max").and_then(|x| x.as_f64()) {
            Tolerance::RelToMax(r)
        } else if let Some(r) = v.get("rel").and_then(|x| x.as_f64()) {
            Tolerance::Rel(r)
        } else if let Some(a) = v.get("max_abs_err").and_then(|x| x.as_f64()) {
            Tolerance::Abs(a)
        } else if v.get("rule").and_then(|x| x.as_str()) == Some("exact") {
            Tolerance::Abs(0.0)
        } else {
            Tolerance::Rel(1e-4)
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// max_abs_err <= rel * max(1, max|expected|)
    Rel(f64),
    /// max_abs_err <= r * max|expected|
    RelToMax(f64),
    /// max_abs_err <= a
    Abs(f64),
}

/// Max |a - b| and max |b| over two tensors of the same shape, in f64.
pub fn max_errs(got: &Tensor, expected: &Tensor) -> (f64, f64) {
    assert_eq!(
        got.dims(),
        expected.dims(),
        "shape mismatch: got {:?}, expected {:?}",
        got.dims(),
        expected.dims()
    );
    let g = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut err = 0f64;
    let mut mx = 0f64;
    for (a, b) in g.iter().zip(e.iter()) {
        let d = (a - b).abs();
        if d.is_nan() || d > err {
            err = if d.is_nan() { f64::INFINITY } else { d };
        }
        mx = mx.max(b.abs());
    }
    (err, mx)
}

/// Plain softmax(q k^T / sqrt(d)) v in f64, one matrix at a time: the yardstick for attention.
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (q, k, v) = (
        q.to_dtype(DType::F64).unwrap(),
        k.to_dtype(DType::F64).unwrap(),
        v.to_dtype(DType::F64).unwrap(),
    );
    let d = q.dim(candle_core::D::Minus1).unwrap() as f64;
    let s = (q.matmul(&k.t().unwrap()).unwrap() / d.sqrt()).unwrap();
    let m = s.max_keepdim(candle_core::D::Minus1).unwrap();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e
        .broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
        .unwrap();
    p.matmul(&v).unwrap()
}

/// Asserts `got` matches `expected` within `tol`, printing the worst error either way.
pub fn assert_close(name: &str, got: &Tensor, expected: &Tensor, tol: Tolerance) {
    let (err, mx) = max_errs(got, expected);
    let bound = match tol {
        Tolerance::Rel(r) => r * mx.max(1.0),
        Tolerance::RelToMax(r) => r * mx,
        Tolerance::Abs(a) => a,
    };
    println!("{name}: max_abs_err {err:.3e} (bound {bound:.3e}, max|expected| {mx:.3e})");
    assert!(
        err <= bound,
        "{name}: max_abs_err {err:.3e} exceeds {bound:.3e} ({tol:?}, max|expected| {mx:.3e})"
    );
}

/// Checks an output of a model case against its stored value with the case's tolerance.
pub fn check_output(case: &Case, output_key: &str, got: &Tensor) {
    let expected = case.get(output_key);
    let tol = case.tolerance(output_key);
    assert_close(output_key, got, expected, tol);
}

/// Small public face models the face tests run on: SCRFD (PyPI sdist `scrfd` 0.3.0, with its
/// test photos and truth file) and an ArcFace-style 112x112 -> 512 recogniser (npm
/// `faceplugin-face-recognition-js` 0.0.1). Fetched once into the target folder's test cache;
/// a failed fetch fails the test.
pub struct FaceTestModels {
    /// The unpacked `scrfd-0.3.0` sdist (`models/`, `images/`, `tests/`).
    pub scrfd_dir: PathBuf,
    pub detector: PathBuf,
    pub recogniser: PathBuf,
}

pub fn face_test_models() -> &'static FaceTestModels {
    use std::process::Command;
    static A: std::sync::OnceLock<FaceTestModels> = std::sync::OnceLock::new();
    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    A.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let cache = target.join("mcld-test-cache/face");
        std::fs::create_dir_all(&cache).unwrap();
        let scrfd_dir = cache.join("scrfd-0.3.0");
        let detector = scrfd_dir.join("models/scrfd.onnx");
        if !detector.is_file() {
            run(Command::new("pip")
                .args(["download", "--no-deps", "--no-binary", ":all:"])
                .args(["scrfd==0.3.0", "-d"])
                .arg(&cache));
            run(Command::new("tar")
                .arg("xzf")
                .arg(cache.join("scrfd-0.3.0.tar.gz"))
                .arg("-C")
                .arg(&cache));
        }
        let recogniser = cache.join("package/model/fr_feature.onnx");
        if !recogniser.is_file() {
            run(Command::new("npm")
                .args(["pack", "faceplugin-face-recognition-js@0.0.1"])
                .arg("--pack-destination")
                .arg(&cache)
                .current_dir(&cache));
            run(Command::new("tar")
                .arg("xzf")
                .arg(cache.join("faceplugin-face-recognition-js-0.0.1.tgz"))
                .arg("-C")
                .arg(&cache)
                .arg("package/model/fr_feature.onnx"));
        }
        FaceTestModels {
            scrfd_dir,
            detector,
            recogniser,
        }
    })
}

/// The `mcld` binary built for these tests, as a command to add arguments to.
pub fn mcld() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mcld"))
}

/// Runs the `mcld` binary built for these tests; (success, stdout then stderr).
pub fn run_mcld(args: &[&str]) -> (bool, String) {
    let out = mcld().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An IUV image (flat H x W x [I, U, V]) against a DensePose case's `output.iuv`, with the
/// fixture README's allowance: a difference counts as allowed only inside the person's box where
/// `label_may_flip` is set (any channel) or `uv255_may_flip` is set and it is at most 1 level.
/// Returns (disallowed, allowed).
pub fn iuv_flip_differences(case: &Case, got: &[u8], box_xyxy: &[f32; 4]) -> (usize, usize) {
    let want = case.get("output.iuv");
    let (h, w, _) = want.dims3().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(got.len(), want.len(), "iuv size");
    let lf = case.get("output.chart.label_may_flip");
    let (ch, cw) = lf.dims2().unwrap();
    let lf = lf.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let uvf = case
        .get("output.chart.uv255_may_flip")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let (bx, by, _, _) = mcld::models::densepose::iuv::box_xywh_int(box_xyxy);
    let (mut bad, mut allowed) = (0, 0);
    for y in 0..h {
        for x in 0..w {
            let (r, c) = (y as i64 - by, x as i64 - bx);
            let inside = r >= 0 && c >= 0 && (r as usize) < ch && (c as usize) < cw;
            for k in 0..3 {
                let o = (y * w + x) * 3 + k;
                let d = (got[o] as i32 - want[o] as i32).abs();
                if d == 0 {
                    continue;
                }
                let ok = inside && {
                    let p = r as usize * cw + c as usize;
                    lf[p] == 1 || (k > 0 && uvf[(k - 1) * ch * cw + p] == 1 && d <= 1)
                };
                if ok {
                    allowed += 1;
                } else {
                    bad += 1;
                }
            }
        }
    }
    (bad, allowed)
}
