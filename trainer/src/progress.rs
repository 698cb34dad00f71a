//! What this rank process is doing now, for its heartbeat: the last finished step and the phase (data, compute,
//! collective, checkpoint). The coordinator uses the phase to name the culprit of a hang: the ranks waiting in a
//! collective are victims, the one that is not is the culprit. One rank per process, so these are process-wide.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Data = 1,
    Compute = 2,
    Collective = 3,
    Checkpoint = 4,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Data => "data",
            Phase::Compute => "compute",
            Phase::Collective => "collective",
            Phase::Checkpoint => "checkpoint",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Data,
            2 => Phase::Compute,
            3 => Phase::Collective,
            4 => Phase::Checkpoint,
            _ => Phase::Starting,
        }
    }
}

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
