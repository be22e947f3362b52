//! The shard contract (`--shard K/N`, else torchrun's RANK/WORLD_SIZE) and `mcld test` split
//! over two shards on tiny random weights: the same files, bit for bit, as one unsharded run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use mcld::commands::args::{CheckpointArgs, ComputeArgs, ShardArgs};
use mcld::commands::test::{run as mcld_test, TestArgs};
use mcld::presets::tree::write_tiny_layout;
use mcld::rank::Shard;

fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k: &str| {
        pairs
            .iter()
            .find(|(a, _)| *a == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn shard_values_split_rules_and_the_launcher_variables() {
    let s = Shard::parse("1/4").unwrap();
    assert_eq!((s.index, s.count, s.local_rank), (1, 4, None));
    assert_eq!(s.to_string(), "1/4");
    assert_eq!(Shard::parse(" 0 / 1 ").unwrap(), Shard::whole());
    assert_eq!(
        s.file_name("prepare_report", "json"),
        "prepare_report.shard-1-of-4.json"
    );
    assert_eq!(
        Shard::whole().file_name("prepare_report", "json"),
        "prepare_report.json"
    );
    for (bad, says) in [
        ("4/4", "K must be below N"),
        ("7/3", "K must be below N"),
        ("0/0", "at least 1"),
        ("1", "expected K/N"),
        ("a/2", "expected K/N"),
        ("-1/2", "expected K/N"),
        ("1/2/3", "expected K/N"),
        ("", "expected K/N"),
    ] {
        let e = Shard::parse(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }

    // Every index and every name falls in exactly one shard, for several N.
    let names: Vec<String> = (0..2000)
        .map(|i| format!("fashionWOMENDressesid{i:08}01_1front.jpg"))
        .collect();
    for n in [1usize, 2, 3, 7] {
        let shards: Vec<Shard> = (0..n).map(|k| Shard::new(k, n).unwrap()).collect();
        for i in 0..100 {
            assert_eq!(shards.iter().filter(|s| s.owns_index(i)).count(), 1);
        }
        let mut per_shard = vec![0usize; n];
        for name in &names {
            let owners: Vec<usize> = (0..n).filter(|k| shards[*k].owns_name(name)).collect();
            assert_eq!(owners.len(), 1, "{name}");
            per_shard[owners[0]] += 1;
        }
        // FNV-1a spreads the names: no shard gets less than 80% of its even share.
        let even = names.len() / n;
        assert!(
            per_shard.iter().all(|c| *c * 10 >= even * 8),
            "{n} shards: {per_shard:?}"
        );
    }
    // Fixed by FNV-1a's definition, not by the build: a name's shard never moves.
    assert!(Shard::new(0, 2).unwrap().owns_name("a"));
    assert!(Shard::new(1, 2).unwrap().owns_name("b"));

    // Without --shard: torchrun's RANK/WORLD_SIZE (no rendezvous address needed), else all.
    assert_eq!(Shard::from_vars(&vars(&[])).unwrap(), Shard::whole());
    let s = Shard::from_vars(&vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
    ]))
    .unwrap();
    assert_eq!((s.index, s.count, s.local_rank), (3, 4, Some(1)));
    let e = Shard::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK=2") && e.contains("WORLD_SIZE=2"), "{e}");
    let e = Shard::from_vars(&vars(&[("WORLD_SIZE", "0")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("WORLD_SIZE=0"), "{e}");
    let e = Shard::from_vars(&vars(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK=\"x\""), "{e}");
    // --shard wins over the variables.
    assert_eq!(
        Shard::resolve(Some(Shard::new(1, 3).unwrap())).unwrap(),
        Shard::new(1, 3).unwrap()
    );
}

/// Bad values stop `mcld test` and `mcld prepare` before any work, naming the problem.
#[test]
fn bad_shards_are_refused_by_the_commands() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mcld"));
        c.args(args)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("LOCAL_RANK");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = tempfile::tempdir().unwrap();
    let root = d.path().to_str().unwrap();
    for cmd in [
        vec!["test", "--config_path", "/nonexistent/train.yaml"],
        vec!["prepare", "--dataset_root", root, "--only", "pairs"],
    ] {
        for (bad, says) in [
            ("2/2", "K must be below N"),
            ("0/0", "at least 1"),
            ("half", "expected K/N"),
        ] {
            let mut args = cmd.clone();
            args.extend(["--shard", bad]);
            let (ok, err) = run(&args, &[]);
            assert!(!ok, "{args:?}");
            assert!(
                err.contains("--shard") && err.contains(says),
                "{args:?}: {err}"
            );
        }
        let (ok, err) = run(&cmd, &[("RANK", "2"), ("WORLD_SIZE", "2")]);
        assert!(!ok && err.contains("RANK=2"), "{cmd:?}: {err}");
    }
    // Nothing was written by the refused prepare runs.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

fn make_dataset(root: &Path, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let photo = RgbImage::from_fn(48, 64, |x, y| {
            Rgb([(x * 5) as u8, (y * 4) as u8, 60 * i as u8])
        });
        let p = root.join(format!("test/{n}.jpg"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        photo
            .save_with_format(&p, image::ImageFormat::Jpeg)
            .unwrap();
        let iuv = mcld::pipeline::demo::synthetic_pose(48, 64, i % 2 == 1);
        let p = root.join(format!("test_densepose/{n}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        iuv.save(&p).unwrap();
        let p = root.join(format!("test_texture/{n}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_pixel(64, 64, Rgb([120, 80 + 20 * i as u8, 40]))
            .save(&p)
            .unwrap();
    }
    let mut csv = String::from("from,to\n");
    for i in 0..names.len() {
        csv.push_str(&format!(
            "{}.jpg,{}.jpg\n",
            names[i],
            names[(i + 1) % names.len()]
        ));
    }
    std::fs::write(root.join("test.csv"), csv).unwrap();
}

/// Relative path -> bytes of every file under `dir`.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `mcld test` on tiny random weights: shards 0/2 and 1/2 write disjoint sets of files whose
/// union is, bit for bit, what the unsharded run writes (pair 1 is generated by shard 1 from
/// the noise of its place in test.csv), and a shard run again finds its pairs done.
#[test]
fn test_command_shards_equal_the_unsharded_run() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("fashion");
    make_dataset(&data, &["a", "b"]);
    let tiny = write_tiny_layout(&d.path().join("w"), &data, 1).unwrap();
    let args = |save: &str, shard: Option<Shard>| TestArgs {
        save_path: d.path().join(save),
        checkpoints: CheckpointArgs {
            ckpt_dir: tiny.ckpt_dir.clone(),
            config_path: tiny.config_path.clone(),
        },
        limit: None,
        batch_size: 1,
        seed: 42,
        shard: ShardArgs { shard },
        compute: ComputeArgs {
            device: "cpu".into(),
            dtype: "f32".into(),
        },
    };
    let shard = |k: usize| Some(Shard::new(k, 2).unwrap());
    let t0 = std::time::Instant::now();
    mcld_test(&args("whole", None)).unwrap();
    mcld_test(&args("s0", shard(0))).unwrap();
    mcld_test(&args("s1", shard(1))).unwrap();
    let whole = files(&d.path().join("whole"));
    let s0 = files(&d.path().join("s0"));
    let s1 = files(&d.path().join("s1"));
    // 2 pairs x {tiny, gt} x {256, 512}: pair 0 (a_2_b) on shard 0, pair 1 (b_2_a) on shard 1.
    assert_eq!(whole.len(), 8, "{:?}", whole.keys());
    assert_eq!((s0.len(), s1.len()), (4, 4));
    assert!(
        s0.keys().all(|k| k.ends_with("a_2_b.png")),
        "{:?}",
        s0.keys()
    );
    assert!(
        s1.keys().all(|k| k.ends_with("b_2_a.png")),
        "{:?}",
        s1.keys()
    );
    let mut union = s0;
    union.extend(s1);
    assert_eq!(
        union.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>()
    );
    for (k, v) in &union {
        assert!(
            whole[k] == *v,
            "{} differs from the unsharded run",
            k.display()
        );
    }
    // A shard run again has nothing to do (nothing is regenerated: the files stay as they are).
    let before = std::fs::metadata(d.path().join("s1/tiny/512/b_2_a.png"))
        .unwrap()
        .modified()
        .unwrap();
    mcld_test(&args("s1", shard(1))).unwrap();
    assert_eq!(files(&d.path().join("s1")).len(), 4);
    let after = std::fs::metadata(d.path().join("s1/tiny/512/b_2_a.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    println!(
        "unsharded + two shards + a resumed shard: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
