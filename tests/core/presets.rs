//! The sizes and random trees of `mcld::presets`.
//!
//! `tests/fixtures/presets/tiny_trees.sha256` holds the SHA-256 of every file the writers wrote
//! before they became `presets::tree` (`pipeline::tiny::write_tiny_layout` and
//! `train::tiny::write_tiny_train_base` at commit 9a4f39f, `sha256sum` over the two trees), so
//! the test below shows the trees stayed bit-identical: same sizes, seeds and names. The YAML
//! files are left out: they hold the temporary folder's paths and follow `configs/`. One line was
//! added since: `UNTRAINED_DEMO_WEIGHTS.txt`, the marker `mcld serve` labels demo weights by.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use mcld::models::unet;
use mcld::presets::tree::{write_tiny_layout, write_tiny_train_base};
use mcld::presets::{self, Size};
use sha2::{Digest, Sha256};

fn recorded() -> BTreeMap<String, String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/presets/tiny_trees.sha256");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|l| {
            let (hash, name) = l.split_once("  ").expect("`HASH  PATH` lines");
            (name.to_string(), hash.to_string())
        })
        .collect()
}

/// SHA-256 of every file under `root` but the YAML ones, by `/`-separated relative path.
fn hashes(root: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file() && e.path().extension().is_none_or(|x| x != "yaml"))
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap();
            let name: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
            let bytes = std::fs::read(e.path()).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (name.join("/"), hex)
        })
        .collect()
}

#[test]
fn tiny_trees_are_the_recorded_files() {
    let d = tempfile::tempdir().unwrap();
    let infer = d.path().join("infer");
    write_tiny_layout(&infer, &infer.join("dataset"), 1).unwrap();
    let train = d.path().join("train");
    write_tiny_train_base(&train, &train.join("data")).unwrap();
    let got = hashes(d.path());
    let want = recorded();
    let differ: BTreeSet<&String> = want
        .keys()
        .chain(got.keys())
        .filter(|k| got.get(*k) != want.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "files missing, extra or changed: {differ:?}"
    );
}

#[test]
fn full_unet_is_sd15_and_half_halves_its_widths() {
    let full = presets::unet(Size::Full).unwrap();
    // diffusers' defaults with 768-wide cross-attention: what `unet::Config::sd15()` was.
    let sd15 = unet::Config {
        cross_attention_dim: 768,
        ..Default::default()
    };
    assert_eq!(full, sd15);
    let half = presets::unet(Size::Half).unwrap();
    assert_eq!(half.block_out_channels, [160, 320, 640, 640]);
    let widened = unet::Config {
        block_out_channels: full.block_out_channels.clone(),
        ..half
    };
    assert_eq!(widened, full);
}

#[test]
fn released_set_fits_together() {
    for size in [Size::Tiny, Size::Half, Size::Full] {
        let m = presets::mcld(size).unwrap();
        m.validate().unwrap();
        let clip = presets::clip(size).unwrap();
        // The CLIP embedding is the UNets' context, read with the same width.
        assert_eq!(clip.projection_dim, m.unet.cross_attention_dim, "{size:?}");
        assert_eq!(
            m.image_proj.output_dim, m.unet.cross_attention_dim,
            "{size:?}"
        );
    }
    assert_eq!(presets::projector(Size::Full, 768).dim, 1280);
}
