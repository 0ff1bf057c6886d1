//! An RGB raster with alpha-blended, anti-aliased drawing primitives and PNG output.
//!
//! Coordinates are pixels with the origin at the top left; pixel (x, y) covers the square
//! [x, x+1) × [y, y+1), so its centre is (x + 0.5, y + 0.5). Anti-aliasing uses the distance
//! from a pixel centre to the shape: coverage = clamp(half-width + 0.5 − distance, 0, 1).

use std::path::Path;

use crate::error::{Error, Result};
use crate::train::checkpoint::write_atomic;

/// An sRGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];

/// Largest canvas accepted (pixels), so that a bad size is an error rather than an abort.
const MAX_PIXELS: usize = 1 << 28;

/// An integer pixel rectangle: x in [x0, x1), y in [y0, y1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
}

impl Rect {
    pub fn new(x: i32, y: i32, width: i32, height: i32) -> Rect {
        Rect {
            x0: x,
            y0: y,
            x1: x + width,
            y1: y + height,
        }
    }

    pub fn width(&self) -> i32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> i32 {
        self.y1 - self.y0
    }

    fn intersect(&self, o: &Rect) -> Rect {
        Rect {
            x0: self.x0.max(o.x0),
            y0: self.y0.max(o.y0),
            x1: self.x1.min(o.x1),
            y1: self.y1.min(o.y1),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
    /// Drawing outside this rectangle is discarded.
    clip: Rect,
}

impl Canvas {
    /// A canvas filled with `background`. Errors on a zero or absurdly large size.
    pub fn new(width: usize, height: usize, background: Rgb) -> Result<Canvas> {
        let fits = width > 0
            && height > 0
            && width <= i32::MAX as usize
            && height <= i32::MAX as usize
            && width.checked_mul(height).is_some_and(|n| n <= MAX_PIXELS);
        if !fits {
            return Err(Error::invalid(format!(
                "canvas size {width}x{height} is empty or too large"
            )));
        }
        Ok(Canvas {
            width,
            height,
            pixels: vec![background; width * height],
            clip: Rect::new(0, 0, width as i32, height as i32),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn bounds(&self) -> Rect {
        Rect::new(0, 0, self.width as i32, self.height as i32)
    }

    /// The colour at (x, y); None outside the canvas.
    pub fn pixel(&self, x: usize, y: usize) -> Option<Rgb> {
        (x < self.width && y < self.height).then(|| self.pixels[y * self.width + x])
    }

    /// Restricts drawing to `clip` (intersected with the canvas); `None` lifts the restriction.
    pub fn set_clip(&mut self, clip: Option<Rect>) {
        let all = self.bounds();
        self.clip = clip.map_or(all, |c| c.intersect(&all));
    }

    /// Blends `color` over pixel (x, y) with opacity `alpha` in [0, 1]; clipped pixels and
    /// non-positive alphas are skipped.
    pub fn blend(&mut self, x: i32, y: i32, color: Rgb, alpha: f32) {
        let c = &self.clip;
        if x < c.x0 || x >= c.x1 || y < c.y0 || y >= c.y1 || alpha.is_nan() || alpha <= 0.0 {
            return;
        }
        let a = alpha.min(1.0);
        let px = &mut self.pixels[y as usize * self.width + x as usize];
        for (dst, &src) in px.iter_mut().zip(&color) {
            let v = f32::from(*dst) + a * (f32::from(src) - f32::from(*dst));
            *dst = v.round().clamp(0.0, 255.0) as u8;
        }
    }

    /// Fills `r` with `color` at opacity `alpha`.
    pub fn fill_rect(&mut self, r: Rect, color: Rgb, alpha: f32) {
        let r = r.intersect(&self.clip);
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                self.blend(x, y, color, alpha);
            }
        }
    }

    /// The one-pixel outline of `r`.
    pub fn stroke_rect(&mut self, r: Rect, color: Rgb) {
        self.fill_rect(Rect::new(r.x0, r.y0, r.width(), 1), color, 1.0);
        self.fill_rect(Rect::new(r.x0, r.y1 - 1, r.width(), 1), color, 1.0);
        self.fill_rect(Rect::new(r.x0, r.y0, 1, r.height()), color, 1.0);
        self.fill_rect(Rect::new(r.x1 - 1, r.y0, 1, r.height()), color, 1.0);
    }

    /// An anti-aliased filled disc of `radius` pixels centred at (cx, cy).
    pub fn disc(&mut self, cx: f32, cy: f32, radius: f32, color: Rgb, alpha: f32) {
        if !(cx.is_finite() && cy.is_finite() && radius > 0.0) {
            return;
        }
        let reach = radius + 0.5;
        let (x0, x1) = ((cx - reach).floor() as i32, (cx + reach).ceil() as i32);
        let (y0, y1) = ((cy - reach).floor() as i32, (cy + reach).ceil() as i32);
        for y in y0.max(self.clip.y0)..y1.min(self.clip.y1) {
            for x in x0.max(self.clip.x0)..x1.min(self.clip.x1) {
                let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
                let cover = (reach - d).clamp(0.0, 1.0);
                self.blend(x, y, color, alpha * cover);
            }
        }
    }

    /// An anti-aliased line of `width` pixels through `points`, blended once as a whole, so
    /// that joints of a translucent line are not darker than its segments.
    pub fn polyline(&mut self, points: &[[f32; 2]], width: f32, color: Rgb, alpha: f32) {
        if points.is_empty()
            || width.is_nan()
            || width <= 0.0
            || points.iter().flatten().any(|v| !v.is_finite())
        {
            return;
        }
        let reach = width / 2.0 + 0.5;
        let lo = |k: usize| points.iter().map(|p| p[k]).fold(f32::INFINITY, f32::min) - reach;
        let hi = |k: usize| {
            points
                .iter()
                .map(|p| p[k])
                .fold(f32::NEG_INFINITY, f32::max)
                + reach
        };
        let bx = Rect {
            x0: (lo(0).floor() as i32).max(self.clip.x0),
            y0: (lo(1).floor() as i32).max(self.clip.y0),
            x1: (hi(0).ceil() as i32).min(self.clip.x1),
            y1: (hi(1).ceil() as i32).min(self.clip.y1),
        };
        if bx.width() <= 0 || bx.height() <= 0 {
            return;
        }
        let bw = bx.width() as usize;
        let mut cover = vec![0.0f32; bw * bx.height() as usize];
        let single;
        let segments: &[[f32; 2]] = if points.len() == 1 {
            single = [points[0], points[0]];
            &single
        } else {
            points
        };
        for seg in segments.windows(2) {
            let (a, b) = (seg[0], seg[1]);
            let sx0 = ((a[0].min(b[0]) - reach).floor() as i32).max(bx.x0);
            let sx1 = ((a[0].max(b[0]) + reach).ceil() as i32).min(bx.x1);
            let sy0 = ((a[1].min(b[1]) - reach).floor() as i32).max(bx.y0);
            let sy1 = ((a[1].max(b[1]) + reach).ceil() as i32).min(bx.y1);
            for y in sy0..sy1 {
                for x in sx0..sx1 {
                    let d = distance_to_segment([x as f32 + 0.5, y as f32 + 0.5], a, b);
                    let c = (reach - d).clamp(0.0, 1.0);
                    let slot = &mut cover[(y - bx.y0) as usize * bw + (x - bx.x0) as usize];
                    *slot = slot.max(c);
                }
            }
        }
        for (k, &c) in cover.iter().enumerate() {
            if c > 0.0 {
                let x = bx.x0 + (k % bw) as i32;
                let y = bx.y0 + (k / bw) as i32;
                self.blend(x, y, color, alpha * c);
            }
        }
    }

    /// Encodes the canvas as an 8-bit RGB PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let to_err = |e: png::EncodingError| Error::invalid(format!("PNG encoding failed: {e}"));
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(to_err)?;
            writer
                .write_image_data(self.pixels.as_flattened())
                .map_err(to_err)?;
            writer.finish().map_err(to_err)?;
        }
        Ok(out)
    }

    /// Writes the canvas as a PNG file, atomically.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_png()?)
    }
}

/// Euclidean distance from `p` to the segment [a, b].
fn distance_to_segment(p: [f32; 2], a: [f32; 2], b: [f32; 2]) -> f32 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (qx, qy) = (a[0] + t * dx, a[1] + t * dy);
    ((p[0] - qx).powi(2) + (p[1] - qy).powi(2)).sqrt()
}
