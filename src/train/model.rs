//! Saving and loading trained models. A checkpoint is a safetensors file: the tensors named
//! `<group>.<name>` (`layers.<i>.w0`, `field.w0`, ...), and the model description as JSON in the
//! metadata entry `flowfuse`. Loading checks the format, every layer's config, and every
//! tensor's name and shape, and names the file in every error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::cnf::{Cnf, CnfConfig, CnfState, ScaledCnf};
use crate::error::{Error, Result};
use crate::flows::actnorm::ActNorm;
use crate::flows::{Flow, FlowLayer, LayerConfig, LayerState, layer_from_state};
use crate::tensor::Tensor;
use crate::train::checkpoint;

/// The format tag written into every checkpoint.
pub const FORMAT: &str = "flowfuse-model/1";
const META_KEY: &str = "flowfuse";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    /// "flow" (a stack of layers) or "cnf" (a vector field, plus an optional fixed
    /// standardisation in `layers`).
    pub kind: String,
    /// The family name (realnvp, nice, spline, maf, iaf, cnf).
    pub family: String,
    pub dim: usize,
    pub layers: Vec<LayerConfig>,
    /// Each layer's tensor names in the order the layer hands them out (the file itself keeps
    /// tensors sorted by name).
    pub tensor_names: Vec<Vec<String>>,
    /// The continuous flow's config (kind "cnf").
    #[serde(default)]
    pub cnf: Option<CnfConfig>,
    /// The vector field's tensor names in order (kind "cnf").
    #[serde(default)]
    pub field_tensors: Vec<String>,
    /// Free-form facts about training (data, steps, NLLs), for the user.
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

/// A model loaded from a checkpoint.
pub enum Model<B: Backend> {
    Flow(Flow<B>),
    Cnf(ScaledCnf<B>),
}

/// Tensors as they sit in a checkpoint: (name, value).
type Named = Vec<(String, Tensor)>;

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn write(path: &Path, meta: &ModelMeta, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut metadata = BTreeMap::new();
    metadata.insert(
        META_KEY.to_string(),
        serde_json::to_string(meta).expect("model metadata serialises"),
    );
    checkpoint::save(path, &metadata, tensors)
}

/// Layer states as metadata (configs, tensor order) and `layers.<i>.<name>` tensors.
fn layer_parts(states: Vec<LayerState>) -> (Vec<LayerConfig>, Vec<Vec<String>>, Named) {
    let configs = states.iter().map(|s| s.config.clone()).collect();
    let names = states
        .iter()
        .map(|s| s.tensors.iter().map(|(n, _)| n.clone()).collect())
        .collect();
    let mut tensors = Vec::new();
    for (i, s) in states.into_iter().enumerate() {
        for (name, t) in s.tensors {
            tensors.push((format!("layers.{i}.{name}"), t));
        }
    }
    (configs, names, tensors)
}

/// Writes a discrete flow (atomically).
pub fn save_flow<B: Backend>(
    path: &Path,
    b: &B,
    flow: &Flow<B>,
    family: &str,
    notes: BTreeMap<String, String>,
) -> Result<()> {
    let (layers, tensor_names, tensors) = layer_parts(flow.states(b)?);
    let meta = ModelMeta {
        format: FORMAT.into(),
        kind: "flow".into(),
        family: family.into(),
        dim: flow.dim(),
        layers,
        tensor_names,
        cnf: None,
        field_tensors: vec![],
        notes,
    };
    write(path, &meta, &tensors)
}

/// Writes a continuous flow and its standardisation (atomically).
pub fn save_cnf<B: Backend>(
    path: &Path,
    b: &B,
    model: &ScaledCnf<B>,
    notes: BTreeMap<String, String>,
) -> Result<()> {
    let scale = model.scale.as_ref().map(|s| s.state(b)).transpose()?;
    let (layers, tensor_names, mut tensors) = layer_parts(scale.into_iter().collect());
    let state = model.cnf.state(b)?;
    let field_tensors = state.tensors.iter().map(|(n, _)| n.clone()).collect();
    tensors.extend(
        state
            .tensors
            .into_iter()
            .map(|(n, t)| (format!("field.{n}"), t)),
    );
    let meta = ModelMeta {
        format: FORMAT.into(),
        kind: "cnf".into(),
        family: "cnf".into(),
        dim: model.cnf.dim(),
        layers,
        tensor_names,
        cnf: Some(state.config),
        field_tensors,
        notes,
    };
    write(path, &meta, &tensors)
}

/// Reads a checkpoint's description and tensors without building the model.
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

/// `tensors` in the order of `names` (each exactly once), or an error naming what is off.
fn in_order(
    path: &Path,
    what: &str,
    mut tensors: Vec<(String, Tensor)>,
    names: &[String],
) -> Result<Vec<(String, Tensor)>> {
    if tensors.len() != names.len() {
        return Err(corrupt(
            path,
            format!(
                "{what} has {} tensors, its description lists {}",
                tensors.len(),
                names.len()
            ),
        ));
    }
    names
        .iter()
        .map(|name| {
            let k = tensors
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| corrupt(path, format!("{what}: missing tensor '{name}'")))?;
            Ok(tensors.swap_remove(k))
        })
        .collect()
}

/// The host states of the layers described in `meta`, from the `layers.<i>.` tensors; returns
/// the tensors of other groups untouched.
fn layer_states(
    path: &Path,
    meta: &ModelMeta,
    tensors: Vec<(String, Tensor)>,
) -> Result<(Vec<LayerState>, Named)> {
    if meta.tensor_names.len() != meta.layers.len() {
        return Err(corrupt(path, "tensor names do not match the layer list"));
    }
    let mut by_layer: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); meta.layers.len()];
    let mut rest = Vec::new();
    for (name, t) in tensors {
        let Some(in_layers) = name.strip_prefix("layers.") else {
            rest.push((name, t));
            continue;
        };
        match in_layers
            .split_once('.')
            .and_then(|(i, n)| i.parse::<usize>().ok().map(|i| (i, n.to_string())))
        {
            Some((i, n)) if i < by_layer.len() => by_layer[i].push((n, t)),
            _ => return Err(corrupt(path, format!("unexpected tensor '{name}'"))),
        }
    }
    let states = meta
        .layers
        .iter()
        .zip(by_layer)
        .zip(&meta.tensor_names)
        .enumerate()
        .map(|(i, ((config, tensors), names))| {
            Ok(LayerState {
                config: config.clone(),
                tensors: in_order(path, &format!("layer {i}"), tensors, names)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((states, rest))
}

/// Loads a discrete flow onto backend `b`.
pub fn load_flow<B: Backend>(path: &Path, b: &B) -> Result<(Flow<B>, ModelMeta)> {
    match load(path, b)? {
        (Model::Flow(f), meta) => Ok((f, meta)),
        (Model::Cnf(_), _) => Err(corrupt(path, "holds a continuous flow, not a discrete one")),
    }
}

/// Loads whichever model the checkpoint holds onto backend `b`.
pub fn load<B: Backend>(path: &Path, b: &B) -> Result<(Model<B>, ModelMeta)> {
    let (meta, tensors) = read_meta(path)?;
    let (states, rest) = layer_states(path, &meta, tensors)?;
    match meta.kind.as_str() {
        "flow" => {
            if let Some((name, _)) = rest.first() {
                return Err(corrupt(path, format!("unexpected tensor '{name}'")));
            }
            let layers = states
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    layer_from_state(b, s).map_err(|e| corrupt(path, format!("layer {i}: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let flow = Flow::new(meta.dim, layers).map_err(|e| corrupt(path, e.to_string()))?;
            Ok((Model::Flow(flow), meta))
        }
        "cnf" => {
            let config = meta
                .cnf
                .clone()
                .ok_or_else(|| corrupt(path, "a continuous flow without its config"))?;
            let mut field = Vec::new();
            for (name, t) in rest {
                match name.strip_prefix("field.") {
                    Some(n) => field.push((n.to_string(), t)),
                    None => return Err(corrupt(path, format!("unexpected tensor '{name}'"))),
                }
            }
            let tensors = in_order(path, "the vector field", field, &meta.field_tensors)?;
            let cnf = Cnf::from_state(b, &CnfState { config, tensors })
                .map_err(|e| corrupt(path, e.to_string()))?;
            let scale = match states.as_slice() {
                [] => None,
                [s] => Some(
                    ActNorm::from_state(b, s)
                        .map_err(|e| corrupt(path, format!("standardisation: {e}")))?,
                ),
                _ => {
                    return Err(corrupt(
                        path,
                        "a continuous flow with more than one standardisation layer",
                    ));
                }
            };
            if cnf.dim() != meta.dim {
                return Err(corrupt(
                    path,
                    format!(
                        "field of dimension {} in a model of dimension {}",
                        cnf.dim(),
                        meta.dim
                    ),
                ));
            }
            Ok((Model::Cnf(ScaledCnf::new(cnf, scale)), meta))
        }
        other => Err(corrupt(path, format!("unknown model kind '{other}'"))),
    }
}
