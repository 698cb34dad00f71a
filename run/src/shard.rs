//! `radit shard` as a library call: ingest a harmonised table and its images into a store, pushing the ingest's
//! progress to a Pushgateway while it runs (and its final state after), or verify a store against its manifest.
//! The caller prints the returned reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use radit_monitoring::{PushError, Pusher, Pushgateway};
use radit_sharding::ShardError;
use radit_sharding::ingest::{IngestOutcome, IngestProgress, RunOptions, ingest};
use radit_sharding::manifest::{IngestSettings, Manifest, VerifyReport, verify};
use radit_sharding::store::Storage;

/// An ingest to run.
#[derive(Debug, Clone)]
pub struct ShardJob {
    pub table: PathBuf,
    pub images: PathBuf,
    /// The store's URL.
    pub out: String,
    pub settings: IngestSettings,
    pub options: RunOptions,
    /// Push the ingest's counters to this Pushgateway every `push_seconds`.
    pub pushgateway: Option<(String, f64)>,
    /// Rejected rows listed in the report.
    pub show_rejected: usize,
}

/// How an ingest ended.
#[derive(Debug)]
pub enum ShardEnd {
    /// Stopped after `written_shards` new shards, as asked; run again to continue.
    Interrupted { written_shards: u64 },
    Complete {
        url: String,
        manifest: Box<Manifest>,
        resumed_shards: u64,
        written_shards: u64,
        seconds: f64,
        shard_images: u32,
        show_rejected: usize,
        /// The final counters could not be pushed (the ingest itself is complete).
        push_failed: Option<String>,
    },
}

/// Why an ingest could not run.
#[derive(Debug, thiserror::Error)]
pub enum ShardRunError {
    #[error("--push-seconds must be a number of seconds >= 0.1, got {0}")]
    PushInterval(f64),
    #[error("--pushgateway")]
    Pushgateway(#[source] PushError),
    /// `what`: ingesting which table into which store.
    #[error("{what}")]
    Ingest {
        what: Box<str>,
        #[source]
        source: ShardError,
    },
}

/// Ingest allocates tens of megabytes per image (a 2048x2500 DICOM's values, its decoded pixels, the resize's
/// buffers) and frees them at once. glibc serves such blocks with fresh mmaps and returns them on free, so every
/// image pays for page faults on all of it (about a third of the time on large DICOMs); keeping them in the heap
/// instead reuses the same pages. Measured in BENCHMARKS.md (Ingest from DICOM).
pub fn keep_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; called before the ingest's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Runs the ingest (see the module doc).
pub fn shard(job: &ShardJob) -> Result<ShardEnd, ShardRunError> {
    keep_large_allocations();
    let metrics = Arc::new(IngestProgress::default());
    let pusher = match &job.pushgateway {
        Some((url, seconds)) => {
            if !(seconds.is_finite() && *seconds >= 0.1) {
                return Err(ShardRunError::PushInterval(*seconds));
            }
            let host = radit_protocol::env::hostname().unwrap_or_else(|| "unknown".into());
            let gateway = Pushgateway::new(url, "radit-shard", &[("instance", &host)])
                .map_err(ShardRunError::Pushgateway)?;
            let m = metrics.clone();
            Some(Pusher::start(
                gateway,
                Duration::from_secs_f64(*seconds),
                move || {
                    use std::sync::atomic::Ordering::Relaxed;
                    radit_monitoring::metrics::exposition(
                        radit_monitoring::metrics::IngestSnapshot {
                            rows: m.rows_total.load(Relaxed),
                            rows_done: m.rows_done.load(Relaxed),
                            rows_rejected: m.rows_rejected.load(Relaxed),
                            shards_written: m.shards_written.load(Relaxed),
                            bytes_written: m.bytes_written.load(Relaxed),
                            complete: m.complete.load(Relaxed) != 0,
                        },
                    )
                },
            ))
        }
        None => None,
    };
    let opts = RunOptions {
        metrics: Some(metrics),
        ..job.options.clone()
    };
    let started = std::time::Instant::now();
    let outcome = ingest(&job.table, &job.images, &job.out, &job.settings, &opts);
    let push_failed = pusher
        .and_then(|p| p.finish_keeping_last().err())
        .map(|e| e.to_string());
    let ingest_error = |source| ShardRunError::Ingest {
        what: format!("ingesting {} into {}", job.table.display(), job.out).into(),
        source,
    };
    Ok(match outcome.map_err(ingest_error)? {
        IngestOutcome::Interrupted { written_shards } => ShardEnd::Interrupted { written_shards },
        IngestOutcome::Complete {
            manifest,
            resumed_shards,
            written_shards,
        } => ShardEnd::Complete {
            url: Storage::open(&job.out)
                .map_err(|e| ingest_error(ShardError::from(e)))?
                .url()
                .to_string(),
            manifest,
            resumed_shards,
            written_shards,
            seconds: started.elapsed().as_secs_f64(),
            shard_images: job.settings.layout.shard_images,
            show_rejected: job.show_rejected,
            push_failed,
        },
    })
}

impl std::fmt::Display for ShardEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ShardEnd::Complete {
            url,
            manifest,
            resumed_shards,
            written_shards,
            seconds,
            shard_images,
            show_rejected,
            push_failed,
        } = self
        else {
            let ShardEnd::Interrupted { written_shards } = self else {
                return Ok(());
            };
            return write!(
                f,
                "stopped after {written_shards} new shards as requested; run again to continue"
            );
        };
        if let Some(e) = push_failed {
            writeln!(f, "radit: could not push the final ingest metrics: {e}")?;
        }
        writeln!(f, "store {url} is complete")?;
        if *resumed_shards > 0 {
            writeln!(
                f,
                "  resumed: {resumed_shards} shards were already committed, {written_shards} written now"
            )?;
        }
        write!(f, "{}", manifest.summary())?;
        if !manifest.rejected.is_empty() {
            writeln!(f, "rejected rows:")?;
            for r in manifest.rejected.iter().take(*show_rejected) {
                writeln!(f, "  {r}")?;
            }
            if manifest.rejected.len() > *show_rejected {
                writeln!(
                    f,
                    "  ... and {} more (see manifest.json)",
                    manifest.rejected.len() - show_rejected
                )?;
            }
            for (kind, w) in &manifest.warnings.0 {
                writeln!(
                    f,
                    "stored as missing: {kind} x{} (e.g. {})",
                    w.count,
                    w.examples.first().map_or("", String::as_str)
                )?;
            }
        }
        let written_images = written_shards * u64::from(*shard_images);
        if *written_shards > 0 && *seconds > 0.0 {
            writeln!(
                f,
                "  {seconds:.3} s, about {:.1} images/s",
                written_images.min(manifest.counts.accepted) as f64 / seconds
            )?;
        }
        Ok(())
    }
}

/// A store checked against its manifest.
#[derive(Debug)]
pub enum Verified {
    /// Every object matches.
    Ok { url: String, report: VerifyReport },
    /// Objects that do not match, or a store that is not there or not complete.
    Problems { url: String, problems: Vec<String> },
}

impl Verified {
    pub fn ok(&self) -> bool {
        matches!(self, Verified::Ok { .. })
    }
}

/// Verifies the store at `url`. A store that is not there or not complete fails verification; anything else
/// (an unreachable bucket) is an error.
pub fn verify_store(url: &str) -> Result<Verified, ShardError> {
    let checked = Storage::open_existing(url)
        .map_err(ShardError::from)
        .and_then(|storage| Ok((verify(&storage)?, storage)));
    match checked {
        Ok((report, storage)) if report.ok() => Ok(Verified::Ok {
            url: storage.url().to_string(),
            report,
        }),
        Ok((report, storage)) => Ok(Verified::Problems {
            url: storage.url().to_string(),
            problems: report.problems,
        }),
        Err(e) if e.is_not_found() || matches!(e, ShardError::InvalidStore { .. }) => {
            Ok(Verified::Problems {
                url: url.to_string(),
                problems: vec![e.to_string()],
            })
        }
        Err(e) => Err(e),
    }
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verified::Ok { url, report } => write!(
                f,
                "store {url} verified: {} objects, {:.1} MiB match the manifest",
                report.objects_checked,
                report.bytes_checked as f64 / 1048576.0
            ),
            Verified::Problems { url, problems } => {
                write!(f, "store {url} has {} problem(s):", problems.len())?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}
