//! Stats stage: folder counts and the per-dimension CLIP std used by training.

use std::path::Path;

use super::report::StageReport;
use crate::{Error, Result};

use crate::data::npy::{read_f32 as read_npy_f32, write_f32 as write_npy_f32};
use crate::data::{list_photos, Part};

/// Per-dimension standard deviation (population, as `torch.std(unbiased=False)`) of equal-length
/// rows; computed in f64 so 50k rows do not lose precision.
pub fn per_dim_std(rows: &[Vec<f32>]) -> Result<Vec<f32>> {
    let Some(first) = rows.first() else {
        return Err(Error::msg("std of zero embeddings"));
    };
    let d = first.len();
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != d) {
        return Err(Error::msg(format!(
            "embedding {i} has {} values, the first has {d}",
            r.len()
        )));
    }
    let n = rows.len() as f64;
    let mut mean = vec![0f64; d];
    for r in rows {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; d];
    for r in rows {
        for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
            let e = v as f64 - m;
            *s += e * e;
        }
    }
    Ok(var.iter().map(|s| (s / n).sqrt() as f32).collect())
}

fn count_files(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let p = e.path();
                    p.extension().and_then(|x| x.to_str()) == Some(ext)
                        && !e.file_name().to_string_lossy().starts_with('.')
                })
                .count()
        })
        .unwrap_or(0)
}

/// Where `prepare` looks for the CLIP image encoder (the one training conditions on).
pub fn clip_encoder_dir(pretrained_dir: &Path) -> std::path::PathBuf {
    pretrained_dir.join("sd-image-variations-diffusers/image_encoder")
}

/// CLIP `image_embeds` of the training sources, as training feeds them: each photo squashed to
/// 512x512 (Pillow bicubic), CLIP-preprocessed, encoded in batches.
pub fn clip_embeddings(
    root: &Path,
    encoder_dir: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Vec<f32>>> {
    use crate::imageops::{pil_resize_rgb, Filter, U8Image};
    use crate::models::clip;
    let dir = crate::weights::ModelDir::open(encoder_dir)?;
    let cfg = clip::Config::from_file(&dir.config)?;
    let w = dir
        .strict()?
        .allow_unused(["text_model.", "text_projection.", "logit_scale"]);
    let dev = candle_core::Device::Cpu;
    let model = clip::ClipVisionModelWithProjection::new(
        w.var_builder(candle_core::DType::F32, &dev),
        &cfg,
    )?;
    w.finish()?;
    let names = list_photos(root, Part::Train)?;
    if names.is_empty() {
        return Err(Error::input(
            root.join("train"),
            "no training photos for the CLIP statistics",
        ));
    }
    bar.set_length(names.len() as u64);
    let pre = clip::Preprocess::default();
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(16) {
        let pixels = chunk
            .iter()
            .map(|n| {
                let path = root.join("train").join(n);
                let img = crate::data::read_rgb(&path)?;
                let sq = pil_resize_rgb(&img, (512, 512), Filter::Bicubic)?;
                pre.apply(&U8Image::from_rgb(&sq), &dev)
            })
            .collect::<Result<Vec<_>>>()?;
        let e = model
            .forward(&candle_core::Tensor::stack(&pixels, 0)?)?
            .image_embeds;
        out.extend(e.to_vec2::<f32>()?);
        bar.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// Stats stage: counts what each folder holds, and writes `clip_std.npy` (the per-dimension std
/// of the training sources' CLIP embeddings, for training's embedding noise) when the CLIP
/// image encoder is available; an existing file is kept.
pub fn run_stats(
    root: &Path,
    pretrained_dir: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<StageReport> {
    let mut rep = StageReport::new("stats");
    for part in Part::ALL {
        let p = part.dir();
        rep.notes.push(format!(
            "{p}: {} photos, {} IUV, {} textures, {} faces",
            count_files(&root.join(p), "jpg"),
            count_files(&root.join(format!("{p}_densepose")), "png"),
            count_files(&root.join(format!("{p}_texture")), "png"),
            count_files(&root.join(format!("{p}_face")), "npy"),
        ));
    }
    let std_path = root.join("clip_std.npy");
    let enc = clip_encoder_dir(pretrained_dir);
    if std_path.is_file() {
        let (shape, _) = read_npy_f32(&std_path)?;
        rep.skipped += 1;
        rep.notes
            .push(format!("kept existing {} {shape:?}", std_path.display()));
    } else if enc.join(crate::weights::files::CONFIG).is_file() {
        let emb = clip_embeddings(root, &enc, bar)?;
        let std = per_dim_std(&emb)?;
        write_npy_f32(&std_path, &[std.len()], &std)?;
        rep.done += 1;
        rep.notes.push(format!(
            "wrote {} from {} training photos",
            std_path.display(),
            emb.len()
        ));
    } else {
        rep.status = super::report::StageStatus::Failed;
        rep.missing.push(std_path.display().to_string());
        rep.error = Some(format!(
            "clip_std.npy needs the CLIP image encoder in {} (config.json + weights; `mcld \
             download --only image_encoder` fetches them)",
            enc.display()
        ));
    }
    Ok(rep)
}
