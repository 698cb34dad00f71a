//! What a rank is doing now, for its heartbeat: the last finished step, the phase (data, compute, collective,
//! checkpoint, sampling), the newest committed checkpoint and the training counters. The coordinator uses the
//! phase to name the culprit of a hang: the ranks waiting in a collective are victims, the one that is not is the
//! culprit. The trainer writes through a [`Progress`] handle it is given; the rank agent reads its snapshot.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use radit_protocol::{Phase, RankStats, STEP_SECONDS_BUCKETS};

#[derive(Debug, Default)]
struct Shared {
    step: AtomicU64,
    phase: AtomicU8,
    /// The newest committed checkpoint step + 1 (0: none yet).
    checkpoint: AtomicU64,
    /// A newer generation of the run took over: this rank must leave without checkpointing.
    superseded: AtomicBool,
    stats: Mutex<Option<RankStats>>,
    /// When this rank's first step started.
    first_step_start: std::sync::OnceLock<Instant>,
}

/// One rank's progress, shared between the trainer (which writes it) and whoever reports it (the heartbeat).
/// Cloning gives another handle to the same progress.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Shared>);

/// One finished step, as the counters take it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub seconds: f64,
    pub data_wait_seconds: f64,
    pub images: u64,
    pub tokens: u64,
    /// Model FLOPs of forward + backward (3 x the forward, from the model's own costing), for MFU.
    pub flops: f64,
    pub loss: f64,
    /// The largest of the ranks' own losses (each the mean over that rank's share of the batch).
    pub loss_max: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub skipped: bool,
}

/// This rank's share of a committed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Committed {
    pub step: u64,
    pub bytes: u64,
    /// Seconds to encode and write this rank's object.
    pub write_seconds: f64,
    /// Seconds from the start of the save to the commit.
    pub save_seconds: f64,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last finished optimiser step.
    pub fn step(&self) -> u64 {
        self.0.step.load(Ordering::Relaxed)
    }

    pub fn set_step(&self, step: u64) {
        self.0.step.store(step, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Relaxed))
    }

    pub fn set_phase(&self, p: Phase) {
        self.0.phase.store(p as u8, Ordering::Relaxed);
    }

    /// Sets `p` until the guard drops, then restores the previous phase (a collective inside the compute phase).
    pub fn enter(&self, p: Phase) -> PhaseGuard<'_> {
        PhaseGuard {
            progress: self,
            previous: self.0.phase.swap(p as u8, Ordering::Relaxed),
        }
    }

    /// The newest checkpoint this rank saw committed.
    pub fn checkpoint(&self) -> Option<u64> {
        self.0.checkpoint.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Marks the rank superseded by a newer generation (the rank agent does, on the coordinator's word).
    pub fn supersede(&self) {
        self.0.superseded.store(true, Ordering::SeqCst);
    }

    pub fn superseded(&self) -> bool {
        self.0.superseded.load(Ordering::SeqCst)
    }

    fn with_stats(&self, f: impl FnOnce(&mut RankStats)) {
        let mut g = self.0.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(|| RankStats {
            step_seconds_buckets: vec![0; STEP_SECONDS_BUCKETS.len()],
            ..RankStats::default()
        }));
    }

    /// One finished step: the counters grow and the step becomes the last finished one.
    pub fn record_step(&self, r: &StepRecord) {
        let now = Instant::now();
        let first = *self.0.first_step_start.get_or_init(|| {
            now.checked_sub(Duration::from_secs_f64(r.seconds.max(0.0)))
                .unwrap_or(now)
        });
        self.with_stats(|s| {
            s.busy_seconds = (now - first).as_secs_f64();
            s.steps += 1;
            s.images += r.images;
            s.tokens += r.tokens;
            s.model_flops += r.flops;
            s.step_flops = r.flops;
            s.data_wait_seconds += r.data_wait_seconds;
            for (b, bound) in s.step_seconds_buckets.iter_mut().zip(STEP_SECONDS_BUCKETS) {
                if r.seconds <= bound {
                    *b += 1;
                }
            }
            s.step_seconds_count += 1;
            s.step_seconds_sum += r.seconds;
            s.skipped_steps += u64::from(r.skipped);
            (s.loss, s.loss_max, s.grad_norm, s.learning_rate) =
                (r.loss, r.loss_max, r.grad_norm, r.learning_rate);
        });
        self.set_step(r.step);
    }

    /// A checkpoint was started; training stalled `seconds` for it.
    pub fn record_checkpoint_started(&self, seconds: f64) {
        self.with_stats(|s| {
            s.checkpoints += 1;
            s.checkpoint_stall_seconds = seconds;
        });
    }

    /// A checkpoint committed (this rank's part of it).
    pub fn record_committed(&self, c: &Committed) {
        self.with_stats(|s| {
            s.checkpoint_bytes += c.bytes;
            s.checkpoint_write_seconds = c.write_seconds;
            s.checkpoint_save_seconds = c.save_seconds;
        });
        self.0.checkpoint.store(c.step + 1, Ordering::Relaxed);
    }

    /// The loss of the last step, for work that records its steps as units (the SCM's training).
    pub fn record_loss(&self, loss: f64) {
        self.with_stats(|s| (s.loss, s.loss_max) = (loss, loss));
    }

    /// A validation loss measured after `step`.
    pub fn record_validation(&self, step: u64, loss: f64) {
        self.with_stats(|s| (s.val_step, s.val_loss) = (step, loss));
    }

    /// A mini-FD measured after `step`.
    pub fn record_fd(&self, step: u64, fd: f64) {
        self.with_stats(|s| (s.fd_step, s.fd) = (step, fd));
    }

    /// This rank's device memory after a step.
    pub fn record_device_memory(&self, memory: Option<(u64, u64)>) {
        if let Some((used, total)) = memory {
            self.with_stats(|s| {
                (s.device_memory_used_bytes, s.device_memory_total_bytes) = (used, total)
            });
        }
    }

    /// The counters so far, as the heartbeat sends them (`None` before the first step).
    pub fn snapshot(&self) -> Option<RankStats> {
        self.0
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct PhaseGuard<'a> {
    progress: &'a Progress,
    previous: u8,
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        self.progress
            .0
            .phase
            .store(self.previous, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_buckets_and_phases_read_back_through_a_clone() {
        let p = Progress::new();
        let reader = p.clone();
        assert_eq!(reader.snapshot(), None);
        let step = |step, seconds| StepRecord {
            step,
            seconds,
            data_wait_seconds: 0.5,
            images: 4,
            tokens: 64,
            flops: 1e9,
            loss: 0.25,
            loss_max: 0.5,
            grad_norm: 1.0,
            learning_rate: 1e-4,
            skipped: step == 2,
        };
        p.record_step(&step(1, 0.02));
        p.record_step(&step(2, 1e9));
        let s = reader.snapshot().expect("stats after a step");
        assert_eq!(
            (s.steps, s.images, s.tokens, s.skipped_steps),
            (2, 8, 128, 1)
        );
        assert_eq!(reader.step(), 2);
        // Cumulative buckets: the fast step counts in every bucket at or above 0.02 s, the slow one in none.
        let first = STEP_SECONDS_BUCKETS
            .iter()
            .position(|&b| b >= 0.02)
            .unwrap();
        assert!(s.step_seconds_buckets[..first].iter().all(|&c| c == 0));
        assert!(s.step_seconds_buckets[first..].iter().all(|&c| c == 1));
        {
            let _g = p.enter(Phase::Collective);
            assert_eq!(reader.phase(), Phase::Collective);
        }
        assert_eq!(reader.phase(), Phase::from_u8(0));
        p.record_committed(&Committed {
            step: 2,
            bytes: 10,
            write_seconds: 0.1,
            save_seconds: 0.2,
        });
        assert_eq!(reader.checkpoint(), Some(2));
        assert_eq!(reader.snapshot().unwrap().checkpoint_bytes, 10);
    }
}
