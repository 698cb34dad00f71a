//! What crosses a process boundary in radit, and nothing else: a leaf crate (serde and std) that the supervisor,
//! the coordinator, the launchers and the ranks all speak.
//!
//! - [`wire`]: the coordinator's request and reply bodies (join, heartbeat, rank statistics, checkpoint reports),
//!   the rank phase and the step-time histogram's bucket bounds (a constant of the protocol, not sent).
//! - [`token`]: the per-job secret and its constant-time comparison (the coordinator's bearer token, the TCP
//!   collective's hello).
//! - [`client`]: the ranks' blocking client for the coordinator (on `ureq`).
//! - [`env`]: the environment contract between supervisor, launchers and ranks: the variables radit sets and the
//!   launcher variables it reads to learn a process's rank.
//!
//! ```
//! use radit_protocol::{Heartbeat, Phase};
//! let beat = Heartbeat { rank: 3, generation: 1, step: 1200, phase: Some(Phase::Compute), ..Heartbeat::default() };
//! let body = serde_json::to_string(&beat).unwrap();
//! assert!(body.contains(r#""phase":"compute""#));
//! assert_eq!(serde_json::from_str::<Heartbeat>(&body).unwrap(), beat);
//! ```

pub mod client;
pub mod config;
pub mod env;
pub mod token;
pub mod wire;

pub use client::{ClientError, CoordinatorClient, PinnedAuthority};
pub use config::ConfigError;
pub use env::{Launcher, REQUEUE_EXIT_CODE, RankIdentity, rank_identity};
pub use token::{JobToken, constant_time_eq, random_bytes};
pub use wire::{
    COMPACT_BEAT_BYTES, COMPACT_BEAT_CONTENT_TYPE, CheckpointReport, CompactBeatError, Heartbeat,
    HeartbeatReply, JoinReply, JoinRequest, Phase, RankStats, STATS_PERIOD, STEP_SECONDS_BUCKETS,
    stats_due,
};
