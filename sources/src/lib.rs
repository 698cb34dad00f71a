//! The public chest X-ray datasets as released, harmonised into the table `radit shard` reads
//! (`shared/design/dataset.md`): one reader per source that finds its native files, maps its columns and
//! vocabularies into the 19 variables, and writes an audit report of every raw value it mapped. Label maps into
//! CheXpert-14 are editable TOML tables ([`labelmap`]), validated when loaded.
//!
//! The seven sources: MIMIC-CXR ([`mimic`]), CheXpert-Plus ([`chexpert_plus`]), ReXGradient-160K ([`rexgradient`]),
//! PadChest ([`padchest`]), VinDr-CXR ([`vindr`]), NIH ChestX-ray14 ([`nih`]) and BRAX ([`brax`]); [`all`] puts them
//! in one table, [`survey`] tabulates a DICOM release's headers, and [`fixtures`] writes synthetic releases of each.

/// A knob with fixed spellings: the enum (its first variant the default) and `FromStr`, whose error lists the
/// spellings.
macro_rules! choice {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[doc = $doc:literal])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[doc = $doc])* $variant),+
        }

        impl Default for $name {
            fn default() -> Self {
                choice!(@first $($variant),+)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("`{other}`: expected {}", [$($text),+].join(" or "))),
                }
            }
        }
    };
    (@first $first:ident $(, $rest:ident)*) => {
        Self::$first
    };
}

pub mod all;
pub mod audit;
pub mod brax;
pub mod chexpert;
pub mod chexpert_plus;
pub mod fixture_files;
pub mod fixtures;
pub mod labelmap;
pub mod mimic;
pub mod nih;
pub mod output;
pub mod padchest;
pub mod parse;
pub mod rexgradient;
pub mod survey;
pub mod vindr;

use std::path::{Path, PathBuf};

/// What every source reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    /// The release's folder, as downloaded (the table and the images under it).
    pub root: PathBuf,
    /// The table, if not the release's own name for it in `root`.
    pub table: Option<PathBuf>,
    /// A label map instead of the built-in one.
    pub labelmap: Option<PathBuf>,
    /// Plausible ages in years; others become missing (and are counted).
    pub age_min: f64,
    pub age_max: f64,
    /// Reject rows whose image is not there (off: paths are written as the release lays them out).
    pub check_files: bool,
}

impl SourceOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            table: None,
            labelmap: None,
            age_min: 0.0,
            age_max: 100.0,
            check_files: true,
        }
    }

    /// `age` when it is plausible.
    pub fn plausible(&self, age: f64) -> Option<f64> {
        (self.age_min..=self.age_max).contains(&age).then_some(age)
    }

    /// Why the image at `path` (relative to the root) cannot be used: files are checked and it is not there.
    pub fn missing_image(&self, path: impl AsRef<Path>) -> Option<String> {
        let file = self.root.join(path);
        (self.check_files && !file.is_file()).then(|| format!("no file {}", file.display()))
    }
}

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
    #[error("{}: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("{count} image ids appear more than once: {first}")]
    DuplicateIds { count: usize, first: String },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `f` over `items` on up to `threads` threads, results in order (I/O-bound work such as reading headers).
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let chunk = items.len().div_ceil(threads.clamp(1, 64)).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}
