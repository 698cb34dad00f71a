//! The `[restart]` section of a job: how the coordinator tells a dead or hung rank, and how often the supervisor
//! relaunches. Its settings are the coordinator's own, so the job spec embeds this type as it is.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use radit_protocol::ConfigError;

use crate::CoordinatorConfig;

/// What happens when a rank fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Relaunches of every rank from the last committed checkpoint before the run is declared failed.
    #[serde(default = "default_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: f64,
    /// A rank silent for this many heartbeats is dead.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
    /// No step finished for `hang_factor` x the median step time (and at least `hang_min_seconds`): a hang.
    #[serde(default = "default_hang_factor")]
    pub hang_factor: f64,
    #[serde(default = "default_hang_min")]
    pub hang_min_seconds: f64,
    /// The hang deadline until the first step is done (building the model, loading a checkpoint).
    #[serde(default = "default_hang_startup")]
    pub hang_startup_seconds: f64,
    /// Ranks that cannot reach the coordinator for this long checkpoint and exit with the requeue code.
    #[serde(default = "default_grace")]
    pub coordinator_grace_seconds: f64,
    /// How long the ranks wait for each other while their group forms (nodes of one job start minutes apart).
    #[serde(default = "default_rendezvous")]
    pub rendezvous_seconds: f64,
    /// How long a rank waits for a peer in one collective once the group has formed: the backstop when the
    /// coordinator, which names hangs sooner, is gone.
    #[serde(default = "default_collective")]
    pub collective_timeout_seconds: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: default_restarts(),
            heartbeat_seconds: default_heartbeat(),
            missed_heartbeats: default_missed(),
            hang_factor: default_hang_factor(),
            hang_min_seconds: default_hang_min(),
            hang_startup_seconds: default_hang_startup(),
            coordinator_grace_seconds: default_grace(),
            rendezvous_seconds: default_rendezvous(),
            collective_timeout_seconds: default_collective(),
        }
    }
}

fn default_restarts() -> u32 {
    3
}
fn default_heartbeat() -> f64 {
    5.0
}
fn default_missed() -> u32 {
    3
}
fn default_hang_factor() -> f64 {
    10.0
}
fn default_hang_min() -> f64 {
    300.0
}
fn default_hang_startup() -> f64 {
    900.0
}
fn default_grace() -> f64 {
    60.0
}
fn default_rendezvous() -> f64 {
    1800.0
}
fn default_collective() -> f64 {
    900.0
}

impl RestartPolicy {
    /// The first setting that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("restart.heartbeat_seconds", self.heartbeat_seconds),
            ("restart.hang_factor", self.hang_factor),
            ("restart.hang_min_seconds", self.hang_min_seconds),
            ("restart.hang_startup_seconds", self.hang_startup_seconds),
            (
                "restart.coordinator_grace_seconds",
                self.coordinator_grace_seconds,
            ),
            ("restart.rendezvous_seconds", self.rendezvous_seconds),
            (
                "restart.collective_timeout_seconds",
                self.collective_timeout_seconds,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::new(
                    field,
                    format!("must be a positive number of seconds, got {v}"),
                ));
            }
        }
        if self.missed_heartbeats == 0 {
            return Err(ConfigError::new(
                "restart.missed_heartbeats",
                "must be positive",
            ));
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_seconds)
    }

    /// How long ranks keep going without the coordinator before they checkpoint and exit.
    pub fn coordinator_grace(&self) -> Duration {
        Duration::from_secs_f64(self.coordinator_grace_seconds)
    }

    /// The coordinator of a `world`-rank run under this policy.
    pub fn coordinator_config(&self, world: usize) -> CoordinatorConfig {
        CoordinatorConfig {
            heartbeat_interval: self.heartbeat_interval(),
            missed_heartbeats: self.missed_heartbeats,
            hang_factor: self.hang_factor,
            hang_min: Duration::from_secs_f64(self.hang_min_seconds),
            hang_startup: Duration::from_secs_f64(self.hang_startup_seconds),
            ..CoordinatorConfig::new(world)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_check_and_become_the_coordinator_settings() {
        let p = RestartPolicy::default();
        assert_eq!(p.check(), Ok(()));
        let c = p.coordinator_config(8);
        assert_eq!((c.world, c.missed_heartbeats), (8, 3));
        assert_eq!(c.hang_min, Duration::from_secs(300));
        let bad = RestartPolicy {
            hang_factor: f64::NAN,
            ..p.clone()
        };
        assert_eq!(bad.check().unwrap_err().field, "restart.hang_factor");
        let bad = RestartPolicy {
            missed_heartbeats: 0,
            ..p
        };
        assert_eq!(bad.check().unwrap_err().field, "restart.missed_heartbeats");
    }

    #[test]
    fn the_rank_groups_timeouts_are_settings_checked_like_the_others() {
        let p: RestartPolicy =
            serde_json::from_str(r#"{"collective_timeout_seconds": 120.0}"#).unwrap();
        assert_eq!(
            (p.rendezvous_seconds, p.collective_timeout_seconds),
            (1800.0, 120.0)
        );
        let bad = RestartPolicy {
            rendezvous_seconds: 0.0,
            ..p
        };
        assert_eq!(bad.check().unwrap_err().field, "restart.rendezvous_seconds");
    }
}
