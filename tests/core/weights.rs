//! Weight loading: torch zip/legacy checkpoints, numpy pickles, safetensors, model folders,
//! the refusal of hostile pickles and the strict loader's key report. The small files under
//! tests/fixtures/weights were written by make_fixtures.py there (torch + numpy); the expected
//! values sit beside them as safetensors and are compared exactly.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Tolerance};
use mcld::weights::{self, Format, ModelDir, StrictWeights};
use mcld::Error;

fn fx(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/weights")
        .join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx(name), &Device::Cpu).unwrap()
}

/// Same names, same dtypes, same shapes, identical values.
fn assert_same(what: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    let mut gk: Vec<_> = got.keys().collect();
    let mut wk: Vec<_> = want.keys().collect();
    gk.sort();
    wk.sort();
    assert_eq!(gk, wk, "{what}: tensor names differ");
    for k in wk {
        let (g, w) = (&got[k], &want[k]);
        assert_eq!(g.dtype(), w.dtype(), "{what}: {k} dtype");
        assert_eq!(g.dims(), w.dims(), "{what}: {k} shape");
        let g64 = g.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert_close(&format!("{what}: {k}"), &g64, &w64, Tolerance::Abs(0.0));
    }
}

#[test]
fn formats_are_told_from_content() {
    assert_eq!(weights::detect(&fx("zip.pth")).unwrap(), Format::TorchZip);
    assert_eq!(
        weights::detect(&fx("legacy.pth")).unwrap(),
        Format::TorchLegacy
    );
    assert_eq!(weights::detect(&fx("d2_p4.pkl")).unwrap(), Format::Pickle);
    assert_eq!(
        weights::detect(&fx("expected_d2.safetensors")).unwrap(),
        Format::Safetensors
    );
    let err = weights::detect(&fx("make_fixtures.py")).unwrap_err();
    assert!(err.to_string().contains("unrecognised"), "{err}");
}

#[test]
fn zip_checkpoint_matches_torch() {
    let got = weights::load(&fx("zip.pth"), &Device::Cpu).unwrap();
    assert_same("zip.pth", &got, &expected("expected_torch.safetensors"));
}

#[test]
fn legacy_checkpoint_matches_torch() {
    let got = weights::load(&fx("legacy.pth"), &Device::Cpu).unwrap();
    assert_same("legacy.pth", &got, &expected("expected_torch.safetensors"));
}

#[test]
fn views_sharing_one_storage_are_honoured() {
    let want = expected("expected_torch.safetensors");
    for f in ["zip.pth", "legacy.pth"] {
        let got = weights::load(&fx(f), &Device::Cpu).unwrap();
        let base = &got["shared.base"];
        let t = base.t().unwrap().contiguous().unwrap();
        assert_close(
            &format!("{f}: transposed vs base.t()"),
            &got["shared.transposed"],
            &t,
            Tolerance::Abs(0.0),
        );
        assert_eq!(got["shared.slice"].dims(), want["shared.slice"].dims());
    }
}

#[test]
fn nested_state_dicts_are_unwrapped() {
    let want = expected("expected_torch.safetensors");
    for f in ["nested_zip.pth", "nested_legacy.pth"] {
        let got = weights::load_full(&fx(f), &Device::Cpu).unwrap();
        assert_eq!(got.nested_under.as_deref(), Some("state_dict"), "{f}");
        assert_same(f, &got.tensors, &want);
    }
}

#[test]
fn hostile_pickles_are_refused_without_running() {
    let marker = Path::new("/tmp/mcld_hostile_pickle_ran");
    let _ = std::fs::remove_file(marker);
    for f in ["hostile_zip.pth", "hostile.pkl"] {
        let err = weights::load(&fx(f), &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::UnsafePickle { .. }), "{f}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("posix.system"), "{f}: {msg}");
        assert!(msg.contains(f), "{f}: error does not name the file: {msg}");
    }
    assert!(!marker.exists(), "the hostile command ran");
}

/// Writes `bytes` to a temp file and loads it.
fn load_bytes(bytes: &[u8]) -> mcld::Result<HashMap<String, Tensor>> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.pkl");
    std::fs::write(&p, bytes).unwrap();
    weights::load(&p, &Device::Cpu)
}

#[test]
fn other_globals_and_opcodes_are_refused() {
    // Protocol 4: STACK_GLOBAL builtins.eval, called on a string.
    let mut p = vec![0x80, 4, 0x8c, 8];
    p.extend_from_slice(b"builtins");
    p.extend_from_slice(&[0x8c, 4]);
    p.extend_from_slice(b"eval");
    p.extend_from_slice(&[0x93, 0x8c, 1, b'1', 0x85, b'R', b'.']);
    let err = load_bytes(&p).unwrap_err();
    assert!(matches!(err, Error::UnsafePickle { .. }), "{err}");
    assert!(err.to_string().contains("builtins.eval"), "{err}");

    // Protocol 2 text GLOBAL of subprocess.Popen.
    let mut p = vec![0x80, 2, b'c'];
    p.extend_from_slice(b"subprocess\nPopen\n");
    p.extend_from_slice(b")R.");
    let err = load_bytes(&p).unwrap_err();
    assert!(err.to_string().contains("subprocess.Popen"), "{err}");

    // INST instantiates arbitrary classes: refused outright.
    let mut p = vec![0x80, 2, b'(', b'i'];
    p.extend_from_slice(b"os\nsystem\n.");
    let err = load_bytes(&p).unwrap_err();
    assert!(matches!(err, Error::UnsafePickle { .. }), "{err}");
}

#[test]
fn malformed_files_give_errors_not_panics() {
    for f in [
        "zip.pth",
        "legacy.pth",
        "d2_p2.pkl",
        "d2_p4.pkl",
        "d2_p5.pkl",
    ] {
        let bytes = std::fs::read(fx(f)).unwrap();
        for cut in [16, bytes.len() / 3, bytes.len() / 2, bytes.len() - 9] {
            let r = load_bytes(&bytes[..cut]);
            assert!(r.is_err(), "{f} cut at {cut} loaded");
        }
    }
    // A pickle whose top level is not a dict.
    let err = load_bytes(&[0x80, 2, b'K', 5, b'.']).unwrap_err();
    assert!(err.to_string().contains("expected a dict"), "{err}");
    // Stack underflow.
    let err = load_bytes(&[0x80, 2, b'R', b'.']).unwrap_err();
    assert!(err.to_string().contains("malformed pickle"), "{err}");
}

#[test]
fn deep_and_cyclic_pickles_do_not_crash() {
    // A million nested 1-tuples: freeing them must not overflow the stack.
    let mut p = vec![0x80, 2, b'K', 1];
    p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    p.push(b'.');
    let err = load_bytes(&p).unwrap_err();
    assert!(err.to_string().contains("expected a dict"), "{err}");
    // A dict that holds itself through the memo.
    let err = load_bytes(&[0x80, 2, b'}', b'q', 0, b'K', 1, b'h', 0, b's', b'.']).unwrap_err();
    assert!(err.to_string().contains("no dict of tensors"), "{err}");
}

#[test]
fn detectron2_numpy_pickles_match_numpy() {
    let want = expected("expected_d2.safetensors");
    for f in ["d2_p2.pkl", "d2_p4.pkl", "d2_p5.pkl"] {
        let got = weights::load_full(&fx(f), &Device::Cpu).unwrap();
        assert_eq!(got.nested_under.as_deref(), Some("model"), "{f}");
        assert_same(f, &got.tensors, &want);
    }
}

#[test]
fn densepose_fixture_pickle_matches_its_safetensors() {
    let pkl = common::fixture_path("densepose/densepose_weights.pkl");
    let st = common::fixture_path("densepose/densepose_rcnn.safetensors");
    let got = weights::load_full(&pkl, &Device::Cpu).unwrap();
    assert_eq!(got.nested_under.as_deref(), Some("model"));
    let reference = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let want: HashMap<String, Tensor> = reference
        .into_iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .collect();
    assert!(!want.is_empty());
    assert_same("densepose_weights.pkl", &got.tensors, &want);
    println!("densepose: {} tensors identical", want.len());
}

#[test]
fn safetensors_load_by_mmap() {
    let p = fx("expected_torch.safetensors");
    let got = weights::load(&p, &Device::Cpu).unwrap();
    assert_same("safetensors", &got, &expected("expected_torch.safetensors"));
}

fn small_map() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let w = Tensor::arange(0f32, 6., &dev)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    m.insert("fc.weight".to_string(), w.to_dtype(DType::F16).unwrap());
    m.insert(
        "fc.bias".to_string(),
        Tensor::new(&[1f32, 2.], &dev).unwrap(),
    );
    m.insert(
        "extra.buffer".to_string(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    m.insert(
        "module.head.weight".to_string(),
        Tensor::zeros((1, 2), DType::F32, &dev).unwrap(),
    );
    m
}

#[test]
fn strict_loader_reports_unexpected_keys() {
    let sw = StrictWeights::new(small_map(), "model.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    let lin = candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    // The f16 weight was converted to the requested dtype.
    assert_eq!(lin.weight().dtype(), DType::F32);
    assert_eq!(
        lin.weight()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![0., 1., 2., 3., 4., 5.]
    );
    let r = sw.report();
    assert!(r.missing.is_empty());
    assert_eq!(r.unexpected, vec!["extra.buffer", "module.head.weight"]);
    assert!(r.notes.iter().any(|n| n.contains("module.")), "{r}");
    let err = sw.finish().unwrap_err().to_string();
    assert!(
        err.contains("model.pth") && err.contains("extra.buffer"),
        "{err}"
    );

    let sw = StrictWeights::new(small_map(), "model.pth").allow_unused(["extra.", "module."]);
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    assert!(sw.finish().unwrap().is_clean());
}

#[test]
fn strict_loader_names_missing_and_mismatched_tensors() {
    let sw = StrictWeights::new(small_map(), "model.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    let err = candle_nn::linear(3, 2, vb.pp("head"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("head.weight") && err.contains("model.pth"),
        "{err}"
    );
    let err = candle_nn::linear(4, 2, vb.pp("fc"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("fc.weight") && err.contains("[2, 4]") && err.contains("[2, 3]"),
        "{err}"
    );

    // Collecting mode lists every problem in one pass.
    let sw = StrictWeights::new(small_map(), "model.pth").collecting();
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("head")).unwrap();
    candle_nn::linear(4, 2, vb.pp("fc")).unwrap();
    let r = sw.report();
    assert_eq!(r.missing, vec!["head.bias", "head.weight"]);
    assert_eq!(r.mismatched.len(), 1);
    assert_eq!(r.mismatched[0].name, "fc.weight");
    assert_eq!(r.mismatched[0].expected, vec![2, 4]);
    assert_eq!(r.mismatched[0].found, vec![2, 3]);
    assert_eq!(r.unexpected, vec!["extra.buffer", "module.head.weight"]);
    assert!(r.notes[0].contains("1 of them would match"), "{r}");
    assert!(sw.finish().is_err());
}

#[test]
fn model_dir_prefers_safetensors_and_lists_what_it_sought() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = ModelDir::open(d).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(d.join("config.json"), r#"{"in_channels": 4, "unknown": 1}"#).unwrap();
    let err = ModelDir::open(d).unwrap_err().to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
    );
    std::fs::copy(fx("zip.pth"), d.join("pytorch_model.bin")).unwrap();
    let md = ModelDir::open(d).unwrap();
    assert_eq!(md.weights, vec![d.join("pytorch_model.bin")]);
    assert_same(
        "pytorch_model.bin",
        &md.load(&Device::Cpu).unwrap(),
        &expected("expected_torch.safetensors"),
    );
    std::fs::copy(
        fx("expected_d2.safetensors"),
        d.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let md = ModelDir::open(d).unwrap();
    assert_eq!(
        md.weights,
        vec![d.join("diffusion_pytorch_model.safetensors")]
    );
    assert_same(
        "folder",
        &md.load(&Device::Cpu).unwrap(),
        &expected("expected_d2.safetensors"),
    );

    #[derive(serde::Deserialize)]
    struct Cfg {
        in_channels: usize,
    }
    assert_eq!(md.config::<Cfg>().unwrap().in_channels, 4);
}

#[test]
fn unexpected_keys_can_be_a_warning_but_missing_and_misshapen_stay_errors() {
    let mut m = small_map();
    for i in 0..7 {
        m.insert(
            format!("motion_modules.{i}.weight"),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let sw = StrictWeights::new(m.clone(), "denoising_unet.pth").unexpected_warns();
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    let r = sw.finish().unwrap();
    assert_eq!(r.unexpected.len(), 9);
    let w = sw.warning().unwrap();
    assert!(
        w.contains("denoising_unet.pth")
            && w.contains("9 unexpected")
            && w.contains("extra.buffer")
            && w.contains("...")
            && !w.contains("motion_modules.6"),
        "{w}"
    );
    // Kept when the tensors are swapped for rounded ones.
    let swapped = sw.with_tensors(m.clone());
    let vb = swapped.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    assert!(swapped.finish().is_ok() && swapped.warning().is_some());

    // Strict by default.
    let sw = StrictWeights::new(m.clone(), "denoising_unet.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    assert!(sw.finish().is_err() && sw.warning().is_none());

    // A missing or mis-shaped tensor is still an error.
    let sw = StrictWeights::new(m.clone(), "denoising_unet.pth").unexpected_warns();
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    assert!(candle_nn::linear(4, 2, vb.pp("fc")).is_err());
    let sw = StrictWeights::new(m, "denoising_unet.pth")
        .unexpected_warns()
        .collecting();
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("head")).unwrap();
    assert!(sw.finish().is_err());
}

#[test]
fn a_missing_tensor_names_a_shared_prefix_as_the_likely_cause() {
    let wrapped: HashMap<String, Tensor> = small_map()
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    let sw = StrictWeights::new(wrapped, "pose_guider.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    let err = candle_nn::linear(3, 2, vb.pp("fc"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pose_guider.pth")
            && err.contains("every key in the file starts with `module.`")
            && err.contains("DataParallel"),
        "{err}"
    );

    // The other way round: the model asks for `unet.fc.weight`, the file has `fc.weight`.
    let sw = StrictWeights::new(small_map(), "unet.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    let err = candle_nn::linear(3, 2, vb.pp("unet").pp("fc"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no key in the file starts with `unet.`"),
        "{err}"
    );

    // Not every key shares the prefix: no hint, only the missing tensor.
    let mut mixed = small_map();
    mixed.insert(
        "module.fc.weight".into(),
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let sw = StrictWeights::new(mixed, "m.pth");
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    let err = candle_nn::linear(3, 2, vb.pp("head"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("head.weight") && !err.contains("every key"),
        "{err}"
    );

    // The collected report carries the hint too.
    let wrapped: HashMap<String, Tensor> = small_map()
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    let sw = StrictWeights::new(wrapped, "pose_guider.pth").collecting();
    let vb = sw.var_builder(DType::F32, &Device::Cpu);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    let r = sw.report();
    assert!(
        r.notes.iter().any(|n| n.contains("every key in the file")),
        "{r}"
    );
}
