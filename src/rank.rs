//! A rank under `radit run`: join the coordinator (rank, world, peers), build the rank group (MPI when mpirun
//! started us, otherwise the TCP star through rank 0's published endpoint, with NCCL on top on GPUs), and
//! heartbeat in the background with the step and phase. A stop request in a heartbeat reply, or losing the
//! coordinator for longer than the grace period, sets the same flag as SIGUSR1: checkpoint and exit 75.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use radit_protocol::{
    ClientError, CoordinatorClient, Heartbeat, JobToken, JoinRequest, RankStats, env,
};
use radit_trainer::collective::{self, Collective, mpi, tcp, tcp::TcpCollective};
use radit_trainer::progress;
use radit_trainer::tch::Device;

/// Collective operations wait this long for a peer before giving up (a hang is caught earlier by the coordinator).
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);

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

/// The trainer's counters as the coordinator's wire format.
fn wire_stats(s: progress::Stats) -> RankStats {
    RankStats {
        steps: s.steps_total,
        images: s.images_total,
        tokens: s.tokens_total,
        model_flops: s.model_flops_total,
        step_flops: s.step_flops,
        data_wait_seconds: s.data_wait_seconds_total,
        step_seconds_buckets: s.step_seconds_buckets,
        step_seconds_count: s.step_seconds_count,
        step_seconds_sum: s.step_seconds_sum,
        skipped_steps: s.skipped_steps_total,
        loss: s.loss,
        grad_norm: s.grad_norm,
        learning_rate: s.learning_rate,
        checkpoint_stall_seconds: s.checkpoint_stall_seconds,
        checkpoints: s.checkpoints_total,
        checkpoint_write_seconds: s.checkpoint_write_seconds,
        checkpoint_save_seconds: s.checkpoint_save_seconds,
        checkpoint_bytes: s.checkpoint_bytes_total,
        loss_max: s.loss_max,
        device_memory_used_bytes: s.device_memory_used_bytes,
        device_memory_total_bytes: s.device_memory_total_bytes,
    }
}

/// `Some` when this process was started by `radit run` (RADIT_COORDINATOR is set).
pub fn join_run(
    device: Device,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Option<(Box<dyn Collective>, Membership)>> {
    let Ok(addr) = std::env::var(env::COORDINATOR) else {
        return Ok(None);
    };
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("{}=`{addr}` is not IP:PORT", env::COORDINATOR))?;
    let token_file = std::env::var(env::TOKEN_FILE)
        .with_context(|| format!("{} is not set", env::TOKEN_FILE))?;
    let token = JobToken::read(token_file.as_ref())
        .with_context(|| format!("reading the job token from {token_file}"))?;
    let grace = std::env::var(env::COORDINATOR_GRACE)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs_f64);
    let client = CoordinatorClient::new(addr, token.clone()).with_timeout(Duration::from_secs(900));
    let identity = radit_protocol::rank_identity(|k| std::env::var(k).ok());
    let by_mpi = mpi::launched_by_mpi();
    // The interface that reaches the coordinator is the one peers reach us on.
    let local_ip = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .and_then(|s| s.local_addr())
        .with_context(|| format!("reaching the coordinator at {addr}"))?
        .ip();
    let listener = if by_mpi {
        None
    } else {
        Some(TcpListener::bind((local_ip, 0)).context("opening this rank's collective endpoint")?)
    };
    let endpoint = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let reply = client
        .join(&JoinRequest {
            host: env::hostname().unwrap_or_else(|| "unknown".into()),
            pid: std::process::id(),
            rank: identity.map(|i| i.rank),
            endpoint,
        })
        .context("joining the run at the coordinator")?;
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
    let client = CoordinatorClient::new(addr, token.clone())
        .with_timeout(grace.clamp(Duration::from_secs(5), Duration::from_secs(60)));
    let heartbeat = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let span = tracing::info_span!("heartbeat", rank, generation);
            let _enter = span.enter();
            let mut last_ok = Instant::now();
            let mut reported = None;
            let mut lost = false;
            while !finished.load(Ordering::SeqCst) {
                let beat = client.heartbeat(&Heartbeat {
                    rank,
                    generation,
                    step: progress::step(),
                    done: false,
                    phase: Some(progress::phase()),
                    stats: progress::stats().map(wire_stats),
                    fatal: None,
                });
                match beat {
                    Ok(r) => {
                        last_ok = Instant::now();
                        if r.stop && !stop.swap(true, Ordering::SeqCst) {
                            tracing::warn!("the coordinator asks the run to stop: checkpointing");
                        }
                        let committed = progress::checkpoint();
                        if rank == 0
                            && committed != reported
                            && let Some(step) = committed
                            && client.report_checkpoint(step).is_ok()
                        {
                            reported = committed;
                        }
                    }
                    Err(ClientError::Refused { status: 409, .. }) => {
                        // A newer generation runs: the supervisor gave up on this one. A checkpoint now would
                        // race the new ranks', so leave at once.
                        tracing::error!("superseded by a newer generation of the run: exiting");
                        eprintln!("radit: superseded by a newer generation of the run; exiting");
                        if let Some(p) = &own_pid_file {
                            let _ = std::fs::remove_file(p);
                        }
                        std::process::exit(1);
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
            if leaving.load(Ordering::SeqCst) || fatal.is_some() {
                let _ = client.heartbeat(&Heartbeat {
                    rank,
                    generation,
                    step: progress::step(),
                    done: fatal.is_none(),
                    phase: Some(progress::phase()),
                    stats: progress::stats().map(wire_stats),
                    fatal,
                });
            }
        })
        .context("starting the heartbeat thread")?;
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
            anyhow::ensure!(
                m.rank() == reply.rank && m.world() == reply.world,
                "MPI says rank {} of {}, the coordinator {} of {}",
                m.rank(),
                m.world(),
                reply.rank,
                reply.world
            );
            Box::new(m)
        }
        Some(l) if reply.rank == 0 => Box::new(TcpCollective::hub(
            l,
            reply.world,
            COLLECTIVE_TIMEOUT,
            &secret,
        )?),
        Some(_) => {
            let hub: SocketAddr = reply
                .peers
                .first()
                .and_then(|p| p.parse().ok())
                .context("the coordinator gave no endpoint for rank 0")?;
            Box::new(TcpCollective::spoke(
                reply.rank,
                reply.world,
                hub,
                COLLECTIVE_TIMEOUT,
                &secret,
            )?)
        }
    };
    let comm = collective::for_device(base, device)?;

    Ok(Some((comm, membership)))
}
