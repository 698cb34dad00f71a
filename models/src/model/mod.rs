//! RadiT: a DiT with adaLN-Zero, per-head QK RMSNorm and SwiGLU, conditioned on the timestep and 19 metadata
//! variables (../shared/design/model.md). The model knows nothing about ranks or sharding; the engine wraps it.
//!
//! Parameter names follow the PyTorch twin (`blocks.3.attn.qkv.weight`, `y_embedder.tables.0.weight`, ...), so
//! weights move between the two through safetensors unchanged.

mod config;
mod layers;
mod radit;
mod weights;

pub use config::{
    BlockCount, Conditioning as ConditioningMode, MemoryEstimate, PRESETS, ParameterCount,
    RadiTConfig, schema_classes,
};
pub use layers::{Block, Conditioning};
pub(crate) use radit::check_conditions;
pub use radit::{RadiT, Trace};
pub use weights::{
    WeightsFile, load_named, load_weights, read_metadata, read_shapes, read_weights,
    read_weights_config, save_named_weights, save_named_weights_with, save_weights,
    write_safetensors,
};

pub use crate::error::ModelError;
pub use crate::precision::Precision;
