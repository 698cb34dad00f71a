//! The coordinator's state and HTTP endpoints.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Json, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::JobToken;

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
}

impl CoordinatorConfig {
    pub fn new(world: usize) -> Self {
        Self {
            world,
            heartbeat_interval: Duration::from_secs(5),
            missed_heartbeats: 3,
            max_body_bytes: 64 << 10,
            join_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub host: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinReply {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
    /// Host of every rank, in rank order.
    pub peers: Vec<String>,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub rank: usize,
    pub generation: u64,
    pub step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The job is stopping (another rank failed, or the operator asked): finish the step and exit.
    pub stop: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointReport {
    step: u64,
}

/// One rank as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankState {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    pub step: u64,
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
}

struct Member {
    host: String,
    pid: u32,
    last_seen: Instant,
    step: u64,
}

struct Inner {
    generation: u64,
    members: Vec<Member>,
    stop: bool,
    checkpoints: Vec<u64>,
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
        Arc::new(Self {
            cfg,
            token,
            inner: Mutex::new(Inner {
                generation: 0,
                members: Vec::new(),
                stop: false,
                checkpoints: Vec::new(),
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

    /// Health now: forming, running, or the first rank that has been silent too long.
    pub fn health(&self) -> JobHealth {
        let inner = self.lock();
        if inner.members.len() < self.cfg.world {
            return JobHealth::Forming {
                joined: inner.members.len(),
                world: self.cfg.world,
            };
        }
        let limit = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        let now = Instant::now();
        inner
            .members
            .iter()
            .enumerate()
            .map(|(rank, m)| (rank, now.saturating_duration_since(m.last_seen)))
            .find(|(_, age)| *age > limit)
            .map_or(JobHealth::Running, |(rank, age)| JobHealth::RankDead {
                rank,
                silent_ms: age.as_millis() as u64,
            })
    }

    pub fn ranks(&self) -> Vec<RankState> {
        let inner = self.lock();
        let limit = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        let now = Instant::now();
        inner
            .members
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let age = now.saturating_duration_since(m.last_seen);
                RankState {
                    rank,
                    host: m.host.clone(),
                    pid: m.pid,
                    step: m.step,
                    heartbeat_age_ms: age.as_millis() as u64,
                    alive: age <= limit,
                }
            })
            .collect()
    }

    /// Asks every rank to stop at its next heartbeat.
    pub fn request_stop(&self) {
        self.lock().stop = true;
    }

    /// Starts a new generation (after the launcher restarted the ranks): the old ranks are forgotten.
    pub fn new_generation(&self) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.members.clear();
        inner.stop = false;
        inner.generation
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
        if inner.members.len() >= c.cfg.world {
            return reject(
                StatusCode::CONFLICT,
                format!("all {} ranks have joined already", c.cfg.world),
            );
        }
        inner.members.push(Member {
            host: req.host,
            pid: req.pid,
            last_seen: Instant::now(),
            step: 0,
        });
        let rank = inner.members.len() - 1;
        if inner.members.len() == c.cfg.world {
            // The heartbeat clock starts when the world is complete, not when each rank arrived.
            let now = Instant::now();
            for m in &mut inner.members {
                m.last_seen = now;
            }
            c.formed.send_replace(Some(inner.generation));
        }
        (rank, inner.generation)
    };
    tracing::info!(rank, generation, "rank joined");
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
    let inner = c.lock();
    Json(JoinReply {
        rank,
        world: c.cfg.world,
        generation,
        peers: inner.members.iter().map(|m| m.host.clone()).collect(),
        heartbeat_interval_ms: c.cfg.heartbeat_interval.as_millis() as u64,
    })
    .into_response()
}

async fn heartbeat(State(c): State<Arc<Coordinator>>, Json(hb): Json<Heartbeat>) -> Response {
    let mut inner = c.lock();
    if hb.generation != inner.generation {
        return reject(
            StatusCode::CONFLICT,
            format!(
                "generation {} is over; the job is at {}",
                hb.generation, inner.generation
            ),
        );
    }
    let stop = inner.stop;
    let Some(m) = inner.members.get_mut(hb.rank) else {
        return reject(
            StatusCode::BAD_REQUEST,
            format!("rank {} has not joined", hb.rank),
        );
    };
    m.last_seen = Instant::now();
    m.step = hb.step;
    Json(HeartbeatReply { stop }).into_response()
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

/// The endpoints, behind the token check and the body limit.
pub fn router(c: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/join", post(join))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/checkpoints", post(report_checkpoint))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(c.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(c.clone(), authorise))
        .with_state(c)
}

/// Serves until `shutdown` completes, then finishes the requests in flight and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
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
