//! The one error of the models crate.

/// What can go wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("unknown model preset `{name}` (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error(transparent)]
    InvalidConfig(#[from] radit_protocol::ConfigError),
    #[error("bad model input `{input}`: {reason}")]
    BadInput { input: &'static str, reason: String },
    #[error("weights file {path}: {reason}")]
    BadWeights { path: String, reason: String },
    #[error("reading or writing {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("libtorch")]
    Torch(#[from] tch::TchError),
}
