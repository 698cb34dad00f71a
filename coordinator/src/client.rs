//! The ranks' side: a small blocking HTTP/1.1 client (ranks call it between steps; no async runtime needed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Heartbeat, HeartbeatReply, JobToken, JoinReply, JoinRequest};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The coordinator could not be reached (it is down, or the address is wrong): retry or restart.
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

/// A rank's connection details for its job's coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    addr: SocketAddr,
    token: JobToken,
    timeout: Duration,
}

impl CoordinatorClient {
    pub fn new(addr: SocketAddr, token: JobToken) -> Self {
        Self {
            addr,
            token,
            timeout: Duration::from_secs(30),
        }
    }

    /// Per-request timeout for reading the reply (joining waits for the whole world, so give it longer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinReply, ClientError> {
        self.call("POST", "/v1/join", Some(request))
    }

    pub fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        self.call("POST", "/v1/heartbeat", Some(heartbeat))
    }

    pub fn report_checkpoint(&self, step: u64) -> Result<(), ClientError> {
        let _: Option<serde_json::Value> = self.call_opt(
            "POST",
            "/v1/checkpoints",
            Some(&serde_json::json!({ "step": step })),
        )?;
        Ok(())
    }

    pub fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.call::<(), _>("GET", "/v1/status", None)
    }

    fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        self.call_opt(method, path, body)?
            .ok_or_else(|| ClientError::BadReply {
                path: path.into(),
                reason: "empty reply".into(),
            })
    }

    fn call_opt<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<R>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            addr: self.addr,
            source,
        };
        let bad = |reason: String| ClientError::BadReply {
            path: path.into(),
            reason,
        };
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| bad(e.to_string()))?,
            None => Vec::new(),
        };
        let mut stream =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(10)).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token.secret(),
            payload.len()
        );
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        stream.write_all(&payload).map_err(unreachable)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).map_err(unreachable)?;
        let split = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| bad("no end of headers".into()))?;
        let head = String::from_utf8_lossy(&reply[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line in {head:?}")))?;
        let body = &reply[split + 4..];
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused {
                path: path.into(),
                status,
                body: String::from_utf8_lossy(body).into_owned(),
            });
        }
        if body.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }
}
