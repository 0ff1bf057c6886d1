//! Figures for 2-D flows: the density heat map, samples against data, the base carried through
//! the layers (Bishop Fig. 18.3) and ODE trajectories (Fig. 18.6).
//!
//! Every figure checks its inputs (finite n×2 points, a valid extent) and returns a typed error
//! rather than drawing garbage; points outside the extent are clipped away. Plot areas keep the
//! aspect ratio of the extent, with the longer side [`PLOT_SIDE`] (or [`PANEL_SIDE`]) pixels.

use std::path::Path;

use crate::error::{Error, Result};
use crate::plot::axes::{
    FONT_SCALE, Frame, check_extent, check_points, draw_axes, draw_colorbar, draw_legend,
    draw_title,
};
use crate::plot::canvas::{BLACK, Canvas, Rect, Rgb, WHITE};
use crate::plot::colormap::{angle_color, viridis};
use crate::plot::text::{Anchor, GLYPH};
use crate::tensor::{Shaped, Tensor};

/// Longer side of the plot area of a single-panel figure, in pixels.
pub const PLOT_SIDE: i32 = 560;
/// Longer side of each panel of [`panels_figure`], in pixels.
pub const PANEL_SIDE: i32 = 520;
/// Panels per row in [`panels_figure`].
const PANELS_PER_ROW: usize = 4;

const MARGIN_LEFT: i32 = 84;
const MARGIN_RIGHT: i32 = 28;
const MARGIN_TOP: i32 = 64;
const MARGIN_BOTTOM: i32 = 52;
/// Room to the right of a density plot for the colour bar and its labels.
const COLORBAR_ROOM: i32 = 130;
/// Colour of data points drawn under other marks.
const DATA_GREY: Rgb = [150, 150, 150];

/// Plot-area size for `extent` with the longer side `side`; the shorter side is kept at no
/// less than a third of it so that extreme extents stay legible.
fn area_size(extent: [f32; 4], side: i32) -> (i32, i32) {
    let ratio = (extent[3] - extent[2]) / (extent[1] - extent[0]);
    let ratio = ratio.clamp(1.0 / 3.0, 3.0);
    if ratio <= 1.0 {
        (side, (side as f32 * ratio).round() as i32)
    } else {
        ((side as f32 / ratio).round() as i32, side)
    }
}

/// A white canvas holding one frame for `extent`, with `extra_right` pixels beside it.
fn single_frame(extent: [f32; 4], extra_right: i32) -> Result<(Canvas, Frame)> {
    let (w, h) = area_size(extent, PLOT_SIDE);
    let canvas = Canvas::new(
        (MARGIN_LEFT + w + MARGIN_RIGHT + extra_right) as usize,
        (MARGIN_TOP + h + MARGIN_BOTTOM) as usize,
        WHITE,
    )?;
    let frame = Frame {
        area: Rect::new(MARGIN_LEFT, MARGIN_TOP, w, h),
        extent,
    };
    Ok((canvas, frame))
}

/// Marker radius (px) and opacity for a cloud of `n` points: small, translucent dots for
/// large clouds so that density shows through overplotting.
fn point_style(n: usize) -> (f32, f32) {
    let alpha = (3000.0 / n.max(1) as f32).sqrt().clamp(0.25, 0.9);
    let radius = if n > 5000 { 1.5 } else { 2.0 };
    (radius, alpha)
}

fn scatter(c: &mut Canvas, f: &Frame, points: &Tensor, color: Rgb, radius: f32, alpha: f32) {
    c.set_clip(Some(f.area));
    for i in 0..points.rows() {
        let [px, py] = f.to_px(points.get(i, 0), points.get(i, 1));
        c.disc(px, py, radius, color, alpha);
    }
    c.set_clip(None);
}

/// The data positions of the grid at which [`density_figure`] expects log-densities: an
/// (ny·nx)×2 matrix whose row i·nx + j is (x_j, y_i), x_j = xmin + j·(xmax − xmin)/(nx − 1) and
/// y_i = ymin + i·(ymax − ymin)/(ny − 1). Evaluate the model on it and reshape the ny·nx
/// log-densities row-major into an ny×nx grid.
pub fn density_grid(extent: [f32; 4], nx: usize, ny: usize) -> Result<Tensor> {
    check_extent(extent)?;
    if nx < 2 || ny < 2 {
        return Err(Error::invalid(format!(
            "density grid needs at least 2x2 nodes, got {nx}x{ny}"
        )));
    }
    let [x0, x1, y0, y1] = extent;
    let mut data = Vec::with_capacity(2 * nx * ny);
    for i in 0..ny {
        let y = y0 + (y1 - y0) * i as f32 / (ny - 1) as f32;
        for j in 0..nx {
            data.push(x0 + (x1 - x0) * j as f32 / (nx - 1) as f32);
            data.push(y);
        }
    }
    Tensor::from_vec(nx * ny, 2, data)
}

/// A heat map of the density p(x) = exp(log p(x)) with the data (if any) as white dots on top.
///
/// `grid` is ny×nx log-densities at the nodes described in [`density_grid`] (row 0 at ymin,
/// both ends of each axis included); the picture is bilinearly interpolated between nodes.
/// The colour scale is linear in p from 0 to the largest value on the grid, with a colour bar in
/// data units: this shows where the probability mass is, which is what one compares with the
/// data, whereas a log scale gives the empty tails as much visual weight as the modes.
///
/// Errors: extent or points invalid, a grid smaller than 2×2, a NaN or +∞ log-density, or a
/// grid that is −∞ everywhere (zero density) → typed errors; file-system failures →
/// [`Error::Io`].
pub fn density_figure(
    path: &Path,
    title: &str,
    extent: [f32; 4],
    grid: &Tensor,
    data: Option<&Tensor>,
) -> Result<()> {
    check_extent(extent)?;
    let (ny, nx) = grid.shape();
    if nx < 2 || ny < 2 {
        return Err(Error::invalid(format!(
            "density grid needs at least 2x2 nodes, got {ny}x{nx} (rows × columns)"
        )));
    }
    if let Some(k) = grid
        .data()
        .iter()
        .position(|v| v.is_nan() || *v == f32::INFINITY)
    {
        return Err(Error::NonFinite {
            what: "log-density grid".into(),
            row: k / nx,
            col: k % nx,
        });
    }
    if let Some(d) = data {
        check_points("data", d)?;
    }
    let peak = grid
        .data()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if peak == f32::NEG_INFINITY {
        return Err(Error::invalid(
            "log-density grid is -inf everywhere: nothing to show",
        ));
    }
    // Relative density in [0, 1], computed from the log so that large log-densities do not
    // overflow.
    let rel: Vec<f32> = grid.data().iter().map(|&lp| (lp - peak).exp()).collect();

    let (mut c, f) = single_frame(extent, COLORBAR_ROOM)?;
    let a = f.area;
    let [x0, x1, y0, y1] = extent;
    for py in a.y0..a.y1 {
        for px in a.x0..a.x1 {
            let [x, y] = f.to_data(px, py);
            let gx = ((x - x0) / (x1 - x0) * (nx - 1) as f32).clamp(0.0, (nx - 1) as f32);
            let gy = ((y - y0) / (y1 - y0) * (ny - 1) as f32).clamp(0.0, (ny - 1) as f32);
            let (j, i) = ((gx as usize).min(nx - 2), (gy as usize).min(ny - 2));
            let (fx, fy) = (gx - j as f32, gy - i as f32);
            let at = |i: usize, j: usize| rel[i * nx + j];
            let v = (1.0 - fy) * ((1.0 - fx) * at(i, j) + fx * at(i, j + 1))
                + fy * ((1.0 - fx) * at(i + 1, j) + fx * at(i + 1, j + 1));
            c.blend(px, py, viridis(v), 1.0);
        }
    }
    if let Some(d) = data {
        let (r, alpha) = point_style(d.rows());
        scatter(&mut c, &f, d, WHITE, r * 0.75, alpha * 0.6);
    }
    draw_axes(&mut c, &f);
    draw_title(&mut c, a, title, FONT_SCALE);
    let bar = Rect::new(a.x1 + 40, a.y0, 22, a.height());
    draw_colorbar(&mut c, bar, 0.0, f64::from(peak).exp(), "p(x)");
    if data.is_some() {
        c.text(
            a.x0,
            a.y1 + MARGIN_BOTTOM - GLYPH - 4,
            "white dots: data",
            1,
            [90, 90, 90],
            Anchor::TopLeft,
        );
    }
    c.save_png(path)
}

/// Point clouds over each other (e.g. model samples against the data), each in its colour, with
/// a legend of their labels. Sets are drawn in order, so put the data first.
///
/// Errors: invalid extent, no sets, all sets empty, or points that are not finite n×2.
pub fn scatter_figure(
    path: &Path,
    title: &str,
    extent: [f32; 4],
    sets: &[(&str, &Tensor, Rgb)],
) -> Result<()> {
    check_extent(extent)?;
    for (label, pts, _) in sets {
        check_points(label, pts)?;
    }
    if sets.iter().all(|(_, p, _)| p.rows() == 0) {
        return Err(Error::Empty("scatter figure with no points".into()));
    }
    let (mut c, f) = single_frame(extent, 0)?;
    for (_, pts, color) in sets {
        let (r, alpha) = point_style(pts.rows());
        scatter(&mut c, &f, pts, *color, r, alpha);
    }
    draw_axes(&mut c, &f);
    draw_title(&mut c, f.area, title, FONT_SCALE);
    let entries: Vec<(&str, Rgb)> = sets.iter().map(|(l, _, col)| (*l, *col)).collect();
    draw_legend(&mut c, f.area, &entries);
    c.save_png(path)
}

/// Angle of each point about the origin, the colour key shared by panels and trajectories.
fn angle_colors(points: impl Iterator<Item = [f32; 2]>) -> Vec<Rgb> {
    points.map(|[x, y]| angle_color(y.atan2(x))).collect()
}

/// A grid of scatter panels (up to four per row), one per stage of a flow, in the manner of
/// Bishop Fig. 18.3: the first panel is usually samples of the base Gaussian and the later ones
/// the same samples after each layer. Every point keeps the colour of its angle about the
/// origin in the first panel, so the eye can follow points through the layers.
///
/// Errors: no panels, panels with different numbers of points (or none), points that are not
/// finite n×2, or an invalid extent.
pub fn panels_figure(
    path: &Path,
    title: &str,
    panels: &[(String, Tensor)],
    extents: &[[f32; 4]],
) -> Result<()> {
    if extents.len() != panels.len() {
        return Err(Error::shape(
            "panels_figure",
            format!("{} extents", panels.len()),
            extents.len(),
        ));
    }
    for e in extents {
        check_extent(*e)?;
    }
    let Some((_, base)) = panels.first() else {
        return Err(Error::Empty("panels figure with no panels".into()));
    };
    if base.rows() == 0 {
        return Err(Error::Empty("panels figure with no points".into()));
    }
    for (label, pts) in panels {
        check_points(label, pts)?;
        if pts.rows() != base.rows() {
            return Err(Error::shape(
                "panels_figure",
                format!("{} points in every panel", base.rows()),
                format!("{} in panel '{label}'", pts.rows()),
            ));
        }
    }
    let colors = angle_colors((0..base.rows()).map(|i| [base.get(i, 0), base.get(i, 1)]));
    let (r, alpha) = point_style(base.rows());

    let (w, h) = extents
        .iter()
        .map(|e| area_size(*e, PANEL_SIDE))
        .fold((0, 0), |(a, b), (w, h)| (a.max(w), b.max(h)));
    let cols = panels.len().min(PANELS_PER_ROW);
    let rows = panels.len().div_ceil(PANELS_PER_ROW);
    let cell_w = MARGIN_LEFT + w + MARGIN_RIGHT;
    let cell_h = MARGIN_TOP + h + MARGIN_BOTTOM;
    let header = 8 + GLYPH * 3 + 8;
    let footer = 28;
    let mut c = Canvas::new(
        cols * cell_w as usize,
        (header + rows as i32 * cell_h + footer) as usize,
        WHITE,
    )?;
    c.text(c.width() as i32 / 2, 8, title, 3, BLACK, Anchor::TopCenter);
    for (k, ((label, pts), extent)) in panels.iter().zip(extents).enumerate() {
        let (gx, gy) = ((k % PANELS_PER_ROW) as i32, (k / PANELS_PER_ROW) as i32);
        let (pw, ph) = area_size(*extent, PANEL_SIDE);
        // Each panel keeps its own window (the base and the data live at different scales),
        // centred in a cell of the largest panel's size.
        let f = Frame {
            area: Rect::new(
                gx * cell_w + MARGIN_LEFT + (w - pw) / 2,
                header + gy * cell_h + MARGIN_TOP + (h - ph) / 2,
                pw,
                ph,
            ),
            extent: *extent,
        };
        c.set_clip(Some(f.area));
        for (i, color) in colors.iter().enumerate() {
            let [px, py] = f.to_px(pts.get(i, 0), pts.get(i, 1));
            c.disc(px, py, r, *color, alpha);
        }
        draw_axes(&mut c, &f);
        draw_title(&mut c, f.area, label, FONT_SCALE);
    }
    let note = "colour: angle of each point in the first panel";
    c.text(
        c.width() as i32 / 2,
        c.height() as i32 - footer + 6,
        note,
        FONT_SCALE,
        [90, 90, 90],
        Anchor::TopCenter,
    );
    c.save_png(path)
}

/// Paths of points carried by a continuous flow from the base Gaussian to the data, in the
/// manner of Bishop Fig. 18.6: the data (if any) in grey underneath, each path as a translucent
/// line coloured by the angle of its starting point, start points in black, end points in the
/// path's colour.
///
/// Errors: no trajectories, an empty trajectory, a non-finite point, invalid data or extent.
pub fn trajectories_figure(
    path: &Path,
    title: &str,
    extent: [f32; 4],
    trajectories: &[Vec<[f32; 2]>],
    data: Option<&Tensor>,
) -> Result<()> {
    check_extent(extent)?;
    if trajectories.is_empty() {
        return Err(Error::Empty(
            "trajectories figure with no trajectories".into(),
        ));
    }
    for (k, t) in trajectories.iter().enumerate() {
        if t.is_empty() {
            return Err(Error::Empty(format!("trajectory {k} has no points")));
        }
        if let Some(s) = t
            .iter()
            .position(|p| !(p[0].is_finite() && p[1].is_finite()))
        {
            return Err(Error::NonFinite {
                what: format!("trajectory {k}"),
                row: s,
                col: if t[s][0].is_finite() { 1 } else { 0 },
            });
        }
    }
    if let Some(d) = data {
        check_points("data", d)?;
    }
    let (mut c, f) = single_frame(extent, 0)?;
    if let Some(d) = data {
        let (r, alpha) = point_style(d.rows());
        scatter(&mut c, &f, d, DATA_GREY, r, alpha * 0.6);
    }
    let colors = angle_colors(trajectories.iter().map(|t| t[0]));
    let n = trajectories.len();
    let line_alpha = (60.0 / n as f32).sqrt().clamp(0.15, 0.8);
    c.set_clip(Some(f.area));
    for (t, color) in trajectories.iter().zip(&colors) {
        let px: Vec<[f32; 2]> = t.iter().map(|p| f.to_px(p[0], p[1])).collect();
        c.polyline(&px, 1.3, *color, line_alpha);
    }
    let (r, alpha) = point_style(n);
    for (t, color) in trajectories.iter().zip(&colors) {
        let [sx, sy] = f.to_px(t[0][0], t[0][1]);
        c.disc(sx, sy, r * 0.8, BLACK, alpha);
        let end = t[t.len() - 1];
        let [ex, ey] = f.to_px(end[0], end[1]);
        c.disc(ex, ey, r * 1.2, *color, alpha.max(0.6));
    }
    c.set_clip(None);
    draw_axes(&mut c, &f);
    draw_title(&mut c, f.area, title, FONT_SCALE);
    let mut entries = vec![("start (base)", BLACK), ("end", angle_color(0.6))];
    if data.is_some() {
        entries.insert(0, ("data", DATA_GREY));
    }
    draw_legend(&mut c, f.area, &entries);
    c.save_png(path)
}
