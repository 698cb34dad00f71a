//! The one public error type of the dataset side, with variants named by what the caller can do about them.

use std::path::PathBuf;

pub use crate::store::StorageError;

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
    /// Object storage: a location that is not usable, not there or not writable, or a failure worth retrying.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The output already holds an ingest made with another table or other settings.
    #[error(
        "output '{url}' already holds an ingest with different {what}; use a new output location or remove the old one"
    )]
    Conflict { url: String, what: String },
    /// The store holds latents (or an unfinished encode) of another encoder.
    #[error(
        "store '{url}' already holds {existing}; this job's encoder is {requested}: set overwrite (--overwrite) to \
         replace them"
    )]
    LatentsConflict {
        url: String,
        existing: String,
        requested: String,
    },
    /// A store is incomplete (no manifest) or its contents disagree with the manifest.
    #[error("store '{url}' {problem}")]
    InvalidStore { url: String, problem: String },
    /// Settings rejected at construction; the message names the field.
    #[error("invalid setting: {0}")]
    InvalidConfig(String),
    /// A store object that stays missing or unlike its manifest entry (size, sha256) after every attempt: the
    /// store changed or was damaged under the reader.
    #[error(
        "shard object {url} {reason} after {attempts} attempt(s); restore it (radit shard --verify names every \
         damaged object) or set data.skip_bad_shards to skip its samples"
    )]
    BadObject {
        url: String,
        reason: String,
        attempts: u32,
    },
    /// A bug: an internal thread failed. Please report it.
    #[error("internal error: {0}")]
    Internal(String),
    /// Encoding with the Zarr codecs failed (a bug or resource exhaustion, not bad input).
    #[error("zarr encoding of {what}: {reason}")]
    Encode { what: String, reason: String },
}

impl ShardError {
    /// Whether a missing object or store is the problem (a mistyped URL, a store not written yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ShardError::Storage(StorageError::NotFound { .. }))
    }

    /// Whether retrying the same command later may succeed (storage hiccups, transient I/O).
    pub fn is_retryable(&self) -> bool {
        match self {
            ShardError::Storage(e) => e.is_retryable(),
            ShardError::InputIo { .. } => true,
            _ => false,
        }
    }
}
