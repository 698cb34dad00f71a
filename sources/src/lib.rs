//! The public chest X-ray datasets as released, harmonised into the table `radit shard` reads
//! (`shared/design/dataset.md`): one reader per source that finds its native files, maps its columns and
//! vocabularies into the 19 variables, and writes an audit report of every raw value it mapped. Label maps into
//! CheXpert-14 are editable TOML tables ([`labelmap`]), validated when loaded.
//!
//! Sources so far: NIH ChestX-ray14 ([`nih`]) and PadChest ([`padchest`]).

pub mod audit;
pub mod labelmap;
pub mod nih;
pub mod output;
pub mod padchest;
pub mod parse;

use std::path::PathBuf;

/// Why a source cannot be harmonised at all (a row that cannot be used is a rejection in the report, not an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("cannot read {}", path.display())]
    ReadInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no column `{column}` (columns: {found})", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{}: line {line}: {reason}", path.display())]
    InvalidInput {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("label map {}: {key}: {reason}", path.display())]
    InvalidLabelMap {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("none of {} exists under {}", candidates.join(", "), root.display())]
    NoTable {
        root: PathBuf,
        candidates: Vec<String>,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
