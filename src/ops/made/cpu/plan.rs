//! The masked network rearranged for the CPU passes. Units are put in degree order: inputs by
//! their degree, outputs as [b, raw s] pairs by degree, hidden layers already sorted. Then the
//! units a unit can see form a *prefix* of the previous layer, and consecutive units are packed
//! into column tiles whose weights cover only the prefix their last unit sees (dead weights
//! inside that prefix are stored as zeros). A product over a tile skips every all-zero block of
//! the block-triangular mask.
//!
//! Activations are kept feature-major (units × rows) so that both a tile's output rows and the
//! prefix it reads are contiguous slices, and each tile is one GEMM.

use std::ops::Range;

use crate::backend::cpu::simd::Isa;
use crate::error::{Error, Result};
use crate::nn::mlp::{Activation, Mlp};
use crate::ops::made::MadeSpec;
use crate::tensor::{Shaped, Tensor};

/// How output units are grouped into tiles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tiling {
    /// One tile per distinct degree: what the sequential pass needs, since it finishes the
    /// units of degree k at step k.
    Degree,
    /// Whole degree groups merged until a tile has at least this many units: fewer, larger
    /// GEMMs for the one-pass direction, at the cost of some masked-out work.
    MinWidth(usize),
    /// Consecutive units in tiles of exactly this many (the last may be short), whatever their
    /// degrees: each tile is one register block of the kernel, reading the prefix of its last
    /// unit, so little more than the exact mask is multiplied.
    Fixed(usize),
}

/// Consecutive output units (degree order) and the masked weights they need.
pub struct Tile {
    pub cols: Range<usize>,
    /// The number of leading input units (degree order) the tile reads.
    pub prefix: usize,
    /// The masked weights of unit c and input a: w[(c − cols.start)·a_rs + a·a_cs].
    pub w: Vec<f32>,
    /// Row-major (a_rs = prefix, a_cs = 1), except the tiles of `Tiling::Fixed`, which are
    /// stored input by input (a_rs = 1, a_cs = cols.len()): the kernel then broadcasts a tile's
    /// weights for one input from one cache line instead of from six rows.
    pub a_rs: usize,
    pub a_cs: usize,
}

/// One layer of the network in degree order.
pub struct PackedLayer {
    pub in_width: usize,
    pub out_width: usize,
    /// Degrees of the input and output units, in degree order.
    pub in_deg: Vec<u32>,
    pub out_deg: Vec<u32>,
    /// Bias in degree order.
    pub bias: Vec<f32>,
    pub tiles: Vec<Tile>,
    /// With `Tiling::Degree`: `by_degree[k]` is the tile of the units of degree k, if any.
    pub by_degree: Vec<Option<usize>>,
    /// Degree-order position -> index in the stored weight (rows for inputs, columns for
    /// outputs).
    in_map: Vec<usize>,
    out_map: Vec<usize>,
    last: bool,
}

/// The whole network, ready for the passes.
pub struct Plan {
    pub dim: usize,
    /// `order[k]` is the input column with degree k + 1.
    pub order: Vec<usize>,
    pub layers: Vec<PackedLayer>,
    pub act: Activation,
    pub clamp: f32,
    /// The instruction set the tile products run on.
    pub isa: Isa,
}

impl Plan {
    /// Packs `net` (already checked against `spec`).
    pub fn new(spec: &MadeSpec, net: &Mlp<Tensor>, tiling: Tiling) -> Result<Plan> {
        let d = spec.dim;
        let order = spec.order();
        let n = net.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (l, layer) in net.layers.iter().enumerate() {
            let last = l + 1 == n;
            let (k, m) = (layer.w.rows(), layer.w.cols());
            let in_map: Vec<usize> = if l == 0 {
                order.clone()
            } else {
                (0..k).collect()
            };
            // Output j (shift) and D + j (log-scale) share input j's degree: keep them adjacent.
            let out_map: Vec<usize> = if last {
                (0..m)
                    .map(|c| {
                        if c % 2 == 0 {
                            order[c / 2]
                        } else {
                            d + order[c / 2]
                        }
                    })
                    .collect()
            } else {
                (0..m).collect()
            };
            let in_deg: Vec<u32> = in_map.iter().map(|&a| spec.degrees[l][a]).collect();
            let out_deg: Vec<u32> = out_map.iter().map(|&c| spec.degrees[l + 1][c]).collect();
            if !in_deg.is_sorted() || !out_deg.is_sorted() {
                return Err(Error::invalid(format!(
                    "MADE layer {l}: degrees are not sorted"
                )));
            }
            let bias = out_map.iter().map(|&c| layer.b.data()[c]).collect();
            let mut packed = PackedLayer {
                in_width: k,
                out_width: m,
                in_deg,
                out_deg,
                bias,
                tiles: Vec::new(),
                by_degree: Vec::new(),
                in_map,
                out_map,
                last,
            };
            packed.tiles = packed.make_tiles(spec, l, &layer.w, tiling);
            if let Tiling::Degree = tiling {
                packed.by_degree = vec![None; d + 1];
                for (i, t) in packed.tiles.iter().enumerate() {
                    let deg = packed.out_deg[t.cols.start] as usize;
                    if deg <= d {
                        packed.by_degree[deg] = Some(i);
                    }
                }
            }
            layers.push(packed);
        }
        Ok(Plan {
            dim: d,
            order,
            layers,
            act: net.act,
            clamp: spec.clamp,
            isa: Isa::best(),
        })
    }

    /// The memory the plan holds (packed weights, biases, degrees and maps), in bytes.
    pub fn bytes(&self) -> usize {
        let words: usize = self
            .layers
            .iter()
            .map(|l| {
                let tiles: usize = l.tiles.iter().map(|t| t.w.len()).sum();
                let per_unit = l.bias.len() + l.out_deg.len() + l.out_map.len() + l.by_degree.len();
                tiles + per_unit + l.in_deg.len() + l.in_map.len()
            })
            .sum();
        4 * (words + self.order.len()) + std::mem::size_of::<Plan>()
    }

    /// Turns per-tile weight gradients and degree-order bias gradients back into the layout
    /// of the network. Dead weights, inside a tile or not, get exactly zero.
    pub fn unpack_grads(
        &self,
        spec: &MadeSpec,
        tile_grads: &[Vec<Vec<f32>>],
        bias_grads: &[Vec<f64>],
    ) -> Mlp<Tensor> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut gw = Tensor::zeros(layer.in_width, layer.out_width);
            let m = layer.out_width;
            for (t, g) in layer.tiles.iter().zip(&tile_grads[l]) {
                for c in t.cols.clone() {
                    let row = &g[(c - t.cols.start) * t.prefix..][..t.prefix];
                    for (a, &v) in row.iter().enumerate() {
                        if spec.connected(l, layer.in_deg[a], layer.out_deg[c]) {
                            gw.data_mut()[layer.in_map[a] * m + layer.out_map[c]] = v;
                        }
                    }
                }
            }
            let mut gb = Tensor::zeros(1, m);
            for (c, &v) in bias_grads[l].iter().enumerate() {
                gb.data_mut()[layer.out_map[c]] = v as f32;
            }
            out.push(gw);
            out.push(gb);
        }
        Mlp::from_tensors(self.act, out).expect("two tensors per layer")
    }
}

impl PackedLayer {
    /// The number of input units (degree order) that output unit `c` can see.
    fn prefix(&self, c: usize) -> usize {
        let deg = self.out_deg[c];
        if self.last {
            self.in_deg.partition_point(|&a| a < deg)
        } else {
            self.in_deg.partition_point(|&a| a <= deg)
        }
    }

    fn make_tiles(&self, spec: &MadeSpec, l: usize, w: &Tensor, tiling: Tiling) -> Vec<Tile> {
        let m = self.out_width;
        let mut tiles = Vec::new();
        let mut start = 0;
        while start < m {
            let end = match tiling {
                Tiling::Fixed(width) => (start + width.max(1)).min(m),
                Tiling::Degree => self.group_end(start, 1),
                Tiling::MinWidth(width) => self.group_end(start, width.max(1)),
            };
            let prefix = self.prefix(end - 1);
            let (a_rs, a_cs) = match tiling {
                Tiling::Fixed(_) => (1, end - start),
                _ => (prefix, 1),
            };
            let mut packed = vec![0.0f32; (end - start) * prefix];
            for c in start..end {
                for a in 0..prefix {
                    if spec.connected(l, self.in_deg[a], self.out_deg[c]) {
                        packed[(c - start) * a_rs + a * a_cs] =
                            w.data()[self.in_map[a] * m + self.out_map[c]];
                    }
                }
            }
            tiles.push(Tile {
                cols: start..end,
                prefix,
                w: packed,
                a_rs,
                a_cs,
            });
            start = end;
        }
        tiles
    }

    /// The end of a tile that starts at `start` and takes whole degree groups until it has at
    /// least `min_width` units.
    fn group_end(&self, start: usize, min_width: usize) -> usize {
        let m = self.out_width;
        let mut end = start;
        loop {
            let deg = self.out_deg[end];
            while end < m && self.out_deg[end] == deg {
                end += 1;
            }
            if end == m || end - start >= min_width {
                return end;
            }
        }
    }

    /// Tile-by-tile gradient buffers of the right sizes.
    pub fn zero_tile_grads(&self) -> Vec<Vec<f32>> {
        self.tiles
            .iter()
            .map(|t| vec![0.0; t.cols.len() * t.prefix])
            .collect()
    }
}
