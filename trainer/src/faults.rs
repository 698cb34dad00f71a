//! Fault injection for the end-to-end tests, read from the environment once by `radit train` and applied from
//! outside the train loop: a [`StepHook`] the loop calls before each step's compute, and the checkpoint writer's
//! crash point. Each variable is `RANK:STEP`; with `RADIT_FAULT_ONLY_GENERATION=G` a fault fires only in launch
//! generation G (`RADIT_GENERATION`, set by `radit run`), so the relaunched ranks run clean.
//!
//! - `RADIT_FAULT_NONFINITE_STEPS=S1,S2`: rank 0's input of those (1-based) steps becomes NaN, once each.
//! - `RADIT_FAULT_HANG=RANK:STEP`: that rank sleeps (still heart-beating) in that step's compute (training or
//!   encoding).
//! - `RADIT_FAULT_OOM=RANK:STEP`: that rank asks libtorch for 1 PiB in that step's compute (a real allocator
//!   failure; training, generate and features).
//! - `RADIT_FAULT_CRASH_IN_CHECKPOINT=RANK:STEP`: that rank aborts half-way through writing that checkpoint.
//! - `RADIT_FAULT_STEP_SLEEP_MS=MS`: every rank sleeps that long before each step's compute (a slower model), so a
//!   test's signal lands mid-run however loaded the machine is.
//! - `RADIT_FAULT_CRASH_BEFORE_COMMIT=RANK:STEP`: a journaled job's rank (encode, generate) aborts after writing
//!   that step's output (a shard of latents, a unit of samples) and before committing it to the journal.

use std::collections::BTreeSet;

use tch::{Device, Kind, Tensor};

use crate::train::{StepHook, TrainError};

fn fault_at(var: &str) -> Option<(u64, u64)> {
    let value = std::env::var(var).ok()?;
    if let Ok(only) = std::env::var("RADIT_FAULT_ONLY_GENERATION")
        && std::env::var("RADIT_GENERATION").ok().as_deref() != Some(only.trim())
    {
        return None;
    }
    let (r, s) = value.split_once(':')?;
    Some((r.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// Whether this rank should die while writing the checkpoint of `step`.
pub(crate) fn crash_in_checkpoint(rank: usize, step: u64) -> bool {
    fault_at("RADIT_FAULT_CRASH_IN_CHECKPOINT") == Some((rank as u64, step))
}

/// Whether this rank should hang in the compute of `step` (for the encode job; training's goes through [`Faults`]).
pub(crate) fn hang_in(rank: usize, step: u64) -> bool {
    fault_at("RADIT_FAULT_HANG") == Some((rank as u64, step))
}

/// In a journaled job's unit: if this rank's `step` is `RADIT_FAULT_OOM`'s, asks libtorch for 1 PiB through
/// the infallible form, as model code allocates (the unit's guard must turn the failure into an error).
pub(crate) fn allocate_too_much_in(rank: usize, step: u64, device: Device) {
    if fault_at("RADIT_FAULT_OOM") == Some((rank as u64, step)) {
        tracing::warn!(step, "allocating 1 PiB on purpose (RADIT_FAULT_OOM)");
        let _never = Tensor::empty([1i64 << 48], (Kind::Float, device));
    }
}

/// Whether this encode or generate rank should die between writing the output of `step` and committing it.
pub(crate) fn crash_before_commit(rank: usize, step: u64) -> bool {
    fault_at("RADIT_FAULT_CRASH_BEFORE_COMMIT") == Some((rank as u64, step))
}

/// The faults the environment asks for, as a step hook.
#[derive(Debug, Default)]
pub struct Faults {
    nonfinite_steps: BTreeSet<u64>,
    hang_at: Option<(u64, u64)>,
    oom_at: Option<(u64, u64)>,
    step_sleep: Option<std::time::Duration>,
}

impl Faults {
    /// `None` when no step fault is asked for.
    pub fn from_env() -> Option<Self> {
        let f = Self {
            nonfinite_steps: std::env::var("RADIT_FAULT_NONFINITE_STEPS")
                .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
                .unwrap_or_default(),
            hang_at: fault_at("RADIT_FAULT_HANG"),
            oom_at: fault_at("RADIT_FAULT_OOM"),
            step_sleep: std::env::var("RADIT_FAULT_STEP_SLEEP_MS")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map(std::time::Duration::from_millis),
        };
        (!f.nonfinite_steps.is_empty()
            || f.hang_at.is_some()
            || f.oom_at.is_some()
            || f.step_sleep.is_some())
        .then_some(f)
    }
}

impl StepHook for Faults {
    fn before_compute(
        &mut self,
        step: u64,
        rank: u64,
        x1: &Tensor,
        device: Device,
    ) -> Result<(), TrainError> {
        if let Some(pause) = self.step_sleep {
            std::thread::sleep(pause);
        }
        if rank == 0 && self.nonfinite_steps.remove(&step) {
            tracing::warn!(
                step,
                "injecting a non-finite input (RADIT_FAULT_NONFINITE_STEPS)"
            );
            let _ = x1.get(0).fill_(f64::NAN);
        }
        if self.hang_at == Some((rank, step)) {
            tracing::warn!(step, "hanging on purpose (RADIT_FAULT_HANG)");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if self.oom_at == Some((rank, step)) {
            tracing::warn!(step, "allocating 1 PiB on purpose (RADIT_FAULT_OOM)");
            // The infallible form, as model code allocates: the failure is a panic inside tch, which the step's
            // guard must turn into an error.
            let _never = Tensor::empty([1i64 << 48], (Kind::Float, device));
        }
        Ok(())
    }
}
