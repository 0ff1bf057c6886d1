//! Data for training: the toy 2-D sets of the flow literature, loading from files, the
//! train/test split, standardisation, and seeded mini-batches.
//!
//! The toy sets are written from their definitions (scikit-learn's make_moons/make_circles and
//! the generators popularised by FFJORD); every one is a function of `n` and a seeded [`Rng`],
//! so a seed reproduces the data exactly. All of them lie within about [−4, 4]².

use std::f64::consts::{PI, SQRT_2};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{Shaped, Tensor};
use crate::train::{csv, npy};

/// Noise of [`moons`] and [`circles`], as in scikit-learn's examples.
pub const DEFAULT_NOISE: f64 = 0.05;
/// Inner-to-outer radius ratio of [`circles`].
pub const DEFAULT_CIRCLES_FACTOR: f64 = 0.5;

/// Two interleaved half circles: ⌊n/2⌋ points on the upper one (cos t, sin t), the rest on the
/// lower one (1 − cos t, 0.5 − sin t), t evenly spaced on [0, π], shuffled, plus Gaussian noise
/// of std 0.05. The data lies in about [−1.2, 2.2] × [−0.7, 1.2].
pub fn moons(n: usize, rng: &mut Rng) -> Tensor {
    moons_points(n, DEFAULT_NOISE, rng)
}

/// [`moons`] with a chosen noise std. Errors unless `noise` is finite and non-negative.
pub fn moons_with_noise(n: usize, noise: f64, rng: &mut Rng) -> Result<Tensor> {
    check_noise(noise)?;
    Ok(moons_points(n, noise, rng))
}

fn moons_points(n: usize, noise: f64, rng: &mut Rng) -> Tensor {
    let upper = n / 2;
    let lower = n - upper;
    let mut pts = Vec::with_capacity(n);
    for k in 0..upper {
        let t = linspace_at(0.0, PI, upper, k);
        pts.push([t.cos(), t.sin()]);
    }
    for k in 0..lower {
        let t = linspace_at(0.0, PI, lower, k);
        pts.push([1.0 - t.cos(), 0.5 - t.sin()]);
    }
    shuffled_with_noise(pts, noise, rng)
}

/// Two concentric circles: ⌊n/2⌋ points evenly spaced on the unit circle, the rest on a circle
/// of radius 0.5, shuffled, plus Gaussian noise of std 0.05 (scikit-learn's make_circles with
/// factor 0.5).
pub fn circles(n: usize, rng: &mut Rng) -> Tensor {
    circles_points(n, DEFAULT_CIRCLES_FACTOR, DEFAULT_NOISE, rng)
}

/// [`circles`] with a chosen inner radius `factor` (in (0, 1)) and noise std (finite, ≥ 0).
pub fn circles_with(n: usize, factor: f64, noise: f64, rng: &mut Rng) -> Result<Tensor> {
    check_noise(noise)?;
    if !(factor > 0.0 && factor < 1.0) {
        return Err(Error::invalid(format!(
            "circles factor must lie in (0, 1), got {factor}"
        )));
    }
    Ok(circles_points(n, factor, noise, rng))
}

fn circles_points(n: usize, factor: f64, noise: f64, rng: &mut Rng) -> Tensor {
    let outer = n / 2;
    let inner = n - outer;
    let mut pts = Vec::with_capacity(n);
    for (count, radius) in [(outer, 1.0), (inner, factor)] {
        for k in 0..count {
            // The end point 2π is left out: it would repeat the start.
            let t = 2.0 * PI * k as f64 / count as f64;
            pts.push([radius * t.cos(), radius * t.sin()]);
        }
    }
    shuffled_with_noise(pts, noise, rng)
}

/// Radius of the ring of centres of [`eight_gaussians`]: 2√2 ≈ 2.83.
pub const EIGHT_GAUSSIANS_RADIUS: f64 = 2.0 * SQRT_2;
/// Std of each component of [`eight_gaussians`]: 0.5/√2 ≈ 0.354.
pub const EIGHT_GAUSSIANS_STD: f64 = 0.5 / SQRT_2;

/// A mixture of eight equally weighted isotropic Gaussians, std 0.5/√2, whose centres sit at
/// angles kπ/4 on a circle of radius 2√2. The outermost points (centre ± 3 std) reach about
/// 3.9, so the data lies in [−4, 4]².
pub fn eight_gaussians(n: usize, rng: &mut Rng) -> Tensor {
    let mut data = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let angle = rng.below(8) as f64 * PI / 4.0;
        let (ex, ey) = (rng.normal(), rng.normal());
        data.push((EIGHT_GAUSSIANS_RADIUS * angle.cos() + EIGHT_GAUSSIANS_STD * ex) as f32);
        data.push((EIGHT_GAUSSIANS_RADIUS * angle.sin() + EIGHT_GAUSSIANS_STD * ey) as f32);
    }
    Tensor::from_vec(n, 2, data).expect("2n values")
}

/// Uniform on the "black" squares of a 4×4 checkerboard covering [−4, 4]² with squares of side
/// 2: square (i, j), i and j in 0..4 counted from the lower left, is filled when i + j is even.
pub fn checkerboard(n: usize, rng: &mut Rng) -> Tensor {
    const SIDE: f64 = 2.0;
    let mut data = Vec::with_capacity(2 * n);
    for _ in 0..n {
        // Eight filled squares: pick a row, then one of the two filled columns of that row.
        let row = rng.below(4);
        let col = 2 * rng.below(2) + row % 2;
        let x = -4.0 + SIDE * (col as f64 + rng.uniform());
        let y = -4.0 + SIDE * (row as f64 + rng.uniform());
        data.push(x as f32);
        data.push(y as f32);
    }
    Tensor::from_vec(n, 2, data).expect("2n values")
}

/// Five curved arms. Each point picks an arm k, draws a radial coordinate r = 1 + 0.3 ε₁ and a
/// tangential one t = 0.1 ε₂, and is rotated by the angle 2πk/5 + 0.25 e^r, so that the arm
/// bends more the farther out it goes; the result is scaled by 2 (radius ≲ 4).
pub fn pinwheel(n: usize, rng: &mut Rng) -> Tensor {
    const ARMS: usize = 5;
    const RADIAL_STD: f64 = 0.3;
    const TANGENTIAL_STD: f64 = 0.1;
    const TWIST: f64 = 0.25;
    const SCALE: f64 = 2.0;
    let mut data = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let arm = rng.below(ARMS);
        let r = 1.0 + RADIAL_STD * rng.normal();
        let t = TANGENTIAL_STD * rng.normal();
        let angle = 2.0 * PI * arm as f64 / ARMS as f64 + TWIST * r.exp();
        let (s, c) = angle.sin_cos();
        data.push((SCALE * (c * r - s * t)) as f32);
        data.push((SCALE * (s * r + c * t)) as f32);
    }
    Tensor::from_vec(n, 2, data).expect("2n values")
}

/// A 2-D spiral: t uniform on [1.5π, 4.5π], the point (t cos t, t sin t) plus Gaussian noise of
/// std 1, all divided by 5 (radius up to about 2.9, noise std 0.2).
pub fn swissroll(n: usize, rng: &mut Rng) -> Tensor {
    const SHRINK: f64 = 5.0;
    let mut data = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let t = 1.5 * PI * (1.0 + 2.0 * rng.uniform());
        let (ex, ey) = (rng.normal(), rng.normal());
        data.push(((t * t.cos() + ex) / SHRINK) as f32);
        data.push(((t * t.sin() + ey) / SHRINK) as f32);
    }
    Tensor::from_vec(n, 2, data).expect("2n values")
}

/// The k-th of `count` evenly spaced values from `a` to `b`, both ends included.
fn linspace_at(a: f64, b: f64, count: usize, k: usize) -> f64 {
    if count <= 1 {
        a
    } else {
        a + (b - a) * k as f64 / (count - 1) as f64
    }
}

fn check_noise(noise: f64) -> Result<()> {
    if noise.is_finite() && noise >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "noise std must be finite and non-negative, got {noise}"
        )))
    }
}

/// Shuffles the points, adds isotropic Gaussian noise, and packs them as an n×2 matrix.
fn shuffled_with_noise(mut pts: Vec<[f64; 2]>, noise: f64, rng: &mut Rng) -> Tensor {
    rng.shuffle(&mut pts);
    let mut data = Vec::with_capacity(2 * pts.len());
    for p in &pts {
        for v in p {
            data.push((v + noise * rng.normal()) as f32);
        }
    }
    Tensor::from_vec(pts.len(), 2, data).expect("2n values")
}

/// The built-in 2-D data sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BuiltinSet {
    Moons,
    Circles,
    EightGaussians,
    Checkerboard,
    Pinwheel,
    Swissroll,
}

impl BuiltinSet {
    pub const ALL: [BuiltinSet; 6] = [
        BuiltinSet::Moons,
        BuiltinSet::Circles,
        BuiltinSet::EightGaussians,
        BuiltinSet::Checkerboard,
        BuiltinSet::Pinwheel,
        BuiltinSet::Swissroll,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinSet::Moons => "moons",
            BuiltinSet::Circles => "circles",
            BuiltinSet::EightGaussians => "8gaussians",
            BuiltinSet::Checkerboard => "checkerboard",
            BuiltinSet::Pinwheel => "pinwheel",
            BuiltinSet::Swissroll => "swissroll",
        }
    }

    /// The set of that name (case-insensitive), if there is one.
    pub fn from_name(name: &str) -> Option<BuiltinSet> {
        BuiltinSet::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name.trim()))
    }

    /// `n` points (an n×2 matrix).
    pub fn generate(self, n: usize, rng: &mut Rng) -> Tensor {
        let f: fn(usize, &mut Rng) -> Tensor = match self {
            BuiltinSet::Moons => moons,
            BuiltinSet::Circles => circles,
            BuiltinSet::EightGaussians => eight_gaussians,
            BuiltinSet::Checkerboard => checkerboard,
            BuiltinSet::Pinwheel => pinwheel,
            BuiltinSet::Swissroll => swissroll,
        };
        f(n, rng)
    }
}

impl fmt::Display for BuiltinSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where training data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    Builtin(BuiltinSet),
    Npy(PathBuf),
    Csv(PathBuf),
}

impl DataSource {
    /// A built-in set's name, or a path ending in `.npy` or `.csv` (any case). The file is not
    /// opened here; [`DataSource::load`] reports a missing one.
    pub fn parse(s: &str) -> Result<DataSource> {
        if let Some(set) = BuiltinSet::from_name(s) {
            return Ok(DataSource::Builtin(set));
        }
        let path = PathBuf::from(s);
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("npy") => Ok(DataSource::Npy(path)),
            Some("csv") => Ok(DataSource::Csv(path)),
            _ => {
                let names: Vec<&str> = BuiltinSet::ALL.iter().map(|b| b.name()).collect();
                Err(Error::invalid(format!(
                    "unknown data source '{s}': expected one of {} or a path ending in .npy or .csv",
                    names.join(", ")
                )))
            }
        }
    }

    /// The data: `n_builtin` points of a built-in set (drawn from `rng`), or the whole file.
    ///
    /// Errors: zero points → [`Error::Empty`]; file errors as in [`npy::read_npy`] and
    /// [`csv::read_csv`].
    pub fn load(&self, n_builtin: usize, rng: &mut Rng) -> Result<Tensor> {
        match self {
            DataSource::Builtin(set) => {
                if n_builtin == 0 {
                    return Err(Error::Empty(format!("0 points requested from {set}")));
                }
                Ok(set.generate(n_builtin, rng))
            }
            DataSource::Npy(p) => npy::read_npy(p),
            DataSource::Csv(p) => csv::read_csv(p),
        }
    }

    /// The file behind this source, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataSource::Builtin(_) => None,
            DataSource::Npy(p) | DataSource::Csv(p) => Some(p),
        }
    }
}

impl FromStr for DataSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DataSource::parse(s)
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Builtin(set) => write!(f, "{set}"),
            DataSource::Npy(p) | DataSource::Csv(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Splits the rows at random into (train, test), with round(n · test_fraction) rows in test.
///
/// Errors: `test_fraction` outside (0, 1) → [`Error::InvalidArgument`]; either part empty
/// (including empty `data`) → [`Error::Empty`].
pub fn train_test_split(
    data: &Tensor,
    test_fraction: f64,
    rng: &mut Rng,
) -> Result<(Tensor, Tensor)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::invalid(format!(
            "test fraction must lie in (0, 1), got {test_fraction}"
        )));
    }
    let n = data.rows();
    let n_test = (n as f64 * test_fraction).round() as usize;
    if n_test == 0 || n_test >= n {
        return Err(Error::Empty(format!(
            "splitting {n} rows with test fraction {test_fraction} leaves {} train and {n_test} test rows",
            n.saturating_sub(n_test)
        )));
    }
    let order = rng.permutation(n);
    let (test_idx, train_idx) = order.split_at(n_test);
    Ok((data.gather_rows(train_idx)?, data.gather_rows(test_idx)?))
}

/// Per-column affine standardisation u = (x − mean) / std.
///
/// A column with zero variance gets std 1 (it is only centred), so that `apply` never divides
/// by zero; such a column contributes nothing to [`Standardizer::log_det`].
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// From known statistics. Errors on unequal lengths, non-finite values or a std ≤ 0.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Standardizer> {
        if mean.len() != std.len() {
            return Err(Error::shape(
                "Standardizer::new",
                format!("{} stds", mean.len()),
                std.len(),
            ));
        }
        if let Some(j) = mean.iter().position(|m| !m.is_finite()) {
            return Err(Error::NonFinite {
                what: "standardizer mean".into(),
                row: 0,
                col: j,
            });
        }
        if let Some(j) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::invalid(format!(
                "standardizer std of column {j} must be finite and positive, got {}",
                std[j]
            )));
        }
        Ok(Standardizer { mean, std })
    }

    /// Column means and (population) standard deviations, accumulated in f64 in two passes.
    ///
    /// Errors: no rows or no columns → [`Error::Empty`]; a non-finite value →
    /// [`Error::NonFinite`].
    pub fn fit(data: &Tensor) -> Result<Standardizer> {
        if data.is_empty() {
            return Err(Error::Empty(format!(
                "cannot fit a standardizer to a {}x{} matrix",
                data.rows(),
                data.cols()
            )));
        }
        data.check_finite("data to standardise")?;
        let (n, d) = data.shape();
        let mut mean = vec![0.0f64; d];
        for i in 0..n {
            for (m, &v) in mean.iter_mut().zip(data.row(i)) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut var = vec![0.0f64; d];
        for i in 0..n {
            for ((s, &v), m) in var.iter_mut().zip(data.row(i)).zip(&mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        let std = var
            .iter()
            .map(|s| {
                let sd = (s / n as f64).sqrt() as f32;
                // Below f32's smallest normal number the column is constant for all purposes.
                if sd.is_normal() { sd } else { 1.0 }
            })
            .collect();
        Ok(Standardizer {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std,
        })
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// (x − mean) / std, column by column.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.map_columns("Standardizer::apply", x, |v, m, s| (v - m) / s)
    }

    /// u · std + mean: back to data units.
    pub fn invert(&self, u: &Tensor) -> Result<Tensor> {
        self.map_columns("Standardizer::invert", u, |v, m, s| v * s + m)
    }

    /// Σ log std. A log-density computed in standardised units minus this is the log-density in
    /// data units (change of variables for the diagonal map x ↦ u, eq. 18.1).
    pub fn log_det(&self) -> f64 {
        self.std.iter().map(|&s| f64::from(s).ln()).sum()
    }

    fn map_columns(
        &self,
        op: &'static str,
        x: &Tensor,
        f: impl Fn(f32, f32, f32) -> f32,
    ) -> Result<Tensor> {
        x.expect_shape(op, x.rows(), self.dim())?;
        let mut out = x.clone();
        for i in 0..out.rows() {
            for ((v, &m), &s) in out.row_mut(i).iter_mut().zip(&self.mean).zip(&self.std) {
                *v = f(*v, m, s);
            }
        }
        Ok(out)
    }
}

/// Seeded mini-batch indices: each epoch walks a fresh random permutation of 0..n in steps of
/// the batch size; a remainder too short for a full batch is dropped and the next epoch begins.
/// The same seed gives the same sequence of batches.
#[derive(Clone, Debug)]
pub struct Batches {
    order: Vec<usize>,
    pos: usize,
    epoch: usize,
    rng: Rng,
}

impl Batches {
    /// Batches over `n` rows, shuffled with a generator forked from `rng`.
    /// Errors: `n == 0` → [`Error::Empty`].
    pub fn new(n: usize, rng: &mut Rng) -> Result<Batches> {
        if n == 0 {
            return Err(Error::Empty("no rows to draw mini-batches from".into()));
        }
        let mut rng = rng.fork();
        let order = rng.permutation(n);
        Ok(Batches {
            order,
            pos: 0,
            epoch: 0,
            rng,
        })
    }

    /// The next `min(batch, n)` distinct row indices (empty when `batch` is 0).
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        let batch = batch.min(self.order.len());
        if self.pos + batch > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.pos = 0;
            self.epoch += 1;
        }
        let out = self.order[self.pos..self.pos + batch].to_vec();
        self.pos += batch;
        out
    }

    /// Completed passes over the data (0 during the first).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
