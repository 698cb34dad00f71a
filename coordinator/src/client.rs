//! The ranks' side: a small blocking HTTP/1.1 client (ranks call it between steps; no async runtime needed). It keeps
//! its connection open between calls: thousands of ranks heart-beating over fresh connections would leave tens of
//! thousands of sockets in TIME_WAIT on the coordinator's node.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
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

/// Replies are small JSON documents; anything larger is refused rather than allocated.
const MAX_REPLY_BYTES: usize = 16 << 20;

/// Errors of a kept connection that the server closed while it was idle (worth one retry on a fresh one).
fn stale(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// A rank's connection details for its job's coordinator.
#[derive(Debug)]
pub struct CoordinatorClient {
    addr: SocketAddr,
    token: JobToken,
    timeout: Duration,
    /// The open connection, reused by the next call (each clone opens its own).
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

impl Clone for CoordinatorClient {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr,
            token: self.token.clone(),
            timeout: self.timeout,
            conn: Mutex::new(None),
        }
    }
}

impl CoordinatorClient {
    pub fn new(addr: SocketAddr, token: JobToken) -> Self {
        Self {
            addr,
            token,
            timeout: Duration::from_secs(30),
            conn: Mutex::new(None),
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
        let bad = |reason: String| ClientError::BadReply {
            path: path.into(),
            reason,
        };
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| bad(e.to_string()))?,
            None => Vec::new(),
        };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.addr,
            self.token.secret(),
            payload.len()
        )
        .into_bytes();
        request.extend_from_slice(&payload);
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        // A kept connection may have been closed by the server meanwhile: then retry once on a fresh one.
        let reused = conn.is_some();
        let (status, reply) = match self.exchange(&mut conn, &request) {
            Ok(r) => r,
            // Only a connection the server closed while it sat idle is retried; a timeout is an answer.
            Err(e) if reused && stale(&e) => {
                *conn = None;
                self.exchange(&mut conn, &request)
                    .map_err(|source| ClientError::Unreachable {
                        addr: self.addr,
                        source,
                    })?
            }
            Err(source) => {
                return Err(ClientError::Unreachable {
                    addr: self.addr,
                    source,
                });
            }
        };
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused {
                path: path.into(),
                status,
                body: String::from_utf8_lossy(&reply).into_owned(),
            });
        }
        if reply.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&reply)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// Sends one request on the kept connection (opening it if needed) and reads one reply; any failure drops
    /// the connection.
    fn exchange(
        &self,
        conn: &mut Option<BufReader<TcpStream>>,
        request: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        if conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
            stream.set_nodelay(true)?;
            *conn = Some(BufReader::new(stream));
        }
        let result = (|| {
            let r = conn
                .as_mut()
                .ok_or_else(|| std::io::Error::other("no connection"))?;
            r.get_ref().set_read_timeout(Some(self.timeout))?;
            r.get_mut().write_all(request)?;
            let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the coordinator closed the connection",
                ));
            }
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
            let (mut length, mut close) = (None::<usize>, false);
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(invalid("the headers did not end".into()));
                }
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    let value = value.trim();
                    if name.eq_ignore_ascii_case("content-length") {
                        let n: usize = value
                            .parse()
                            .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
                        if n > MAX_REPLY_BYTES {
                            return Err(invalid(format!("a {n}-byte reply is too large")));
                        }
                        length = Some(n);
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(invalid(format!("unsupported Transfer-Encoding {value:?}")));
                    } else if name.eq_ignore_ascii_case("connection") {
                        close = value.eq_ignore_ascii_case("close");
                    }
                }
            }
            let body = match length {
                // These statuses never carry a body (and hyper sends no Content-Length with them).
                _ if status == 204 || status == 304 => Vec::new(),
                Some(n) => {
                    let mut body = vec![0u8; n];
                    r.read_exact(&mut body)?;
                    body
                }
                // No length: the body runs to the end of the connection, which cannot be kept.
                None => {
                    let mut body = Vec::new();
                    r.take(MAX_REPLY_BYTES as u64).read_to_end(&mut body)?;
                    close = true;
                    body
                }
            };
            Ok((status, body, close))
        })();
        match result {
            Ok((status, body, close)) => {
                if close {
                    *conn = None;
                }
                Ok((status, body))
            }
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }
}
