//! The Flow SCM over the 19 metadata variables (../shared/design/scm.md): a causal graph as data ([`graph`]), one
//! rectified-flow mechanism per variable ([`model`]), teacher-forced training on a store's profiles (`radit_jobs::scm_fit`),
//! and sampling, interventions and counterfactuals ([`infer`]).

pub mod check;
pub mod graph;
pub mod infer;
pub mod io;
pub mod model;

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Tensor, nn};

pub use graph::Graph;
pub use model::{Profiles, Scm, ScmConfig};

use crate::error::ModelError;

const CONFIG_KEY: &str = "radit.scm.config";
const GRAPH_KEY: &str = "radit.scm.graph";
const ORDER_KEY: &str = "radit.scm.order";
const VOCABULARY_KEY: &str = "radit.scm.vocabulary";

/// An SCM with its own variables, for inference.
pub struct LoadedScm {
    _vs: nn::VarStore,
    pub scm: Scm,
}

/// Writes `tensors` (an SCM's variables by name) as fp32 safetensors with the config, the graph, its
/// topological order and the vocabulary in the metadata, so the file says what it is.
pub fn save(
    tensors: &BTreeMap<String, Tensor>,
    config: &ScmConfig,
    graph: &Graph,
    path: &Path,
) -> Result<(), ModelError> {
    let json = |v: serde_json::Result<String>| {
        v.map_err(|e| ModelError::BadWeights {
            path: path.display().to_string(),
            reason: format!("describing the SCM: {e}"),
        })
    };
    let order: Vec<&str> = graph
        .order
        .iter()
        .map(|&i| graph.variables[i].name.as_str())
        .collect();
    let config = json(serde_json::to_string(config))?;
    let graph_text = json(serde_json::to_string(&graph.source))?;
    let order = json(serde_json::to_string(&order))?;
    let vocabulary = json(serde_json::to_string(
        &radit_sharding::schema::Vocabulary::current(),
    ))?;
    crate::model::write_safetensors(
        tensors,
        &[
            (CONFIG_KEY, &config),
            (GRAPH_KEY, &graph_text),
            (ORDER_KEY, &order),
            (VOCABULARY_KEY, &vocabulary),
        ],
        path,
    )
}

/// Loads an SCM file written by [`save`] (or `radit scm train`): its graph and config from the metadata, its
/// weights strictly. A file of another vocabulary is refused.
pub fn load(path: &Path, device: Device) -> Result<LoadedScm, ModelError> {
    let bad = |reason: String| ModelError::BadWeights {
        path: path.display().to_string(),
        reason,
    };
    let metadata = crate::model::read_metadata(path)?;
    let get = |key: &str| {
        metadata.get(key).ok_or_else(|| {
            bad(format!(
                "carries no `{key}`: not an SCM file (radit scm train writes them)"
            ))
        })
    };
    let config: ScmConfig =
        serde_json::from_str(get(CONFIG_KEY)?).map_err(|e| bad(format!("{CONFIG_KEY}: {e}")))?;
    let file: graph::GraphFile =
        serde_json::from_str(get(GRAPH_KEY)?).map_err(|e| bad(format!("{GRAPH_KEY}: {e}")))?;
    let vocabulary: radit_sharding::schema::Vocabulary = serde_json::from_str(get(VOCABULARY_KEY)?)
        .map_err(|e| bad(format!("{VOCABULARY_KEY}: {e}")))?;
    if vocabulary != radit_sharding::schema::Vocabulary::current() {
        return Err(bad(
            "was trained on another vocabulary of the 19 variables than this radit's".into(),
        ));
    }
    let graph = Graph::from_file(file, &path.display().to_string())?;
    let vs = nn::VarStore::new(device);
    let scm = Scm::new(&vs.root(), &config, &graph)?;
    let weights = crate::model::read_weights(path)?;
    crate::model::load_named(&vs, &weights.tensors, path)?;
    Ok(LoadedScm { _vs: vs, scm })
}
