//! The faults the end-to-end tests inject, as a plan: read from the environment once, by the binary, and passed
//! to what fires them (the checkpoint writer, the train loop's step hook, the unit-job driver). Library code never
//! reads `RADIT_FAULT_*` itself. Each point is `RANK:STEP`; with `RADIT_FAULT_ONLY_GENERATION=G` a plan is empty
//! unless this is launch generation G (`RADIT_GENERATION`, set by `radit run`), so relaunched ranks run clean.
//!
//! - `RADIT_FAULT_NONFINITE_STEPS=S1,S2`: rank 0's input of those (1-based) training steps becomes NaN, once each.
//! - `RADIT_FAULT_HANG=RANK:STEP`: that rank sleeps (still heart-beating) in that step's or unit's compute.
//! - `RADIT_FAULT_OOM=RANK:STEP`: that rank asks libtorch for 1 PiB in that step's or unit's compute (a real
//!   allocator failure).
//! - `RADIT_FAULT_CRASH_IN_CHECKPOINT=RANK:STEP`: that rank aborts half-way through writing that checkpoint.
//! - `RADIT_FAULT_STEP_SLEEP_MS=MS`: every rank sleeps that long before each training step's compute (a slower
//!   model), so a test's signal lands mid-run however loaded the machine is.
//! - `RADIT_FAULT_CRASH_BEFORE_COMMIT=RANK:STEP`: a unit job's rank aborts after writing that unit's output and
//!   before committing it.

use std::collections::BTreeSet;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

/// A rank and one of its (1-based) steps or units.
pub type RankStep = (u64, u64);

/// Which faults to inject where; the default injects none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    pub nonfinite_steps: BTreeSet<u64>,
    pub hang: Option<RankStep>,
    pub out_of_memory: Option<RankStep>,
    pub crash_in_checkpoint: Option<RankStep>,
    pub crash_before_commit: Option<RankStep>,
    pub step_sleep: Option<Duration>,
}

impl FaultPlan {
    /// The plan the `RADIT_FAULT_*` variables describe (see the module doc); for the binary to call once.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The plan from a variable lookup (the environment, or a test's table).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(only) = var("RADIT_FAULT_ONLY_GENERATION")
            && var("RADIT_GENERATION").as_deref().map(str::trim) != Some(only.trim())
        {
            return Self::default();
        }
        let at = |name: &str| -> Option<RankStep> {
            let value = var(name)?;
            let (r, s) = value.split_once(':')?;
            Some((r.trim().parse().ok()?, s.trim().parse().ok()?))
        };
        Self {
            nonfinite_steps: var("RADIT_FAULT_NONFINITE_STEPS")
                .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
                .unwrap_or_default(),
            hang: at("RADIT_FAULT_HANG"),
            out_of_memory: at("RADIT_FAULT_OOM"),
            crash_in_checkpoint: at("RADIT_FAULT_CRASH_IN_CHECKPOINT"),
            crash_before_commit: at("RADIT_FAULT_CRASH_BEFORE_COMMIT"),
            step_sleep: var("RADIT_FAULT_STEP_SLEEP_MS")
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_millis),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// In a step's or unit's compute: hangs forever (the heartbeat thread keeps beating) if this is the point.
    pub fn hang_if_at(&self, rank: u64, step: u64) {
        if self.hang == Some((rank, step)) {
            tracing::warn!(step, "hanging on purpose (RADIT_FAULT_HANG)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// In a step's or unit's compute: asks libtorch for 1 PiB through the infallible form, as model code
    /// allocates, if this is the point (the caller's guard must turn the failure into an error).
    pub fn allocate_too_much_if_at(&self, rank: u64, step: u64, device: Device) {
        if self.out_of_memory == Some((rank, step)) {
            tracing::warn!(step, "allocating 1 PiB on purpose (RADIT_FAULT_OOM)");
            let _never = Tensor::empty([1i64 << 48], (Kind::Float, device));
        }
    }

    /// Between writing a unit's output and committing it: aborts the process if this is the point.
    pub fn crash_before_commit_if_at(&self, rank: u64, step: u64) {
        if self.crash_before_commit == Some((rank, step)) {
            tracing::warn!(
                step,
                "aborting before the commit (RADIT_FAULT_CRASH_BEFORE_COMMIT)"
            );
            std::process::abort();
        }
    }

    /// The checkpoint step at which `rank` dies mid-write, if any.
    pub fn checkpoint_crash_of(&self, rank: u64) -> Option<u64> {
        self.crash_in_checkpoint
            .filter(|&(r, _)| r == rank)
            .map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vars: &[(&str, &str)]) -> FaultPlan {
        FaultPlan::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn points_parse_and_bad_ones_are_ignored() {
        let p = plan(&[
            ("RADIT_FAULT_HANG", "1:3"),
            ("RADIT_FAULT_OOM", "oops"),
            ("RADIT_FAULT_NONFINITE_STEPS", "2, 5,x"),
            ("RADIT_FAULT_CRASH_IN_CHECKPOINT", " 0 : 4 "),
        ]);
        assert_eq!(p.hang, Some((1, 3)));
        assert_eq!(p.out_of_memory, None);
        assert_eq!(p.nonfinite_steps, BTreeSet::from([2, 5]));
        assert_eq!(p.checkpoint_crash_of(0), Some(4));
        assert_eq!(p.checkpoint_crash_of(1), None);
        assert!(plan(&[]).is_empty());
    }

    #[test]
    fn a_plan_for_another_generation_is_empty() {
        let vars = [
            ("RADIT_FAULT_HANG", "0:1"),
            ("RADIT_FAULT_ONLY_GENERATION", "0"),
        ];
        assert!(plan(&[vars[0], vars[1], ("RADIT_GENERATION", "1")]).is_empty());
        assert_eq!(
            plan(&[vars[0], vars[1], ("RADIT_GENERATION", "0")]).hang,
            Some((0, 1))
        );
    }
}
