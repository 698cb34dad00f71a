//! Every metric radit exports, in one table: its name, help, unit, type and labels ([`JOB`]: the job's `/metrics`,
//! served by the coordinator and pushed to a Pushgateway; [`INGEST`]: `radit shard`'s pushed progress), and their
//! exposition, written by `prometheus-client` from one snapshot ([`JobSnapshot`], [`IngestSnapshot`]; each a
//! [`Collector`]).
//!
//! The exposition is the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]): the format the Pushgateway accepts and
//! promtool checks, with a counter's `# TYPE` line naming its `_total` series and no `# EOF`. Names in the table are
//! the exposed names, what dashboards and alerts query; `prometheus-client` builds a name from a stem, the unit and
//! `_total` for a counter, so [`Metric::stem`] takes them off again (a test checks that every name comes back
//! byte for byte).
//!
//! ```
//! use radit_monitoring::metrics::{self, IngestSnapshot};
//! let text = metrics::exposition(IngestSnapshot { rows: 4, rows_done: 2, ..Default::default() });
//! assert!(text.contains("\nradit_ingest_progress_ratio 0.5\n"));
//! assert!(metrics::names().contains(&"radit_ingest_rows_done"));
//! ```

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, MetricEncoder, NoLabelSet,
    prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{self, Registry};
use radit_protocol::{RankStats, STEP_SECONDS_BUCKETS};

/// The `Content-Type` of [`exposition`]'s text: `text/plain; version=0.0.4; charset=utf-8`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    /// Exposed with `_total` (part of [`Metric::name`]).
    Counter,
    /// Exposed as `_bucket` (with `le`), `_sum` and `_count` series.
    Histogram,
}

/// A base unit, where a name ends in it (before a counter's `_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Bytes,
    Ratio,
}

impl Unit {
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Seconds => "seconds",
            Unit::Bytes => "bytes",
            Unit::Ratio => "ratio",
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The exposed name (a histogram's series add `_bucket`, `_sum`, `_count`).
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    /// Labels of its series (a histogram's buckets add `le`).
    pub labels: &'static [&'static str],
}

impl Metric {
    const fn new(kind: Kind, name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            unit: None,
            labels: &[],
        }
    }
    const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Gauge, name, help)
    }
    const fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Counter, name, help)
    }
    const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Histogram, name, help)
    }
    const fn unit(self, unit: Unit) -> Self {
        Self {
            unit: Some(unit),
            ..self
        }
    }
    /// One series per rank, labelled `rank`.
    const fn per_rank(self) -> Self {
        Self {
            labels: &["rank"],
            ..self
        }
    }

    /// The name `prometheus-client` is given: [`Metric::name`] without a counter's `_total` and the unit (which
    /// it appends again).
    pub fn stem(&self) -> &'static str {
        self.parts().0
    }

    /// The stem and the unit to hand `prometheus-client`; a unit that is not the name's end stays in the stem.
    fn parts(&self) -> (&'static str, Option<Unit>) {
        let name = match self.kind {
            Kind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            Kind::Gauge | Kind::Histogram => self.name,
        };
        let stem = self.unit.and_then(|u| {
            name.strip_suffix(u.as_str())
                .and_then(|s| s.strip_suffix('_'))
                .map(|s| (s, Some(u)))
        });
        stem.unwrap_or((name, None))
    }

    /// The names of its series: the name, or a histogram's three.
    pub fn series(&self) -> Vec<String> {
        match self.kind {
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{}{s}", self.name))
                .collect(),
            Kind::Gauge | Kind::Counter => vec![self.name.to_string()],
        }
    }
}

// The job: the coordinator's view of the run.
pub const WORLD_SIZE: Metric = Metric::gauge("radit_world_size", "Ranks in the job.");
pub const GENERATION: Metric =
    Metric::gauge("radit_generation", "Launch generation (1 + restarts).");
pub const RANKS_JOINED: Metric =
    Metric::gauge("radit_ranks_joined", "Ranks joined in this generation.");
pub const STEP: Metric = Metric::gauge("radit_step", "The slowest rank's finished step.");
/// Absent until three steps have been timed.
pub const STEP_SECONDS_MEDIAN: Metric =
    Metric::gauge("radit_step_seconds_median", "Median seconds per step.");
/// -1 before the first committed checkpoint.
pub const CHECKPOINT_STEP: Metric =
    Metric::gauge("radit_checkpoint_step", "Newest committed checkpoint.");
pub const HANGS_DETECTED: Metric = Metric::counter("radit_hangs_detected_total", "Hangs detected.");
pub const RANK_STEP: Metric =
    Metric::gauge("radit_rank_step", "Each rank's finished step.").per_rank();
pub const RANK_HEARTBEAT_AGE: Metric = Metric::gauge(
    "radit_rank_heartbeat_age_seconds",
    "Seconds since each rank's last heartbeat.",
)
.unit(Unit::Seconds)
.per_rank();
pub const RANK_ALIVE: Metric =
    Metric::gauge("radit_rank_alive", "1 while the rank heart-beats.").per_rank();
pub const RANK_HUNG: Metric = Metric::gauge(
    "radit_rank_hung",
    "1 for the rank named as the culprit of a hang.",
)
.per_rank();
pub const RANK_DEAD: Metric = Metric::gauge(
    "radit_rank_dead",
    "1 for the rank that stopped heart-beating.",
)
.per_rank();
pub const RESTARTS: Metric = Metric::counter(
    "radit_restarts_total",
    "Relaunches of every rank after a failure.",
);
/// Only with the run's steps configured.
pub const PROGRESS: Metric = Metric::gauge(
    "radit_progress_ratio",
    "Finished steps over the run's steps.",
)
.unit(Unit::Ratio);
/// Only with the run's steps configured, once the median step time is known.
pub const ETA: Metric = Metric::gauge(
    "radit_eta_seconds",
    "Seconds to the last step at the median step time.",
)
.unit(Unit::Seconds);
/// Only with a peak configured.
pub const PEAK_FLOPS: Metric = Metric::gauge(
    "radit_peak_flops_per_second",
    "Peak dense FLOP/s of the whole job (devices x the configured per-device peak); MFU = rate(radit_model_flops_total) / this.",
);
// Counters over every rank and generation.
pub const IMAGES: Metric = Metric::counter(
    "radit_images_total",
    "Training images processed (all ranks, all generations).",
);
pub const TOKENS: Metric =
    Metric::counter("radit_tokens_total", "Training tokens (patches) processed.");
pub const MODEL_FLOPS: Metric = Metric::counter(
    "radit_model_flops_total",
    "Model FLOPs of forward and backward.",
);
pub const DATA_WAIT: Metric = Metric::counter(
    "radit_data_wait_seconds_total",
    "Seconds ranks waited for their batches (summed over ranks).",
)
.unit(Unit::Seconds);
pub const SKIPPED_STEPS: Metric = Metric::counter(
    "radit_skipped_steps_total",
    "Skip events: steps skipped for a non-finite loss or gradient (a skipped step replayed after a relaunch counts again).",
);
pub const CHECKPOINTS: Metric = Metric::counter("radit_checkpoints_total", "Checkpoints started.");
pub const CHECKPOINT_BYTES: Metric = Metric::counter(
    "radit_checkpoint_bytes_total",
    "Checkpoint bytes written (all ranks, all generations).",
)
.unit(Unit::Bytes);
// Evaluation during training: absent until the first measurement, then the latest (kept across restarts).
pub const VAL_LOSS: Metric = Metric::gauge(
    "radit_val_loss",
    "Validation loss (the rectified-flow loss on the validation split at a fixed grid of t and fixed noise), last measured.",
);
pub const FD: Metric = Metric::gauge(
    "radit_fd",
    "Mini-FD of EMA samples against the reference features, last measured.",
);
// What the ranks of this generation reported: absent until one has.
pub const LOSS: Metric = Metric::gauge(
    "radit_loss",
    "Mean training loss over the global batch of the last step.",
);
pub const GRAD_NORM: Metric = Metric::gauge(
    "radit_grad_norm",
    "Global gradient norm before clipping, last step.",
);
pub const LEARNING_RATE: Metric =
    Metric::gauge("radit_learning_rate", "Learning rate of the last step.");
pub const CHECKPOINT_STALL: Metric = Metric::gauge(
    "radit_checkpoint_stall_seconds",
    "Seconds training stalled for the last checkpoint (slowest rank).",
)
.unit(Unit::Seconds);
/// Only with a peak configured, once the median step time is known.
pub const MFU: Metric = Metric::gauge(
    "radit_mfu_ratio",
    "Model FLOPs utilisation: one step's model FLOPs (all ranks) / the median step seconds / the job's peak FLOP/s.",
)
.unit(Unit::Ratio);
pub const LOSS_MAX: Metric = Metric::gauge(
    "radit_loss_max",
    "The largest of the ranks' own losses (each the mean over that rank's share of the batch), last step.",
);
pub const CHECKPOINT_WRITE: Metric = Metric::gauge(
    "radit_checkpoint_write_seconds",
    "Seconds the slowest rank took to encode and write its part of the last committed checkpoint.",
)
.unit(Unit::Seconds);
pub const CHECKPOINT_SAVE: Metric = Metric::gauge(
    "radit_checkpoint_save_seconds",
    "Seconds from the start of the last committed checkpoint to its commit (training runs meanwhile).",
)
.unit(Unit::Seconds);
/// GPU ranks only.
pub const GPU_MEMORY_USED: Metric = Metric::gauge(
    "radit_gpu_memory_used_bytes",
    "GPU memory in use on each rank's device (driver view, includes the allocator's cache).",
)
.unit(Unit::Bytes)
.per_rank();
/// GPU ranks only.
pub const GPU_MEMORY_TOTAL: Metric = Metric::gauge(
    "radit_gpu_memory_total_bytes",
    "GPU memory of each rank's device.",
)
.unit(Unit::Bytes)
.per_rank();
/// Buckets: [`STEP_SECONDS_BUCKETS`].
pub const STEP_DURATION: Metric = Metric::histogram(
    "radit_step_duration_seconds",
    "Seconds per training step, per rank.",
)
.unit(Unit::Seconds)
.per_rank();

/// The job's metrics, in the order of the exposition.
pub const JOB: &[Metric] = &[
    WORLD_SIZE,
    GENERATION,
    RANKS_JOINED,
    STEP,
    STEP_SECONDS_MEDIAN,
    CHECKPOINT_STEP,
    HANGS_DETECTED,
    RANK_STEP,
    RANK_HEARTBEAT_AGE,
    RANK_ALIVE,
    RANK_HUNG,
    RANK_DEAD,
    RESTARTS,
    PROGRESS,
    ETA,
    PEAK_FLOPS,
    IMAGES,
    TOKENS,
    MODEL_FLOPS,
    DATA_WAIT,
    SKIPPED_STEPS,
    CHECKPOINTS,
    CHECKPOINT_BYTES,
    VAL_LOSS,
    FD,
    LOSS,
    GRAD_NORM,
    LEARNING_RATE,
    CHECKPOINT_STALL,
    MFU,
    LOSS_MAX,
    CHECKPOINT_WRITE,
    CHECKPOINT_SAVE,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    STEP_DURATION,
];

// The ingest: `radit shard`.
pub const INGEST_ROWS: Metric = Metric::gauge("radit_ingest_rows", "Rows of the metadata table.");
pub const INGEST_ROWS_DONE: Metric = Metric::gauge(
    "radit_ingest_rows_done",
    "Rows committed in shards or rejected (earlier runs included).",
);
pub const INGEST_ROWS_REJECTED: Metric = Metric::counter(
    "radit_ingest_rows_rejected_total",
    "Rows rejected (bad value, missing or unreadable image) in shards this run committed.",
);
pub const INGEST_SHARDS_WRITTEN: Metric = Metric::counter(
    "radit_ingest_shards_written_total",
    "Shards this run committed.",
);
pub const INGEST_BYTES_WRITTEN: Metric = Metric::counter(
    "radit_ingest_bytes_written_total",
    "Bytes of shard objects this run wrote.",
);
pub const INGEST_PROGRESS: Metric =
    Metric::gauge("radit_ingest_progress_ratio", "Rows done over rows.").unit(Unit::Ratio);
pub const INGEST_COMPLETE: Metric = Metric::gauge(
    "radit_ingest_complete",
    "1 once the store's manifest is written.",
);

/// The ingest's metrics, in the order of the exposition.
pub const INGEST: &[Metric] = &[
    INGEST_ROWS,
    INGEST_ROWS_DONE,
    INGEST_ROWS_REJECTED,
    INGEST_SHARDS_WRITTEN,
    INGEST_BYTES_WRITTEN,
    INGEST_PROGRESS,
    INGEST_COMPLETE,
];

/// Every metric radit exports.
pub fn all() -> impl Iterator<Item = &'static Metric> {
    JOB.iter().chain(INGEST)
}

/// Every metric family's name (as in `# TYPE` lines).
pub fn names() -> Vec<&'static str> {
    all().map(|m| m.name).collect()
}

/// Every series name (a histogram's `_bucket`, `_sum` and `_count`), what a PromQL query names.
pub fn series_names() -> Vec<String> {
    all().flat_map(Metric::series).collect()
}

/// The text exposition ([`CONTENT_TYPE`]) of what `collector` encodes.
pub fn exposition(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if prometheus_text::encode(&mut out, &registry).is_err() {
        // Only a value no text can hold fails (none of ours); a torn exposition would be refused as a whole.
        tracing::error!("cannot encode the metrics; exposing none");
        out.clear();
    }
    out
}

/// One rank as the job's metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct RankSample {
    pub rank: usize,
    pub step: u64,
    pub heartbeat_age_seconds: f64,
    pub alive: bool,
    /// Named as the culprit of a hang.
    pub hung: bool,
    /// Stopped heart-beating.
    pub dead: bool,
}

/// The job's state at one instant, for [`exposition`] (and a [`Collector`] for a registry of one's own).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSnapshot {
    pub world: usize,
    pub generation: u64,
    pub joined: usize,
    /// The slowest rank's finished step.
    pub step: u64,
    pub median_step_seconds: Option<f64>,
    pub checkpoint: Option<u64>,
    pub hangs_detected: u64,
    /// The run's steps, for progress and ETA.
    pub total_steps: Option<u64>,
    pub peak_flops_per_device: Option<f64>,
    /// The ranks that joined this generation.
    pub ranks: Vec<RankSample>,
    /// The job's counters over every rank and generation.
    pub counters: RankStats,
    /// What the ranks of this generation reported, by rank.
    pub stats: Vec<(usize, RankStats)>,
}

/// The ingest's progress: rows of the table, rows done (committed in shards, rejected rows included, an earlier
/// run's included), what this run rejected and wrote, and whether the manifest is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestSnapshot {
    pub rows: u64,
    pub rows_done: u64,
    pub rows_rejected: u64,
    pub shards_written: u64,
    pub bytes_written: u64,
    pub complete: bool,
}

type Written = Result<(), fmt::Error>;

/// A family's `# HELP` and `# TYPE` lines, then its samples.
fn family(
    out: &mut DescriptorEncoder,
    m: &Metric,
    samples: impl FnOnce(&mut MetricEncoder) -> Written,
) -> Written {
    let (stem, unit) = m.parts();
    let unit = unit.map(|u| match u {
        Unit::Seconds => registry::Unit::Seconds,
        Unit::Bytes => registry::Unit::Bytes,
        // prometheus-client's Ratios is "ratios"; the convention (and our names) say "ratio".
        Unit::Ratio => registry::Unit::Other(u.as_str().into()),
    });
    let kind = match m.kind {
        Kind::Gauge => MetricType::Gauge,
        Kind::Counter => MetricType::Counter,
        Kind::Histogram => MetricType::Histogram,
    };
    samples(&mut out.encode_descriptor(stem, m.help, unit.as_ref(), kind)?)
}

fn gauge(out: &mut DescriptorEncoder, m: &Metric, v: impl EncodeGaugeValue) -> Written {
    family(out, m, |e| e.encode_gauge(&v))
}

fn counter(out: &mut DescriptorEncoder, m: &Metric, v: impl EncodeCounterValue) -> Written {
    family(out, m, |e| e.encode_counter::<NoLabelSet, _, u64>(&v, None))
}

fn per_rank<V: EncodeGaugeValue>(
    out: &mut DescriptorEncoder,
    m: &Metric,
    mut values: impl Iterator<Item = (usize, V)>,
) -> Written {
    family(out, m, |e| {
        values.try_for_each(|(rank, v)| e.encode_family(&[("rank", rank)])?.encode_gauge(&v))
    })
}

fn flag(b: bool) -> u64 {
    u64::from(b)
}

impl Collector for JobSnapshot {
    fn encode(&self, mut out: DescriptorEncoder) -> Written {
        let o = &mut out;
        gauge(o, &WORLD_SIZE, self.world)?;
        gauge(o, &GENERATION, self.generation)?;
        gauge(o, &RANKS_JOINED, self.joined)?;
        gauge(o, &STEP, self.step)?;
        if let Some(m) = self.median_step_seconds {
            gauge(o, &STEP_SECONDS_MEDIAN, m)?;
        }
        let checkpoint = self
            .checkpoint
            .map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX));
        gauge(o, &CHECKPOINT_STEP, checkpoint)?;
        counter(o, &HANGS_DETECTED, self.hangs_detected)?;
        let ranks = || self.ranks.iter();
        per_rank(o, &RANK_STEP, ranks().map(|r| (r.rank, r.step)))?;
        let age = ranks().map(|r| (r.rank, r.heartbeat_age_seconds));
        per_rank(o, &RANK_HEARTBEAT_AGE, age)?;
        per_rank(o, &RANK_ALIVE, ranks().map(|r| (r.rank, flag(r.alive))))?;
        per_rank(o, &RANK_HUNG, ranks().map(|r| (r.rank, flag(r.hung))))?;
        per_rank(o, &RANK_DEAD, ranks().map(|r| (r.rank, flag(r.dead))))?;
        counter(o, &RESTARTS, self.generation.saturating_sub(1))?;
        if let Some(total) = self.total_steps {
            gauge(o, &PROGRESS, self.step as f64 / total.max(1) as f64)?;
            if let Some(m) = self.median_step_seconds {
                gauge(o, &ETA, m * total.saturating_sub(self.step) as f64)?;
            }
        }
        let peak = self.peak_flops_per_device.map(|p| p * self.world as f64);
        if let Some(peak) = peak {
            gauge(o, &PEAK_FLOPS, peak)?;
        }
        // Counters cover every generation, also between a relaunch and the new ranks' first report.
        let all = &self.counters;
        counter(o, &IMAGES, all.images)?;
        counter(o, &TOKENS, all.tokens)?;
        counter(o, &MODEL_FLOPS, all.model_flops)?;
        counter(o, &DATA_WAIT, all.data_wait_seconds)?;
        counter(o, &SKIPPED_STEPS, all.skipped_steps)?;
        counter(o, &CHECKPOINTS, all.checkpoints)?;
        counter(o, &CHECKPOINT_BYTES, all.checkpoint_bytes)?;
        if all.val_step > 0 {
            gauge(o, &VAL_LOSS, all.val_loss)?;
        }
        if all.fd_step > 0 {
            gauge(o, &FD, all.fd)?;
        }
        // Every rank sees the same global loss, gradient norm and learning rate: the first reporting rank's are
        // the run's.
        let Some((_, first)) = self.stats.first() else {
            return Ok(());
        };
        let slowest =
            |f: fn(&RankStats) -> f64| self.stats.iter().map(|(_, s)| f(s)).fold(0.0, f64::max);
        gauge(o, &LOSS, first.loss)?;
        gauge(o, &GRAD_NORM, first.grad_norm)?;
        gauge(o, &LEARNING_RATE, first.learning_rate)?;
        gauge(
            o,
            &CHECKPOINT_STALL,
            slowest(|s| s.checkpoint_stall_seconds),
        )?;
        // MFU at the median step time, for alerts; the dashboard also shows rate(radit_model_flops_total) / peak.
        if let (Some(peak), Some(median)) = (peak, self.median_step_seconds)
            && peak > 0.0
            && median > 0.0
        {
            let step_flops: f64 = self.stats.iter().map(|(_, s)| s.step_flops).sum();
            gauge(o, &MFU, step_flops / median / peak)?;
        }
        gauge(o, &LOSS_MAX, first.loss_max)?;
        gauge(
            o,
            &CHECKPOINT_WRITE,
            slowest(|s| s.checkpoint_write_seconds),
        )?;
        gauge(o, &CHECKPOINT_SAVE, slowest(|s| s.checkpoint_save_seconds))?;
        let gpus = || {
            self.stats
                .iter()
                .filter(|(_, s)| s.device_memory_total_bytes > 0)
        };
        if gpus().next().is_some() {
            let used = gpus().map(|(r, s)| (*r, s.device_memory_used_bytes));
            per_rank(o, &GPU_MEMORY_USED, used)?;
            let total = gpus().map(|(r, s)| (*r, s.device_memory_total_bytes));
            per_rank(o, &GPU_MEMORY_TOTAL, total)?;
        }
        // Step time per rank, as a histogram: the worst rank shows who holds the others up.
        family(o, &STEP_DURATION, |e| {
            self.stats.iter().try_for_each(|(rank, s)| {
                let buckets = per_bucket(&s.step_seconds_buckets);
                e.encode_family(&[("rank", *rank)])?
                    .encode_histogram::<NoLabelSet>(
                        s.step_seconds_sum,
                        s.step_seconds_count,
                        &buckets,
                        None,
                    )
            })
        })
    }
}

/// A rank's cumulative bucket counts as prometheus-client wants them: per bucket, with each bound. Counts that
/// go down (a rank's bug) are held at the largest so far, so the exposed buckets stay cumulative.
fn per_bucket(cumulative: &[u64]) -> Vec<(f64, u64)> {
    let mut below = 0;
    STEP_SECONDS_BUCKETS
        .iter()
        .zip(cumulative)
        .map(|(&bound, &count)| {
            let count = count.max(below);
            let here = count - below;
            below = count;
            (bound, here)
        })
        .collect()
}

impl Collector for IngestSnapshot {
    fn encode(&self, mut out: DescriptorEncoder) -> Written {
        let o = &mut out;
        gauge(o, &INGEST_ROWS, self.rows)?;
        gauge(o, &INGEST_ROWS_DONE, self.rows_done)?;
        counter(o, &INGEST_ROWS_REJECTED, self.rows_rejected)?;
        counter(o, &INGEST_SHARDS_WRITTEN, self.shards_written)?;
        counter(o, &INGEST_BYTES_WRITTEN, self.bytes_written)?;
        let ratio = match self.rows {
            0 => 0.0,
            rows => self.rows_done as f64 / rows as f64,
        };
        gauge(o, &INGEST_PROGRESS, ratio)?;
        gauge(o, &INGEST_COMPLETE, flag(self.complete))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str, text: &str) {
        radit_testkit::assert_golden(env!("CARGO_MANIFEST_DIR"), name, text);
    }

    /// `(name, kind)` of every `# TYPE` line.
    fn types(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect()
    }

    fn kind_name(k: Kind) -> &'static str {
        match k {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }

    /// What dashboards, alerts and the Pushgateway tests query: renaming one breaks them, so a change here is a
    /// change of the monitoring contract.
    #[test]
    fn the_names_are_the_published_ones() {
        assert_eq!(
            names(),
            [
                "radit_world_size",
                "radit_generation",
                "radit_ranks_joined",
                "radit_step",
                "radit_step_seconds_median",
                "radit_checkpoint_step",
                "radit_hangs_detected_total",
                "radit_rank_step",
                "radit_rank_heartbeat_age_seconds",
                "radit_rank_alive",
                "radit_rank_hung",
                "radit_rank_dead",
                "radit_restarts_total",
                "radit_progress_ratio",
                "radit_eta_seconds",
                "radit_peak_flops_per_second",
                "radit_images_total",
                "radit_tokens_total",
                "radit_model_flops_total",
                "radit_data_wait_seconds_total",
                "radit_skipped_steps_total",
                "radit_checkpoints_total",
                "radit_checkpoint_bytes_total",
                "radit_val_loss",
                "radit_fd",
                "radit_loss",
                "radit_grad_norm",
                "radit_learning_rate",
                "radit_checkpoint_stall_seconds",
                "radit_mfu_ratio",
                "radit_loss_max",
                "radit_checkpoint_write_seconds",
                "radit_checkpoint_save_seconds",
                "radit_gpu_memory_used_bytes",
                "radit_gpu_memory_total_bytes",
                "radit_step_duration_seconds",
                "radit_ingest_rows",
                "radit_ingest_rows_done",
                "radit_ingest_rows_rejected_total",
                "radit_ingest_shards_written_total",
                "radit_ingest_bytes_written_total",
                "radit_ingest_progress_ratio",
                "radit_ingest_complete",
            ]
        );
        let mut unique = names();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names().len());
        for m in all() {
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{m:?}");
            assert!(
                m.help.ends_with('.') && !m.help.contains(['\n', '\\']),
                "{m:?}"
            );
            // A unit is declared exactly where the name ends in it.
            if let Some(u) = m.unit {
                assert_ne!(m.stem(), m.name.trim_end_matches("_total"), "{m:?}");
                assert!(
                    m.stem().ends_with(|c: char| c.is_ascii_alphanumeric()),
                    "{u:?}"
                );
            }
        }
    }

    /// prometheus-client adds the unit and `_total` to the stem: every name must come back byte for byte.
    #[test]
    fn prometheus_client_writes_every_name_as_registered() {
        #[derive(Debug)]
        struct One(Metric);
        impl Collector for One {
            fn encode(&self, mut out: DescriptorEncoder) -> Written {
                match self.0.kind {
                    Kind::Gauge => gauge(&mut out, &self.0, 1u64),
                    Kind::Counter => counter(&mut out, &self.0, 1u64),
                    Kind::Histogram => family(&mut out, &self.0, |e| {
                        e.encode_histogram::<NoLabelSet>(0.0, 0, &[], None)
                    }),
                }
            }
        }
        for m in all() {
            let text = exposition(One(*m));
            assert_eq!(
                types(&text),
                [(m.name.to_string(), kind_name(m.kind).to_string())]
            );
            assert!(
                text.starts_with(&format!("# HELP {} {}\n", m.name, m.help)),
                "{text}"
            );
            let series: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split([' ', '{']).next().unwrap_or(""))
                .collect();
            assert_eq!(series, m.series(), "{text}");
        }
    }

    fn full_job() -> JobSnapshot {
        let stats = |rank: usize, gpu: bool| RankStats {
            steps: 10,
            images: 40,
            tokens: 640,
            model_flops: 1e13,
            step_flops: 1e12,
            data_wait_seconds: 0.5,
            step_seconds_buckets: STEP_SECONDS_BUCKETS
                .iter()
                .map(|&b| if b >= 1.0 { 10 } else { 0 })
                .collect(),
            step_seconds_count: 10,
            step_seconds_sum: 7.5,
            loss: f64::NAN,
            loss_max: 0.5 + rank as f64,
            device_memory_total_bytes: if gpu { 96 << 30 } else { 0 },
            device_memory_used_bytes: if gpu { 20 << 30 } else { 0 },
            val_step: 10,
            val_loss: 0.25,
            fd_step: 10,
            fd: 3.5,
            ..RankStats::default()
        };
        JobSnapshot {
            world: 2,
            generation: 1,
            joined: 2,
            step: 10,
            median_step_seconds: Some(0.75),
            checkpoint: None,
            hangs_detected: 0,
            total_steps: Some(40),
            peak_flops_per_device: Some(1e14),
            ranks: (0..2)
                .map(|rank| RankSample {
                    rank,
                    step: 10,
                    heartbeat_age_seconds: 0.25,
                    alive: true,
                    hung: rank == 1,
                    dead: false,
                })
                .collect(),
            counters: stats(0, false),
            stats: vec![(0, stats(0, true)), (1, stats(1, false))],
        }
    }

    #[test]
    fn every_family_is_the_tables_in_its_order() {
        let job: Vec<_> = JOB
            .iter()
            .map(|m| (m.name.to_string(), kind_name(m.kind).to_string()))
            .collect();
        assert_eq!(types(&exposition(full_job())), job);
        let ingest: Vec<_> = INGEST
            .iter()
            .map(|m| (m.name.to_string(), kind_name(m.kind).to_string()))
            .collect();
        assert_eq!(types(&exposition(IngestSnapshot::default())), ingest);
        // A NaN loss is written as Prometheus reads it; labels of per-rank series and buckets.
        let text = exposition(full_job());
        for line in [
            "radit_loss NaN",
            "radit_rank_hung{rank=\"1\"} 1",
            "radit_checkpoint_step -1",
            "radit_gpu_memory_used_bytes{rank=\"0\"} 21474836480",
            "radit_step_duration_seconds_bucket{rank=\"1\",le=\"0.5\"} 0",
            "radit_step_duration_seconds_bucket{rank=\"1\",le=\"1\"} 10",
            "radit_step_duration_seconds_bucket{rank=\"1\",le=\"+Inf\"} 10",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "`{line}` missing from\n{text}"
            );
        }
        assert!(!text.contains("radit_gpu_memory_used_bytes{rank=\"1\"}"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn a_rank_whose_buckets_go_down_still_exposes_cumulative_buckets() {
        let mut buckets = vec![0; STEP_SECONDS_BUCKETS.len()];
        buckets[3] = 5;
        buckets[5] = 2;
        let per = per_bucket(&buckets);
        let cumulative: Vec<u64> = per
            .iter()
            .scan(0, |sum, (_, n)| {
                *sum += n;
                Some(*sum)
            })
            .collect();
        assert_eq!(&cumulative[..7], [0, 0, 0, 5, 5, 5, 5]);
        assert_eq!(per.len(), STEP_SECONDS_BUCKETS.len());
    }

    #[test]
    fn the_ingest_exposition_matches_its_golden_file() {
        let text = exposition(IngestSnapshot {
            rows: 48,
            rows_done: 36,
            rows_rejected: 3,
            shards_written: 4,
            bytes_written: 123456,
            complete: false,
        });
        golden("ingest.txt", &text);
    }

    /// promtool (Debian's prometheus package; scripts/setup.sh installs it) accepts both expositions as they are
    /// served and pushed. Skipped where it is not installed.
    #[test]
    fn promtool_accepts_the_expositions() {
        use std::io::Write;
        for text in [
            exposition(full_job()),
            exposition(IngestSnapshot::default()),
        ] {
            let child = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let Ok(mut child) = child else {
                eprintln!("promtool is not installed: skipped");
                return;
            };
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())
                .expect("promtool reads");
            let out = child.wait_with_output().expect("promtool ran");
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "promtool: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
