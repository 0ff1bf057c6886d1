//! Text in the public-domain 8×8 bitmap font of the `font8x8` crate, drawn at an integer scale.
//! Characters outside ASCII are drawn as '?'.

use font8x8::legacy::BASIC_LEGACY;

use crate::plot::canvas::{Canvas, Rgb};

/// Side of a glyph cell at scale 1, in pixels.
pub const GLYPH: i32 = 8;

/// Where a text's anchor point sits on the text box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// (x, y) is the top-left corner.
    TopLeft,
    /// (x, y) is the middle of the top edge.
    TopCenter,
    /// (x, y) is the middle of the right edge.
    MiddleRight,
    /// (x, y) is the middle of the left edge.
    MiddleLeft,
}

/// Width and height in pixels of `text` drawn at `scale`.
pub fn text_size(text: &str, scale: i32) -> (i32, i32) {
    (text.chars().count() as i32 * GLYPH * scale, GLYPH * scale)
}

impl Canvas {
    /// Draws `text` at `scale` (1 = 8 px per character) anchored at (x, y).
    pub fn text(&mut self, x: i32, y: i32, text: &str, scale: i32, color: Rgb, anchor: Anchor) {
        let scale = scale.max(1);
        let (w, h) = text_size(text, scale);
        let (left, top) = match anchor {
            Anchor::TopLeft => (x, y),
            Anchor::TopCenter => (x - w / 2, y),
            Anchor::MiddleRight => (x - w, y - h / 2),
            Anchor::MiddleLeft => (x, y - h / 2),
        };
        for (k, ch) in text.chars().enumerate() {
            let code = if ch.is_ascii() {
                ch as usize
            } else {
                '?' as usize
            };
            let glyph = BASIC_LEGACY[code];
            let gx = left + k as i32 * GLYPH * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..GLYPH {
                    // Bit 0 of each row byte is the leftmost pixel.
                    if bits >> col & 1 == 1 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.blend(
                                    gx + col * scale + dx,
                                    top + row as i32 * scale + dy,
                                    color,
                                    1.0,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
