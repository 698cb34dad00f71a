//! The coordinator's state and HTTP endpoints.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Json, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::time::Instant;

use radit_monitoring::metrics::{self, JobSnapshot, RankSample};
use radit_protocol::{
    COMPACT_BEAT_CONTENT_TYPE, CheckpointReport, Heartbeat, HeartbeatReply, JobToken, JoinRequest,
    Phase, RankStats, STEP_SECONDS_BUCKETS,
};

/// The coordinator's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    pub world: usize,
    /// How often ranks heartbeat.
    pub heartbeat_interval: Duration,
    /// A rank silent for this many intervals is dead (TorchElastic's 3 x 5 s).
    pub missed_heartbeats: u32,
    pub max_body_bytes: usize,
    /// How long a joiner waits for the rest of the world.
    pub join_timeout: Duration,
    /// A run whose slowest rank makes no progress for `hang_factor` x the median step time (but at least
    /// `hang_min`) is hung; until a few steps have been timed, for `hang_min`.
    pub hang_factor: f64,
    pub hang_min: Duration,
    /// Until the first step is finished (start-up: building the model, loading a checkpoint), the deadline.
    pub hang_startup: Duration,
    /// The run's steps, for progress and ETA in the metrics.
    pub total_steps: Option<u64>,
    /// Peak dense FLOP/s of one device, for MFU in the metrics.
    pub peak_flops_per_device: Option<f64>,
}

impl CoordinatorConfig {
    pub fn new(world: usize) -> Self {
        Self {
            world,
            heartbeat_interval: Duration::from_secs(5),
            missed_heartbeats: 3,
            max_body_bytes: 64 << 10,
            join_timeout: Duration::from_secs(600),
            hang_factor: 10.0,
            hang_min: Duration::from_secs(300),
            hang_startup: Duration::from_secs(900),
            total_steps: None,
            peak_flops_per_device: None,
        }
    }
}

/// A snapshot of the run for the periodic progress line.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// The slowest rank's finished step.
    pub step: u64,
    pub images: f64,
    pub tokens: f64,
    pub model_flops: f64,
    /// The global batch's mean loss and the largest rank's own loss, last step.
    pub loss: f64,
    pub loss_max: f64,
    pub median_step_seconds: Option<f64>,
    pub checkpoint: Option<u64>,
    /// The last validation loss and mini-FD, with their steps.
    pub val_loss: Option<(u64, f64)>,
    pub fd: Option<(u64, f64)>,
    pub pace: Pace,
}

/// This generation's work and the busy time it took, summed over the ranks that reported: the counters and the
/// time come from the same snapshot of each rank, so rates taken from them are right however stale a heartbeat
/// is (the last line of a run, a fresh goodbye after a stale beat) and start again with each generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pace {
    pub generation: u64,
    /// Ranks of this generation that reported counters, of `world`.
    pub ranks: usize,
    pub world: usize,
    pub images: f64,
    pub tokens: f64,
    pub model_flops: f64,
    /// The reporting ranks' mean busy time (see `RankStats::busy_seconds`).
    pub busy_seconds: f64,
}

/// One rank as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankState {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    pub step: u64,
    pub phase: Phase,
    pub heartbeat_age_ms: u64,
    pub alive: bool,
}

/// The job's health.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobHealth {
    /// Waiting for ranks to join.
    Forming {
        joined: usize,
        world: usize,
    },
    Running,
    /// A rank stopped heart-beating.
    RankDead {
        rank: usize,
        silent_ms: u64,
    },
    /// Every rank heart-beats but the run has not finished a step for longer than the deadline. The culprit is
    /// the slowest rank that is not waiting in a collective (the others wait for it).
    Hung {
        culprit: usize,
        phase: Phase,
        step: u64,
        stalled_ms: u64,
        deadline_ms: u64,
    },
}

struct Member {
    host: String,
    endpoint: Option<String>,
    pid: u32,
    last_seen: Instant,
    step: u64,
    phase: Phase,
    departed: bool,
    stats: Option<RankStats>,
}

struct Inner {
    generation: u64,
    /// Indexed by rank; `None` until that rank joins.
    members: Vec<Option<Member>>,
    stop: bool,
    checkpoints: Vec<u64>,
    /// The slowest rank's step and when it last advanced.
    progress: (u64, Instant),
    /// Recent seconds per step (of the slowest rank), for the hang deadline.
    step_seconds: std::collections::VecDeque<f64>,
    hangs_detected: u64,
    /// Counters of earlier generations (their ranks are gone), so that totals never go backwards.
    earlier: RankStats,
    /// Members joined, and how many members are at each step: heartbeats update both in O(log world) (thousands
    /// of ranks heart-beating must not each scan the whole world).
    joined: usize,
    steps: std::collections::BTreeMap<u64, usize>,
    /// The first rank that reported an error a restart would repeat, and the error.
    fatal: Option<(usize, String)>,
    /// The lowest rank that may still be free, for joins without a rank (every lower rank has joined).
    free_from: usize,
    /// This generation's peers as a JSON array, serialised once when the world forms: every one of N join replies
    /// carries all N endpoints, so building them per reply would cost O(N²) string copies.
    peers_json: Option<Arc<str>>,
}

impl Inner {
    /// The ranks of this generation that have reported stats, by rank.
    fn reporting(&self) -> Vec<(usize, &RankStats)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(r, m)| Some((r, m.as_ref()?.stats.as_ref()?)))
            .collect()
    }

    fn pace(&self, world: usize) -> Pace {
        let now = self.reporting();
        let n = now.len();
        let sum = |f: fn(&RankStats) -> f64| now.iter().map(|(_, s)| f(s)).sum::<f64>();
        Pace {
            generation: self.generation,
            ranks: n,
            world,
            images: sum(|s| s.images as f64),
            tokens: sum(|s| s.tokens as f64),
            model_flops: sum(|s| s.model_flops),
            busy_seconds: if n == 0 {
                0.0
            } else {
                sum(|s| s.busy_seconds) / n as f64
            },
        }
    }

    /// The job's counters: earlier generations' plus this one's. Work counters add up over ranks; skipped steps
    /// and checkpoints are the same on every rank, so the largest count is the run's.
    fn counters(&self) -> RankStats {
        let now = self.reporting();
        let sum = |f: fn(&RankStats) -> u64| now.iter().map(|(_, s)| f(s)).sum::<u64>();
        let max = |f: fn(&RankStats) -> u64| now.iter().map(|(_, s)| f(s)).max().unwrap_or(0);
        let sumf = |f: fn(&RankStats) -> f64| now.iter().map(|(_, s)| f(s)).sum::<f64>();
        let e = &self.earlier;
        // The latest validation of this generation, else the one an earlier generation saw (a relaunch resumes
        // from a checkpoint, possibly before it, so this generation's own measurement wins once it has one).
        let latest = |step: fn(&RankStats) -> u64, value: fn(&RankStats) -> f64| {
            now.iter()
                .map(|(_, s)| *s)
                .filter(|s| step(s) > 0)
                .max_by_key(|s| step(s))
                .map_or((step(e), value(e)), |s| (step(s), value(s)))
        };
        let (val_step, val_loss) = latest(|s| s.val_step, |s| s.val_loss);
        let (fd_step, fd) = latest(|s| s.fd_step, |s| s.fd);
        RankStats {
            val_step,
            val_loss,
            fd_step,
            fd,
            steps: e.steps + max(|s| s.steps),
            images: e.images + sum(|s| s.images),
            tokens: e.tokens + sum(|s| s.tokens),
            model_flops: e.model_flops + sumf(|s| s.model_flops),
            data_wait_seconds: e.data_wait_seconds + sumf(|s| s.data_wait_seconds),
            skipped_steps: e.skipped_steps + max(|s| s.skipped_steps),
            checkpoints: e.checkpoints + max(|s| s.checkpoints),
            checkpoint_bytes: e.checkpoint_bytes + sum(|s| s.checkpoint_bytes),
            ..RankStats::default()
        }
    }
    fn joined(&self) -> usize {
        self.joined
    }

    /// Moves one member from step `from` to step `to` in the step census.
    fn move_step(&mut self, from: Option<u64>, to: u64) {
        if let Some(f) = from
            && let Some(n) = self.steps.get_mut(&f)
        {
            *n -= 1;
            if *n == 0 {
                self.steps.remove(&f);
            }
        }
        *self.steps.entry(to).or_insert(0) += 1;
    }

    fn median_step_seconds(&self) -> Option<f64> {
        if self.step_seconds.len() < 3 {
            return None;
        }
        let mut v: Vec<f64> = self.step_seconds.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// The shared state behind the endpoints.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    token: JobToken,
    inner: Mutex<Inner>,
    /// The generation whose world is complete.
    formed: tokio::sync::watch::Sender<Option<u64>>,
    /// Set when the service is shutting down: waiting joiners give up instead of holding the drain.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig, token: JobToken) -> Arc<Self> {
        let world = cfg.world;
        Arc::new(Self {
            cfg,
            token,
            inner: Mutex::new(Inner {
                generation: 0,
                members: (0..world).map(|_| None).collect(),
                stop: false,
                checkpoints: Vec::new(),
                progress: (0, Instant::now()),
                step_seconds: std::collections::VecDeque::new(),
                hangs_detected: 0,
                earlier: RankStats::default(),
                joined: 0,
                steps: Default::default(),
                fatal: None,
                free_from: 0,
                peers_json: None,
            }),
            formed: tokio::sync::watch::channel(None).0,
            closing: tokio::sync::watch::channel(false).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Health now: forming, running, the first rank that has been silent too long, or a hang and its culprit.
    pub fn health(&self) -> JobHealth {
        self.health_of(&self.lock(), Instant::now())
    }

    fn health_of(&self, inner: &Inner, now: Instant) -> JobHealth {
        let joined = inner.joined();
        if joined < self.cfg.world {
            return JobHealth::Forming {
                joined,
                world: self.cfg.world,
            };
        }
        let limit = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        let members: Vec<&Member> = inner.members.iter().flatten().collect();
        if let Some((rank, age)) = members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.departed)
            .map(|(rank, m)| (rank, now.saturating_duration_since(m.last_seen)))
            .find(|(_, age)| *age > limit)
        {
            return JobHealth::RankDead {
                rank,
                silent_ms: age.as_millis() as u64,
            };
        }
        // Start-up has its own deadline; then `hang_factor` x the median step time, at least `hang_min` (also
        // while too few steps have been timed). A run whose ranks are leaving in order is not hung.
        if !members.iter().any(|m| m.departed) {
            let deadline = match (inner.progress.0, inner.median_step_seconds()) {
                (0, _) => self.cfg.hang_startup,
                (_, Some(median)) => self
                    .cfg
                    .hang_min
                    .max(Duration::from_secs_f64(median * self.cfg.hang_factor)),
                (_, None) => self.cfg.hang_min,
            };
            let stalled = now.saturating_duration_since(inner.progress.1);
            if stalled > deadline {
                let slowest = members.iter().map(|m| m.step).min().unwrap_or(0);
                let behind = || {
                    members
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.step == slowest)
                };
                let (culprit, m) = behind()
                    .find(|(_, m)| m.phase != Phase::Collective)
                    .or_else(|| behind().next())
                    .unwrap_or((0, &members[0]));
                return JobHealth::Hung {
                    culprit,
                    phase: m.phase,
                    step: m.step,
                    stalled_ms: stalled.as_millis() as u64,
                    deadline_ms: deadline.as_millis() as u64,
                };
            }
        }
        JobHealth::Running
    }

    /// When every rank of this generation has said goodbye (an orderly exit), the slowest one's last step.
    pub fn all_departed(&self) -> Option<u64> {
        let inner = self.lock();
        let members: Vec<&Member> = inner.members.iter().flatten().collect();
        (members.len() == self.cfg.world && members.iter().all(|m| m.departed))
            .then(|| members.iter().map(|m| m.step).min().unwrap_or(0))
    }

    /// Counts a detected hang (for the metrics); the launcher calls it when it acts on one.
    pub fn record_hang(&self) {
        self.lock().hangs_detected += 1;
    }

    pub fn ranks(&self) -> Vec<RankState> {
        self.ranks_of(&self.lock(), Instant::now())
    }

    fn ranks_of(&self, inner: &Inner, now: Instant) -> Vec<RankState> {
        let limit = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        inner
            .members
            .iter()
            .enumerate()
            .filter_map(|(rank, m)| {
                let m = m.as_ref()?;
                let age = now.saturating_duration_since(m.last_seen);
                Some(RankState {
                    rank,
                    host: m.host.clone(),
                    pid: m.pid,
                    step: m.step,
                    phase: m.phase,
                    heartbeat_age_ms: age.as_millis() as u64,
                    alive: age <= limit,
                })
            })
            .collect()
    }

    /// The slowest rank's finished step (the run's progress) and the median step time seen so far.
    pub fn progress(&self) -> (u64, Option<f64>) {
        let inner = self.lock();
        (inner.progress.0, inner.median_step_seconds())
    }

    /// The run's counters over all ranks and generations and its latest values, once ranks have reported.
    /// `None` before any rank of any generation has reported; the loss is NaN while a new generation has not.
    pub fn totals(&self) -> Option<Totals> {
        let inner = self.lock();
        let reporting = inner.reporting();
        if reporting.is_empty() && inner.earlier == RankStats::default() {
            return None;
        }
        let all = inner.counters();
        let (loss, loss_max) = match reporting.first() {
            Some((_, first)) => (first.loss, first.loss_max),
            None => (f64::NAN, f64::NAN),
        };
        Some(Totals {
            step: inner.progress.0,
            images: all.images as f64,
            tokens: all.tokens as f64,
            model_flops: all.model_flops,
            loss,
            loss_max,
            median_step_seconds: inner.median_step_seconds(),
            checkpoint: inner.checkpoints.last().copied(),
            val_loss: (all.val_step > 0).then_some((all.val_step, all.val_loss)),
            fd: (all.fd_step > 0).then_some((all.fd_step, all.fd)),
            pace: inner.pace(self.cfg.world),
        })
    }

    /// The Prometheus text exposition of the run's state (served at `/metrics`, pushed to a Pushgateway), in
    /// [`radit_monitoring::metrics::CONTENT_TYPE`].
    pub fn metrics(&self) -> String {
        // One snapshot under one lock; the (megabytes of) text are written after it is released, so heartbeats
        // do not wait for a scrape.
        let snapshot = {
            let inner = self.lock();
            let now = Instant::now();
            let (dead, hung) = match self.health_of(&inner, now) {
                JobHealth::RankDead { rank, .. } => (Some(rank), None),
                JobHealth::Hung { culprit, .. } => (None, Some(culprit)),
                _ => (None, None),
            };
            let ranks = self.ranks_of(&inner, now).into_iter().map(|r| RankSample {
                rank: r.rank,
                step: r.step,
                heartbeat_age_seconds: r.heartbeat_age_ms as f64 / 1000.0,
                alive: r.alive,
                hung: hung == Some(r.rank),
                dead: dead == Some(r.rank),
            });
            JobSnapshot {
                world: self.cfg.world,
                generation: inner.generation,
                joined: inner.joined(),
                step: inner.progress.0,
                median_step_seconds: inner.median_step_seconds(),
                checkpoint: inner.checkpoints.last().copied(),
                hangs_detected: inner.hangs_detected,
                total_steps: self.cfg.total_steps,
                peak_flops_per_device: self.cfg.peak_flops_per_device,
                ranks: ranks.collect(),
                counters: inner.counters(),
                stats: inner
                    .reporting()
                    .into_iter()
                    .map(|(r, s)| (r, s.clone()))
                    .collect(),
            }
        };
        metrics::exposition(snapshot)
    }

    /// Asks every rank to stop at its next heartbeat.
    pub fn request_stop(&self) {
        self.lock().stop = true;
    }

    /// Starts a new generation (after the launcher restarted the ranks): the old ranks are forgotten.
    pub fn new_generation(&self) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.earlier = inner.counters();
        inner.members = (0..self.cfg.world).map(|_| None).collect();
        inner.joined = 0;
        inner.free_from = 0;
        inner.peers_json = None;
        inner.steps.clear();
        inner.stop = false;
        inner.progress = (0, Instant::now());
        inner.step_seconds.clear();
        inner.generation
    }

    /// The first error a rank reported as one a restart would repeat: `(rank, error)`.
    pub fn fatal(&self) -> Option<(usize, String)> {
        self.lock().fatal.clone()
    }

    /// Committed checkpoint steps rank 0 reported, oldest first.
    pub fn checkpoints(&self) -> Vec<u64> {
        self.lock().checkpoints.clone()
    }
}

fn reject(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

/// Every endpoint: the bearer token must match, before anything else is looked at.
async fn authorise(State(c): State<Arc<Coordinator>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if c.token.matches(t) => next.run(request).await,
        _ => reject(StatusCode::UNAUTHORIZED, "missing or wrong job token"),
    }
}

async fn join(State(c): State<Arc<Coordinator>>, Json(req): Json<JoinRequest>) -> Response {
    let (rank, generation) = {
        let mut inner = c.lock();
        let world = c.cfg.world;
        let rank = match req.rank {
            Some(r) if r >= world => {
                return reject(
                    StatusCode::BAD_REQUEST,
                    format!("rank {r} is outside a world of {world}"),
                );
            }
            Some(r) => r,
            None => match (inner.free_from..world).find(|&r| inner.members[r].is_none()) {
                Some(r) => {
                    inner.free_from = r + 1;
                    r
                }
                None => {
                    return reject(
                        StatusCode::CONFLICT,
                        format!("all {world} ranks have joined already"),
                    );
                }
            },
        };
        if inner.members[rank].is_some() {
            return reject(
                StatusCode::CONFLICT,
                format!("rank {rank} has joined already"),
            );
        }
        inner.members[rank] = Some(Member {
            host: req.host,
            endpoint: req.endpoint,
            pid: req.pid,
            last_seen: Instant::now(),
            step: 0,
            phase: Phase::Starting,
            departed: false,
            stats: None,
        });
        inner.joined += 1;
        inner.move_step(None, 0);
        if inner.joined() == world {
            // The heartbeat and progress clocks start when the world is complete, not when each rank arrived.
            let now = Instant::now();
            for m in inner.members.iter_mut().flatten() {
                m.last_seen = now;
            }
            inner.progress = (0, now);
            let peers: Vec<&str> = inner
                .members
                .iter()
                .flatten()
                .map(|m| m.endpoint.as_deref().unwrap_or(&m.host))
                .collect();
            inner.peers_json = Some(
                serde_json::to_string(&peers)
                    .expect("a list of strings serialises")
                    .into(),
            );
            tracing::info!(
                world,
                generation = inner.generation,
                "every rank has joined"
            );
            c.formed.send_replace(Some(inner.generation));
        }
        (rank, inner.generation)
    };
    tracing::debug!(rank, generation, "rank joined");
    let mut formed = c.formed.subscribe();
    let mut closing = c.closing.subscribe();
    tokio::select! {
        r = tokio::time::timeout(c.cfg.join_timeout, formed.wait_for(|g| *g == Some(generation))) => {
            if r.is_err() {
                return reject(StatusCode::GATEWAY_TIMEOUT, "the other ranks did not join in time");
            }
        }
        _ = closing.wait_for(|c| *c) => {
            return reject(StatusCode::SERVICE_UNAVAILABLE, "the coordinator is shutting down");
        }
    }
    let mut inner = c.lock();
    if inner.generation != generation {
        return reject(
            StatusCode::CONFLICT,
            "the job restarted while this rank was joining",
        );
    }
    // This rank's heartbeat clock starts now, when it learns the world (with thousands of ranks the last replies
    // leave a while after the world formed).
    if let Some(m) = inner.members[rank].as_mut() {
        m.last_seen = Instant::now();
    }
    let Some(peers) = inner.peers_json.clone() else {
        return reject(
            StatusCode::CONFLICT,
            "the job restarted while this rank was joining",
        );
    };
    drop(inner);
    join_reply(
        rank,
        c.cfg.world,
        generation,
        c.cfg.heartbeat_interval,
        &peers,
    )
}

/// A [`radit_protocol::JoinReply`] around the generation's peers, already serialised (see `Inner::peers_json`).
fn join_reply(
    rank: usize,
    world: usize,
    generation: u64,
    heartbeat_interval: Duration,
    peers_json: &str,
) -> Response {
    let body = format!(
        "{{\"rank\":{rank},\"world\":{world},\"generation\":{generation},\"heartbeat_interval_ms\":{},\"peers\":{peers_json}}}",
        heartbeat_interval.as_millis()
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A heartbeat's body: the compact form (most beats) or JSON (beats with counters or a fatal error).
fn read_beat(headers: &HeaderMap, body: &Bytes) -> Result<Heartbeat, Box<Response>> {
    let compact = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == COMPACT_BEAT_CONTENT_TYPE.as_bytes());
    if compact {
        Heartbeat::from_compact(body)
            .map_err(|e| Box::new(reject(StatusCode::BAD_REQUEST, e.to_string())))
    } else {
        // axum's own reading (with the path of a bad field), without its content-type check.
        Json::<Heartbeat>::from_bytes(body)
            .map(|Json(hb)| hb)
            .map_err(|e| Box::new(e.into_response()))
    }
}

async fn heartbeat(State(c): State<Arc<Coordinator>>, headers: HeaderMap, body: Bytes) -> Response {
    let hb = match read_beat(&headers, &body) {
        Ok(hb) => hb,
        Err(refused) => return *refused,
    };
    if let Some(st) = &hb.stats
        && st.step_seconds_buckets.len() != STEP_SECONDS_BUCKETS.len()
    {
        return reject(
            StatusCode::BAD_REQUEST,
            format!(
                "stats: step_seconds_buckets must hold one count per bucket of the protocol ({})",
                STEP_SECONDS_BUCKETS.len()
            ),
        );
    }
    let mut inner = c.lock();
    if hb.generation != inner.generation {
        // 410: the protocol's "superseded" (radit_protocol::ClientError::Superseded), not a conflict to retry.
        return reject(
            StatusCode::GONE,
            format!(
                "generation {} is over; the job is at {}",
                hb.generation, inner.generation
            ),
        );
    }
    let stop = inner.stop;
    let Some(m) = inner.members.get_mut(hb.rank).and_then(Option::as_mut) else {
        return reject(
            StatusCode::BAD_REQUEST,
            format!("rank {} has not joined", hb.rank),
        );
    };
    m.last_seen = Instant::now();
    let before = std::mem::replace(&mut m.step, hb.step);
    if let Some(p) = hb.phase {
        m.phase = p;
    }
    if hb.done {
        m.departed = true;
    }
    if let Some(st) = hb.stats {
        m.stats = Some(st);
    }
    if let Some(why) = hb.fatal {
        inner.fatal.get_or_insert((hb.rank, why));
    }
    if before != hb.step {
        inner.move_step(Some(before), hb.step);
    }
    // The run's progress is its slowest rank's step; time how long each advance took.
    if inner.joined() == c.cfg.world {
        let slowest = inner.steps.keys().next().copied().unwrap_or(0);
        let (last, since) = inner.progress;
        if slowest > last {
            let now = Instant::now();
            let per_step =
                now.saturating_duration_since(since).as_secs_f64() / (slowest - last) as f64;
            // The first advance includes start-up (loading, compiling): not a step time.
            if last > 0 {
                inner.step_seconds.push_back(per_step);
                if inner.step_seconds.len() > 64 {
                    inner.step_seconds.pop_front();
                }
            }
            inner.progress = (slowest, now);
        }
    }
    drop(inner);
    // The two possible replies, written once: most of what a beat costs is HTTP, not this handler.
    static GO: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| reply_bytes(&HeartbeatReply { stop: false }));
    static STOP: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| reply_bytes(&HeartbeatReply { stop: true }));
    let body = if stop { &STOP } else { &GO };
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::clone(body),
    )
        .into_response()
}

fn reply_bytes(reply: &HeartbeatReply) -> Bytes {
    Bytes::from(serde_json::to_vec(reply).unwrap_or_default())
}

async fn report_checkpoint(
    State(c): State<Arc<Coordinator>>,
    Json(r): Json<CheckpointReport>,
) -> Response {
    let mut inner = c.lock();
    if inner.checkpoints.last().is_some_and(|last| *last >= r.step) {
        return reject(
            StatusCode::CONFLICT,
            format!("checkpoint {} is not newer than the last one", r.step),
        );
    }
    inner.checkpoints.push(r.step);
    StatusCode::NO_CONTENT.into_response()
}

async fn status(State(c): State<Arc<Coordinator>>) -> Response {
    Json(serde_json::json!({
        "generation": c.generation(),
        "health": c.health(),
        "ranks": c.ranks(),
        "checkpoints": c.checkpoints(),
    }))
    .into_response()
}

async fn scrape(State(c): State<Arc<Coordinator>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], c.metrics()).into_response()
}

/// The endpoints, behind the token check and the body limit.
pub fn router(c: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/join", post(join))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/checkpoints", post(report_checkpoint))
        .route("/v1/status", get(status))
        .route("/metrics", get(scrape))
        .layer(DefaultBodyLimit::max(c.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(c.clone(), authorise))
        .with_state(c)
}

/// Serves until `shutdown` completes, then finishes the requests in flight and returns.
pub async fn serve<L>(
    listener: L,
    coordinator: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    tracing::info!(addr = ?listener.local_addr().ok(), world = coordinator.cfg.world, "coordinator listening");
    let c = coordinator.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("coordinator shutting down");
        c.closing.send_replace(true);
    };
    axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_protocol::JoinReply;

    fn golden(name: &str, text: &str) {
        radit_testkit::assert_golden(env!("CARGO_MANIFEST_DIR"), name, text);
    }

    async fn join_all(c: &Arc<Coordinator>, generation: u64) {
        let joins: Vec<_> = (0..c.cfg.world)
            .map(|rank| {
                let request = JoinRequest {
                    host: format!("node{rank}"),
                    pid: 100 + rank as u32,
                    rank: Some(rank),
                    endpoint: None,
                };
                tokio::spawn(join(State(c.clone()), Json(request)))
            })
            .collect();
        for j in joins {
            assert_eq!(j.await.expect("joined").status(), StatusCode::OK);
        }
        assert_eq!(c.generation(), generation);
    }

    /// Join replies are assembled from the generation's peers serialised once: they must decode to the reply
    /// serde would have written, also for endpoints that need escaping, and ranks without a rank take the lowest
    /// free one.
    #[tokio::test]
    async fn join_replies_carry_every_peer_in_rank_order() {
        let c = Coordinator::new(
            CoordinatorConfig::new(3),
            JobToken::generate().expect("a token"),
        );
        let request = |rank: Option<usize>, endpoint: Option<&str>| JoinRequest {
            host: format!("node-{}", rank.unwrap_or(9)),
            pid: 7,
            rank,
            endpoint: endpoint.map(str::to_string),
        };
        let joins = [
            tokio::spawn(join(
                State(c.clone()),
                Json(request(Some(1), Some("10.0.0.1:\"7\""))),
            )),
            tokio::spawn(join(
                State(c.clone()),
                Json(request(None, Some("[::1]:29500"))),
            )),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = join(State(c.clone()), Json(request(None, None))).await;
        let mut replies = vec![last];
        for j in joins {
            replies.push(j.await.expect("joined"));
        }
        let mut decoded = Vec::new();
        for r in replies {
            assert_eq!(r.status(), StatusCode::OK);
            let body = axum::body::to_bytes(r.into_body(), 1 << 20)
                .await
                .expect("body");
            decoded.push(serde_json::from_slice::<JoinReply>(&body).expect("a JoinReply"));
        }
        decoded.sort_by_key(|r| r.rank);
        for (rank, r) in decoded.iter().enumerate() {
            assert_eq!(
                *r,
                JoinReply {
                    rank,
                    world: 3,
                    generation: 0,
                    peers: vec![
                        "[::1]:29500".to_string(),
                        "10.0.0.1:\"7\"".to_string(),
                        "node-9".to_string()
                    ],
                    heartbeat_interval_ms: 5000,
                }
            );
        }
    }

    async fn beat(c: &Arc<Coordinator>, rank: usize, step: u64, stats: Option<RankStats>) {
        let hb = Heartbeat {
            rank,
            generation: c.generation(),
            step,
            phase: Some(Phase::Compute),
            stats,
            ..Heartbeat::default()
        };
        // As the client sends it: compact without counters, JSON with them.
        let mut headers = HeaderMap::new();
        let body = match hb.to_compact() {
            Some(b) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    COMPACT_BEAT_CONTENT_TYPE.parse().unwrap(),
                );
                Bytes::copy_from_slice(&b)
            }
            None => Bytes::from(serde_json::to_vec(&hb).unwrap()),
        };
        assert_eq!(
            heartbeat(State(c.clone()), headers, body).await.status(),
            StatusCode::OK
        );
    }

    /// What `rank` reports after `steps` steps of 0.75 s (4 images of 256 tokens each), rank 0 and 1 on GPUs.
    fn stats(rank: usize, steps: u64) -> RankStats {
        let r = rank as u64;
        RankStats {
            steps,
            images: 4 * steps,
            tokens: 1024 * steps,
            model_flops: 2.5e12 * steps as f64,
            step_flops: 2.5e12,
            data_wait_seconds: 0.125 * steps as f64,
            step_seconds_buckets: STEP_SECONDS_BUCKETS
                .iter()
                .map(|&b| if b >= 1.0 { steps } else { 0 })
                .collect(),
            step_seconds_count: steps,
            step_seconds_sum: 0.75 * steps as f64,
            skipped_steps: 1,
            loss: 0.5 + 0.125 * r as f64,
            grad_norm: 1.25,
            learning_rate: 3e-4,
            checkpoint_stall_seconds: 0.5 + r as f64,
            checkpoints: 1,
            checkpoint_write_seconds: 2.0 + r as f64,
            checkpoint_save_seconds: 4.0 + r as f64,
            checkpoint_bytes: 1 << 20,
            loss_max: 0.75,
            device_memory_used_bytes: if rank < 2 { (20 + r) << 30 } else { 0 },
            device_memory_total_bytes: if rank < 2 { 96 << 30 } else { 0 },
            // a validation loss at step 4
            val_step: if steps >= 4 { 4 } else { 0 },
            val_loss: if steps >= 4 { 0.375 } else { f64::NAN },
            ..RankStats::default()
        }
    }

    /// A job of 3 ranks relaunched once (generation 2): 4 steps of 2 s, a checkpoint at step 4, one hang detected
    /// earlier, rank 2 silent for 21.5 s (dead), a mini-FD from generation 1 and a validation loss at step 4. Time is
    /// tokio's paused clock, so every value is fixed.
    #[tokio::test(start_paused = true)]
    async fn the_exposition_matches_its_golden_file() {
        let mut cfg = CoordinatorConfig::new(3);
        cfg.total_steps = Some(100);
        cfg.peak_flops_per_device = Some(1e14);
        let c = Coordinator::new(cfg, JobToken::generate().expect("a token"));
        assert_eq!(c.new_generation(), 1);
        join_all(&c, 1).await;
        // The first generation measured a mini-FD; the exposition keeps it after the relaunch.
        for rank in 0..3 {
            let mut s = stats(rank, 2);
            (s.fd_step, s.fd) = (2, 41.5);
            beat(&c, rank, 2, Some(s)).await;
        }
        c.record_hang();
        assert_eq!(c.new_generation(), 2);
        join_all(&c, 2).await;
        for step in 1..=4 {
            tokio::time::advance(Duration::from_secs(2)).await;
            for rank in 0..3 {
                beat(&c, rank, step, Some(stats(rank, step))).await;
            }
        }
        let reply = report_checkpoint(State(c.clone()), Json(CheckpointReport { step: 4 })).await;
        assert_eq!(reply.status(), StatusCode::NO_CONTENT);
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(10)).await;
            for rank in 0..2 {
                beat(&c, rank, 4, Some(stats(rank, 4))).await;
            }
        }
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(matches!(c.health(), JobHealth::RankDead { rank: 2, .. }));
        golden("metrics.txt", &c.metrics());
    }

    /// Before any rank joined: no per-rank series, no step time, no rank-reported series, no checkpoint (-1).
    #[tokio::test(start_paused = true)]
    async fn a_forming_job_exposes_its_golden_file() {
        let c = Coordinator::new(
            CoordinatorConfig::new(2),
            JobToken::generate().expect("a token"),
        );
        golden("metrics-forming.txt", &c.metrics());
    }
}
