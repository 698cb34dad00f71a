//! `radit shard`: table + images -> Zarr v3 store on object storage, resumable, with `manifest.json` last.
//!
//! Each split's accepted rows, in table order, fill shards of S images. Decoding runs on all cores (rayon); a writer
//! thread encodes each finished shard on the same pool, so encoding overlaps the next shard's decoding, then uploads
//! it (one object per array) and its journal record under `.ingest/journal/`.
//! A journal record is the commit point of a shard: a re-run with the same table and settings skips every committed
//! shard and continues with the next row, so no row is duplicated or dropped. The manifest is written after every
//! shard and all `zarr.json` files, so a store without it is visibly incomplete.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zarrs::array::{Array, IntoArrayBytes};
use zarrs::storage::store::MemoryStore;

use crate::error::ShardError;
use crate::image::{ImageNotes, preprocess};
use crate::layout::{ArrayKind, StoreLayout, array_metadata_json, array_path, group_metadata_json};
use crate::manifest::{
    Counts, FORMAT, ImageNoteCounts, IngestSettings, MANIFEST_KEY, Manifest, ObjectEntry, Source,
    SplitCounts,
};
use crate::schema::{NUM_LABELS, SCHEMA_VERSION, Vocabulary};
use crate::split::Split;
use crate::store::Storage;
use crate::table::{Rejection, Table, TableRow, read_table};

const SETTINGS_KEY: &str = ".ingest/settings.json";
const MISSING_IMAGE: &str = "image file not found";
const JOURNAL_PREFIX: &str = ".ingest/journal";

/// Options of one ingest run that do not change the store's bytes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Decode threads (default: all cores).
    pub threads: Option<usize>,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Stop after committing this many new shards (tests use it to simulate an interrupted ingest).
    pub stop_after_shards: Option<u64>,
    /// Counters for a metrics exporter (the Pushgateway pusher of `radit shard`).
    pub metrics: Option<Arc<IngestProgress>>,
}

/// How far an ingest is: rows of the table, rows done (committed in shards, rejected rows included, an earlier run's
/// included), shards and bytes this run committed. `radit shard` pushes them as `radit_ingest_*` (the names and
/// the text are `radit_monitoring::metrics`').
#[derive(Debug, Default)]
pub struct IngestProgress {
    pub rows_total: AtomicU64,
    pub rows_done: AtomicU64,
    pub rows_rejected: AtomicU64,
    pub shards_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// 1 once the manifest is written.
    pub complete: AtomicU64,
}

/// The outcome of [`ingest`].
#[derive(Debug)]
pub enum IngestOutcome {
    /// The store is complete; `resumed_shards` were already committed by an earlier run.
    Complete {
        manifest: Box<Manifest>,
        resumed_shards: u64,
        written_shards: u64,
    },
    /// Stopped on request before finishing; re-run to continue.
    Interrupted { written_shards: u64 },
}

/// A committed shard (or, for trailing rejections of a split, a record with no chunk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JournalRecord {
    split: Split,
    seq: u64,
    chunk: Option<u64>,
    rows: u64,
    /// Index (in this split's candidate rows) just past the last row this record covers.
    candidates_end: u64,
    /// `image_id` of the candidate at `candidates_end - 1`: checked on resume, so a cursor that no longer points at
    /// the same row is an error instead of a silent duplicate or gap.
    last_image_id: String,
    rejected: Vec<Rejection>,
    notes: ImageNoteCounts,
    objects: Vec<ObjectEntry>,
}

impl JournalRecord {
    fn key(split: Split, seq: u64) -> String {
        format!("{JOURNAL_PREFIX}/{}/{seq:08}.json", split.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SettingsRecord {
    fingerprint: String,
    settings: IngestSettings,
    table_sha256: String,
}

fn fingerprint(table_sha256: &str, settings: &IngestSettings) -> String {
    let mut h = Sha256::new();
    // The version is part of it: another version may validate or split rows differently, which would shift the
    // resume cursor.
    h.update(
        format!(
            "schema {SCHEMA_VERSION}; radit {}",
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );
    h.update(table_sha256.as_bytes());
    h.update(serde_json::to_vec(settings).expect("settings serialise"));
    hex::encode(h.finalize())
}

/// Ingests `table_path` + `images_dir` into the store at `out_url`.
pub fn ingest(
    table_path: &Path,
    images_dir: &Path,
    out_url: &str,
    settings: &IngestSettings,
    opts: &RunOptions,
) -> Result<IngestOutcome, ShardError> {
    settings
        .table
        .encoding
        .validate()
        .map_err(ShardError::InvalidConfig)?;
    settings
        .table
        .split
        .validate()
        .map_err(ShardError::InvalidConfig)?;
    settings
        .layout
        .validate()
        .map_err(ShardError::InvalidConfig)?;
    if !images_dir.is_dir() {
        return Err(ShardError::ReadInput {
            path: images_dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "images root is not a directory",
            ),
        });
    }
    let table = read_table(table_path, &settings.table)?;
    let storage = Storage::open(out_url)?;
    let fp = fingerprint(&table.sha256, settings);

    if let Some(bytes) = storage.get_opt(MANIFEST_KEY)? {
        let existing: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ShardError::InvalidStore {
                url: storage.url().to_string(),
                problem: format!("has an unreadable manifest.json: {e}"),
            })?;
        if existing.fingerprint != fp {
            return Err(ShardError::Conflict {
                url: storage.url().to_string(),
                what: "table or settings".into(),
            });
        }
        tracing::info!(url = storage.url(), "store is already complete");
        let shards = existing.counts.splits.values().map(|s| s.shards).sum();
        return Ok(IngestOutcome::Complete {
            manifest: Box::new(existing),
            resumed_shards: shards,
            written_shards: 0,
        });
    }
    claim_output(&storage, &fp, settings, &table)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .thread_name(|i| format!("radit-ingest-{i}"))
        .build()
        .map_err(|e| ShardError::InvalidConfig(format!("threads: {e}")))?;
    let mut journal = load_journal(&storage)?;
    let resumed: u64 = journal.values().map(|r| r.len() as u64).sum();
    if resumed > 0 {
        tracing::info!(
            url = storage.url(),
            records = resumed,
            "resuming an interrupted ingest"
        );
    }

    let candidates: BTreeMap<Split, Vec<&TableRow>> = Split::ALL
        .iter()
        .map(|s| (*s, table.rows.iter().filter(|r| r.split == *s).collect()))
        .collect();
    let done: u64 = journal
        .values()
        .flatten()
        .map(|r| r.rows + r.rejected.len() as u64)
        .sum();
    let bar = progress_bar(opts.progress, table.rows.len() as u64, done);
    let metrics = opts.metrics.clone().unwrap_or_default();
    metrics
        .rows_total
        .store(table.rows.len() as u64, Ordering::Relaxed);
    metrics.rows_done.store(done, Ordering::Relaxed);

    let pool = Arc::new(pool);
    let (tx, rx) = mpsc::sync_channel::<PendingShard>(2);
    let writer_storage = storage.clone();
    let writer_bar = bar.clone();
    let writer_metrics = metrics.clone();
    let writer_pool = pool.clone();
    let writer = std::thread::Builder::new()
        .name("radit-shard-writer".into())
        .spawn(move || {
            write_shards(
                &writer_storage,
                &writer_pool,
                rx,
                &writer_bar,
                &writer_metrics,
            )
        })
        .map_err(|e| ShardError::InvalidConfig(format!("cannot start the writer thread: {e}")))?;

    let mut producer = Producer {
        pool: &pool,
        images_dir,
        layout: &settings.layout,
        dicom: &settings.dicom,
        tx: &tx,
        budget: opts.stop_after_shards,
    };
    // Ok(false): stopped early (the shard budget ran out, or the writer failed and reports why).
    // This loop runs on the calling thread, never inside the pool: it blocks on the writer's channel, and the
    // writer needs pool threads to encode, so blocking a pool thread here could deadlock a small pool.
    let finished = (|| -> Result<bool, ShardError> {
        for split in Split::ALL {
            let records = journal.entry(split).or_default();
            let cursor = records.last().map_or(0, |r| r.candidates_end);
            let mut next = SplitCursor {
                split,
                seq: records.len() as u64,
                chunk: records.iter().filter(|r| r.chunk.is_some()).count() as u64,
                cursor,
            };
            let rows = &candidates[&split];
            if let Some(last) = records.last() {
                let at = (last.candidates_end as usize)
                    .checked_sub(1)
                    .and_then(|i| rows.get(i));
                if at.map(|r| r.image_id.as_str()) != Some(last.last_image_id.as_str()) {
                    return Err(ShardError::Conflict {
                        url: storage.url().to_string(),
                        what: format!(
                            "rows: the {split} journal ends at image_id '{}', which this table does not have at that position",
                            last.last_image_id
                        ),
                    });
                }
            }
            let template = Arc::new(SplitArrays::new(
                &settings.layout,
                split,
                rows.len() as u64,
            )?);
            let _span = tracing::info_span!("ingest_split", split = %split).entered();
            if !producer.split(rows, &template, &mut next)? {
                return Ok(false);
            }
        }
        Ok(true)
    })();
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| ShardError::Internal("the shard writer thread panicked".into()))?;
    bar.finish_and_clear();
    // A writer error explains a failed send, so it takes precedence.
    let written = written?;
    let finished = finished?;
    let written_shards = written.len() as u64;
    for r in written {
        journal.entry(r.split).or_default().push(r);
    }
    if !finished {
        return Ok(IngestOutcome::Interrupted { written_shards });
    }
    let manifest = finalise(&storage, &table, images_dir, settings, &fp, &journal)?;
    metrics.complete.store(1, Ordering::Relaxed);
    Ok(IngestOutcome::Complete {
        manifest: Box::new(manifest),
        resumed_shards: resumed,
        written_shards,
    })
}

/// One timed pass of ingest's per-image work alone ([`measure_ceiling`]).
#[derive(Debug, Clone)]
pub struct IngestCeiling {
    /// Images decoded and stored (files that cannot be read or decoded are left out, as ingest rejects them).
    pub images: u64,
    pub shards: u64,
    /// Compressed bytes of the pixel blocks: what the store's images arrays hold.
    pub stored_bytes: u64,
    pub elapsed: std::time::Duration,
}

impl IngestCeiling {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The ceiling `radit shard` is measured against: read every image file the table names, decode, normalise and
/// letterbox it, and compress each shard's pixel block with the store's codec, on `threads` threads (all cores
/// by default), and nothing else: no checks beyond parsing the table (done before the clock starts), no labels,
/// journal, hashing or writes. Images are grouped by split into shards as ingest groups them, so the compressed
/// blocks are the bytes ingest stores.
pub fn measure_ceiling(
    table_path: &Path,
    images_dir: &Path,
    settings: &IngestSettings,
    threads: Option<usize>,
) -> Result<IngestCeiling, ShardError> {
    settings
        .layout
        .validate()
        .map_err(ShardError::InvalidConfig)?;
    let table = read_table(table_path, &settings.table)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|i| format!("radit-ingest-{i}"))
        .build()
        .map_err(|e| ShardError::InvalidConfig(format!("threads: {e}")))?;
    let layout = &settings.layout;
    let (s, pixels) = (
        layout.shard_images as usize,
        (layout.image_size as usize).pow(2),
    );
    let started = std::time::Instant::now();
    let (mut images, mut shards, mut stored_bytes) = (0u64, 0u64, 0u64);
    for split in Split::ALL {
        let rows: Vec<&TableRow> = table.rows.iter().filter(|r| r.split == split).collect();
        let array = layout.array(
            split,
            ArrayKind::Images,
            rows.len().div_ceil(s).max(1) as u64 * s as u64,
        )?;
        let decoded: Vec<Vec<u16>> = pool.install(|| {
            rows.par_iter()
                .map_init(fast_image_resize::Resizer::new, |resizer, row| {
                    let bytes = std::fs::read(images_dir.join(&row.path)).ok()?;
                    preprocess(&bytes, layout.image_size, resizer, &settings.dicom)
                        .ok()
                        .map(|(img, _)| img)
                })
                .flatten()
                .collect()
        });
        let sizes: Vec<u64> = pool.install(|| {
            decoded
                .par_chunks(s)
                .enumerate()
                .map(|(k, block)| {
                    let data = pixel_block(block, s * pixels)
                        .into_array_bytes(array.data_type())
                        .map_err(|e| ShardError::Encode {
                            what: ArrayKind::Images.name().into(),
                            reason: e.to_string(),
                        })?;
                    Ok(layout.encode_chunk(&array, k as u64, data)?.1.len() as u64)
                })
                .collect::<Result<_, ShardError>>()
        })?;
        images += decoded.len() as u64;
        shards += sizes.len() as u64;
        stored_bytes += sizes.iter().sum::<u64>();
    }
    Ok(IngestCeiling {
        images,
        shards,
        stored_bytes,
        elapsed: started.elapsed(),
    })
}

/// A shard's images joined into one block of `total` pixels, the unfilled rest black (the array's fill value).
fn pixel_block(images: &[Vec<u16>], total: usize) -> Vec<u16> {
    let mut block = Vec::with_capacity(total);
    images.iter().for_each(|img| block.extend_from_slice(img));
    block.resize(total, 0);
    block
}

fn progress_bar(enabled: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} ingest [{bar:40}] {pos}/{len} rows {per_sec} eta {eta}",
        )
        .expect("static template is valid")
        .progress_chars("=> "),
    );
    bar.set_position(done);
    bar
}

/// Writes the settings record, or checks that an interrupted run used the same table and settings.
fn claim_output(
    storage: &Storage,
    fp: &str,
    settings: &IngestSettings,
    table: &Table,
) -> Result<(), ShardError> {
    let existing = storage.get_opt(SETTINGS_KEY)?;
    if let Some(bytes) = existing {
        let previous: SettingsRecord =
            serde_json::from_slice(&bytes).map_err(|e| ShardError::InvalidStore {
                url: storage.url().to_string(),
                problem: format!("has an unreadable {SETTINGS_KEY}: {e}"),
            })?;
        if previous.fingerprint != fp {
            let what = if previous.table_sha256 != table.sha256 {
                "table contents"
            } else {
                "settings"
            };
            return Err(ShardError::Conflict {
                url: storage.url().to_string(),
                what: what.into(),
            });
        }
        return Ok(());
    }
    let record = SettingsRecord {
        fingerprint: fp.to_string(),
        settings: settings.clone(),
        table_sha256: table.sha256.clone(),
    };
    let json = serde_json::to_vec_pretty(&record).expect("settings serialise");
    Ok(storage.put(SETTINGS_KEY, Bytes::from(json))?)
}

fn load_journal(storage: &Storage) -> Result<BTreeMap<Split, Vec<JournalRecord>>, ShardError> {
    let mut journal: BTreeMap<Split, Vec<JournalRecord>> = BTreeMap::new();
    let keys = storage.list(JOURNAL_PREFIX)?;
    for (key, got) in keys.iter().zip(storage.get_many(&keys)) {
        let record: JournalRecord =
            serde_json::from_slice(&got?).map_err(|e| ShardError::InvalidStore {
                url: storage.describe(key),
                problem: format!(
                    "journal record is unreadable ({e}); remove the output and ingest again"
                ),
            })?;
        journal.entry(record.split).or_default().push(record);
    }
    for (split, records) in &mut journal {
        records.sort_by_key(|r| r.seq);
        // Records are committed in order by one writer, so the committed ones form a prefix 0..k.
        let contiguous = records
            .iter()
            .enumerate()
            .take_while(|(i, r)| r.seq == *i as u64)
            .count();
        if contiguous != records.len() {
            tracing::warn!(split = %split, kept = contiguous, "ignoring journal records after a gap");
            records.truncate(contiguous);
        }
    }
    Ok(journal)
}

/// Template arrays of one split, used only to encode chunks and name their keys.
struct SplitArrays {
    layout: StoreLayout,
    arrays: Vec<(ArrayKind, Array<MemoryStore>)>,
}

impl SplitArrays {
    fn new(layout: &StoreLayout, split: Split, rows: u64) -> Result<Self, ShardError> {
        let s = u64::from(layout.shard_images);
        let capacity = rows.div_ceil(s).max(1) * s;
        let arrays = ArrayKind::ALL
            .iter()
            .map(|k| Ok((*k, layout.array(split, *k, capacity)?)))
            .collect::<Result<_, ShardError>>()?;
        Ok(Self {
            layout: layout.clone(),
            arrays,
        })
    }
}

struct SplitCursor {
    split: Split,
    seq: u64,
    chunk: u64,
    cursor: u64,
}

struct Item {
    candidate: u64,
    outcome: Result<(Vec<u16>, ImageNotes), Rejection>,
}

/// The decode side: turns candidate rows into shards for the writer.
struct Producer<'a> {
    pool: &'a rayon::ThreadPool,
    images_dir: &'a Path,
    layout: &'a StoreLayout,
    dicom: &'a radit_dicom::DicomOptions,
    tx: &'a mpsc::SyncSender<PendingShard>,
    /// Shards still allowed in this run (`None`: no limit).
    budget: Option<u64>,
}

impl Producer<'_> {
    /// Decodes the rows of one split from the cursor on and sends finished shards to the writer.
    /// Returns false when the shard budget ran out or the writer stopped.
    fn split(
        &mut self,
        rows: &[&TableRow],
        arrays: &Arc<SplitArrays>,
        next: &mut SplitCursor,
    ) -> Result<bool, ShardError> {
        let (pool, images_dir, dicom) = (self.pool, self.images_dir, self.dicom);
        let s = self.layout.shard_images as usize;
        let target = self.layout.image_size;
        let total = rows.len() as u64;
        let mut pending: VecDeque<Item> = VecDeque::new();
        let mut decoded_to = next.cursor;
        loop {
            let accepted = pending.iter().filter(|i| i.outcome.is_ok()).count();
            let exhausted = decoded_to >= total;
            if accepted < s && !exhausted {
                let end = (decoded_to + s as u64).min(total);
                let block: Vec<Item> = pool.install(|| {
                    (decoded_to..end)
                        .into_par_iter()
                        .map_init(fast_image_resize::Resizer::new, |resizer, c| {
                            let outcome =
                                load_image(rows[c as usize], images_dir, target, resizer, dicom)?;
                            Ok(Item {
                                candidate: c,
                                outcome,
                            })
                        })
                        .collect::<Result<_, ShardError>>()
                })?;
                // A wrong images root would otherwise give a "complete" store with every row rejected.
                if next.cursor == 0 && next.seq == 0 && decoded_to == 0 && block.len() >= 4 {
                    let missing =
                        |i: &Item| matches!(&i.outcome, Err(r) if r.reason == MISSING_IMAGE);
                    if block.iter().all(missing) {
                        let reason = format!(
                            "none of the first {} images of the {} split exist under it: is this the images root?",
                            block.len(),
                            next.split
                        );
                        return Err(ShardError::ReadInput {
                            path: images_dir.to_path_buf(),
                            source: std::io::Error::new(std::io::ErrorKind::NotFound, reason),
                        });
                    }
                }
                pending.extend(block);
                decoded_to = end;
                continue;
            }
            if pending.is_empty() {
                return Ok(true);
            }
            if self.budget == Some(0) {
                return Ok(false);
            }
            // Take items up to and including the S-th accepted one (or everything at the end of the split).
            let mut take = 0;
            let mut seen = 0;
            while take < pending.len() && seen < s {
                if pending[take].outcome.is_ok() {
                    seen += 1;
                }
                take += 1;
            }
            let items: Vec<Item> = pending.drain(..take).collect();
            if self
                .tx
                .send(collect_shard(items, rows, arrays, next))
                .is_err()
            {
                // The writer stopped on an error; it reports it.
                return Ok(false);
            }
            if let Some(b) = &mut self.budget {
                *b -= 1;
            }
        }
    }
}

fn load_image(
    row: &TableRow,
    images_dir: &Path,
    target: u32,
    resizer: &mut fast_image_resize::Resizer,
    dicom: &radit_dicom::DicomOptions,
) -> Result<Result<(Vec<u16>, ImageNotes), Rejection>, ShardError> {
    let path: PathBuf = images_dir.join(&row.path);
    let reject = |reason: String| Rejection {
        line: row.line,
        image_id: Some(row.image_id.clone()),
        file: Some(path.display().to_string()),
        reason,
    };
    use std::io::ErrorKind::{IsADirectory, NotFound, PermissionDenied};
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == NotFound => return Ok(Err(reject(MISSING_IMAGE.into()))),
        // Problems of this one file: reject the row.
        Err(e) if matches!(e.kind(), PermissionDenied | IsADirectory) => {
            return Ok(Err(reject(format!("cannot read image file: {e}"))));
        }
        // Anything else (EIO, stale handles, too many open files) says nothing about the row: stop, so a retry
        // reads it instead of the row being dropped for good.
        Err(source) => return Err(ShardError::InputIo { path, source }),
    };
    Ok(preprocess(&bytes, target, resizer, dicom).map_err(|p| reject(p.to_string())))
}

/// A shard's rows gathered on the decode side; encoding happens on the writer side so it overlaps decoding.
struct PendingShard {
    arrays: Arc<SplitArrays>,
    /// The journal record without its objects (filled in by [`PendingShard::encode`]).
    record: JournalRecord,
    /// One block per accepted image; joined into the shard's pixel block by [`PendingShard::encode`], on the
    /// pool, so the copy overlaps decoding the next shard instead of holding up the producer.
    images: Vec<Vec<u16>>,
    labels: Vec<u8>,
    ages: Vec<f32>,
    image_ids: Vec<String>,
    patient_ids: Vec<String>,
}

struct EncodedShard {
    record: JournalRecord,
    objects: Vec<(String, Bytes)>,
}

fn collect_shard(
    items: Vec<Item>,
    rows: &[&TableRow],
    arrays: &Arc<SplitArrays>,
    next: &mut SplitCursor,
) -> PendingShard {
    let s = arrays.layout.shard_images as usize;
    let candidates_end = items.last().map_or(next.cursor, |i| i.candidate + 1);
    let mut rejected = Vec::new();
    let mut notes = ImageNoteCounts::default();
    let mut images = Vec::with_capacity(s);
    let mut labels = Vec::with_capacity(s * NUM_LABELS);
    let mut ages = Vec::with_capacity(s);
    let mut image_ids = Vec::with_capacity(s);
    let mut patient_ids = Vec::with_capacity(s);
    for item in items {
        match item.outcome {
            Err(r) => rejected.push(r),
            Ok((img, n)) => {
                let row = rows[item.candidate as usize];
                images.push(img);
                labels.extend_from_slice(&row.labels);
                ages.push(row.age);
                image_ids.push(row.image_id.clone());
                patient_ids.push(row.patient_id.clone());
                notes.count(&n);
            }
        }
    }
    let count = ages.len();
    let chunk = (count > 0).then_some(next.chunk);
    let last_image_id = candidates_end
        .checked_sub(1)
        .map_or(String::new(), |i| rows[i as usize].image_id.clone());
    let record = JournalRecord {
        split: next.split,
        seq: next.seq,
        chunk,
        rows: count as u64,
        candidates_end,
        last_image_id,
        rejected,
        notes,
        objects: Vec::new(),
    };
    next.seq += 1;
    next.chunk += u64::from(chunk.is_some());
    next.cursor = candidates_end;
    PendingShard {
        arrays: arrays.clone(),
        record,
        images,
        labels,
        ages,
        image_ids,
        patient_ids,
    }
}

impl PendingShard {
    /// Pads to a whole shard with each array's fill value and encodes one object per array.
    fn encode(self) -> Result<EncodedShard, ShardError> {
        let PendingShard {
            arrays,
            mut record,
            images,
            mut labels,
            mut ages,
            mut image_ids,
            mut patient_ids,
        } = self;
        let Some(index) = record.chunk else {
            return Ok(EncodedShard {
                record,
                objects: Vec::new(),
            });
        };
        let s = arrays.layout.shard_images as usize;
        let mut images = pixel_block(&images, s * (arrays.layout.image_size as usize).pow(2));
        labels.resize(s * NUM_LABELS, 0);
        ages.resize(s, f32::NAN);
        image_ids.resize(s, String::new());
        patient_ids.resize(s, String::new());
        let mut objects = Vec::with_capacity(arrays.arrays.len());
        for (kind, array) in &arrays.arrays {
            let dt = array.data_type();
            let data = match kind {
                ArrayKind::Images => std::mem::take(&mut images).into_array_bytes(dt),
                ArrayKind::Labels => std::mem::take(&mut labels).into_array_bytes(dt),
                ArrayKind::Age => std::mem::take(&mut ages).into_array_bytes(dt),
                ArrayKind::ImageId => std::mem::take(&mut image_ids).into_array_bytes(dt),
                ArrayKind::PatientId => std::mem::take(&mut patient_ids).into_array_bytes(dt),
            }
            .map_err(|e| ShardError::Encode {
                what: kind.name().into(),
                reason: e.to_string(),
            })?;
            let (key, bytes) = arrays.layout.encode_chunk(array, index, data)?;
            objects.push((key.trim_start_matches('/').to_string(), Bytes::from(bytes)));
        }
        record.objects = objects.iter().map(|(k, b)| ObjectEntry::of(k, b)).collect();
        Ok(EncodedShard { record, objects })
    }
}

/// Encodes (on the shared pool) and uploads shards in order: a shard's objects first, then its journal record
/// (the commit).
fn write_shards(
    storage: &Storage,
    pool: &rayon::ThreadPool,
    rx: mpsc::Receiver<PendingShard>,
    bar: &indicatif::ProgressBar,
    metrics: &IngestProgress,
) -> Result<Vec<JournalRecord>, ShardError> {
    let mut written = Vec::new();
    for pending in rx {
        let shard = pool.install(|| pending.encode())?;
        let bytes: usize = shard.objects.iter().map(|(_, b)| b.len()).sum();
        storage.put_many(shard.objects)?;
        let r = &shard.record;
        let json = serde_json::to_vec(r).expect("journal records serialise");
        storage.put(&JournalRecord::key(r.split, r.seq), Bytes::from(json))?;
        tracing::debug!(split = %r.split, seq = r.seq, rows = r.rows, "shard committed");
        bar.inc(r.rows + r.rejected.len() as u64);
        metrics
            .rows_done
            .fetch_add(r.rows + r.rejected.len() as u64, Ordering::Relaxed);
        metrics
            .rows_rejected
            .fetch_add(r.rejected.len() as u64, Ordering::Relaxed);
        metrics.shards_written.fetch_add(1, Ordering::Relaxed);
        metrics
            .bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        written.push(shard.record);
    }
    Ok(written)
}

/// Writes every `zarr.json` and then the manifest.
fn finalise(
    storage: &Storage,
    table: &Table,
    images_dir: &Path,
    settings: &IngestSettings,
    fp: &str,
    journal: &BTreeMap<Split, Vec<JournalRecord>>,
) -> Result<Manifest, ShardError> {
    let mut counts = Counts {
        table_rows: table.data_rows,
        ..Counts::default()
    };
    let mut notes = ImageNoteCounts::default();
    let mut rejected = table.rejected.clone();
    counts.rejected_in_table = table.rejected.len() as u64;
    let mut objects: Vec<ObjectEntry> = Vec::new();
    for split in Split::ALL {
        let records = journal.get(&split).map(Vec::as_slice).unwrap_or_default();
        let sc = SplitCounts {
            images: records.iter().map(|r| r.rows).sum(),
            shards: records.iter().filter(|r| r.chunk.is_some()).count() as u64,
        };
        for r in records {
            counts.rejected_images += r.rejected.len() as u64;
            rejected.extend(r.rejected.iter().cloned());
            notes.add(&r.notes);
            objects.extend(r.objects.iter().cloned());
        }
        counts.accepted += sc.images;
        counts.splits.insert(split, sc);
    }
    counts.rejected = counts.rejected_in_table + counts.rejected_images;
    rejected.sort_by_key(|r| r.line);

    let source = Source {
        table: table.path.display().to_string(),
        table_sha256: table.sha256.clone(),
        images: images_dir.display().to_string(),
    };
    let vocabulary = Vocabulary::current();
    let mut metadata: Vec<(String, Vec<u8>)> = Vec::new();
    for split in Split::ALL {
        let n = counts.splits[&split].images;
        for kind in ArrayKind::ALL {
            let key = format!("{}/zarr.json", array_path(split, kind));
            metadata.push((key, array_metadata_json(&settings.layout, split, kind, n)?));
        }
        metadata.push((
            format!("{}/zarr.json", split.name()),
            group_metadata_json(serde_json::json!({ "images": n })),
        ));
    }
    let root_attrs = serde_json::json!({ "radit": {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "vocabulary": vocabulary,
        "settings": settings,
        "source": source,
        "counts": counts,
    }});
    metadata.push(("zarr.json".into(), group_metadata_json(root_attrs)));
    objects.extend(metadata.iter().map(|(k, b)| ObjectEntry::of(k, b)));
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    storage.put_many(
        metadata
            .into_iter()
            .map(|(k, b)| (k, Bytes::from(b)))
            .collect(),
    )?;

    let manifest = Manifest {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        created_by: format!("radit {}", env!("CARGO_PKG_VERSION")),
        fingerprint: fp.to_string(),
        source,
        settings: settings.clone(),
        vocabulary,
        counts,
        image_notes: notes,
        warnings: table.warnings.clone(),
        ignored_columns: table.ignored_columns.clone(),
        rejected,
        objects,
        latents: None,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    storage.put(MANIFEST_KEY, Bytes::from(json))?;
    Ok(manifest)
}
