//! Axes for 2-D figures: the map from data coordinates to pixels, "nice" tick positions, the
//! frame with tick labels, legends and a colour bar.

use crate::error::{Error, Result};
use crate::plot::canvas::{BLACK, Canvas, Rect, Rgb, WHITE};
use crate::plot::colormap::viridis;
use crate::plot::text::{Anchor, GLYPH, text_size};
use crate::tensor::{Shaped, Tensor};

/// Scale of the 8×8 font for titles, tick labels and legends (16 px characters).
pub const FONT_SCALE: i32 = 2;
const TICK_LEN: i32 = 6;
const AXIS_COLOR: Rgb = [60, 60, 60];

/// A plot area: the pixel rectangle `area` shows the data rectangle `extent`
/// (xmin, xmax, ymin, ymax) with y pointing up.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub area: Rect,
    pub extent: [f32; 4],
}

impl Frame {
    /// Pixel position (sub-pixel precision) of the data point (x, y).
    pub fn to_px(&self, x: f32, y: f32) -> [f32; 2] {
        let [x0, x1, y0, y1] = self.extent;
        let a = &self.area;
        [
            a.x0 as f32 + (x - x0) / (x1 - x0) * a.width() as f32,
            a.y1 as f32 - (y - y0) / (y1 - y0) * a.height() as f32,
        ]
    }

    /// Data position of the centre of pixel (px, py).
    pub fn to_data(&self, px: i32, py: i32) -> [f32; 2] {
        let [x0, x1, y0, y1] = self.extent;
        let a = &self.area;
        [
            x0 + ((px - a.x0) as f32 + 0.5) / a.width() as f32 * (x1 - x0),
            y1 - ((py - a.y0) as f32 + 0.5) / a.height() as f32 * (y1 - y0),
        ]
    }
}

/// Errors unless the extent is finite with xmin < xmax and ymin < ymax.
pub fn check_extent(extent: [f32; 4]) -> Result<()> {
    let [x0, x1, y0, y1] = extent;
    if extent.iter().all(|v| v.is_finite()) && x0 < x1 && y0 < y1 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "plot extent must be finite with xmin < xmax and ymin < ymax, got {extent:?}"
        )))
    }
}

/// Errors unless `points` is an n×2 matrix of finite values.
pub fn check_points(what: &str, points: &Tensor) -> Result<()> {
    if points.cols() != 2 {
        return Err(Error::shape(
            "plot",
            format!("n×2 points for {what}"),
            format!("{}x{}", points.rows(), points.cols()),
        ));
    }
    points.check_finite(what)
}

/// Tick positions covering [lo, hi] at a step of 1, 2 or 5 × 10^k chosen to give about
/// `target` ticks; also returns the step.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) {
        return (vec![lo], 1.0);
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            // Avoids "-0" labels and 0.30000000000000004-style positions.
            if v.abs() < step * 1e-9 { 0.0 } else { v }
        })
        .collect();
    (ticks, step)
}

/// A tick label with as many decimals as the step needs.
pub fn format_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().max(0.0) as usize
    };
    format!("{v:.decimals$}")
}

/// Draws the frame of `f`, ticks on all four sides (labels on the left and bottom) and no grid.
pub fn draw_axes(c: &mut Canvas, f: &Frame) {
    c.set_clip(None);
    let a = f.area;
    c.stroke_rect(
        Rect::new(a.x0 - 1, a.y0 - 1, a.width() + 2, a.height() + 2),
        AXIS_COLOR,
    );
    let [x0, x1, y0, y1] = f.extent;
    let (xt, xs) = nice_ticks(x0 as f64, x1 as f64, 6);
    for v in xt {
        let px = f.to_px(v as f32, y0)[0].round() as i32;
        c.fill_rect(Rect::new(px, a.y1 + 1, 1, TICK_LEN), AXIS_COLOR, 1.0);
        c.fill_rect(
            Rect::new(px, a.y0 - 1 - TICK_LEN, 1, TICK_LEN),
            AXIS_COLOR,
            1.0,
        );
        c.text(
            px,
            a.y1 + TICK_LEN + 6,
            &format_tick(v, xs),
            FONT_SCALE,
            AXIS_COLOR,
            Anchor::TopCenter,
        );
    }
    let (yt, ys) = nice_ticks(y0 as f64, y1 as f64, 6);
    for v in yt {
        let py = f.to_px(x0, v as f32)[1].round() as i32;
        c.fill_rect(
            Rect::new(a.x0 - 1 - TICK_LEN, py, TICK_LEN, 1),
            AXIS_COLOR,
            1.0,
        );
        c.fill_rect(Rect::new(a.x1 + 1, py, TICK_LEN, 1), AXIS_COLOR, 1.0);
        c.text(
            a.x0 - TICK_LEN - 6,
            py,
            &format_tick(v, ys),
            FONT_SCALE,
            AXIS_COLOR,
            Anchor::MiddleRight,
        );
    }
}

/// A title centred above `area`.
pub fn draw_title(c: &mut Canvas, area: Rect, title: &str, scale: i32) {
    c.set_clip(None);
    let y = area.y0 - TICK_LEN - 10 - GLYPH * scale;
    c.text(
        (area.x0 + area.x1) / 2,
        y,
        title,
        scale,
        BLACK,
        Anchor::TopCenter,
    );
}

/// A legend box in the top-right corner inside `area`: a dot of each colour and its label.
pub fn draw_legend(c: &mut Canvas, area: Rect, entries: &[(&str, Rgb)]) {
    if entries.is_empty() {
        return;
    }
    c.set_clip(None);
    let line_h = GLYPH * FONT_SCALE + 8;
    let text_w = entries
        .iter()
        .map(|(l, _)| text_size(l, FONT_SCALE).0)
        .max()
        .unwrap_or(0);
    let (pad, dot_w) = (10, 22);
    let w = pad * 2 + dot_w + text_w;
    let h = pad * 2 + line_h * entries.len() as i32 - 8;
    let r = Rect::new(area.x1 - w - 10, area.y0 + 10, w, h);
    c.fill_rect(r, WHITE, 0.85);
    c.stroke_rect(r, [170, 170, 170]);
    for (k, (label, color)) in entries.iter().enumerate() {
        let cy = r.y0 + pad + k as i32 * line_h + GLYPH * FONT_SCALE / 2;
        c.disc((r.x0 + pad + 7) as f32, cy as f32, 6.0, *color, 1.0);
        c.text(
            r.x0 + pad + dot_w,
            cy,
            label,
            FONT_SCALE,
            BLACK,
            Anchor::MiddleLeft,
        );
    }
}

/// A vertical colour bar in `bar` for values from `lo` (bottom) to `hi` (top), with ticks on
/// its right and `label` above it.
pub fn draw_colorbar(c: &mut Canvas, bar: Rect, lo: f64, hi: f64, label: &str) {
    c.set_clip(None);
    for y in bar.y0..bar.y1 {
        let t = (bar.y1 - 1 - y) as f32 / (bar.height() - 1).max(1) as f32;
        c.fill_rect(Rect::new(bar.x0, y, bar.width(), 1), viridis(t), 1.0);
    }
    c.stroke_rect(
        Rect::new(bar.x0 - 1, bar.y0 - 1, bar.width() + 2, bar.height() + 2),
        AXIS_COLOR,
    );
    let (ticks, step) = nice_ticks(lo, hi, 5);
    for v in ticks {
        let t = ((v - lo) / (hi - lo)) as f32;
        let py = bar.y1 - 1 - (t * (bar.height() - 1) as f32).round() as i32;
        c.fill_rect(Rect::new(bar.x1 + 1, py, TICK_LEN, 1), AXIS_COLOR, 1.0);
        c.text(
            bar.x1 + TICK_LEN + 4,
            py,
            &format_tick(v, step),
            FONT_SCALE,
            AXIS_COLOR,
            Anchor::MiddleLeft,
        );
    }
    c.text(
        (bar.x0 + bar.x1) / 2,
        bar.y0 - TICK_LEN - 10 - GLYPH * FONT_SCALE,
        label,
        FONT_SCALE,
        BLACK,
        Anchor::TopCenter,
    );
}
