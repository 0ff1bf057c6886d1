//! Figures are written, decode as PNGs of the expected size, and show something.
//!
//! Set FLOWFUSE_FIGURE_DIR to keep the figures for inspection.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use flowfuse::plot::canvas::{Canvas, Rect, WHITE};
use flowfuse::plot::colormap::viridis;
use flowfuse::plot::{
    density_figure, density_grid, panels_figure, scatter_figure, trajectories_figure,
};
use flowfuse::train::data::{eight_gaussians, moons};
use flowfuse::{Error, Rng, Shaped, Tensor};

fn out_dir(test: &str) -> PathBuf {
    let dir = match std::env::var_os("FLOWFUSE_FIGURE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("plot-{test}")),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Decodes an RGB PNG into (width, height, pixels).
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(BufReader::new(File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn distinct(px: &[[u8; 3]]) -> usize {
    px.iter().collect::<HashSet<_>>().len()
}

fn count_near(px: &[[u8; 3]], color: [u8; 3], tol: i32) -> usize {
    px.iter()
        .filter(|p| (0..3).all(|c| (p[c] as i32 - color[c] as i32).abs() <= tol))
        .count()
}

/// Log-density of a two-component Gaussian mixture on the grid nodes of `density_grid`.
fn mixture_log_density(extent: [f32; 4], nx: usize, ny: usize) -> Tensor {
    let pts = density_grid(extent, nx, ny).unwrap();
    let lp: Vec<f32> = (0..pts.rows())
        .map(|k| {
            let (x, y) = (pts.get(k, 0) as f64, pts.get(k, 1) as f64);
            let g = |mx: f64, my: f64, s: f64| {
                (-((x - mx).powi(2) + (y - my).powi(2)) / (2.0 * s * s)).exp()
                    / (2.0 * std::f64::consts::PI * s * s)
            };
            (0.6 * g(-1.0, 0.5, 0.6) + 0.4 * g(1.5, -1.0, 0.4)).ln() as f32
        })
        .collect();
    Tensor::from_vec(ny, nx, lp).unwrap()
}

#[test]
fn density_figure_is_a_colourful_heat_map() {
    let dir = out_dir("density");
    let path = dir.join("density.png");
    let extent = [-4.0, 4.0, -4.0, 4.0];
    let grid = mixture_log_density(extent, 120, 100);
    let mut rng = Rng::new(3);
    let data = eight_gaussians(500, &mut rng);
    density_figure(&path, "density: two Gaussians", extent, &grid, Some(&data)).unwrap();
    let (w, h, px) = decode(&path);
    assert!(
        (600..=900).contains(&w) && (600..=720).contains(&h),
        "{w}x{h}"
    );
    assert!(distinct(&px) > 200, "only {} colours", distinct(&px));
    // Both ends of the colour map appear: empty space and the peak.
    assert!(count_near(&px, viridis(0.0), 2) > 10_000);
    assert!(count_near(&px, viridis(1.0), 12) > 20);
}

#[test]
fn density_grid_rows_follow_the_documented_layout() {
    let g = density_grid([-1.0, 3.0, 0.0, 2.0], 5, 3).unwrap();
    assert_eq!(g.shape(), (15, 2));
    assert_eq!(g.row(0), &[-1.0, 0.0]);
    assert_eq!(g.row(4), &[3.0, 0.0]);
    assert_eq!(g.row(5), &[-1.0, 1.0]);
    assert_eq!(g.row(14), &[3.0, 2.0]);
    assert!(density_grid([-1.0, 3.0, 0.0, 2.0], 1, 3).is_err());
}

#[test]
fn scatter_figure_shows_both_sets_and_a_legend() {
    let dir = out_dir("scatter");
    let path = dir.join("scatter.png");
    let mut rng = Rng::new(5);
    let data = moons(2000, &mut rng);
    let samples = moons(2000, &mut rng).map(|v| v + 0.1);
    let blue = [31, 119, 180];
    let orange = [255, 127, 14];
    scatter_figure(
        &path,
        "samples vs data (moons)",
        [-1.5, 2.5, -1.0, 1.5],
        &[("data", &data, blue), ("samples", &samples, orange)],
    )
    .unwrap();
    let (w, h, px) = decode(&path);
    // The extent is wider than tall, and the plot keeps its aspect ratio.
    assert!(w > h, "{w}x{h}");
    assert!(distinct(&px) > 50);
    assert!(count_near(&px, blue, 40) > 100, "blue points missing");
    assert!(count_near(&px, orange, 40) > 100, "orange points missing");
    assert!(count_near(&px, WHITE, 0) > (w * h / 3) as usize);
}

#[test]
fn panels_figure_lays_out_a_grid() {
    let dir = out_dir("panels");
    let path = dir.join("panels.png");
    let mut rng = Rng::new(7);
    let z = Tensor::randn(1500, 2, &mut rng);
    // A few hand-made invertible maps standing in for layers.
    let l1 = z.map(|v| v * 1.3);
    let l2 = Tensor::from_fn(z.rows(), 2, |i, j| {
        let (x, y) = (l1.get(i, 0), l1.get(i, 1));
        if j == 0 { x } else { y + 0.5 * x * x - 1.0 }
    });
    let l3 = Tensor::from_fn(z.rows(), 2, |i, j| {
        let (x, y) = (l2.get(i, 0), l2.get(i, 1));
        if j == 0 { x + 0.3 * y.sin() } else { y }
    });
    let l4 = l3.map(|v| v * 0.9);
    let panels: Vec<(String, Tensor)> = vec![
        ("base z".into(), z),
        ("layer 1".into(), l1),
        ("layer 2".into(), l2),
        ("layer 3".into(), l3),
        ("layer 4 = x".into(), l4),
    ];
    panels_figure(
        &path,
        "base carried through the layers",
        &panels,
        &[[-4.0, 4.0, -4.0, 4.0]; 5],
    )
    .unwrap();
    let (w, h, px) = decode(&path);
    // Five panels: four in the first row, one in the second.
    assert!(w > 4 * 520 && w < 4 * 700, "{w}");
    assert!(h > 2 * 520 && h < 2 * 720, "{h}");
    assert!(distinct(&px) > 300, "points are not coloured by angle");

    let short = vec![
        ("a".to_string(), Tensor::zeros(3, 2)),
        ("b".to_string(), Tensor::zeros(4, 2)),
    ];
    assert!(matches!(
        panels_figure(
            &dir.join("bad.png"),
            "t",
            &short,
            &[[-1.0, 1.0, -1.0, 1.0]; 2]
        ),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        panels_figure(&dir.join("bad.png"), "t", &[], &[]),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        panels_figure(
            &dir.join("bad.png"),
            "t",
            &panels,
            &[[-1.0, 1.0, -1.0, 1.0]; 2]
        ),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn trajectories_figure_draws_paths() {
    let dir = out_dir("traj");
    let path = dir.join("trajectories.png");
    let mut rng = Rng::new(11);
    let z = Tensor::randn(150, 2, &mut rng);
    let targets = eight_gaussians(150, &mut rng);
    // Curved paths from each base point to a data point.
    let trajectories: Vec<Vec<[f32; 2]>> = (0..z.rows())
        .map(|i| {
            (0..=40)
                .map(|s| {
                    let t = s as f32 / 40.0;
                    let (a, b) = (z.row(i), targets.row(i));
                    let bend = 0.8 * t * (1.0 - t);
                    [
                        (1.0 - t) * a[0] + t * b[0] - bend * (b[1] - a[1]),
                        (1.0 - t) * a[1] + t * b[1] + bend * (b[0] - a[0]),
                    ]
                })
                .collect()
        })
        .collect();
    let data = eight_gaussians(1000, &mut rng);
    trajectories_figure(
        &path,
        "trajectories of the ODE",
        [-4.0, 4.0, -4.0, 4.0],
        &trajectories,
        Some(&data),
    )
    .unwrap();
    let (w, h, px) = decode(&path);
    assert!(w >= 600 && h >= 600);
    assert!(distinct(&px) > 300);

    let bad = vec![vec![[0.0, 0.0], [f32::NAN, 1.0]]];
    assert!(matches!(
        trajectories_figure(
            &dir.join("bad.png"),
            "t",
            [-1.0, 1.0, -1.0, 1.0],
            &bad,
            None
        ),
        Err(Error::NonFinite { row: 1, col: 0, .. })
    ));
    assert!(matches!(
        trajectories_figure(
            &dir.join("bad.png"),
            "t",
            [-1.0, 1.0, -1.0, 1.0],
            &[vec![]],
            None
        ),
        Err(Error::Empty(_))
    ));
}

#[test]
fn bad_figure_inputs_are_errors() {
    let dir = out_dir("bad");
    let p = dir.join("never.png");
    let pts = Tensor::zeros(4, 2);
    let ok_extent = [-1.0, 1.0, -1.0, 1.0];
    for extent in [
        [1.0, -1.0, -1.0, 1.0],
        [-1.0, 1.0, 0.0, 0.0],
        [f32::NAN, 1.0, -1.0, 1.0],
    ] {
        assert!(matches!(
            scatter_figure(&p, "t", extent, &[("a", &pts, [0, 0, 0])]),
            Err(Error::InvalidArgument(_))
        ));
    }
    let three_cols = Tensor::zeros(4, 3);
    assert!(matches!(
        scatter_figure(&p, "t", ok_extent, &[("a", &three_cols, [0, 0, 0])]),
        Err(Error::Shape { .. })
    ));
    let mut nan_pts = pts.clone();
    nan_pts.set(2, 1, f32::INFINITY);
    assert!(matches!(
        scatter_figure(&p, "t", ok_extent, &[("a", &nan_pts, [0, 0, 0])]),
        Err(Error::NonFinite { row: 2, col: 1, .. })
    ));
    assert!(matches!(
        scatter_figure(
            &p,
            "t",
            ok_extent,
            &[("a", &Tensor::zeros(0, 2), [0, 0, 0])]
        ),
        Err(Error::Empty(_))
    ));

    let mut grid = Tensor::zeros(4, 5);
    grid.set(3, 2, f32::NAN);
    assert!(matches!(
        density_figure(&p, "t", ok_extent, &grid, None),
        Err(Error::NonFinite { row: 3, col: 2, .. })
    ));
    assert!(density_figure(&p, "t", ok_extent, &Tensor::zeros(1, 5), None).is_err());
    assert!(
        density_figure(
            &p,
            "t",
            ok_extent,
            &Tensor::full(3, 3, f32::NEG_INFINITY),
            None
        )
        .is_err()
    );
    // -inf (zero density) in places is fine.
    let mut holes = Tensor::zeros(3, 3);
    holes.set(0, 0, f32::NEG_INFINITY);
    density_figure(&p, "t", ok_extent, &holes, None).unwrap();
    // A directory that does not exist is an I/O error, not a panic.
    assert!(matches!(
        scatter_figure(
            &dir.join("no/such/dir.png"),
            "t",
            ok_extent,
            &[("a", &pts, [0, 0, 0])]
        ),
        Err(Error::Io { .. })
    ));
}

#[test]
fn canvas_primitives_blend_and_clip() {
    let mut c = Canvas::new(40, 30, WHITE).unwrap();
    c.fill_rect(Rect::new(-5, -5, 10, 10), [0, 0, 0], 1.0);
    assert_eq!(c.pixel(0, 0), Some([0, 0, 0]));
    assert_eq!(c.pixel(5, 5), Some(WHITE));
    c.fill_rect(Rect::new(10, 10, 2, 2), [0, 0, 0], 0.5);
    assert_eq!(c.pixel(10, 10), Some([128, 128, 128]));
    c.set_clip(Some(Rect::new(20, 0, 20, 30)));
    c.disc(20.0, 15.0, 5.0, [255, 0, 0], 1.0);
    assert_eq!(
        c.pixel(18, 15),
        Some(WHITE),
        "clipped half of the disc was drawn"
    );
    assert_eq!(c.pixel(21, 15), Some([255, 0, 0]));
    c.set_clip(None);
    // A translucent polyline is blended once even where its segments overlap.
    c.polyline(
        &[[2.0, 25.0], [15.0, 25.0], [2.0, 25.0]],
        2.0,
        [0, 0, 0],
        0.5,
    );
    assert_eq!(c.pixel(8, 25), Some([128, 128, 128]));
    assert!(Canvas::new(0, 10, WHITE).is_err());
    assert!(Canvas::new(usize::MAX, 2, WHITE).is_err());
    assert_eq!(c.pixel(40, 0), None);
}
