//! PNG figures for 2-D work, drawn on a small raster canvas of our own: a density heat map,
//! samples against data, the base carried through the layers (Fig. 18.3) and ODE trajectories
//! (Fig. 18.6).

pub mod axes;
pub mod canvas;
pub mod colormap;
pub mod figures;
pub mod text;

pub use canvas::{Canvas, Rect, Rgb};
pub use figures::{
    density_figure, density_grid, panels_figure, scatter_figure, trajectories_figure,
};
