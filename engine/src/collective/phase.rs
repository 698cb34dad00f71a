//! The rank's collective phase: an [`Observer`] that marks the phase as "collective" for the length of every
//! call of any backend (MPI, TCP, NCCL), so a heartbeat taken while a rank waits on its peers says so. The
//! coordinator names the rank that is not waiting as the culprit of a hang.

use super::Collective;
use super::observed::{Observed, Observer};
use crate::progress::{Phase, PhaseGuard, Progress};

impl Observer for Progress {
    type Guard<'a> = PhaseGuard<'a>;

    fn enter(&self, _op: &'static str, _payload_bytes: Option<u64>) -> PhaseGuard<'_> {
        Progress::enter(self, Phase::Collective)
    }
}

/// A collective whose every call runs in [`Phase::Collective`] on its progress.
pub type PhaseMarking = Observed<Progress>;

impl PhaseMarking {
    pub fn new(inner: Box<dyn Collective>, progress: Progress) -> Self {
        Observed::wrap(inner, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::local::LocalGroup;
    use std::time::Duration;

    /// Rank 1 arrives late at a barrier: rank 0's phase reads "collective" while it waits, and its phase before
    /// the call comes back after it.
    #[test]
    fn a_waiting_rank_reads_collective_and_its_phase_returns_after() {
        let mut ranks = LocalGroup::ranks(2, Duration::from_secs(30));
        let late = ranks.pop().unwrap();
        let progress = Progress::new();
        progress.set_phase(Phase::Compute);
        let early = PhaseMarking::new(Box::new(ranks.pop().unwrap()), progress.clone());
        let watcher = progress.clone();
        let seen = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let during = watcher.phase();
            late.barrier().unwrap();
            during
        });
        early.barrier().unwrap();
        assert_eq!(seen.join().unwrap(), Phase::Collective);
        assert_eq!(progress.phase(), Phase::Compute);
    }

    #[test]
    fn conforms() {
        let ranks = LocalGroup::ranks(3, Duration::from_secs(30));
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let c = PhaseMarking::new(Box::new(r), Progress::new());
                    crate::collective::conformance::run(&c, tch::Device::Cpu)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }
}
