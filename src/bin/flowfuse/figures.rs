//! The PNG figures of a 2-D run: density, samples against data, and the base carried through
//! each layer (Fig. 18.3).

use std::path::{Path, PathBuf};

use flowfuse::cnf::ScaledCnf;
use flowfuse::flows::Flow;
use flowfuse::plot::figures::{
    density_figure, density_grid, panels_figure, scatter_figure, trajectories_figure,
};
use flowfuse::{Backend, Result, Rng, Shaped, Tensor};

/// Grid nodes per axis of the density heat map.
const GRID: usize = 200;
/// Points drawn for the sample and layer figures.
const POINTS: usize = 3000;

/// A square-ish window around the data with a margin, shared by every figure of a run.
pub fn extent_of(data: &Tensor) -> [f32; 4] {
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for i in 0..data.rows() {
        for k in 0..2 {
            lo[k] = lo[k].min(data.get(i, k));
            hi[k] = hi[k].max(data.get(i, k));
        }
    }
    let margin = 0.15 * (hi[0] - lo[0]).max(hi[1] - lo[1]).max(1e-3);
    [
        lo[0] - margin,
        hi[0] + margin,
        lo[1] - margin,
        hi[1] + margin,
    ]
}

/// log p on the heat-map grid of `extent`, as a GRID×GRID matrix (row 0 = ymin).
pub fn log_density_grid<B: Backend>(
    b: &B,
    extent: [f32; 4],
    log_prob: impl Fn(&B, &B::Mat) -> Result<B::Mat>,
) -> Result<Tensor> {
    let pts = density_grid(extent, GRID, GRID)?;
    let lp = b.download(&log_prob(b, &b.upload(&pts)?)?)?;
    Tensor::from_vec(GRID, GRID, lp.into_vec())
}

/// Writes density.png, samples.png and layers.png for a discrete flow; returns their paths.
pub fn flow_figures<B: Backend>(
    b: &B,
    flow: &Flow<B>,
    name: &str,
    data: &Tensor,
    out: &Path,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    let extent = extent_of(data);
    let shown = data.slice_rows(0, POINTS);
    let grid = log_density_grid(b, extent, |b, x| flow.log_prob(b, x))?;
    let density = out.join("density.png");
    density_figure(
        &density,
        &format!("{name}: learned density"),
        extent,
        &grid,
        Some(&shown),
    )?;

    let mut rng = Rng::new(seed ^ 0x5EED);
    let samples = b.download(&flow.sample(b, POINTS, &mut rng)?)?;
    let samples_png = out.join("samples.png");
    scatter_figure(
        &samples_png,
        &format!("{name}: samples vs data"),
        extent,
        &[
            ("data", &shown, [120, 120, 120]),
            ("samples", &samples, [220, 80, 30]),
        ],
    )?;

    let z = b.upload(&Tensor::randn(POINTS, 2, &mut rng))?;
    let stages = flow.forward_stages(b, &z)?;
    let panels = stage_panels(&stages);
    let layers_png = out.join("layers.png");
    let extents: Vec<[f32; 4]> = panels.iter().map(|(_, t)| robust_extent(t)).collect();
    panels_figure(
        &layers_png,
        &format!("{name}: the base Gaussian carried through the layers"),
        &panels,
        &extents,
    )?;
    Ok(vec![density, samples_png, layers_png])
}

/// A window holding the central 99% of the points along each axis (a few far-out base draws
/// must not shrink the picture), with a margin.
fn robust_extent(t: &Tensor) -> [f32; 4] {
    let mut out = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    {
        for k in 0..2 {
            let mut v: Vec<f32> = (0..t.rows())
                .map(|i| t.get(i, k))
                .filter(|v| v.is_finite())
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f32::total_cmp);
            let lo = v[v.len() / 200];
            let hi = v[v.len() - 1 - v.len() / 200];
            out[2 * k] = out[2 * k].min(lo);
            out[2 * k + 1] = out[2 * k + 1].max(hi);
        }
    }
    if !out.iter().all(|v| v.is_finite()) || out[1] <= out[0] || out[3] <= out[2] {
        return [-3.0, 3.0, -3.0, 3.0];
    }
    let margin = 0.08 * (out[1] - out[0]).max(out[3] - out[2]);
    [
        out[0] - margin,
        out[1] + margin,
        out[2] - margin,
        out[3] + margin,
    ]
}

/// At most eight panels: the base, evenly spaced intermediate stages, and the output.
fn stage_panels(stages: &[Tensor]) -> Vec<(String, Tensor)> {
    let last = stages.len() - 1;
    let picks: Vec<usize> = if last <= 7 {
        (0..=last).collect()
    } else {
        (0..8).map(|k| k * last / 7).collect()
    };
    picks
        .into_iter()
        .map(|i| {
            let title = match i {
                0 => "base z".to_string(),
                i if i == last => "data space x".to_string(),
                i => format!("after layer {i}"),
            };
            (title, stages[i].clone())
        })
        .collect()
}

/// Paths drawn in the trajectory figure, and the times each is sampled at.
const PATHS: usize = 300;
const PATH_TIMES: usize = 41;

/// Writes density.png, samples.png and trajectories.png (Fig. 18.6) for a continuous flow.
pub fn cnf_figures<B: Backend>(
    b: &B,
    model: &ScaledCnf<B>,
    data: &Tensor,
    out: &Path,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    let extent = extent_of(data);
    let shown = data.slice_rows(0, POINTS);
    let grid = log_density_grid(b, extent, |b, x| Ok(model.log_prob(b, x)?.0))?;
    let density = out.join("density.png");
    density_figure(
        &density,
        "cnf: learned density (exact trace)",
        extent,
        &grid,
        Some(&shown),
    )?;

    let mut rng = Rng::new(seed ^ 0x5EED);
    let samples = b.download(&model.sample(b, POINTS, &mut rng)?.0)?;
    let samples_png = out.join("samples.png");
    scatter_figure(
        &samples_png,
        "cnf: samples vs data",
        extent,
        &[
            ("data", &shown, [120, 120, 120]),
            ("samples", &samples, [220, 80, 30]),
        ],
    )?;

    let times: Vec<f64> = (0..PATH_TIMES)
        .map(|k| k as f64 / (PATH_TIMES - 1) as f64)
        .collect();
    let (states, _) = model.trajectories(b, PATHS, &times, &mut rng)?;
    let paths: Vec<Vec<[f32; 2]>> = (0..PATHS)
        .map(|i| states.iter().map(|s| [s.get(i, 0), s.get(i, 1)]).collect())
        .collect();
    let all: Vec<&Tensor> = states.iter().collect();
    let window = union_extent(&all, extent);
    let traj = out.join("trajectories.png");
    trajectories_figure(
        &traj,
        "cnf: paths, t = 0 to t = 1",
        window,
        &paths,
        Some(&shown),
    )?;
    Ok(vec![density, samples_png, traj])
}

/// `base` widened to hold the central 99% of every set (the Gaussian end is wider than the data).
fn union_extent(sets: &[&Tensor], base: [f32; 4]) -> [f32; 4] {
    sets.iter().map(|t| robust_extent(t)).fold(base, |a, e| {
        [
            a[0].min(e[0]),
            a[1].max(e[1]),
            a[2].min(e[2]),
            a[3].max(e[3]),
        ]
    })
}
