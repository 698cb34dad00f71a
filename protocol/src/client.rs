//! The ranks' side of the coordinator's API: a blocking client (ranks call it between steps and from their
//! heartbeat thread; no async runtime needed) on `ureq`. Each client (and each clone) keeps its own connection
//! open between calls: thousands of ranks heart-beating over fresh connections would leave tens of thousands of
//! sockets in TIME_WAIT on the coordinator's node.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::COMPACT_BEAT_CONTENT_TYPE;
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
    /// This rank's generation is over: a newer generation of the run took over, and the rank must leave.
    #[error("superseded: {body}")]
    Superseded { path: String, body: String },
    /// The coordinator refused the request.
    #[error("coordinator refused {path} with HTTP {status}: {body}")]
    Refused {
        path: String,
        status: u16,
        body: String,
    },
    #[error("coordinator sent an unreadable reply to {path}: {reason}")]
    BadReply { path: String, reason: String },
    /// The job's certificate authority file is unreadable or not the one the job pinned (its SHA-256 differs):
    /// a stale run directory, or a file someone replaced.
    #[error("coordinator certificate authority {path}: {reason}")]
    Authority { path: String, reason: String },
}

/// The HTTP status with which the coordinator tells a rank of an older generation that it was superseded.
pub const SUPERSEDED_STATUS: u16 = 410;

/// The coordinator's certificate authority, checked against the SHA-256 the job pinned: the client then trusts
/// that authority and nothing else.
#[derive(Clone)]
pub struct PinnedAuthority {
    der: Vec<u8>,
}

impl std::fmt::Debug for PinnedAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedAuthority(..)")
    }
}

impl PinnedAuthority {
    /// Reads the PEM file at `path` and refuses it unless its certificate's SHA-256 (hex) is `sha256`.
    pub fn read(path: &std::path::Path, sha256: &str) -> Result<Self, ClientError> {
        let refuse = |reason: String| ClientError::Authority {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| refuse(e.to_string()))?;
        let cert = ureq::tls::Certificate::from_pem(&pem).map_err(|e| refuse(e.to_string()))?;
        let der = cert.der().to_vec();
        use sha2::Digest;
        let actual = hex::encode(sha2::Sha256::digest(&der));
        if !crate::constant_time_eq(actual.as_bytes(), sha256.trim().as_bytes()) {
            return Err(refuse(format!(
                "its SHA-256 is {actual}, not the {} the job pinned",
                sha256.trim()
            )));
        }
        Ok(Self { der })
    }
}

/// Replies are small JSON documents; anything larger is refused rather than allocated.
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// A rank's connection to its job's coordinator.
#[derive(Debug)]
pub struct CoordinatorClient {
    addr: SocketAddr,
    token: JobToken,
    timeout: Duration,
    /// HTTPS trusting only this authority; plain HTTP when `None`.
    authority: Option<PinnedAuthority>,
    agent: ureq::Agent,
}

impl Clone for CoordinatorClient {
    /// A clone opens a connection of its own (a heartbeat thread must not wait behind a join).
    fn clone(&self) -> Self {
        Self {
            addr: self.addr,
            token: self.token.clone(),
            timeout: self.timeout,
            authority: self.authority.clone(),
            agent: agent(self.timeout, self.authority.as_ref()),
        }
    }
}

fn agent(timeout: Duration, authority: Option<&PinnedAuthority>) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let mut config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(timeout))
        // Refusals are answers with a body worth reporting, not transport errors.
        .http_status_as_error(false)
        .max_redirects(0);
    if let Some(a) = authority {
        let roots = RootCerts::Specific(std::sync::Arc::new(vec![
            Certificate::from_der(&a.der).to_owned(),
        ]));
        config = config.tls_config(
            TlsConfig::builder()
                .root_certs(roots)
                .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .build(),
        );
    }
    config.build().into()
}

impl CoordinatorClient {
    pub fn new(addr: SocketAddr, token: JobToken) -> Self {
        let timeout = Duration::from_secs(30);
        Self {
            addr,
            token,
            timeout,
            authority: None,
            agent: agent(timeout, None),
        }
    }

    /// Talks HTTPS, trusting only `authority` (the job's own certificate authority).
    pub fn with_authority(mut self, authority: PinnedAuthority) -> Self {
        self.agent = agent(self.timeout, Some(&authority));
        self.authority = Some(authority);
        self
    }

    /// A client for the coordinator at `addr` as the job's environment describes it: HTTPS pinned to the job's
    /// authority when `RADIT_COORDINATOR_CA` (and its SHA-256) are set, plain HTTP otherwise.
    pub fn from_env(
        addr: SocketAddr,
        token: JobToken,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ClientError> {
        let client = Self::new(addr, token);
        match var(crate::env::COORDINATOR_CA) {
            Some(path) => {
                let sha256 = var(crate::env::COORDINATOR_CA_SHA256).ok_or_else(|| {
                    ClientError::Authority {
                        path: path.clone(),
                        reason: format!("{} is not set", crate::env::COORDINATOR_CA_SHA256),
                    }
                })?;
                let authority = PinnedAuthority::read(path.as_ref(), &sha256)?;
                Ok(client.with_authority(authority))
            }
            None => Ok(client),
        }
    }

    /// Per-request timeout for the whole exchange (joining waits for the whole world, so give it longer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.agent = agent(timeout, self.authority.as_ref());
        self
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinReply, ClientError> {
        self.call(Some(request), "/v1/join")?
            .ok_or_else(|| empty("/v1/join"))
    }

    /// Sends the beat in its compact form when it has one (no counters, no fatal error), as JSON otherwise.
    pub fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        let path = "/v1/heartbeat";
        match heartbeat.to_compact() {
            Some(bytes) => self.send(Some((&bytes[..], COMPACT_BEAT_CONTENT_TYPE)), path)?,
            None => self.call(Some(heartbeat), path)?,
        }
        .ok_or_else(|| empty(path))
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
        let payload = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| bad(path, e.to_string()))?;
        self.send(payload.as_deref().map(|p| (p, "application/json")), path)
    }

    /// POSTs `body` (bytes and their content type; GET without one) and reads the JSON reply; `None` for an
    /// empty one.
    fn send<R: DeserializeOwned>(
        &self,
        body: Option<(&[u8], &str)>,
        path: &str,
    ) -> Result<Option<R>, ClientError> {
        let scheme = if self.authority.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}{path}", self.addr);
        let auth = format!("Bearer {}", self.token.secret());
        let sent = match body {
            Some((payload, content_type)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", content_type)
                .send(payload),
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
        if status == SUPERSEDED_STATUS {
            return Err(ClientError::Superseded {
                path: path.into(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
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
            // A failed TLS handshake (another job's coordinator, a stranger) is not this job's coordinator.
            ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Tls(_)
            | ureq::Error::Rustls(_) => unreachable(std::io::Error::other(e.to_string())),
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
