//! `radit run JOB` end to end, as a library call: a local or mpirun job is supervised here ([`supervise`]) and, once
//! complete, draws its final samples; a Slurm job outside an allocation is rendered, submitted with sbatch and
//! followed through its requeues (its batch step runs `radit run JOB --in-allocation`, which supervises srun tasks
//! here). The caller gets a [`RunEnd`] to print and an exit code that means what it says.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use radit_launch::slurm::{self, SlurmError};
use radit_protocol::REQUEUE_EXIT_CODE;

use crate::job::Job;
use crate::samples::{FinalSamples, SamplesError, draw_final_samples};
use crate::supervise::{Outcome, SuperviseError, supervise};

/// The run failed for good (restart budget spent, a Slurm job that ended badly): look at the logs.
pub const RUN_FAILED: u8 = 1;

/// How `radit run` ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Every rank finished; the final samples when the job asks for them.
    Completed {
        restarts: u32,
        samples: Option<FinalSamples>,
        count: u64,
    },
    /// Every rank checkpointed after a stop request: exit with the requeue code.
    Requeue,
    Failed {
        restarts: u32,
        reason: String,
        logs: PathBuf,
    },
    /// A submitted Slurm job that completed.
    SlurmCompleted { id: u64 },
    /// A submitted Slurm job that ended otherwise.
    SlurmEnded {
        id: u64,
        state: String,
        code: i32,
        output: PathBuf,
    },
    /// Following a submitted job stopped on a signal; the job goes on.
    StoppedFollowing { id: u64 },
}

impl RunEnd {
    /// The process's exit code: 0 done, 75 requeue me, 1 failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunEnd::Completed { .. }
            | RunEnd::SlurmCompleted { .. }
            | RunEnd::StoppedFollowing { .. } => 0,
            RunEnd::Requeue => REQUEUE_EXIT_CODE as u8,
            RunEnd::Failed { .. } | RunEnd::SlurmEnded { .. } => RUN_FAILED,
        }
    }
}

impl std::fmt::Display for RunEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunEnd::Completed {
                restarts,
                samples,
                count,
            } => {
                write!(f, "radit: run complete after {restarts} restart(s)")?;
                if let Some(s) = samples {
                    write!(
                        f,
                        "\nradit: {count} samples and contact sheet in {} (final EMA weights: {})",
                        s.dir.display(),
                        s.weights.display()
                    )?;
                }
                Ok(())
            }
            RunEnd::Requeue => write!(
                f,
                "radit: exiting {REQUEUE_EXIT_CODE} so the job is requeued"
            ),
            RunEnd::Failed {
                restarts,
                reason,
                logs,
            } => write!(
                f,
                "radit: the run failed after {restarts} restart(s): {reason}; logs in {}",
                logs.display()
            ),
            RunEnd::SlurmCompleted { id } => write!(f, "radit: Slurm job {id} completed"),
            RunEnd::SlurmEnded {
                id,
                state,
                code,
                output,
            } => write!(
                f,
                "radit: Slurm job {id} ended {state} with exit code {code}; see {}",
                output.display()
            ),
            RunEnd::StoppedFollowing { id } => write!(
                f,
                "radit: stopped following Slurm job {id}; it goes on (`scancel {id}` cancels it, \
                 `scancel --signal=USR1 --batch {id}` checkpoints and requeues it)"
            ),
        }
    }
}

/// Why `radit run` could not run the job (as opposed to the job failing, which is a [`RunEnd`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    #[error(transparent)]
    Samples(#[from] SamplesError),
    #[error(transparent)]
    Slurm(#[from] SlurmError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a loaded job with the radit binary `radit` for its ranks. `signal` holds a pending SIGUSR1/SIGTERM/SIGINT
/// (0 for none): the ranks checkpoint and stop, or following a Slurm job stops. `in_allocation`: this is the
/// batch step of a Slurm job (supervise srun tasks here).
pub fn run_job(
    job: &Job,
    radit: &Path,
    in_allocation: bool,
    signal: &AtomicUsize,
) -> Result<RunEnd, RunError> {
    let Some(launcher) = job.launcher(in_allocation) else {
        return submit_and_follow(job, radit, signal);
    };
    Ok(match supervise(job, launcher.as_ref(), radit, signal)? {
        Outcome::Completed { restarts } => RunEnd::Completed {
            restarts,
            samples: draw_final_samples(job)?,
            count: job.spec.samples.count,
        },
        Outcome::Requeue { .. } => RunEnd::Requeue,
        Outcome::Failed { restarts, reason } => RunEnd::Failed {
            restarts,
            reason,
            logs: job.run_dir.join("logs"),
        },
    })
}

/// Renders the sbatch script into the run directory, submits it and follows the job (through requeues).
fn submit_and_follow(job: &Job, radit: &Path, signal: &AtomicUsize) -> Result<RunEnd, RunError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Io { path, source }
    };
    std::fs::create_dir_all(&job.run_dir).map_err(io(&job.run_dir))?;
    let script = job.run_dir.join("job.sbatch");
    std::fs::write(
        &script,
        slurm::render_sbatch(&job.slurm_job(&radit.display().to_string())),
    )
    .map_err(io(&script))?;
    let id = slurm::submit(&script)?;
    let output = job.run_dir.join(format!("slurm-{id}.out"));
    eprintln!(
        "radit: submitted Slurm job {id} ({}); output in {}",
        script.display(),
        output.display()
    );
    let poll = std::time::Duration::from_secs_f64(job.spec.launcher.slurm.poll_seconds);
    let interrupted = || signal.load(Ordering::SeqCst) != 0;
    let followed = slurm::follow(
        id,
        poll,
        |s| eprintln!("radit: Slurm job {id}: {}", s.state),
        interrupted,
    )?;
    Ok(match followed {
        None => RunEnd::StoppedFollowing { id },
        Some(last) if last.state == "COMPLETED" && last.exit_code == Some(0) => {
            RunEnd::SlurmCompleted { id }
        }
        Some(last) => RunEnd::SlurmEnded {
            id,
            state: last.state,
            code: last.exit_code.unwrap_or(-1),
            output,
        },
    })
}
