//! `radit run JOB.toml`: one job spec, one command, over `radit_run::workflow` (supervise here, or submit to
//! Slurm and follow); and `radit coordinator bench`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::Context;
use clap::Args;
use radit_launch::slurm::render_sbatch;
use radit_run::job::{Job, LauncherKind};
use radit_run::sweep::Sweep;
use radit_run::workflow::run_job;

#[derive(Args)]
pub struct RunArgs {
    /// The job spec (TOML): data, model, training, checkpoint, resources, launcher, restart, monitoring.
    job: PathBuf,
    /// Print the resolved plan (ranks, data slices, launch command or sbatch script) and the checks the ranks
    /// would make at their start (the store, its samples against the model, the splits, the weights' presets),
    /// and start nothing.
    #[arg(long)]
    dry_run: bool,
    /// Skip the checks before launch (planning away from the data: the store or the weights are not reachable
    /// from here).
    #[arg(long)]
    no_check: bool,
    /// A sweep's table only: per run its settings and its last loss, validation loss and mini-FD (from each run's
    /// metrics.csv), printed and written to <run_dir>/sweep/sweep.csv; starts nothing.
    #[arg(long, conflicts_with = "dry_run")]
    summary: bool,
    /// Inside a Slurm allocation (the rendered batch script passes this): supervise srun tasks here.
    #[arg(long, hide = true)]
    in_allocation: bool,
}

/// The pending SIGUSR1, SIGTERM or SIGINT (0 for none), for the supervisor to forward to the ranks as a stop.
pub fn stop_signal() -> anyhow::Result<Arc<AtomicUsize>> {
    let signal = Arc::new(AtomicUsize::new(0));
    for s in [
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register_usize(s, signal.clone(), s as usize)
            .context("installing the signal handlers")?;
    }
    Ok(signal)
}

pub fn run(a: RunArgs) -> anyhow::Result<u8> {
    if let Some(sweep) = Sweep::load(&a.job)? {
        return run_sweep(&sweep, &a);
    }
    crate::exit::ensure_usage!(
        !a.summary,
        "--summary is a sweep's table: {} has no [sweep]",
        a.job.display()
    );
    let job = Job::load(&a.job)?;
    let radit = std::env::current_exe().context("locating the radit binary")?;
    if a.dry_run {
        print!("{}", job.describe(&radit.display().to_string()));
    }
    // What the ranks check at their start, here first: a wrong store or weights file is named before any rank
    // starts (on Slurm, before the queue). The `--in-allocation` run checks again on purpose: one manifest read,
    // and the data may have changed during the queue wait.
    let checked = if a.no_check {
        vec!["skipped (--no-check)".to_string()]
    } else {
        job.check_before_launch()?
    };
    if a.dry_run {
        println!("checked before launch:");
        for line in checked.iter().filter(|l| !l.is_empty()) {
            println!("  {line}");
        }
        return Ok(0);
    }
    let signal = stop_signal()?;
    let end = run_job(&job, &radit, a.in_allocation, &signal).map_err(crate::exit::unwrapped)?;
    eprintln!("{end}");
    Ok(end.exit_code())
}

/// A job spec with a `[sweep]`: its runs, as one Slurm array or one after another here.
fn run_sweep(sweep: &Sweep, a: &RunArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(
        !a.in_allocation,
        "--in-allocation runs one run of a sweep: give its spec (in {})",
        sweep.dir.display()
    );
    if a.summary {
        print!("{}", sweep.summary()?);
        return Ok(0);
    }
    let radit = std::env::current_exe().context("locating the radit binary")?;
    let radit_path = radit.display().to_string();
    let slurm = sweep.runs[0].1.spec.launcher.kind == LauncherKind::Slurm;
    if a.dry_run {
        print!("{}", sweep.describe());
        if slurm {
            println!(
                "sbatch array script ({}):",
                sweep.dir.join("sweep.sbatch").display()
            );
            print!("{}", render_sbatch(&sweep.slurm_array(&radit_path)));
        }
    }
    if !a.no_check {
        for (run, job) in &sweep.runs {
            let checked = job
                .check_before_launch()
                .with_context(|| format!("run {}", run.name))?;
            if a.dry_run {
                println!("checked before launch, run {}:", run.name);
                for line in checked.iter().filter(|l| !l.is_empty()) {
                    println!("  {line}");
                }
            }
        }
    }
    if a.dry_run {
        return Ok(0);
    }
    sweep.write_runs()?;
    if slurm {
        let script = sweep.dir.join("sweep.sbatch");
        std::fs::write(&script, render_sbatch(&sweep.slurm_array(&radit_path)))
            .with_context(|| format!("writing {}", script.display()))?;
        let id = radit_launch::slurm::submit(&script)?;
        println!(
            "submitted Slurm array job {id}: {} runs ({}), output in {}/slurm-{id}_<task>.out; each run              requeues itself as one job would",
            sweep.runs.len(),
            script.display(),
            sweep.dir.display()
        );
        return Ok(0);
    }
    let signal = stop_signal()?;
    let mut worst = 0;
    for (run, _) in &sweep.runs {
        // The run's own spec, as the array would run it.
        let job = Job::load(&sweep.run_file(&run.name))?;
        eprintln!(
            "radit: sweep run {} of {}: {}",
            run.name,
            sweep.runs.len(),
            job.run_dir.display()
        );
        let end = run_job(&job, &radit, false, &signal).map_err(crate::exit::unwrapped)?;
        eprintln!("radit: run {}: {end}", run.name);
        if worst == 0 {
            worst = end.exit_code();
        }
        if signal.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            break;
        }
    }
    print!("{}", sweep.summary()?);
    Ok(worst)
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
