//! `radit eval features` as a job: the images of a store split, or a finished `radit generate` output, through a
//! feature network into an `[N, D]` float32 `.npy` with the image ids beside it (`.ids.txt`) and what the features
//! are of (`.json`: the network and its preprocessing, the source).
//!
//! The images are cut into units (a store's shards; `unit_images` generated files); ranks take contiguous ranges of
//! units and commit each unit's features as a part file under `OUT.parts/` (written through a temporary name), so a
//! killed or requeued rank resumes at its first missing part. Rank 0 joins the parts in order at the end.
//!
//! With a cache directory, the finished features are kept under a key of (the source's identity: the store's
//! manifest or the generate output's fingerprint, the split, the network and preprocessing): the same request is
//! answered from the cache without running the network.

use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_protocol::{ConfigError, Phase};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::{Split, SplitScope};
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::journal::{RankError, RankHandles, io_error, write_atomic};
use crate::units::{UnitJob, UnitReader, UnitWork, run_units, settled_by_rank0, total_steps};
use radit_engine::collective::Collective;
use radit_engine::out_of_memory::{AllocationFailed, OutOfMemory};
use radit_models::features::FeatureNet;
use radit_models::model::ModelError;

/// The `[features]` section (and `radit eval features`' flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    /// A DINOv2 snapshot directory (Rad-DINO) or a TorchScript module file.
    pub net: PathBuf,
    /// A TorchScript module's input side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<i64>,
    /// A DINOv2 snapshot's preprocessing: processor or chexgenbench.
    #[serde(default = "default_preprocessing")]
    pub preprocessing: String,
    /// The store whose split to embed...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A split, or `any` (with `ids`: the ids wherever they are).
    #[serde(default = "default_split")]
    pub split: SplitScope,
    /// Only the store's rows with these image ids (an id list: one per line, `#` comments), in store order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<PathBuf>,
    /// ...or a finished `radit generate` output directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<PathBuf>,
    /// The features file (`.npy`); `.ids.txt` and `.json` go beside it.
    pub out: PathBuf,
    /// Images through the network at once.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Generated files per unit of work (a store's unit is its shard).
    #[serde(default = "default_unit")]
    pub unit_images: u64,
    /// Keep finished features here, and answer the same request from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
}

fn default_preprocessing() -> String {
    "processor".into()
}
fn default_split() -> SplitScope {
    SplitScope::One(Split::Test)
}
fn default_batch() -> usize {
    32
}
fn default_unit() -> u64 {
    256
}

impl FeaturesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.is_some() == self.samples.is_some() {
            return Err(ConfigError::new(
                "features.store",
                "give exactly one of store (with split) or samples",
            ));
        }
        if self.ids.is_some() && self.store.is_none() {
            return Err(ConfigError::new(
                "features.ids",
                "ids select rows of a store; generate on the same ids instead",
            ));
        }
        if self.split == SplitScope::Any && self.ids.is_none() {
            return Err(ConfigError::new(
                "features.split",
                "any is for an id list (ids): give the ids, or one split",
            ));
        }
        if self.batch == 0 || self.unit_images == 0 {
            return Err(ConfigError::new(
                "features.batch",
                "batch and unit_images must be positive",
            ));
        }
        if self.out.extension().is_none_or(|e| e != "npy") {
            return Err(ConfigError::new(
                "features.out",
                format!("{}: the features file ends in .npy", self.out.display()),
            ));
        }
        Ok(())
    }

    /// Reads `[features]` from a TOML file (as `radit run` writes it for the ranks) and validates it.
    pub fn load(file: &Path) -> Result<Self, RankError> {
        crate::journal::load_section(file, "features", Self::validate)
    }
}

/// Where the images come from, cut into units.
enum Source {
    Store {
        reader: Box<StoreReader>,
        /// The shards to read, in order: every shard of the split, or those holding a wanted id.
        shards: Vec<(Split, u64)>,
        /// Only these ids (with `ids`).
        wanted: Option<WantedIds>,
    },
    Samples(Vec<(PathBuf, String, u64)>),
}

impl Source {
    fn open(cfg: &FeaturesConfig) -> Result<(Self, String), RankError> {
        match (&cfg.store, &cfg.samples) {
            (Some(url), _) => {
                let storage = Storage::open_existing(url).map_err(ShardError::from)?;
                let manifest = storage.get("manifest.json").map_err(ShardError::from)?;
                let reader = Box::new(StoreReader::open(storage)?);
                let mut identity = format!(
                    "store {url} manifest {} split {}",
                    hex::encode(Sha256::digest(&manifest)),
                    cfg.split.name()
                );
                let (shards, wanted) = match &cfg.ids {
                    None => (
                        cfg.split
                            .splits()
                            .into_iter()
                            .flat_map(|s| (0..reader.shards(s)).map(move |k| (s, k)))
                            .collect(),
                        None,
                    ),
                    Some(path) => {
                        let ids = radit_sharding::select::read_id_list(path).map_err(|e| {
                            RankError::Config(ConfigError::new("features.ids", e.to_string()))
                        })?;
                        let (shards, wanted) = shards_holding(&reader, cfg.split, &ids, path)?;
                        identity += &format!(
                            " ids {}",
                            hex::encode(Sha256::digest(ids.join("\n").as_bytes()))
                        );
                        (shards, Some(wanted))
                    }
                };
                Ok((
                    Self::Store {
                        reader,
                        shards,
                        wanted,
                    },
                    identity,
                ))
            }
            (None, Some(dir)) => {
                let samples =
                    crate::generate_job::read_samples(dir).map_err(|e| RankError::Unusable {
                        what: dir.display().to_string(),
                        reason: radit_engine::membership::chain_text(&e),
                    })?;
                let manifest = dir.join("generate.json");
                let bytes = std::fs::read(&manifest).map_err(io_error(&manifest))?;
                let identity = format!(
                    "samples {} generate.json {}",
                    dir.display(),
                    hex::encode(Sha256::digest(&bytes))
                );
                Ok((Self::Samples(samples), identity))
            }
            (None, None) => Err(RankError::Config(ConfigError::new(
                "features.store",
                "give store or samples",
            ))),
        }
    }

    fn units(&self, unit_images: u64) -> u64 {
        match self {
            Self::Store { shards, .. } => shards.len() as u64,
            Self::Samples(s) => (s.len() as u64).div_ceil(unit_images),
        }
    }

    /// Unit `u`'s (ids, 16-bit pixels `[n, side, side]`, side).
    fn read(&self, u: u64, unit_images: u64) -> Result<(Vec<String>, Vec<u16>, i64), RankError> {
        match self {
            Self::Store {
                reader,
                shards,
                wanted,
            } => {
                let (split, k) = shards[u as usize];
                let shard = reader.read_shard(split, k)?;
                let side = i64::from(reader.layout().image_size);
                let Some(wanted) = wanted else {
                    return Ok((shard.image_ids, shard.images, side));
                };
                let pixels = (side * side) as usize;
                let (mut ids, mut images) = (Vec::new(), Vec::new());
                for (i, id) in shard.image_ids.into_iter().enumerate() {
                    if wanted.contains(&id) {
                        images.extend_from_slice(&shard.images[i * pixels..(i + 1) * pixels]);
                        ids.push(id);
                    }
                }
                Ok((ids, images, side))
            }
            Self::Samples(all) => {
                let first = (u * unit_images) as usize;
                let last = (first + unit_images as usize).min(all.len());
                let (mut ids, mut pixels, mut side) = (Vec::new(), Vec::new(), None);
                for (path, id, k) in &all[first..last] {
                    let bad = |reason: String| RankError::unusable(path.display(), reason);
                    let bytes = std::fs::read(path).map_err(io_error(path))?;
                    let (img, _) = radit_sharding::image::decode_png(&bytes)
                        .map_err(|e| bad(e.to_string()))?;
                    let s = i64::from(img.width);
                    if img.width != img.height || side.is_some_and(|x| x != s) {
                        return Err(bad(format!(
                            "{}x{}; the samples must be square and of one size",
                            img.width, img.height
                        )));
                    }
                    side = Some(s);
                    pixels.extend(img.pixels);
                    ids.push(if *k == 0 {
                        id.clone()
                    } else {
                        format!("{id}#{k}")
                    });
                }
                Ok((ids, pixels, side.unwrap_or(0)))
            }
        }
    }
}

/// The image ids a store source is restricted to.
type WantedIds = std::collections::HashSet<String>;

/// The shards of `scope` that hold any of `ids`, and the ids as a set; every id must be found.
fn shards_holding(
    reader: &StoreReader,
    scope: SplitScope,
    ids: &[String],
    path: &Path,
) -> Result<(Vec<(Split, u64)>, WantedIds), RankError> {
    let located = radit_sharding::select::locate(reader, scope, ids)?;
    if !located.missing.is_empty() {
        let first: Vec<&str> = located.missing.iter().take(5).map(String::as_str).collect();
        return Err(RankError::Config(ConfigError::new(
            "features.ids",
            format!(
                "{}: {} id(s) are not in the {} split(s) of the store (first: {})",
                path.display(),
                located.missing.len(),
                scope,
                first.join(", ")
            ),
        )));
    }
    Ok((located.shards, ids.iter().cloned().collect()))
}

/// The steps of the rank with the most units, over `world` ranks (reads the source's listing).
pub fn planned_steps(cfg: &FeaturesConfig, world: u64) -> Result<u64, RankError> {
    let (source, _) = Source::open(cfg)?;
    Ok(total_steps(source.units(cfg.unit_images), world))
}

/// What one rank did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FeaturesSummary {
    pub rank: usize,
    pub units: u64,
    pub units_resumed: u64,
    pub images: u64,
    pub images_per_second: f64,
    pub seconds: f64,
    pub stopped_for_requeue: bool,
    /// Answered from the cache (nothing computed).
    pub cached: bool,
    /// Rank 0: the features file and its report (rows, dim, network, source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.with_extension("").into_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn part_path(parts: &Path, unit: u64) -> PathBuf {
    parts.join(format!("{unit:08}.npy"))
}

/// The three files of a finished features request: `.npy`, `.ids.txt`, `.json`.
fn outputs(npy: &Path) -> [PathBuf; 3] {
    [
        npy.to_path_buf(),
        with_suffix(npy, ".ids.txt"),
        meta_path(npy),
    ]
}

/// The `.ids.txt` beside a features file: its rows' image ids, one per line.
pub fn ids_path(npy: &Path) -> PathBuf {
    with_suffix(npy, ".ids.txt")
}

/// The `.json` beside a features file that says what the features are of.
pub fn meta_path(npy: &Path) -> PathBuf {
    with_suffix(npy, ".json")
}

/// Runs this rank's part of the features job (see the module docs). Collective.
pub fn extract(
    cfg: &FeaturesConfig,
    comm: &dyn Collective,
    device: Device,
    handles: &RankHandles,
) -> Result<FeaturesSummary, RankError> {
    cfg.validate().map_err(RankError::Config)?;
    let (rank, world) = (comm.rank(), comm.world());
    let started = Instant::now();
    let progress = &handles.progress;
    progress.set_phase(Phase::Starting);
    let net =
        radit_models::features::load_net(&cfg.net, cfg.input_size, &cfg.preprocessing, device)?;
    let (source, identity) = Source::open(cfg)?;
    let key = hex::encode(Sha256::digest(format!("{identity}\n{}", net.id())));
    let mut summary = FeaturesSummary {
        rank,
        ..FeaturesSummary::default()
    };
    let units = source.units(cfg.unit_images);
    let total = total_steps(units, world as u64);
    // The cache answers for every rank alike (they all see the same directory).
    if let Some(dir) = &cfg.cache {
        let cached = outputs(&dir.join(format!("{key}.npy")));
        if cached.iter().all(|p| p.exists()) {
            if rank == 0 {
                for (from, to) in cached.iter().zip(outputs(&cfg.out)) {
                    write_atomic(&to, |tmp| std::fs::copy(from, tmp).map(|_| ()))?;
                }
                let text = std::fs::read_to_string(&cached[2]).map_err(io_error(&cached[2]))?;
                summary.report = serde_json::from_str(&text).ok();
            }
            tracing::info!(rank, key, "features answered from the cache");
            progress.set_step(total);
            summary.cached = true;
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }
    let parts = with_suffix(&cfg.out, ".parts");
    // Rank 0 settles the parts directory: parts of another request (another network or source) are dropped.
    let settled = if rank == 0 {
        settle_parts(&parts, &key)
    } else {
        Ok(())
    };
    settled_by_rank0(comm, handles, parts.display(), settled)?;
    let unit_list: Vec<u64> = (0..units).collect();
    let mut job = FeatureUnits {
        net: net.as_ref(),
        parts: &parts,
        batch: cfg.batch,
        device,
        side: 0,
        images: 0,
    };
    let reader = SourceUnits {
        source: &source,
        unit_images: cfg.unit_images,
    };
    let run = run_units((comm, device, handles), &unit_list, &reader, &mut job)?;
    summary.units = run.units;
    summary.units_resumed = run.resumed;
    summary.images = job.images;
    summary.images_per_second = summary.images as f64 / run.loop_seconds;
    summary.seconds = started.elapsed().as_secs_f64();
    if run.stopped_anywhere {
        summary.stopped_for_requeue = true;
        return Ok(summary);
    }
    if rank == 0 {
        let report = join_parts(cfg, &parts, units, net.id(), &identity, summary.seconds)?;
        if let Some(dir) = &cfg.cache {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            for (from, to) in outputs(&cfg.out)
                .iter()
                .zip(outputs(&dir.join(format!("{key}.npy"))))
            {
                write_atomic(&to, |tmp| std::fs::copy(from, tmp).map(|_| ()))?;
            }
        }
        summary.report = Some(report);
    }
    Ok(summary)
}

/// Reads a unit's images (a shard, or `unit_images` generated files) with their ids.
struct SourceUnits<'a> {
    source: &'a Source,
    unit_images: u64,
}

impl UnitReader for SourceUnits<'_> {
    type Unit = u64;
    type Input = (Vec<String>, Vec<u16>, i64);
    fn read(&self, unit: u64) -> Result<Self::Input, RankError> {
        self.source.read(unit, self.unit_images)
    }
}

/// Embeds a unit's images; its ids file, then its features part, commit it.
struct FeatureUnits<'a> {
    net: &'a dyn FeatureNet,
    parts: &'a Path,
    batch: usize,
    device: Device,
    /// The last unit's image side, for an allocation failure's report.
    side: i64,
    images: u64,
}

impl UnitJob for FeatureUnits<'_> {
    type Unit = u64;
    type Input = (Vec<String>, Vec<u16>, i64);
    /// The ids, the features `[n, D]` row-major, and D.
    type Output = (Vec<String>, Vec<f32>, usize);
    type Written = (Vec<String>, Vec<f32>, usize);

    fn is_committed(&self, unit: u64) -> Result<bool, RankError> {
        Ok(part_path(self.parts, unit).exists())
    }

    fn compute(
        &mut self,
        _: u64,
        (ids, images, side): Self::Input,
    ) -> Result<Self::Output, RankError> {
        self.side = side;
        let (values, dim) = embed(self.net, &images, side, self.batch)?;
        Ok((ids, values, dim))
    }

    fn out_of_memory(&self, failed: AllocationFailed, unit: u64) -> OutOfMemory {
        OutOfMemory::new(
            failed,
            format!("unit {unit}"),
            self.device,
            format!("{0}x{0} images, features.batch {1}", self.side, self.batch),
            "lower features.batch (images per forward pass)",
        )
    }

    fn write(&mut self, unit: u64, made: Self::Output) -> Result<Self::Written, RankError> {
        let ids_path = self.parts.join(format!("{unit:08}.ids.txt"));
        write_atomic(&ids_path, |tmp| {
            std::fs::write(tmp, made.0.join("\n") + "\n")
        })?;
        Ok(made)
    }

    fn commit(
        &mut self,
        unit: u64,
        (ids, values, dim): Self::Written,
    ) -> Result<UnitWork, RankError> {
        write_atomic(&part_path(self.parts, unit), |tmp| {
            radit_eval::io::write_npy(tmp, &values, ids.len(), dim)
        })?;
        self.images += ids.len() as u64;
        Ok(UnitWork {
            images: ids.len() as u64,
            ..UnitWork::default()
        })
    }
}

/// 16-bit images `[n, side, side]` as a feature network's input `[n, 1, side, side]` in [0, 1] (v / 65535): what
/// `eval features` feeds it, and the in-training FD for its real rows.
pub(crate) fn unit_images(levels: &[u16], side: i64) -> Tensor {
    let x: Vec<f32> = levels.iter().map(|&v| f32::from(v) / 65535.0).collect();
    Tensor::from_slice(&x).view([-1, 1, side, side])
}

/// Features `[n, D]` (row-major f32) of 16-bit images `[n, side, side]`, `batch` at a time.
fn embed(
    net: &dyn FeatureNet,
    images: &[u16],
    side: i64,
    batch: usize,
) -> Result<(Vec<f32>, usize), RankError> {
    let pixels = (side * side) as usize;
    let rows = images.len() / pixels.max(1);
    let (mut values, mut dim) = (Vec::with_capacity(rows * 768), 0);
    for start in (0..rows).step_by(batch) {
        let n = (rows - start).min(batch);
        let x = unit_images(&images[start * pixels..(start + n) * pixels], side);
        let f = net.features(&x)?;
        dim = f.size()[1] as usize;
        values.extend(Vec::<f32>::try_from(f.flatten(0, -1)).map_err(ModelError::from)?);
    }
    Ok((values, dim))
}

/// Makes `parts` hold only parts of request `key` (its `key` file says which).
fn settle_parts(parts: &Path, key: &str) -> Result<(), RankError> {
    let marker = parts.join("request");
    let same = std::fs::read_to_string(&marker).is_ok_and(|k| k.trim() == key);
    if !same && parts.exists() {
        tracing::warn!(parts = %parts.display(), "dropping the parts of another network or source");
        std::fs::remove_dir_all(parts).map_err(io_error(parts))?;
    }
    std::fs::create_dir_all(parts).map_err(io_error(parts))?;
    if !same {
        write_atomic(&marker, |tmp| std::fs::write(tmp, format!("{key}\n")))?;
    }
    Ok(())
}

/// Rank 0, after every rank's range: the parts in order as one `.npy`, the ids and the report; the parts go.
fn join_parts(
    cfg: &FeaturesConfig,
    parts: &Path,
    units: u64,
    network: &str,
    identity: &str,
    seconds: f64,
) -> Result<serde_json::Value, RankError> {
    let (mut values, mut ids, mut dim) = (Vec::<f32>::new(), Vec::<String>::new(), 0);
    for u in 0..units {
        let path = part_path(parts, u);
        if !path.exists() {
            return Err(RankError::unusable(
                path.display(),
                "missing although every rank finished: run again to resume",
            ));
        }
        let f = radit_eval::io::read_npy(&path)
            .map_err(|e| RankError::unusable(path.display(), e.to_string()))?;
        dim = f.dim();
        values.extend(f.data().iter().map(|&v| v as f32));
        let ids_path = parts.join(format!("{u:08}.ids.txt"));
        let text = std::fs::read_to_string(&ids_path).map_err(io_error(&ids_path))?;
        ids.extend(text.lines().map(str::to_string));
    }
    if ids.is_empty() {
        return Err(RankError::Config(ConfigError::new(
            "features.store",
            format!("{identity}: no images"),
        )));
    }
    let [npy, ids_path, meta] = outputs(&cfg.out);
    write_atomic(&npy, |tmp| {
        radit_eval::io::write_npy(tmp, &values, ids.len(), dim)
    })?;
    write_atomic(&ids_path, |tmp| std::fs::write(tmp, ids.join("\n") + "\n"))?;
    let report = serde_json::json!({
        "out": npy, "ids": ids_path, "rows": ids.len(), "dim": dim, "network": network,
        "source": identity, "seconds": seconds, "images_per_second": ids.len() as f64 / seconds.max(1e-9),
    });
    write_atomic(&meta, |tmp| std::fs::write(tmp, format!("{report}\n")))?;
    std::fs::remove_dir_all(parts).map_err(io_error(parts))?;
    Ok(report)
}
