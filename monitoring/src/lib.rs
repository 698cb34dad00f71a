//! Observability for radit: tracing setup, the registry of every metric radit exports with its exposition
//! ([`metrics`]: names, help, units and types in one table; the text written by `prometheus-client`), and the
//! Pushgateway client ([`Pushgateway`], [`Pusher`]). The job's `/metrics` is served by the coordinator
//! (radit-coordinator) from a [`metrics::JobSnapshot`]; `radit shard` pushes an [`metrics::IngestSnapshot`]. The
//! Grafana dashboard and the Prometheus scrape config are in this folder.
//!
//! ```no_run
//! radit_monitoring::init_tracing();
//! tracing::info!(run = "demo", "started");
//! ```

pub mod metrics;
pub mod pushgateway;

pub use pushgateway::{PushError, Pusher, Pushgateway};
use tracing_subscriber::EnvFilter;

/// Installs a compact stderr logger. The filter comes from `RADIT_LOG` (then `RUST_LOG`), default `info`.
/// Safe to call more than once: later calls are ignored.
pub fn init_tracing() {
    let filter = std::env::var("RADIT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal: rank logs are files, and escape codes make them unreadable there.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
