//! Evaluation during training (evaluation.md, "Jobs users expect" 9 and 10):
//!
//! - the **validation loss**: the run's objective on the first `images` rows of the validation split. For a
//!   velocity network the rectified-flow loss at a fixed grid of `times` values of t (midpoints, shifted as
//!   training shifts them), with noise drawn per (seed, grid point, row) and dequantisation per (seed, row); for an
//!   autoencoder the reconstruction loss of the latent's mean. The number is the same on any world size and
//!   comparable across runs; with `best`, the weights of the lowest one so far are kept;
//! - the **mini-FD**: `samples` unconditional Euler samples of the EMA through a feature network, FD against
//!   reference features written by `radit eval features` (whose `.json` must name the same network).
//!
//! Both are collective: every rank calls them at the same step with the same config and gets the same number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radit_protocol::ConfigError;
use radit_sharding::loader::{DataConfig, Loader, Pass};
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::train::TrainError;
use crate::train::ema_samples::EmaSamples;
use crate::train::objective::Objective;
use radit_engine::training::TrainingEngine;
use radit_models::features::FeatureNet;
use radit_models::model::ModelError;
use radit_models::network::Architecture;

/// The `[validation]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// A validation loss every this many steps and at the last step (0: none, e.g. only the mini-FD).
    pub every: u64,
    /// Rows of the split used, from its start (0: all of it).
    #[serde(default = "default_images")]
    pub images: u64,
    /// Rows per global batch of the pass (divisible by the world size).
    #[serde(default = "default_batch")]
    pub batch: u64,
    /// Points of the t grid: t_j = shift((j + 1/2) / times).
    #[serde(default = "default_times")]
    pub times: u64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_split")]
    pub split: Split,
    /// Evaluate the EMA weights (what is sampled) rather than the raw ones.
    #[serde(default = "yes")]
    pub ema: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<MiniFdConfig>,
    /// Keep the evaluated weights (the EMA's, with `ema`) of the lowest validation loss so far in this safetensors
    /// file, rewritten when a validation beats it: a model file for `radit generate`, an autoencoder file for
    /// `radit encode`, `radit decode` and `[samples.decoder]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<PathBuf>,
}

/// The `[validation.fd]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MiniFdConfig {
    /// A mini-FD every this many steps and at the last step.
    pub every: u64,
    /// Samples drawn from the EMA (unconditional), shared over the ranks.
    #[serde(default = "default_samples")]
    pub samples: u64,
    /// Reference features: an [N, D] .npy written by `radit eval features` (its .json beside names the network).
    pub reference: PathBuf,
    /// The feature network: a DINOv2 snapshot directory or a TorchScript file (as `radit eval features --net`).
    pub net: PathBuf,
    /// A TorchScript module's input side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<i64>,
    /// A DINOv2 snapshot's preprocessing: processor or chexgenbench.
    #[serde(default = "default_preprocessing")]
    pub preprocessing: String,
    /// Euler steps per sample.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Samples drawn at once on a rank.
    #[serde(default = "default_sample_batch")]
    pub batch: u64,
    #[serde(default)]
    pub seed: u64,
    /// For a latent model: the decoder that turns samples into images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<radit_models::autoencoder::DecoderConfig>,
}

fn default_images() -> u64 {
    1024
}
fn default_batch() -> u64 {
    32
}
fn default_times() -> u64 {
    8
}
fn default_split() -> Split {
    Split::Val
}
fn yes() -> bool {
    true
}
fn default_samples() -> u64 {
    2048
}
fn default_preprocessing() -> String {
    "processor".into()
}
fn default_steps() -> usize {
    32
}
fn default_sample_batch() -> u64 {
    16
}

impl ValidationConfig {
    pub fn validate(&self, model: &Architecture) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| Err(ConfigError::new(field, reason));
        if self.best.is_some() && self.every == 0 {
            return bad(
                "validation.best",
                "the best weights are chosen by the validation loss: set validation.every".into(),
            );
        }
        if self.fd.is_some() && model.role() != radit_models::network::Role::Velocity {
            return bad(
                "validation.fd",
                format!(
                    "{} draws no samples to take an FD of: remove [validation.fd]",
                    model.name()
                ),
            );
        }
        if self.batch == 0 || self.times == 0 {
            return bad(
                "validation.batch",
                "batch and times must be positive".into(),
            );
        }
        if let Some(fd) = &self.fd {
            if fd.every == 0 || fd.samples < 2 || fd.steps == 0 || fd.batch == 0 {
                return bad(
                    "validation.fd",
                    "every, steps and batch must be positive and samples at least 2".into(),
                );
            }
            match (&fd.decoder, model.in_channels()) {
                (Some(_), 1) => {
                    return bad(
                        "validation.fd.decoder",
                        "the model makes images; a decoder is for latent models".into(),
                    );
                }
                (None, c) if c != 1 => {
                    return bad(
                        "validation.fd.decoder",
                        format!(
                            "the model makes {c}-channel latents: give the decoder that turns them into images"
                        ),
                    );
                }
                _ => {}
            }
        } else if self.every == 0 {
            return bad(
                "validation.every",
                "0 with no [validation.fd]: nothing to do".into(),
            );
        }
        Ok(())
    }

    /// Whether a validation loss is due after `step` of a `total`-step run.
    pub fn loss_due(&self, step: u64, total: u64) -> bool {
        self.every > 0 && (step.is_multiple_of(self.every) || step == total)
    }
}

/// The validation loss of `weights` (the engine's, gathered: the EMA when `cfg.ema`) under the run's objective, on
/// the first `cfg.images` rows of the split. Collective: every rank gets the same number.
pub fn validation_loss(
    engine: &dyn TrainingEngine,
    weights: &BTreeMap<String, Tensor>,
    objective: &Objective,
    model: &Architecture,
    cfg: &ValidationConfig,
    data: &DataConfig,
    storage: &Storage,
) -> Result<f64, TrainError> {
    let comm = engine.collective();
    let (rank, world) = (comm.rank() as u64, comm.world() as u64);
    if !cfg.batch.is_multiple_of(world) {
        return Err(ConfigError::new(
            "validation.batch",
            format!("{} must be divisible by the world size {world}", cfg.batch),
        )
        .into());
    }
    let device = engine.device();
    let evaluator = objective.evaluator(model, weights, device, engine.config().precision)?;
    let loader_cfg = DataConfig {
        split: cfg.split,
        ..data.clone()
    }
    .loader_config(
        Pass::Eval,
        cfg.seed,
        cfg.batch,
        rank,
        world,
        super::objective::model_input(model),
    );
    let mut loader = Loader::open(storage.clone(), loader_cfg, 0)?;
    let limit = if cfg.images == 0 {
        u64::MAX
    } else {
        cfg.images
    };
    let (mut sum, mut count) = (0.0f64, 0u64);
    for global in 0.. {
        // Every rank stops after the same global batch: the cap is on global rows.
        if global * cfg.batch >= limit {
            break;
        }
        let Some(batch) = loader.next_batch()? else {
            break;
        };
        let losses = evaluator.losses(&batch, (cfg.seed, cfg.times), device)?;
        for ((loss, valid), &i) in losses.iter().zip(&batch.valid).zip(&batch.indices) {
            if *valid && i < limit {
                sum += f64::from(*loss);
                count += 1;
            }
        }
    }
    let sum = comm.all_reduce_f64(sum)?;
    let count = comm.all_reduce_f64(count as f64)?;
    if count == 0.0 {
        return Err(ConfigError::new(
            "validation.split",
            format!("the {} split has no rows to validate on", cfg.split.name()),
        )
        .into());
    }
    Ok(sum / count)
}

/// The mini-FD's fixed parts, loaded once per run: the feature network and the reference moments.
pub struct MiniFd {
    cfg: MiniFdConfig,
    net: Box<dyn FeatureNet>,
    reference: radit_eval::fd::Moments,
}

/// What a features file says it is: the `.json` beside it (written by `radit eval features`).
pub fn features_network(npy: &Path) -> Option<String> {
    let text = std::fs::read_to_string(crate::features_job::meta_path(npy)).ok()?;
    let meta: serde_json::Value = serde_json::from_str(&text).ok()?;
    meta["network"].as_str().map(str::to_string)
}

fn eval_error(path: &Path, e: radit_eval::EvalError) -> TrainError {
    ConfigError::new(
        "validation.fd.reference",
        format!("{}: {e}", path.display()),
    )
    .into()
}

impl MiniFd {
    pub fn open(cfg: &MiniFdConfig, device: Device) -> Result<Self, TrainError> {
        let net =
            radit_models::features::load_net(&cfg.net, cfg.input_size, &cfg.preprocessing, device)?;
        let path = &cfg.reference;
        match features_network(path) {
            Some(id) if id != net.id() => {
                return Err(ConfigError::new(
                    "validation.fd.reference",
                    format!(
                        "{} holds features of `{id}`, but validation.fd.net is `{}`: write the reference with \
                         the same network and preprocessing (radit eval features)",
                        path.display(),
                        net.id()
                    ),
                )
                .into());
            }
            Some(_) => {}
            None => tracing::warn!(
                reference = %path.display(),
                "no .json beside the reference features: their network cannot be checked"
            ),
        }
        let features = radit_eval::io::read_npy(path).map_err(|e| eval_error(path, e))?;
        let reference = radit_eval::fd::Moments::of(&features).map_err(|e| eval_error(path, e))?;
        Ok(Self {
            cfg: cfg.clone(),
            net,
            reference,
        })
    }

    /// FD of the EMA's samples against the reference. Collective.
    pub fn measure(
        &self,
        ema: &EmaSamples,
        engine: &dyn TrainingEngine,
    ) -> Result<f64, TrainError> {
        let comm = engine.collective();
        let (rank, world) = (comm.rank() as u64, comm.world() as u64);
        let device = engine.device();
        let k = self.cfg.samples;
        let per = k.div_ceil(world);
        let mine = (rank * per).min(k)..((rank + 1) * per).min(k);
        let dim = self.reference.dim() as i64;
        let local = Tensor::zeros([per as i64, dim], (Kind::Float, device));
        let mut row = 0;
        let mut start = mine.start;
        while start < mine.end {
            let end = (start + self.cfg.batch).min(mine.end);
            let images = ema.draw(
                start..end,
                end - start,
                self.cfg.seed,
                self.cfg.steps,
                self.cfg.decoder.as_ref(),
            )?;
            let unit = ((images.to_kind(Kind::Float) + 1.0) / 2.0).clamp(0.0, 1.0);
            let f = self.net.features(&unit)?;
            if f.size()[1] != dim {
                return Err(ConfigError::new(
                    "validation.fd.reference",
                    format!(
                        "{} has {dim}-wide features; the network makes {}",
                        self.cfg.reference.display(),
                        f.size()[1]
                    ),
                )
                .into());
            }
            let n = end - start;
            local.narrow(0, row, n as i64).copy_(&f.to_device(device));
            row += n as i64;
            start = end;
        }
        let mut all = Tensor::zeros([per as i64 * world as i64 * dim], (Kind::Float, device));
        comm.all_gather(&local.flatten(0, -1), &mut all)?;
        // Rank r's share is rows r * per.., clipped at k: the first k rows are the samples in order.
        let picked = all
            .view([-1, dim])
            .narrow(0, 0, k as i64)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
        let values = Vec::<f64>::try_from(picked.flatten(0, -1)).map_err(ModelError::from)?;
        let fake = radit_eval::Features::new("samples", dim as usize, values)
            .map_err(|e| ConfigError::new("validation.fd", e.to_string()))?;
        let moments = radit_eval::fd::Moments::of(&fake)
            .map_err(|e| ConfigError::new("validation.fd", e.to_string()))?;
        radit_eval::fd::frechet_distance(&moments, &self.reference)
            .map_err(|e| ConfigError::new("validation.fd", e.to_string()).into())
    }

    /// The decoder the FD's samples go through, for [`EmaSampling::open`].
    pub fn decoder(&self) -> Option<&radit_models::autoencoder::DecoderConfig> {
        self.cfg.decoder.as_ref()
    }

    pub fn due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.cfg.every) || step == total
    }
}
