//! `validation.best`: the evaluated weights of the lowest validation loss so far, in one file that their users load
//! as they are (an autoencoder's file for `radit encode` and `radit decode`, a model file for `radit generate`).
//! The loss and step ride in the file's metadata, so a requeued run keeps beating the whole run's best, not its own
//! job's. Rank 0 keeps it (every rank measures the same loss); a write goes through a temporary file and a rename,
//! so a crash leaves the last best whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::train::TrainError;
use radit_models::model::ModelError;
use radit_models::network::Architecture;

const LOSS_KEY: &str = "radit.best.val_loss";
const STEP_KEY: &str = "radit.best.step";

/// The best weights' file and the loss they beat.
#[derive(Debug)]
pub struct BestWeights {
    path: PathBuf,
    /// The file's validation loss and step (none yet: the first validation writes it).
    kept: Option<(f64, u64)>,
}

impl BestWeights {
    /// Reads what an earlier job of the run kept at `path`. A file without the metadata (written by something
    /// else) is an error: it is not overwritten unasked.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let kept = match path.exists() {
            false => None,
            true => Some(read_kept(path)?),
        };
        if let Some((loss, step)) = kept {
            tracing::info!(path = %path.display(), val_loss = loss, step, "best weights so far");
        }
        Ok(Self {
            path: path.to_path_buf(),
            kept,
        })
    }

    /// The loss and step of the weights kept.
    pub fn kept(&self) -> Option<(f64, u64)> {
        self.kept
    }

    /// Keeps `weights` if `loss` is below the best so far (a non-finite loss never is). Returns whether it did.
    pub fn offer(
        &mut self,
        weights: &BTreeMap<String, Tensor>,
        model: &Architecture,
        step: u64,
        loss: f64,
    ) -> Result<bool, TrainError> {
        if !loss.is_finite() || self.kept.is_some_and(|(best, _)| loss >= best) {
            return Ok(false);
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let (loss_text, step_text) = (loss.to_string(), step.to_string());
        model.save_trained(
            weights,
            &[(LOSS_KEY, &loss_text), (STEP_KEY, &step_text)],
            &self.path,
        )?;
        tracing::info!(path = %self.path.display(), val_loss = loss, step, "new best weights");
        self.kept = Some((loss, step));
        Ok(true)
    }
}

/// The validation loss and step a best-weights file records.
pub fn read_kept(path: &Path) -> Result<(f64, u64), TrainError> {
    let meta = radit_models::model::read_metadata(path)?;
    let bad = |reason: String| ModelError::BadWeights {
        path: path.display().to_string(),
        reason,
    };
    let loss = meta
        .get(LOSS_KEY)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            bad(format!(
                "validation.best names a file without {LOSS_KEY} in its metadata (not written as the best \
                 weights of a run): move it away or name another file"
            ))
        })?;
    let step = meta
        .get(STEP_KEY)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad(format!("no {STEP_KEY} in its metadata")))?;
    Ok((loss, step))
}
