//! `--fid-backbone pt_inception` against tests/fixtures/pt_inception (made by its
//! make_fixture.py with pytorch-fid itself): the weights come from a deterministic recipe both
//! sides compute, so the ~95 MB real file is not needed. `MCLD_PT_INCEPTION_FIXTURE` points the
//! test at another set of the same layout.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use mcld::metrics::inception::{preprocess_pt, Flavor, InceptionV3};
use mcld::metrics::ChwImage;

fn fixture_dir() -> PathBuf {
    std::env::var_os("MCLD_PT_INCEPTION_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pt_inception")
        })
}

fn case() -> common::Case {
    let dir = fixture_dir();
    let jp = dir.join("pt_inception.json");
    let sp = dir.join("pt_inception.safetensors");
    let json = serde_json::from_str(&std::fs::read_to_string(&jp).expect("fixture json")).unwrap();
    common::Case {
        name: "pt_inception".into(),
        json,
        tensors: candle_core::safetensors::load(&sp, &Device::Cpu).expect("fixture tensors"),
        safetensors_path: sp,
    }
}

/// The recipe of make_fixture.py: splitmix64 of (FNV-1a of the name, index) -> [-1, 1), scaled
/// per tensor kind, in f64, rounded once to f32.
fn recipe(name: &str, shape: &[usize]) -> Vec<f32> {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let n: usize = shape.iter().product();
    let scale_shift: (f64, f64) = if name.ends_with("conv.weight") {
        let fan_in: usize = shape[1..].iter().product();
        ((6.0 / fan_in as f64).sqrt(), 0.0)
    } else if name.ends_with("bn.weight") {
        (0.25, 1.0)
    } else if name.ends_with("bn.running_var") {
        (0.5, 1.0)
    } else if name.ends_with("bn.bias")
        || name.ends_with("bn.running_mean")
        || name.ends_with("fc.bias")
    {
        (0.1, 0.0)
    } else if name == "fc.weight" {
        ((1.0 / shape[1] as f64).sqrt(), 0.0)
    } else {
        panic!("no recipe for {name}")
    };
    (0..n as u64)
        .map(|i| {
            let mut z = h.wrapping_add((i + 1).wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let v = 2.0 * ((z >> 11) as f64 * (-53f64).exp2()) - 1.0;
            let (s, c) = scale_shift;
            // Same operation order as numpy: `c + s * v` (or `v * s`), both exact-rounded f64.
            (if c == 0.0 { v * s } else { c + s * v }) as f32
        })
        .collect()
}

/// The state dict the generator used, rebuilt from its key list (names, shapes, dtypes).
fn recipe_state_dict() -> HashMap<String, Tensor> {
    let keys: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("state_dict_keys.json")).unwrap(),
    )
    .unwrap();
    keys.iter()
        .map(|k| {
            let name = k["name"].as_str().unwrap().to_string();
            let shape: Vec<usize> = k["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let t = match k["dtype"].as_str().unwrap() {
                "int64" => Tensor::zeros(shape.as_slice(), DType::I64, &Device::Cpu).unwrap(),
                "float32" => {
                    Tensor::from_vec(recipe(&name, &shape), shape.as_slice(), &Device::Cpu).unwrap()
                }
                d => panic!("{name}: unexpected dtype {d}"),
            };
            (name, t)
        })
        .collect()
}

fn net(flavor: Flavor) -> InceptionV3 {
    let src = fixture_dir().join("state_dict_keys.json");
    InceptionV3::from_state_dict(recipe_state_dict(), &src, flavor, &Device::Cpu).unwrap()
}

fn images(case: &common::Case) -> Vec<ChwImage> {
    case.json["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|im| {
            let t = case.get(im["key"].as_str().unwrap());
            let (c, h, w) = t.dims3().unwrap();
            let px = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            ChwImage::new(c, h, w, px.iter().map(|&v| v as f32 / 255.0).collect()).unwrap()
        })
        .collect()
}

#[test]
fn pt_inception_features_match_pytorch_fid() {
    let case = case();
    let net = net(Flavor::PtInception);
    let imgs = images(&case);
    let feats = net.features(&imgs).unwrap();
    common::check_output(&case, "features", &feats);

    // pytorch-fid's four blocks end at maxpool1, maxpool2, Mixed_6e and the pool.
    let block_ends = ["maxpool1", "maxpool2", "Mixed_6e", "avgpool"];
    let mut means: HashMap<String, Tensor> = HashMap::new();
    let x = preprocess_pt(&imgs[0], &Device::Cpu).unwrap();
    net.forward_with_hook(&x, |name, t| {
        let m = if t.rank() == 4 {
            t.mean(D::Minus1)?.mean(D::Minus1)?
        } else {
            t.clone()
        };
        means.insert(name.to_string(), m.squeeze(0)?);
        Ok(())
    })
    .unwrap();
    let keys = case.keys_with_prefix("debug.image0.block");
    assert!(!keys.is_empty(), "fixture has no debug block means");
    for key in &keys {
        let idx: usize = key
            .trim_start_matches("debug.image0.block")
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        common::check_output(&case, key, &means[block_ends[idx]]);
    }
}

/// The fixture tells the TF blocks from torchvision's: the same weights run through the
/// torchvision flavour must miss the tolerance by far.
#[test]
fn pt_inception_fixture_rejects_torchvision_blocks() {
    let case = case();
    let imgs = images(&case);
    let tv = net(Flavor::Torchvision);
    let batch: Vec<Tensor> = imgs
        .iter()
        .map(|im| preprocess_pt(im, &Device::Cpu).unwrap())
        .collect();
    let feats = tv.forward(&Tensor::cat(&batch, 0).unwrap()).unwrap();
    let (err, mx) = common::max_errs(&feats, case.get("features"));
    let common::Tolerance::RelToMax(r) = case.tolerance("features") else {
        panic!("features tolerance is rel_to_max")
    };
    println!(
        "torchvision blocks: max_abs_err {err:.3e}, bound {:.3e}",
        r * mx
    );
    assert!(err > 10.0 * r * mx);
}

#[test]
fn pt_inception_reads_the_real_layout_and_names() {
    // A legacy torch.save file of a few of the real file's tensors.
    let head = fixture_dir().join("pt_inception_head.pth");
    let got = mcld::weights::load(&head, &Device::Cpu).unwrap();
    let float_keys: Vec<&String> = got.keys().filter(|k| !k.ends_with("tracked")).collect();
    assert!(float_keys.len() >= 5, "{:?}", got.keys());
    for k in float_keys {
        let t = &got[k];
        let want = recipe(k, t.dims());
        let have = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(have, want, "{k}");
    }

    // Every key of the full state dict is used (fc.* and the BN counters are tolerated), and a
    // missing or stray tensor is an error naming it.
    let src = fixture_dir().join("state_dict_keys.json");
    let mut sd = recipe_state_dict();
    sd.remove("Mixed_7c.branch_pool.bn.running_var");
    let err = InceptionV3::from_state_dict(sd, &src, Flavor::PtInception, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Mixed_7c.branch_pool.bn.running_var"), "{err}");
    let mut sd = recipe_state_dict();
    sd.insert(
        "Mixed_7c.branch_pool.extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = InceptionV3::from_state_dict(sd, &src, Flavor::PtInception, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Mixed_7c.branch_pool.extra"), "{err}");
}

/// `mcld evaluate --fid-backbone pt_inception` finds `pt_inception*.{pth,safetensors}` in the
/// pretrained folder, reports the backbone and keys the real-set cache by it.
#[test]
fn evaluate_command_uses_pt_inception_backbone() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let ps = common::load_case("metrics", "psnr_ssim");
    for p in ps.json["pairs"].as_array().unwrap() {
        let sub = if p["height"].as_u64().unwrap() == 256 {
            "256"
        } else {
            "512"
        };
        let id = p["id"].as_str().unwrap();
        for (k, dir, sub) in [("gt", "gt", sub), ("pred", "gen", sub), ("gt", "train", "")] {
            let src = common::fixture_path(&format!("metrics/{}", p[k].as_str().unwrap()));
            let dst = root.join(dir).join(sub).join(format!("{id}.png"));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    let pre = root.join("pretrained");
    std::fs::create_dir_all(&pre).unwrap();
    candle_core::safetensors::save(&recipe_state_dict(), pre.join("pt_inception.safetensors"))
        .unwrap();
    let lp = common::load_case("metrics", "lpips_alex");
    let pick = |pfx: &str| {
        lp.tensors
            .iter()
            .filter(|(k, _)| k.starts_with(pfx))
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect::<HashMap<_, _>>()
    };
    candle_core::safetensors::save(&pick("features."), pre.join("alexnet.safetensors")).unwrap();
    candle_core::safetensors::save(&pick("lin"), pre.join("lpips_alex.safetensors")).unwrap();

    let evaluate = |backbone: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mcld"))
            .arg("evaluate")
            .arg("--save_path")
            .arg(root.join("gen"))
            .arg("--gt_folder")
            .arg(root.join("gt"))
            .arg("--training_path")
            .arg(root.join("train"))
            .arg("--pretrained_dir")
            .arg(&pre)
            .args(["--fid-backbone", backbone])
            .output()
            .unwrap()
    };
    let out = evaluate("pt_inception");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("gen/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(report["fid_backbone"], "pt_inception");
    for r in report["results"].as_array().unwrap() {
        let cache = r["real_stats_cache"].as_str().unwrap();
        assert!(cache.contains("_pt_inception_"), "{cache}");
        assert!(r["fid"].as_f64().unwrap().is_finite());
        println!(
            "{} FID (recipe pt_inception): {}",
            r["resolution"], r["fid"]
        );
    }
    // torchvision's file is absent: that backbone names what it wants.
    let out = evaluate("torchvision");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inception_v3_google"), "{err}");
    let out = evaluate("tf_inception");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tf_inception") && err.contains("pt_inception"),
        "{err}"
    );
}
