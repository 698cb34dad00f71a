//! The rank agent: a rank under `radit run` joins the coordinator (rank, world, peers), builds the rank group (MPI
//! when mpirun started it, otherwise the TCP star through rank 0's published endpoint, with NCCL on top on GPUs),
//! and heartbeats in the background with its [`Progress`] snapshot. A stop request in a heartbeat reply, or losing
//! the coordinator for longer than the grace period, sets the same flag as SIGUSR1: checkpoint and exit 75. Being
//! superseded by a newer generation marks the progress, and the rank's loop leaves at its next step boundary.
//!
//! [`run_rank`] is a rank's whole life, for every job: signals, joining, the work, and leaving or failing.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use radit_protocol::{
    ClientError, CoordinatorClient, Heartbeat, JobToken, JoinRequest, env, stats_due,
};
use tch::Device;

use crate::collective::{self, Collective, CollectiveError, mpi, tcp, tcp::TcpCollective};
use crate::progress::Progress;

/// Why a rank could not join its run.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The variables `radit run` sets are missing or malformed.
    #[error("{var}: {reason}")]
    Environment { var: &'static str, reason: String },
    #[error("reaching the coordinator at {addr}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("joining the run at the coordinator")]
    Refused(#[from] ClientError),
    #[error("building the rank group")]
    Group(#[from] CollectiveError),
    #[error("{0}")]
    Mismatch(String),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The rank group's timeouts `radit run` passes (the job's `[restart]` settings), else the defaults.
fn collective_timeouts() -> collective::Timeouts {
    let seconds = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
    };
    let d = collective::Timeouts::DEFAULT;
    collective::Timeouts {
        rendezvous: seconds(env::COLLECTIVE_RENDEZVOUS).unwrap_or(d.rendezvous),
        operation: seconds(env::COLLECTIVE_TIMEOUT).unwrap_or(d.operation),
    }
}

/// This rank's membership in a supervised run; dropping it stops the heartbeat and removes the pid file.
pub struct Membership {
    done: Arc<AtomicBool>,
    /// Set by [`Membership::leave`]: the last heartbeat says the rank is exiting in order.
    orderly: Arc<AtomicBool>,
    /// Set by [`Membership::fail`]: the last heartbeat carries an error a restart would repeat.
    fatal: Arc<std::sync::Mutex<Option<String>>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
    pid_file: Option<PathBuf>,
}

impl Membership {
    /// The rank finished (or checkpointed for a requeue): tell the coordinator, so that its silence from now on
    /// is not taken for a death while slower peers finish.
    pub fn leave(self) {
        self.orderly.store(true, Ordering::SeqCst);
    }

    /// The rank is ending on an error that a restart would repeat (out of memory): the last heartbeat (sent
    /// before this returns) tells the supervisor not to relaunch the same configuration.
    pub fn fail(self, why: String) {
        *self.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        if let Some(p) = &self.pid_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What a rank can be told from outside: stop (set by SIGUSR1, SIGTERM or the coordinator, on any subset of
/// ranks; the ranks vote at each step or unit boundary so all stop at the same one), the progress its heartbeat
/// reports, and the faults to inject (none by default).
#[derive(Debug, Clone, Default)]
pub struct RankHandles {
    pub stop: Arc<AtomicBool>,
    pub progress: Progress,
    pub faults: crate::faults::FaultPlan,
}

impl RankHandles {
    /// Whether a newer generation of the run took over (the rank must leave without writing).
    pub fn superseded(&self) -> bool {
        self.progress.superseded()
    }

    /// Whether this rank was asked to stop.
    pub fn stop_asked(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Why a rank could not start its work.
#[derive(Debug, thiserror::Error)]
pub enum RankStartError {
    #[error("installing the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error("joining the rank group")]
    Group(#[source] CollectiveError),
}

/// A rank whose work ended well: its summary and its rank.
pub struct RankDone<S> {
    pub summary: S,
    pub rank: usize,
}

/// A rank's life, the same for every job (train, encode, generate, features, SCM fit), alone or under
/// `radit run`: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption) set `handles.stop`;
/// the rank joins its run ([`join_run`]: the coordinator hands out ranks and peers) or, started otherwise, MPI or
/// a world of one; runs `work` on its group; and leaves in order. A work error the same inputs would repeat
/// (`repeats`) goes to the coordinator in the last heartbeat, so that the supervisor does not relaunch. The
/// outer error: the rank never started; the inner: the work's own.
pub fn run_rank<S, E>(
    device: Device,
    handles: &RankHandles,
    work: impl FnOnce(Box<dyn Collective>) -> Result<S, E>,
    repeats: impl Fn(&E) -> bool,
) -> Result<Result<RankDone<S>, E>, RankStartError>
where
    E: std::error::Error + 'static,
{
    for signal in [signal_hook::consts::SIGUSR1, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, handles.stop.clone())
            .map_err(RankStartError::Signals)?;
    }
    let (comm, membership) = match join_run(device, handles.stop.clone(), handles.progress.clone())?
    {
        Some(j) => (j.comm, Some(j.membership)),
        None => (
            collective::from_environment(device).map_err(RankStartError::Group)?,
            None,
        ),
    };
    let rank = comm.rank();
    match work(comm) {
        Ok(summary) => {
            if let Some(m) = membership {
                m.leave();
            }
            Ok(Ok(RankDone { summary, rank }))
        }
        Err(e) => {
            if repeats(&e) {
                // Not an infrastructure failure: the operator must see the whole chain ("training data: shard
                // object ... is missing"), and the supervisor must not relaunch.
                let why = chain_text(&e);
                tracing::error!(rank, error = %why, "a relaunch would fail the same way");
                if let Some(m) = membership {
                    m.fail(why);
                }
            }
            Ok(Err(e))
        }
    }
}

/// An error with its causes, `a: b: c`, as the CLI prints them.
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// A rank that joined its run: its rank group and its membership.
pub struct Joined {
    pub comm: Box<dyn Collective>,
    pub membership: Membership,
}

/// `Some` when this process was started by `radit run` (RADIT_COORDINATOR is set). The heartbeat reports
/// `progress`, and sets `stop` when the coordinator asks the run to stop or is lost.
pub fn join_run(
    device: Device,
    stop: Arc<AtomicBool>,
    progress: Progress,
) -> Result<Option<Joined>, JoinError> {
    let Ok(addr) = std::env::var(env::COORDINATOR) else {
        return Ok(None);
    };
    let addr: SocketAddr = addr.parse().map_err(|_| JoinError::Environment {
        var: env::COORDINATOR,
        reason: format!("`{addr}` is not IP:PORT"),
    })?;
    let token_file = std::env::var(env::TOKEN_FILE).map_err(|_| JoinError::Environment {
        var: env::TOKEN_FILE,
        reason: "not set".into(),
    })?;
    let token = JobToken::read(token_file.as_ref()).map_err(|e| JoinError::Environment {
        var: env::TOKEN_FILE,
        reason: format!("reading the job token from {token_file}: {e}"),
    })?;
    let grace = std::env::var(env::COORDINATOR_GRACE)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs_f64);
    let client = CoordinatorClient::from_env(addr, token.clone(), |k| std::env::var(k).ok())
        .map_err(|e| JoinError::Environment {
            var: env::COORDINATOR_CA,
            reason: e.to_string(),
        })?
        .with_timeout(Duration::from_secs(900));
    let identity = radit_protocol::rank_identity(|k| std::env::var(k).ok());
    let by_mpi = mpi::launched_by_mpi();
    // The interface that reaches the coordinator is the one peers reach us on.
    let local_ip = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .and_then(|s| s.local_addr())
        .map_err(|source| JoinError::Unreachable { addr, source })?
        .ip();
    let listener = if by_mpi {
        None
    } else {
        Some(
            TcpListener::bind((local_ip, 0)).map_err(|source| JoinError::Io {
                what: "opening this rank's collective endpoint",
                source,
            })?,
        )
    };
    let endpoint = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let reply = client.join(&JoinRequest {
        host: env::hostname().unwrap_or_else(|| "unknown".into()),
        pid: std::process::id(),
        rank: identity.map(|i| i.rank),
        endpoint,
    })?;
    let span = tracing::info_span!("rank", rank = reply.rank, generation = reply.generation);
    let _enter = span.enter();
    tracing::info!(world = reply.world, "joined");
    let pid_file = std::env::var(env::PID_DIR).ok().map(|d| {
        let dir = PathBuf::from(d);
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("rank-{}.pid", reply.rank))
    });
    if let Some(p) = &pid_file {
        // Host, pid and start time: a restarted supervisor checks only ranks of its own node, and a reused pid
        // does not pass for a rank.
        let _ = std::fs::write(p, env::pid_record(std::process::id()));
    }
    let done = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(50));
    let (rank, generation) = (reply.rank, reply.generation);
    let finished = done.clone();
    let orderly = Arc::new(AtomicBool::new(false));
    let leaving = orderly.clone();
    let fatal = Arc::new(std::sync::Mutex::new(None::<String>));
    let failing = fatal.clone();
    let own_pid_file = pid_file.clone();
    // Heartbeats wait for an answer at most this long: a coordinator that went silent (stopped, partitioned)
    // must not hold the rank past its grace period.
    let client = client
        .clone()
        .with_timeout(grace.clamp(Duration::from_secs(5), Duration::from_secs(60)));
    let heartbeat = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let span = tracing::info_span!("heartbeat", rank, generation);
            let _enter = span.enter();
            let mut last_ok = Instant::now();
            let mut reported = None;
            // Rank 0 tells the coordinator of a checkpoint committed since the last one it got through.
            let report_new_checkpoint = |reported: &mut Option<u64>| {
                let committed = progress.checkpoint();
                if rank == 0
                    && committed != *reported
                    && let Some(step) = committed
                    && client.report_checkpoint(step).is_ok()
                {
                    *reported = committed;
                }
            };
            let mut lost = false;
            let mut superseded_at = None::<Instant>;
            // The counters ride on a beat every STATS_PERIOD; the beats between are compact.
            let mut stats_sent = None::<Instant>;
            while !finished.load(Ordering::SeqCst) {
                // A superseded rank blocked in a collective whose peers are gone cannot reach its step boundary
                // (a blocked MPI or NCCL call cannot be interrupted from here): after a grace period it is ended
                // here, so it does not hold its GPU while the newer generation needs it.
                if superseded_at.is_some_and(|t| t.elapsed() > grace) {
                    eprintln!("radit: superseded and stuck in a collective for {grace:?}; exiting");
                    if let Some(p) = &own_pid_file {
                        let _ = std::fs::remove_file(p);
                    }
                    std::process::exit(1);
                }
                let stats = stats_due(stats_sent, Instant::now())
                    .then(|| progress.snapshot())
                    .flatten();
                let carries_stats = stats.is_some();
                let beat = client.heartbeat(&Heartbeat {
                    rank,
                    generation,
                    step: progress.step(),
                    done: false,
                    phase: Some(progress.phase()),
                    stats,
                    fatal: None,
                });
                match beat {
                    Ok(r) => {
                        last_ok = Instant::now();
                        if carries_stats {
                            stats_sent = Some(last_ok);
                        }
                        if r.stop && !stop.swap(true, Ordering::SeqCst) {
                            tracing::warn!("the coordinator asks the run to stop: checkpointing");
                        }
                        report_new_checkpoint(&mut reported);
                    }
                    Err(ClientError::Superseded { .. }) => {
                        // A newer generation runs: the supervisor gave up on this one. The train loop leaves
                        // at its next step boundary, without a checkpoint that would race the new ranks'.
                        if superseded_at.is_none() {
                            tracing::error!("superseded by a newer generation of the run: leaving");
                            progress.supersede();
                            superseded_at = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        if !lost && last_ok.elapsed() > grace {
                            lost = true;
                            tracing::error!(error = %e, grace_s = grace.as_secs_f64(),
                                "lost the coordinator: checkpointing and exiting with the requeue code");
                            eprintln!("radit: lost the coordinator ({e}); checkpointing and exiting 75");
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
                let until = Instant::now() + interval;
                while Instant::now() < until && !finished.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let fatal = failing.lock().unwrap_or_else(|e| e.into_inner()).take();
            // The final checkpoint commits after the loop's last beat: reported before the goodbye, so the run's
            // last line names it.
            report_new_checkpoint(&mut reported);
            if leaving.load(Ordering::SeqCst) || fatal.is_some() {
                let _ = client.heartbeat(&Heartbeat {
                    rank,
                    generation,
                    step: progress.step(),
                    done: fatal.is_none(),
                    phase: Some(progress.phase()),
                    stats: progress.snapshot(),
                    fatal,
                });
            }
        })
        .map_err(|source| JoinError::Io {
            what: "starting the heartbeat thread",
            source,
        })?;
    // The group is built after the heartbeat starts: NCCL's set-up on thousands of ranks takes a while. If it
    // fails, dropping the membership stops the heartbeat.
    let membership = Membership {
        done,
        orderly,
        fatal,
        heartbeat: Some(heartbeat),
        pid_file,
    };
    let secret = tcp::group_secret(token.secret());
    let base: Box<dyn Collective> = match listener {
        None => {
            let m = mpi::MpiCollective::init()?;
            if (m.rank(), m.world()) != (reply.rank, reply.world) {
                return Err(JoinError::Mismatch(format!(
                    "MPI says rank {} of {}, the coordinator {} of {}",
                    m.rank(),
                    m.world(),
                    reply.rank,
                    reply.world
                )));
            }
            Box::new(m)
        }
        Some(l) if reply.rank == 0 => Box::new(TcpCollective::hub(
            l,
            reply.world,
            collective_timeouts(),
            &secret,
        )?),
        Some(_) => {
            let hub: SocketAddr = reply
                .peers
                .first()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    JoinError::Mismatch("the coordinator gave no endpoint for rank 0".into())
                })?;
            Box::new(TcpCollective::spoke(
                reply.rank,
                reply.world,
                hub,
                collective_timeouts(),
                &secret,
            )?)
        }
    };
    let comm = collective::for_device(base, device)?;

    Ok(Some(Joined { comm, membership }))
}
