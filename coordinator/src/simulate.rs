//! Scale by simulation: thousands of simulated ranks (threads using the real rank client) join one coordinator on
//! loopback and heartbeat it at a fixed rate as real ranks do (a rank's training counters ride on a beat every
//! [`radit_protocol::STATS_PERIOD`], the beats between are compact), while a scraper fetches `/metrics` as
//! Prometheus would. Measures the join time, heartbeat latency, scrape time and size, and the coordinator's own CPU
//! time (its runtime threads, read from /proc), and checks that no healthy rank is declared dead.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::service::{Service, THREAD_NAME};
use crate::{CoordinatorConfig, JobHealth};
use radit_protocol::{
    CoordinatorClient, Heartbeat, JobToken, JoinRequest, Phase, RankStats, STEP_SECONDS_BUCKETS,
    stats_due,
};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub ranks: usize,
    pub heartbeat_hz: f64,
    /// Length of the heartbeat phase.
    pub seconds: f64,
    /// Seconds between `/metrics` scrapes (Prometheus' default interval is 15 s).
    pub scrape_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub ranks: usize,
    pub heartbeat_hz: f64,
    /// From the first join request to the last rank learning the world.
    pub join_seconds: f64,
    pub join_coordinator_cpu_seconds: f64,
    pub heartbeats: u64,
    /// Of those, the beats that carried the rank's counters (JSON); the rest were compact.
    pub heartbeats_with_stats: u64,
    pub heartbeat_seconds: f64,
    /// Latency percentiles after each rank's first two beats.
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_max_ms: f64,
    /// Coordinator CPU over the heartbeat phase, in % of one core.
    pub coordinator_cpu_percent: f64,
    pub failed_requests: u64,
    /// Health checks during the heartbeat phase, and how many did not say `running` (should be none).
    pub health_checks: u64,
    pub false_alarms: u64,
    /// `/metrics` scrapes during the heartbeat phase: how many, the slowest, and the exposition's size.
    pub scrapes: u64,
    pub scrape_max_ms: f64,
    pub exposition_bytes: usize,
}

/// What a rank reports after `step` steps of a B-size run (the shape matters, not the values).
fn sample_stats(step: u64) -> RankStats {
    let buckets = STEP_SECONDS_BUCKETS
        .iter()
        .map(|b| if *b >= 1.0 { step } else { 0 })
        .collect();
    RankStats {
        steps: step,
        images: 16 * step,
        tokens: 4096 * step,
        model_flops: 1.3e12 * step as f64,
        step_flops: 1.3e12,
        data_wait_seconds: 0.01 * step as f64,
        step_seconds_buckets: buckets,
        step_seconds_count: step,
        step_seconds_sum: 0.9 * step as f64,
        loss: 0.4,
        loss_max: 0.45,
        grad_norm: 0.2,
        learning_rate: 1e-4,
        checkpoint_bytes: 1 << 30,
        ..RankStats::default()
    }
}

/// One `/metrics` GET with the token: (seconds, body bytes).
fn scrape(addr: std::net::SocketAddr, token: &JobToken) -> std::io::Result<(f64, usize)> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.secret()
    )?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let body = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| reply.len() - i - 4);
    Ok((started.elapsed().as_secs_f64(), body))
}

/// CPU seconds used so far by this process's coordinator runtime threads.
fn coordinator_cpu_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0u64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15; comm may hold spaces, so split after ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != THREAD_NAME {
            continue;
        }
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += field(11) + field(12);
    }
    total as f64 / ticks
}

/// Lets this process hold a socket per simulated rank on both ends.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn simulate(cfg: &SimConfig) -> std::io::Result<SimReport> {
    raise_open_file_limit();
    let period = Duration::from_secs_f64(1.0 / cfg.heartbeat_hz);
    let mut ccfg = CoordinatorConfig::new(cfg.ranks);
    ccfg.heartbeat_interval = period;
    let token = JobToken::generate()?;
    let service = Service::start("127.0.0.1:0", ccfg, token.clone())?;
    let addr = service.addr;
    let beats = (cfg.seconds * cfg.heartbeat_hz).round().max(1.0) as u64;

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(cfg.ranks * beats as usize)));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let answered_early = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let with_stats = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (joined_tx, joined_rx) = std::sync::mpsc::channel::<()>();
    let cpu_before_join = coordinator_cpu_seconds();
    let join_started = Instant::now();
    let mut threads = Vec::with_capacity(cfg.ranks);
    for rank in 0..cfg.ranks {
        let (token, latencies, failures, joined, answered_early, with_stats) = (
            token.clone(),
            latencies.clone(),
            failures.clone(),
            joined_tx.clone(),
            answered_early.clone(),
            with_stats.clone(),
        );
        let ranks = cfg.ranks;
        let t = std::thread::Builder::new()
            .name("sim-rank".into())
            // The HTTP client (ureq) needs more than 128 KiB; pages are committed only as they are touched.
            .stack_size(512 << 10)
            .spawn(move || {
                let client =
                    CoordinatorClient::new(addr, token).with_timeout(Duration::from_secs(600));
                let reply = client.join(&JoinRequest {
                    host: format!("nid{:06}", rank / 4),
                    pid: rank as u32,
                    rank: Some(rank),
                    endpoint: Some(format!(
                        "10.{}.{}.{}:29500",
                        rank >> 16,
                        (rank >> 8) & 255,
                        rank & 255
                    )),
                });
                if reply.is_err() {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = joined.send(());
                // Heart-beat from the moment the join returns, as a real rank does, spread over the period as
                // unsynchronised nodes would be.
                let t0 = Instant::now() + period.mul_f64(rank as f64 / ranks as f64);
                let mut mine = Vec::with_capacity(beats as usize);
                // The counters ride on a beat every STATS_PERIOD, as a rank's heartbeat sends them.
                let mut stats_sent = None::<Instant>;
                for k in 0..beats {
                    let due = t0 + period * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    let stats = stats_due(stats_sent, sent).then(|| sample_stats(k));
                    if stats.is_some() {
                        stats_sent = Some(sent);
                        with_stats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let r = client.heartbeat(&Heartbeat {
                        rank,
                        generation: 0,
                        step: k,
                        done: false,
                        stats,
                        phase: Some(Phase::Compute),
                        fatal: None,
                    });
                    match r {
                        // Latency in the steady state: the first two beats meet the burst of join replies.
                        Ok(_) if k >= 2 => mine.push(sent.elapsed().as_secs_f64() * 1e3),
                        Ok(_) => {
                            answered_early.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(_) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    };
                }
                latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(mine);
            })?;
        threads.push(t);
    }
    drop(joined_tx);
    for _ in 0..cfg.ranks {
        if joined_rx.recv().is_err() {
            break;
        }
    }
    let join_seconds = join_started.elapsed().as_secs_f64();
    let join_cpu = coordinator_cpu_seconds() - cpu_before_join;
    let cpu_before = coordinator_cpu_seconds();
    let hb_started = Instant::now();
    // Judge health all through the phase, as the supervisor does, until the first rank has sent its last beat.
    let (mut checks, mut false_alarms) = (0u64, 0u64);
    let (mut scrapes, mut scrape_max, mut exposition_bytes) = (0u64, 0f64, 0usize);
    let scrape_every = Duration::from_secs_f64(cfg.scrape_seconds.max(0.1));
    let mut next_scrape = Instant::now() + scrape_every / 2;
    while !threads.iter().any(|t| t.is_finished()) {
        checks += 1;
        if service.coordinator.health() != JobHealth::Running {
            false_alarms += 1;
        }
        if Instant::now() >= next_scrape {
            next_scrape += scrape_every;
            match scrape(addr, &token) {
                Ok((secs, bytes)) => {
                    scrapes += 1;
                    scrape_max = scrape_max.max(secs * 1e3);
                    exposition_bytes = bytes;
                }
                Err(_) => {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in threads {
        let _ = t.join();
    }
    let heartbeat_seconds = hb_started.elapsed().as_secs_f64();
    let cpu = coordinator_cpu_seconds() - cpu_before;
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_by(f64::total_cmp);
    Ok(SimReport {
        ranks: cfg.ranks,
        heartbeat_hz: cfg.heartbeat_hz,
        join_seconds,
        join_coordinator_cpu_seconds: join_cpu,
        heartbeats: lat.len() as u64 + answered_early.load(std::sync::atomic::Ordering::Relaxed),
        heartbeats_with_stats: with_stats.load(std::sync::atomic::Ordering::Relaxed),
        heartbeat_seconds,
        heartbeat_p50_ms: percentile(&lat, 0.5),
        heartbeat_p99_ms: percentile(&lat, 0.99),
        heartbeat_max_ms: lat.last().copied().unwrap_or(0.0),
        coordinator_cpu_percent: 100.0 * cpu / heartbeat_seconds.max(1e-9),
        failed_requests: failures.load(std::sync::atomic::Ordering::Relaxed),
        health_checks: checks,
        false_alarms,
        scrapes,
        scrape_max_ms: scrape_max,
        exposition_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_simulated_job_joins_beats_and_stays_healthy() {
        let r = simulate(&SimConfig {
            ranks: 64,
            heartbeat_hz: 10.0,
            seconds: 1.0,
            scrape_seconds: 0.2,
        })
        .unwrap();
        assert_eq!(r.failed_requests, 0);
        assert_eq!(r.heartbeats, 64 * 10);
        // A second of beats: each rank's first carries its counters, the other nine are compact.
        assert_eq!(r.heartbeats_with_stats, 64);
        assert!(r.health_checks > 0);
        assert_eq!(r.false_alarms, 0);
        // Every rank's histogram is in the exposition.
        assert!(r.scrapes > 0 && r.exposition_bytes > 64 * 15 * 40, "{r:?}");
        assert!(r.join_coordinator_cpu_seconds >= 0.0 && r.coordinator_cpu_percent >= 0.0);
    }
}
