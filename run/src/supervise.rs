//! The supervisor behind `radit run`: it hosts the coordinator, starts a generation of ranks through a
//! [`Launcher`], watches their exits, heartbeats and progress, and relaunches every rank from the last committed
//! checkpoint when one fails or hangs, within the restart budget. SIGUSR1/SIGTERM become a checkpoint at a common
//! step and the requeue exit code.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use radit_coordinator::{CoordinatorConfig, JobHealth, Service, Totals};
use radit_protocol::JobToken;
use radit_protocol::env::{self, still_running};

use radit_monitoring::{Pusher, Pushgateway};

use crate::job::Job;
use crate::report::Reporter;
use radit_launch::launcher::{Ended, GroupState, Launcher, RankCommand};
use radit_protocol::REQUEUE_EXIT_CODE;

/// How a supervised run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every rank finished all steps.
    Completed { restarts: u32 },
    /// Every rank checkpointed at the same step after a stop request (signal, or lost coordinator): requeue.
    Requeue { restarts: u32 },
    /// The restart budget is spent, or the ranks cannot start at all.
    Failed { restarts: u32, reason: String },
}

/// The coordinator's certificate authority in the run directory (when it serves HTTPS).
pub const CA_FILE: &str = "coordinator-ca.pem";
/// Its SHA-256 (hex), beside it.
pub const CA_SHA256_FILE: &str = "coordinator-ca.pem.sha256";

/// The run's counters for the progress line, or (before any rank reported) its step alone; `true` when counted.
fn snapshot(coordinator: &radit_coordinator::Coordinator) -> (Totals, bool) {
    match coordinator.totals() {
        Some(t) => (t, true),
        None => {
            let (step, median_step_seconds) = coordinator.progress();
            let totals = Totals {
                step,
                images: 0.0,
                tokens: 0.0,
                model_flops: 0.0,
                loss: f64::NAN,
                loss_max: f64::NAN,
                median_step_seconds,
                checkpoint: coordinator.checkpoints().last().copied(),
                val_loss: None,
                fd: None,
                pace: Default::default(),
            };
            (totals, false)
        }
    }
}

/// Waits for rank processes that a killed supervisor left behind on this node (they checkpoint and exit once they
/// notice the coordinator is gone), so two generations never write the same run.
fn wait_for_orphans(pid_dir: &std::path::Path, grace: Duration) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return Ok(());
    };
    let mut records = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let record = std::fs::read_to_string(&path).unwrap_or_default();
        match still_running(&record) {
            Some(_) => records.push(record),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if records.is_empty() {
        return Ok(());
    }
    let pids: Vec<u32> = records.iter().filter_map(|r| still_running(r)).collect();
    tracing::warn!(
        ?pids,
        "ranks of an earlier supervisor are still running; waiting for them to checkpoint and exit"
    );
    eprintln!("radit: waiting for ranks {pids:?} of an earlier run to checkpoint and exit");
    let deadline = Instant::now() + grace + Duration::from_secs(300);
    while records.iter().any(|r| still_running(r).is_some()) {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "ranks {pids:?} of an earlier run are still alive; stop them before restarting"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The run directory, ready for a generation of ranks.
struct Prepared {
    total_steps: u64,
    pid_dir: std::path::PathBuf,
    token: JobToken,
    token_path: std::path::PathBuf,
}

/// Prepares the run directory: the ranks' config (as it was validated when the job was loaded), the plan's total
/// steps, no rank of an earlier supervisor still running, and a fresh job token (ranks of an earlier supervisor
/// cannot join or heartbeat into this run).
fn prepare_run_dir(job: &Job) -> Result<Prepared, SuperviseError> {
    let run_dir = &job.run_dir;
    std::fs::create_dir_all(run_dir).map_err(|e| SuperviseError::io(run_dir, e))?;
    let rank_toml = job.rank_config_toml().map_err(SuperviseError::RankConfig)?;
    let rank_path = job.rank_config_path();
    std::fs::write(&rank_path, rank_toml).map_err(|e| SuperviseError::io(&rank_path, e))?;
    let total_steps = job.total_steps().map_err(SuperviseError::Plan)?;
    let pid_dir = run_dir.join("ranks");
    wait_for_orphans(&pid_dir, job.spec.restart.coordinator_grace())
        .map_err(|e| SuperviseError::io(&pid_dir, e))?;
    let token = JobToken::generate().map_err(SuperviseError::Token)?;
    let token_path = job.token_path();
    let _ = std::fs::remove_file(&token_path);
    token
        .write_private(&token_path)
        .map_err(|e| SuperviseError::io(&token_path, e))?;
    Ok(Prepared {
        total_steps,
        pid_dir,
        token,
        token_path,
    })
}

/// Runs the job to completion, a requeue, or failure. `signal` holds the number of a pending SIGUSR1/SIGTERM/SIGINT
/// (0 for none); it is forwarded to the ranks as a stop request.
pub fn supervise(
    job: &Job,
    launcher: &dyn Launcher,
    radit: &std::path::Path,
    signal: &AtomicUsize,
) -> Result<Outcome, SuperviseError> {
    let spec = &job.spec;
    let run_dir = &job.run_dir;
    let Prepared {
        total_steps,
        pid_dir,
        token,
        token_path,
    } = prepare_run_dir(job)?;
    let ccfg = CoordinatorConfig {
        total_steps: Some(total_steps),
        peak_flops_per_device: job.peak_flops_per_device(),
        ..spec.restart.coordinator_config(job.world as usize)
    };
    let join_deadline = ccfg.join_timeout + Duration::from_secs(30);
    let bind_error = |reason: String| SuperviseError::Bind {
        bind: spec.coordinator.bind.clone(),
        reason,
    };
    let addr = radit_coordinator::service::resolve_bind(&spec.coordinator.bind)
        .map_err(|e| bind_error(e.to_string()))?;
    // The address is handed to the ranks: it must be one they can reach.
    if addr.ip().is_unspecified() || (spec.resources.nodes > 1 && addr.ip().is_loopback()) {
        return Err(bind_error(format!(
            "resolves to {}, which ranks on other nodes cannot use: give this node's address on the job's network",
            addr.ip()
        )));
    }
    // HTTPS for a job across nodes: a certificate authority made for this run (like the token); only its
    // certificate is written, for the ranks (and Prometheus) to trust, and its SHA-256 goes to the ranks to pin.
    let pki = if spec.coordinator.tls_for(spec.resources.nodes) {
        let hostname = spec
            .coordinator
            .bind
            .starts_with("hostname:")
            .then(radit_protocol::env::hostname)
            .flatten();
        let pki = radit_coordinator::tls::JobPki::generate(addr.ip(), hostname.as_deref())
            .map_err(|e| bind_error(e.to_string()))?;
        let ca_path = run_dir.join(CA_FILE);
        std::fs::write(&ca_path, &pki.ca_pem).map_err(|e| SuperviseError::io(&ca_path, e))?;
        // Its fingerprint beside it, for an operator's client (curl --cacert, a monitoring probe) to check.
        let sha_path = run_dir.join(CA_SHA256_FILE);
        std::fs::write(&sha_path, format!("{}\n", pki.ca_sha256))
            .map_err(|e| SuperviseError::io(&sha_path, e))?;
        tracing::info!(ca = %ca_path.display(), sha256 = pki.ca_sha256, "coordinator serves HTTPS");
        Some(pki)
    } else {
        let _ = std::fs::remove_file(run_dir.join(CA_FILE));
        let _ = std::fs::remove_file(run_dir.join(CA_SHA256_FILE));
        None
    };
    let service = Service::start_with(&addr.to_string(), ccfg, token, pki.as_ref())
        .map_err(|e| bind_error(e.to_string()))?;
    let coordinator = service.coordinator.clone();
    tracing::info!(addr = %service.addr, world = job.world, launcher = launcher.name(), "coordinator up");
    // Written whole (rename) so that a reader never sees half an address.
    let addr_file = run_dir.join("coordinator.addr");
    std::fs::write(
        addr_file.with_extension("addr.tmp"),
        service.addr.to_string(),
    )
    .and_then(|()| std::fs::rename(addr_file.with_extension("addr.tmp"), &addr_file))
    .map_err(|e| SuperviseError::io(&addr_file, e))?;
    // The same address as a Prometheus file_sd target list: a scrape config pointing at it (and at job.token,
    // which every `radit run` renews) follows the job through requeues onto other nodes.
    let targets = run_dir.join("prometheus-targets.json");
    std::fs::write(
        targets.with_extension("json.tmp"),
        format!("[{{\"targets\": [\"{}\"]}}]\n", service.addr),
    )
    .and_then(|()| std::fs::rename(targets.with_extension("json.tmp"), &targets))
    .map_err(|e| SuperviseError::io(&targets, e))?;

    // Dropped on every way out of this function: the job's series leave the Pushgateway with it.
    let _pusher = match &spec.monitoring.pushgateway {
        Some(url) => {
            let gateway =
                Pushgateway::new(url, &spec.job.name, &[]).map_err(SuperviseError::Pushgateway)?;
            let c = coordinator.clone();
            tracing::info!(url, group = gateway.group_path(), "pushing metrics");
            Some(Pusher::start(
                gateway,
                Duration::from_secs_f64(spec.monitoring.push_seconds),
                move || c.metrics(),
            ))
        }
        None => None,
    };
    let mut restarts = 0u32;
    let mut reporter = Reporter::new(
        total_steps,
        job.peak_flops_per_device().map(|p| p * job.world as f64),
    );
    let progress_every = Duration::from_secs_f64(spec.monitoring.progress_seconds);
    loop {
        let generation = coordinator.new_generation();
        let rank_env = env::RankEnvironment {
            coordinator: service.addr.to_string(),
            token_file: token_path.display().to_string(),
            generation,
            coordinator_grace_seconds: spec.restart.coordinator_grace_seconds,
            rendezvous_seconds: spec.restart.rendezvous_seconds,
            collective_timeout_seconds: spec.restart.collective_timeout_seconds,
            pid_dir: pid_dir.display().to_string(),
            ca: pki.as_ref().map(|p| {
                (
                    run_dir.join(CA_FILE).display().to_string(),
                    p.ca_sha256.clone(),
                )
            }),
        };
        let cmd = RankCommand {
            program: radit.to_path_buf(),
            args: job.rank_args(),
            env: rank_env.vars(),
            world: job.world,
            log_dir: run_dir.join("logs"),
        };
        let mut group = launcher
            .start(&cmd, generation)
            .map_err(|e| SuperviseError::Launch {
                launcher: launcher.name(),
                source: e,
            })?;
        tracing::info!(generation, pids = ?group.pids(), "ranks started");
        reporter.say(&format!(
            "radit: generation {generation}: {} rank(s) started by {} (logs in {})",
            job.world,
            launcher.name(),
            cmd.log_dir.display()
        ));
        let (mut stop_sent, mut usr1_sent) = (false, false);
        // mpirun and srun are one process for all ranks: name it as such.
        let process = |i: usize| {
            if launcher.process_per_rank() {
                format!("rank {i}")
            } else {
                launcher.name().to_string()
            }
        };
        let mut last_progress = Instant::now();
        let started = Instant::now();
        let failure: String = loop {
            std::thread::sleep(Duration::from_millis(100));
            let sig = signal.load(Ordering::SeqCst);
            let formed = !matches!(coordinator.health(), JobHealth::Forming { .. });
            if sig != 0 && !stop_sent {
                tracing::warn!(
                    signal = sig,
                    "stop requested: every rank checkpoints at the same step"
                );
                reporter.say(&format!(
                    "radit: signal {sig}: asking every rank to checkpoint and stop"
                ));
                // Heartbeat replies carry it to every rank, including those still starting.
                coordinator.request_stop();
                stop_sent = true;
            }
            // USR1 also travels through the launcher, once every rank has joined (and so has its handler in
            // place: before that, USR1 would kill it).
            if stop_sent && !usr1_sent && formed {
                group.signal(libc::SIGUSR1);
                usr1_sent = true;
            }
            let state = group.poll().map_err(SuperviseError::Watch)?;
            let health = coordinator.health();
            let seen = Poll {
                state: &state,
                health: &health,
                join_overdue: !formed && started.elapsed() > join_deadline,
                join_deadline_seconds: join_deadline.as_secs(),
                stop_sent,
                all_departed_at: coordinator.all_departed(),
                total_steps,
            };
            match decide(&seen, &process) {
                Decision::Wait => {}
                Decision::Completed => {
                    let (totals, counted) = snapshot(&coordinator);
                    reporter.update(totals, generation, counted);
                    reporter.say(&format!("radit: all {} ranks finished", job.world));
                    return Ok(Outcome::Completed { restarts });
                }
                Decision::Requeue(why) => {
                    reporter.say(&why);
                    return Ok(Outcome::Requeue { restarts });
                }
                Decision::Fail { reason, hang } => {
                    if hang {
                        coordinator.record_hang();
                        tracing::error!(%reason, "hang detected");
                    }
                    break reason;
                }
            }
            if !progress_every.is_zero() && last_progress.elapsed() >= progress_every {
                last_progress = Instant::now();
                let (totals, counted) = snapshot(&coordinator);
                reporter.update(totals, generation, counted);
            }
        };
        tracing::error!(generation, reason = %failure, "the run failed");
        reporter.say(&format!("radit: generation {generation} failed: {failure}"));
        group.kill();
        // A rank that ran out of memory would do so again: stop and say what to change.
        if let Some((rank, why)) = coordinator.fatal() {
            return Ok(Outcome::Failed {
                restarts,
                reason: format!(
                    "rank {rank}: {why} (not relaunched: the same configuration would fail again)"
                ),
            });
        }
        if stop_sent {
            return Ok(Outcome::Failed {
                restarts,
                reason: format!("{failure} (while stopping)"),
            });
        }
        if restarts >= spec.restart.max_restarts {
            return Ok(Outcome::Failed {
                restarts,
                reason: format!(
                    "{failure}; the restart budget ({}) is spent",
                    spec.restart.max_restarts
                ),
            });
        }
        restarts += 1;
        reporter.say(&format!(
            "radit: restart {restarts}/{}: relaunching every rank from the last committed checkpoint",
            spec.restart.max_restarts
        ));
    }
}

/// What the supervisor sees at one poll of a generation.
pub struct Poll<'a> {
    pub state: &'a GroupState,
    pub health: &'a JobHealth,
    /// Not every rank has joined, and the join deadline has passed.
    pub join_overdue: bool,
    pub join_deadline_seconds: u64,
    /// A stop (signal) has been sent to the ranks.
    pub stop_sent: bool,
    /// Every rank said goodbye after a committed checkpoint at this step.
    pub all_departed_at: Option<u64>,
    pub total_steps: u64,
}

/// What to do about a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait,
    /// Every rank finished all steps.
    Completed,
    /// Every rank checkpointed: exit with the requeue code, saying this.
    Requeue(String),
    /// The generation failed (a hang when `hang`): relaunch within the budget, or give up.
    Fail {
        reason: String,
        hang: bool,
    },
}

/// The supervisor's decision at one poll, from what it sees alone (no process, no clock): `process(i)` names
/// process `i` ("rank 3", or "srun" for a launcher with one process for all ranks).
pub fn decide(seen: &Poll, process: &dyn Fn(usize) -> String) -> Decision {
    if seen.join_overdue {
        return Decision::Fail {
            reason: format!(
                "the ranks did not all join within {} s",
                seen.join_deadline_seconds
            ),
            hang: false,
        };
    }
    let fail = |reason: String| Decision::Fail {
        reason,
        hang: false,
    };
    match seen.state {
        GroupState::Running => {}
        GroupState::Failed { index, ended } => {
            return fail(format!("{} ended with {ended}", process(*index)));
        }
        GroupState::Ended(all) => {
            if all.iter().all(|e| *e == Ended::Code(0)) {
                return Decision::Completed;
            }
            if all
                .iter()
                .all(|e| matches!(e, Ended::Code(0) | Ended::Code(REQUEUE_EXIT_CODE)))
            {
                return Decision::Requeue(format!(
                    "radit: every rank checkpointed; exiting {REQUEUE_EXIT_CODE} so the job is requeued"
                ));
            }
            // srun kills the slower ranks once the first has left with 75 and reports their deaths; the ranks'
            // goodbyes (sent after the checkpoint committed) say whether the stop was orderly.
            if let Some(step) = seen.all_departed_at {
                if step >= seen.total_steps {
                    return Decision::Completed;
                }
                return Decision::Requeue(format!(
                    "radit: every rank checkpointed at step {step}; exiting {REQUEUE_EXIT_CODE} so the job is requeued"
                ));
            }
            if seen.stop_sent {
                // Asked to stop, and the launcher has ended: whatever the codes say, the next job resumes from
                // the newest committed checkpoint.
                return Decision::Requeue(format!(
                    "radit: the ranks ended ({all:?}) after the stop request without all confirming a checkpoint; \
                     exiting {REQUEUE_EXIT_CODE}: the next job resumes from the newest committed checkpoint"
                ));
            }
            let (i, e) = all
                .iter()
                .enumerate()
                .find(|(_, e)| !matches!(e, Ended::Code(0)))
                .map(|(i, e)| (i, *e))
                .unwrap_or((0, Ended::Code(-1)));
            return fail(format!("{} ended with {e}", process(i)));
        }
    }
    match seen.health {
        JobHealth::RankDead { rank, silent_ms } => fail(format!(
            "rank {rank} stopped heart-beating ({silent_ms} ms silent)"
        )),
        JobHealth::Hung {
            culprit,
            phase,
            step,
            stalled_ms,
            deadline_ms,
        } => Decision::Fail {
            reason: format!(
                "hang: no step finished for {stalled_ms} ms (deadline {deadline_ms} ms); culprit rank {culprit} is \
                 in `{}` after step {step} while the others wait for it",
                phase.name()
            ),
            hang: true,
        },
        JobHealth::Forming { .. } | JobHealth::Running => Decision::Wait,
    }
}

/// Why the supervisor could not run the job (as opposed to the job failing, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A file of the run directory could not be written or read.
    #[error("{}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the ranks' config")]
    RankConfig(#[source] toml::ser::Error),
    /// The work cannot be planned (an encode or generate job's store cannot be read).
    #[error("planning the job")]
    Plan(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("making the job token")]
    Token(#[source] std::io::Error),
    /// The coordinator cannot listen where the job says.
    #[error("coordinator.bind `{bind}`: {reason}")]
    Bind { bind: String, reason: String },
    #[error("monitoring.pushgateway")]
    Pushgateway(#[source] radit_monitoring::PushError),
    #[error("starting the ranks with {launcher}")]
    Launch {
        launcher: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the ranks")]
    Watch(#[source] std::io::Error),
}

impl SuperviseError {
    fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_protocol::Phase;

    fn poll<'a>(state: &'a GroupState, health: &'a JobHealth) -> Poll<'a> {
        Poll {
            state,
            health,
            join_overdue: false,
            join_deadline_seconds: 90,
            stop_sent: false,
            all_departed_at: None,
            total_steps: 100,
        }
    }

    fn rank(i: usize) -> String {
        format!("rank {i}")
    }

    #[test]
    fn running_ranks_are_waited_for_until_one_dies_hangs_or_misses_the_join() {
        let (running, healthy) = (GroupState::Running, JobHealth::Running);
        assert_eq!(decide(&poll(&running, &healthy), &rank), Decision::Wait);
        let late = Poll {
            join_overdue: true,
            ..poll(&running, &healthy)
        };
        assert!(
            matches!(decide(&late, &rank), Decision::Fail { reason, hang: false } if reason.contains("within 90 s"))
        );
        let dead = JobHealth::RankDead {
            rank: 3,
            silent_ms: 4000,
        };
        assert_eq!(
            decide(&poll(&running, &dead), &rank),
            Decision::Fail {
                reason: "rank 3 stopped heart-beating (4000 ms silent)".into(),
                hang: false
            }
        );
        let hung = JobHealth::Hung {
            culprit: 1,
            phase: Phase::Data,
            step: 7,
            stalled_ms: 9000,
            deadline_ms: 5000,
        };
        assert!(matches!(
            decide(&poll(&running, &hung), &rank),
            Decision::Fail { reason, hang: true } if reason.contains("culprit rank 1") && reason.contains("`data`")
        ));
        let failed = GroupState::Failed {
            index: 2,
            ended: Ended::Signal(9),
        };
        assert!(matches!(
            decide(&poll(&failed, &healthy), &|_| "srun".into()),
            Decision::Fail { reason, .. } if reason.starts_with("srun ended with")
        ));
    }

    #[test]
    fn ended_ranks_complete_requeue_or_fail_by_their_codes_and_goodbyes() {
        let healthy = JobHealth::Running;
        let all_done = GroupState::Ended(vec![Ended::Code(0); 4]);
        assert_eq!(
            decide(&poll(&all_done, &healthy), &rank),
            Decision::Completed
        );
        let checkpointed = GroupState::Ended(vec![Ended::Code(0), Ended::Code(REQUEUE_EXIT_CODE)]);
        assert!(matches!(
            decide(&poll(&checkpointed, &healthy), &rank),
            Decision::Requeue(_)
        ));
        // srun killed the slower ranks after the first left with 75: the goodbyes decide.
        let killed = GroupState::Ended(vec![Ended::Code(REQUEUE_EXIT_CODE), Ended::Signal(9)]);
        let departed = Poll {
            all_departed_at: Some(40),
            ..poll(&killed, &healthy)
        };
        assert!(
            matches!(decide(&departed, &rank), Decision::Requeue(why) if why.contains("at step 40"))
        );
        let finished = Poll {
            all_departed_at: Some(100),
            ..poll(&killed, &healthy)
        };
        assert_eq!(decide(&finished, &rank), Decision::Completed);
        let stopping = Poll {
            stop_sent: true,
            ..poll(&killed, &healthy)
        };
        assert!(matches!(decide(&stopping, &rank), Decision::Requeue(_)));
        assert_eq!(
            decide(&poll(&killed, &healthy), &rank),
            Decision::Fail {
                reason: format!("rank 0 ended with {}", Ended::Code(REQUEUE_EXIT_CODE)),
                hang: false
            }
        );
    }
}
