//! What this rank process is doing now, for its heartbeat: the last finished step and the phase (data, compute,
//! collective, checkpoint). The coordinator uses the phase to name the culprit of a hang: the ranks waiting in a
//! collective are victims, the one that is not is the culprit. One rank per process, so these are process-wide.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

pub use radit_protocol::Phase;

static STEP: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicU8 = AtomicU8::new(0);
/// The newest committed checkpoint step + 1 (0: none yet).
static CHECKPOINT: AtomicU64 = AtomicU64::new(0);

/// The newest checkpoint this process saw committed.
pub fn checkpoint() -> Option<u64> {
    CHECKPOINT.load(Ordering::Relaxed).checked_sub(1)
}

pub fn set_checkpoint(step: u64) {
    CHECKPOINT.store(step + 1, Ordering::Relaxed);
}

/// The last finished optimiser step of this process.
pub fn step() -> u64 {
    STEP.load(Ordering::Relaxed)
}

pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

pub fn phase() -> Phase {
    Phase::from_u8(PHASE.load(Ordering::Relaxed))
}

pub fn set_phase(p: Phase) {
    PHASE.store(p as u8, Ordering::Relaxed);
}

/// Sets `p` until the guard drops, then restores the previous phase (a collective inside the compute phase).
pub fn enter(p: Phase) -> PhaseGuard {
    PhaseGuard(PHASE.swap(p as u8, Ordering::Relaxed))
}

pub struct PhaseGuard(u8);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        PHASE.store(self.0, Ordering::Relaxed);
    }
}

/// Fault injection for the tests: `VAR=RANK:STEP`. With `RADIT_FAULT_ONLY_GENERATION=G` the fault fires only in
/// launch generation G (`RADIT_GENERATION`, set by `radit run`), so the relaunched ranks run clean.
pub fn fault_at(var: &str) -> Option<(u64, u64)> {
    let value = std::env::var(var).ok()?;
    if let Ok(only) = std::env::var("RADIT_FAULT_ONLY_GENERATION")
        && std::env::var("RADIT_GENERATION").ok().as_deref() != Some(only.trim())
    {
        return None;
    }
    let (r, s) = value.split_once(':')?;
    Some((r.trim().parse().ok()?, s.trim().parse().ok()?))
}

pub use radit_protocol::STEP_SECONDS_BUCKETS;

/// This rank's training counters and latest values, sent with its heartbeats (the coordinator exports them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub steps_total: u64,
    pub images_total: u64,
    pub tokens_total: u64,
    /// Model FLOPs of forward + backward (3 x the forward, from the model's own costing), for MFU.
    pub model_flops_total: f64,
    /// Model FLOPs of this rank's last step (for MFU at the median step time).
    pub step_flops: f64,
    pub data_wait_seconds_total: f64,
    /// Step durations: cumulative counts per bucket of [`STEP_SECONDS_BUCKETS`], their count and sum.
    pub step_seconds_buckets: Vec<u64>,
    pub step_seconds_count: u64,
    pub step_seconds_sum: f64,
    pub skipped_steps_total: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Seconds training stalled for the last checkpoint (the copy to host memory), and how many were started.
    pub checkpoint_stall_seconds: f64,
    pub checkpoints_total: u64,
    /// This rank's share of the last checkpoint: seconds to encode and write its object, seconds from the start
    /// of the save to the commit, and bytes written over the run.
    pub checkpoint_write_seconds: f64,
    pub checkpoint_save_seconds: f64,
    pub checkpoint_bytes_total: u64,
    /// The largest of the ranks' own losses (each the mean over that rank's share of the batch), last step.
    pub loss_max: f64,
    /// Device memory in use and the device's total (GPU ranks; 0 on CPUs).
    pub device_memory_used_bytes: u64,
    pub device_memory_total_bytes: u64,
}

static STATS: Mutex<Option<Stats>> = Mutex::new(None);

fn with_stats(f: impl FnOnce(&mut Stats)) {
    let mut g = STATS.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Stats {
        step_seconds_buckets: vec![0; STEP_SECONDS_BUCKETS.len()],
        ..Stats::default()
    }));
}

/// One finished step of this rank.
#[allow(clippy::too_many_arguments)]
pub fn record_step(
    seconds: f64,
    data_wait: f64,
    images: u64,
    tokens: u64,
    flops: f64,
    loss: f64,
    loss_max: f64,
    grad_norm: f64,
    lr: f64,
    skipped: bool,
) {
    with_stats(|s| {
        s.steps_total += 1;
        s.images_total += images;
        s.tokens_total += tokens;
        s.model_flops_total += flops;
        s.step_flops = flops;
        s.data_wait_seconds_total += data_wait;
        for (b, bound) in s.step_seconds_buckets.iter_mut().zip(STEP_SECONDS_BUCKETS) {
            if seconds <= bound {
                *b += 1;
            }
        }
        s.step_seconds_count += 1;
        s.step_seconds_sum += seconds;
        s.skipped_steps_total += u64::from(skipped);
        (s.loss, s.loss_max, s.grad_norm, s.learning_rate) = (loss, loss_max, grad_norm, lr);
    });
}

/// A checkpoint was started; training stalled `seconds` for it.
pub fn record_checkpoint(seconds: f64) {
    with_stats(|s| {
        s.checkpoints_total += 1;
        s.checkpoint_stall_seconds = seconds;
    });
}

/// This rank's part of a checkpoint was written (`write_seconds`) and the checkpoint committed `save_seconds`
/// after the save started.
pub fn record_checkpoint_written(bytes: u64, write_seconds: f64, save_seconds: f64) {
    with_stats(|s| {
        s.checkpoint_bytes_total += bytes;
        s.checkpoint_write_seconds = write_seconds;
        s.checkpoint_save_seconds = save_seconds;
    });
}

/// This rank's device memory after a step.
pub fn record_device_memory(memory: Option<(u64, u64)>) {
    if let Some((used, total)) = memory {
        with_stats(|s| (s.device_memory_used_bytes, s.device_memory_total_bytes) = (used, total));
    }
}

/// The counters so far (`None` before the first step).
pub fn stats() -> Option<Stats> {
    STATS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
