//! Saving and loading trained models. A checkpoint is a safetensors file: the tensors of every
//! layer, named `layers.<i>.<name>`, and the model description as JSON in the metadata entry
//! `flowfuse`. Loading checks the format, every layer's config, and every tensor's name and
//! shape, and names the file in every error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::flows::{Flow, LayerConfig, LayerState, layer_from_state};
use crate::tensor::Tensor;
use crate::train::checkpoint;

/// The format tag written into every checkpoint.
pub const FORMAT: &str = "flowfuse-model/1";
const META_KEY: &str = "flowfuse";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    /// "flow" for discrete flows.
    pub kind: String,
    /// The family name (realnvp, nice, spline, maf, iaf, ...).
    pub family: String,
    pub dim: usize,
    pub layers: Vec<LayerConfig>,
    /// Each layer's tensor names in the order the layer hands them out (the file itself keeps
    /// tensors sorted by name).
    pub tensor_names: Vec<Vec<String>>,
    /// Free-form facts about training (data, steps, NLLs), for the user.
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes a discrete flow (atomically).
pub fn save_flow<B: Backend>(
    path: &Path,
    b: &B,
    flow: &Flow<B>,
    family: &str,
    notes: BTreeMap<String, String>,
) -> Result<()> {
    let states = flow.states(b)?;
    let meta = ModelMeta {
        format: FORMAT.into(),
        kind: "flow".into(),
        family: family.into(),
        dim: flow.dim(),
        layers: states.iter().map(|s| s.config.clone()).collect(),
        tensor_names: states
            .iter()
            .map(|s| s.tensors.iter().map(|(n, _)| n.clone()).collect())
            .collect(),
        notes,
    };
    let mut tensors = Vec::new();
    for (i, s) in states.into_iter().enumerate() {
        for (name, t) in s.tensors {
            tensors.push((format!("layers.{i}.{name}"), t));
        }
    }
    let mut metadata = BTreeMap::new();
    metadata.insert(
        META_KEY.to_string(),
        serde_json::to_string(&meta).expect("model metadata serialises"),
    );
    checkpoint::save(path, &metadata, &tensors)
}

/// Reads a checkpoint's description without building the model.
pub fn read_meta(path: &Path) -> Result<(ModelMeta, Vec<(String, Tensor)>)> {
    let (metadata, tensors) = checkpoint::load(path)?;
    let json = metadata
        .get(META_KEY)
        .ok_or_else(|| corrupt(path, "no flowfuse model description in the metadata"))?;
    let meta: ModelMeta = serde_json::from_str(json)
        .map_err(|e| corrupt(path, format!("bad model description: {e}")))?;
    if meta.format != FORMAT {
        return Err(corrupt(
            path,
            format!("format '{}' is not {FORMAT}", meta.format),
        ));
    }
    Ok((meta, tensors))
}

/// Loads a discrete flow onto backend `b`.
pub fn load_flow<B: Backend>(path: &Path, b: &B) -> Result<(Flow<B>, ModelMeta)> {
    let (meta, tensors) = read_meta(path)?;
    if meta.kind != "flow" {
        return Err(corrupt(
            path,
            format!("holds a '{}' model, not a discrete flow", meta.kind),
        ));
    }
    let mut by_layer: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); meta.layers.len()];
    for (name, t) in tensors {
        let parsed = name
            .strip_prefix("layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(i, n)| i.parse::<usize>().ok().map(|i| (i, n.to_string())));
        match parsed {
            Some((i, n)) if i < by_layer.len() => by_layer[i].push((n, t)),
            _ => return Err(corrupt(path, format!("unexpected tensor '{name}'"))),
        }
    }
    if meta.tensor_names.len() != meta.layers.len() {
        return Err(corrupt(path, "tensor names do not match the layer list"));
    }
    let mut layers = Vec::with_capacity(meta.layers.len());
    for (i, ((config, mut tensors), names)) in meta
        .layers
        .iter()
        .zip(by_layer)
        .zip(&meta.tensor_names)
        .enumerate()
    {
        if tensors.len() != names.len() {
            return Err(corrupt(
                path,
                format!(
                    "layer {i} has {} tensors, its description lists {}",
                    tensors.len(),
                    names.len()
                ),
            ));
        }
        // Back into the order the layer handed them out.
        let mut ordered = Vec::with_capacity(names.len());
        for name in names {
            let k = tensors
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| corrupt(path, format!("layer {i}: missing tensor '{name}'")))?;
            ordered.push(tensors.swap_remove(k));
        }
        let state = LayerState {
            config: config.clone(),
            tensors: ordered,
        };
        let layer =
            layer_from_state(b, &state).map_err(|e| corrupt(path, format!("layer {i}: {e}")))?;
        layers.push(layer);
    }
    let flow = Flow::new(meta.dim, layers).map_err(|e| corrupt(path, e.to_string()))?;
    Ok((flow, meta))
}
