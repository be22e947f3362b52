//! The loss curve of a run as a PNG, drawn from the entries of `train_log.jsonl`: raw loss and
//! its exponential moving average with a legend, then the learning rate and the gradient norm
//! in panels below on the same step axis; the title names the experiment, the step and the
//! throughput. Text uses the font embedded in the binary ([`crate::imageops::text`]).

use std::path::Path;

use plotters::prelude::*;

use crate::imageops::text::{ensure_font, FONT};
use crate::{Error, Result};

/// One finite entry of a train log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogPoint {
    pub step: u64,
    pub loss: f64,
    /// NaN where the line has none.
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
}

/// The entries of a train log with a finite loss; lines that do not parse are skipped (a run
/// killed mid-write leaves at most one).
pub fn read_log(path: &Path) -> Result<Vec<LogPoint>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text.lines().filter_map(parse_line).collect())
}

/// One log line, or `None` when it does not parse or has no finite loss.
pub fn parse_line(line: &str) -> Option<LogPoint> {
    let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
    let p = LogPoint {
        step: v.get("step")?.as_u64()?,
        loss: v.get("loss")?.as_f64()?,
        lr: num("lr"),
        grad_norm: num("grad_norm"),
        samples_per_s: num("samples_per_s"),
    };
    p.loss.is_finite().then_some(p)
}

/// What the picture shows, for the caller to print next to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurveRange {
    pub steps: (u64, u64),
    pub loss: (f64, f64),
}

/// Size of the picture.
pub const CURVE_SIZE: (u32, u32) = (1000, 820);
/// Height of the title band, then the share of the rest each panel takes (loss, lr, grad norm).
pub const TITLE_HEIGHT: u32 = 44;
pub const PANEL_SHARES: [f64; 3] = [0.52, 0.22, 0.26];

/// Colours of the series (raw loss, smoothed loss, learning rate, gradient norm).
pub const RAW: RGBColor = RGBColor(150, 180, 230);
pub const SMOOTH: RGBColor = RGBColor(20, 60, 160);
pub const LR: RGBColor = RGBColor(200, 90, 20);
pub const GRAD: RGBColor = RGBColor(30, 140, 60);

/// Steps the moving average spans: a fifth of the run, between 2 and 20.
fn ema_span(n: usize) -> usize {
    (n / 5).clamp(2, 20)
}

/// Learning rates in scientific notation, zero as `0`.
fn lr_label(v: &f64) -> String {
    if *v == 0.0 {
        "0".into()
    } else {
        format!("{v:.1e}")
    }
}

/// Throughput over the last 50 entries (mean of the finite figures).
fn recent_samples_per_s(pts: &[LogPoint]) -> Option<f64> {
    let tail: Vec<f64> = pts[pts.len().saturating_sub(50)..]
        .iter()
        .map(|p| p.samples_per_s)
        .filter(|v| v.is_finite())
        .collect();
    (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64)
}

/// The title: experiment, last step, throughput.
pub fn curve_title(name: &str, pts: &[LogPoint]) -> String {
    let step = pts.last().map(|p| p.step).unwrap_or(0);
    match recent_samples_per_s(pts) {
        Some(r) => format!("{name} - step {step} - {r:.2} samples/s"),
        None => format!("{name} - step {step}"),
    }
}

/// Writes the curve of `log` to `png` (atomically) under the experiment name `name`; `None`
/// when the log has no entries yet.
pub fn write_loss_curve(log: &Path, name: &str, png: &Path) -> Result<Option<CurveRange>> {
    write_curve(&read_log(log)?, name, png)
}

/// Writes the curve of `pts` to `png` (atomically); `None` when there are none.
pub fn write_curve(pts: &[LogPoint], name: &str, png: &Path) -> Result<Option<CurveRange>> {
    if pts.is_empty() {
        return Ok(None);
    }
    let (w, h) = CURVE_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let range = draw(pts, &curve_title(name, pts), &mut buf).map_err(|e| {
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

/// `lo..hi` padded by 5% (a flat series gets a small band around its value).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05)
        .max(hi.abs().max(lo.abs()) * 0.05)
        .max(1e-12);
    (lo - pad)..(hi + pad)
}

fn finite_range(v: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    (lo <= hi).then_some((lo, hi))
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn draw(pts: &[LogPoint], title: &str, buf: &mut [u8]) -> DrawResult<CurveRange> {
    ensure_font();
    let x0 = pts[0].step;
    let x1 = pts[pts.len() - 1].step.max(x0 + 1);
    let (lo, hi) = finite_range(pts.iter().map(|p| p.loss)).unwrap_or((0.0, 1.0));

    let root = BitMapBackend::with_buffer(buf, CURVE_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(TITLE_HEIGHT);
    head.draw_text(
        title,
        &(FONT, 22.0).into_font().color(&BLACK),
        (16, (TITLE_HEIGHT as i32 - 22) / 2),
    )?;
    let body_h = CURVE_SIZE.1 - TITLE_HEIGHT;
    let (loss_area, rest) = body.split_vertically((body_h as f64 * PANEL_SHARES[0]) as u32);
    let (lr_area, grad_area) = rest.split_vertically((body_h as f64 * PANEL_SHARES[1]) as u32);

    let label = (FONT, 14.0).into_font();
    let desc = (FONT, 16.0).into_font();
    let grid = RGBColor(225, 225, 225);
    let fine = RGBColor(244, 244, 244);

    // Loss: raw and smoothed, with a legend.
    let mut c = ChartBuilder::on(&loss_area)
        .margin_left(10)
        .margin_right(24)
        .margin_top(8)
        .x_label_area_size(28)
        .y_label_area_size(76)
        .build_cartesian_2d(x0..x1, padded(lo, hi))?;
    c.configure_mesh()
        .y_desc("loss")
        .label_style(label.clone())
        .axis_desc_style(desc.clone())
        .light_line_style(fine)
        .bold_line_style(grid)
        .y_label_formatter(&|v| format!("{v:.3}"))
        .draw()?;
    c.draw_series(LineSeries::new(
        pts.iter().map(|p| (p.step, p.loss)),
        RAW.stroke_width(1),
    ))?
    .label("loss")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], RAW.stroke_width(2)));
    let span = ema_span(pts.len());
    let alpha = 2.0 / (span as f64 + 1.0);
    let mut ema = pts[0].loss;
    c.draw_series(LineSeries::new(
        pts.iter().map(|p| {
            ema += alpha * (p.loss - ema);
            (p.step, ema)
        }),
        SMOOTH.stroke_width(2),
    ))?
    .label(format!("smoothed (EMA over {span} steps)"))
    .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], SMOOTH.stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(label.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;

    // Learning rate.
    let (lr_lo, lr_hi) = finite_range(pts.iter().map(|p| p.lr)).unwrap_or((0.0, 1.0));
    let mut c = ChartBuilder::on(&lr_area)
        .margin_left(10)
        .margin_right(24)
        .margin_top(8)
        .x_label_area_size(28)
        .y_label_area_size(76)
        .build_cartesian_2d(x0..x1, padded(lr_lo.min(0.0), lr_hi))?;
    c.configure_mesh()
        .y_desc("learning rate")
        .label_style(label.clone())
        .axis_desc_style(desc.clone())
        .light_line_style(fine)
        .bold_line_style(grid)
        .y_labels(4)
        .y_label_formatter(&lr_label)
        .draw()?;
    c.draw_series(LineSeries::new(
        pts.iter()
            .filter(|p| p.lr.is_finite())
            .map(|p| (p.step, p.lr)),
        LR.stroke_width(2),
    ))?;

    // Gradient norm, with the shared step axis named below.
    let (g_lo, g_hi) = finite_range(pts.iter().map(|p| p.grad_norm)).unwrap_or((0.0, 1.0));
    let mut c = ChartBuilder::on(&grad_area)
        .margin_left(10)
        .margin_right(24)
        .margin_top(8)
        .margin_bottom(6)
        .x_label_area_size(46)
        .y_label_area_size(76)
        .build_cartesian_2d(x0..x1, padded(g_lo.min(0.0), g_hi))?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("gradient norm")
        .label_style(label)
        .axis_desc_style(desc)
        .light_line_style(fine)
        .bold_line_style(grid)
        .y_labels(4)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    c.draw_series(LineSeries::new(
        pts.iter()
            .filter(|p| p.grad_norm.is_finite())
            .map(|p| (p.step, p.grad_norm)),
        GRAD.stroke_width(2),
    ))?;
    root.present()?;
    Ok(CurveRange {
        steps: (x0, x1),
        loss: (lo, hi),
    })
}
