//! The loss curve of a run as a PNG, drawn from `train_log.jsonl`: raw loss (light) and an
//! exponential moving average (dark) against the step. Drawn without text (plotters' text needs
//! system fonts); the step and loss ranges go to the caller's log instead.

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// (step, loss) of every finite entry of a train log; lines that do not parse are skipped (a
/// run killed mid-write leaves at most one).
pub fn read_loss_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .filter(|(_, l)| l.is_finite())
        .collect())
}

/// What the picture shows, for the caller to print next to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurveRange {
    pub steps: (u64, u64),
    pub loss: (f64, f64),
}

/// Writes the loss curve of `log` to `png` (atomically); `None` when the log has no entries.
pub fn write_loss_curve(log: &Path, png: &Path) -> Result<Option<CurveRange>> {
    let pts = read_loss_log(log)?;
    if pts.is_empty() {
        return Ok(None);
    }
    let (w, h) = (800u32, 400u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let range = draw(&pts, &mut buf, (w, h)).map_err(|e| {
        Error::msg(format!(
            "{}: cannot draw the loss curve: {e}",
            png.display()
        ))
    })?;
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::msg("loss curve buffer does not match its size"))?;
    crate::fsutil::save_image_atomic(&image::DynamicImage::ImageRgb8(img), png)?;
    Ok(Some(range))
}

fn draw(
    pts: &[(u64, f64)],
    buf: &mut [u8],
    size: (u32, u32),
) -> std::result::Result<CurveRange, Box<dyn std::error::Error>> {
    let x0 = pts.first().map(|p| p.0).unwrap_or(0);
    let x1 = pts.last().map(|p| p.0).unwrap_or(1).max(x0 + 1);
    let (lo, hi) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let pad = ((hi - lo) * 0.05).max(1e-12);
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .build_cartesian_2d(x0 as f64..x1 as f64, (lo - pad)..(hi + pad))?;
    // Frame and quarter grid lines, in place of labelled axes.
    let grey = RGBColor(220, 220, 220);
    for i in 0..=4 {
        let fx = x0 as f64 + (x1 - x0) as f64 * i as f64 / 4.0;
        let fy = lo - pad + (hi - lo + 2.0 * pad) * i as f64 / 4.0;
        chart.draw_series(LineSeries::new(
            [(fx, lo - pad), (fx, hi + pad)],
            grey.stroke_width(1),
        ))?;
        chart.draw_series(LineSeries::new(
            [(x0 as f64, fy), (x1 as f64, fy)],
            grey.stroke_width(1),
        ))?;
    }
    chart.draw_series(LineSeries::new(
        pts.iter().map(|&(s, l)| (s as f64, l)),
        RGBColor(150, 180, 230).stroke_width(1),
    ))?;
    let alpha = 2.0 / (pts.len().min(200) as f64 / 10.0 + 1.0);
    let mut ema = pts[0].1;
    chart.draw_series(LineSeries::new(
        pts.iter().map(|&(s, l)| {
            ema += alpha * (l - ema);
            (s as f64, ema)
        }),
        RGBColor(20, 60, 160).stroke_width(2),
    ))?;
    root.present()?;
    Ok(CurveRange {
        steps: (x0, x1),
        loss: (lo, hi),
    })
}
