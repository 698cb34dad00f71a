//! What the unit jobs share besides their driver ([`crate::units`]): one error type named by what the operator can
//! do, the stop check between units, one way to read a rank's config, to write a file whole (the commit of a part
//! file or a journal record), and to record a committed unit in the rank's progress.

use std::path::{Path, PathBuf};

use radit_protocol::ConfigError;
use radit_sharding::ShardError;

use radit_protocol::Phase;
use tch::Device;

use radit_engine::collective::{Collective, CollectiveError};
use radit_engine::progress::{Progress, StepRecord};
use radit_models::model::ModelError;

/// Why a rank of a journaled job stopped, named by what the operator can do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RankError {
    #[error("{}: {reason}", file.display())]
    ConfigFile { file: PathBuf, reason: String },
    #[error("{}: {}", .0.field, .0.reason)]
    Config(ConfigError),
    /// The model, autoencoder or feature network cannot be built, or its weights do not fit it.
    #[error("the network")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] ShardError),
    /// An input or output that cannot be used as it is: a store the encoder does not suit, samples of something
    /// else in an output directory, an unreadable generated image.
    #[error("{what}: {reason}")]
    Unusable { what: String, reason: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the rank group")]
    Collective(#[from] CollectiveError),
    /// A newer generation of the run took over.
    #[error("superseded by a newer generation of the run")]
    Superseded,
    /// The device ran out of memory in a unit: the same batch fails the same way after a restart.
    #[error(transparent)]
    OutOfMemory(Box<radit_engine::out_of_memory::OutOfMemory>),
}

impl From<radit_engine::out_of_memory::OutOfMemory> for RankError {
    fn from(e: radit_engine::out_of_memory::OutOfMemory) -> Self {
        RankError::OutOfMemory(Box::new(e))
    }
}

impl RankError {
    /// The same inputs would fail the same way: a supervisor must not relaunch.
    pub fn repeats(&self) -> bool {
        matches!(
            self,
            RankError::ConfigFile { .. }
                | RankError::Config(_)
                | RankError::Model(_)
                | RankError::Unusable { .. }
                | RankError::OutOfMemory(_)
        )
    }

    pub fn unusable(what: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        RankError::Unusable {
            what: what.to_string(),
            reason: reason.into(),
        }
    }
}

/// An I/O error that names its file.
pub fn io_error(path: &Path) -> impl Fn(std::io::Error) -> RankError + '_ {
    move |source| RankError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub use radit_engine::membership::RankHandles;

/// Between units: whether to stop here (asked to: the committed units are kept), or an error when a newer
/// generation of the run took over.
pub fn stop_here(handles: &RankHandles) -> Result<bool, RankError> {
    if handles.superseded() {
        return Err(RankError::Superseded);
    }
    Ok(handles.stop_asked())
}

/// Reads the `[section]` of a rank config (what `radit run` writes for a job's ranks) and validates it.
pub fn load_section<T: serde::de::DeserializeOwned>(
    file: &Path,
    section: &str,
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<T, RankError> {
    let bad = |reason: String| RankError::ConfigFile {
        file: file.to_path_buf(),
        reason,
    };
    let cfg: T = crate::read_section(file, section).map_err(bad)?;
    validate(&cfg).map_err(|e| bad(format!("{}: {}", e.field, e.reason)))?;
    Ok(cfg)
}

/// Writes `path` through a temporary name beside it and renames, so a reader (or a resumed run) never sees half a
/// file: the file exists whole or not at all.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), RankError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    write(&partial).map_err(io_error(path))?;
    std::fs::rename(&partial, path).map_err(io_error(path))
}

/// A committed unit's work, for throughput: images, model tokens and model FLOPs.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitWork {
    pub images: u64,
    pub tokens: u64,
    pub flops: f64,
}

/// Records committed unit `step` (`seconds` long, `data_wait_seconds` of it reading) in the rank's progress, with
/// no loss (nothing is trained), and the device's memory after it.
pub fn record_unit(
    progress: &Progress,
    device: Device,
    (step, seconds, data_wait_seconds): (u64, f64, f64),
    work: UnitWork,
) {
    progress.record_step(&StepRecord {
        step,
        seconds,
        data_wait_seconds,
        images: work.images,
        tokens: work.tokens,
        flops: work.flops,
        loss: f64::NAN,
        loss_max: f64::NAN,
        grad_norm: f64::NAN,
        learning_rate: 0.0,
        skipped: false,
    });
    progress.record_device_memory(radit_engine::runtime::device_memory(device));
}

/// The end of a rank's range: done, it counts as at the job's last step (`total`) while slower ranks finish;
/// then every rank meets, stopped or done, so that none waits for a peer that has left. Returns whether any rank
/// stopped early (the job then leaves its output to the next run). Collective.
pub fn end_of_range(
    comm: &dyn Collective,
    progress: &Progress,
    stopped: bool,
    total: u64,
) -> Result<bool, CollectiveError> {
    if !stopped {
        progress.set_step(total);
    }
    let _g = progress.enter(Phase::Collective);
    comm.any(stopped)
}

/// The manifest of a samples directory (what `radit generate` and `radit eval recon` write and `radit eval features
/// --samples` reads): its fingerprint, and whether every unit is in.
pub const SAMPLES_MANIFEST: &str = "generate.json";
/// A samples directory's list of files: `file,image_id,row,sample,...`.
pub const SAMPLES_CSV: &str = "samples.csv";

/// Settles a samples directory on rank 0: a new one gets the manifest (`fingerprint`, not complete), `images/` and
/// the journal directory `<journal>/journal`; an existing one must be of the same fingerprint, or is cleared with
/// `overwrite` (the manifest first, so a crash part-way leaves nothing that looks finished). `describe` names what
/// a fingerprint is of, for the refusal.
pub fn prepare_samples_dir<F>(
    out: &Path,
    journal: &str,
    fingerprint: &F,
    overwrite: bool,
    describe: impl Fn(&F) -> String,
) -> Result<(), RankError>
where
    F: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let manifest = out.join(SAMPLES_MANIFEST);
    if manifest.exists() {
        let text = std::fs::read_to_string(&manifest).map_err(io_error(&manifest))?;
        let existing: Result<F, _> = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("fingerprint").cloned())
            .map(serde_json::from_value)
            .unwrap_or_else(|| Err(serde::de::Error::custom("no fingerprint")));
        match existing {
            Ok(f) if f == *fingerprint => return Ok(()),
            _ if overwrite => {
                tracing::warn!(out = %out.display(), "overwrite: removing outputs of another model or setting");
                std::fs::remove_file(&manifest).map_err(io_error(&manifest))?;
                for dir in [out.join(journal), out.join("images")] {
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
                    }
                }
                let _ = std::fs::remove_file(out.join(SAMPLES_CSV));
            }
            Ok(f) => {
                return Err(RankError::Unusable {
                    what: out.display().to_string(),
                    reason: format!(
                        "holds samples of {}; this run is of {}: choose another output directory, or set \
                         overwrite",
                        describe(&f),
                        describe(fingerprint)
                    ),
                });
            }
            Err(e) => {
                return Err(RankError::Unusable {
                    what: out.display().to_string(),
                    reason: format!(
                        "{SAMPLES_MANIFEST} is unreadable ({e}): set overwrite to start again"
                    ),
                });
            }
        }
    }
    for dir in [out.join(journal).join("journal"), out.join("images")] {
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    let text = serde_json::json!({ "fingerprint": fingerprint, "complete": false });
    write_atomic(&manifest, |tmp| std::fs::write(tmp, format!("{text:#}\n")))
}
