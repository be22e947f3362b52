//! `mcld prepare` split + pairs + runner on small synthetic raw trees with real DeepFashion
//! naming, and the train pair count from the real split list.

use std::path::{Path, PathBuf};

use mcld::data::npy::{read_f32 as read_npy_f32, write_f32 as write_npy_f32};
use mcld::person::texture::TextureAssets;
use mcld::prepare::pairs::{outfit_key, parse_pairs, read_pairs, train_pairs};
use mcld::prepare::report::StageStatus;
use mcld::prepare::run::load_texture_inputs;
use mcld::prepare::split::{flat_name, SplitLists};
use mcld::prepare::stats::per_dim_std;
use mcld::prepare::{run_prepare, PrepareOptions, PrepareReport, Stage};

/// Raw relative path -> flat name, the cases of SPEC §2 and names with several underscores.
const RAW: &[(&str, &str)] = &[
    (
        "MEN/Shirts_Polos/id_00001802/02_4_full.jpg",
        "fashionMENShirts_Polosid0000180202_4full.jpg",
    ),
    (
        "MEN/Shirts_Polos/id_00001802/02_1_front.jpg",
        "fashionMENShirts_Polosid0000180202_1front.jpg",
    ),
    (
        "MEN/Shirts_Polos/id_00001802/02_7_additional.jpg",
        "fashionMENShirts_Polosid0000180202_7additional.jpg",
    ),
    (
        "MEN/Shirts_Polos/id_00001802/03_1_front.jpg",
        "fashionMENShirts_Polosid0000180203_1front.jpg",
    ),
    (
        "WOMEN/Blouses_Shirts/id_00000693/02_3_back.jpg",
        "fashionWOMENBlouses_Shirtsid0000069302_3back.jpg",
    ),
    (
        "WOMEN/Blouses_Shirts/id_00000693/02_2_side.jpg",
        "fashionWOMENBlouses_Shirtsid0000069302_2side.jpg",
    ),
    (
        "WOMEN/Rompers_Jumpsuits/id_00001045/07_1_front.jpg",
        "fashionWOMENRompers_Jumpsuitsid0000104507_1front.jpg",
    ),
    (
        "WOMEN/Skirts/id_00000629/04_3_back.jpg",
        "fashionWOMENSkirtsid0000062904_3back.jpg",
    ),
];

/// The lists as committed in the repository.
fn repo_lists() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/deepfashion")
}

/// The shared data folder: `$MCLD_SHARED_DATA`, else `shared/data/deepfashion` one or two levels
/// above the repository (main checkout or worktree). Missing fails the test.
fn shared_data() -> PathBuf {
    if let Some(p) = std::env::var_os("MCLD_SHARED_DATA") {
        return PathBuf::from(p);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        "../shared/data/deepfashion",
        "../../shared/data/deepfashion",
    ]
    .iter()
    .map(|r| here.join(r))
    .find(|p| p.join("train.lst").is_file())
    .expect("shared data folder not found (set MCLD_SHARED_DATA)")
}

fn write_jpeg(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(24, 36, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 7) as u8, (y * 5) as u8])
    });
    img.save(path).unwrap();
}

/// A raw tree holding RAW plus one unlisted image; train = first six, test = the rest plus a
/// name that exists nowhere.
fn raw_tree() -> (tempfile::TempDir, SplitLists) {
    let dir = tempfile::tempdir().unwrap();
    for (i, (rel, _)) in RAW.iter().enumerate() {
        write_jpeg(&dir.path().join(rel), i as u8);
    }
    write_jpeg(&dir.path().join("MEN/Denim/id_00000001/01_1_front.jpg"), 99);
    let names: Vec<String> = RAW.iter().map(|(_, f)| f.to_string()).collect();
    let mut test = names[6..].to_vec();
    test.push("fashionMENDenimid0000999901_1front.jpg".into());
    (
        dir,
        SplitLists {
            train: names[..6].to_vec(),
            test,
        },
    )
}

fn opts(root: &Path, lists: &SplitLists, stages: &[Stage]) -> PrepareOptions {
    let mut o = PrepareOptions::new(root, root.join("pretrained_weights"));
    o.lists = lists.clone();
    o.stages = stages.to_vec();
    o
}

fn stage<'a>(rep: &'a PrepareReport, name: &str) -> &'a mcld::prepare::StageReport {
    rep.stage(name)
        .unwrap_or_else(|| panic!("no {name} stage in report"))
}

#[test]
fn flat_names_follow_spec() {
    for (rel, flat) in RAW {
        assert_eq!(flat_name(Path::new(rel)).as_deref(), Some(*flat), "{rel}");
    }
    for bad in [
        "KIDS/Tees/id_00000001/01_1_front.jpg",
        "MEN/Tees/00000001/01_1_front.jpg",
        "MEN/Tees/01_1_front.jpg",
    ] {
        assert_eq!(flat_name(Path::new(bad)), None, "{bad}");
    }
    // Every name of the real lists ends in `NN_view.jpg` with exactly one `_` after the id.
    let lists = SplitLists::builtin();
    for n in lists.train.iter().chain(&lists.test) {
        let (_, file) = n.split_once("id").expect("id in flat name");
        assert_eq!(file.matches('_').count(), 1, "{n}");
    }
}

#[test]
fn builtin_lists_match_shared_data() {
    let d = shared_data();
    let files = SplitLists::from_files(&d.join("train.lst"), &d.join("test.lst")).unwrap();
    let builtin = SplitLists::builtin();
    assert_eq!(files.train, builtin.train);
    assert_eq!(files.test, builtin.test);
    assert_eq!(builtin.train.len(), 48_674);
    assert_eq!(builtin.test.len(), 4_038);
}

#[test]
fn train_pair_count_from_real_list() {
    let d = repo_lists();
    let lists = SplitLists::from_files(&d.join("train.lst"), &d.join("test.lst")).unwrap();
    let pairs = train_pairs(&lists.train);
    assert_eq!(pairs.len(), 154_758);
    for (a, b) in &pairs {
        assert_ne!(a, b);
        assert_eq!(outfit_key(a), outfit_key(b));
    }
    let test = read_pairs(&d.join("test.csv")).unwrap();
    assert_eq!(test.len(), 8_570);
}

#[test]
fn pairs_csv_rejects_bad_rows() {
    let p = Path::new("x.csv");
    assert!(parse_pairs(p, "a,b\nx,y\n").is_err());
    let e = parse_pairs(p, "from,to\nx,y\nonly\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.csv") && e.contains("line 3"), "{e}");
    assert_eq!(parse_pairs(p, "from,to\nx,y\n").unwrap().len(), 1);
}

#[test]
fn split_pairs_and_resume() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    let o = opts(root, &lists, &[Stage::Split, Stage::Pairs]);
    let rep = run_prepare(&o).unwrap();
    let sp = stage(&rep, "split");
    assert_eq!(sp.status, StageStatus::Ok, "{sp:?}");
    assert_eq!(sp.done, RAW.len());
    assert_eq!(sp.skipped, 0);
    assert_eq!(sp.missing, vec!["fashionMENDenimid0000999901_1front.jpg"]);
    assert!(
        sp.notes.iter().any(|n| n.starts_with("1 raw images")),
        "{:?}",
        sp.notes
    );
    for (i, (rel, flat)) in RAW.iter().enumerate() {
        let part = if i < 6 { "train" } else { "test" };
        let dst = root.join(part).join(flat);
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            std::fs::read(root.join(rel)).unwrap(),
            "{}",
            dst.display()
        );
    }
    assert_eq!(std::fs::read_dir(root.join("train")).unwrap().count(), 6);
    assert_eq!(std::fs::read_dir(root.join("test")).unwrap().count(), 2);

    // Outfit 180202 has three views (6 ordered pairs), 069302 two (2), the others one.
    let pairs = read_pairs(&root.join("train.csv")).unwrap();
    let f = |i: usize| RAW[i].1.to_string();
    let expect = vec![
        (f(0), f(1)),
        (f(0), f(2)),
        (f(1), f(0)),
        (f(1), f(2)),
        (f(2), f(0)),
        (f(2), f(1)),
        (f(4), f(5)),
        (f(5), f(4)),
    ];
    assert_eq!(pairs, expect);
    assert_eq!(read_pairs(&root.join("test.csv")).unwrap().len(), 8_570);
    let json: PrepareReport =
        serde_json::from_slice(&std::fs::read(root.join("prepare_report.json")).unwrap()).unwrap();
    assert_eq!(json, rep);

    // Second run: nothing to do, nothing rewritten.
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = (
        mtime(root.join("train.csv")),
        mtime(root.join("train").join(RAW[0].1)),
    );
    let rep2 = run_prepare(&o).unwrap();
    let sp2 = stage(&rep2, "split");
    assert_eq!((sp2.done, sp2.skipped), (0, RAW.len()));
    assert!(sp2.failed.is_empty());
    let pr2 = stage(&rep2, "pairs");
    assert_eq!((pr2.done, pr2.skipped), (0, 2));
    let after = (
        mtime(root.join("train.csv")),
        mtime(root.join("train").join(RAW[0].1)),
    );
    assert_eq!(before, after);
    // No temp files left behind.
    for d in ["train", "test"] {
        for e in std::fs::read_dir(root.join(d)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.ends_with(".tmp"), "{n}");
        }
    }
}

#[cfg(unix)]
#[test]
fn split_hard_links_on_one_file_system() {
    use std::os::unix::fs::MetadataExt;
    let (dir, lists) = raw_tree();
    let root = dir.path();
    run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    let a = std::fs::metadata(root.join(RAW[0].0)).unwrap();
    let b = std::fs::metadata(root.join("train").join(RAW[0].1)).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn corrupt_jpeg_fails_only_that_image() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    let bad = root.join(RAW[3].0);
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&bad, &bytes).unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    let sp = stage(&rep, "split");
    assert_eq!(sp.status, StageStatus::Partial);
    assert_eq!(sp.done, RAW.len() - 1);
    assert_eq!(sp.failed.len(), 1);
    assert_eq!(sp.failed[0].path, bad);
    assert!(
        sp.failed[0].reason.contains("JPEG"),
        "{}",
        sp.failed[0].reason
    );
    assert!(!root.join("train").join(RAW[3].1).exists());
    assert!(rep.summary(5).contains(RAW[3].0));

    // Repaired, the next run places only that image.
    write_jpeg(&bad, 3);
    let rep = run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    let sp = stage(&rep, "split");
    assert_eq!(
        (sp.done, sp.skipped, sp.failed.len()),
        (1, RAW.len() - 1, 0)
    );
}

#[test]
fn user_train_csv_is_kept() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    let mine = format!("from,to\n{},{}\n", RAW[1].1, RAW[0].1);
    std::fs::write(root.join("train.csv"), &mine).unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Pairs])).unwrap();
    let pr = stage(&rep, "pairs");
    assert_eq!((pr.done, pr.skipped), (1, 1));
    assert_eq!(
        std::fs::read_to_string(root.join("train.csv")).unwrap(),
        mine
    );

    // A malformed user file is an error naming it, and is not overwritten.
    std::fs::write(root.join("train.csv"), "src;dst\n").unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Pairs])).unwrap();
    let pr = stage(&rep, "pairs");
    assert_eq!(pr.status, StageStatus::Failed);
    assert!(pr.error.as_deref().unwrap().contains("train.csv"), "{pr:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("train.csv")).unwrap(),
        "src;dst\n"
    );
}

#[test]
fn densepose_and_texture_stages_report_per_image() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    // One IUV of the wrong size, one of the right size; the other photos have none.
    let iuv_dir = root.join("train_densepose");
    std::fs::create_dir_all(&iuv_dir).unwrap();
    let stem = |i: usize| RAW[i].1.trim_end_matches(".jpg").to_string();
    image::RgbImage::new(10, 10)
        .save(iuv_dir.join(format!("{}.png", stem(0))))
        .unwrap();
    image::RgbImage::new(24, 36)
        .save(iuv_dir.join(format!("{}.png", stem(1))))
        .unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Densepose, Stage::Texture])).unwrap();
    let dp = stage(&rep, "densepose");
    // No DensePose weights in the test's pretrained dir: the stage fails and says where to get them.
    assert_eq!(dp.status, StageStatus::Failed);
    let err = dp.error.as_deref().unwrap_or_default();
    assert!(err.contains("model_final_844d15.pkl"), "{err}");
    assert_eq!((dp.skipped, dp.missing.len()), (2, RAW.len() - 2));
    let tx = stage(&rep, "texture");
    assert_eq!(tx.missing.len(), RAW.len() - 2);
    if TextureAssets::builtin().is_err() {
        // Texture maps not in this build: the stage says so and leaves both jobs alone.
        assert_eq!(tx.status, StageStatus::Failed);
        assert!(tx.error.as_deref().unwrap().contains("2 jobs"), "{tx:?}");
        return;
    }
    let wrong = tx
        .failed
        .iter()
        .find(|f| f.path.ends_with(RAW[0].1))
        .expect("wrong-size IUV recorded as failed");
    assert!(wrong.reason.contains("IUV is 10x10"), "{}", wrong.reason);
    assert!(wrong.reason.contains("24x36"), "{}", wrong.reason);
    // The right-size one reached the texture step (done, or failed there for its own reason).
    assert!(
        tx.done == 1
            || tx
                .failed
                .iter()
                .any(|f| f.path.ends_with(RAW[1].1) && !f.reason.contains("IUV is")),
        "{tx:?}"
    );
}

#[test]
fn texture_inputs_are_checked_per_image() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    let photo = root.join("train").join(RAW[0].1);
    let iuv = root.join("iuv.png");
    image::RgbImage::new(10, 10).save(&iuv).unwrap();
    let e = load_texture_inputs(&photo, &iuv).unwrap_err().to_string();
    assert!(
        e.contains("iuv.png") && e.contains("IUV is 10x10") && e.contains("24x36"),
        "{e}"
    );
    image::RgbImage::new(24, 36).save(&iuv).unwrap();
    let (p, i) = load_texture_inputs(&photo, &iuv).unwrap();
    assert_eq!((p.dimensions(), i.dimensions()), ((24, 36), (24, 36)));
    let bad = root.join("bad.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really").unwrap();
    let e = load_texture_inputs(&bad, &iuv).unwrap_err().to_string();
    assert!(e.contains("bad.jpg") && e.contains("decode"), "{e}");
}

#[test]
fn stats_stage_counts_and_wants_clip_std() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Split, Stage::Stats])).unwrap();
    let st = stage(&rep, "stats");
    // No CLIP image encoder under the pretrained folder: the stage says which folder it needs.
    assert_eq!(st.status, StageStatus::Failed);
    assert!(
        st.error.as_deref().unwrap_or("").contains("image_encoder"),
        "{:?}",
        st.error
    );
    assert!(st
        .notes
        .contains(&"train: 6 photos, 0 IUV, 0 textures, 0 faces".to_string()));
    assert!(st
        .notes
        .contains(&"test: 2 photos, 0 IUV, 0 textures, 0 faces".to_string()));
    assert!(st.missing[0].ends_with("clip_std.npy"));
    write_npy_f32(&root.join("clip_std.npy"), &[4], &[0.1, 0.2, 0.3, 0.4]).unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Stats])).unwrap();
    let st = stage(&rep, "stats");
    assert_eq!((st.status, st.skipped), (StageStatus::Ok, 1));
    std::fs::write(root.join("clip_std.npy"), b"junk").unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Stats])).unwrap();
    let st = stage(&rep, "stats");
    assert_eq!(st.status, StageStatus::Failed);
    assert!(
        st.error.as_deref().unwrap().contains("clip_std.npy"),
        "{st:?}"
    );
}

#[test]
fn stage_selection() {
    let s =
        |v: &[&str]| Stage::parse_selection(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    assert_eq!(s(&[]).unwrap(), Stage::ALL.to_vec());
    assert_eq!(
        s(&["stats", " PAIRS", "pairs"]).unwrap(),
        vec![Stage::Pairs, Stage::Stats]
    );
    let e = s(&["split", "bogus"]).unwrap_err().to_string();
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn empty_root_fails_the_split_stage_only() {
    let dir = tempfile::tempdir().unwrap();
    let lists = SplitLists {
        train: vec![RAW[0].1.into()],
        test: vec![RAW[6].1.into()],
    };
    let rep = run_prepare(&opts(dir.path(), &lists, &[Stage::Split, Stage::Pairs])).unwrap();
    let sp = stage(&rep, "split");
    assert_eq!(sp.status, StageStatus::Failed);
    assert!(
        sp.error.as_deref().unwrap().contains("no raw images"),
        "{sp:?}"
    );
    assert_eq!(stage(&rep, "pairs").status, StageStatus::Ok);
    assert!(!rep.all_ok());
}

#[test]
fn missing_root_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = PrepareOptions::new(dir.path().join("nope"), dir.path());
    let e = run_prepare(&o).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn npy_round_trip_and_std() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    write_npy_f32(&p, &[2, 3], &data).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!((bytes.len() - data.len() * 4) % 64, 0);
    assert_eq!(read_npy_f32(&p).unwrap(), (vec![2, 3], data.clone()));
    write_npy_f32(&p, &[6], &data).unwrap();
    assert_eq!(read_npy_f32(&p).unwrap().0, vec![6]);
    assert!(write_npy_f32(&dir.path().join("b.npy"), &[4], &data).is_err());
    std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
    let e = read_npy_f32(&p).unwrap_err().to_string();
    assert!(e.contains("a.npy"), "{e}");

    let std = per_dim_std(&[vec![1.0, 5.0], vec![3.0, 5.0]]).unwrap();
    assert_eq!(std, vec![1.0, 0.0]);
    assert!(per_dim_std(&[vec![1.0], vec![1.0, 2.0]]).is_err());
}

#[test]
fn stats_stage_writes_clip_std_with_an_encoder() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    // A tiny random CLIP encoder in the real folder layout.
    let w = tempfile::tempdir().unwrap();
    mcld::presets::tree::write_tiny_layout(w.path(), root, 1).unwrap();
    let pre = tempfile::tempdir().unwrap();
    let enc = mcld::prepare::stats::clip_encoder_dir(pre.path());
    std::fs::create_dir_all(&enc).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            w.path().join("pretrained_weights/image_encoder").join(f),
            enc.join(f),
        )
        .unwrap();
    }
    let mut o = opts(root, &lists, &[Stage::Stats]);
    o.pretrained_dir = pre.path().to_path_buf();
    let rep = run_prepare(&o).unwrap();
    let st = stage(&rep, "stats");
    assert_eq!((st.status, st.done), (StageStatus::Ok, 1), "{:?}", st.error);
    let (shape, got) = read_npy_f32(&root.join("clip_std.npy")).unwrap();
    // Same numbers as computing the embeddings directly and taking numpy's std (ddof 0).
    let emb = mcld::prepare::stats::clip_embeddings(root, &enc, &indicatif::ProgressBar::hidden())
        .unwrap();
    assert_eq!(emb.len(), 6);
    let want = mcld::prepare::stats::per_dim_std(&emb).unwrap();
    assert_eq!(shape, vec![want.len()]);
    assert_eq!(got, want);
    assert!(got.iter().any(|v| *v > 0.0));
    // A second run keeps the file.
    let rep = run_prepare(&o).unwrap();
    assert_eq!(stage(&rep, "stats").skipped, 1);
}

#[test]
fn texture_stage_resumes_after_an_interruption() {
    let (dir, lists) = raw_tree();
    let root = dir.path();
    run_prepare(&opts(root, &lists, &[Stage::Split])).unwrap();
    let iuv_dir = root.join("train_densepose");
    std::fs::create_dir_all(&iuv_dir).unwrap();
    let stems: Vec<String> = (0..3)
        .map(|i| RAW[i].1.trim_end_matches(".jpg").to_string())
        .collect();
    for s in &stems {
        mcld::pipeline::demo::synthetic_pose(24, 36, false)
            .save(iuv_dir.join(format!("{s}.png")))
            .unwrap();
    }
    let rep = run_prepare(&opts(root, &lists, &[Stage::Texture])).unwrap();
    let tx = stage(&rep, "texture");
    assert_eq!((tx.done, tx.failed.len()), (3, 0), "{tx:?}");
    let out = |s: &str| root.join("train_texture").join(format!("{s}.png"));
    let first: Vec<Vec<u8>> = stems
        .iter()
        .map(|s| std::fs::read(out(s)).unwrap())
        .collect();
    // An interrupted run: one map never written, a stale temp file left behind.
    std::fs::remove_file(out(&stems[1])).unwrap();
    std::fs::write(
        root.join("train_texture")
            .join(format!(".{}.png.999.tmp", stems[1])),
        b"partial",
    )
    .unwrap();
    let rep = run_prepare(&opts(root, &lists, &[Stage::Texture])).unwrap();
    let tx = stage(&rep, "texture");
    assert_eq!((tx.done, tx.skipped), (1, 2), "{tx:?}");
    let again: Vec<Vec<u8>> = stems
        .iter()
        .map(|s| std::fs::read(out(s)).unwrap())
        .collect();
    assert_eq!(
        first, again,
        "finished maps are kept and the missing one is identical"
    );
    let img = image::open(out(&stems[1])).unwrap();
    assert_eq!((img.width(), img.height()), (512, 512));
}

/// Relative path -> bytes of every file under `dir` except the reports and the raw tree.
fn outputs(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if rel.starts_with("MEN") || rel.starts_with("WOMEN") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if !rel.to_string_lossy().starts_with("prepare_report") {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A raw tree with a synthetic IUV for every listed photo, ready for split + texture.
fn raw_tree_with_iuvs() -> (tempfile::TempDir, SplitLists) {
    let (dir, lists) = raw_tree();
    for (i, (_, flat)) in RAW.iter().enumerate() {
        let part = if i < 6 { "train" } else { "test" };
        let p = dir
            .path()
            .join(format!("{part}_densepose"))
            .join(flat.replace(".jpg", ".png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        mcld::pipeline::demo::synthetic_pose(24, 36, i % 2 == 1)
            .save(&p)
            .unwrap();
    }
    (dir, lists)
}

/// `prepare --shard K/N`: shards 0/2 and 1/2 place and texture disjoint sets of photos whose
/// union is, file for file and byte for byte, what one unsharded run makes; run into one root,
/// each keeps its own report, `pairs` is shard 0's and `stats` nobody's; a shard run again
/// does nothing.
#[test]
fn shards_split_the_photos_and_together_equal_one_run() {
    use mcld::rank::Shard;
    let stages = [Stage::Split, Stage::Pairs, Stage::Texture, Stage::Stats];
    let run = |root: &Path, lists: &SplitLists, shard: Shard| {
        let mut o = opts(root, lists, &stages);
        o.shard = shard;
        run_prepare(&o).unwrap()
    };
    let s = |k: usize| Shard::new(k, 2).unwrap();
    let (whole_dir, lists) = raw_tree_with_iuvs();
    let whole_rep = run(whole_dir.path(), &lists, Shard::whole());
    let whole = outputs(whole_dir.path());
    let made = |rep: &PrepareReport| stage(rep, "split").done + stage(rep, "texture").done;
    assert_eq!(made(&whole_rep), 2 * RAW.len(), "{whole_rep:?}");

    // Each shard alone, in its own copy of the raw tree.
    let mut apart = Vec::new();
    for k in 0..2 {
        let (dir, _) = raw_tree_with_iuvs();
        let rep = run(dir.path(), &lists, s(k));
        assert_eq!(rep.shard.as_deref(), Some(["0/2", "1/2"][k]));
        assert!(dir
            .path()
            .join(format!("prepare_report.shard-{k}-of-2.json"))
            .is_file());
        assert!(!dir.path().join("prepare_report.json").exists());
        let st = stage(&rep, "stats");
        assert_eq!((st.done, st.status), (0, StageStatus::Ok));
        assert!(st.notes[0].contains("--only stats"), "{st:?}");
        let pr = stage(&rep, "pairs");
        assert_eq!(pr.done, if k == 0 { 2 } else { 0 }, "{pr:?}");
        // Only the IUVs were there before: the rest is what this shard made, byte for byte
        // the unsharded run's files.
        let own: std::collections::BTreeMap<PathBuf, Vec<u8>> = outputs(dir.path())
            .into_iter()
            .filter(|(p, _)| !p.to_string_lossy().contains("_densepose"))
            .collect();
        for (p, bytes) in &own {
            assert!(whole.get(p) == Some(bytes), "{}", p.display());
        }
        apart.push((made(&rep), own));
    }
    let (a, b) = (&apart[0].1, &apart[1].1);
    assert!(a.keys().all(|p| !b.contains_key(p)), "shards overlap");
    assert!(apart[0].0 > 0 && apart[1].0 > 0, "a shard got no photo");
    assert_eq!(apart[0].0 + apart[1].0, made(&whole_rep));

    // Both shards into one root, one after the other: the unsharded run's files exactly, and
    // each shard's report under its own name.
    let (dir, _) = raw_tree_with_iuvs();
    run(dir.path(), &lists, s(1));
    run(dir.path(), &lists, s(0));
    assert_eq!(outputs(dir.path()), whole);
    for (k, (n, _)) in apart.iter().enumerate() {
        let text = std::fs::read(
            dir.path()
                .join(format!("prepare_report.shard-{k}-of-2.json")),
        )
        .unwrap();
        let rep: PrepareReport = serde_json::from_slice(&text).unwrap();
        assert_eq!(made(&rep), *n);
    }
    let again = run(dir.path(), &lists, s(0));
    assert_eq!(made(&again), 0);
    assert_eq!(
        stage(&again, "split").skipped + stage(&again, "texture").skipped,
        apart[0].0
    );
}
