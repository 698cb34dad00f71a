//! The train loop: `radit train --config run.toml`. A thin driver over the loader, the objective, the engine and
//! the checkpointer: resume, then `while step < steps { batch; forward/backward; step; maybe checkpoint }`.

use std::path::PathBuf;
use std::time::Instant;

use radit_sharding::loader::{Batch, CacheConfig, Inputs, Loader, LoaderConfig, ModelInput, Pass};
use radit_sharding::order::OrderState;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{CheckpointConfig, CheckpointError, Checkpointer, RunState};
use crate::collective::Collective;
use crate::engine::{EngineConfig, EngineError, Fsdp, Initial, LrSchedule, MicroBatch, StepReport};
use crate::flow::FlowConfig;
use crate::model::{ModelError, RadiTConfig};
use crate::preview::{self, PreviewConfig};
use crate::progress::{self, Phase};

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("training data")]
    Data(#[from] radit_sharding::ShardError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    #[error(
        "{consecutive} consecutive steps had a non-finite loss or gradient at step {step}, and {why}"
    )]
    Diverged {
        step: u64,
        consecutive: u64,
        why: String,
    },
    /// The training loader had no next batch (it cycles through epochs, so the store changed under the run).
    #[error("the training data ended before step {step}: did the store change under the run?")]
    DataEnded { step: u64 },
    /// The device ran out of memory: the same configuration would fail the same way after a restart.
    #[error(
        "out of memory in step {step} on {device} ({cause}): {setting}. A restart would fail the same way: {advice}"
    )]
    OutOfMemory {
        step: u64,
        device: String,
        /// The allocator's own words (the first line of libtorch's message).
        cause: String,
        /// The model, batch per rank, engine mode and precision, and the device's memory.
        setting: String,
        /// What to change.
        advice: String,
        #[source]
        source: Box<TrainError>,
    },
}

/// Whether an error (or any error it wraps) is libtorch failing to allocate: CUDA's caching allocator
/// ("CUDA out of memory") or the CPU allocator ("can't allocate memory").
pub fn is_out_of_memory(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("out of memory")
            || text.contains("OutOfMemoryError")
            || text.contains("can't allocate memory")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An out-of-memory error with what the operator needs to change the configuration.
fn out_of_memory(e: TrainError, cfg: &TrainConfig, world: u64, device: Device) -> TrainError {
    let model = cfg.model.resolve().ok();
    let per_rank = cfg.train.global_batch / world.max(1);
    let micro = per_rank / cfg.train.micro_batches.max(1);
    let memory = crate::runtime::device_memory(device).map_or_else(
        || "device memory unknown".to_string(),
        |(used, total)| {
            format!(
                "{:.1} of {:.1} GiB in use",
                used as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )
        },
    );
    let setting = format!(
        "model {} ({} parameters), {per_rank} images per rank per step in {} micro-batch(es) of {micro} \
         (train.global_batch {} over {world} ranks), engine.mode {:?}, precision {:?}; {memory}",
        cfg.model.preset.as_deref().unwrap_or("from [model.config]"),
        model.map_or_else(|| "?".into(), |m| m.parameter_count().total().to_string()),
        cfg.train.micro_batches,
        cfg.train.global_batch,
        cfg.engine.mode,
        cfg.engine.precision,
    );
    let advice = format!(
        "raise train.micro_batches (to {}: smaller micro-batches, the same global batch){}, or run on more ranks \
         (each holds 1/world of the weights, gradients and optimizer state); activation recomputation is already on \
         for every block",
        (cfg.train.micro_batches * 2).min(per_rank.max(1)),
        if cfg.engine.mode == crate::engine::ShardingMode::Zero2 {
            ", use engine.mode = \"zero3\" (frees each block's gathered weights between forward and backward)"
        } else {
            ""
        }
    );
    let mut root: &(dyn std::error::Error + 'static) = &e;
    while let Some(inner) = root.source() {
        root = inner;
    }
    let cause = root
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    TrainError::OutOfMemory {
        cause,
        // The step being computed (the last finished one plus one).
        step: progress::step() + 1,
        device: match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        },
        setting,
        advice,
        source: Box::new(e),
    }
}

/// The whole run, as one TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelChoice,
    #[serde(default)]
    pub flow: FlowConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    pub train: LoopConfig,
    pub checkpoint: Option<CheckpointConfig>,
    /// A contact sheet of EMA samples every N steps.
    #[serde(default)]
    pub preview: Option<PreviewConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The Zarr store (path, file:// or s3://).
    pub url: String,
    #[serde(default = "default_split")]
    pub split: Split,
    #[serde(default = "default_window")]
    pub window_shards: u64,
    /// Node-local cache directory (one per rank is made inside it).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default = "default_cache_gib")]
    pub cache_gib: f64,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_split() -> Split {
    Split::Train
}
fn default_window() -> u64 {
    radit_sharding::order::DEFAULT_WINDOW_SHARDS
}
fn default_cache_gib() -> f64 {
    64.0
}
fn default_prefetch() -> usize {
    4
}

/// A preset by name, or a whole architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelChoice {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub config: Option<RadiTConfig>,
}

impl ModelChoice {
    pub fn resolve(&self) -> Result<RadiTConfig, TrainError> {
        let cfg = match (&self.preset, &self.config) {
            (Some(p), None) => RadiTConfig::preset(p)?,
            (None, Some(c)) => c.clone(),
            _ => {
                return Err(TrainError::InvalidConfig {
                    field: "model".into(),
                    reason: "give exactly one of model.preset or [model.config]".into(),
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
    /// Checks everything that does not need the store or the world size.
    pub fn validate(&self) -> Result<RadiTConfig, TrainError> {
        let bad = |field: &str, reason: String| {
            Err(TrainError::InvalidConfig {
                field: field.into(),
                reason,
            })
        };
        let model = self.model.resolve()?;
        self.flow.validate()?;
        self.engine.validate()?;
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
        if let Some(c) = &self.checkpoint
            && (c.every == 0 || c.keep == 0)
        {
            return bad("checkpoint.every", "every and keep must be positive".into());
        }
        if let Some(p) = &self.preview {
            p.validate()?;
        }
        Ok(model)
    }

    /// Checks what depends on the world size.
    pub fn validate_for_world(&self, world: u64) -> Result<(), TrainError> {
        let per_step = world * self.train.micro_batches;
        if !self.train.global_batch.is_multiple_of(per_step) {
            return Err(TrainError::InvalidConfig {
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
}

fn to_tensors(batch: &Batch, device: Device) -> Result<(Tensor, Tensor, Tensor), TrainError> {
    let n = batch.len() as i64;
    let [c, h, w] = batch.sample_shape.map(|v| v as i64);
    let x1 = match &batch.inputs {
        Inputs::F32(v) => Tensor::from_slice(v),
        Inputs::U16(_) => {
            return Err(TrainError::InvalidConfig {
                field: "data".into(),
                reason:
                    "the loader delivered raw 16-bit pixels; the trainer needs dequantised inputs"
                        .into(),
            });
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

/// Trains from the newest checkpoint (or from scratch) to `train.steps`. `on_step` sees every logged step
/// (rank 0 prints them). Collective: every rank calls it with the same config.
/// `stop` is set (by a signal handler, on any subset of ranks) to ask for a checkpoint and an early exit; the flags
/// are combined at each step boundary so every rank stops at the same step.
pub fn train(
    cfg: &TrainConfig,
    comm: Box<dyn Collective>,
    device: Device,
    stop: &std::sync::atomic::AtomicBool,
    on_step: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    let world = comm.world() as u64;
    run(cfg, comm, device, stop, on_step).map_err(|e| {
        if is_out_of_memory(&e) {
            out_of_memory(e, cfg, world, device)
        } else {
            e
        }
    })
}

fn run(
    cfg: &TrainConfig,
    comm: Box<dyn Collective>,
    device: Device,
    stop: &std::sync::atomic::AtomicBool,
    mut on_step: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    let model_cfg = cfg.validate()?;
    let (rank, world) = (comm.rank() as u64, comm.world() as u64);
    cfg.validate_for_world(world)?;
    let span = tracing::info_span!("train", rank, world);
    let _enter = span.enter();

    let mut engine = Fsdp::new(
        &model_cfg,
        cfg.engine.clone(),
        comm,
        device,
        Initial::Seed(cfg.train.seed as i64),
    )?;
    let mut ckpt = cfg.checkpoint.clone().map(Checkpointer::open).transpose()?;
    let storage = Storage::open_existing(&cfg.data.url)?;
    let loader_cfg = LoaderConfig {
        split: cfg.data.split,
        pass: Pass::Train,
        seed: cfg.train.seed,
        window_shards: cfg.data.window_shards,
        global_batch: cfg.train.global_batch,
        rank,
        world,
        output: if model_cfg.in_channels == 1 {
            ModelInput::Dequantised
        } else {
            ModelInput::Latents
        },
        prefetch_steps: cfg.data.prefetch,
        cache: cfg.data.cache_dir.as_ref().map(|d| CacheConfig {
            dir: d.join(format!("rank-{rank}")),
            max_bytes: (cfg.data.cache_gib * (1u64 << 30) as f64) as u64,
        }),
        ..LoaderConfig::default()
    };

    let resume =
        |engine: &mut Fsdp, ckpt: &Option<Checkpointer>| -> Result<Option<RunState>, TrainError> {
            match ckpt {
                Some(c) => Ok(c.load_latest(engine, &model_cfg)?),
                None => Ok(None),
            }
        };
    let open_loader = |state: &Option<RunState>| -> Result<Loader, TrainError> {
        let start = state.as_ref().map_or(0, |s| s.step);
        let loader = Loader::open(storage.clone(), loader_cfg.clone(), start)?;
        if let Some(s) = state {
            let saved: OrderState =
                serde_json::from_value(s.loader.clone()).map_err(|e| CheckpointError::Corrupt {
                    key: format!("the run state of step {}", s.step),
                    reason: format!("its loader state: {e}"),
                })?;
            if saved.config != loader.state().config {
                return Err(TrainError::InvalidConfig {
                    field: "train".into(),
                    reason: format!(
                        "the data order changed since the checkpoint ({:?} then, {:?} now): keep seed, \
                         global_batch, window_shards and the store as they were to resume exactly",
                        saved.config,
                        loader.state().config
                    ),
                });
            }
        }
        Ok(loader)
    };

    // Fault injection for the tests: the listed (1-based) steps get a non-finite input on rank 0, once each.
    let mut inject: std::collections::BTreeSet<u64> = std::env::var("RADIT_FAULT_NONFINITE_STEPS")
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_default();
    let state = resume(&mut engine, &ckpt)?;
    let resumed_from = state.as_ref().map(|s| s.step);
    let mut step = resumed_from.unwrap_or(0);
    let mut skipped = state.as_ref().map_or(0, |s| s.skipped_steps);
    let mut loader = open_loader(&state)?;
    let (mut consecutive, mut rollbacks, mut last_checkpoint) = (0u64, 0u64, resumed_from);
    let micro = cfg.train.micro_batches as i64;
    let scale = 1.0 / (world as f64 * micro as f64);
    let mut window = (Instant::now(), 0u64, 0f64);

    // Fault injection for the tests: `RANK:STEP` makes that rank hang (sleep, heart-beating) in step STEP, or ask
    // libtorch for more memory than any machine has in step STEP (a real allocator failure).
    let hang_at = progress::fault_at("RADIT_FAULT_HANG");
    let oom_at = progress::fault_at("RADIT_FAULT_OOM");
    progress::set_step(step);
    let tokens_per_image = (model_cfg.input_size / model_cfg.patch_size).pow(2) as u64;
    let flops_per_token = model_cfg.training_flops_per_token();
    while step < cfg.train.steps {
        progress::set_phase(Phase::Data);
        let step_started = Instant::now();
        let waited = Instant::now();
        let batch = loader
            .next_batch()?
            .ok_or(TrainError::DataEnded { step: step + 1 })?;
        let data_wait = waited.elapsed().as_secs_f64();
        window.2 += data_wait;
        let mut batch = batch;
        cfg.flow.drop_conditions(
            cfg.train.seed,
            step,
            &batch.indices,
            &mut batch.labels,
            &mut batch.age,
        );
        let (x1, labels, age) = to_tensors(&batch, device)?;
        if rank == 0 && inject.remove(&(step + 1)) {
            tracing::warn!(
                step = step + 1,
                "injecting a non-finite input (RADIT_FAULT_NONFINITE_STEPS)"
            );
            let _ = x1.get(0).fill_(f64::NAN);
        }
        progress::set_phase(Phase::Compute);
        if hang_at == Some((rank, step + 1)) {
            tracing::warn!(step = step + 1, "hanging on purpose (RADIT_FAULT_HANG)");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if oom_at == Some((rank, step + 1)) {
            tracing::warn!(
                step = step + 1,
                "allocating 1 PiB on purpose (RADIT_FAULT_OOM)"
            );
            let _never =
                Tensor::f_empty([1i64 << 48], (Kind::Float, device)).map_err(EngineError::from)?;
        }
        let shape: Vec<i64> = batch.sample_shape.iter().map(|&v| v as i64).collect();
        let draw = cfg.flow.draw(cfg.train.seed, step, &batch.indices, &shape);
        let (x0, t) = (draw.x0.to_device(device), draw.t.to_device(device));
        let per = x1.size()[0] / micro;
        let mut loss_sum = 0.0;
        for k in 0..micro {
            let s = |v: &Tensor| v.narrow(0, k * per, per);
            let mb = MicroBatch {
                x1: &s(&x1),
                x0: &s(&x0),
                t: &s(&t),
                labels: &s(&labels),
                age: &s(&age),
            };
            loss_sum += engine.forward_backward(&mb, scale)?;
        }
        let lr = cfg.engine.adam.lr_at(engine.adam_steps());
        let report = engine.optimizer_step(loss_sum, lr)?;
        step += 1;
        // The largest rank's own loss of this same step (a rank far above the mean reads bad data or has a bad
        // device), recorded with the step's mean so a heartbeat never pairs two steps.
        let loss_max = engine
            .collective()
            .all_reduce_max_f64(loss_sum / micro as f64)?;
        let images = x1.size()[0] as u64;
        progress::record_step(
            step_started.elapsed().as_secs_f64(),
            data_wait,
            images,
            images * tokens_per_image,
            images as f64 * tokens_per_image as f64 * flops_per_token,
            report.loss,
            loss_max,
            report.grad_norm,
            report.lr,
            report.skipped,
        );
        progress::record_device_memory(crate::runtime::device_memory(device));
        progress::set_step(step);
        window.1 += cfg.train.global_batch;
        if report.skipped || step % cfg.train.log_every.max(1) == 0 || step == cfg.train.steps {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let log = StepLog {
                step,
                report,
                loss_max,
                images_per_second: window.1 as f64 / secs,
                tokens_per_second: (window.1 * tokens_per_image) as f64 / secs,
                data_wait_seconds: window.2,
            };
            tracing::info!(
                step,
                loss = report.loss,
                grad_norm = report.grad_norm,
                images_per_second = log.images_per_second,
                "step"
            );
            on_step(&log);
            window = (Instant::now(), 0, 0.0);
        }
        if report.skipped {
            skipped += 1;
            consecutive += 1;
            tracing::warn!(
                step,
                loss = report.loss,
                grad_norm = report.grad_norm,
                "non-finite step skipped"
            );
            if consecutive >= cfg.train.rollback_after_skips {
                let Some(c) = &mut ckpt else {
                    return Err(TrainError::Diverged {
                        step,
                        consecutive,
                        why: "there is no checkpoint to roll back to".into(),
                    });
                };
                c.finish(engine.collective())?;
                let Some(state) = c.load_latest(&mut engine, &model_cfg)? else {
                    return Err(TrainError::Diverged {
                        step,
                        consecutive,
                        why: "no checkpoint is committed yet".into(),
                    });
                };
                tracing::warn!(
                    from = step,
                    to = state.step,
                    "rolling back to the last checkpoint"
                );
                step = state.step;
                loader = open_loader(&Some(state))?;
                consecutive = 0;
                rollbacks += 1;
                continue;
            }
        } else {
            consecutive = 0;
        }
        // One tiny all-reduce combines the ranks' stop flags, so all of them stop at this same step.
        let stop_here = step < cfg.train.steps
            && engine.collective().all_reduce_f64(f64::from(u8::from(
                stop.load(std::sync::atomic::Ordering::SeqCst),
            )))? > 0.0;
        if stop_here {
            tracing::warn!(
                step,
                "stop requested: checkpointing, then exiting for a requeue"
            );
        }
        if let Some(c) = &mut ckpt {
            if stop_here || step % c.config().every == 0 || step == cfg.train.steps {
                let state = RunState {
                    step,
                    adam_steps: engine.adam_steps(),
                    skipped_steps: skipped,
                    loader: serde_json::to_value(OrderState {
                        config: loader.state().config,
                        step,
                    })
                    .unwrap_or_default(),
                    model: model_cfg.clone(),
                    config: serde_json::to_value(cfg).unwrap_or_default(),
                };
                let _phase = progress::enter(Phase::Checkpoint);
                let stall = Instant::now();
                c.save(&engine, state)?;
                progress::record_checkpoint(stall.elapsed().as_secs_f64());
            }
            if let Some(done) = c.poll(engine.collective())? {
                last_checkpoint = Some(done);
                progress::set_checkpoint(done);
            }
        }
        if let Some(p) = &cfg.preview
            && (step % p.every == 0 || step == cfg.train.steps)
        {
            let _phase = progress::enter(Phase::Sampling);
            let started = Instant::now();
            if let Some(path) = preview::write_sheet(&engine, &model_cfg, p, cfg.flow.shift, step)?
            {
                tracing::info!(step, path = %path.display(), seconds = started.elapsed().as_secs_f64(), "preview sheet");
            }
        }
        if stop_here {
            break;
        }
    }
    if let Some(c) = &mut ckpt
        && let Some(done) = c.finish(engine.collective())?
    {
        last_checkpoint = Some(done);
        progress::set_checkpoint(done);
    }
    let stopped_for_requeue = step < cfg.train.steps;
    if stopped_for_requeue && ckpt.is_none() {
        tracing::warn!(
            step,
            "stopped without a [checkpoint] section: the next job starts from scratch"
        );
    }
    Ok(TrainSummary {
        stopped_for_requeue,
        resumed_from,
        final_step: step,
        skipped_steps: skipped,
        rollbacks,
        last_checkpoint,
    })
}
