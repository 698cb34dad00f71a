//! Pushing a job's metrics to a Prometheus Pushgateway, for jobs whose nodes Prometheus cannot scrape, and deleting
//! them when the job ends so that a finished run does not look alive forever. Plain HTTP (a Pushgateway is a
//! cluster-internal service) on `ureq`: one PUT of the text exposition per push, one DELETE at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::CONTENT_TYPE;

/// What went wrong talking to the Pushgateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    #[error("pushgateway URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    /// No usable answer: the gateway is down, the address is wrong, or it did not answer (in HTTP) in time.
    #[error("pushgateway {method} {url}: {source}")]
    Unreachable {
        url: String,
        method: &'static str,
        #[source]
        source: ureq::Error,
    },
    /// The gateway answered with an error, and its reason (e.g. a metric that clashes with one another job
    /// pushed).
    #[error("pushgateway {method} {url} answered HTTP {status}: {reason}")]
    Refused {
        url: String,
        method: &'static str,
        status: u16,
        reason: String,
    },
}

/// One job's group on a Pushgateway: `URL/metrics/job/JOB[/LABEL/VALUE...]`.
#[derive(Debug, Clone)]
pub struct Pushgateway {
    host: String,
    port: u16,
    path: String,
    agent: ureq::Agent,
}

/// Label values go into the URL path: only these characters need no encoding.
fn path_safe(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl Pushgateway {
    /// `url` is `http://host:port` (a path prefix is kept); `job` and the `grouping` label values must be plain
    /// names (letters, digits, `-_.:`).
    pub fn new(url: &str, job: &str, grouping: &[(&str, &str)]) -> Result<Self, PushError> {
        let bad = |reason: String| PushError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported".into()))?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // host, host:port, [v6] or [v6]:port
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed [ in the host".into()))?;
                match rest.strip_prefix(':') {
                    Some(p) => (h, p),
                    None if rest.is_empty() => (h, "9091"),
                    None => return Err(bad(format!("`{rest}` after the host"))),
                }
            }
            None => authority.rsplit_once(':').unwrap_or((authority, "9091")),
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| bad(format!("port `{port}` is not a number")))?;
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        let mut path = String::new();
        if !prefix.trim_matches('/').is_empty() {
            path = format!("/{}", prefix.trim_matches('/'));
        }
        path += "/metrics";
        for (name, value) in std::iter::once(("job", job)).chain(grouping.iter().copied()) {
            if !path_safe(value) || !path_safe(name) {
                return Err(bad(format!(
                    "grouping label {name}=`{value}` must be letters, digits or -_.:"
                )));
            }
            path += &format!("/{name}/{value}");
        }
        let agent = ureq::Agent::config_builder()
            // Short: a push must not hold up a run's exit inside Slurm's warning window.
            .timeout_global(Some(Duration::from_secs(3)))
            // Refusals are answers with a reason worth reporting, not transport errors.
            .http_status_as_error(false)
            .max_redirects(0)
            // A cluster-internal service: never through the environment's HTTP proxy.
            .proxy(None)
            // A fresh connection per push (one every few seconds); no idle socket for the gateway to drop.
            .max_idle_connections(0)
            .build()
            .into();
        Ok(Self {
            host: host.to_string(),
            port,
            path,
            agent,
        })
    }

    /// Where the group lives, e.g. `/metrics/job/radit-xl`.
    pub fn group_path(&self) -> &str {
        &self.path
    }

    /// The group's URL.
    fn url(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("http://{}:{}{}", self.host, self.port, self.path)
        }
    }

    /// Replaces the group's metrics with `exposition` (Prometheus text format 0.0.4, as
    /// [`crate::metrics::exposition`] writes it).
    pub fn push(&self, exposition: &str) -> Result<(), PushError> {
        let url = self.url();
        let reply = self
            .agent
            .put(&url)
            .header("Content-Type", CONTENT_TYPE)
            .send(exposition);
        Self::answered(url, "PUT", reply)
    }

    /// Deletes the group's metrics.
    pub fn delete(&self) -> Result<(), PushError> {
        let url = self.url();
        let reply = self.agent.delete(&url).call();
        Self::answered(url, "DELETE", reply)
    }

    fn answered(
        url: String,
        method: &'static str,
        reply: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(), PushError> {
        let mut reply = match reply {
            Ok(r) => r,
            Err(source) => {
                return Err(PushError::Unreachable {
                    url,
                    method,
                    source,
                });
            }
        };
        if reply.status().is_success() {
            return Ok(());
        }
        let reason = reply
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        Err(PushError::Refused {
            url,
            method,
            status: reply.status().as_u16(),
            reason: reason.trim().to_string(),
        })
    }
}

/// Pushes `render()` every `every` on a thread until finished: then deletes the group (a service such as a
/// training job) or pushes a last time and keeps it (a batch job, whose last push records how it ended).
pub struct Pusher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    gateway: Pushgateway,
    render: Arc<dyn Fn() -> String + Send + Sync>,
}

impl Pusher {
    pub fn start(
        gateway: Pushgateway,
        every: Duration,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(render);
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, gw, draw) = (stop.clone(), gateway.clone(), render.clone());
        let thread = std::thread::Builder::new()
            .name("radit-pushgateway".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    match gw.push(&draw()) {
                        Ok(()) if failing => {
                            tracing::info!(path = gw.group_path(), "pushing metrics again");
                            failing = false;
                        }
                        Ok(()) => {}
                        // Monitoring must not stop training: warn once per outage.
                        Err(e) if !failing => {
                            tracing::warn!(error = %e, "cannot push metrics; will keep trying");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    let deadline = std::time::Instant::now() + every;
                    while std::time::Instant::now() < deadline {
                        if flag.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50).min(every));
                    }
                }
            })
            .ok();
        if thread.is_none() {
            tracing::warn!("cannot start the Pushgateway thread: metrics are not pushed");
        }
        Self {
            stop,
            thread,
            gateway,
            render,
        }
    }

    /// Stops pushing, pushes the final state and leaves it on the Pushgateway.
    pub fn finish_keeping_last(mut self) -> Result<(), PushError> {
        self.stop_thread();
        self.gateway.push(&(self.render)())
    }

    /// Stops pushing and deletes the job's group from the Pushgateway.
    pub fn finish(mut self) -> Result<(), PushError> {
        self.stop_thread();
        self.gateway.delete()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pusher {
    /// A pusher dropped without [`Pusher::finish`] (an error path) still removes the job's series.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            if let Err(e) = self.gateway.delete() {
                tracing::warn!(error = %e, "cannot delete the pushed metrics");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Answers each connection with `status` and records the request line, the Content-Type and the body.
    fn fake_gateway(status: &'static str) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
        let addr = listener.local_addr().expect("bound").to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Head, then as much body as Content-Length says.
                loop {
                    let n = conn.read(&mut buf).unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let header = |name: &str| {
                            head.lines().find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                            })
                        };
                        let len: usize = header("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if body.len() >= len || n == 0 {
                            let line = head.lines().next().unwrap_or("");
                            let kind = header("content-type").unwrap_or_default();
                            let _ = tx.send(format!("{line}|{kind}|{body}"));
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nwhy!"
                    )
                    .as_bytes(),
                );
            }
        });
        (addr, rx)
    }

    #[test]
    fn a_pusher_puts_its_exposition_and_deletes_the_group_when_dropped() {
        let (addr, requests) = fake_gateway("200 OK");
        let gw = Pushgateway::new(&format!("http://{addr}"), "radit-xl", &[]).expect("valid");
        let pusher = Pusher::start(gw, Duration::from_millis(50), || "radit_step 7\n".into());
        let first = requests
            .recv_timeout(Duration::from_secs(5))
            .expect("a push");
        assert_eq!(
            first,
            "PUT /metrics/job/radit-xl HTTP/1.1|text/plain; version=0.0.4; charset=utf-8|radit_step 7\n"
        );
        drop(pusher);
        let last = loop {
            let r = requests
                .recv_timeout(Duration::from_secs(5))
                .expect("a delete after the pushes");
            if !r.starts_with("PUT") {
                break r;
            }
        };
        assert_eq!(last, "DELETE /metrics/job/radit-xl HTTP/1.1||");
    }

    #[test]
    fn a_name_is_tried_at_every_address_it_has() {
        // The fake listens on 127.0.0.1 only; `localhost` may resolve to ::1 first.
        let (addr, requests) = fake_gateway("202 Accepted");
        let port = addr.rsplit(':').next().expect("host:port");
        let gw = Pushgateway::new(&format!("http://localhost:{port}"), "j", &[]).expect("valid");
        gw.delete().expect("reached over IPv4");
        let r = requests
            .recv_timeout(Duration::from_secs(5))
            .expect("a request");
        assert_eq!(r, "DELETE /metrics/job/j HTTP/1.1||");
    }

    #[test]
    fn a_refusal_carries_the_status_and_the_gateways_reason() {
        let (addr, _requests) = fake_gateway("400 Bad Request");
        let gw = Pushgateway::new(&format!("http://{addr}"), "j", &[]).expect("valid");
        let err = gw.push("x 1\n").expect_err("refused");
        assert!(
            matches!(err, PushError::Refused { status: 400, .. }),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains(&format!("PUT http://{addr}/metrics/job/j"))
                && err.contains("HTTP 400: why!"),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_gateway_is_named() {
        // A port nothing listens on (bound, then closed).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("loopback");
        let gw = Pushgateway::new(&format!("http://{addr}"), "j", &[]).expect("valid");
        let err = gw.delete().expect_err("nothing listens");
        assert!(matches!(err, PushError::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("pushgateway DELETE http://{addr}/metrics/job/j: ")),
            "{err}"
        );
    }

    #[test]
    fn urls_and_grouping_labels_are_checked() {
        let g = Pushgateway::new("http://pg.example:9091", "radit-xl", &[("instance", "n01")])
            .expect("valid");
        assert_eq!(g.group_path(), "/metrics/job/radit-xl/instance/n01");
        assert_eq!(
            g.url(),
            "http://pg.example:9091/metrics/job/radit-xl/instance/n01"
        );
        let g = Pushgateway::new("http://10.0.0.1/prefix/", "j", &[]).expect("valid");
        assert_eq!((g.port, g.group_path()), (9091, "/prefix/metrics/job/j"));
        let g = Pushgateway::new("http://[::1]:9092", "j", &[]).expect("valid");
        assert_eq!((g.host.as_str(), g.port), ("::1", 9092));
        assert_eq!(g.url(), "http://[::1]:9092/metrics/job/j");
        let g = Pushgateway::new("http://[fd00::7]", "j", &[]).expect("valid");
        assert_eq!((g.host.as_str(), g.port), ("fd00::7", 9091));
        for (url, job) in [
            ("https://pg:9091", "j"),
            ("http://pg:port", "j"),
            ("http://:9091", "j"),
            ("http://pg:9091", "a/b"),
            ("http://pg:9091", ""),
            ("http://[::1:9091", "j"),
            ("http://[::1]x", "j"),
        ] {
            let err = Pushgateway::new(url, job, &[]).expect_err(url);
            assert!(err.to_string().contains(url), "{err}");
        }
    }
}
