//! `mcld test` orchestration: resumption, regeneration of truncated outputs, skipped pairs.
//! The generator here is a test double (the real pipeline has its own tests); what is under test
//! is the bookkeeping around it.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use mcld::data::{npy, read_pairs, DatasetLayout, PairInputs};
use mcld::pipeline::testset::{run_test_set, Generator, Postprocess, TestRunOptions};

struct CountingGenerator {
    calls: usize,
    pairs: usize,
}

impl Generator for CountingGenerator {
    fn generate(&mut self, batch: &[PairInputs]) -> mcld::Result<Vec<Tensor>> {
        self.calls += 1;
        self.pairs += batch.len();
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
    };
    let post = nearest_post();

    let mut g = CountingGenerator { calls: 0, pairs: 0 };
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
    let mut g2 = CountingGenerator { calls: 0, pairs: 0 };
    let s2 = run_test_set(&opts, &layout, &pairs, &mut g2, &post).unwrap();
    assert_eq!((s2.generated, s2.already_done, g2.pairs), (0, 2, 0));

    // A truncated output is regenerated, and only that pair.
    let bytes = std::fs::read(&out).unwrap();
    std::fs::write(&out, &bytes[..bytes.len() / 2]).unwrap();
    let mut g3 = CountingGenerator { calls: 0, pairs: 0 };
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
    };
    let mut g = CountingGenerator { calls: 0, pairs: 0 };
    let s = run_test_set(
        &opts,
        &DatasetLayout::new(&root, "test"),
        &pairs,
        &mut g,
        &nearest_post(),
    )
    .unwrap();
    assert_eq!((s.generated, g.pairs, g.calls), (1, 1, 1));
}
