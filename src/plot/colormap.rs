//! Colour maps: a viridis-like sequential map for densities and a cyclic map for angles.

use crate::plot::canvas::Rgb;

/// Ten colours sampled evenly along matplotlib's viridis (dark blue-violet → teal → yellow),
/// whose lightness rises monotonically; linear interpolation between neighbours stays within a
/// few units of the original map.
const VIRIDIS_ANCHORS: [Rgb; 10] = [
    [0x44, 0x01, 0x54],
    [0x48, 0x28, 0x78],
    [0x3e, 0x49, 0x89],
    [0x31, 0x68, 0x8e],
    [0x26, 0x82, 0x8e],
    [0x1f, 0x9e, 0x89],
    [0x35, 0xb7, 0x79],
    [0x6e, 0xce, 0x58],
    [0xb5, 0xde, 0x2b],
    [0xfd, 0xe7, 0x25],
];

/// The viridis-like colour of `t` in [0, 1] (values outside are clamped; NaN maps to 0).
pub fn viridis(t: f32) -> Rgb {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let last = VIRIDIS_ANCHORS.len() - 1;
    let pos = t * last as f32;
    let k = (pos.floor() as usize).min(last - 1);
    let f = pos - k as f32;
    let (a, b) = (VIRIDIS_ANCHORS[k], VIRIDIS_ANCHORS[k + 1]);
    std::array::from_fn(|c| {
        (f32::from(a[c]) + f * (f32::from(b[c]) - f32::from(a[c]))).round() as u8
    })
}

/// A cyclic colour for an angle in radians: three sine waves a third of a turn apart (a
/// "sinebow"), which changes hue at a more even rate than the HSV wheel and has no dark spot.
/// Toned down slightly so that points stay visible on white.
pub fn angle_color(angle: f32) -> Rgb {
    use std::f32::consts::PI;
    let t = if angle.is_finite() {
        angle / (2.0 * PI)
    } else {
        0.0
    };
    std::array::from_fn(|c| {
        let s = (PI * (t + c as f32 / 3.0)).sin();
        (255.0 * (0.08 + 0.82 * s * s)).round() as u8
    })
}
