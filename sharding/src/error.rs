//! The one public error type of the dataset side, with variants named by what the caller can do about them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// An input file (table, image root) cannot be read at all.
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading an input failed in a way that may pass on retry (I/O error, stale file handle, too many open files).
    #[error("I/O error reading {path} (retrying may help): {source}")]
    InputIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The table as a whole is unusable (row-level problems are rejections, not errors).
    #[error("table {path}: {reason}")]
    InvalidTable { path: PathBuf, reason: String },
    /// The output or input location is not a usable URL.
    #[error("location '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The output location exists but cannot be written.
    #[error("output '{url}' cannot be written: {reason}")]
    Unwritable { url: String, reason: String },
    #[error("{url} does not exist")]
    NotFound { url: String },
    /// Object storage failed (network, permissions, disk full...). Often worth retrying.
    #[error("storage error at {url}: {source}")]
    Storage {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// The output already holds an ingest made with another table or other settings.
    #[error(
        "output '{url}' already holds an ingest with different {what}; use a new output location or remove the old one"
    )]
    Conflict { url: String, what: String },
    /// A store is incomplete (no manifest) or its contents disagree with the manifest.
    #[error("store '{url}' {problem}")]
    InvalidStore { url: String, problem: String },
    /// Settings rejected at construction; the message names the field.
    #[error("invalid setting: {0}")]
    InvalidConfig(String),
    /// A bug: an internal thread failed. Please report it.
    #[error("internal error: {0}")]
    Internal(String),
    /// Encoding with the Zarr codecs failed (a bug or resource exhaustion, not bad input).
    #[error("zarr encoding of {what}: {reason}")]
    Encode { what: String, reason: String },
}

impl ShardError {
    /// Whether retrying the same command later may succeed (storage hiccups, transient I/O).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ShardError::Storage { .. } | ShardError::InputIo { .. }
        )
    }
}
