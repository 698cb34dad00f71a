//! The ranks' side of the coordinator's API: a blocking client (ranks call it between steps and from their
//! heartbeat thread; no async runtime needed) on `ureq`. Each client (and each clone) keeps its own connection
//! open between calls: thousands of ranks heart-beating over fresh connections would leave tens of thousands of
//! sockets in TIME_WAIT on the coordinator's node.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{CheckpointReport, Heartbeat, HeartbeatReply, JobToken, JoinReply, JoinRequest};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The coordinator could not be reached, or did not answer in time (it is down, or the address is wrong):
    /// retry or restart.
    #[error("coordinator at {addr} unreachable")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The coordinator refused the request.
    #[error("coordinator refused {path} with HTTP {status}: {body}")]
    Refused {
        path: String,
        status: u16,
        body: String,
    },
    #[error("coordinator sent an unreadable reply to {path}: {reason}")]
    BadReply { path: String, reason: String },
}

/// Replies are small JSON documents; anything larger is refused rather than allocated.
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// A rank's connection to its job's coordinator.
#[derive(Debug)]
pub struct CoordinatorClient {
    addr: SocketAddr,
    token: JobToken,
    timeout: Duration,
    agent: ureq::Agent,
}

impl Clone for CoordinatorClient {
    /// A clone opens a connection of its own (a heartbeat thread must not wait behind a join).
    fn clone(&self) -> Self {
        Self::new(self.addr, self.token.clone()).with_timeout(self.timeout)
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(timeout))
        // Refusals are answers with a body worth reporting, not transport errors.
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

impl CoordinatorClient {
    pub fn new(addr: SocketAddr, token: JobToken) -> Self {
        let timeout = Duration::from_secs(30);
        Self {
            addr,
            token,
            timeout,
            agent: agent(timeout),
        }
    }

    /// Per-request timeout for the whole exchange (joining waits for the whole world, so give it longer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.agent = agent(timeout);
        self
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinReply, ClientError> {
        self.call(Some(request), "/v1/join")?
            .ok_or_else(|| empty("/v1/join"))
    }

    pub fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        self.call(Some(heartbeat), "/v1/heartbeat")?
            .ok_or_else(|| empty("/v1/heartbeat"))
    }

    pub fn report_checkpoint(&self, step: u64) -> Result<(), ClientError> {
        let _: Option<serde_json::Value> =
            self.call(Some(&CheckpointReport { step }), "/v1/checkpoints")?;
        Ok(())
    }

    pub fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.call::<(), _>(None, "/v1/status")?
            .ok_or_else(|| empty("/v1/status"))
    }

    /// POSTs `body` as JSON (GET without one) and reads the JSON reply; `None` for an empty one.
    fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        body: Option<&B>,
        path: &str,
    ) -> Result<Option<R>, ClientError> {
        let url = format!("http://{}{path}", self.addr);
        let auth = format!("Bearer {}", self.token.secret());
        let sent = match body {
            Some(b) => {
                let payload = serde_json::to_vec(b).map_err(|e| bad(path, e.to_string()))?;
                self.agent
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .send(&payload[..])
            }
            None => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut reply = sent.map_err(|e| self.transport(path, e))?;
        let status = reply.status().as_u16();
        let bytes = reply
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| self.transport(path, e))?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused {
                path: path.into(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| bad(path, e.to_string()))
    }

    /// Failures to connect, send or receive (timeouts included) are `Unreachable`; a malformed answer is a bad reply.
    fn transport(&self, path: &str, e: ureq::Error) -> ClientError {
        let unreachable = |source: std::io::Error| ClientError::Unreachable {
            addr: self.addr,
            source,
        };
        match e {
            ureq::Error::Io(source) => unreachable(source),
            ureq::Error::Timeout(t) => unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer in time ({t})"),
            )),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                unreachable(std::io::Error::other(e.to_string()))
            }
            other => bad(path, other.to_string()),
        }
    }
}

fn bad(path: &str, reason: String) -> ClientError {
    ClientError::BadReply {
        path: path.into(),
        reason,
    }
}

fn empty(path: &str) -> ClientError {
    bad(path, "empty reply".into())
}
