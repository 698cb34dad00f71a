//! The train loop: `radit train --config run.toml`. A thin driver over the loader, the objective, the engine and
//! the checkpointer: resume, then `while step < steps { batch; forward/backward; step; maybe checkpoint }`. The
//! objective ([`objective`]) follows the network: the rectified flow for a velocity network, reconstruction for an
//! autoencoder (`radit vae train`).

pub mod best;
pub mod ema_samples;
pub mod metrics_csv;
pub mod objective;
pub mod preview;
pub mod validate;

use std::sync::atomic::Ordering;
use std::time::Instant;

pub use radit_sharding::loader::DataConfig;
use radit_sharding::loader::{Batch, Inputs, Loader, LoaderConfig, Pass};
use radit_sharding::order::OrderState;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::train::ema_samples::{EmaSamples, EmaSampling};
use preview::PreviewConfig;
use radit_engine::checkpoint::{CheckpointConfig, CheckpointError, Checkpointer, RunState};
use radit_engine::collective::Collective;
use radit_engine::collective::phase::PhaseMarking;
use radit_engine::fsdp::{EngineConfig, EngineError, Initial, LrSchedule, StepReport};
use radit_engine::membership::RankHandles;
use radit_engine::progress::{Phase, StepRecord};
use radit_engine::training::TrainingEngine;
use radit_models::autoencoder::finetune::FinetuneConfig;
use radit_models::flow::FlowConfig;
use radit_models::model::{ModelError, RadiTConfig};
use radit_models::network::{Architecture, Role};
use radit_models::reconstruction::ReconstructionConfig;
use radit_models::unet::UNetConfig;
use radit_models::unet::vae::RadVaeConfig;
pub use radit_protocol::ConfigError;

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error("{}: {reason}", file.display())]
    ConfigFile {
        file: std::path::PathBuf,
        reason: String,
    },
    #[error("training data")]
    Data(#[from] radit_sharding::ShardError),
    #[error("training data storage")]
    Storage(#[from] radit_sharding::store::StorageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Collective(#[from] radit_engine::collective::CollectiveError),
    /// libtorch could not allocate (a panic of tch's infallible methods, caught by the step's guard).
    #[error("the device's memory")]
    Allocation(#[from] radit_engine::out_of_memory::AllocationFailed),
    #[error(
        "{consecutive} consecutive steps had a non-finite loss or gradient at step {step}, and {why}"
    )]
    Diverged {
        step: u64,
        consecutive: u64,
        why: String,
    },
    /// A newer generation of the run took over (the supervisor gave up on this one): leave without a checkpoint.
    #[error("superseded by a newer generation of the run after step {step}")]
    Superseded { step: u64 },
    /// The training loader had no next batch (it cycles through epochs, so the store changed under the run).
    #[error("the training data ended before step {step}: did the store change under the run?")]
    DataEnded { step: u64 },
    /// The device ran out of memory: the same configuration would fail the same way after a restart.
    #[error(transparent)]
    OutOfMemory(Box<radit_engine::out_of_memory::OutOfMemory>),
}

impl From<radit_engine::out_of_memory::OutOfMemory> for TrainError {
    fn from(e: radit_engine::out_of_memory::OutOfMemory) -> Self {
        TrainError::OutOfMemory(Box::new(e))
    }
}

impl TrainError {
    /// Whether a relaunch of the same configuration would end the same way (the supervisor stops and shows this
    /// instead of relaunching): out of memory, a checkpoint of another model or data order, a checkpoint that
    /// could not be written twice in a row (a full disk), a shard object that stayed missing or damaged through
    /// the loader's re-reads, a configuration error.
    pub fn repeats(&self) -> bool {
        matches!(
            self,
            TrainError::OutOfMemory(_)
                | TrainError::InvalidConfig(_)
                | TrainError::Data(radit_sharding::ShardError::BadObject { .. })
                | TrainError::Checkpoint(
                    CheckpointError::Mismatch { .. } | CheckpointError::WriteFailed { .. }
                )
        )
    }
}

/// An out-of-memory error with what the operator needs to change the configuration.
fn out_of_memory(
    e: TrainError,
    cfg: &TrainConfig,
    world: u64,
    device: Device,
    step: u64,
) -> TrainError {
    let model = cfg.model.resolve().ok();
    let per_rank = cfg.train.global_batch / world.max(1);
    let micro = per_rank / cfg.train.micro_batches.max(1);
    let setting = format!(
        "model {} ({} parameters), {per_rank} images per rank per step in {} micro-batch(es) of {micro} \
         (train.global_batch {} over {world} ranks), engine.mode {:?}, precision {:?}",
        cfg.model.preset.as_deref().unwrap_or("from [model.config]"),
        model.map_or_else(|| "?".into(), |m| m.parameters().to_string()),
        cfg.train.micro_batches,
        cfg.train.global_batch,
        cfg.engine.mode,
        cfg.engine.precision,
    );
    use radit_engine::fsdp::ShardingMode;
    let rest = match cfg.engine.mode {
        ShardingMode::Zero3 => {
            ", or run on more ranks (each holds 1/world of the weights, gradients and optimizer state); activation \
             recomputation is already on for every block"
        }
        ShardingMode::Zero2 => {
            ", use engine.mode = \"zero3\" (frees each block's gathered weights between forward and backward), or \
             run on more ranks (each holds 1/world of the weights, gradients and optimizer state)"
        }
        ShardingMode::Ddp => {
            "; engine.mode = \"ddp\" keeps the whole training state and every activation on each rank, so more ranks \
             only shrink the per-rank batch (for RadiT, engine.mode = \"zero3\" shards the state and recomputes \
             activations)"
        }
    };
    let advice = format!(
        "raise train.micro_batches (to {}: smaller micro-batches, the same global batch){rest}",
        (cfg.train.micro_batches * 2).min(per_rank.max(1)),
    );
    radit_engine::out_of_memory::OutOfMemory::new(
        e,
        format!("step {step}"),
        device,
        setting,
        advice,
    )
    .into()
}

/// The whole run, as one TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelChoice,
    #[serde(default)]
    pub flow: FlowConfig,
    /// An autoencoder's objective (L1, KL, Rad-DINO perceptual distance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruction: Option<ReconstructionConfig>,
    #[serde(default)]
    pub engine: EngineConfig,
    pub train: LoopConfig,
    pub checkpoint: Option<CheckpointConfig>,
    /// A contact sheet of EMA samples every N steps.
    #[serde(default)]
    pub preview: Option<PreviewConfig>,
    /// A validation loss (and a mini-FD) every N steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<validate::ValidationConfig>,
}

/// A preset by name (RadiT's or a U-Net's), or a whole architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelChoice {
    #[serde(default)]
    pub preset: Option<String>,
    /// A whole RadiT.
    #[serde(default)]
    pub config: Option<RadiTConfig>,
    /// A whole RadUNet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet: Option<UNetConfig>,
    /// A whole RadVAE (an autoencoder, trained on `[reconstruction]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<RadVaeConfig>,
    /// A fine-tune of a released autoencoder's decoder (RadVAE (LoRA), trained on `[reconstruction]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneConfig>,
    /// A metadata predictor (trained on the labels and age; no `[flow]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<radit_models::predictor::PredictorConfig>,
    /// The preset at another input size (a store's image side, or its latents' side): `tiny` at 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<i64>,
}

impl ModelChoice {
    pub fn resolve(&self) -> Result<Architecture, ConfigError> {
        let given: Vec<Architecture> = [
            self.config.clone().map(Architecture::RadiT),
            self.unet.clone().map(Architecture::UNet),
            self.vae.clone().map(Architecture::RadVae),
            self.finetune.clone().map(Architecture::VaeFinetune),
            self.predictor.clone().map(Architecture::Predictor),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() > 1 {
            return Err(ConfigError::new(
                "model",
                "give one of [model.config] (RadiT), [model.unet] (RadUNet), [model.vae] (RadVAE), \
                 [model.finetune] (RadVAE (LoRA)) or [model.predictor]",
            ));
        }
        let whole = given.into_iter().next();
        let cfg = match (&self.preset, whole) {
            (Some(p), None) => {
                let preset = Architecture::preset(p)
                    .map_err(|e| ConfigError::new("model.preset", e.to_string()))?;
                match self.input_size {
                    Some(side) => preset.with_input_size(side),
                    None => preset,
                }
            }
            (None, Some(_)) if self.input_size.is_some() => {
                return Err(ConfigError::new(
                    "model.input_size",
                    "goes with model.preset; a whole architecture sets its own input size",
                ));
            }
            (None, Some(c)) => c,
            _ => {
                return Err(ConfigError {
                    field: "model".into(),
                    reason: "give exactly one of model.preset, [model.config], [model.unet], [model.vae], \
                             [model.finetune] or [model.predictor]"
                        .into(),
                });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Optimiser steps in the whole run (a resumed run continues to this step).
    pub steps: u64,
    pub global_batch: u64,
    /// Micro-batches per rank per step (gradient accumulation).
    #[serde(default = "one")]
    pub micro_batches: u64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// This many consecutive skipped steps roll the run back to its last checkpoint.
    #[serde(default = "default_rollback")]
    pub rollback_after_skips: u64,
}

fn one() -> u64 {
    1
}
fn default_log_every() -> u64 {
    10
}
fn default_rollback() -> u64 {
    3
}

impl TrainConfig {
    /// Parses a train config file; errors name the file and the field.
    pub fn load(file: &std::path::Path) -> Result<ValidatedConfig, TrainError> {
        let unreadable = |reason: String| TrainError::ConfigFile {
            file: file.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(file).map_err(|e| unreadable(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        if table.contains_key("job") {
            return Err(unreadable(format!(
                "this is a job file ([job]): run it with `radit run {}`",
                file.display()
            )));
        }
        radit_protocol::config::check_sections(
            table.keys().map(String::as_str),
            &Self::SECTIONS,
            &Self::REQUIRED_SECTIONS,
        )
        .map_err(|e| unreadable(format!("[{}]: {}", e.field, e.reason)))?;
        let cfg: TrainConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| unreadable(e.to_string()))?;
        cfg.validated()
            .map_err(|e| unreadable(format!("{}: {}", e.field, e.reason)))
    }

    /// The sections of a training config, in the order a file usually has them.
    pub const SECTIONS: [&'static str; 9] = [
        "data",
        "model",
        "flow",
        "reconstruction",
        "engine",
        "train",
        "checkpoint",
        "preview",
        "validation",
    ];
    /// The sections without a default.
    pub const REQUIRED_SECTIONS: [&'static str; 3] = ["data", "model", "train"];

    /// Checks everything that does not need the store or the world size.
    pub fn validated(self) -> Result<ValidatedConfig, ConfigError> {
        let model = self.check()?;
        Ok(ValidatedConfig {
            config: self,
            model,
        })
    }

    fn check(&self) -> Result<Architecture, ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(ConfigError {
                field: field.into(),
                reason,
            })
        };
        let model = self.model.resolve()?;
        self.flow.validate()?;
        self.check_objective(&model)?;
        self.engine.validate()?;
        if !model.is_chain() && self.engine.mode != radit_engine::fsdp::ShardingMode::Ddp {
            return bad(
                "engine.mode",
                format!(
                    "{} has skip connections, which the sharded modes (zero3, zero2) cannot schedule: set \
                     engine.mode = \"ddp\"",
                    model.name()
                ),
            );
        }
        if self.train.steps == 0 {
            return bad("train.steps", "must be positive".into());
        }
        if self.train.global_batch == 0 || self.train.micro_batches == 0 {
            return bad(
                "train.global_batch",
                "global_batch and micro_batches must be positive".into(),
            );
        }
        if self.train.rollback_after_skips == 0 {
            return bad("train.rollback_after_skips", "must be positive".into());
        }
        if self.data.cache_gib.is_nan() || self.data.cache_gib <= 0.0 {
            return bad(
                "data.cache_gib",
                format!("must be positive, got {}", self.data.cache_gib),
            );
        }
        if self.data.object_attempts == 0 {
            return bad("data.object_attempts", "must be at least 1".into());
        }
        if !(self.data.request_timeout_seconds >= 0.0
            && self.data.request_timeout_seconds.is_finite())
        {
            return bad(
                "data.request_timeout_seconds",
                format!(
                    "must be 0 (the default) or positive seconds, got {}",
                    self.data.request_timeout_seconds
                ),
            );
        }
        if let Some(c) = &self.checkpoint
            && (c.every == 0 || c.keep == 0)
        {
            return bad("checkpoint.every", "every and keep must be positive".into());
        }
        if let Some(p) = &self.preview {
            p.validate()?;
        }
        if let Some(v) = &self.validation {
            v.validate(&model)?;
        }
        Ok(model)
    }

    /// The objective's sections against the network's role: `[flow]` and `[preview]` for a velocity network,
    /// `[reconstruction]` for an autoencoder.
    fn check_objective(&self, model: &Architecture) -> Result<(), ConfigError> {
        match (model.role(), &self.reconstruction) {
            (Role::Velocity, Some(_)) => Err(ConfigError::new(
                "reconstruction",
                format!(
                    "{} is a velocity network, trained on the rectified flow ([flow]); [reconstruction] is an \
                     autoencoder's objective",
                    model.name()
                ),
            )),
            (Role::Autoencoder, None) => Err(ConfigError::new(
                "reconstruction",
                format!(
                    "{} is an autoencoder: give its objective, [reconstruction] (l1, kl, perceptual and the \
                     Rad-DINO snapshot perceptual_net, or perceptual = 0)",
                    model.name()
                ),
            )),
            (Role::Autoencoder, Some(r)) => {
                if self.flow != FlowConfig::default() {
                    return Err(ConfigError::new(
                        "flow",
                        "an autoencoder is not trained on the rectified flow: remove [flow]",
                    ));
                }
                if self.preview.is_some() {
                    return Err(ConfigError::new(
                        "preview",
                        "an autoencoder draws no samples: remove [preview] ([samples] in a job file)",
                    ));
                }
                r.validate()
            }
            (Role::Velocity, None) => Ok(()),
            (Role::Predictor, Some(_)) => Err(ConfigError::new(
                "reconstruction",
                "a metadata predictor learns labels and age: remove [reconstruction]",
            )),
            (Role::Predictor, None) => {
                if self.flow != FlowConfig::default() {
                    return Err(ConfigError::new(
                        "flow",
                        "a metadata predictor is not trained on the rectified flow: remove [flow]",
                    ));
                }
                if self.preview.is_some() {
                    return Err(ConfigError::new(
                        "preview",
                        "a metadata predictor draws no samples: remove [preview] ([samples] in a job file)",
                    ));
                }
                Ok(())
            }
        }
    }

    /// Checks what depends on the world size.
    pub fn validate_for_world(&self, world: u64) -> Result<(), ConfigError> {
        let per_step = world * self.train.micro_batches;
        if !self.train.global_batch.is_multiple_of(per_step) {
            return Err(ConfigError {
                field: "train.global_batch".into(),
                reason: format!(
                    "{} must be divisible by world size x micro_batches = {world} x {} = {per_step}",
                    self.train.global_batch, self.train.micro_batches
                ),
            });
        }
        Ok(())
    }
}

/// A train config that passed [`TrainConfig::validated`] (the only way to make one), with its resolved model: a
/// run cannot start on a config nobody checked, and nobody checks it twice.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedConfig {
    config: TrainConfig,
    model: Architecture,
}

impl std::ops::Deref for ValidatedConfig {
    type Target = TrainConfig;
    fn deref(&self) -> &TrainConfig {
        &self.config
    }
}

impl ValidatedConfig {
    pub fn model(&self) -> &Architecture {
        &self.model
    }

    /// Rank `rank`'s training loader: the model's role and input decide images (dequantised or as stored) or
    /// latents.
    pub fn loader_config(&self, rank: u64, world: u64) -> LoaderConfig {
        let output = objective::model_input(&self.model);
        self.data.loader_config(
            Pass::Train,
            self.train.seed,
            self.train.global_batch,
            rank,
            world,
            output,
        )
    }
}

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepLog {
    pub step: u64,
    #[serde(flatten)]
    pub report: StepReport,
    /// The largest of the ranks' own losses (each over its share of the global batch).
    pub loss_max: f64,
    pub images_per_second: f64,
    /// Patches per second (images x tokens per image).
    pub tokens_per_second: f64,
    pub data_wait_seconds: f64,
    /// The validation loss and mini-FD measured after this step, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<f64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// The run stopped early because a rank was asked to (SIGUSR1 before the time limit, SIGTERM on
    /// preemption): every rank checkpointed at `final_step`; requeue the job to continue.
    pub stopped_for_requeue: bool,
    pub resumed_from: Option<u64>,
    pub final_step: u64,
    pub skipped_steps: u64,
    pub rollbacks: u64,
    pub last_checkpoint: Option<u64>,
    /// Samples every rank together skipped because their shard object stayed missing or damaged
    /// (`data.skip_bad_shards`).
    pub skipped_samples: u64,
}

/// `n` placeholder samples of NaN in place of a batch none of whose shards could be read.
fn unreadable_batch(empty: Batch, n: usize) -> Batch {
    let per: usize = empty.sample_shape.iter().product();
    Batch {
        indices: (0..n as u64).collect(),
        valid: vec![true; n],
        inputs: Inputs::F32(vec![f32::NAN; n * per]),
        labels: vec![0; n * radit_sharding::schema::NUM_LABELS],
        age: vec![f32::NAN; n],
        image_ids: vec![String::new(); n],
        ..empty
    }
}

/// A batch's inputs x1 `[n, C, H, W]` (stored 16-bit pixels at the centres of their bins in [-1, 1]), labels
/// `[n, V]` (int64) and age `[n]` on `device`.
pub(crate) fn to_tensors(
    batch: &Batch,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor), TrainError> {
    let n = batch.len() as i64;
    let [c, h, w] = batch.sample_shape.map(|v| v as i64);
    let x1 = match &batch.inputs {
        Inputs::F32(v) => Tensor::from_slice(v),
        Inputs::U16(v) => {
            let x: Vec<f32> = v.iter().map(|&l| crate::generate::from_level(l)).collect();
            Tensor::from_slice(&x)
        }
    }
    .view([n, c, h, w])
    .to_device(device);
    let labels = Tensor::from_slice(&batch.labels)
        .view([n, -1])
        .to_kind(Kind::Int64)
        .to_device(device);
    let age = Tensor::from_slice(&batch.age).to_device(device);
    Ok((x1, labels, age))
}

/// One micro-batch of the rectified-flow objective on this rank: data x1, source noise x0, times t, labels [n, V]
/// and age [n].
pub struct MicroBatch<'a> {
    pub x1: &'a Tensor,
    pub x0: &'a Tensor,
    pub t: &'a Tensor,
    pub labels: &'a Tensor,
    pub age: &'a Tensor,
    /// Per-sample dropout keys (seed, step, global sample index), for networks with dropout.
    pub keys: Option<&'a Tensor>,
}

impl MicroBatch<'_> {
    /// The engine's forward and backward on x_t with the velocity MSE (`radit_models::flow::velocity_mse`) as the loss; gradients accumulate scaled by
    /// `scale`. Returns this rank's mean loss.
    pub fn forward_backward(
        &self,
        engine: &mut dyn TrainingEngine,
        scale: f64,
    ) -> Result<f64, EngineError> {
        let xt = radit_models::flow::interpolate(self.x1, self.x0, self.t);
        let inputs = radit_models::block::ModelInputs {
            x: &xt,
            t: self.t,
            labels: self.labels,
            age: self.age,
        };
        engine.forward_backward(
            &inputs,
            self.keys,
            &mut |v| radit_models::flow::velocity_mse(&v[0], self.x1, self.x0),
            scale,
        )
    }
}

/// Trains from the newest checkpoint (or from scratch) to `train.steps`. `on_step` sees every logged step
/// (rank 0 prints them). Collective: every rank calls it with the same config.
pub fn train(
    cfg: &ValidatedConfig,
    comm: Box<dyn Collective>,
    device: Device,
    handles: RankHandles,
    mut on_step: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    let (rank, world) = (comm.rank() as u64, comm.world() as u64);
    let span = tracing::info_span!("train", rank, world);
    let _enter = span.enter();
    let progress = handles.progress.clone();
    // A libtorch allocation failure anywhere in the run (forward, backward, optimiser, evaluation, preview) is an
    // error, never a panic: the supervisor must stop instead of relaunching into the same failure.
    let trained = radit_engine::out_of_memory::guard(|| {
        let mut t = Trainer::new(cfg, comm, device, handles)?;
        let mut log = StepLogger::new(cfg.train.log_every, t.tokens_per_image);
        while t.step < cfg.train.steps {
            let done = t.step()?;
            let evaluation = t.evaluate_if_due()?;
            log.observe(&done, evaluation, cfg.train.global_batch, &mut on_step);
            if t.skips.rollback_due(&done, cfg.train.rollback_after_skips) {
                t.roll_back()?;
                continue;
            }
            let stop_here = t.stop_vote()?;
            t.checkpoint_if_due(stop_here)?;
            t.preview_if_due()?;
            if stop_here {
                break;
            }
        }
        t.finish()
    })
    .unwrap_or_else(|failed| Err(failed.into()));
    trained.map_err(|e| match radit_engine::out_of_memory::in_chain(&e) {
        true => out_of_memory(e, cfg, world, device, progress.step() + 1),
        false => e,
    })
}

/// The run's EMA sampling when it draws sheets or an FD: the decoders this rank uses (the sheet's on rank 0, the
/// FD's everywhere), loaded once.
fn ema_sampling(
    cfg: &ValidatedConfig,
    rank: u64,
    device: Device,
) -> Result<Option<EmaSampling>, TrainError> {
    let fd = cfg.validation.as_ref().and_then(|v| v.fd.as_ref());
    if cfg.preview.is_none() && fd.is_none() {
        return Ok(None);
    }
    let decoders: Vec<&radit_models::autoencoder::DecoderConfig> = cfg
        .preview
        .as_ref()
        .filter(|_| rank == 0)
        .and_then(|p| p.decoder.as_ref())
        .into_iter()
        .chain(fd.and_then(|f| f.decoder.as_ref()))
        .collect();
    Ok(Some(EmaSampling::open(
        cfg.model(),
        cfg.flow.shift,
        &decoders,
        &cfg.data.url,
        device,
    )?))
}

/// One step's outcome, as the loop's parts see it.
struct DoneStep {
    step: u64,
    report: StepReport,
    loss_max: f64,
    data_wait_seconds: f64,
}

/// Logs every `log_every` steps (and every skipped one) with throughput over the window since the last log.
struct StepLogger {
    every: u64,
    tokens_per_image: u64,
    since: Instant,
    images: u64,
    data_wait_seconds: f64,
}

impl StepLogger {
    fn new(every: u64, tokens_per_image: u64) -> Self {
        Self {
            every: every.max(1),
            tokens_per_image,
            since: Instant::now(),
            images: 0,
            data_wait_seconds: 0.0,
        }
    }

    fn observe(
        &mut self,
        d: &DoneStep,
        evaluation: Evaluation,
        global_batch: u64,
        on_step: &mut impl FnMut(&StepLog),
    ) {
        self.images += global_batch;
        self.data_wait_seconds += d.data_wait_seconds;
        let measured = evaluation.val_loss.is_some() || evaluation.fd.is_some();
        if !(d.report.skipped || measured || d.step.is_multiple_of(self.every)) {
            return;
        }
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let log = StepLog {
            step: d.step,
            report: d.report,
            loss_max: d.loss_max,
            images_per_second: self.images as f64 / secs,
            tokens_per_second: (self.images * self.tokens_per_image) as f64 / secs,
            data_wait_seconds: self.data_wait_seconds,
            val_loss: evaluation.val_loss,
            fd: evaluation.fd,
        };
        tracing::info!(
            step = d.step,
            loss = d.report.loss,
            grad_norm = d.report.grad_norm,
            images_per_second = log.images_per_second,
            "step"
        );
        on_step(&log);
        *self = Self::new(self.every, self.tokens_per_image);
    }
}

/// What was measured after a step besides training.
#[derive(Debug, Clone, Copy, Default)]
struct Evaluation {
    val_loss: Option<f64>,
    fd: Option<f64>,
}

/// Counts consecutive skipped (non-finite) steps; too many in a row call for a rollback.
#[derive(Default)]
struct SkipPolicy {
    consecutive: u64,
    total: u64,
}

impl SkipPolicy {
    /// Whether the run must roll back to its last checkpoint after this step.
    fn rollback_due(&mut self, done: &DoneStep, limit: u64) -> bool {
        if !done.report.skipped {
            self.consecutive = 0;
            return false;
        }
        self.total += 1;
        self.consecutive += 1;
        tracing::warn!(
            step = done.step,
            consecutive = self.consecutive,
            loss = done.report.loss,
            grad_norm = done.report.grad_norm,
            "non-finite step skipped"
        );
        self.consecutive >= limit
    }
}

/// The parts of a run between steps: engine, checkpointer, loader and where the run stands.
struct Trainer<'a> {
    cfg: &'a ValidatedConfig,
    device: Device,
    rank: u64,
    engine: Box<dyn TrainingEngine>,
    ckpt: Option<Checkpointer>,
    storage: Storage,
    loader_cfg: LoaderConfig,
    loader: Loader,
    handles: RankHandles,
    step: u64,
    resumed_from: Option<u64>,
    skips: SkipPolicy,
    rollbacks: u64,
    last_checkpoint: Option<u64>,
    /// The last checkpoint could not be written (no commit since).
    checkpoint_failed: bool,
    /// This rank's samples skipped for bad shard objects.
    skipped_samples: u64,
    tokens_per_image: u64,
    flops_per_token: f64,
    /// The mini-FD's network and reference, loaded once.
    mini_fd: Option<validate::MiniFd>,
    /// The fault plan's step faults, when it has any.
    step_faults: Option<crate::faults::Faults>,
    /// Sampling from the EMA (sheets, FD): decoders and latent statistics loaded once.
    ema_sampling: Option<EmaSampling>,
    /// What the run minimises, with its networks (a perceptual network) loaded once.
    objective: objective::Objective,
    /// The best weights kept so far (`validation.best`).
    best: Option<best::BestWeights>,
    /// This step's EMA samples, while the sheet and the FD use them.
    ema: Option<(u64, EmaSamples)>,
}

impl<'a> Trainer<'a> {
    /// Builds the engine (the collective wrapped so waits read as the collective phase), opens the checkpoints
    /// and resumes from the newest one, and opens the loader where the run stands.
    fn new(
        cfg: &'a ValidatedConfig,
        comm: Box<dyn Collective>,
        device: Device,
        handles: RankHandles,
    ) -> Result<Self, TrainError> {
        let (rank, world) = (comm.rank() as u64, comm.world() as u64);
        cfg.validate_for_world(world)?;
        // The phase is marked outside the communication thread: a rank reads "collective" only while it waits.
        let comm = radit_engine::collective::threaded::overlapping(comm, device)?;
        let comm = Box::new(PhaseMarking::new(comm, handles.progress.clone()));
        let model = cfg.model();
        let mut engine = radit_engine::training::build(
            model,
            cfg.engine.clone(),
            comm,
            device,
            Initial::Seed(cfg.train.seed as i64),
        )?;
        let ckpt = cfg
            .checkpoint
            .clone()
            .map(|c| {
                Checkpointer::open(c).map(|c| {
                    c.reporting_to(handles.progress.clone())
                        .crashing_mid_write_at(handles.faults.checkpoint_crash_of(rank))
                })
            })
            .transpose()?;
        let state = match &ckpt {
            Some(c) => c.load_latest(engine.as_mut(), model)?,
            None => None,
        };
        if let (Some(s), Some(c)) = (&state, &cfg.checkpoint) {
            tracing::info!(step = s.step, url = %c.url, "resumed from checkpoint");
        }
        let storage = cfg.data.open_store()?;
        // An empty validation split is named now, not at the first validation hours in.
        if cfg.validation.as_ref().is_some_and(|v| v.every > 0) {
            check_validation_split(
                cfg,
                &radit_sharding::reader::StoreReader::open(storage.clone())?,
            )?;
        }
        let loader_cfg = cfg.loader_config(rank, world);
        let loader = open_loader(&storage, &loader_cfg, state.as_ref())?;
        check_sample_shape(model, loader.sample_shape(), &cfg.data.url)?;
        let resumed_from = state.as_ref().map(|s| s.step);
        handles.progress.set_step(resumed_from.unwrap_or(0));
        let mini_fd = cfg
            .validation
            .as_ref()
            .and_then(|v| v.fd.as_ref().map(|f| (v.split, f)))
            .map(|(split, f)| validate::MiniFd::open(f, split, &storage, device))
            .transpose()?;
        let step_faults = crate::faults::Faults::from_plan(&handles.faults);
        let ema_sampling = ema_sampling(cfg, rank, device)?;
        let objective = objective::Objective::open(cfg, device)?;
        let best = cfg
            .validation
            .as_ref()
            .and_then(|v| v.best.as_ref())
            .filter(|_| rank == 0)
            .map(|path| best::BestWeights::open(path))
            .transpose()?;
        Ok(Self {
            cfg,
            device,
            rank,
            engine,
            ckpt,
            storage,
            loader_cfg,
            loader,
            step: resumed_from.unwrap_or(0),
            resumed_from,
            skips: SkipPolicy {
                total: state.as_ref().map_or(0, |s| s.skipped_steps),
                ..SkipPolicy::default()
            },
            handles,
            rollbacks: 0,
            last_checkpoint: resumed_from,
            checkpoint_failed: false,
            skipped_samples: 0,
            tokens_per_image: model.tokens_per_image(),
            flops_per_token: model.training_flops_per_token(),
            step_faults,
            ema_sampling,
            ema: None,
            mini_fd,
            objective,
            best,
        })
    }

    /// One optimiser step: the next batch, its noise, forward/backward over the micro-batches, the update.
    fn step(&mut self) -> Result<DoneStep, TrainError> {
        // The EMA sampler of the last sheet or FD is not carried into a training step.
        self.ema = None;
        let (cfg, device, progress) = (self.cfg, self.device, &self.handles.progress);
        let next = self.step + 1;
        progress.set_phase(Phase::Data);
        let started = Instant::now();
        let mut batch = self
            .loader
            .next_batch()?
            .ok_or(TrainError::DataEnded { step: next })?;
        let data_wait_seconds = started.elapsed().as_secs_f64();
        // Samples of a shard that stayed missing or damaged (`data.skip_bad_shards`) were replaced by this rank's
        // readable ones; a rank with none gets a batch of NaN, which skips the step on every rank as a
        // non-finite step does (the collectives need every rank's part).
        self.skipped_samples += batch.skipped;
        if batch.is_empty() {
            let n = (cfg.train.global_batch / self.engine.collective().world() as u64) as usize;
            tracing::warn!(
                step = next,
                "no readable sample in this rank's batch: the step is skipped"
            );
            batch = unreadable_batch(batch, n);
        }
        let inputs = self
            .objective
            .inputs(&mut batch, (cfg.train.seed, self.step), device)?;
        progress.set_phase(Phase::Compute);
        if let Some(faults) = &mut self.step_faults {
            faults.before_compute(next, self.rank, &inputs.x1, device);
        }
        let micro = cfg.train.micro_batches as i64;
        let scale = 1.0 / (self.engine.collective().world() as f64 * micro as f64);
        let loss_sum = self
            .objective
            .gradients(self.engine.as_mut(), &inputs, micro, scale)?;
        let lr = cfg.engine.adam.lr_at(self.engine.adam_steps());
        let report = self.engine.optimizer_step(loss_sum, lr)?;
        self.step = next;
        // The largest rank's own loss of this same step (a rank far above the mean reads bad data or has a bad
        // device), recorded with the step's mean so a heartbeat never pairs two steps.
        let loss_max = self
            .engine
            .collective()
            .all_reduce_max_f64(loss_sum / micro as f64)?;
        let images = inputs.x1.size()[0] as u64;
        let tokens = images * self.tokens_per_image;
        progress.record_step(&StepRecord {
            step: next,
            seconds: started.elapsed().as_secs_f64(),
            data_wait_seconds,
            images,
            tokens,
            flops: tokens as f64 * self.flops_per_token,
            loss: report.loss,
            loss_max,
            grad_norm: report.grad_norm,
            learning_rate: report.lr,
            skipped: report.skipped,
        });
        progress.record_device_memory(radit_engine::runtime::device_memory(device));
        Ok(DoneStep {
            step: next,
            report,
            loss_max,
            data_wait_seconds,
        })
    }

    /// Back to the last committed checkpoint (weights, optimizer, data order), after too many skipped steps.
    fn roll_back(&mut self) -> Result<(), TrainError> {
        let (step, consecutive) = (self.step, self.skips.consecutive);
        let diverged = |why: &str| TrainError::Diverged {
            step,
            consecutive,
            why: why.into(),
        };
        let Some(c) = &mut self.ckpt else {
            return Err(diverged("there is no checkpoint to roll back to"));
        };
        c.finish(self.engine.collective())?;
        let Some(state) = c.load_latest(self.engine.as_mut(), self.cfg.model())? else {
            return Err(diverged("no checkpoint is committed yet"));
        };
        tracing::warn!(
            from = step,
            to = state.step,
            "rolling back to the last checkpoint"
        );
        self.step = state.step;
        self.loader = open_loader(&self.storage, &self.loader_cfg, Some(&state))?;
        self.skips.consecutive = 0;
        self.rollbacks += 1;
        Ok(())
    }

    /// One tiny all-reduce of the ranks' stop flags, so all of them stop at this same step. A superseded rank
    /// leaves at once instead: a checkpoint now would race the newer generation's.
    fn stop_vote(&self) -> Result<bool, TrainError> {
        if self.handles.progress.superseded() {
            return Err(TrainError::Superseded { step: self.step });
        }
        let asked = self.handles.stop.load(Ordering::SeqCst);
        let stop = self.step < self.cfg.train.steps && self.engine.collective().any(asked)?;
        if stop {
            tracing::warn!(
                step = self.step,
                "stop requested: checkpointing, then exiting for a requeue"
            );
        }
        Ok(stop)
    }

    /// Saves at every `checkpoint.every`, the last step and a stop; commits a finished save when all ranks wrote.
    fn checkpoint_if_due(&mut self, stop_here: bool) -> Result<(), TrainError> {
        let Some(c) = &mut self.ckpt else {
            return Ok(());
        };
        let step = self.step;
        if stop_here || step.is_multiple_of(c.config().every) || step == self.cfg.train.steps {
            let state = RunState {
                step,
                adam_steps: self.engine.adam_steps(),
                skipped_steps: self.skips.total,
                loader: serde_json::to_value(OrderState {
                    config: self.loader.state().config,
                    step,
                })
                .unwrap_or_default(),
                model: self.cfg.model().clone(),
                config: serde_json::to_value(&self.cfg.config).unwrap_or_default(),
            };
            let saved = {
                let progress = &self.handles.progress;
                let _phase = progress.enter(Phase::Checkpoint);
                let stall = Instant::now();
                // Saving first commits the save before it, which may fail.
                let saved = c.save(self.engine.as_ref(), state);
                progress.record_checkpoint_started(stall.elapsed().as_secs_f64());
                saved
            };
            self.tolerate_failed_checkpoint(saved)?;
        }
        let Some(c) = &mut self.ckpt else {
            return Ok(());
        };
        let polled = c.poll(self.engine.collective()).map(|done| {
            if let Some(done) = done {
                self.last_checkpoint = Some(done);
                self.checkpoint_failed = false;
            }
        });
        self.tolerate_failed_checkpoint(polled)
    }

    /// A periodic checkpoint that could not be written (a full disk) is cleaned up and training goes on, since the
    /// next one may succeed; a second failure in a row stops the run, naming the last good checkpoint.
    fn tolerate_failed_checkpoint(
        &mut self,
        outcome: Result<(), CheckpointError>,
    ) -> Result<(), TrainError> {
        match outcome {
            Err(e @ CheckpointError::WriteFailed { .. }) if !self.checkpoint_failed => {
                self.checkpoint_failed = true;
                tracing::warn!(error = %e, "training goes on; the run stops if the next checkpoint fails too");
                if self.rank == 0 {
                    eprintln!("radit: {e}; training goes on");
                }
                Ok(())
            }
            other => Ok(other?),
        }
    }

    /// Gathers the EMA weights into `self.ema` unless this step's are there: the sheet and the FD of one step
    /// share one gather. Collective.
    fn gather_ema(&mut self) -> Result<(), TrainError> {
        if self
            .ema
            .as_ref()
            .is_some_and(|(step, _)| *step == self.step)
        {
            return Ok(());
        }
        // The last sampler goes first: never two copies of the model besides the engine's.
        self.ema = None;
        if let Some(sampling) = &self.ema_sampling {
            self.ema = Some((self.step, sampling.samples(self.engine.as_ref())?));
        }
        Ok(())
    }

    /// A contact sheet of EMA samples every `preview.every` steps and at the last step.
    fn preview_if_due(&mut self) -> Result<(), TrainError> {
        let Some(p) = self.cfg.preview.clone() else {
            return Ok(());
        };
        if !(self.step.is_multiple_of(p.every) || self.step == self.cfg.train.steps) {
            return Ok(());
        }
        let progress = self.handles.progress.clone();
        let _phase = progress.enter(Phase::Sampling);
        let started = Instant::now();
        self.gather_ema()?;
        let (Some((_, ema)), Some(sampling)) = (&self.ema, &self.ema_sampling) else {
            return Ok(());
        };
        let written = preview::write_sheet(ema, sampling, self.engine.as_ref(), &p, self.step)?;
        // The sampler's copy of the model is not kept into the next step.
        self.ema = None;
        if let Some(path) = written {
            tracing::info!(step = self.step, path = %path.display(), seconds = started.elapsed().as_secs_f64(), "preview sheet");
        }
        Ok(())
    }

    /// The validation loss and the mini-FD, when due after this step. Skipped steps are measured like any other
    /// (the weights did not change, so the number repeats).
    fn evaluate_if_due(&mut self) -> Result<Evaluation, TrainError> {
        let Some(v) = &self.cfg.validation else {
            return Ok(Evaluation::default());
        };
        let (step, total) = (self.step, self.cfg.train.steps);
        let progress = self.handles.progress.clone();
        let mut out = Evaluation::default();
        if v.loss_due(step, total) {
            let _phase = progress.enter(Phase::Sampling);
            let started = Instant::now();
            let weights = self.engine.gather_named(v.ema)?;
            let loss = validate::validation_loss(
                self.engine.as_ref(),
                &weights,
                &self.objective,
                self.cfg.model(),
                v,
                &self.cfg.data,
                &self.storage,
            )?;
            if let Some(best) = &mut self.best {
                best.offer(&weights, self.cfg.model(), step, loss)?;
            }
            drop(weights);
            tracing::info!(
                step,
                val_loss = loss,
                seconds = started.elapsed().as_secs_f64(),
                "validation loss"
            );
            progress.record_validation(step, loss);
            out.val_loss = Some(loss);
        }
        if self.mini_fd.as_ref().is_some_and(|fd| fd.due(step, total)) {
            let _phase = progress.enter(Phase::Sampling);
            let started = Instant::now();
            self.gather_ema()?;
            let (Some((_, ema)), Some(fd)) = (&self.ema, &self.mini_fd) else {
                return Ok(out);
            };
            let value = fd.measure(ema, self.engine.as_ref())?;
            tracing::info!(
                step,
                fd = value,
                seconds = started.elapsed().as_secs_f64(),
                "mini-FD"
            );
            progress.record_fd(step, value);
            out.fd = Some(value);
        }
        Ok(out)
    }

    /// Commits the last save and says how the run ended.
    fn finish(mut self) -> Result<TrainSummary, TrainError> {
        if let Some(c) = &mut self.ckpt
            && let Some(done) = c.finish(self.engine.collective())?
        {
            self.last_checkpoint = Some(done);
        }
        let stopped_for_requeue = self.step < self.cfg.train.steps;
        let skipped_samples = self
            .engine
            .collective()
            .all_reduce_f64(self.skipped_samples as f64)? as u64;
        if stopped_for_requeue && self.ckpt.is_none() {
            tracing::warn!(
                step = self.step,
                "stopped without a [checkpoint] section: the next job starts from scratch"
            );
        }
        Ok(TrainSummary {
            stopped_for_requeue,
            resumed_from: self.resumed_from,
            final_step: self.step,
            skipped_steps: self.skips.total,
            rollbacks: self.rollbacks,
            last_checkpoint: self.last_checkpoint,
            skipped_samples,
        })
    }
}

/// A validation split that validation would read must have rows.
fn check_validation_split(
    cfg: &ValidatedConfig,
    reader: &radit_sharding::reader::StoreReader,
) -> Result<(), TrainError> {
    match cfg.validation.as_ref().filter(|v| v.every > 0) {
        Some(v) if reader.len(v.split) == 0 => Err(ConfigError::new(
            "validation.split",
            format!("the {} split of {} is empty", v.split.name(), cfg.data.url),
        )
        .into()),
        _ => Ok(()),
    }
}

/// What every rank checks of the store at its start, checked once before any rank starts (`radit run`, and its
/// `--dry-run`, so that a mismatch shows before a Slurm queue): the store opens, the training split's order fits
/// `world` ranks, its samples (images or latents, with their statistics) are the model's, the validation split is
/// not empty, and a preview decoder's weights are the autoencoder it names. Returns what was checked, for the plan.
pub fn check_before_launch(cfg: &ValidatedConfig, world: u64) -> Result<String, TrainError> {
    let storage = cfg.data.open_store()?;
    let shape = Loader::inspect(&storage, &cfg.loader_config(0, world))?;
    check_sample_shape(cfg.model(), shape, &cfg.data.url)?;
    let reader = radit_sharding::reader::StoreReader::open(storage)?;
    check_validation_split(cfg, &reader)?;
    if let Some(d) = cfg.preview.as_ref().and_then(|p| p.decoder.as_ref()) {
        radit_models::autoencoder::resolve(&d.autoencoder, &d.weights)
            .map_err(|e| ConfigError::new("samples.decoder", e.to_string()))?;
    }
    if let Architecture::VaeFinetune(f) = cfg.model() {
        f.autoencoder()
            .map_err(|e| ConfigError::new("model.finetune.base", e.to_string()))?;
    }
    if let Some(net) = cfg
        .reconstruction
        .as_ref()
        .filter(|r| r.perceptual > 0.0)
        .and_then(|r| r.perceptual_net.as_ref())
        && !net.join("config.json").is_file()
    {
        return Err(ConfigError::new(
            "reconstruction.perceptual_net",
            format!(
                "{} has no config.json: give the Rad-DINO snapshot's directory (Hugging Face layout)",
                net.display()
            ),
        )
        .into());
    }
    let [c, h, w] = shape;
    Ok(format!(
        "store {}: opened, {c}x{h}x{w} samples as the model takes them, splits train {} / val {} / test {} rows",
        cfg.data.url,
        reader.len(radit_sharding::split::Split::Train),
        reader.len(radit_sharding::split::Split::Val),
        reader.len(radit_sharding::split::Split::Test)
    ))
}

/// A model sized for other samples than the store's is named at start, not as a shape error inside a step.
fn check_sample_shape(
    model: &Architecture,
    store: [usize; 3],
    url: &str,
) -> Result<(), ConfigError> {
    let (side, channels) = (model.input_size(), model.in_channels());
    let want = [channels, side, side];
    if store.map(|v| v as i64) == want {
        return Ok(());
    }
    let [c, h, w] = store;
    Err(ConfigError::new(
        "model.input_size",
        format!(
            "the model takes {}x{}x{} samples but {url} holds {c}x{h}x{w} (set model.input_size = {h} with a \
             preset, or shard at --image-size {})",
            want[0], want[1], want[2], side
        ),
    ))
}

/// The loader at `state`'s step (or the start), refusing a data order that changed since the checkpoint.
fn open_loader(
    storage: &Storage,
    cfg: &LoaderConfig,
    state: Option<&RunState>,
) -> Result<Loader, TrainError> {
    let loader = Loader::open(storage.clone(), cfg.clone(), state.map_or(0, |s| s.step))?;
    if let Some(s) = state {
        let saved: OrderState =
            serde_json::from_value(s.loader.clone()).map_err(|e| CheckpointError::Corrupt {
                key: format!("the run state of step {}", s.step),
                reason: format!("its loader state: {e}"),
            })?;
        if saved.config != loader.state().config {
            return Err(ConfigError {
                field: "train".into(),
                reason: format!(
                    "the data order changed since the checkpoint ({:?} then, {:?} now): keep seed, \
                     global_batch, window_shards and the store as they were to resume exactly",
                    saved.config,
                    loader.state().config
                ),
            }
            .into());
        }
    }
    Ok(loader)
}
