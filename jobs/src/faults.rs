//! The fault plan's training side ([`radit_engine::faults::FaultPlan`]): what the train loop calls
//! before each step's compute (non-finite inputs, a hang, an allocation failure, a slower step). The checkpoint
//! writer and the unit-job driver fire their own points from the same plan.

use std::collections::BTreeSet;

use radit_engine::faults::FaultPlan;
use tch::{Device, Tensor};

/// The plan's step faults, for the train loop.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    /// Non-finite steps not injected yet (each fires once, so a rolled-back step runs clean).
    nonfinite_steps: BTreeSet<u64>,
}

impl Faults {
    /// `None` when the plan asks for no step fault.
    pub fn from_plan(plan: &FaultPlan) -> Option<Self> {
        (!plan.nonfinite_steps.is_empty()
            || plan.hang.is_some()
            || plan.out_of_memory.is_some()
            || plan.step_sleep.is_some())
        .then(|| Self {
            plan: plan.clone(),
            nonfinite_steps: plan.nonfinite_steps.clone(),
        })
    }
}

impl Faults {
    /// Before a training step's compute, with the step (1-based), this rank and its input images.
    pub fn before_compute(&mut self, step: u64, rank: u64, x1: &Tensor, device: Device) {
        if let Some(pause) = self.plan.step_sleep {
            std::thread::sleep(pause);
        }
        if rank == 0 && self.nonfinite_steps.remove(&step) {
            tracing::warn!(
                step,
                "injecting a non-finite input (RADIT_FAULT_NONFINITE_STEPS)"
            );
            let _ = x1.get(0).fill_(f64::NAN);
        }
        self.plan.hang_if_at(rank, step);
        // The step's guard must turn the failure (a panic inside tch) into an error.
        self.plan.allocate_too_much_if_at(rank, step, device);
    }
}
