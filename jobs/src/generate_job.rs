//! `radit generate`: matched conditional sampling at scale (evaluation.md C.4, "Jobs users expect" 3). One sample
//! (or `per_profile`) per row of a reference split, conditioned on that row's 19 variables, sample (row, k) drawn
//! from the noise stream (seed, row x per_profile + k) and integrated with dopri5 at 1e-5 by default; written as
//! 16-bit PNGs with a `samples.csv` that names each file's image id, row and profile.
//!
//! The work is cut into units of `unit_profiles` consecutive profiles; a unit is solved in fixed batches, so its
//! samples are the same whichever rank draws it and however many ranks there are. Ranks take contiguous ranges of
//! units. A unit's files are written (each through a temporary name), then its record under
//! `.generate/journal/` commits it: a killed or requeued rank resumes at its first uncommitted unit, and no row is
//! drawn twice or skipped. `generate.json` pins what the output is of (weights, profiles, seed, solver); a rerun
//! with anything else is refused until `overwrite`. A rank's step is its number of committed units, so `radit run`
//! shows progress and ETA and detects hangs as for training.

use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_protocol::{ConfigError, Phase};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::schema::Vocabulary;
use radit_sharding::split::{Split, SplitScope};
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Device;

use crate::generate::{Conditions, Sampler};
use crate::journal::{RankError, RankHandles, io_error, write_atomic};
use crate::units::{
    UnitJob, UnitReader, UnitWork, rank_range, run_units, settled_by_rank0, total_steps,
};
use radit_engine::collective::Collective;
use radit_engine::out_of_memory::{AllocationFailed, OutOfMemory};
use radit_models::model::Precision;
use radit_models::sampler::Solver;

/// The `[generate]` section (and `radit generate`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// The model's weights (safetensors carrying its config, e.g. `radit export` of a run's EMA).
    pub weights: PathBuf,
    /// The architecture, for weights that do not carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// The store whose split gives the profiles.
    pub profiles: String,
    /// A split, or `any` (with `ids`: the ids wherever they are, as CheXGenBench's reference set needs).
    #[serde(default = "default_split")]
    pub split: SplitScope,
    /// Only the rows with these image ids (an id list: one per line, `#` comments), in the split's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<PathBuf>,
    /// At most this many profiles (the first ones, after `ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default = "one")]
    pub per_profile: u64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub solver: Solver,
    /// The output directory (local or a shared file system).
    pub out: PathBuf,
    /// Samples solved at once.
    #[serde(default = "default_batch")]
    pub batch: u64,
    /// Profiles per unit of work (one step of progress, one journal record).
    #[serde(default = "default_unit")]
    pub unit_profiles: u64,
    /// fp32 or bf16 (default: bf16 on GPUs, fp32 on CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// For a latent model: the decoder (de-standardised with the profile store's latent statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<radit_models::autoencoder::DecoderConfig>,
    /// Replace an output of other weights, profiles, seed or solver.
    #[serde(default)]
    pub overwrite: bool,
}

fn default_split() -> SplitScope {
    SplitScope::One(Split::Test)
}
fn one() -> u64 {
    1
}
fn default_batch() -> u64 {
    16
}
fn default_unit() -> u64 {
    64
}

impl GenerateConfig {
    pub fn new(weights: &Path, profiles: &str, out: &Path) -> Self {
        Self {
            weights: weights.to_path_buf(),
            preset: None,
            profiles: profiles.into(),
            split: default_split(),
            ids: None,
            limit: None,
            per_profile: 1,
            seed: 0,
            solver: Solver::default(),
            out: out.to_path_buf(),
            batch: default_batch(),
            unit_profiles: default_unit(),
            precision: None,
            decoder: None,
            overwrite: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: &str| Err(ConfigError::new(field, reason));
        if self.per_profile == 0 || self.batch == 0 || self.unit_profiles == 0 {
            return bad(
                "generate.per_profile",
                "per_profile, batch and unit_profiles must be positive",
            );
        }
        if self.limit == Some(0) {
            return bad("generate.limit", "must be positive when given");
        }
        if self.split == SplitScope::Any && self.ids.is_none() {
            return bad(
                "generate.split",
                "any is for an id list (ids): give the ids, or one split",
            );
        }
        self.solver
            .validate()
            .map_err(|e| ConfigError::new("generate.solver", e.to_string()))
    }

    /// Reads `[generate]` from a TOML file (as `radit run` writes it for the ranks) and validates it.
    pub fn load(file: &Path) -> Result<Self, RankError> {
        crate::journal::load_section(file, "generate", Self::validate)
    }

    fn precision_on(&self, device: Device) -> Precision {
        self.precision.unwrap_or(Precision::default_on(device))
    }
}

/// One reference row: where it is, and the metadata its samples are conditioned on.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub split: Split,
    /// Its index in the split.
    pub row: u64,
    /// Its index over the splits read (its noise's index): the row itself when one split is read.
    pub key: u64,
    pub image_id: String,
    pub conditions: Conditions,
}

/// The profiles of `cfg`, in the split's order (the ids file selects and must be all found).
pub fn read_profiles(cfg: &GenerateConfig) -> Result<Vec<Profile>, RankError> {
    let reader =
        StoreReader::open(Storage::open_existing(&cfg.profiles).map_err(ShardError::from)?)?;
    let wanted: Option<std::collections::BTreeSet<String>> = match &cfg.ids {
        Some(path) => Some(
            radit_sharding::select::read_id_list(path)
                .map_err(|e| RankError::Config(ConfigError::new("generate.ids", e.to_string())))?
                .into_iter()
                .collect(),
        ),
        None => None,
    };
    let mut out = Vec::new();
    let mut offset = 0u64;
    'splits: for split in cfg.split.splits() {
        let mut row = 0u64;
        for k in 0..reader.shards(split) {
            let shard = reader.read_metadata_of(split, k)?;
            for i in 0..shard.rows {
                let id = &shard.image_ids[i];
                if wanted.as_ref().is_none_or(|w| w.contains(id)) {
                    out.push(Profile {
                        split,
                        row,
                        key: offset + row,
                        image_id: id.clone(),
                        conditions: Conditions::of_row(&shard, i),
                    });
                    if cfg.limit.is_some_and(|l| out.len() as u64 >= l) {
                        break 'splits;
                    }
                }
                row += 1;
            }
        }
        offset += reader.len(split);
    }
    if let (Some(w), Some(path)) = (&wanted, &cfg.ids)
        && cfg.limit.is_none()
        && out.len() < w.len()
    {
        let found: std::collections::BTreeSet<&str> =
            out.iter().map(|p| p.image_id.as_str()).collect();
        let missing: Vec<&str> = w
            .iter()
            .map(String::as_str)
            .filter(|id| !found.contains(id))
            .take(5)
            .collect();
        return Err(RankError::Config(ConfigError::new(
            "generate.ids",
            format!(
                "{}: {} id(s) are not in the {} split of {} (first: {})",
                path.display(),
                w.len() - out.len(),
                cfg.split.name(),
                cfg.profiles,
                missing.join(", ")
            ),
        )));
    }
    if out.is_empty() {
        return Err(RankError::Config(ConfigError::new(
            "generate.split",
            format!(
                "no profiles in the {} split of {}",
                cfg.split.name(),
                cfg.profiles
            ),
        )));
    }
    Ok(out)
}

/// The units of `profiles` profiles.
pub fn units(profiles: u64, unit_profiles: u64) -> u64 {
    profiles.div_ceil(unit_profiles.max(1))
}

/// The steps of the rank with the most units, over `world` ranks (reads the profiles).
pub fn planned_steps(cfg: &GenerateConfig, world: u64) -> Result<u64, RankError> {
    let n = read_profiles(cfg)?.len() as u64;
    Ok(total_steps(units(n, cfg.unit_profiles), world))
}

/// What an output directory is of: everything that decides its samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub weights_sha256: String,
    pub profiles: String,
    pub split: SplitScope,
    /// sha256 of the profile rows' image ids, in order.
    pub ids_sha256: String,
    pub rows: u64,
    pub per_profile: u64,
    pub seed: u64,
    pub solver: Solver,
    pub batch: u64,
    pub unit_profiles: u64,
    pub precision: Precision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sha256: Option<String>,
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, RankError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A unit's journal record: the commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UnitRecord {
    unit: u64,
    samples: u64,
    nfe: u64,
}

/// One sample's file name: `<split>-<row>-<k>.png`.
pub fn sample_file(split: Split, row: u64, k: u64) -> String {
    format!("{}-{row:08}-{k}.png", split.name())
}

use crate::journal::{SAMPLES_CSV as CSV, SAMPLES_MANIFEST as MANIFEST};
const JOURNAL: &str = ".generate/journal";

fn journal_path(out: &Path, unit: u64) -> PathBuf {
    out.join(JOURNAL).join(format!("{unit:08}.json"))
}

/// What one rank did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerateSummary {
    pub rank: usize,
    pub units: u64,
    pub units_resumed: u64,
    pub samples_written: u64,
    /// Model evaluations per sample, averaged over this rank's solves.
    pub nfe_per_sample: f64,
    pub samples_per_second: f64,
    pub seconds: f64,
    pub stopped_for_requeue: bool,
    /// Rank 0 only: every unit is committed and `samples.csv` written.
    pub finished: bool,
}

/// Settles the output directory on rank 0 (see [`crate::journal::prepare_samples_dir`]).
fn prepare(cfg: &GenerateConfig, fingerprint: &Fingerprint) -> Result<(), RankError> {
    crate::journal::prepare_samples_dir(
        &cfg.out,
        ".generate",
        fingerprint,
        cfg.overwrite,
        |f: &Fingerprint| {
            format!(
                "{} (weights {}, seed {}, solver {:?})",
                f.profiles,
                &f.weights_sha256[..12.min(f.weights_sha256.len())],
                f.seed,
                f.solver
            )
        },
    )
}

/// Runs this rank's part of the generate job (see the module docs). Collective.
pub fn generate(
    cfg: &GenerateConfig,
    comm: &dyn Collective,
    device: Device,
    handles: &RankHandles,
) -> Result<GenerateSummary, RankError> {
    cfg.validate().map_err(RankError::Config)?;
    let (rank, world) = (comm.rank(), comm.world());
    let started = Instant::now();
    let progress = &handles.progress;
    progress.set_phase(Phase::Starting);
    let precision = cfg.precision_on(device);
    let profiles = read_profiles(cfg)?;
    let sampler = Sampler::load(&cfg.weights, cfg.preset.as_deref(), device, precision)?;
    let model = sampler.network.clone();
    let decoder = match &cfg.decoder {
        Some(d) => Some(radit_models::autoencoder::LatentDecoder::load(
            d,
            Some(radit_models::autoencoder::store_statistics(&cfg.profiles)?),
            device,
        )?),
        None if model.in_channels() != 1 => {
            return Err(RankError::Config(ConfigError::new(
                "generate.decoder",
                format!(
                    "the model makes {}-channel latents: give [generate.decoder] to write images",
                    model.in_channels()
                ),
            )));
        }
        None => None,
    };
    let ids = profiles.iter().fold(Sha256::new(), |h, p| {
        h.chain_update(p.image_id.as_bytes()).chain_update(b"\n")
    });
    let fingerprint = Fingerprint {
        weights_sha256: sha256_file(&cfg.weights)?,
        profiles: cfg.profiles.clone(),
        split: cfg.split,
        ids_sha256: hex::encode(ids.finalize()),
        rows: profiles.len() as u64,
        per_profile: cfg.per_profile,
        seed: cfg.seed,
        solver: cfg.solver,
        batch: cfg.batch,
        unit_profiles: cfg.unit_profiles,
        precision,
        decoder_sha256: cfg
            .decoder
            .as_ref()
            .map(|d| sha256_file(&d.weights))
            .transpose()?,
    };
    // Rank 0 settles the directory; the others learn of a refusal from the reduction instead of waiting.
    let prepared = if rank == 0 {
        prepare(cfg, &fingerprint)
    } else {
        Ok(())
    };
    settled_by_rank0(comm, handles, cfg.out.display(), prepared)?;
    let all_units = units(profiles.len() as u64, cfg.unit_profiles);
    let unit_list: Vec<u64> = (0..all_units).collect();
    let mut summary = GenerateSummary {
        rank,
        ..GenerateSummary::default()
    };
    tracing::info!(
        rank,
        units = rank_range(all_units as usize, rank, world).len(),
        profiles = profiles.len(),
        "generating"
    );
    let mut job = GenerateUnits {
        cfg,
        sampler: &sampler,
        decoder: decoder.as_ref(),
        device,
        precision,
        flops_per_nfe: model.forward_flops_per_image(),
        tokens_per_sample: model.tokens_per_image(),
        parameters: model.parameters() as i64,
        nfe_total: 0,
        samples_written: 0,
    };
    let reader = UnitSamples {
        profiles: &profiles,
        unit_profiles: cfg.unit_profiles,
        per_profile: cfg.per_profile,
    };
    let run = run_units((comm, device, handles), &unit_list, &reader, &mut job)?;
    summary.units = run.units;
    summary.units_resumed = run.resumed;
    summary.samples_written = job.samples_written;
    summary.samples_per_second = summary.samples_written as f64 / run.loop_seconds;
    let batches = summary.samples_written.div_ceil(cfg.batch).max(1);
    summary.nfe_per_sample = job.nfe_total as f64 / batches as f64;
    summary.seconds = started.elapsed().as_secs_f64();
    if run.stopped_anywhere {
        summary.stopped_for_requeue = true;
        return Ok(summary);
    }
    if rank == 0 {
        finish(cfg, &profiles, all_units, &fingerprint)?;
        summary.finished = true;
    }
    Ok(summary)
}

/// A unit's samples in order: (profile, k) for each of its profiles.
struct UnitSamples<'a> {
    profiles: &'a [Profile],
    unit_profiles: u64,
    per_profile: u64,
}

impl<'a> UnitReader for UnitSamples<'a> {
    type Unit = u64;
    type Input = Vec<(&'a Profile, u64)>;
    fn read(&self, unit: u64) -> Result<Self::Input, RankError> {
        let first = (unit * self.unit_profiles) as usize;
        let last = (first + self.unit_profiles as usize).min(self.profiles.len());
        let per_profile = self.per_profile;
        Ok(self.profiles[first..last]
            .iter()
            .flat_map(|p| (0..per_profile).map(move |k| (p, k)))
            .collect())
    }
}

/// Solves a unit's samples in fixed batches and writes their PNGs; its journal record commits it.
struct GenerateUnits<'a> {
    cfg: &'a GenerateConfig,
    sampler: &'a Sampler,
    decoder: Option<&'a radit_models::autoencoder::LatentDecoder>,
    device: Device,
    precision: Precision,
    flops_per_nfe: f64,
    tokens_per_sample: u64,
    parameters: i64,
    nfe_total: u64,
    samples_written: u64,
}

impl<'a> UnitJob for GenerateUnits<'a> {
    type Unit = u64;
    type Input = Vec<(&'a Profile, u64)>;
    /// The unit's samples and the solver's function evaluations.
    type Output = (u64, u64);
    type Written = (u64, u64);

    fn is_committed(&self, unit: u64) -> Result<bool, RankError> {
        Ok(journal_path(&self.cfg.out, unit).exists())
    }

    fn compute(&mut self, _: u64, samples: Self::Input) -> Result<(u64, u64), RankError> {
        let cfg = self.cfg;
        let images_dir = cfg.out.join("images");
        let mut nfe = 0u64;
        for chunk in samples.chunks(cfg.batch as usize) {
            let conditions: Vec<&Conditions> = chunk.iter().map(|(p, _)| &p.conditions).collect();
            let noise: Vec<u64> = chunk
                .iter()
                .map(|(p, k)| p.key * cfg.per_profile + k)
                .collect();
            let (x, stats) = tch::no_grad(|| {
                self.sampler
                    .generate_for(&conditions, &noise, cfg.seed, cfg.solver)
            })?;
            nfe += stats.nfe as u64;
            let images = match self.decoder {
                Some(d) => d.decode(&x)?,
                None => x,
            };
            let side = images.size()[3];
            for (i, (p, k)) in chunk.iter().enumerate() {
                let pixels = crate::generate::to_u16(&images.get(i as i64))?;
                let path = images_dir.join(sample_file(p.split, p.row, *k));
                let png = radit_sharding::image::encode_png16(side as u32, side as u32, &pixels);
                write_atomic(&path, |tmp| std::fs::write(tmp, &png))?;
            }
        }
        Ok((samples.len() as u64, nfe))
    }

    fn out_of_memory(&self, failed: AllocationFailed, unit: u64) -> OutOfMemory {
        let cfg = self.cfg;
        OutOfMemory::new(
            failed,
            format!("unit {unit}"),
            self.device,
            format!(
                "model {} ({} parameters), generate.batch {} in {:?}{}",
                cfg.preset.as_deref().unwrap_or("from the weights"),
                self.parameters,
                cfg.batch,
                self.precision,
                if self.decoder.is_some() {
                    ", decoded"
                } else {
                    ""
                }
            ),
            "lower generate.batch (samples per solve)",
        )
    }

    /// The PNGs are written as each batch is solved (each whole or not at all); the record commits them.
    fn write(&mut self, _: u64, made: (u64, u64)) -> Result<(u64, u64), RankError> {
        Ok(made)
    }

    fn commit(&mut self, unit: u64, (samples, nfe): (u64, u64)) -> Result<UnitWork, RankError> {
        let path = journal_path(&self.cfg.out, unit);
        let record = UnitRecord { unit, samples, nfe };
        let bytes = serde_json::to_vec(&record).map_err(|e| RankError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, |tmp| std::fs::write(tmp, &bytes))?;
        self.nfe_total += nfe;
        self.samples_written += samples;
        Ok(UnitWork {
            images: samples,
            tokens: samples * self.tokens_per_sample,
            // a solve's forwards, for every sample of each batch
            flops: self.flops_per_nfe * nfe as f64 * self.cfg.batch.min(samples) as f64,
        })
    }
}

/// Rank 0, after every rank's range: checks every unit is committed, writes `samples.csv` and marks the
/// manifest complete.
fn finish(
    cfg: &GenerateConfig,
    profiles: &[Profile],
    all_units: u64,
    fingerprint: &Fingerprint,
) -> Result<(), RankError> {
    if let Some(u) = (0..all_units).find(|&u| !journal_path(&cfg.out, u).exists()) {
        return Err(RankError::Unusable {
            what: cfg.out.display().to_string(),
            reason: format!(
                "unit {u} is not committed although every rank finished: run again to resume"
            ),
        });
    }
    let vocab = Vocabulary::current();
    let mut csv = String::from("file,image_id,row,sample");
    for name in &vocab.labels {
        csv += &format!(",{name}");
    }
    csv += ",age\n";
    for p in profiles {
        for k in 0..cfg.per_profile {
            csv += &format!(
                "images/{},{},{},{k}",
                sample_file(p.split, p.row, k),
                csv_field(&p.image_id),
                p.row
            );
            for (i, &c) in p.conditions.labels.iter().enumerate() {
                let class = if c == 0 {
                    ""
                } else {
                    vocab.classes[i][c as usize].as_str()
                };
                csv += &format!(",{}", csv_field(class));
            }
            if p.conditions.age.is_finite() {
                csv += &format!(",{}", p.conditions.age * 100.0);
            } else {
                csv += ",";
            }
            csv += "\n";
        }
    }
    write_atomic(&cfg.out.join(CSV), |tmp| std::fs::write(tmp, &csv))?;
    let text = serde_json::json!({ "fingerprint": fingerprint, "complete": true, "samples": profiles.len() as u64 * cfg.per_profile });
    write_atomic(&cfg.out.join(MANIFEST), |tmp| {
        std::fs::write(tmp, format!("{text:#}\n"))
    })
}

/// A CSV field, quoted when it must be.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The samples a finished output directory lists, in order: (file path, image id, sample index).
pub fn read_samples(out: &Path) -> Result<Vec<(PathBuf, String, u64)>, RankError> {
    let manifest = out.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest).map_err(io_error(&manifest))?;
    let complete = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["complete"].as_bool())
        .unwrap_or(false);
    if !complete {
        return Err(RankError::Unusable {
            what: out.to_path_buf().display().to_string(),
            reason: "the generate job has not finished: run it again to resume".into(),
        });
    }
    let path = out.join(CSV);
    let mut reader = csv::Reader::from_path(&path).map_err(|e| RankError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let bad = |reason: String| RankError::Unusable {
            what: path.display().to_string(),
            reason: format!("row {}: {reason}", i + 2),
        };
        let r = record.map_err(|e| bad(e.to_string()))?;
        let (Some(file), Some(id), Some(k)) = (r.get(0), r.get(1), r.get(3)) else {
            return Err(bad("fewer than 4 fields".into()));
        };
        let k = k
            .parse()
            .map_err(|_| bad(format!("sample `{k}` is not a number")))?;
        rows.push((out.join(file), id.to_string(), k));
    }
    Ok(rows)
}
