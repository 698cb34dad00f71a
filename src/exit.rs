//! Exit codes by meaning, in one place: what the caller (a person, a script, Slurm, the supervisor) should do next.
//! 75 asks for a retry or requeue (and is what the sbatch script requeues on), 2 asks for a change of input or
//! settings, 1 is any other failure (look at the message and the logs).

use radit_engine::checkpoint::CheckpointError;
use radit_engine::collective::CollectiveError;
use radit_engine::membership::JoinError;
use radit_engine::membership::RankStartError;
use radit_engine::placement::PlacementError;
use radit_jobs::journal::RankError;
use radit_jobs::train::TrainError;
use radit_models::model::ModelError;
use radit_protocol::ConfigError;
use radit_protocol::REQUEUE_EXIT_CODE;
use radit_run::job::JobError;
use radit_run::quickstart::QuickstartError;
use radit_run::supervise::SuperviseError;
use radit_run::workflow::RunError;
use radit_sharding::ShardError;
use radit_sharding::store::StorageError;

/// Any other failure; also: the store was checked and disagrees with its manifest.
pub const FAILED: u8 = 1;
pub const VERIFY_FAILED: u8 = FAILED;
/// Bad input or settings: fix them and run again.
pub const BAD_INPUT: u8 = 2;
/// Infrastructure failed (storage, network): retrying or requeueing may succeed. A rank that checkpointed for a
/// requeue exits with it too.
pub const RETRYABLE: u8 = REQUEUE_EXIT_CODE as u8;

/// A rank's exit code at its end: 0, or [`RETRYABLE`] when it stopped early for a requeue.
pub fn done_or_requeue(stopped_for_requeue: bool) -> u8 {
    if stopped_for_requeue { RETRYABLE } else { 0 }
}

/// Arguments that cannot work: the caller must change them.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `Err(usage!(...))`: an argument error, exit 2.
macro_rules! usage {
    ($($t:tt)*) => { anyhow::Error::new($crate::exit::Usage(format!($($t)*))) };
}
pub(crate) use usage;

/// `ensure_usage!(cond, ...)`: unless `cond`, return an argument error (exit 2).
macro_rules! ensure_usage {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            return Err($crate::exit::usage!($($t)*));
        }
    };
}
pub(crate) use ensure_usage;

/// `bail_usage!(...)`: return an argument error (exit 2).
macro_rules! bail_usage {
    ($($t:tt)*) => { return Err($crate::exit::usage!($($t)*)) };
}
pub(crate) use bail_usage;

fn shard_meaning(s: &ShardError) -> u8 {
    match s {
        _ if s.is_retryable() => RETRYABLE,
        ShardError::Internal(_) | ShardError::Encode { .. } => FAILED,
        _ => BAD_INPUT,
    }
}

fn checkpoint_meaning(c: &CheckpointError) -> Option<u8> {
    match c {
        CheckpointError::Mismatch { .. } | CheckpointError::Empty { .. } => Some(BAD_INPUT),
        CheckpointError::WriteFailed { .. } => Some(FAILED),
        _ => None,
    }
}

/// What one error in a chain says about the exit code; `None`: look further down the chain.
fn meaning(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    // Out of memory: the same settings fail the same way (a smaller batch or more ranks, not a retry).
    if e.is::<Usage>()
        || e.is::<ConfigError>()
        || e.is::<JobError>()
        || e.is::<PlacementError>()
        || e.is::<radit_engine::out_of_memory::OutOfMemory>()
    {
        return Some(BAD_INPUT);
    }
    if let Some(radit_run::shard::ShardRunError::PushInterval(_)) = e.downcast_ref() {
        return Some(BAD_INPUT);
    }
    if let Some(radit_jobs::sample::SampleError::Request(_)) = e.downcast_ref() {
        return Some(BAD_INPUT);
    }
    if let Some(s) = e.downcast_ref::<ShardError>() {
        return Some(shard_meaning(s));
    }
    if let Some(s) = e.downcast_ref::<radit_sources::SourceError>() {
        return Some(match s {
            radit_sources::SourceError::Write { .. } => FAILED,
            _ => BAD_INPUT,
        });
    }
    if let Some(s) = e.downcast_ref::<StorageError>() {
        return Some(match s {
            _ if s.is_retryable() => RETRYABLE,
            StorageError::Runtime(_) => FAILED,
            _ => BAD_INPUT,
        });
    }
    if let Some(t) = e.downcast_ref::<TrainError>() {
        return match t {
            TrainError::InvalidConfig { .. }
            | TrainError::ConfigFile { .. }
            | TrainError::OutOfMemory { .. }
            | TrainError::DataEnded { .. } => Some(BAD_INPUT),
            TrainError::Diverged { .. } | TrainError::Superseded { .. } => Some(FAILED),
            // Transparent: the checkpoint error is not a link of its own in the chain.
            TrainError::Checkpoint(c) => checkpoint_meaning(c),
            _ => None,
        };
    }
    if let Some(x) = e.downcast_ref::<RankError>() {
        return match x {
            RankError::Superseded => Some(FAILED),
            // Transparent: the store error is not a link of its own in the chain.
            RankError::Store(s) => Some(shard_meaning(s)),
            x if x.repeats() || matches!(x, RankError::Io { .. }) => Some(BAD_INPUT),
            _ => None,
        };
    }
    if e.is::<radit_eval::EvalError>() {
        // Every metric error is about its inputs (files, shapes, values) except non-convergence, a bug.
        return Some(match e.downcast_ref::<radit_eval::EvalError>() {
            Some(radit_eval::EvalError::Numerical { .. }) => FAILED,
            _ => BAD_INPUT,
        });
    }
    if let Some(m) = e.downcast_ref::<ModelError>() {
        return match m {
            ModelError::UnknownPreset { .. }
            | ModelError::InvalidConfig { .. }
            | ModelError::BadInput { .. }
            | ModelError::BadWeights { .. }
            | ModelError::Io { .. } => Some(BAD_INPUT),
            _ => None,
        };
    }
    if let Some(c) = e.downcast_ref::<CheckpointError>() {
        return checkpoint_meaning(c);
    }
    if let Some(c) = e.downcast_ref::<CollectiveError>() {
        // A group that cannot form here (a batch script's lone process, no NCCL) is a launch mistake; a peer
        // that died is a failure for the supervisor to act on, never a requeue.
        return match c {
            CollectiveError::Launch { .. }
            | CollectiveError::Unavailable { .. }
            | CollectiveError::Usage { .. } => Some(BAD_INPUT),
            _ => Some(FAILED),
        };
    }
    if let Some(j) = e.downcast_ref::<JoinError>() {
        return match j {
            JoinError::Environment { .. } => Some(BAD_INPUT),
            _ => None,
        };
    }
    if let Some(s) = e.downcast_ref::<SuperviseError>() {
        return match s {
            SuperviseError::Bind { .. } | SuperviseError::Pushgateway(_) => Some(BAD_INPUT),
            _ => None,
        };
    }
    None
}

/// The library errors that wrap another transparently, unwrapped into the chain, so that [`code_of`] sees the
/// wrapped error's type (a transparent wrapper hides it: its `source` is the inner error's source).
pub fn unwrapped(e: impl Into<Wrapped>) -> anyhow::Error {
    match e.into() {
        Wrapped::Run(RunError::Supervise(e)) => e.into(),
        Wrapped::Run(RunError::Samples(e)) => e.into(),
        Wrapped::Run(RunError::Slurm(e)) => e.into(),
        Wrapped::Run(e) => e.into(),
        Wrapped::Quickstart(QuickstartError::Run(e)) => unwrapped(e),
        Wrapped::Quickstart(QuickstartError::Job(e)) => e.into(),
        Wrapped::Quickstart(e) => e.into(),
        Wrapped::RankStart(RankStartError::Join(e)) => e.into(),
        Wrapped::RankStart(e) => e.into(),
    }
}

/// The errors [`unwrapped`] takes apart.
pub enum Wrapped {
    Run(RunError),
    Quickstart(QuickstartError),
    RankStart(RankStartError),
}

impl From<RunError> for Wrapped {
    fn from(e: RunError) -> Self {
        Wrapped::Run(e)
    }
}

impl From<QuickstartError> for Wrapped {
    fn from(e: QuickstartError) -> Self {
        Wrapped::Quickstart(e)
    }
}

impl From<RankStartError> for Wrapped {
    fn from(e: RankStartError) -> Self {
        Wrapped::RankStart(e)
    }
}

/// The exit code of a failed command: the first error in its chain that says what to do, else [`FAILED`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    e.chain().find_map(meaning).unwrap_or(FAILED)
}

/// The error as one line, outermost first, without the links that only repeat what an outer one already said
/// (an error whose message includes its source's text, wrapped several times, would otherwise print it as often).
pub fn describe(e: &anyhow::Error) -> String {
    let mut said = String::new();
    for link in e.chain() {
        let text = link.to_string();
        let text = text.trim();
        if text.is_empty() || said.contains(text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(text);
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_meaning_of_the_first_error_that_has_one() {
        let storage = ShardError::InputIo {
            path: "/lustre/cxr/a.dcm".into(),
            source: std::io::Error::other("stale file handle"),
        };
        assert_eq!(
            code_of(&anyhow::Error::new(storage).context("reading")),
            RETRYABLE
        );
        let bad = TrainError::InvalidConfig(ConfigError::new("train.steps", "must be positive"));
        assert_eq!(code_of(&anyhow::Error::new(bad)), BAD_INPUT);
        assert_eq!(code_of(&usage!("--ranks must be positive")), BAD_INPUT);
        let diverged = TrainError::Diverged {
            step: 3,
            consecutive: 3,
            why: "no checkpoint".into(),
        };
        assert_eq!(code_of(&anyhow::Error::new(diverged)), FAILED);
        assert_eq!(code_of(&anyhow::anyhow!("something else")), FAILED);
    }

    #[test]
    fn a_chain_is_described_once_per_distinct_message() {
        let inner = std::io::Error::other("URL scheme is not allowed");
        let e = anyhow::Error::new(inner)
            .context("storage error at s3://b/k: URL scheme is not allowed")
            .context("reading the manifest")
            .context("reading the manifest");
        assert_eq!(
            describe(&e),
            "reading the manifest: storage error at s3://b/k: URL scheme is not allowed"
        );
    }

    #[test]
    fn wrapped_errors_keep_their_exit_codes() {
        let bind = RunError::Supervise(SuperviseError::Bind {
            bind: "127.0.0.1:1".into(),
            reason: "in use".into(),
        });
        assert_eq!(code_of(&unwrapped(bind)), BAD_INPUT);
        let join = RankStartError::Join(JoinError::Environment {
            var: "RADIT_COORDINATOR",
            reason: "`bad` is not IP:PORT".into(),
        });
        assert_eq!(code_of(&unwrapped(join)), BAD_INPUT);
        let quickstart = QuickstartError::Run(RunError::Supervise(SuperviseError::Bind {
            bind: "x".into(),
            reason: "y".into(),
        }));
        assert_eq!(code_of(&unwrapped(quickstart)), BAD_INPUT);
    }
}
