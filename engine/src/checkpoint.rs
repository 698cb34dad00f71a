//! Checkpoints on any object-store URL: every rank writes its slices (fp32 master weights, Adam m and v, EMA) as one
//! object, rank 0 writes the run state, and a manifest with every object's sha256 is written last: a checkpoint
//! without its manifest does not exist. Writing happens on a background thread, so training stalls only for the
//! device-to-host copy; the commit (checksums gathered, manifest written, old checkpoints pruned) happens at a later
//! step boundary, collectively. Loading verifies checksums (hashing each object as it is read) before it touches
//! the engine, falls back to the previous checkpoint when one is torn, refuses a checkpoint of another model, and
//! re-shards when the world size changed; a CPU engine is then written in place.
//!
//! Layout under the URL: `step-{step:010}/rank-{r:05}.bin`, `step-{step:010}/state.json`,
//! `step-{step:010}/manifest.json`. A rank object is, for each group in order, its master, m, v and EMA slices as
//! little-endian f32.

use std::thread::JoinHandle;

use bytes::Bytes;
use radit_sharding::store::Storage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::collective::Collective;
use crate::fsdp::{EngineError, GroupLayout, ShardState};
use crate::progress::{Committed, Progress};
use crate::training::TrainingEngine;
use radit_models::network::Architecture;

/// What can go wrong saving or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("checkpoint storage")]
    Storage(#[from] radit_sharding::store::StorageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// The checkpoint belongs to another model: resuming from it would be wrong, not just slow.
    #[error(
        "checkpoint {key} was written for another model ({reason}); use a new checkpoint URL or the same model"
    )]
    Mismatch { key: String, reason: String },
    /// What a committed checkpoint holds is not what its manifest or run state says (torn, truncated, edited):
    /// resuming skips it for the previous one.
    #[error("checkpoint {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the checkpoint writer thread failed: {0}")]
    Writer(String),
    /// A checkpoint could not be written (a full disk, a refused write): what this save wrote is removed, and
    /// the last good checkpoint stays the one a restart resumes from.
    #[error(
        "checkpoint {step} could not be written to {url}: {reason}; {}",
        match last_good {
            Some(s) => format!("the last good checkpoint is step {s}, which a rerun resumes from"),
            None => "there is no earlier checkpoint".to_string(),
        }
    )]
    WriteFailed {
        step: u64,
        url: String,
        reason: String,
        last_good: Option<u64>,
    },
    /// There is no committed checkpoint to read.
    #[error("{url} holds no usable committed checkpoint")]
    Empty { url: String },
    #[error(transparent)]
    Model(#[from] radit_models::model::ModelError),
}

/// Bytes of each rank's note in [`gather_notes`].
const NOTE: usize = 512;

/// Every rank's note about its part of a checkpoint, as every rank learns them from one all-gather of a fixed-size
/// note per rank: its manifest entry (JSON), or why it could not write its part (a reason is cut to fit; an entry
/// that does not fit is a failure). Collective.
fn gather_notes(
    comm: &dyn Collective,
    own: Result<Vec<u8>, String>,
) -> Result<Vec<Result<Vec<u8>, String>>, CheckpointError> {
    let own = own.and_then(|entry| {
        if entry.len() < NOTE {
            Ok(entry)
        } else {
            Err("checkpoint key too long".into())
        }
    });
    let mut note = vec![b' '; NOTE];
    match &own {
        Ok(entry) => {
            note[0] = b'+';
            note[1..=entry.len()].copy_from_slice(entry);
        }
        Err(why) => {
            note[0] = b'!';
            let mut end = why.len().min(NOTE - 1);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            note[1..=end].copy_from_slice(&why.as_bytes()[..end]);
        }
    }
    let mut all = Tensor::zeros(
        [(NOTE * comm.world()) as i64],
        (Kind::Uint8, tch::Device::Cpu),
    );
    comm.all_gather(&Tensor::from_slice(&note), &mut all)?;
    let bytes = Vec::<u8>::try_from(&all).map_err(EngineError::from)?;
    Ok(bytes
        .chunks(NOTE)
        .map(|c| {
            let text = c[1..].trim_ascii_end();
            match c[0] {
                b'+' => Ok(text.to_vec()),
                _ => Err(String::from_utf8_lossy(text).into_owned()),
            }
        })
        .collect())
}

/// The newest usable checkpoint under `url`, loaded in this process alone: its model config, step and named
/// weights (the EMA, or the raw weights when `ema` is false), with PyTorch's parameter names.
pub fn read_weights(
    url: &str,
    ema: bool,
) -> Result<
    (
        Architecture,
        u64,
        std::collections::BTreeMap<String, Tensor>,
    ),
    CheckpointError,
> {
    let ckpt = Checkpointer::open(CheckpointConfig {
        url: url.into(),
        every: 1,
        keep: usize::MAX,
    })?;
    let empty = || CheckpointError::Empty { url: url.into() };
    let step = *ckpt.committed_steps()?.first().ok_or_else(empty)?;
    let model = ckpt.model_config(step)?;
    let comm = Box::new(
        crate::collective::local::LocalGroup::ranks(1, std::time::Duration::from_secs(60))
            .remove(0),
    );
    // The data-parallel engine reads any network's checkpoint (a RadiT's groups are the sharded engine's).
    let mut engine = crate::data_parallel::DataParallel::new(
        |p| model.build_staged(p),
        crate::fsdp::EngineConfig {
            mode: crate::fsdp::ShardingMode::Ddp,
            ..Default::default()
        },
        comm,
        tch::Device::Cpu,
        crate::fsdp::Initial::Seed(0),
    )?;
    let state = ckpt.load_latest(&mut engine, &model)?.ok_or_else(empty)?;
    Ok((model, state.step, engine.gather_named(ema)?))
}

/// Where and how often to checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory URL (a path, file:// or s3://).
    pub url: String,
    /// Save every this many steps (and at the end).
    #[serde(default = "default_every")]
    pub every: u64,
    /// Committed checkpoints kept; older ones are deleted after a new one commits.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_every() -> u64 {
    1000
}

fn default_keep() -> usize {
    3
}

/// The run state saved with the weights: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The next step to run.
    pub step: u64,
    pub adam_steps: u64,
    pub skipped_steps: u64,
    /// The loader's resume state (radit_sharding::order::OrderState), kept as JSON.
    pub loader: serde_json::Value,
    pub model: Architecture,
    /// Free-form: the training config as the run saw it.
    pub config: serde_json::Value,
}

impl RunState {
    /// The state of engine steps run on synthetic inputs (benchmarks, checks): no loader, no train config.
    pub fn synthetic(step: u64, adam_steps: u64, model: &Architecture) -> Self {
        Self {
            step,
            adam_steps,
            skipped_steps: 0,
            loader: serde_json::Value::Null,
            model: model.clone(),
            config: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    key: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: String,
    step: u64,
    world: u64,
    model_hash: String,
    groups: Vec<GroupLayout>,
    ranks: Vec<FileEntry>,
    state: FileEntry,
}

const FORMAT: &str = "radit-checkpoint-1";

/// The directory of step `step`'s checkpoint under the checkpoint URL.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

/// sha256 of the model config: what must match for a checkpoint to be usable.
pub fn model_hash(cfg: &Architecture) -> String {
    let text = serde_json::to_string(cfg).unwrap_or_default();
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Serialises this rank's slices: per group, master, m, v, ema, as little-endian f32 (the host's layout: radit
/// builds only for little-endian targets, x86_64 and aarch64).
/// `spare` is the previous save's buffer: reused when the size matches, so saves after the first copy into memory
/// that is already mapped (a fresh mapping's page faults cost more than the copy itself).
fn encode(states: &[ShardState], spare: Option<Vec<u8>>) -> Result<Vec<u8>, tch::TchError> {
    const _: () = assert!(
        cfg!(target_endian = "little"),
        "checkpoints are written in host byte order"
    );
    let arrays: Vec<Tensor> = states
        .iter()
        .flat_map(|s| [&s.master, &s.m, &s.v, &s.ema])
        .map(|t| t.to_kind(Kind::Float).contiguous())
        .collect();
    let total: usize = arrays.iter().map(|t| t.numel() * 4).sum();
    let mut out = match spare {
        Some(buffer) if buffer.len() == total => buffer,
        // calloc'd: the pages are mapped as they are written, with no zeroing pass.
        _ => vec![0u8; total],
    };
    let mut host = Vec::new();
    let mut rest = out.as_mut_slice();
    for t in &arrays {
        let n = t.numel();
        let (dst, tail) = rest.split_at_mut(4 * n);
        rest = tail;
        if t.device() == tch::Device::Cpu {
            host.push((t.data_ptr() as usize, dst));
        } else {
            t.f_copy_data_u8(dst, n)?;
        }
    }
    // Host tensors are copied in 8 MiB pieces on every core: this copy is the whole of a checkpoint's stall.
    const PIECE: usize = 8 << 20;
    host.into_par_iter()
        .flat_map(|(src, dst)| {
            dst.par_chunks_mut(PIECE)
                .enumerate()
                .map(move |(i, d)| (src + i * PIECE, d))
        })
        .for_each(|(src, d)| {
            // SAFETY: `src` points into a contiguous CPU f32 tensor of `arrays` (alive for this call) with at
            // least `d.len()` bytes left from it: `d` is the same piece of that tensor's bytes in `out`.
            let from = unsafe { std::slice::from_raw_parts(src as *const u8, d.len()) };
            d.copy_from_slice(from);
        });
    Ok(out)
}

/// The step of a checkpoint object's key (`.../step-0000000040/rank-00001.bin`).
fn step_of(key: &str) -> Option<u64> {
    key.rsplit('/').nth(1)?.strip_prefix("step-")?.parse().ok()
}

/// The committed steps among a checkpoint store's keys (those with a manifest), newest first.
fn committed_in(keys: &[String]) -> Vec<u64> {
    let mut steps: Vec<u64> = keys
        .iter()
        .filter(|k| k.ends_with("/manifest.json"))
        .filter_map(|k| step_of(k))
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps
}

/// What a checkpoint writer thread hands back: this rank's object, the seconds its write took, and the host buffer
/// for the next save.
type Written = Result<(FileEntry, f64, Option<Vec<u8>>), String>;

/// A save in flight: the object is being written by a thread; commit gathers the checksums.
struct Pending {
    step: u64,
    state: RunState,
    groups: Vec<GroupLayout>,
    writer: JoinHandle<Written>,
    started: std::time::Instant,
}

/// Saves and loads checkpoints for one rank.
pub struct Checkpointer {
    storage: Storage,
    cfg: CheckpointConfig,
    pending: Option<Pending>,
    /// Where commits are reported (the rank's heartbeat reads it).
    progress: Option<Progress>,
    /// The last save's host buffer, kept for the next one.
    spare: Option<Vec<u8>>,
    /// Fault injection: the step whose checkpoint this rank abandons half-written, dying.
    crash_mid_write_at: Option<u64>,
}

impl Checkpointer {
    pub fn open(cfg: CheckpointConfig) -> Result<Self, CheckpointError> {
        let storage = Storage::open(&cfg.url)?;
        Ok(Self {
            storage,
            cfg,
            pending: None,
            progress: None,
            spare: None,
            crash_mid_write_at: None,
        })
    }

    /// Reports each commit (this rank's bytes and seconds, the committed step) to `progress`.
    pub fn reporting_to(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Fault injection (the end-to-end tests' plan): dies half-way through writing the checkpoint of `step`.
    pub fn crashing_mid_write_at(mut self, step: Option<u64>) -> Self {
        self.crash_mid_write_at = step;
        self
    }

    pub fn config(&self) -> &CheckpointConfig {
        &self.cfg
    }

    /// Starts saving: encodes this rank's slices into one host buffer now (the only copy training waits for; the
    /// buffer is kept for the next save), and hashes and writes it on a background thread. Finishes any earlier
    /// save first. Collective (through the earlier save's commit).
    pub fn save(
        &mut self,
        engine: &dyn TrainingEngine,
        state: RunState,
    ) -> Result<(), CheckpointError> {
        self.finish(engine.collective())?;
        let data = Bytes::from(
            encode(&engine.shard_views(), self.spare.take())
                .map_err(|e| CheckpointError::Writer(e.to_string()))?,
        );
        let rank = engine.collective().rank();
        let key = format!("{}/rank-{rank:05}.bin", step_dir(state.step));
        let storage = self.storage.clone();
        let state_step = state.step;
        let crash_here = self.crash_mid_write_at == Some(state_step);
        let started = std::time::Instant::now();
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                let write_started = std::time::Instant::now();
                let bytes = data.len() as u64;
                // Hash while the object is written: the two together take as long as the slower one.
                let for_hash = data.clone();
                let hasher = std::thread::spawn(move || {
                    let started = std::time::Instant::now();
                    let digest = hex::encode(Sha256::digest(&for_hash));
                    (digest, started.elapsed().as_secs_f64())
                });
                if crash_here {
                    // Fault injection: leave half an object behind and die mid-write.
                    let _ = storage.put(&key, data.slice(..data.len() / 2));
                    tracing::error!(
                        step = state_step,
                        "crashing mid-checkpoint (RADIT_FAULT_CRASH_IN_CHECKPOINT)"
                    );
                    std::process::abort();
                }
                let put_started = std::time::Instant::now();
                storage
                    .put_durable(&key, &data)
                    .map_err(|e| format!("{e:#}"))?;
                let put_seconds = put_started.elapsed().as_secs_f64();
                let (sha256, hash_seconds) = hasher
                    .join()
                    .map_err(|_| "the checksum thread panicked".to_string())?;
                tracing::debug!(
                    step = state_step,
                    bytes,
                    put_seconds,
                    hash_seconds,
                    "checkpoint object written"
                );
                Ok((
                    FileEntry { key, bytes, sha256 },
                    write_started.elapsed().as_secs_f64(),
                    data.try_into_mut().ok().map(Vec::from),
                ))
            })
            .map_err(|e| CheckpointError::Writer(e.to_string()))?;
        let groups = engine.layouts().into_iter().cloned().collect();
        self.pending = Some(Pending {
            step: state.step,
            state,
            groups,
            writer,
            started,
        });
        Ok(())
    }

    /// Whether a save is still being written here.
    pub fn busy(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| !p.writer.is_finished())
    }

    /// Commits the pending save if every rank has finished writing (collective; cheap when nothing is pending on any
    /// rank). Returns the committed step.
    pub fn poll(&mut self, comm: &dyn Collective) -> Result<Option<u64>, CheckpointError> {
        let pending_here = self.pending.is_some() as i64 as f64;
        let busy_here = self.busy() as i64 as f64;
        let pending = comm.all_reduce_f64(pending_here)?;
        if pending == 0.0 || comm.all_reduce_f64(busy_here)? > 0.0 {
            return Ok(None);
        }
        self.commit(comm)
    }

    /// Waits for the pending save (if any) and commits it. Collective.
    pub fn finish(&mut self, comm: &dyn Collective) -> Result<Option<u64>, CheckpointError> {
        let pending = comm.all_reduce_f64(self.pending.is_some() as i64 as f64)?;
        if pending == 0.0 {
            return Ok(None);
        }
        self.commit(comm)
    }

    fn commit(&mut self, comm: &dyn Collective) -> Result<Option<u64>, CheckpointError> {
        let Some(p) = self.pending.take() else {
            return Err(CheckpointError::Writer(
                "ranks disagree about a pending checkpoint".into(),
            ));
        };
        let Pending {
            step,
            state,
            groups,
            writer,
            started,
        } = p;
        let written = writer
            .join()
            .unwrap_or_else(|_| Err("the writer thread panicked".into()));
        let rank = comm.rank();
        // Every rank learns every part's entry, or why a part failed, before anyone writes the manifest.
        let own = match &written {
            Ok((entry, _, _)) => serde_json::to_vec(entry).map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let notes = gather_notes(comm, own)?;
        let failed = notes
            .iter()
            .enumerate()
            .find_map(|(r, n)| n.as_ref().err().map(|why| (r, why.clone())));
        let (entry, write_seconds) = match (written, failed) {
            (Ok((entry, seconds, spare)), None) => {
                self.spare = spare;
                (entry, seconds)
            }
            (Err(e), _) => return Err(self.abandon(step, rank, e)),
            (Ok(_), Some((r, why))) => {
                return Err(self.abandon(
                    step,
                    rank,
                    format!("rank {r} could not write its part: {why}"),
                ));
            }
        };
        // Rank 0 writes the manifest; every rank learns whether it did (the all-reduce is the barrier), so a full
        // disk fails this checkpoint on every rank alike instead of leaving the others waiting.
        let manifest = if comm.rank() == 0 {
            notes
                .iter()
                .map(|n| {
                    let entry = n
                        .as_deref()
                        .map_err(|why| CheckpointError::Writer(why.clone()))?;
                    serde_json::from_slice::<FileEntry>(entry)
                        .map_err(|e| CheckpointError::Writer(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|ranks| {
                    self.write_manifest(step, &state, groups, ranks, comm.world() as u64)
                })
        } else {
            Ok(())
        };
        if comm.all_reduce_f64(manifest.is_err() as i64 as f64)? > 0.0 {
            let reason = match manifest {
                Err(e) => format!("{e:#}"),
                Ok(()) => "rank 0 could not write the manifest".into(),
            };
            return Err(self.abandon(step, rank, reason));
        }
        if comm.rank() == 0
            && let Err(e) = self.prune()
        {
            tracing::warn!(error = %format!("{e:#}"), "could not prune old checkpoints");
        }
        if let Some(p) = &self.progress {
            p.record_committed(&Committed {
                step,
                bytes: entry.bytes,
                write_seconds,
                save_seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(Some(step))
    }

    fn write_manifest(
        &self,
        step: u64,
        run_state: &RunState,
        groups: Vec<GroupLayout>,
        ranks: Vec<FileEntry>,
        world: u64,
    ) -> Result<(), CheckpointError> {
        let dir = step_dir(step);
        let state = serde_json::to_vec_pretty(run_state)
            .map_err(|e| CheckpointError::Writer(e.to_string()))?;
        let state_entry = FileEntry {
            key: format!("{dir}/state.json"),
            bytes: state.len() as u64,
            sha256: hex::encode(Sha256::digest(&state)),
        };
        self.storage
            .put_durable(&state_entry.key, &Bytes::from(state))?;
        let manifest = Manifest {
            format: FORMAT.into(),
            step,
            world,
            model_hash: model_hash(&run_state.model),
            groups,
            ranks,
            state: state_entry,
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CheckpointError::Writer(e.to_string()))?;
        // Durable last: a manifest on disk means every object it names is on disk too.
        self.storage
            .put_durable(&format!("{dir}/manifest.json"), &Bytes::from(text))?;
        tracing::info!(step, url = self.storage.url(), "checkpoint committed");
        Ok(())
    }

    /// Removes what this rank wrote for a checkpoint that failed (its object; on rank 0 also the run state and a
    /// manifest that may have landed before the failure was known), so nothing half-written stays beside the good
    /// checkpoints, and says which one is the last good.
    fn abandon(&self, step: u64, rank: usize, reason: String) -> CheckpointError {
        let dir = step_dir(step);
        // Every rank knows the checkpoint failed: rank 0 removes the step's directory (the manifest first, so a
        // half-removed step is never a checkpoint), the others their own objects.
        let removed = if rank == 0 {
            self.storage
                .delete(&format!("{dir}/manifest.json"))
                .and_then(|()| self.storage.delete_prefix(&dir))
        } else {
            self.storage.delete(&format!("{dir}/rank-{rank:05}.bin"))
        };
        if let Err(e) = removed {
            tracing::warn!(step, error = %format!("{e:#}"), "could not remove part of a failed checkpoint");
        }
        let last_good = self
            .committed_steps()
            .ok()
            .and_then(|steps| steps.into_iter().find(|&s| s != step));
        tracing::error!(step, reason, ?last_good, "checkpoint failed");
        CheckpointError::WriteFailed {
            step,
            url: self.storage.url().to_string(),
            reason,
            last_good,
        }
    }

    /// Committed checkpoints, newest first.
    pub fn committed_steps(&self) -> Result<Vec<u64>, CheckpointError> {
        Ok(committed_in(&self.storage.list("")?))
    }

    /// The model config a committed checkpoint was written for.
    pub fn model_config(&self, step: u64) -> Result<Architecture, CheckpointError> {
        let key = format!("{}/state.json", step_dir(step));
        let state: RunState = serde_json::from_slice(&self.storage.get(&key)?).map_err(|e| {
            CheckpointError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(state.model)
    }

    /// Keeps the newest `keep` committed checkpoints and removes the rest, and removes the leftovers of saves
    /// that never committed (a rank killed mid-write) older than the newest committed one. Newer uncommitted
    /// steps are left alone: a save may be in flight.
    fn prune(&self) -> Result<(), CheckpointError> {
        let keys = self.storage.list("")?;
        let committed = committed_in(&keys);
        let Some(&newest) = committed.first() else {
            return Ok(());
        };
        let pruned = &committed[self.cfg.keep.max(1).min(committed.len())..];
        // The manifests go first: a half-deleted checkpoint is then simply not a checkpoint.
        let (manifests, objects): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|k| k.ends_with("/manifest.json"));
        for key in manifests.into_iter().chain(objects) {
            let stale = step_of(key)
                .is_some_and(|s| pruned.contains(&s) || (s < newest && !committed.contains(&s)));
            if stale {
                self.storage.delete(key)?;
            }
        }
        Ok(())
    }

    /// Loads the newest usable checkpoint into `engine` (re-sharding if the world changed) and returns its state.
    /// A checkpoint whose objects are missing or fail their checksum is skipped with a warning; one written for
    /// another model is an error. Collective: every rank settles on the same checkpoint.
    pub fn load_latest(
        &self,
        engine: &mut dyn TrainingEngine,
        model: &Architecture,
    ) -> Result<Option<RunState>, CheckpointError> {
        let comm = engine.collective();
        let steps = self.committed_steps()?;
        // Ranks list the same store, but agree explicitly on how many candidates there are.
        let n = comm.all_reduce_f64(steps.len() as f64)? / comm.world() as f64;
        if n != steps.len() as f64 {
            return Err(CheckpointError::Writer(
                "ranks see different checkpoint lists".into(),
            ));
        }
        for step in steps {
            let attempt = self.try_load(engine, model, step);
            let comm = engine.collective();
            let failed_here = match &attempt {
                Ok(_) => 0.0,
                Err(CheckpointError::Mismatch { .. }) => 0.0,
                Err(_) => 1.0,
            };
            // Only when every rank has verified its objects is any engine overwritten: a torn checkpoint leaves
            // every rank's state as it was, for the previous checkpoint (or none) to be tried.
            if comm.all_reduce_f64(failed_here)? == 0.0 {
                let verified = attempt?;
                let unpack_started = std::time::Instant::now();
                verified.unpack_into(engine)?;
                tracing::debug!(
                    step,
                    unpack_seconds = unpack_started.elapsed().as_secs_f64(),
                    "checkpoint unpacked"
                );
                tracing::info!(step, url = self.storage.url(), "checkpoint loaded");
                return Ok(Some(verified.state));
            }
            if let Err(e) = attempt {
                tracing::warn!(step, error = %format!("{e:#}"), "checkpoint unusable, trying the previous one");
            }
        }
        Ok(None)
    }

    /// Reads step `step`'s manifest, state and the objects this rank needs, each checked against its size and
    /// sha256; nothing is unpacked yet.
    fn try_load(
        &self,
        engine: &dyn TrainingEngine,
        model: &Architecture,
        step: u64,
    ) -> Result<Verified, CheckpointError> {
        let dir = step_dir(step);
        let key = format!("{dir}/manifest.json");
        let corrupt = |reason: String| CheckpointError::Corrupt {
            key: key.clone(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(&self.storage.get(&key)?)
            .map_err(|e| corrupt(format!("unreadable manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not {FORMAT}",
                manifest.format
            )));
        }
        if manifest.model_hash != model_hash(model) {
            return Err(CheckpointError::Mismatch {
                key,
                reason: "the model config differs".into(),
            });
        }
        // Each object is hashed as it is read (on a second thread, for a local store).
        let fetch = |entry: &FileEntry| -> Result<Bytes, CheckpointError> {
            let (data, digest) = self.storage.get_sha256(&entry.key)?;
            if data.len() as u64 != entry.bytes || hex::encode(digest) != entry.sha256 {
                return Err(corrupt(format!(
                    "{} is torn (size or sha256 differ)",
                    entry.key
                )));
            }
            Ok(data)
        };
        let state: RunState = serde_json::from_slice(&fetch(&manifest.state)?)
            .map_err(|e| corrupt(format!("unreadable state: {e}")))?;

        let (rank, world) = (
            engine.collective().rank() as i64,
            engine.collective().world() as i64,
        );
        let old_world = manifest.world as i64;
        let ours = engine.layouts();
        if ours.len() != manifest.groups.len()
            || ours
                .iter()
                .zip(&manifest.groups)
                .any(|(a, b)| a.names != b.names || a.shapes != b.shapes)
        {
            return Err(CheckpointError::Mismatch {
                key,
                reason: "its parameter groups differ".into(),
            });
        }
        // Which old ranks hold any part of this rank's new slices.
        let mut needed = std::collections::BTreeSet::new();
        for old in &manifest.groups {
            let new = old.for_world(world);
            let (lo, hi) = (rank * new.shard, ((rank + 1) * new.shard).min(old.numel));
            if lo < hi {
                for r in lo / old.shard..=((hi - 1) / old.shard) {
                    needed.insert(r);
                }
            }
        }
        let read_started = std::time::Instant::now();
        let mut files = std::collections::BTreeMap::new();
        // Every old rank's object holds its four arrays of every group: checked here, so unpacking (which writes
        // into the engine) cannot run out of bytes half-way.
        let object_bytes: u64 = manifest
            .groups
            .iter()
            .map(|g| 4 * group_floats(g) as u64)
            .sum();
        for r in needed {
            let entry = manifest
                .ranks
                .get(r as usize)
                .ok_or_else(|| corrupt(format!("no object for rank {r} of {old_world}")))?;
            if entry.bytes != object_bytes {
                return Err(corrupt(format!(
                    "{} is listed with {} bytes where its groups need {object_bytes}",
                    entry.key, entry.bytes
                )));
            }
            files.insert(r, fetch(entry)?);
        }
        tracing::debug!(
            step,
            read_and_verify_seconds = read_started.elapsed().as_secs_f64(),
            "checkpoint read"
        );
        Ok(Verified {
            key,
            groups: manifest.groups,
            files,
            rank,
            world,
            state,
        })
    }
}

/// A checkpoint this rank has read and verified, not yet unpacked.
struct Verified {
    /// The manifest's key, to name in errors.
    key: String,
    groups: Vec<GroupLayout>,
    /// The old ranks' objects this rank needs, by old rank.
    files: std::collections::BTreeMap<i64, Bytes>,
    rank: i64,
    world: i64,
    state: RunState,
}

impl Verified {
    /// Copies this rank's slices into the engine. A CPU fp32 engine's own tensors are written in place (no second
    /// copy of the state in fresh memory); other engines get host tensors that `load_shard_states` moves to their
    /// device.
    fn unpack_into(&self, engine: &mut dyn TrainingEngine) -> Result<(), CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            key: self.key.clone(),
            reason,
        };
        let views = engine.shard_views();
        let in_place = views.len() == self.groups.len()
            && views.iter().zip(&self.groups).all(|(v, g)| {
                let shard = g.for_world(self.world).shard;
                [&v.master, &v.m, &v.v, &v.ema].iter().all(|t| {
                    t.device() == tch::Device::Cpu
                        && t.kind() == Kind::Float
                        && t.is_contiguous()
                        && t.size() == [shard]
                })
            });
        let states = unpack_slices(
            &self.groups,
            &self.files,
            self.rank,
            self.world,
            &corrupt,
            in_place.then_some(&views[..]),
        )?;
        engine.load_shard_states(&states, self.state.adam_steps)?;
        Ok(())
    }
}

/// The f32s one group takes in a rank's object: its four arrays (weights, Adam m and v, EMA) of one shard each, in
/// the order [`encode`] writes them.
fn group_floats(g: &GroupLayout) -> i64 {
    4 * g.shard
}

/// This rank's slices of every group, for `world` ranks, cut from the old ranks' objects (`files`, by old rank),
/// each run of floats copied as it lies: the objects are host-order f32, as [`encode`] wrote them, and radit
/// builds only for little-endian hosts.
fn unpack_slices(
    groups: &[GroupLayout],
    files: &std::collections::BTreeMap<i64, Bytes>,
    rank: i64,
    world: i64,
    corrupt: &dyn Fn(String) -> CheckpointError,
    into: Option<&[ShardState]>,
) -> Result<Vec<ShardState>, CheckpointError> {
    // Per old rank, the floats before each group's four arrays.
    let per_rank_floats: Vec<i64> = groups.iter().map(group_floats).collect();
    let mut states = Vec::new();
    for (gi, old) in groups.iter().enumerate() {
        let new = old.for_world(world);
        let group_start: i64 = per_rank_floats[..gi].iter().sum();
        let (lo, hi) = (rank * new.shard, ((rank + 1) * new.shard).min(old.numel));
        let mut arrays = Vec::with_capacity(4);
        for array in 0..4 {
            let out = match into.and_then(|views| views.get(gi)) {
                Some(v) => [&v.master, &v.m, &v.v, &v.ema][array as usize].shallow_clone(),
                None => Tensor::empty([new.shard], tch::kind::FLOAT_CPU),
            };
            // SAFETY: a contiguous CPU f32 tensor of `new.shard` elements: fresh, or (checked by the caller) one
            // of the engine's own, which nothing else reads or writes while the checkpoint is loaded.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, 4 * new.shard as usize)
            };
            // The padding past the group's last element.
            dst[4 * (hi - lo).max(0) as usize..].fill(0);
            let mut pos = lo;
            while pos < hi {
                let r = pos / old.shard;
                let within = pos - r * old.shard;
                let take = (old.shard - within).min(hi - pos);
                let b = ((group_start + array * old.shard + within) * 4) as usize;
                let run = files
                    .get(&r)
                    .and_then(|data| data.get(b..b + 4 * take as usize))
                    .ok_or_else(|| corrupt(format!("rank object {r} is too short")))?;
                dst[4 * (pos - lo) as usize..][..run.len()].copy_from_slice(run);
                pos += take;
            }
            arrays.push(out);
        }
        let [master, m, v, ema]: [Tensor; 4] = arrays
            .try_into()
            .map_err(|_| corrupt("four arrays per group".into()))?;
        states.push(ShardState {
            group: old.name.clone(),
            master,
            m,
            v,
            ema,
        });
    }
    Ok(states)
}
