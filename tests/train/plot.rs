//! The loss curve: three panels on one step axis (loss with its legend, learning rate,
//! gradient norm), a title with the experiment, step and throughput, text in the embedded font,
//! written atomically.

use std::io::Write;

use mcld::train::run::plot::{
    curve_title, read_log, write_loss_curve, CURVE_SIZE, GRAD, LR, PANEL_SHARES, RAW, SMOOTH,
    TITLE_HEIGHT,
};

fn write_log(path: &std::path::Path, steps: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    for s in 1..=steps {
        let loss = 0.4 / (1.0 + s as f64 / 10.0) + 0.02 * ((s * 7919 % 13) as f64 / 13.0);
        let lr = 1e-5 * (s.min(10) as f64 / 10.0);
        writeln!(
            f,
            r#"{{"step":{s},"epoch":0,"loss":{loss},"lr":{lr},"grad_norm":{},"samples_per_s":{},"steps_per_s":1.0,"samples":{},"skipped_step":false}}"#,
            1.0 + (s % 5) as f64 * 0.1,
            2.0 + (s % 2) as f64,
            s * 2
        )
        .unwrap();
    }
    // A line cut by a kill is skipped.
    write!(f, r#"{{"step":{},"loss":0.1"#, steps + 1).unwrap();
}

/// Rows (top, bottom) of each panel.
fn bands() -> [(u32, u32); 3] {
    let body = CURVE_SIZE.1 - TITLE_HEIGHT;
    let a = TITLE_HEIGHT + (body as f64 * PANEL_SHARES[0]) as u32;
    let b = a + (body as f64 * PANEL_SHARES[1]) as u32;
    [(TITLE_HEIGHT, a), (a, b), (b, CURVE_SIZE.1)]
}

#[test]
fn loss_curve_has_panels_legend_axes_and_title() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("train_log.jsonl");
    write_log(&log, 60);
    let pts = read_log(&log).unwrap();
    assert_eq!(pts.len(), 60);
    assert_eq!(
        curve_title("my-exp", &pts),
        "my-exp - step 60 - 2.50 samples/s"
    );
    let png = d.path().join("loss_curve.png");
    let r = write_loss_curve(&log, "my-exp", &png).unwrap().unwrap();
    assert_eq!(r.steps, (1, 60));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), CURVE_SIZE);
    let rows_with = |c: plotters::style::RGBColor| -> Vec<u32> {
        img.enumerate_pixels()
            .filter(|(_, _, p)| p.0 == [c.0, c.1, c.2])
            .map(|(_, y, _)| y)
            .collect()
    };
    let [loss, lr, grad] = bands();
    for (c, (top, bottom), what) in [
        (RAW, loss, "raw loss"),
        (SMOOTH, loss, "smoothed loss"),
        (LR, lr, "learning rate"),
        (GRAD, grad, "gradient norm"),
    ] {
        let ys = rows_with(c);
        assert!(ys.len() > 40, "{what}: {} pixels", ys.len());
        assert!(
            ys.iter().all(|y| (top..bottom).contains(y)),
            "{what} outside its panel {top}..{bottom}"
        );
    }
    let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 110))
            .count()
    };
    // The title is written; each panel has tick numbers and a name on its y axis.
    assert!(dark(0, CURVE_SIZE.0, 0, TITLE_HEIGHT) > 200);
    for (top, bottom) in [loss, lr, grad] {
        assert!(dark(0, 80, top, bottom) > 100, "{top}..{bottom}");
    }
    // The step numbers and the axis name under the last panel.
    assert!(dark(80, CURVE_SIZE.0, CURVE_SIZE.1 - 50, CURVE_SIZE.1) > 100);
    // The legend's box sits in the loss panel's upper right, with text in it.
    assert!(dark(CURVE_SIZE.0 / 2, CURVE_SIZE.0, loss.0, loss.0 + 80) > 100);

    // Redrawn in place as the log grows, with nothing left beside it.
    write_log(&log, 90);
    write_loss_curve(&log, "my-exp", &png).unwrap().unwrap();
    let again = image::open(&png).unwrap().to_rgb8();
    assert_ne!(again, img);
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // No entries: no picture.
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let none = d.path().join("none.png");
    assert!(write_loss_curve(&empty, "x", &none).unwrap().is_none());
    assert!(!none.exists());
}
