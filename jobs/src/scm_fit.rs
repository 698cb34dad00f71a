//! `radit scm train`: teacher-forced joint training of the 19 flows on a store's training profiles (its labels and
//! age; no image is read), on one process or data-parallel across ranks (each rank takes its slice of the global
//! batch; gradients are averaged with one all-reduce per step), AdamW and an EMA of the weights. The batch, the
//! noise and the times of step s are drawn from (seed, s) for the global batch, so a run on any world size takes
//! the same steps. A checkpoint (weights, EMA, Adam moments, step) is written whole every `checkpoint_every` steps
//! and at the end; a restarted run resumes from it. The result is the EMA weights with the graph in the metadata.
//!
//! Why not the engine's optimiser and checkpointer: the SCM is a few million parameters without a block stack,
//! replicated on every rank, so FSDP's sharded groups and per-rank checkpoint objects would only add gathers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_protocol::{ConfigError, Phase};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::journal::{RankError, RankHandles, io_error};
use radit_engine::collective::Collective;
use radit_models::flow::fill_normal;
use radit_models::model::ModelError;
use radit_models::scm::graph::Graph;
use radit_models::scm::model::{Profiles, Scm, ScmConfig};

/// The `[scm]` section of a training run (and `radit scm train`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScmTrainConfig {
    /// The store whose profiles to learn (its labels and age).
    pub store: String,
    #[serde(default = "default_split")]
    pub split: Split,
    /// A graph file; the paper's graph by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<PathBuf>,
    #[serde(default = "default_model")]
    pub model: ScmConfig,
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Profiles per step (global: divisible by the world size).
    #[serde(default = "default_batch")]
    pub batch: u64,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_ema")]
    pub ema: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// The trained model (EMA weights, graph, config, vocabulary).
    pub out: PathBuf,
    /// Where the checkpoint goes (a directory); none: `<out>.ckpt` beside the model ([`Self::checkpoints`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
}

fn default_split() -> Split {
    Split::Train
}
fn default_model() -> ScmConfig {
    ScmConfig::preset("paper").expect("a preset")
}
fn default_steps() -> u64 {
    50_000
}
fn default_batch() -> u64 {
    4096
}
fn default_lr() -> f64 {
    1e-3
}
fn default_ema() -> f64 {
    0.999
}
fn default_log_every() -> u64 {
    100
}
fn default_checkpoint_every() -> u64 {
    1000
}

impl ScmTrainConfig {
    pub fn new(store: &str, out: &Path) -> Self {
        Self {
            store: store.into(),
            split: default_split(),
            graph: None,
            model: default_model(),
            steps: default_steps(),
            batch: default_batch(),
            lr: default_lr(),
            weight_decay: 0.0,
            ema: default_ema(),
            seed: 0,
            log_every: default_log_every(),
            out: out.to_path_buf(),
            checkpoint_dir: None,
            checkpoint_every: default_checkpoint_every(),
        }
    }

    /// About the floating-point operations of one rank's step among `world`: 6 per parameter per profile, with
    /// each variable's network counted with three parents' embeddings as input (what sizes its threads).
    pub fn flops_per_step(&self, world: usize) -> f64 {
        let m = &self.model;
        let (d, w) = (m.embed_dim as f64, m.width as f64);
        let per_network = 2.0 * m.blocks as f64 * w * w + (3.0 * d + m.fourier as f64) * w;
        let variables = 19.0;
        6.0 * variables * per_network * (self.batch as f64 / world.max(1) as f64)
    }

    /// Where checkpoints go: `checkpoint_dir`, else `<out>.ckpt` beside the model. Training always checkpoints,
    /// so a stop (a signal, a requeue) never loses the run and a rerun resumes.
    pub fn checkpoints(&self) -> PathBuf {
        self.checkpoint_dir.clone().unwrap_or_else(|| {
            let mut name = self.out.file_stem().unwrap_or_default().to_os_string();
            name.push(".ckpt");
            self.out.with_file_name(name)
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| Err(ConfigError::new(field, reason));
        self.model.validate()?;
        for (field, value) in [
            ("scm.steps", self.steps),
            ("scm.batch", self.batch),
            ("scm.log_every", self.log_every),
            ("scm.checkpoint_every", self.checkpoint_every),
        ] {
            if value == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("scm.lr", format!("{} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return bad("scm.ema", format!("{} must be in [0, 1)", self.ema));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(
                "scm.weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        Ok(())
    }

    pub fn load(file: &Path) -> Result<Self, RankError> {
        crate::journal::load_section(file, "scm", Self::validate)
    }

    fn graph(&self) -> Result<Graph, ModelError> {
        match &self.graph {
            Some(path) => Graph::load(path),
            None => Ok(Graph::default_graph()),
        }
    }
}

/// A split's profiles: `labels` `[N, 18]` (u8) and `age` `[N]`, read from the store's small arrays.
pub fn read_profiles(store: &str, split: Split) -> Result<(Vec<u8>, Vec<f32>), ShardError> {
    let reader = StoreReader::open(Storage::open_existing(store)?)?;
    let (mut labels, mut age) = (Vec::new(), Vec::new());
    for k in 0..reader.shards(split) {
        let shard = reader.read_metadata_of(split, k)?;
        labels.extend(shard.labels);
        age.extend(shard.age);
    }
    Ok((labels, age))
}

const BATCH_STREAM: u64 = 0xba7c;
const NOISE_STREAM: u64 = 0x5c4;
const TIME_STREAM: u64 = 0x71f;

/// What the training loop keeps besides the model: Adam's moments, the EMA, the step.
struct State {
    step: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    ema: BTreeMap<String, Tensor>,
}

/// What one rank did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScmTrainSummary {
    pub rank: usize,
    pub profiles: u64,
    pub resumed_from: Option<u64>,
    pub final_step: u64,
    pub final_loss: f64,
    pub stopped_for_requeue: bool,
    pub seconds: f64,
}

/// One logged step.
#[derive(Debug, Clone, Serialize)]
pub struct ScmStepLog {
    pub step: u64,
    pub loss: f64,
    /// Each variable's term, by name.
    pub terms: BTreeMap<String, f64>,
    pub profiles_per_second: f64,
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("scm-checkpoint.safetensors")
}

/// Trains (or resumes) to `cfg.steps`; `on_log` sees every logged step (rank 0 prints them). Collective.
pub fn train(
    cfg: &ScmTrainConfig,
    comm: &dyn Collective,
    device: Device,
    handles: &RankHandles,
    mut on_log: impl FnMut(&ScmStepLog),
) -> Result<ScmTrainSummary, RankError> {
    cfg.validate().map_err(RankError::Config)?;
    let (rank, world) = (comm.rank(), comm.world());
    let started = Instant::now();
    let progress = &handles.progress;
    progress.set_phase(Phase::Starting);
    if !cfg.batch.is_multiple_of(world as u64) {
        return Err(RankError::Config(ConfigError::new(
            "scm.batch",
            format!("{} must be divisible by the world size {world}", cfg.batch),
        )));
    }
    let graph = cfg.graph()?;
    let (labels, age) = read_profiles(&cfg.store, cfg.split)?;
    let n = age.len() as u64;
    if n == 0 {
        return Err(RankError::unusable(
            &cfg.store,
            format!("the {} split has no profiles", cfg.split.name()),
        ));
    }
    let columns = (labels.len() as u64 / n) as i64;
    let all_labels = Tensor::from_slice(&labels)
        .view([n as i64, columns])
        .to_kind(Kind::Int64);
    let all_age = Tensor::from_slice(&age);
    let vs = nn::VarStore::new(device);
    tch::manual_seed(cfg.seed as i64);
    let scm = Scm::new(&vs.root(), &cfg.model, &graph)?;
    let trainable: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let mut state = State {
        step: 0,
        m: zeros_like(&trainable),
        v: zeros_like(&trainable),
        ema: vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect(),
    };
    let mut resumed_from = None;
    let dir = cfg.checkpoints();
    if checkpoint_path(&dir).exists() {
        let step = resume(&checkpoint_path(&dir), &vs, &mut state)?;
        resumed_from = Some(step);
        tracing::info!(rank, step, "resuming the SCM from its checkpoint");
    }
    progress.set_step(state.step);
    let per_rank = (cfg.batch / world as u64) as usize;
    let variables = graph.variables.len();
    let mut summary = ScmTrainSummary {
        rank,
        profiles: n,
        resumed_from,
        ..ScmTrainSummary::default()
    };
    let mut window = (Instant::now(), 0u64);
    while state.step < cfg.steps {
        if crate::journal::stop_here(handles)? {
            summary.stopped_for_requeue = true;
            break;
        }
        let step_start = Instant::now();
        let s = state.step;
        // This rank's slice of the global batch: rows drawn with replacement from (seed, step).
        let positions: Vec<u64> = (rank * per_rank..(rank + 1) * per_rank)
            .map(|p| p as u64)
            .collect();
        let rows: Vec<i64> = positions
            .iter()
            .map(|&p| {
                let mut r =
                    radit_sharding::rng::SplitMix64::stream(&[cfg.seed, s, p, BATCH_STREAM]);
                (r.next_u64() % n) as i64
            })
            .collect();
        let index = Tensor::from_slice(&rows);
        let profiles = Profiles {
            labels: all_labels.index_select(0, &index).to_device(device),
            age: all_age.index_select(0, &index).to_device(device),
        };
        let noise: Vec<Tensor> = (0..variables)
            .map(|i| {
                let dim = scm.dim(i) as usize;
                let mut data = vec![0f32; dim * per_rank];
                for (chunk, &p) in data.chunks_mut(dim).zip(&positions) {
                    fill_normal(&[cfg.seed, s, p, i as u64, NOISE_STREAM], chunk);
                }
                Tensor::from_slice(&data)
                    .view([per_rank as i64, dim as i64])
                    .to_device(device)
            })
            .collect();
        let times: Vec<f32> = positions
            .iter()
            .flat_map(|&p| {
                (0..variables).map(move |i| {
                    let mut r = radit_sharding::rng::SplitMix64::stream(&[
                        cfg.seed,
                        s,
                        p,
                        i as u64,
                        TIME_STREAM,
                    ]);
                    ((r.next_u64() >> 40) as f64 / (1u64 << 24) as f64) as f32
                })
            })
            .collect();
        let t = Tensor::from_slice(&times)
            .view([per_rank as i64, variables as i64])
            .to_device(device);
        let (loss, terms) = {
            let _g = progress.enter(Phase::Compute);
            let (loss, terms) = scm.loss(&profiles, &noise, &t);
            for p in trainable.values() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            loss.backward();
            (loss, terms)
        };
        if world > 1 {
            // One all-reduce of every gradient, flattened, then the mean back into each.
            let _g = progress.enter(Phase::Collective);
            let grads: Vec<Tensor> = trainable
                .values()
                .map(Tensor::grad)
                .filter(Tensor::defined)
                .collect();
            let mut flat = Tensor::cat(
                &grads.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(),
                0,
            );
            comm.all_reduce_sum(&mut flat)?;
            let mut offset = 0;
            for mut g in grads {
                let n = g.numel() as i64;
                g.copy_(&(flat.narrow(0, offset, n).view_as(&g) / world as f64));
                offset += n;
            }
        }
        let loss = comm.all_reduce_f64(loss.double_value(&[]))? / world as f64;
        let mut term_values = BTreeMap::new();
        for (i, term) in terms.iter().enumerate() {
            let v = comm.all_reduce_f64(term.double_value(&[]))? / world as f64;
            term_values.insert(graph.variables[i].name.clone(), v);
        }
        adamw(cfg, &trainable, &mut state);
        state.step += 1;
        summary.final_loss = loss;
        window.1 += cfg.batch;
        crate::journal::record_unit(
            progress,
            device,
            (state.step, step_start.elapsed().as_secs_f64(), 0.0),
            crate::journal::UnitWork {
                images: cfg.batch / world as u64,
                ..Default::default()
            },
        );
        progress.record_loss(loss);
        if state.step.is_multiple_of(cfg.log_every) || state.step == cfg.steps {
            let log = ScmStepLog {
                step: state.step,
                loss,
                terms: term_values,
                profiles_per_second: window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9),
            };
            tracing::info!(step = state.step, loss, "scm step");
            on_log(&log);
            window = (Instant::now(), 0);
        }
        if (state.step.is_multiple_of(cfg.checkpoint_every) || state.step == cfg.steps) && rank == 0
        {
            let _g = progress.enter(Phase::Checkpoint);
            save_checkpoint(&dir, &vs, &state, cfg, &graph)?;
        }
    }
    // A stop anywhere: every rank checkpoints at the same step (rank 0 writes) and leaves.
    let stopped =
        crate::journal::end_of_range(comm, progress, summary.stopped_for_requeue, cfg.steps)?;
    if stopped {
        summary.stopped_for_requeue = true;
        if rank == 0 {
            save_checkpoint(&dir, &vs, &state, cfg, &graph)?;
        }
    } else if rank == 0 {
        if let Some(parent) = cfg.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        radit_models::scm::save(&state.ema, &cfg.model, &graph, &cfg.out)?;
    }
    summary.final_step = state.step;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn zeros_like(vars: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    vars.iter()
        .map(|(k, t)| (k.clone(), t.zeros_like()))
        .collect()
}

/// One AdamW step (decoupled weight decay, bias-corrected) and the EMA update.
fn adamw(cfg: &ScmTrainConfig, trainable: &BTreeMap<String, Tensor>, state: &mut State) {
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let k = (state.step + 1) as i32;
    let (c1, c2) = (1.0 - f64::powi(b1, k), 1.0 - f64::powi(b2, k));
    tch::no_grad(|| {
        for (name, p) in trainable {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            // Shallow clones share the storage: the updates are in place.
            let (mut p, mut m, mut v, mut e) = (
                p.shallow_clone(),
                state.m[name].shallow_clone(),
                state.v[name].shallow_clone(),
                state.ema[name].shallow_clone(),
            );
            m.copy_(&(&m * b1 + &g * (1.0 - b1)));
            v.copy_(&(&v * b2 + g.square() * (1.0 - b2)));
            let update = (&m / c1) / ((&v / c2).sqrt() + eps) + &p * cfg.weight_decay;
            p.copy_(&(&p - update * cfg.lr));
            e.copy_(&(&e * cfg.ema + &p * (1.0 - cfg.ema)));
        }
    });
}

fn save_checkpoint(
    dir: &Path,
    vs: &nn::VarStore,
    state: &State,
    cfg: &ScmTrainConfig,
    graph: &Graph,
) -> Result<(), RankError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut named = BTreeMap::new();
    for (k, t) in vs.variables() {
        named.insert(format!("param.{k}"), t);
    }
    for (prefix, map) in [
        ("ema", &state.ema),
        ("adam_m", &state.m),
        ("adam_v", &state.v),
    ] {
        for (k, t) in map {
            named.insert(format!("{prefix}.{k}"), t.shallow_clone());
        }
    }
    let step = state.step.to_string();
    let config = serde_json::to_string(cfg).unwrap_or_default();
    let graph_text = serde_json::to_string(&graph.source).unwrap_or_default();
    radit_models::model::write_safetensors(
        &named,
        &[
            ("radit.scm.step", &step),
            ("radit.scm.train", &config),
            ("radit.scm.graph", &graph_text),
        ],
        &checkpoint_path(dir),
    )?;
    Ok(())
}

/// Loads a checkpoint into the weights and state; returns its step. A checkpoint of another model (other names or
/// shapes) is refused by the strict load, naming the file.
fn resume(path: &Path, vs: &nn::VarStore, state: &mut State) -> Result<u64, RankError> {
    let file = radit_models::model::read_weights(path)?;
    let metadata = radit_models::model::read_metadata(path)?;
    let step: u64 = metadata
        .get("radit.scm.step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            RankError::unusable(path.display(), "not an SCM checkpoint (no radit.scm.step)")
        })?;
    let part = |prefix: &str| -> BTreeMap<String, Tensor> {
        file.tensors
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.shallow_clone())))
            .collect()
    };
    radit_models::model::load_named(vs, &part("param."), path)?;
    let device = vs.device();
    for (prefix, map) in [
        ("ema.", &mut state.ema),
        ("adam_m.", &mut state.m),
        ("adam_v.", &mut state.v),
    ] {
        let saved = part(prefix);
        for (k, t) in map.iter_mut() {
            let s = saved.get(k).ok_or_else(|| {
                RankError::unusable(
                    path.display(),
                    format!("lacks {prefix}{k}: a checkpoint of another model"),
                )
            })?;
            if s.size() != t.size() {
                return Err(RankError::unusable(
                    path.display(),
                    format!("{prefix}{k} has another shape"),
                ));
            }
            let mut t = t.shallow_clone();
            tch::no_grad(|| t.copy_(&s.to_device(device)));
        }
    }
    state.step = step;
    Ok(step)
}
