//! Observability for radit: tracing setup and the Pushgateway client. The job's `/metrics` is served by the
//! coordinator (radit-coordinator); the Grafana dashboard and the Prometheus scrape config are in this folder.
//!
//! ```no_run
//! radit_monitoring::init_tracing();
//! tracing::info!(run = "demo", "started");
//! ```

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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
