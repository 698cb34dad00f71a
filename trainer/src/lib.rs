//! The training side of radit and the only crate that links libtorch (through `tch`): the RadiT model, the
//! rectified-flow objective, samplers, collectives, the FSDP engine, checkpoints and the train loop.
//!
//! - [`model`]: RadiT, its presets and costs, weights as safetensors with PyTorch names.
//! - [`autoencoder`]: the FLUX.2 autoencoder whose encoder makes the latents of the latent presets.
//! - [`features`]: feature networks for evaluation (a TorchScript module with its own preprocessing).
//! - [`encode`]: the encode job's rank (`radit encode`): a store's images to `<split>/latents`, resumably.
//! - [`flow`]: the rectified-flow objective and its per-sample noise and time draws.
//! - [`sampler`]: Euler and torchdiffeq-exact dopri5, forward and reverse; counterfactual editing.
//! - [`generate`]: what `radit sample` does (metadata parsing, batching, PNGs and contact sheets).
//! - [`runtime`]: which libtorch is loaded and which devices it sees.
//! - [`out_of_memory`]: allocation failures anywhere in a step or a unit as errors, not panics.
//! - [`placement`]: which GPU a rank drives.
//!
//! ```no_run
//! use radit_trainer::{flow, model::{RadiT, RadiTConfig}, sampler};
//! use radit_trainer::tch::{Device, Kind, Tensor, nn::VarStore};
//! let vs = VarStore::new(Device::Cpu);
//! let model = RadiT::new(&vs.root(), &RadiTConfig::preset("tiny")?)?;
//! let x1 = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
//! let draw = flow::FlowConfig::default().draw(0, 0, &[0, 1], &[1, 16, 16]);
//! let labels = Tensor::zeros([2, 18], (Kind::Int64, Device::Cpu));
//! let age = Tensor::from_slice(&[0.63f32, f32::NAN]);
//! let loss = flow::loss(&model, &x1, &draw.x0, &draw.t, &labels, &age)?;
//! let (images, stats) = sampler::generate(&model, &draw.x0, &labels, &age, sampler::Solver::default())?;
//! # Ok::<(), radit_trainer::model::ModelError>(())
//! ```

pub use tch;

pub mod autoencoder;
pub mod checkpoint;
pub mod collective;
pub mod encode;
pub mod engine;
pub mod faults;
pub mod features;
pub mod features_job;
pub mod flow;
pub mod generate;
pub mod generate_job;
pub mod journal;
pub mod membership;
pub mod model;
pub mod out_of_memory;
pub mod placement;
pub mod preview;
pub mod progress;
pub mod runtime;
pub mod sampler;
pub mod scm;
pub mod train;
pub mod validate;

/// Reads the `[section]` of a TOML file (what `radit run` writes for a job's ranks): the error says what is wrong,
/// for the caller to name the file.
pub(crate) fn read_section<T: serde::de::DeserializeOwned>(
    file: &std::path::Path,
    section: &str,
) -> Result<T, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    if let Some(other) = table.keys().find(|k| *k != section) {
        return Err(format!(
            "unknown section [{other}]; the file holds [{section}] only"
        ));
    }
    let value = table
        .remove(section)
        .ok_or_else(|| format!("no [{section}] section"))?;
    value.try_into().map_err(|e: toml::de::Error| e.to_string())
}
