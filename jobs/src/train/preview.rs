//! A contact sheet of samples from the EMA weights every N steps, so people can watch a run learn. Every rank draws
//! its share of the sheet (sample i depends only on (seed, i), so the sheet is the same at any world size) and rank 0
//! writes it as `DIR/step-00001000.png`, beside `latest.png`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::generate::sample_sheet;
use crate::train::TrainError;
use crate::train::ema_samples::{EmaSamples, EmaSampling};
use radit_engine::training::TrainingEngine;
use radit_models::model::ModelError;

/// `[preview]`: the contact sheet written during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewConfig {
    /// A sheet every this many steps (and at the last step).
    pub every: u64,
    /// Where the sheets go (a local or shared directory).
    pub dir: PathBuf,
    /// Samples on the sheet.
    #[serde(default = "default_count")]
    pub count: u64,
    /// Euler steps per sample.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// The noises' seed: the same every time, so the sheets of one run show the same noises as training goes on.
    #[serde(default)]
    pub seed: u64,
    /// For a latent model: the sheets show its samples through this decoder (loaded once, on rank 0),
    /// de-standardised with the store's training statistics; without it, latent channel 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<radit_models::autoencoder::DecoderConfig>,
}

fn default_count() -> u64 {
    16
}
fn default_steps() -> usize {
    25
}

impl PreviewConfig {
    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        let bad = |field: &str, reason: &str| {
            Err(radit_protocol::ConfigError {
                field: format!("preview.{field}"),
                reason: reason.into(),
            })
        };
        if self.every == 0 {
            return bad(
                "every",
                "must be positive (leave out [preview] for no sheets)",
            );
        }
        if self.count == 0 || self.count > 256 {
            return bad("count", "must be between 1 and 256");
        }
        if self.steps == 0 {
            return bad("steps", "must be positive");
        }
        if let Some(d) = &self.decoder {
            d.validate("preview.decoder")?;
        }
        Ok(())
    }

    /// The sheet of `step`.
    pub fn sheet_path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:08}.png"))
    }
}

/// Draws the sheet from the EMA's samples. Collective: every rank calls it at the same step; rank 0 writes the
/// file and gets its path (`None` elsewhere, or when writing failed: that is logged, not fatal).
pub fn write_sheet(
    ema: &EmaSamples,
    sampling: &EmaSampling,
    engine: &dyn TrainingEngine,
    cfg: &PreviewConfig,
    step: u64,
) -> Result<Option<PathBuf>, TrainError> {
    let comm = engine.collective();
    let (rank, world) = (comm.rank() as u64, comm.world() as u64);
    let device = engine.device();
    let per = cfg.count.div_ceil(world);
    let missing = crate::generate::Conditions::missing();
    let indices: Vec<u64> = (rank * per..(rank + 1) * per).collect();
    let conditions = vec![&missing; indices.len()];
    let local = ema.draw_for(&conditions, &indices, cfg.seed, cfg.steps, None)?;
    let shape = local.size();
    let local = local.to_kind(Kind::Float).to_device(device).flatten(0, -1);
    let mut all = Tensor::zeros([local.numel() as i64 * world as i64], (Kind::Float, device));
    comm.all_gather(&local, &mut all)?;
    if rank != 0 {
        return Ok(None);
    }
    // Only rank 0 writes: a failure here (full disk, permissions) must not fail the run, or every relaunch would
    // fail again at the same step while the other ranks wait in the next collective.
    let mut full = shape.clone();
    full[0] = per as i64 * world as i64;
    let samples = all
        .to_device(Device::Cpu)
        .view(full.as_slice())
        .narrow(0, 0, cfg.count as i64);
    let write = || -> Result<PathBuf, ModelError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| ModelError::Io {
            path: cfg.dir.display().to_string(),
            source: e,
        })?;
        let path = cfg.sheet_path(step);
        let samples = match &cfg.decoder {
            Some(d) => sampling.decode(d, &samples)?,
            None => samples,
        };
        let random = cfg
            .decoder
            .as_ref()
            .is_some_and(|d| radit_models::autoencoder::is_random(&d.weights));
        let title = format!(
            "step {step}: EMA samples, unconditional (all variables missing), {} steps{}",
            cfg.steps,
            if random {
                "; decoded by a RANDOM autoencoder: noise whatever the model learnt"
            } else {
                ""
            }
        );
        sample_sheet(
            &samples,
            samples.size()[3].min(256),
            &title,
            &[],
            &[&path, &cfg.dir.join("latest.png")],
        )?;
        Ok(path)
    };
    match write() {
        Ok(path) => Ok(Some(path)),
        Err(e) => {
            tracing::warn!(step, error = %e, "cannot write the preview sheet; training goes on");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_preview_config_names_its_field() {
        let ok = PreviewConfig {
            every: 100,
            dir: "sheets".into(),
            count: 16,
            steps: 25,
            seed: 0,
            decoder: None,
        };
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.sheet_path(1200),
            PathBuf::from("sheets/step-00001200.png")
        );
        for (bad, field) in [
            (
                PreviewConfig {
                    every: 0,
                    ..ok.clone()
                },
                "preview.every",
            ),
            (
                PreviewConfig {
                    count: 0,
                    ..ok.clone()
                },
                "preview.count",
            ),
            (
                PreviewConfig {
                    count: 257,
                    ..ok.clone()
                },
                "preview.count",
            ),
            (
                PreviewConfig {
                    steps: 0,
                    ..ok.clone()
                },
                "preview.steps",
            ),
        ] {
            let err = bad.validate().expect_err(field);
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}
