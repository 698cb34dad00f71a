//! The one driver of every unit job (encode, generate, features, and each new one): a job cuts its work into
//! units, and [`run_units`] gives each rank a contiguous range of them, skips the committed ones (so a relaunched
//! rank resumes at its first uncommitted unit), reads one unit ahead on a reader thread, computes each under the
//! allocation guard, writes and commits it, fires the fault plan's points, asks between units whether to stop,
//! records each unit in the heartbeat's progress, and meets the other ranks at the end of its range. A job says
//! only what a unit is and how to read, compute, write and commit one.

use std::fmt::Display;
use std::time::Instant;

use radit_engine::collective::Collective;
use radit_engine::out_of_memory::{AllocationFailed, OutOfMemory, guard};
use radit_engine::progress::Phase;
use radit_sharding::ShardError;
use tch::Device;

pub use crate::journal::UnitWork;
use crate::journal::{RankError, RankHandles, end_of_range, record_unit};

/// Reads a unit's input (a shard's images, a part of a feature source). Runs on a reader thread, one unit ahead
/// of the compute, so it shares nothing mutable with the job.
pub trait UnitReader: Sync {
    type Unit: Copy + Send + Sync + Display;
    type Input: Send;
    fn read(&self, unit: Self::Unit) -> Result<Self::Input, RankError>;
}

/// What a unit job does with each of its units.
pub trait UnitJob {
    type Unit: Copy + Send + Sync + Display;
    type Input: Send;
    /// What a unit's compute makes.
    type Output;
    /// What writing a unit's output leaves to commit.
    type Written;
    /// Whether `unit` was committed by an earlier run (it is then skipped).
    fn is_committed(&self, unit: Self::Unit) -> Result<bool, RankError>;
    /// The unit's work on the device; an allocation failure in it becomes [`UnitJob::out_of_memory`]'s report.
    fn compute(&mut self, unit: Self::Unit, input: Self::Input) -> Result<Self::Output, RankError>;
    /// The report of an allocation failure in `unit`: what ran, with which settings, and what to lower.
    fn out_of_memory(&self, failed: AllocationFailed, unit: Self::Unit) -> OutOfMemory;
    /// Writes the unit's output where nobody counts it yet.
    fn write(&mut self, unit: Self::Unit, output: Self::Output)
    -> Result<Self::Written, RankError>;
    /// Makes the written unit count (a journal record, a rename); returns its work for the heartbeat.
    fn commit(&mut self, unit: Self::Unit, written: Self::Written) -> Result<UnitWork, RankError>;
}

/// How a rank's range went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UnitsRun {
    /// This rank's units.
    pub units: u64,
    /// Its units committed by an earlier run.
    pub resumed: u64,
    /// Its units committed by this run.
    pub committed: u64,
    /// Seconds of the unit loop (not start-up, not the end-of-range meeting).
    pub loop_seconds: f64,
    /// Some rank stopped before the end of its range: the job's output is left to the next run.
    pub stopped_anywhere: bool,
}

/// A job's steps: every rank counts up to the largest range, so the coordinator's total, progress and ETA hold
/// for all ranks.
pub fn total_steps(units: u64, world: u64) -> u64 {
    units.div_ceil(world.max(1))
}

/// Rank `rank`'s contiguous range of `units` among `world`: sizes differ by at most one.
pub fn rank_range(units: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let world = world.max(1);
    rank * units / world..(rank + 1) * units / world
}

/// Runs this rank's range of `units` (all of the job's units, the same list on every rank) on `device`, told
/// through `handles` (stop flag, progress, fault plan). Collective at the end (the end-of-range meeting): every
/// rank calls it.
pub fn run_units<R, J>(
    (comm, device, handles): (&dyn Collective, Device, &RankHandles),
    units: &[J::Unit],
    reader: &R,
    job: &mut J,
) -> Result<UnitsRun, RankError>
where
    R: UnitReader<Unit = J::Unit, Input = J::Input>,
    J: UnitJob,
{
    let (me, world) = (comm.rank(), comm.world());
    let progress = &handles.progress;
    let faults = &handles.faults;
    let mine = &units[rank_range(units.len(), me, world)];
    let mut pending = Vec::with_capacity(mine.len());
    for &unit in mine {
        if !job.is_committed(unit)? {
            pending.push(unit);
        }
    }
    let mut run = UnitsRun {
        units: mine.len() as u64,
        resumed: (mine.len() - pending.len()) as u64,
        ..UnitsRun::default()
    };
    progress.set_step(run.resumed);
    let total = total_steps(units.len() as u64, world as u64);
    let loop_started = Instant::now();
    let stopped = std::thread::scope(|s| -> Result<bool, RankError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let queue = &pending;
        s.spawn(move || {
            for &unit in queue {
                // A closed channel: the loop stopped or failed, and reads nothing more.
                if tx.send(reader.read(unit)).is_err() {
                    break;
                }
            }
        });
        for (done, &unit) in pending.iter().enumerate() {
            if crate::journal::stop_here(handles)? {
                return Ok(true);
            }
            let started = Instant::now();
            let input = {
                let _g = progress.enter(Phase::Data);
                rx.recv()
                    .map_err(|_| ShardError::Internal("the unit reader stopped".into()))??
            };
            let data_wait = started.elapsed().as_secs_f64();
            let step = run.resumed + done as u64 + 1;
            let output = {
                let _g = progress.enter(Phase::Compute);
                faults.hang_if_at(me as u64, step);
                guard(|| {
                    faults.allocate_too_much_if_at(me as u64, step, device);
                    job.compute(unit, input)
                })
                .map_err(|failed| RankError::from(job.out_of_memory(failed, unit)))??
            };
            let work = {
                let _g = progress.enter(Phase::Checkpoint);
                let written = job.write(unit, output)?;
                faults.crash_before_commit_if_at(me as u64, step);
                job.commit(unit, written)?
            };
            run.committed += 1;
            record_unit(
                progress,
                device,
                (step, started.elapsed().as_secs_f64(), data_wait),
                work,
            );
            tracing::debug!(rank = me, step, %unit, "unit committed");
        }
        Ok(false)
    })?;
    run.loop_seconds = loop_started.elapsed().as_secs_f64().max(1e-9);
    run.stopped_anywhere = end_of_range(comm, progress, stopped, total)?;
    Ok(run)
}

/// Rank 0 settles the job's output (prepares a store, a directory) before any rank writes; the others learn of a
/// refusal from this reduction instead of waiting for a peer that has left. `prepared` is rank 0's outcome (any
/// `Ok` on the others). Collective.
pub fn settled_by_rank0<T>(
    comm: &dyn Collective,
    handles: &RankHandles,
    what: impl Display,
    prepared: Result<T, RankError>,
) -> Result<T, RankError> {
    let refused = {
        let _g = handles.progress.enter(Phase::Collective);
        comm.any(prepared.is_err())?
    };
    let value = prepared?;
    if refused {
        return Err(RankError::unusable(
            what,
            "rank 0 could not prepare it (its log says why)",
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use radit_engine::collective::local::LocalGroup;

    /// Unit u's input is 10 u.
    struct Tens;

    impl UnitReader for Tens {
        type Unit = u64;
        type Input = u64;
        fn read(&self, unit: u64) -> Result<u64, RankError> {
            Ok(unit * 10)
        }
    }

    /// Commits units into a set; unit 3's compute asks for 1 PiB when `greedy`.
    #[derive(Default)]
    struct Recorder {
        committed: BTreeSet<u64>,
        inputs: Vec<u64>,
        greedy: bool,
    }

    impl UnitJob for Recorder {
        type Unit = u64;
        type Input = u64;
        type Output = u64;
        type Written = u64;
        fn is_committed(&self, unit: u64) -> Result<bool, RankError> {
            Ok(self.committed.contains(&unit))
        }
        fn compute(&mut self, unit: u64, input: u64) -> Result<u64, RankError> {
            if self.greedy && unit == 3 {
                let _never = tch::Tensor::empty([1i64 << 48], (tch::Kind::Float, Device::Cpu));
            }
            self.inputs.push(input);
            Ok(input + 1)
        }
        fn out_of_memory(&self, failed: AllocationFailed, unit: u64) -> OutOfMemory {
            OutOfMemory::new(
                failed,
                format!("unit {unit}"),
                Device::Cpu,
                "a recorder",
                "record less",
            )
        }
        fn write(&mut self, _: u64, output: u64) -> Result<u64, RankError> {
            Ok(output)
        }
        fn commit(&mut self, unit: u64, _: u64) -> Result<UnitWork, RankError> {
            self.committed.insert(unit);
            Ok(UnitWork {
                images: 1,
                ..UnitWork::default()
            })
        }
    }

    fn one_rank() -> radit_engine::collective::local::LocalCollective {
        LocalGroup::ranks(1, std::time::Duration::from_secs(10)).remove(0)
    }

    #[test]
    fn committed_units_are_skipped_the_rest_read_ahead_computed_and_committed_in_order() {
        let comm = one_rank();
        let handles = RankHandles::default();
        let mut job = Recorder {
            committed: BTreeSet::from([0, 1]),
            ..Recorder::default()
        };
        let units: Vec<u64> = (0..5).collect();
        let run = run_units((&comm, Device::Cpu, &handles), &units, &Tens, &mut job).unwrap();
        assert_eq!((run.units, run.resumed, run.committed), (5, 2, 3));
        assert!(!run.stopped_anywhere);
        assert_eq!(job.inputs, [20, 30, 40]);
        assert_eq!(job.committed, BTreeSet::from_iter(0..5));
        // The rank counts as at the job's last step once its range is done.
        assert_eq!(handles.progress.step(), 5);
    }

    #[test]
    fn a_stop_keeps_what_is_committed_and_says_so() {
        let comm = one_rank();
        let handles = RankHandles::default();
        handles
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut job = Recorder::default();
        let units: Vec<u64> = (0..3).collect();
        let run = run_units((&comm, Device::Cpu, &handles), &units, &Tens, &mut job).unwrap();
        assert!(run.stopped_anywhere);
        assert_eq!(run.committed, 0);
        assert!(job.inputs.is_empty());
    }

    #[test]
    fn an_allocation_failure_in_a_unit_is_the_jobs_report_after_the_units_before_it() {
        let comm = one_rank();
        let handles = RankHandles::default();
        let mut job = Recorder {
            greedy: true,
            ..Recorder::default()
        };
        let units: Vec<u64> = (0..5).collect();
        let err = run_units((&comm, Device::Cpu, &handles), &units, &Tens, &mut job).unwrap_err();
        let RankError::OutOfMemory(report) = &err else {
            panic!("expected an out-of-memory report, got {err}")
        };
        let text = report.to_string();
        assert!(
            text.contains("unit 3") && text.contains("a recorder"),
            "{text}"
        );
        assert!(err.repeats());
        assert_eq!(job.committed, BTreeSet::from([0, 1, 2]));
    }

    #[test]
    fn ranges_cover_every_shard_once_and_differ_by_at_most_one() {
        for shards in 0..20 {
            for world in 1..7 {
                let ranges: Vec<_> = (0..world).map(|r| rank_range(shards, r, world)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[world - 1].end, shards);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let longest = ranges.iter().map(|r| r.len()).max().unwrap();
                let shortest = ranges.iter().map(|r| r.len()).min().unwrap();
                assert!(longest - shortest <= 1);
                assert_eq!(longest as u64, total_steps(shards as u64, world as u64));
            }
        }
    }
}
