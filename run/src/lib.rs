//! The run layer, above everything else: the job spec ([`job`]: the train config as one value beside the job's
//! own sections, validated once), the supervisor of `radit run` ([`supervise`]: it hosts the coordinator, starts
//! generations of ranks through a launcher, restarts them, pushes metrics), its progress line ([`report`]), and
//! the samples drawn from a finished run ([`samples`]). This is the only crate that composes a train config,
//! coordinator settings, launchers and monitoring; launchers themselves (`radit_launch`) know none of them.

pub mod job;
pub mod kinds;
pub mod quickstart;
pub mod report;
pub mod samples;
pub mod shard;
pub mod supervise;
pub mod sweep;
pub mod workflow;
