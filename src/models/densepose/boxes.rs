//! Box arithmetic shared by the RPN and the box head: delta decoding, clipping, NMS.

/// `Box2BoxTransform.apply_deltas` for one box, in float32 like detectron2.
pub fn apply_deltas(d: &[f32; 4], b: &[f32; 4], w: &[f32; 4]) -> [f32; 4] {
    let clamp = (1000.0f64 / 16.0).ln() as f32;
    let widths = b[2] - b[0];
    let heights = b[3] - b[1];
    let cx = b[0] + 0.5 * widths;
    let cy = b[1] + 0.5 * heights;
    let dx = d[0] / w[0];
    let dy = d[1] / w[1];
    let dw = (d[2] / w[2]).min(clamp);
    let dh = (d[3] / w[3]).min(clamp);
    let pcx = dx * widths + cx;
    let pcy = dy * heights + cy;
    let pw = dw.exp() * widths;
    let ph = dh.exp() * heights;
    [
        pcx - 0.5 * pw,
        pcy - 0.5 * ph,
        pcx + 0.5 * pw,
        pcy + 0.5 * ph,
    ]
}

/// Greedy NMS as torchvision's CPU kernel: float32 IoU, `iou > thresh` suppresses.
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], thresh: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let areas: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let xx1 = bi[0].max(bj[0]);
            let yy1 = bi[1].max(bj[1]);
            let xx2 = bi[2].min(bj[2]);
            let yy2 = bi[3].min(bj[3]);
            let w = (xx2 - xx1).max(0.0);
            let h = (yy2 - yy1).max(0.0);
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if ovr as f64 > thresh {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Clamps a box into `[0, w] x [0, h]`.
pub fn clip_box(b: &[f32; 4], h: f32, w: f32) -> [f32; 4] {
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

/// NMS within each category, then all survivors sorted by score (torchvision's batched_nms).
pub fn batched_nms(boxes: &[[f32; 4]], scores: &[f32], cats: &[usize], thresh: f64) -> Vec<usize> {
    let mut ids: Vec<usize> = cats.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut keep = Vec::new();
    for c in ids {
        let idx: Vec<usize> = (0..boxes.len()).filter(|&i| cats[i] == c).collect();
        let sb: Vec<[f32; 4]> = idx.iter().map(|&i| boxes[i]).collect();
        let ss: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&sb, &ss, thresh).into_iter().map(|k| idx[k]));
    }
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    keep
}
