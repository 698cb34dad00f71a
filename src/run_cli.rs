//! `radit run JOB.toml`: one job spec, one command. Local and mpirun jobs are supervised here; Slurm jobs are
//! rendered, submitted with sbatch and followed, and their batch step runs `radit run JOB --in-allocation`, which
//! supervises srun tasks. A completed run draws samples from its final EMA weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::Context;
use clap::Args;
use radit_launch::slurm::{self, REQUEUE_EXIT_CODE};
use radit_run::job::Job;
use radit_run::samples::draw_final_samples;
use radit_run::supervise::{Outcome, supervise};

#[derive(Args)]
pub struct RunArgs {
    /// The job spec (TOML): data, model, training, checkpoint, resources, launcher, restart, monitoring.
    job: PathBuf,
    /// Print the resolved plan (ranks, data slices, launch command or sbatch script) and start nothing.
    #[arg(long)]
    dry_run: bool,
    /// Inside a Slurm allocation (the rendered batch script passes this): supervise srun tasks here.
    #[arg(long, hide = true)]
    in_allocation: bool,
}

impl RunArgs {
    pub fn new(job: PathBuf) -> Self {
        Self {
            job,
            dry_run: false,
            in_allocation: false,
        }
    }
}

/// The run failed for good (restart budget spent): look at the logs in the run directory.
const RUN_FAILED: u8 = 1;

pub fn run(a: RunArgs) -> anyhow::Result<u8> {
    let job = Job::load(&a.job)?;
    let radit = std::env::current_exe().context("locating the radit binary")?;
    if a.dry_run {
        print!("{}", job.describe(&radit.display().to_string()));
        return Ok(0);
    }
    let signal = Arc::new(AtomicUsize::new(0));
    for s in [
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register_usize(s, signal.clone(), s as usize)
            .context("installing the signal handlers")?;
    }
    let Some(launcher) = job.launcher(a.in_allocation) else {
        return submit_and_follow(&job, &radit, &signal);
    };
    let outcome = supervise(&job, launcher.as_ref(), &radit, &signal)?;
    match outcome {
        Outcome::Completed { restarts } => {
            eprintln!("radit: run complete after {restarts} restart(s)");
            if let Some(s) = draw_final_samples(&job)? {
                eprintln!(
                    "radit: {} samples and contact sheet in {} (final EMA weights: {})",
                    job.spec.samples.count,
                    s.dir.display(),
                    s.weights.display()
                );
            }
            Ok(0)
        }
        Outcome::Requeue { .. } => Ok(REQUEUE_EXIT_CODE as u8),
        Outcome::Failed { restarts, reason } => {
            eprintln!(
                "radit: the run failed after {restarts} restart(s): {reason}; logs in {}",
                job.run_dir.join("logs").display()
            );
            Ok(RUN_FAILED)
        }
    }
}

/// Renders the sbatch script into the run directory, submits it and follows the job (through requeues).
fn submit_and_follow(job: &Job, radit: &Path, signal: &AtomicUsize) -> anyhow::Result<u8> {
    std::fs::create_dir_all(&job.run_dir)
        .with_context(|| format!("creating {}", job.run_dir.display()))?;
    let script = job.run_dir.join("job.sbatch");
    std::fs::write(
        &script,
        slurm::render_sbatch(&job.slurm_job(&radit.display().to_string())),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let id = slurm::submit(&script)?;
    eprintln!(
        "radit: submitted Slurm job {id} ({}); output in {}/slurm-{id}.out",
        script.display(),
        job.run_dir.display()
    );
    let poll = std::time::Duration::from_secs_f64(job.spec.launcher.slurm.poll_seconds);
    let interrupted = || signal.load(std::sync::atomic::Ordering::SeqCst) != 0;
    let Some(last) = slurm::follow(
        id,
        poll,
        |s| eprintln!("radit: Slurm job {id}: {}", s.state),
        interrupted,
    )?
    else {
        eprintln!(
            "radit: stopped following Slurm job {id}; it goes on (`scancel {id}` cancels it, \
             `scancel --signal=USR1 --batch {id}` checkpoints and requeues it)"
        );
        return Ok(0);
    };
    let code = last.exit_code.unwrap_or(-1);
    if last.state == "COMPLETED" && code == 0 {
        eprintln!("radit: Slurm job {id} completed");
        Ok(0)
    } else {
        eprintln!(
            "radit: Slurm job {id} ended {} with exit code {code}; see {}/slurm-{id}.out",
            last.state,
            job.run_dir.display()
        );
        Ok(RUN_FAILED)
    }
}

#[derive(clap::Subcommand)]
pub enum CoordinatorCommand {
    /// Scale by simulation: N simulated ranks join one coordinator on loopback and heartbeat it.
    Bench(CoordinatorBenchArgs),
}

#[derive(Args)]
pub struct CoordinatorBenchArgs {
    #[arg(long, default_value_t = 4096)]
    ranks: usize,
    /// Heartbeats per second per rank.
    #[arg(long, default_value_t = 1.0)]
    hz: f64,
    /// Length of the heartbeat phase.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Seconds between `/metrics` scrapes during it.
    #[arg(long, default_value_t = 15.0)]
    scrape_seconds: f64,
    #[arg(long)]
    json: bool,
}

pub fn run_coordinator(c: CoordinatorCommand) -> anyhow::Result<u8> {
    let CoordinatorCommand::Bench(a) = c;
    crate::exit::ensure_usage!(a.ranks > 0, "--ranks must be positive");
    crate::exit::ensure_usage!(
        a.hz > 0.0 && a.seconds > 0.0,
        "--hz and --seconds must be positive"
    );
    let r = radit_coordinator::simulate::simulate(&radit_coordinator::simulate::SimConfig {
        ranks: a.ranks,
        heartbeat_hz: a.hz,
        seconds: a.seconds,
        scrape_seconds: a.scrape_seconds,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} simulated ranks: joined in {:.2} s (coordinator CPU {:.2} s)",
            r.ranks, r.join_seconds, r.join_coordinator_cpu_seconds
        );
        println!(
            "heartbeats at {} Hz for {:.1} s: {} answered, {} failed; latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            r.heartbeat_hz,
            r.heartbeat_seconds,
            r.heartbeats,
            r.failed_requests,
            r.heartbeat_p50_ms,
            r.heartbeat_p99_ms,
            r.heartbeat_max_ms
        );
        println!(
            "coordinator CPU while heart-beating: {:.1} % of one core; {} health checks, {} false alarms",
            r.coordinator_cpu_percent, r.health_checks, r.false_alarms
        );
        println!(
            "/metrics: {} scrapes, slowest {:.1} ms, {:.1} MiB of exposition",
            r.scrapes,
            r.scrape_max_ms,
            r.exposition_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(if r.failed_requests == 0 && r.false_alarms == 0 {
        0
    } else {
        1
    })
}
