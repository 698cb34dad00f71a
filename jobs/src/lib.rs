//! The loops and jobs a rank runs, over the models (`radit-models`) and the distributed runtime
//! (`radit-engine`), and their benches. Each job here is what one `radit run` job kind's ranks do.
//!
//! - [`train`]: the train loop (a thin loop over the engine's step), with its validation, preview sheets and
//!   the EMA sampling both draw from.
//! - [`journal`]: what the unit jobs share (errors, handles, atomic writes), and [`units`]: the one driver that
//!   runs any of them (skip what is committed, read ahead, fault points, commit, stop vote, end of range).
//! - [`edit_job`]: counterfactual edits of a split's patients at scale (`radit edit`).
//! - [`encode`]: a store's images to `<split>/latents` through the autoencoder's encoder.
//! - [`generate_job`]: samples for a store's metadata profiles; [`generate`]: sampling, conditions and PNGs;
//!   [`sample`]: `radit sample` (samples or counterfactual edits) as one call.
//! - [`identity`]: how much of a patient an edit keeps (SSIM, the Rad-DINO distance and its relative form,
//!   the predictor's attribute cosine).
//! - [`features_job`]: a feature network's embeddings of a store or of generated images.
//! - [`scm_fit`]: fitting the Flow SCM to a store's metadata.
//! - [`predict_eval`]: a metadata predictor's scores (ROC-AUC per variable, age MAE) on a split, samples or edits.
//! - [`recon_job`]: an autoencoder's reconstructions of a split, with PSNR and SSIM (Table 2).
//! - [`bench`] and [`parity`]: the engine's step benchmark, and its agreement with a plain unsharded step.
//! - [`faults`]: the fault plan's training side.

pub use tch;

pub mod bench;
pub mod edit_job;
pub mod encode;
pub mod faults;
pub mod features_job;
pub mod generate;
pub mod generate_job;
pub mod identity;
pub mod journal;
pub mod parity;
pub mod predict_eval;
pub mod reader_study;
pub mod recon_job;
pub mod reference_samples;
pub mod sample;
pub mod scm_fit;
pub mod sheet;
pub mod train;
pub mod units;

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
