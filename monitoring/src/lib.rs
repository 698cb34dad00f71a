//! Observability for radit: tracing setup now; metric names, the `/metrics` exporter and the Grafana dashboard join
//! it as the training side grows.
//!
//! ```no_run
//! radit_monitoring::init_tracing();
//! tracing::info!(run = "demo", "started");
//! ```

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
