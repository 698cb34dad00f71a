//! How fast the loader delivers samples from a store, next to the ceiling it is measured against: reading and
//! decompressing the same shard objects with nothing else (no order, no batch assembly, no dequantisation).
//! `radit data bench` prints both; the digest lets two runs (local and S3, cold and warm) prove they delivered
//! the same batches.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::ShardError;
use crate::loader::{Inputs, Loader, LoaderConfig, LoaderStats, ModelInput};
use crate::reader::StoreReader;
use crate::store::Storage;

/// One timed run of the loader.
#[derive(Debug, Clone)]
pub struct LoaderRun {
    pub steps: u64,
    pub samples: u64,
    pub elapsed: Duration,
    pub stats: LoaderStats,
    /// sha256 over every batch's indices, inputs, labels and ages, in order (when asked for).
    pub digest: Option<String>,
}

impl LoaderRun {
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the loader for `steps` steps from step 0 (by default one epoch of training, or the whole evaluation pass)
/// and times it from opening the store to the last batch. Hashing the batches (`digest`) costs time of its own.
pub fn measure_loader(
    storage: Storage,
    config: LoaderConfig,
    steps: Option<u64>,
    digest: bool,
) -> Result<LoaderRun, ShardError> {
    let started = Instant::now();
    let mut loader = Loader::open(storage, config, 0)?;
    let order = loader.state().config;
    let steps = match (steps, loader.eval_steps()) {
        (Some(n), _) => Some(n),
        (None, Some(_)) => None,
        (None, None) => Some(order.samples.div_ceil(order.global_batch)),
    };
    let mut hash = digest.then(Sha256::new);
    let mut buf: Vec<u8> = Vec::new();
    let mut samples = 0;
    let mut done = 0;
    while steps.is_none_or(|n| done < n) {
        let Some(batch) = loader.next_batch()? else {
            break;
        };
        if let Some(hash) = hash.as_mut() {
            buf.clear();
            batch
                .indices
                .iter()
                .for_each(|i| buf.extend(i.to_le_bytes()));
            match &batch.inputs {
                Inputs::U16(v) => v.iter().for_each(|x| buf.extend(x.to_le_bytes())),
                Inputs::F32(v) => v.iter().for_each(|x| buf.extend(x.to_le_bytes())),
            }
            buf.extend(&batch.labels);
            batch.age.iter().for_each(|a| buf.extend(a.to_le_bytes()));
            hash.update(&buf);
        }
        // Padding of a last evaluation batch is not a delivered sample.
        samples += batch.valid.iter().filter(|v| **v).count() as u64;
        done += 1;
    }
    let elapsed = started.elapsed();
    let stats = loader.stats();
    Ok(LoaderRun {
        steps: done,
        samples,
        elapsed,
        stats,
        digest: hash.map(|h| hex::encode(h.finalize())),
    })
}

/// One timed read of every shard of a split.
#[derive(Debug, Clone)]
pub struct CeilingRun {
    pub shards: u64,
    pub samples: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl CeilingRun {
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Fetches and decodes every shard of the split once, all shards in parallel on the current rayon pool. With
/// `verify`, each object is also checked against the manifest's sha256 first, as the loader does: the ceiling of
/// a reader that trusts nothing it reads.
pub fn measure_ceiling(
    storage: Storage,
    config: &LoaderConfig,
    verify: bool,
) -> Result<CeilingRun, ShardError> {
    let started = Instant::now();
    let reader = StoreReader::open(storage.clone())?;
    let latents = match config.output {
        ModelInput::Latents => reader.latents(config.split)?,
        ModelInput::U16 | ModelInput::Dequantised => None,
    };
    let expected: std::collections::HashMap<&str, &str> = reader
        .manifest()
        .objects
        .iter()
        .map(|o| (o.key.as_str(), o.sha256.as_str()))
        .collect();
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let fetch = |key: &str| {
        let b = storage.get(key)?;
        bytes.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if verify
            && let Some(want) = expected.get(key)
            && hex::encode(sha2::Sha256::digest(&b)) != *want
        {
            return Err(ShardError::BadObject {
                url: storage.describe(key),
                reason: "fails its sha256 check".into(),
                attempts: 1,
            });
        }
        Ok(b)
    };
    let shards = reader.shards(config.split);
    let samples: Result<Vec<usize>, ShardError> = (0..shards)
        .into_par_iter()
        .map(|k| {
            let shard = match &latents {
                Some(l) => reader.read_latent_shard_with(config.split, k, l, &fetch)?,
                None => reader.read_shard_with(config.split, k, &fetch)?,
            };
            Ok(shard.rows)
        })
        .collect();
    Ok(CeilingRun {
        shards,
        samples: samples?.iter().sum::<usize>() as u64,
        bytes: bytes.into_inner(),
        elapsed: started.elapsed(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

impl LoaderRun {
    /// `radit data bench`'s report: JSON (for scripts) or lines, over `threads` decode threads.
    pub fn report(&self, url: &str, threads: usize, json: bool) -> String {
        let secs = self.elapsed.as_secs_f64();
        if json {
            return serde_json::json!({
                "url": url, "threads": threads, "steps": self.steps, "samples": self.samples,
                "seconds": secs, "samples_per_s": self.samples_per_second(),
                "samples_per_s_per_core": self.samples_per_second() / threads as f64,
                "wait_seconds": self.stats.wait.as_secs_f64(), "bytes_read": self.stats.bytes_read,
                "cache_hits": self.stats.cache_hits, "cache_misses": self.stats.cache_misses,
                "skipped_samples": self.stats.skipped_samples, "digest": self.digest,
            })
            .to_string();
        }
        let mut out = format!(
            "loader: {} samples in {} steps, {secs:.2} s: {:.1} samples/s ({:.1} per core, {threads} threads)\n  \
             waited {:.2} s; read {:.1} MiB from the store ({:.1} MiB/s); cache {} hits, {} misses",
            self.samples,
            self.steps,
            self.samples_per_second(),
            self.samples_per_second() / threads as f64,
            self.stats.wait.as_secs_f64(),
            mib(self.stats.bytes_read),
            mib(self.stats.bytes_read) / secs.max(1e-9),
            self.stats.cache_hits,
            self.stats.cache_misses
        );
        if let Some(d) = &self.digest {
            out += &format!("\ndigest: {d}");
        }
        out
    }
}

impl CeilingRun {
    /// `radit data bench --ceiling`'s report, as [`LoaderRun::report`].
    pub fn report(&self, url: &str, threads: usize, verify: bool, json: bool) -> String {
        let secs = self.elapsed.as_secs_f64();
        if json {
            return serde_json::json!({
                "url": url, "threads": threads, "ceiling": true, "verify": verify, "shards": self.shards,
                "samples": self.samples, "bytes_read": self.bytes, "seconds": secs,
                "samples_per_s": self.samples_per_second(),
            })
            .to_string();
        }
        format!(
            "ceiling (read + {}decompress every shard once): {} samples in {} shards, {secs:.2} s: \
             {:.1} samples/s, {:.1} MiB/s ({threads} threads)",
            if verify { "verify + " } else { "" },
            self.samples,
            self.shards,
            self.samples_per_second(),
            mib(self.bytes) / secs.max(1e-9)
        )
    }
}
