//! `mcld test` orchestration: resumption, regeneration of truncated outputs, skipped pairs,
//! shards.
//! The generator here is a test double (the real pipeline has its own tests); what is under test
//! is the bookkeeping around it.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use mcld::data::{npy, read_pairs, DatasetLayout, PairInputs};
use mcld::imageops::grid::{GridLayout, MIN_CELL, PAIR_COLUMNS};
use mcld::pipeline::testset::{
    panels_path, run_test_set, write_panels, Generator, Postprocess, TestRunOptions,
};
use mcld::rank::Shard;

#[derive(Default)]
struct CountingGenerator {
    calls: usize,
    pairs: usize,
    /// The test-list positions handed over, in call order.
    positions: Vec<usize>,
}

impl Generator for CountingGenerator {
    fn generate(&mut self, batch: &[PairInputs], positions: &[usize]) -> mcld::Result<Vec<Tensor>> {
        assert_eq!(batch.len(), positions.len());
        self.calls += 1;
        self.pairs += batch.len();
        self.positions.extend_from_slice(positions);
        batch
            .iter()
            .map(|b| {
                // Encodes the source's first pixel so outputs differ per pair.
                let v = b.source.get_pixel(0, 0)[0] as f32 / 255.0;
                Ok(Tensor::full(v, (3, 16, 16), &Device::Cpu)?)
            })
            .collect()
    }
}

fn nearest_post() -> Postprocess {
    Postprocess {
        generated: Box::new(|t, (h, w)| {
            let v = t.flatten_all()?.to_vec1::<f32>()?[0];
            Ok(RgbImage::from_pixel(
                w as u32,
                h as u32,
                Rgb([(v * 255.0) as u8; 3]),
            ))
        }),
        ground_truth: Box::new(|img, (h, w)| {
            Ok(image::imageops::resize(
                img,
                w as u32,
                h as u32,
                image::imageops::FilterType::Nearest,
            ))
        }),
    }
}

fn make_dataset(root: &Path, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let stem = n.trim_end_matches(".jpg");
        let img = RgbImage::from_pixel(32, 48, Rgb([10 * i as u8 + 5, 0, 0]));
        let p = root.join("test").join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // PNG bytes under a .jpg name: lossless, so pixel values can be asserted; the reader sniffs the format.
        img.save_with_format(&p, image::ImageFormat::Png).unwrap();
        for dir in ["test_densepose", "test_texture"] {
            let p = root.join(dir).join(format!("{stem}.png"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            img.save(&p).unwrap();
        }
    }
    npy::write_f32(&root.join("test_face").join("a.npy"), &[512], &[0.25; 512]).unwrap();
}

#[test]
fn resumes_regenerates_truncated_and_reports_skips() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fashion");
    make_dataset(&root, &["a.jpg", "b.jpg", "c.jpg"]);
    // c's texture is missing: that pair must be skipped with a reason, not abort the run.
    std::fs::remove_file(root.join("test_texture/c.png")).unwrap();
    std::fs::write(
        root.join("test.csv"),
        "from,to\na.jpg,b.jpg\nb.jpg,a.jpg\nc.jpg,a.jpg\n",
    )
    .unwrap();
    let pairs = read_pairs(&root.join("test.csv")).unwrap();
    let layout = DatasetLayout::new(&root, "test");
    let opts = TestRunOptions {
        save_path: d.path().join("results"),
        exp_name: "mcld".into(),
        limit: None,
        batch_size: 2,
        progress: false,
        shard: Shard::whole(),
    };
    let post = nearest_post();

    let mut g = CountingGenerator::default();
    let s = run_test_set(&opts, &layout, &pairs, &mut g, &post).unwrap();
    assert_eq!(s.generated, 2);
    assert_eq!(s.skipped.len(), 1);
    assert!(s.skipped[0].0.starts_with("c_2_a"), "{:?}", s.skipped);
    assert!(s.skipped[0].1.contains("c.png"), "{:?}", s.skipped);
    let out = opts.save_path.join("mcld/256/a_2_b.png");
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (176, 256));
    assert_eq!(img.get_pixel(0, 0)[0], 5);
    let gt = image::open(opts.save_path.join("gt/512/a_2_b.png")).unwrap();
    assert_eq!((gt.width(), gt.height()), (352, 512));

    // Second run: nothing to do.
    let mut g2 = CountingGenerator::default();
    let s2 = run_test_set(&opts, &layout, &pairs, &mut g2, &post).unwrap();
    assert_eq!((s2.generated, s2.already_done, g2.pairs), (0, 2, 0));

    // A truncated output is regenerated, and only that pair.
    let bytes = std::fs::read(&out).unwrap();
    std::fs::write(&out, &bytes[..bytes.len() / 2]).unwrap();
    let mut g3 = CountingGenerator::default();
    let s3 = run_test_set(&opts, &layout, &pairs, &mut g3, &post).unwrap();
    assert_eq!((s3.generated, g3.pairs), (1, 1));
    assert!(image::open(&out).is_ok());
    // No temp files left behind.
    for e in std::fs::read_dir(out.parent().unwrap()).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with(".tmp"), "{n}");
    }
}

#[test]
fn limit_caps_the_pairs() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fashion");
    make_dataset(&root, &["a.jpg", "b.jpg"]);
    std::fs::write(root.join("test.csv"), "from,to\na.jpg,b.jpg\nb.jpg,a.jpg\n").unwrap();
    let pairs = read_pairs(&root.join("test.csv")).unwrap();
    let opts = TestRunOptions {
        save_path: d.path().join("r"),
        exp_name: "x".into(),
        limit: Some(1),
        batch_size: 4,
        progress: false,
        shard: Shard::whole(),
    };
    let mut g = CountingGenerator::default();
    let s = run_test_set(
        &opts,
        &DatasetLayout::new(&root, "test"),
        &pairs,
        &mut g,
        &nearest_post(),
    )
    .unwrap();
    assert_eq!((s.generated, g.pairs, g.calls), (1, 1, 1));

    // The limited run's panel: the labelled layout, one row for the one pair generated.
    let layout = DatasetLayout::new(&root, "test");
    let p = write_panels(&opts, &layout, &pairs, 42).unwrap().unwrap();
    assert_eq!(p, panels_path(&opts));
    let img = image::open(&p).unwrap().to_rgb8();
    let grid = GridLayout {
        columns: PAIR_COLUMNS.len() as u32,
        rows: 1,
        cell: MIN_CELL,
    };
    assert_eq!(img.dimensions(), grid.size());
    // The generated cell holds the generated image (grey level 5 for pair a), fitted upright.
    let (x, y) = grid.cell_origin(0, 3);
    let c = MIN_CELL / 2;
    assert_eq!(img.get_pixel(x + c, y + c), &Rgb([5, 5, 5]));
    assert_ne!(img.get_pixel(x + 2, y + c), &Rgb([5, 5, 5]));
    // The header and row label are drawn in dark ink.
    let dark =
        |y0: u32, y1: u32| (y0..y1).any(|y| (0..img.width()).any(|x| img.get_pixel(x, y)[0] < 100));
    assert!(dark(0, grid.row_label_top(0)) && dark(grid.row_label_top(0), y));
}

/// Two shards (either order, same folder) do what one unsharded run does: disjoint pairs that
/// cover the list (after `--limit`), each pair handed to the generator with its position in
/// `test.csv`, a skipped pair reported by the shard that owns it only.
#[test]
fn shards_split_the_pairs_disjointly_and_cover_them() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fashion");
    let names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"];
    make_dataset(&root, &names);
    std::fs::remove_file(root.join("test_texture/c.png")).unwrap();
    let mut csv = String::from("from,to\n");
    for i in 0..names.len() {
        csv.push_str(&format!("{},{}\n", names[i], names[(i + 1) % names.len()]));
    }
    std::fs::write(root.join("test.csv"), csv).unwrap();
    let pairs = read_pairs(&root.join("test.csv")).unwrap();
    let layout = DatasetLayout::new(&root, "test");
    let post = nearest_post();
    let opts = |dir: &str, shard: Shard| TestRunOptions {
        save_path: d.path().join(dir),
        exp_name: "mcld".into(),
        limit: Some(4),
        batch_size: 2,
        progress: false,
        shard,
    };
    let files = |dir: &str| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = walk(&d.path().join(dir))
            .into_iter()
            .map(|p| {
                let rel = p.strip_prefix(d.path().join(dir)).unwrap();
                (rel.display().to_string(), std::fs::read(&p).unwrap())
            })
            .collect();
        v.sort();
        v
    };

    let mut g = CountingGenerator::default();
    let whole = run_test_set(
        &opts("whole", Shard::whole()),
        &layout,
        &pairs,
        &mut g,
        &post,
    )
    .unwrap();
    assert_eq!(g.positions, vec![0, 1, 3]);
    assert_eq!((whole.generated, whole.skipped.len()), (3, 1));

    let mut seen = Vec::new();
    for k in [1, 0] {
        let shard = Shard::new(k, 2).unwrap();
        let mut g = CountingGenerator::default();
        let s = run_test_set(&opts("sharded", shard), &layout, &pairs, &mut g, &post).unwrap();
        assert!(g.positions.iter().all(|p| p % 2 == k), "{:?}", g.positions);
        assert_eq!(s.pairs_in_shard, 2);
        // Pair 2 (c's texture is missing) belongs to shard 0 only.
        assert_eq!(s.skipped.len(), usize::from(k == 0), "{:?}", s.skipped);
        seen.extend(g.positions);
        // Its own outputs only: shard 1 ran first, so nothing of shard 0's was there to skip.
        assert_eq!(s.already_done, 0);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 3]);
    assert_eq!(files("whole"), files("sharded"));

    // Resuming a shard: nothing to do.
    let mut g = CountingGenerator::default();
    let s = run_test_set(
        &opts("sharded", Shard::new(1, 2).unwrap()),
        &layout,
        &pairs,
        &mut g,
        &post,
    )
    .unwrap();
    assert_eq!((s.generated, s.already_done, g.pairs), (0, 2, 0));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
