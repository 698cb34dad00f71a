//! Evaluation during training (evaluation.md, "Jobs users expect" 9 and 10):
//!
//! - the **validation loss**: the run's objective on the first `images` rows of the validation split. For a
//!   velocity network the rectified-flow loss at a fixed grid of `times` values of t (midpoints, shifted as
//!   training shifts them), with noise drawn per (seed, grid point, row) and dequantisation per (seed, row); for an
//!   autoencoder the reconstruction loss of the latent's mean. The number is the same on any world size and
//!   comparable across runs; with `best`, the weights of the lowest one so far are kept;
//! - the **mini-FD**, matched: the first K rows of the validation split, each sampled by the EMA (Euler) with that
//!   row's own 19 variables and a fixed noise (seed, row), through a feature network; FD against the same K rows'
//!   real images through the same network. The real features are computed once per launch (or picked by id from a
//!   `radit eval features` file of the split, whose `.json` must name the same network). Unconditional samples
//!   against conditioned real images would measure the profile mismatch as much as the model.
//!
//! Both are collective: every rank calls them at the same step with the same config and gets the same number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radit_protocol::ConfigError;
use radit_sharding::loader::{DataConfig, Loader, Pass};
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::generate::Conditions;
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
    /// K: the first K rows of the split, one sample each with its profile, shared over the ranks (all of the
    /// split's rows when it has fewer).
    #[serde(default = "default_samples")]
    pub samples: u64,
    /// The split whose first K rows are matched (default: `[validation] split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// The rows' real features, already computed: an [N, D] .npy of that split by `radit eval features` (its .json
    /// names the network, its .ids.txt the rows, which must include the first K). Default: computed at the
    /// first FD of each launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
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

/// The mini-FD's fixed parts, loaded once per run: the feature network, the matched rows and (once computed or
/// read) the moments of their real features.
pub struct MiniFd {
    cfg: MiniFdConfig,
    net: Box<dyn FeatureNet>,
    split: Split,
    /// The first K rows of the split: (image id, profile).
    rows: Vec<(String, Conditions)>,
    reader: StoreReader,
    reference: std::cell::OnceCell<radit_eval::fd::Moments>,
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
    /// Loads the network and reads the first K rows' profiles of the split (`[validation] split` unless the
    /// section names one) from `storage`; with `reference`, reads their real features from it.
    pub fn open(
        cfg: &MiniFdConfig,
        validation_split: Split,
        storage: &Storage,
        device: Device,
    ) -> Result<Self, TrainError> {
        let net =
            radit_models::features::load_net(&cfg.net, cfg.input_size, &cfg.preprocessing, device)?;
        let split = cfg.split.unwrap_or(validation_split);
        let reader = StoreReader::open(storage.clone())?;
        let mut rows = Vec::new();
        for k in 0..reader.shards(split) {
            if rows.len() as u64 >= cfg.samples {
                break;
            }
            let shard = reader.read_metadata_of(split, k)?;
            for i in 0..shard.rows {
                if (rows.len() as u64) < cfg.samples {
                    rows.push((shard.image_ids[i].clone(), Conditions::of_row(&shard, i)));
                }
            }
        }
        if rows.len() < 2 {
            return Err(ConfigError::new(
                "validation.fd.split",
                format!(
                    "the {split} split of {} has {} row(s): an FD needs at least 2 (name a larger split)",
                    reader.describe(),
                    rows.len()
                ),
            )
            .into());
        }
        if (rows.len() as u64) < cfg.samples {
            tracing::warn!(
                split = %split,
                rows = rows.len(),
                samples = cfg.samples,
                "the split has fewer rows than validation.fd.samples: the FD matches all of them"
            );
        }
        let reference = std::cell::OnceCell::new();
        if let Some(path) = &cfg.reference {
            let _ = reference.set(Self::read_reference(path, &rows, split, net.as_ref())?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            net,
            split,
            rows,
            reader,
            reference,
        })
    }

    /// The moments of the matched rows' features in `path` (picked by id), after checking its network.
    fn read_reference(
        path: &Path,
        rows: &[(String, Conditions)],
        split: Split,
        net: &dyn FeatureNet,
    ) -> Result<radit_eval::fd::Moments, TrainError> {
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
        let ids_path = crate::features_job::ids_path(path);
        let ids = std::fs::read_to_string(&ids_path).map_err(|e| {
            ConfigError::new(
                "validation.fd.reference",
                format!(
                    "{}: {e}; the rows of the reference are named by the .ids.txt that radit eval features \
                     writes beside it",
                    ids_path.display()
                ),
            )
        })?;
        let at: std::collections::HashMap<&str, usize> =
            ids.lines().enumerate().map(|(i, id)| (id, i)).collect();
        let mut picked = Vec::with_capacity(rows.len());
        for (id, _) in rows {
            let Some(&i) = at.get(id.as_str()) else {
                return Err(ConfigError::new(
                    "validation.fd.reference",
                    format!(
                        "{} has no features of {id}, one of the first {} rows of the {split} split that the FD \
                         matches: write it with radit eval features --split {split} (or leave reference out)",
                        path.display(),
                        rows.len()
                    ),
                )
                .into());
            };
            if i >= features.rows() {
                return Err(eval_error(
                    path,
                    radit_eval::EvalError::Shape {
                        what: ids_path.display().to_string(),
                        reason: format!(
                            "names more rows than the {} of the features",
                            features.rows()
                        ),
                    },
                ));
            }
            picked.push(i);
        }
        radit_eval::fd::Moments::of(&features.select(&picked)).map_err(|e| eval_error(path, e))
    }

    /// The matched rows' features, `[K, D]` in row order on the CPU: each rank computes a contiguous share with
    /// `compute(rows)`, and the shares are gathered. Collective.
    fn gathered(
        &self,
        engine: &dyn TrainingEngine,
        mut compute: impl FnMut(std::ops::Range<usize>) -> Result<Tensor, TrainError>,
    ) -> Result<radit_eval::Features, TrainError> {
        let comm = engine.collective();
        let (rank, world) = (comm.rank(), comm.world());
        let device = engine.device();
        let k = self.rows.len();
        let per = k.div_ceil(world);
        let mine = (rank * per).min(k)..((rank + 1) * per).min(k);
        let mut parts = Vec::new();
        let mut start = mine.start;
        while start < mine.end {
            let end = (start + self.cfg.batch as usize).min(mine.end);
            parts.push(compute(start..end)?.to_kind(Kind::Float).to_device(device));
            start = end;
        }
        // Every rank must agree on the width before the gather: a rank with no rows (K < world) learns it from
        // the others.
        let dim_here = parts.first().map_or(0, |p| p.size()[1]);
        let dim = comm.all_reduce_max_f64(dim_here as f64)? as i64;
        let local = Tensor::zeros([per as i64, dim], (Kind::Float, device));
        let mut row = 0;
        for p in parts {
            let n = p.size()[0];
            local.narrow(0, row, n).copy_(&p);
            row += n;
        }
        let mut all = Tensor::zeros([per as i64 * world as i64 * dim], (Kind::Float, device));
        comm.all_gather(&local.flatten(0, -1), &mut all)?;
        // Rank r's share is rows r * per.., clipped at k: the first k rows are the rows in order.
        let picked = all
            .view([-1, dim])
            .narrow(0, 0, k as i64)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
        let values = Vec::<f64>::try_from(picked.flatten(0, -1)).map_err(ModelError::from)?;
        radit_eval::Features::new("features", dim as usize, values)
            .map_err(|e| ConfigError::new("validation.fd", e.to_string()).into())
    }

    /// The real images of rows `range` (16-bit, `[n, 1, side, side]` in [0, 1]).
    fn real_images(&self, range: std::ops::Range<usize>) -> Result<Tensor, TrainError> {
        let per_shard = self.reader.layout().shard_images as usize;
        let side = i64::from(self.reader.layout().image_size);
        let pixels = (side * side) as usize;
        let mut levels = Vec::with_capacity(range.len() * pixels);
        let mut shard: Option<(usize, radit_sharding::reader::Shard)> = None;
        for row in range {
            let k = row / per_shard;
            if shard.as_ref().is_none_or(|(at, _)| *at != k) {
                shard = Some((k, self.reader.read_shard(self.split, k as u64)?));
            }
            let (_, s) = shard.as_ref().expect("read above");
            let i = row % per_shard;
            levels.extend_from_slice(&s.images[i * pixels..(i + 1) * pixels]);
        }
        Ok(crate::features_job::unit_images(&levels, side))
    }

    /// FD of the EMA's samples of the matched rows against those rows' real images. Collective.
    pub fn measure(
        &self,
        ema: &EmaSamples,
        engine: &dyn TrainingEngine,
    ) -> Result<f64, TrainError> {
        let fd_error = |e: radit_eval::EvalError| ConfigError::new("validation.fd", e.to_string());
        if self.reference.get().is_none() {
            let started = std::time::Instant::now();
            let real = self.gathered(engine, |rows| {
                Ok(self.net.features(&self.real_images(rows)?)?)
            })?;
            let moments = radit_eval::fd::Moments::of(&real).map_err(fd_error)?;
            tracing::info!(
                rows = self.rows.len(),
                seconds = started.elapsed().as_secs_f64(),
                "mini-FD reference features"
            );
            let _ = self.reference.set(moments);
        }
        let reference = self.reference.get().expect("set above");
        let fake = self.gathered(engine, |rows| {
            let conditions: Vec<&Conditions> =
                self.rows[rows.clone()].iter().map(|(_, c)| c).collect();
            let indices: Vec<u64> = rows.map(|r| r as u64).collect();
            let images = ema.draw_for(
                &conditions,
                &indices,
                self.cfg.seed,
                self.cfg.steps,
                self.cfg.decoder.as_ref(),
            )?;
            let unit = ((images.to_kind(Kind::Float) + 1.0) / 2.0).clamp(0.0, 1.0);
            Ok(self.net.features(&unit)?)
        })?;
        if fake.dim() != reference.dim() {
            return Err(ConfigError::new(
                "validation.fd.reference",
                format!(
                    "the reference features are {}-wide; the network makes {}",
                    reference.dim(),
                    fake.dim()
                ),
            )
            .into());
        }
        let moments = radit_eval::fd::Moments::of(&fake).map_err(fd_error)?;
        radit_eval::fd::frechet_distance(&moments, reference).map_err(|e| fd_error(e).into())
    }

    /// The decoder the FD's samples go through, for [`EmaSampling::open`].
    pub fn decoder(&self) -> Option<&radit_models::autoencoder::DecoderConfig> {
        self.cfg.decoder.as_ref()
    }

    pub fn due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.cfg.every) || step == total
    }
}
