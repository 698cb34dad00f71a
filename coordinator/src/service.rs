//! The coordinator as a running service: its own tokio runtime on a background thread, bound to one address,
//! shut down (drained) when dropped. The supervisor of `radit run` and the benchmark use it.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::{Coordinator, CoordinatorConfig};
use radit_protocol::JobToken;

/// The name of the service's runtime threads.
pub const THREAD_NAME: &str = "coordinator";

/// A running coordinator service on its own runtime thread.
pub struct Service {
    pub addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Service {
    /// Binds `bind` (`IP:PORT`, or `hostname:PORT` for this machine's name) and serves plain HTTP until dropped.
    pub fn start(bind: &str, cfg: CoordinatorConfig, token: JobToken) -> std::io::Result<Self> {
        Self::start_with(bind, cfg, token, None)
    }

    /// [`Service::start`], serving HTTPS with `tls`'s certificate when given.
    pub fn start_with(
        bind: &str,
        cfg: CoordinatorConfig,
        token: JobToken,
        tls: Option<&crate::tls::JobPki>,
    ) -> std::io::Result<Self> {
        let addr = resolve_bind(bind)?;
        let coordinator = Coordinator::new(cfg, token);
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = coordinator.clone();
        let tls = tls.cloned();
        let thread = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                // One thread: each request is a few microseconds of work, and with two workers a third of the
                // coordinator's CPU went to waking and parking them (perf, 4,096 ranks at 1 Hz).
                let rt = tokio::runtime::Builder::new_current_thread()
                    // Named, so a benchmark can read the coordinator's own CPU time from /proc.
                    .thread_name(THREAD_NAME)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let shutdown = async move {
                        let _ = rx.await;
                    };
                    match tls {
                        Some(tls) => {
                            let listener = crate::tls::TlsListener::new(listener, &tls)?;
                            crate::serve(listener, c, shutdown).await
                        }
                        None => crate::serve(listener, c, shutdown).await,
                    }
                })
            })?;
        Ok(Self {
            addr,
            coordinator,
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `IP:PORT`, or `hostname:PORT` for this machine's name (the first node of a Slurm job).
pub fn resolve_bind(bind: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let resolved = match bind.strip_prefix("hostname:") {
        Some(port) => {
            let host = radit_protocol::env::hostname().unwrap_or_else(|| "localhost".into());
            format!("{host}:{port}")
        }
        None => bind.to_string(),
    };
    resolved
        .to_socket_addrs()?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{bind}` resolves to no IPv4 address"),
            )
        })
}
