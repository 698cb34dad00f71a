//! The bodies of the coordinator's endpoints, as JSON: `/v1/join` ([`JoinRequest`] -> [`JoinReply`]),
//! `/v1/heartbeat` ([`Heartbeat`] -> [`HeartbeatReply`]), `/v1/checkpoints` ([`CheckpointReport`]). Unknown fields are
//! refused, so a typo or a mismatched version is an error, not a silently dropped value. A heartbeat without
//! counters also has a fixed 23-byte form ([`Heartbeat::to_compact`]): most beats are that, and cost the
//! coordinator no JSON.

use serde::{Deserialize, Serialize};

/// What a rank process is doing now. The coordinator names the culprit of a hang from it: ranks waiting in a
/// collective are victims, the one that is not is the culprit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Phase {
    #[default]
    Starting = 0,
    Data = 1,
    Compute = 2,
    Collective = 3,
    Checkpoint = 4,
    /// Drawing the preview contact sheet.
    Sampling = 5,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Data => "data",
            Phase::Compute => "compute",
            Phase::Collective => "collective",
            Phase::Checkpoint => "checkpoint",
            Phase::Sampling => "sampling",
        }
    }

    /// The phase stored as `phase as u8` (unknown values read as `Starting`).
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Data,
            2 => Phase::Compute,
            3 => Phase::Collective,
            4 => Phase::Checkpoint,
            5 => Phase::Sampling,
            _ => Phase::Starting,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Upper bounds (seconds) of the step-time histogram's buckets: ranks count into them, the coordinator exports
/// them as `le` labels.
pub const STEP_SECONDS_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub host: String,
    pub pid: u32,
    /// The rank the launcher gave this process (Slurm, OpenMPI); without it ranks are given in join order.
    #[serde(default)]
    pub rank: Option<usize>,
    /// Where this rank accepts its peers' connections (rank 0's is the TCP collective's hub).
    #[serde(default)]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinReply {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
    /// Every rank's endpoint (or host, when it gave none), in rank order.
    pub peers: Vec<String>,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub rank: usize,
    pub generation: u64,
    /// The last finished step.
    pub step: u64,
    /// What the rank is doing.
    #[serde(default)]
    pub phase: Option<Phase>,
    /// The rank's last heartbeat: it is exiting in order (finished, or checkpointed for a requeue); its silence
    /// from now on is not a death.
    #[serde(default)]
    pub done: bool,
    /// The rank's training counters so far (after its first step).
    #[serde(default)]
    pub stats: Option<RankStats>,
    /// The rank is ending on an error that a restart would repeat (out of memory): the supervisor stops and says
    /// what to change instead of relaunching the same configuration.
    #[serde(default)]
    pub fatal: Option<String>,
}

/// What a rank reports about its training, cumulative since it started (a restarted rank starts from zero; the
/// coordinator keeps what earlier generations counted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankStats {
    pub steps: u64,
    pub images: u64,
    pub tokens: u64,
    pub model_flops: f64,
    /// Model FLOPs of the rank's last step.
    #[serde(default)]
    pub step_flops: f64,
    pub data_wait_seconds: f64,
    /// The cumulative count of steps in each bucket of [`STEP_SECONDS_BUCKETS`].
    pub step_seconds_buckets: Vec<u64>,
    pub step_seconds_count: u64,
    pub step_seconds_sum: f64,
    pub skipped_steps: u64,
    /// NaN when there is none (an encode job) or the step diverged: JSON carries it as null.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub checkpoint_stall_seconds: f64,
    pub checkpoints: u64,
    pub checkpoint_write_seconds: f64,
    pub checkpoint_save_seconds: f64,
    pub checkpoint_bytes: u64,
    /// The largest of the ranks' own losses of this rank's last step (the same on every rank at a step).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss_max: f64,
    /// 0 on CPU ranks.
    pub device_memory_used_bytes: u64,
    pub device_memory_total_bytes: u64,
    /// The last validation loss and its step (0: none yet); the same on every rank.
    #[serde(default)]
    pub val_step: u64,
    #[serde(default, deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// The last mini-FD and its step (0: none yet).
    #[serde(default)]
    pub fd_step: u64,
    #[serde(default, deserialize_with = "nan_if_null")]
    pub fd: f64,
    /// Seconds from the start of this rank's first step to the end of its last recorded one, taken with the
    /// counters above: rates are the counters' growth over this, so a heartbeat's lag does not skew them.
    #[serde(default)]
    pub busy_seconds: f64,
}

/// serde_json writes a non-finite f64 as null; read null back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The content type of a heartbeat in its compact form ([`Heartbeat::to_compact`]).
pub const COMPACT_BEAT_CONTENT_TYPE: &str = "application/x-radit-beat";

/// The layout version of the compact heartbeat; the coordinator refuses any other.
const COMPACT_BEAT_VERSION: u8 = 1;

/// Bytes of a compact heartbeat: version, flags, phase, rank (u32), generation (u64), step (u64), little-endian.
pub const COMPACT_BEAT_BYTES: usize = 23;

const FLAG_DONE: u8 = 1;
const FLAG_PHASE: u8 = 2;

/// How often a rank's training counters ride on its heartbeat: the beats between carry only rank, generation,
/// step and phase, in 23 bytes instead of about 700 of JSON. The counters feed `/metrics`, which Prometheus
/// scrapes every 15 s; the step (what failure and hang detection read) is on every beat.
pub const STATS_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a beat sent at `now` carries the counters, the last beat that did having been sent at `last` (none
/// yet: it does).
pub fn stats_due(last: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= STATS_PERIOD)
}

/// A compact heartbeat that cannot be read, named by what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompactBeatError {
    #[error("a compact heartbeat is {COMPACT_BEAT_BYTES} bytes, this one {0}")]
    Length(usize),
    #[error("compact heartbeat version {0}; this coordinator reads version {COMPACT_BEAT_VERSION}")]
    Version(u8),
    #[error("compact heartbeat phase {0} is not a phase of the protocol")]
    Phase(u8),
}

impl Heartbeat {
    /// The beat in 23 bytes, when it carries nothing beyond rank, generation, step, phase and `done` (no
    /// counters, no fatal error) and its rank fits in 32 bits; `None` otherwise (send it as JSON).
    pub fn to_compact(&self) -> Option<[u8; COMPACT_BEAT_BYTES]> {
        if self.stats.is_some() || self.fatal.is_some() {
            return None;
        }
        let rank = u32::try_from(self.rank).ok()?;
        let mut b = [0u8; COMPACT_BEAT_BYTES];
        b[0] = COMPACT_BEAT_VERSION;
        b[1] = if self.done { FLAG_DONE } else { 0 }
            | if self.phase.is_some() { FLAG_PHASE } else { 0 };
        b[2] = self.phase.map_or(0, |p| p as u8);
        b[3..7].copy_from_slice(&rank.to_le_bytes());
        b[7..15].copy_from_slice(&self.generation.to_le_bytes());
        b[15..23].copy_from_slice(&self.step.to_le_bytes());
        Some(b)
    }

    /// Reads [`Heartbeat::to_compact`]'s bytes.
    pub fn from_compact(b: &[u8]) -> Result<Self, CompactBeatError> {
        let b: &[u8; COMPACT_BEAT_BYTES] = b
            .try_into()
            .map_err(|_| CompactBeatError::Length(b.len()))?;
        if b[0] != COMPACT_BEAT_VERSION {
            return Err(CompactBeatError::Version(b[0]));
        }
        let phase = if b[1] & FLAG_PHASE != 0 {
            let p = Phase::from_u8(b[2]);
            if p as u8 != b[2] {
                return Err(CompactBeatError::Phase(b[2]));
            }
            Some(p)
        } else {
            None
        };
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(w)
        };
        Ok(Heartbeat {
            rank: word(3..7) as usize,
            generation: word(7..15),
            step: word(15..23),
            phase,
            done: b[1] & FLAG_DONE != 0,
            stats: None,
            fatal: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The job is stopping (another rank failed, or the operator asked): finish the step and exit.
    pub stop: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointReport {
    pub step: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_travel_by_name_and_round_trip_through_their_stored_byte() {
        for p in [
            Phase::Starting,
            Phase::Data,
            Phase::Compute,
            Phase::Collective,
            Phase::Checkpoint,
            Phase::Sampling,
        ] {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.name())
            );
            assert_eq!(Phase::from_u8(p as u8), p);
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(Phase::from_u8(200), Phase::Starting);
        assert!(serde_json::from_str::<Phase>("\"napping\"").is_err());
    }

    #[test]
    fn a_compact_beat_round_trips_and_a_malformed_one_is_named() {
        let beat = Heartbeat {
            rank: 4095,
            generation: 3,
            step: u64::MAX - 7,
            phase: Some(Phase::Collective),
            done: true,
            ..Heartbeat::default()
        };
        let bytes = beat.to_compact().unwrap();
        assert_eq!(Heartbeat::from_compact(&bytes).unwrap(), beat);
        let no_phase = Heartbeat {
            phase: None,
            done: false,
            ..beat.clone()
        };
        assert_eq!(
            Heartbeat::from_compact(&no_phase.to_compact().unwrap()).unwrap(),
            no_phase
        );
        // Counters, a fatal error or a rank beyond 32 bits go as JSON.
        let with_stats = Heartbeat {
            stats: Some(RankStats::default()),
            ..beat.clone()
        };
        assert!(with_stats.to_compact().is_none());
        let fatal = Heartbeat {
            fatal: Some("out of memory".into()),
            ..beat.clone()
        };
        assert!(fatal.to_compact().is_none());
        if usize::BITS > 32 {
            let far = Heartbeat {
                rank: 1 << 33,
                ..beat.clone()
            };
            assert!(far.to_compact().is_none());
        }
        assert_eq!(
            Heartbeat::from_compact(&bytes[..22]),
            Err(CompactBeatError::Length(22))
        );
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(
            Heartbeat::from_compact(&v2),
            Err(CompactBeatError::Version(2))
        );
        let mut odd = bytes;
        odd[2] = 9;
        assert_eq!(
            Heartbeat::from_compact(&odd),
            Err(CompactBeatError::Phase(9))
        );
        assert!(CompactBeatError::Phase(9).to_string().contains("phase 9"));
    }

    #[test]
    fn a_step_without_a_loss_still_heartbeats() {
        // An encode rank has no loss and a diverged training step has a NaN one: the heartbeat must still parse.
        let stats = RankStats {
            loss: f64::NAN,
            loss_max: f64::INFINITY,
            grad_norm: f64::NAN,
            step_seconds_buckets: vec![0; STEP_SECONDS_BUCKETS.len()],
            ..RankStats::default()
        };
        let json = serde_json::to_string(&stats).unwrap();
        assert!(json.contains("\"loss\":null"), "{json}");
        let back: RankStats = serde_json::from_str(&json).unwrap();
        assert!(back.loss.is_nan() && back.loss_max.is_nan() && back.grad_norm.is_nan());
        assert_eq!(back.images, stats.images);
    }

    #[test]
    fn unknown_fields_are_refused_so_a_mismatched_sender_is_an_error() {
        let beat = Heartbeat {
            rank: 1,
            generation: 2,
            step: 3,
            stats: Some(RankStats {
                step_seconds_buckets: vec![0; STEP_SECONDS_BUCKETS.len()],
                ..RankStats::default()
            }),
            ..Heartbeat::default()
        };
        let mut v = serde_json::to_value(&beat).unwrap();
        assert_eq!(
            serde_json::from_value::<Heartbeat>(v.clone()).unwrap(),
            beat
        );
        // The bucket bounds are a constant of the protocol: a sender that still sends them is refused.
        v["stats"]["step_seconds_bounds"] = serde_json::json!([0.1, 1.0]);
        assert!(serde_json::from_value::<Heartbeat>(v).is_err());
        let join = serde_json::json!({"host": "n0", "pid": 7, "rank": 3, "shoe_size": 42});
        assert!(serde_json::from_value::<JoinRequest>(join).is_err());
        assert!(STEP_SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
