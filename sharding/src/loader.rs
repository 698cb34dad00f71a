//! The streaming training loader: each rank's slice of every global batch, read as whole shards from the object
//! store (through an optional node-local cache), decoded in parallel and prefetched on a background thread; the
//! shards of the next steps are read while the current step's batch is assembled.
//!
//! The order comes from [`crate::order`], so the batches are a pure function of (seed, step, rank, world) and
//! resuming at any step, on any world size that divides the batch, continues exactly.
//!
//! ```no_run
//! use radit_sharding::loader::{Loader, LoaderConfig};
//! use radit_sharding::store::Storage;
//! let mut loader = Loader::open(Storage::open_existing("file:///data/cxr7")?, LoaderConfig::default(), 0)?;
//! let batch = loader.next_batch()?.expect("training never ends"); // step 0, rank 0 of 1
//! println!("{} images, waited {:?}", batch.len(), loader.stats().wait);
//! # Ok::<(), radit_sharding::ShardError>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::ShardError;
use crate::order::{
    DEFAULT_WINDOW_SHARDS, EvalBatch, OrderConfig, OrderState, SampleOrder, check_world,
    eval_batches,
};
use crate::reader::{LatentArray, Shard, StoreReader};
use crate::rng::SplitMix64;
use crate::schema::NUM_LABELS;
use crate::split::Split;
use crate::store::{Storage, StorageError};

/// What the model is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelInput {
    /// Stored 16-bit pixel values.
    U16,
    /// x = 2(n+u)/65536 - 1, u ~ U[0,1) fresh per step from (seed, step, sample index): uniform dequantisation
    /// that a resume reproduces on any world size.
    Dequantised,
    /// The split's `latents` array as f32, standardised per channel with its statistics; the images are
    /// not read at all.
    Latents,
}

/// Which pass over the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Endless, shuffled by (seed, epoch): training.
    Train,
    /// Once, in stored order, the split covered exactly once across ranks; the last global batch is padded so every
    /// rank runs the same number of steps ([`Batch::valid`] marks the padding). [`Loader::next_batch`] then
    /// returns `None`.
    Eval,
}

/// A node-local cache of raw shard objects. One directory per process: the byte limit is accounted
/// in-process, so ranks sharing a node use `<dir>/rank-<rank>` with a share of the disk each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub split: Split,
    pub pass: Pass,
    pub seed: u64,
    pub window_shards: u64,
    pub global_batch: u64,
    pub rank: u64,
    pub world: u64,
    pub output: ModelInput,
    /// Batches prepared ahead of the consumer.
    pub prefetch_steps: usize,
    pub cache: Option<CacheConfig>,
    /// Skip (and count) samples of a shard that is missing or cannot be decoded, instead of failing.
    pub skip_bad_shards: bool,
    /// Reads of an object that is missing or unlike its manifest entry before it counts as bad (backing off
    /// 0.2 s, 0.4 s, ... between them).
    pub object_attempts: u32,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            split: Split::Train,
            pass: Pass::Train,
            seed: 0,
            window_shards: DEFAULT_WINDOW_SHARDS,
            global_batch: 512,
            rank: 0,
            world: 1,
            output: ModelInput::Dequantised,
            prefetch_steps: 4,
            cache: None,
            skip_bad_shards: false,
            object_attempts: DEFAULT_OBJECT_ATTEMPTS,
        }
    }
}

pub const DEFAULT_OBJECT_ATTEMPTS: u32 = 3;

/// The `[data]` section of a run: which store and split, and how a node reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The Zarr store (path, file:// or s3://).
    pub url: String,
    #[serde(default = "default_split")]
    pub split: Split,
    #[serde(default = "default_window")]
    pub window_shards: u64,
    /// Node-local cache directory (one per rank is made inside it).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default = "default_cache_gib")]
    pub cache_gib: f64,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Skip (and count) the samples of a shard object that stays missing or damaged, instead of stopping the run
    /// with the object named.
    #[serde(default)]
    pub skip_bad_shards: bool,
    /// Reads of a missing or damaged object (size or sha256 unlike the manifest's) before it counts as bad.
    #[serde(default = "default_object_attempts")]
    pub object_attempts: u32,
    /// Seconds an object-store request may take before it fails and is retried (a stalled server); 0: the
    /// client's default (30 s).
    #[serde(default)]
    pub request_timeout_seconds: f64,
}

fn default_object_attempts() -> u32 {
    DEFAULT_OBJECT_ATTEMPTS
}

fn default_split() -> Split {
    Split::Train
}
fn default_window() -> u64 {
    DEFAULT_WINDOW_SHARDS
}
fn default_cache_gib() -> f64 {
    64.0
}
fn default_prefetch() -> usize {
    4
}

impl DataConfig {
    /// The store at `url` with every other setting at its default.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            split: default_split(),
            window_shards: default_window(),
            cache_dir: None,
            cache_gib: default_cache_gib(),
            prefetch: default_prefetch(),
            skip_bad_shards: false,
            object_attempts: DEFAULT_OBJECT_ATTEMPTS,
            request_timeout_seconds: 0.0,
        }
    }

    /// The store, opened with this data's request timeout.
    pub fn open_store(&self) -> Result<Storage, StorageError> {
        let timeout = (self.request_timeout_seconds > 0.0)
            .then(|| Duration::from_secs_f64(self.request_timeout_seconds));
        Storage::open_existing_with(&self.url, timeout)
    }

    /// Rank `rank` of `world`'s loader over this data: the one derivation training and `radit data` share (a
    /// cache directory per rank inside `cache_dir`).
    pub fn loader_config(
        &self,
        pass: Pass,
        seed: u64,
        global_batch: u64,
        rank: u64,
        world: u64,
        output: ModelInput,
    ) -> LoaderConfig {
        LoaderConfig {
            split: self.split,
            pass,
            seed,
            window_shards: self.window_shards,
            global_batch,
            rank,
            world,
            output,
            prefetch_steps: self.prefetch,
            skip_bad_shards: self.skip_bad_shards,
            object_attempts: self.object_attempts,
            cache: self.cache_dir.as_ref().map(|d| CacheConfig {
                dir: d.join(format!("rank-{rank}")),
                max_bytes: (self.cache_gib * (1u64 << 30) as f64) as u64,
            }),
        }
    }
}

/// The model inputs of a batch, `[n, C, H, W]` row-major (C = 1 for images).
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    U16(Vec<u16>),
    F32(Vec<f32>),
}

/// One rank's part of one global step, contiguous and ready to use.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub step: u64,
    /// Sample indices in the split.
    pub indices: Vec<u64>,
    /// Real samples (true) and the padding of a last evaluation batch (false); all true in training.
    pub valid: Vec<bool>,
    /// `[C, H, W]` of one sample: `[1, T, T]` for images.
    pub sample_shape: [usize; 3],
    pub inputs: Inputs,
    /// `[n, 18]`.
    pub labels: Vec<u8>,
    pub age: Vec<f32>,
    pub image_ids: Vec<String>,
    /// Samples left out because their shard was unreadable (only with `skip_bad_shards`).
    pub skipped: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// What monitoring wants from the loader.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoaderStats {
    pub steps: u64,
    /// Total time the consumer waited in [`Loader::next_batch`].
    pub wait: Duration,
    /// Time waited for the latest batch.
    pub last_wait: Duration,
    /// Bytes fetched from the object store (cache misses).
    pub bytes_read: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub skipped_samples: u64,
}

impl LoaderStats {
    pub fn cache_hit_ratio(&self) -> f64 {
        let total = self.cache_hits + self.cache_misses;
        if total == 0 {
            0.0
        } else {
            self.cache_hits as f64 / total as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// Raw shard objects on node-local disk (`$LOCALDIR` on Isambard-AI), evicted least-recently-used beyond
/// `max_bytes`; survives restarts, so a requeued job on the same node starts warm.
pub struct NodeCache {
    config: CacheConfig,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    bytes: u64,
    /// Keys in use order, oldest first, with their sizes.
    lru: VecDeque<(String, u64)>,
}

impl NodeCache {
    /// Opens the cache directory, adopting (and trimming to the limit) what earlier processes left.
    pub fn open(config: CacheConfig) -> Result<Self, ShardError> {
        let io = |source| ShardError::ReadInput {
            path: config.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        // Adopt what earlier processes left, oldest first, so the limit holds across restarts.
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&config.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if name.ends_with(".partial") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let used = meta
                .accessed()
                .or_else(|_| meta.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((used, name.replace('%', "/"), meta.len()));
        }
        found.sort();
        let mut state = CacheState::default();
        for (_, key, size) in found {
            state.bytes += size;
            state.lru.push_back((key, size));
        }
        let cache = Self {
            config,
            state: Mutex::new(state),
        };
        cache.evict();
        Ok(cache)
    }

    /// Bytes the cache holds.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    fn path(&self, key: &str) -> PathBuf {
        cache_path(&self.config.dir, key)
    }

    fn get(&self, key: &str) -> Option<bytes::Bytes> {
        let data = std::fs::read(self.path(key)).ok()?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = st.lru.iter().position(|(k, _)| k == key) {
            let entry = st.lru.remove(pos).expect("position is in range");
            st.lru.push_back(entry);
        } else {
            // Left by an earlier process: adopt it.
            st.bytes += data.len() as u64;
            st.lru.push_back((key.to_string(), data.len() as u64));
        }
        Some(bytes::Bytes::from(data))
    }

    fn put(&self, key: &str, data: &[u8]) {
        let size = data.len() as u64;
        if size > self.config.max_bytes {
            return;
        }
        // Make room first, so the directory never holds more than the limit, even mid-write.
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            Self::evict_locked(&mut st, &self.config, self.config.max_bytes - size);
            st.bytes += size;
            st.lru.push_back((key.to_string(), size));
        }
        let path = self.path(key);
        let tmp = path.with_extension("partial");
        // Write then rename: a crash never leaves a truncated object that a later read would trust. The rename
        // happens under the lock and only while the entry is still accounted for: a concurrent put may have evicted
        // it while it was being written, and the file must not then land untracked (over the limit).
        let written = std::fs::write(&tmp, data).and_then(|()| {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.lru.iter().any(|(k, _)| k == key) {
                std::fs::rename(&tmp, &path)
            } else {
                std::fs::remove_file(&tmp)
            }
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = st.lru.iter().rposition(|(k, _)| k == key) {
                st.lru.remove(pos);
                st.bytes -= size;
            }
        }
    }

    /// Drops `key` (a copy that failed its check).
    fn remove(&self, key: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = st.lru.iter().position(|(k, _)| k == key)
            && let Some((_, size)) = st.lru.remove(pos)
        {
            st.bytes -= size;
        }
        let _ = std::fs::remove_file(self.path(key));
    }

    fn evict(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::evict_locked(&mut st, &self.config, self.config.max_bytes);
    }

    fn evict_locked(st: &mut CacheState, config: &CacheConfig, limit: u64) {
        while st.bytes > limit {
            let Some((old, old_size)) = st.lru.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(cache_path(&config.dir, &old));
            st.bytes -= old_size;
        }
    }
}

/// One flat directory: object keys with `/` mapped to `%`.
fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(key.replace('/', "%"))
}

/// Fetches objects through the cache (the storage retries transient failures), counting bytes and hits, and
/// checks each against the manifest's size and sha256: an object missing or unlike its entry (deleted, damaged,
/// a bad cached copy) is read again a few times, then named.
struct Fetcher {
    storage: Storage,
    cache: Option<NodeCache>,
    counters: Arc<Counters>,
    /// The manifest's entry of every object: key -> (bytes, sha256).
    expected: HashMap<String, (u64, String)>,
    attempts: u32,
}

impl Fetcher {
    fn get(&self, key: &str) -> Result<bytes::Bytes, ShardError> {
        let attempts = self.attempts.max(1);
        let mut why = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tracing::warn!(key, reason = %why, attempt, attempts, "re-reading a shard object");
                std::thread::sleep(Duration::from_millis(200 << (attempt - 2).min(6)));
            }
            match self.get_once(key) {
                Ok(data) => return Ok(data),
                Err(ShardError::Storage(StorageError::NotFound { .. })) => {
                    why = "is missing".into();
                }
                Err(ShardError::BadObject { reason, .. }) => why = reason,
                Err(e) => return Err(e),
            }
        }
        Err(ShardError::BadObject {
            url: self.storage.describe(key),
            reason: why,
            attempts,
        })
    }

    /// One read (cache, else storage), checked; a cached copy that fails the check is evicted.
    fn get_once(&self, key: &str) -> Result<bytes::Bytes, ShardError> {
        if let Some(cache) = &self.cache {
            if let Some(b) = cache.get(key) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                match self.check(key, &b) {
                    Ok(()) => return Ok(b),
                    Err(reason) => {
                        tracing::warn!(key, reason, "evicting a damaged cached copy");
                        cache.remove(key);
                    }
                }
            } else {
                self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let data = self.storage.get(key)?;
        self.counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.check(key, &data)
            .map_err(|reason| ShardError::BadObject {
                url: self.storage.describe(key),
                reason,
                attempts: 1,
            })?;
        if let Some(cache) = &self.cache {
            cache.put(key, &data);
        }
        Ok(data)
    }

    /// Whether `data` is what the manifest says `key` holds (objects the manifest does not list pass).
    fn check(&self, key: &str, data: &[u8]) -> Result<(), String> {
        let Some((bytes, sha256)) = self.expected.get(key) else {
            return Ok(());
        };
        if data.len() as u64 != *bytes {
            return Err(format!(
                "holds {} bytes where the manifest says {bytes}",
                data.len()
            ));
        }
        use sha2::Digest;
        let actual = hex::encode(sha2::Sha256::digest(data));
        if &actual != sha256 {
            return Err(format!(
                "fails its sha256 check ({actual}, the manifest says {sha256})"
            ));
        }
        Ok(())
    }
}

enum Message {
    Batch(Box<Batch>),
    Failed(ShardError),
    /// The evaluation pass is complete.
    End,
}

/// Which samples each step holds, for this rank.
enum Plan {
    Train(SampleOrder),
    Eval(Vec<EvalBatch>),
}

impl Plan {
    /// The samples of `step` and which are real; `None` past the end of an evaluation pass.
    fn step(&self, step: u64, config: &LoaderConfig) -> Result<Option<EvalBatch>, ShardError> {
        match self {
            Plan::Train(order) => {
                let indices = order
                    .rank_slice(step, config.rank, config.world)
                    .map_err(|e| ShardError::InvalidConfig(e.to_string()))?;
                let valid = vec![true; indices.len()];
                Ok(Some(EvalBatch { indices, valid }))
            }
            Plan::Eval(batches) => Ok(usize::try_from(step)
                .ok()
                .and_then(|s| batches.get(s))
                .cloned()),
        }
    }
}

/// What the background thread reads and how.
struct Source {
    reader: StoreReader,
    fetcher: Fetcher,
    latents: Option<LatentArray>,
    shard_size: u64,
}

impl Source {
    fn read_shard(&self, split: Split, index: u64) -> Result<Shard, ShardError> {
        let fetch = |key: &str| self.fetcher.get(key);
        match &self.latents {
            Some(latents) => self
                .reader
                .read_latent_shard_with(split, index, latents, &fetch),
            None => self.reader.read_shard_with(split, index, &fetch),
        }
    }

    fn sample_shape(&self) -> [usize; 3] {
        sample_shape_of(&self.reader, self.latents.as_ref())
    }
}

/// `[C, H, W]` of one sample: the latents' when a latent model reads them, else one channel of the stored side.
fn sample_shape_of(reader: &StoreReader, latents: Option<&LatentArray>) -> [usize; 3] {
    match latents {
        Some(l) => l.sample_shape,
        None => {
            let t = reader.layout().image_size as usize;
            [1, t, t]
        }
    }
}

/// The loader: a background thread prepares batches; [`Loader::next_batch`] hands them out in order.
pub struct Loader {
    order: OrderConfig,
    next_step: u64,
    eval_steps: Option<u64>,
    sample_shape: [usize; 3],
    rx: mpsc::Receiver<Message>,
    counters: Arc<Counters>,
    stats: LoaderStats,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Loader {
    /// Stops the prefetch thread and waits for it, so nothing touches the cache after the loader is
    /// gone (a new loader on the same node then sees a settled cache).
    fn drop(&mut self) {
        let (_, closed) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, closed));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// A store's split opened for a loader: its reader, order, plan and latents, checked against the config.
struct Opened {
    reader: StoreReader,
    order: OrderConfig,
    plan: Plan,
    latents: Option<LatentArray>,
}

impl Opened {
    fn new(storage: &Storage, config: &LoaderConfig) -> Result<Self, ShardError> {
        let bad = |e: crate::order::OrderError| ShardError::InvalidConfig(e.to_string());
        check_world(config.global_batch, config.rank, config.world).map_err(bad)?;
        let reader = StoreReader::open(storage.clone())?;
        let order = reader.order_config(
            config.split,
            config.seed,
            config.window_shards,
            config.global_batch,
        );
        let plan = match config.pass {
            Pass::Train => Plan::Train(SampleOrder::new(order).map_err(bad)?),
            Pass::Eval => Plan::Eval(
                eval_batches(
                    order.samples,
                    config.global_batch,
                    config.rank,
                    config.world,
                )
                .map_err(bad)?,
            ),
        };
        let latents = match config.output {
            ModelInput::Latents => Some(reader.latents(config.split)?.ok_or_else(|| {
                ShardError::InvalidConfig(format!(
                    "the model reads latents, but {} has no {}/latents array; run `radit encode` first",
                    storage.url(),
                    config.split
                ))
            })?),
            ModelInput::U16 | ModelInput::Dequantised => None,
        };
        Ok(Self {
            reader,
            order,
            plan,
            latents,
        })
    }
}

impl Loader {
    /// What [`Loader::open`] checks of the store, without reading a shard or starting a thread: the world and
    /// batch, the split's sample order, the latents a latent model needs (their array and statistics). Returns the
    /// `[C, H, W]` of one sample. A launcher runs it before the ranks start (and before a Slurm queue).
    pub fn inspect(storage: &Storage, config: &LoaderConfig) -> Result<[usize; 3], ShardError> {
        let opened = Opened::new(storage, config)?;
        Ok(sample_shape_of(&opened.reader, opened.latents.as_ref()))
    }

    /// Opens the store's split and starts preparing batches from `start_step`.
    pub fn open(
        storage: Storage,
        config: LoaderConfig,
        start_step: u64,
    ) -> Result<Self, ShardError> {
        if start_step
            .checked_add(1 << 32)
            .and_then(|s| s.checked_mul(config.global_batch))
            .is_none()
        {
            return Err(ShardError::InvalidConfig(format!(
                "loader start step {start_step} is out of range"
            )));
        }
        let Opened {
            reader,
            order,
            plan,
            latents,
        } = Opened::new(&storage, &config)?;
        let eval_steps = match &plan {
            Plan::Eval(b) => Some(b.len() as u64),
            Plan::Train(_) => None,
        };
        let counters = Arc::new(Counters::default());
        let expected = reader
            .manifest()
            .objects
            .iter()
            .map(|o| (o.key.clone(), (o.bytes, o.sha256.clone())))
            .collect();
        let fetcher = Fetcher {
            storage,
            cache: config.cache.clone().map(NodeCache::open).transpose()?,
            counters: counters.clone(),
            expected,
            attempts: config.object_attempts,
        };
        let source = Source {
            reader,
            fetcher,
            latents,
            shard_size: order.shard_size,
        };
        let sample_shape = source.sample_shape();
        let (tx, rx) = mpsc::sync_channel(config.prefetch_steps.max(1));
        let worker = std::thread::Builder::new()
            .name(format!("radit-loader-{}", config.rank))
            .spawn(move || produce(source, plan, config, start_step, tx))
            .map_err(|e| ShardError::Internal(format!("cannot start the loader thread: {e}")))?;
        Ok(Self {
            order,
            next_step: start_step,
            eval_steps,
            sample_shape,
            rx,
            counters,
            stats: LoaderStats::default(),
            worker: Some(worker),
        })
    }

    /// The next batch, waiting for it if needed (the wait is measured). `None` once an evaluation pass is
    /// complete; training never ends.
    pub fn next_batch(&mut self) -> Result<Option<Batch>, ShardError> {
        if self.eval_steps.is_some_and(|n| self.next_step >= n) {
            return Ok(None);
        }
        let started = Instant::now();
        let msg = self
            .rx
            .recv()
            .map_err(|_| ShardError::Internal("the loader thread stopped".into()))?;
        let waited = started.elapsed();
        self.stats.wait += waited;
        self.stats.last_wait = waited;
        match msg {
            Message::Batch(b) => {
                self.stats.steps += 1;
                self.stats.skipped_samples += b.skipped;
                self.next_step = b.step + 1;
                Ok(Some(*b))
            }
            Message::Failed(e) => Err(e),
            Message::End => Ok(None),
        }
    }

    /// Steps in an evaluation pass (every rank runs this many); `None` in training.
    pub fn eval_steps(&self) -> Option<u64> {
        self.eval_steps
    }

    /// `[C, H, W]` of one sample.
    pub fn sample_shape(&self) -> [usize; 3] {
        self.sample_shape
    }

    /// The resume state: where the next call continues.
    pub fn state(&self) -> OrderState {
        OrderState {
            config: self.order,
            step: self.next_step,
        }
    }

    pub fn stats(&self) -> LoaderStats {
        LoaderStats {
            bytes_read: self.counters.bytes_read.load(Ordering::Relaxed),
            cache_hits: self.counters.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.counters.cache_misses.load(Ordering::Relaxed),
            ..self.stats
        }
    }
}

/// Decoded shards kept in memory: the current window's, so a step never decodes a shard twice.
struct ShardMemo {
    capacity: usize,
    shards: HashMap<u64, Arc<Shard>>,
    order: VecDeque<u64>,
}

impl ShardMemo {
    fn insert(&mut self, index: u64, shard: Arc<Shard>) {
        if self.shards.insert(index, shard).is_none() {
            self.order.push_back(index);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.shards.remove(&old);
            }
        }
    }
}

/// Shards fetched and decoded ahead of the step that needs them, as tasks on the decode threads (the rayon
/// pool): the reads of the next steps overlap the assembly of this one, and a cold read no longer leaves the cores
/// idle between steps.
struct ShardPrefetch {
    source: Arc<Source>,
    split: Split,
    shards: Arc<(Mutex<Reads>, Condvar)>,
}

/// By shard: `None` while in flight, then its result until a step takes it.
type Reads = HashMap<u64, Option<Result<Arc<Shard>, ShardError>>>;

impl ShardPrefetch {
    fn new(source: Arc<Source>, split: Split) -> Self {
        Self {
            source,
            split,
            shards: Arc::new((Mutex::new(HashMap::new()), Condvar::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reads> {
        self.shards.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts reading `shard` unless it is already in flight or read.
    fn request(&self, shard: u64) {
        {
            let mut map = self.lock();
            if map.contains_key(&shard) {
                return;
            }
            map.insert(shard, None);
        }
        let (source, split, shards) = (self.source.clone(), self.split, self.shards.clone());
        rayon::spawn(move || {
            let read = source.read_shard(split, shard).map(Arc::new);
            let (map, ready) = &*shards;
            map.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(shard, Some(read));
            ready.notify_all();
        });
    }

    /// `shard`'s read, waiting for it (and starting it if nobody asked yet).
    fn take(&self, shard: u64) -> Result<Arc<Shard>, ShardError> {
        self.request(shard);
        let (_, ready) = &*self.shards;
        let mut map = self.lock();
        loop {
            if let Some(Some(_)) = map.get(&shard)
                && let Some(Some(read)) = map.remove(&shard)
            {
                return read;
            }
            map = ready.wait(map).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for the reads in flight, so none touches the node cache after the loader is gone.
    fn settle(&self) {
        let (_, ready) = &*self.shards;
        let mut map = self.lock();
        while map.values().any(Option::is_none) {
            map = ready.wait(map).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn produce(
    source: Source,
    plan: Plan,
    config: LoaderConfig,
    start_step: u64,
    tx: mpsc::SyncSender<Message>,
) {
    let mut memo = ShardMemo {
        capacity: (2 * config.window_shards as usize).max(4),
        shards: HashMap::new(),
        order: VecDeque::new(),
    };
    let source = Arc::new(source);
    let prefetch = ShardPrefetch::new(source.clone(), config.split);
    // The samples of this step and of the next `prefetch_steps`, whose shards are read ahead.
    let lookahead = config.prefetch_steps.max(1) as u64;
    let mut planned: VecDeque<(u64, Result<Option<EvalBatch>, ShardError>)> = VecDeque::new();
    for step in start_step.. {
        let horizon = planned.back().map_or(step, |(s, _)| s + 1);
        for ahead in horizon..=step.saturating_add(lookahead) {
            let samples = plan.step(ahead, &config);
            if let Ok(Some(batch)) = &samples {
                let mut seen = std::collections::HashSet::new();
                for shard in batch.indices.iter().map(|i| i / source.shard_size) {
                    if seen.insert(shard) && !memo.shards.contains_key(&shard) {
                        prefetch.request(shard);
                    }
                }
            }
            planned.push_back((ahead, samples));
        }
        let samples = match planned.pop_front() {
            Some((_, samples)) => samples,
            None => plan.step(step, &config),
        };
        let msg = match samples {
            Ok(Some(samples)) => {
                match build_batch(&source, &prefetch, &config, &mut memo, step, samples) {
                    Ok(b) => Message::Batch(Box::new(b)),
                    Err(e) => Message::Failed(e),
                }
            }
            Ok(None) => Message::End,
            Err(e) => Message::Failed(e),
        };
        let last = !matches!(msg, Message::Batch(_));
        if tx.send(msg).is_err() || last {
            // The consumer is gone, or told about the failure or the end.
            prefetch.settle();
            return;
        }
    }
}

fn build_batch(
    source: &Source,
    prefetch: &ShardPrefetch,
    config: &LoaderConfig,
    memo: &mut ShardMemo,
    step: u64,
    samples: EvalBatch,
) -> Result<Batch, ShardError> {
    let shard_size = source.shard_size;
    // The shards this step touches: from the memo, or read whole (most already read ahead, the rest now, all in
    // parallel).
    let mut shards: HashMap<u64, Arc<Shard>> = HashMap::new();
    let mut needed = Vec::new();
    for s in samples.indices.iter().map(|i| i / shard_size) {
        if shards.contains_key(&s) || needed.contains(&s) {
            continue;
        }
        match memo.shards.get(&s) {
            Some(shard) => {
                shards.insert(s, shard.clone());
            }
            None => needed.push(s),
        }
    }
    needed.iter().for_each(|&s| prefetch.request(s));
    for s in needed {
        match prefetch.take(s) {
            Ok(shard) => {
                memo.insert(s, shard.clone());
                shards.insert(s, shard);
            }
            Err(e) if config.skip_bad_shards => {
                tracing::warn!(shard = s, error = %e, "skipping an unreadable shard")
            }
            Err(e) => return Err(e),
        }
    }
    let sample_shape = source.sample_shape();
    let per: usize = sample_shape.iter().product();
    let n = samples.indices.len();
    let mut out_idx = Vec::with_capacity(n);
    let mut valid = Vec::with_capacity(n);
    let mut rows: Vec<(&Shard, usize)> = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n * NUM_LABELS);
    let mut age = Vec::with_capacity(n);
    let mut image_ids = Vec::with_capacity(n);
    let mut skipped = 0;
    // In training, a skipped sample's place goes to the rank's readable samples in turn, so every rank keeps its
    // batch size (the ranks' batches stay the same shape; a rank with none readable gets an empty batch).
    let readable: Vec<(u64, bool)> = samples
        .indices
        .iter()
        .zip(&samples.valid)
        .filter(|(i, _)| shards.contains_key(&(**i / shard_size)))
        .map(|(&i, &v)| (i, v))
        .collect();
    let refill = matches!(config.pass, Pass::Train) && !readable.is_empty();
    let mut spare = readable.iter().cycle();
    for (&i, &real) in samples.indices.iter().zip(&samples.valid) {
        let (i, real) = if shards.contains_key(&(i / shard_size)) {
            (i, real)
        } else {
            skipped += 1;
            match spare.next().filter(|_| refill) {
                Some(&stand_in) => stand_in,
                None => continue,
            }
        };
        let Some(shard) = shards.get(&(i / shard_size)) else {
            continue;
        };
        let r = (i % shard_size) as usize;
        out_idx.push(i);
        valid.push(real);
        rows.push((shard, r));
        labels.extend_from_slice(&shard.labels[r * NUM_LABELS..(r + 1) * NUM_LABELS]);
        age.push(shard.age[r]);
        image_ids.push(shard.image_ids[r].clone());
    }
    // Copying (and dequantising) the inputs is the bulk of the work after decoding: one sample per task.
    let inputs = match config.output {
        ModelInput::U16 => {
            let mut out = batch_buffer::<u16>(rows.len() * per);
            out.par_chunks_mut(per.max(1))
                .zip(&rows)
                .for_each(|(dst, (shard, r))| {
                    dst.copy_from_slice(&shard.images[r * per..(r + 1) * per])
                });
            Inputs::U16(out)
        }
        ModelInput::Dequantised => {
            let mut out = batch_buffer::<f32>(rows.len() * per);
            out.par_chunks_mut(per.max(1))
                .zip(rows.par_iter().zip(&out_idx))
                .for_each(|(dst, ((shard, r), &index))| {
                    dequantise(
                        &shard.images[r * per..(r + 1) * per],
                        dst,
                        config.seed,
                        step,
                        index,
                    )
                });
            Inputs::F32(out)
        }
        ModelInput::Latents => {
            let mut out = batch_buffer::<f32>(rows.len() * per);
            out.par_chunks_mut(per.max(1))
                .zip(&rows)
                .for_each(|(dst, (shard, r))| {
                    dst.copy_from_slice(&shard.latents[r * per..(r + 1) * per])
                });
            Inputs::F32(out)
        }
    };
    Ok(Batch {
        step,
        indices: out_idx,
        valid,
        sample_shape,
        inputs,
        labels,
        age,
        image_ids,
        skipped,
    })
}

/// A zeroed buffer for a batch's inputs (tens of MB, fresh each step), asking the kernel for transparent huge
/// pages: its first touch then faults 2 MiB at a time instead of 4 KiB (perf: page faults were a fifth of a
/// step's CPU). Only advice: where huge pages are off or unavailable, nothing changes.
fn batch_buffer<T: Clone + Default>(len: usize) -> Vec<T> {
    let out = vec![T::default(); len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, bytes) = (out.as_ptr() as usize, std::mem::size_of_val(&out[..]));
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: advice on whole pages inside this Vec's own allocation; it changes no contents or
            // mapping, and its result is ignored (advice the kernel may refuse).
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    out
}

/// x = 2(n+u)/65536 - 1 with u ~ U[0,1) from a stream derived from (seed, step, sample index): fresh every step,
/// reproduced on resume, and the same whichever rank (of whatever world size) holds the sample.
fn dequantise(raw: &[u16], out: &mut [f32], seed: u64, step: u64, index: u64) {
    let rng = SplitMix64::stream(&[seed, step, index, 0xde9a]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { dequantise_avx2(raw, out, &rng) };
    }
    dequantise_with(raw, out, &rng)
}

/// The same loop compiled for AVX2: the draws are independent (`draw_at`), so it runs four pairs per lane group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantise_avx2(raw: &[u16], out: &mut [f32], rng: &SplitMix64) {
    dequantise_with(raw, out, rng)
}

#[inline(always)]
fn dequantise_with(raw: &[u16], out: &mut [f32], rng: &SplitMix64) {
    const SCALE: f32 = 2.0 / 65536.0;
    const UNIT: f32 = 1.0 / (1u32 << 24) as f32;
    // Two 24-bit uniforms per 64-bit draw. Each is below 2^24, so its conversion through i32 is exact (and has a
    // vector instruction, where u64 -> f32 has none).
    let pairs = (raw.len().min(out.len()) / 2) as u64;
    let mut pairs_raw = raw.chunks_exact(2);
    let mut pairs_out = out.chunks_exact_mut(2);
    for (k, (n, x)) in (&mut pairs_raw).zip(&mut pairs_out).enumerate() {
        let bits = rng.draw_at(k as u64);
        let u0 = (bits >> 40) as i32 as f32 * UNIT;
        let u1 = ((bits >> 8) & 0xff_ffff) as i32 as f32 * UNIT;
        x[0] = (f32::from(n[0]) + u0) * SCALE - 1.0;
        x[1] = (f32::from(n[1]) + u1) * SCALE - 1.0;
    }
    if let ([n], [x]) = (pairs_raw.remainder(), pairs_out.into_remainder()) {
        let u = (rng.draw_at(pairs) >> 40) as i32 as f32 * UNIT;
        *x = (f32::from(*n) + u) * SCALE - 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dequantisation as first written: one sequential stream, two uniforms per draw, the odd pixel's own draw.
    fn sequential(raw: &[u16], seed: u64, step: u64, index: u64) -> Vec<f32> {
        let mut rng = SplitMix64::stream(&[seed, step, index, 0xde9a]);
        let mut out = vec![0f32; raw.len()];
        let mut i = 0;
        while i + 1 < raw.len() {
            let bits = rng.next_u64();
            let u0 = (bits >> 40) as f32 / (1u64 << 24) as f32;
            let u1 = ((bits >> 8) & 0xff_ffff) as f32 / (1u64 << 24) as f32;
            out[i] = (f32::from(raw[i]) + u0) * (2.0 / 65536.0) - 1.0;
            out[i + 1] = (f32::from(raw[i + 1]) + u1) * (2.0 / 65536.0) - 1.0;
            i += 2;
        }
        if i < raw.len() {
            out[i] = (f32::from(raw[i]) + rng.unit_f32()) * (2.0 / 65536.0) - 1.0;
        }
        out
    }

    #[test]
    fn dequantisation_is_bit_identical_to_the_sequential_stream_on_every_path() {
        let mut pixels = SplitMix64::new(5);
        for len in [0usize, 1, 2, 7, 64, 1001, 4096] {
            let raw: Vec<u16> = (0..len).map(|_| pixels.next_u64() as u16).collect();
            let want = sequential(&raw, 11, 3, 77);
            let mut got = vec![f32::NAN; len];
            dequantise(&raw, &mut got, 11, 3, 77);
            let mut portable = vec![f32::NAN; len];
            dequantise_with(
                &raw,
                &mut portable,
                &SplitMix64::stream(&[11, 3, 77, 0xde9a]),
            );
            for (w, (g, p)) in want.iter().zip(got.iter().zip(&portable)) {
                assert_eq!(w.to_bits(), g.to_bits(), "length {len}");
                assert_eq!(w.to_bits(), p.to_bits(), "length {len}");
            }
        }
    }
}
