//! The per-job coordinator (its wire types and token are in `radit_protocol`): one small HTTP service that the job's ranks join, heartbeat and report to, so the
//! launcher can tell a healthy run from a dead or hung rank without reaching the compute nodes.
//!
//! - Rendezvous: a rank posts `/v1/join` with the job token and its host; once `world` ranks have joined, every
//!   joiner learns its rank, the world and the peers (rank order = join order, stable for the generation).
//! - Heartbeats: ranks post `/v1/heartbeat` with their step; a rank silent for `missed x interval` is declared dead.
//! - Catalogue: rank 0 reports committed checkpoints to `/v1/checkpoints`.
//! - Security: every endpoint needs `Authorization: Bearer <job token>`; bodies over `max_body_bytes` and malformed
//!   JSON are rejected before they touch the state; the service binds only the address it is given, and serves
//!   HTTPS with a per-job certificate authority (`tls`) when the job spans nodes.
//!
//! [`serve`] takes its shutdown signal as a parameter and drains in-flight requests before returning.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use radit_coordinator::{Coordinator, CoordinatorConfig};
//! use radit_protocol::JobToken;
//! let token = JobToken::generate()?;
//! let coordinator = Coordinator::new(CoordinatorConfig::new(4), token);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! radit_coordinator::serve(listener, coordinator, async { /* wait for ctrl-c */ }).await?;
//! # Ok(()) }
//! ```

pub mod restart;
mod server;
pub mod service;
pub mod simulate;
pub mod tls;

pub use restart::RestartPolicy;
pub use server::{Coordinator, CoordinatorConfig, JobHealth, Pace, RankState, Totals, serve};
pub use service::Service;
