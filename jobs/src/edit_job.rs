//! `radit edit`: counterfactual editing at scale (editing.md, the paper's editing tables). N patients of a split
//! are drawn with a seed (one image each: the patient's first by image id); for each intervention (sex, race,
//! age, view, dataset, a finding) each patient gets a new value unlike the current one (a categorical: uniform
//! over the other classes; age: an integer in 18-90 other than the current; a finding: negative and positive
//! swap, missing becomes positive), drawn from (seed, row, intervention). The Flow SCM's counterfactual gives
//! the whole edited profile (descendants follow, the rest keep their values). The image is abducted to noise
//! under its profile and integrated forward under the edited one (dopri5 1e-5 by default); a latent model edits
//! the store's latents (the FLUX.2 encoder's means, standardised with the store's channel statistics, as `radit
//! encode` wrote them) and the decoder undoes the standardisation and decodes. `from_noise` is the paper's
//! baseline: a fixed noise per patient solved under the factual and under the edited profile, no abduction.
//!
//! Outputs: `images/edited/<intervention>/<split>-<row>.png` and `images/original/<split>-<row>.png` (16-bit),
//! and `edits.csv`: the edited file (`file`), its original, the ids, the intervention with its old and new value,
//! the edited profile in the variables' own columns (so `radit predictors eval --edits` scores the edits against
//! it), the factual profile in `factual_<variable>` columns, and the solver's evaluations.
//!
//! A unit is one solve batch of one intervention; ranks take contiguous ranges, a journal record commits each,
//! and a relaunched rank resumes at its first uncommitted unit (the one driver, `units::run_units`). Each patient's
//! result depends only on (seed, row, intervention) and the batch it is solved in, which the unit fixes, so any
//! world size and any interruption give the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_protocol::{ConfigError, Phase};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::schema::{self, Vocabulary};
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::generate::{Sampler, from_level};
use crate::generate_job::{csv_field, sha256_file};
use crate::journal::{RankError, RankHandles, io_error, write_atomic};
use crate::units::{
    UnitJob, UnitReader, UnitWork, rank_range, run_units, settled_by_rank0, total_steps,
};
use radit_engine::collective::Collective;
use radit_engine::out_of_memory::{AllocationFailed, OutOfMemory};
use radit_models::model::{ModelError, Precision};
use radit_models::sampler::{self, Solver};
use radit_models::scm::LoadedScm;
use radit_models::scm::infer::{self, Value};

/// The intervention that changes nothing (the round trip's check).
pub const NONE: &str = "none";

/// The edits' table in the output directory.
pub const EDITS_CSV: &str = "edits.csv";
const JOURNAL: &str = ".edit/journal";

/// `[edit]` (and `radit edit`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditConfig {
    /// The flow model's weights (carrying its config).
    pub weights: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// The store whose split's patients are edited.
    pub store: String,
    #[serde(default = "default_split")]
    pub split: Split,
    /// The Flow SCM (`radit scm train`'s file).
    pub scm: PathBuf,
    /// Patients drawn (fewer if the split has fewer).
    #[serde(default = "default_patients")]
    pub patients: u64,
    #[serde(default)]
    pub seed: u64,
    /// The variables intervened on, one set of edits each; `none` edits to the patient's own profile (the
    /// abduction and prediction round trip alone: it returns each image to the solver's tolerance).
    #[serde(default = "default_interventions")]
    pub interventions: Vec<String>,
    /// Edit random samples of a fixed noise instead of the patients' images (the baseline rows).
    #[serde(default)]
    pub from_noise: bool,
    #[serde(default = "default_solver")]
    pub solver: Solver,
    /// Images solved at once (one unit of work).
    #[serde(default = "default_batch")]
    pub batch: u64,
    /// For a latent model: the decoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<radit_models::autoencoder::DecoderConfig>,
    pub out: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Replace an output of another model, SCM, store or setting.
    #[serde(default)]
    pub overwrite: bool,
}

fn default_split() -> Split {
    Split::Test
}
fn default_patients() -> u64 {
    5000
}
/// The paper's six [CHOICE: pleural effusion as the finding].
pub fn default_interventions() -> Vec<String> {
    ["sex", "race", "age", "view", "dataset", "pleural_effusion"]
        .map(String::from)
        .to_vec()
}
fn default_solver() -> Solver {
    Solver::Dopri5 {
        atol: 1e-5,
        rtol: 1e-5,
    }
}
fn default_batch() -> u64 {
    16
}

impl EditConfig {
    pub fn new(weights: &Path, store: &str, scm: &Path, out: &Path) -> Self {
        Self {
            weights: weights.to_path_buf(),
            preset: None,
            store: store.into(),
            split: default_split(),
            scm: scm.to_path_buf(),
            patients: default_patients(),
            seed: 0,
            interventions: default_interventions(),
            from_noise: false,
            solver: default_solver(),
            batch: default_batch(),
            decoder: None,
            out: out.to_path_buf(),
            precision: None,
            overwrite: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.patients == 0 || self.batch == 0 {
            return Err(ConfigError::new(
                "edit.patients",
                "patients and batch must be positive",
            ));
        }
        if self.interventions.is_empty() {
            return Err(ConfigError::new(
                "edit.interventions",
                "name at least one variable",
            ));
        }
        let vocab = Vocabulary::current();
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.interventions {
            if v != "age" && v != NONE && vocab.label_index(v).is_none() {
                return Err(ConfigError::new(
                    "edit.interventions",
                    format!(
                        "`{v}` is not a variable (they are: {}, age; or none)",
                        vocab.labels.join(", ")
                    ),
                ));
            }
            if !seen.insert(v) {
                return Err(ConfigError::new(
                    "edit.interventions",
                    format!("`{v}` twice"),
                ));
            }
        }
        if let Some(d) = &self.decoder {
            d.validate("edit.decoder")?;
        }
        self.solver
            .validate()
            .map_err(|e| ConfigError::new("edit.solver", e.to_string()))
    }

    /// Reads `[edit]` from a TOML file (as `radit run` writes it for the ranks) and validates it.
    pub fn load(file: &Path) -> Result<Self, RankError> {
        crate::journal::load_section(file, "edit", Self::validate)
    }

    fn precision_on(&self, device: Device) -> Precision {
        self.precision.unwrap_or(Precision::default_on(device))
    }
}

/// One profile: class ids per label (0 = missing) and age in years/100 (NaN = missing).
type Profile = (Vec<u8>, f32);

/// A drawn patient: its image's row in the split and the store's profile of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Patient {
    pub row: u64,
    pub image_id: String,
    pub patient_id: String,
    pub labels: Vec<u8>,
    pub age: f32,
}

/// splitmix64: the draws' hash (a patient's order, a new value), independent of any library's stream.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A draw keyed by `parts` (splitmix64 folded over them).
pub(crate) fn draw(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5eed_ed17, |h, &p| mix(h ^ p))
}

fn text_key(s: &str) -> u64 {
    let digest = Sha256::digest(s.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
}

/// The split's patients, each with its first image by id; `n` of them drawn by `seed` (ordered by the draw's
/// key, then kept in row order so a unit reads few shards).
pub fn draw_patients(
    reader: &StoreReader,
    split: Split,
    n: u64,
    seed: u64,
) -> Result<Vec<Patient>, RankError> {
    let width = schema::NUM_LABELS;
    let per = u64::from(reader.layout().shard_images);
    let mut first: BTreeMap<String, Patient> = BTreeMap::new();
    for k in 0..reader.shards(split) {
        let shard = reader.read_metadata_of(split, k)?;
        for i in 0..shard.rows {
            let candidate = Patient {
                row: k * per + i as u64,
                image_id: shard.image_ids[i].clone(),
                patient_id: shard.patient_ids[i].clone(),
                labels: shard.labels[i * width..(i + 1) * width].to_vec(),
                age: shard.age[i],
            };
            match first.get(&candidate.patient_id) {
                Some(p) if p.image_id <= candidate.image_id => {}
                _ => {
                    first.insert(candidate.patient_id.clone(), candidate);
                }
            }
        }
    }
    let mut all: Vec<Patient> = first.into_values().collect();
    all.sort_by_key(|p| (draw(&[seed, text_key(&p.patient_id)]), p.patient_id.clone()));
    all.truncate(n as usize);
    all.sort_by_key(|p| p.row);
    Ok(all)
}

/// The new value of `variable` for a patient (see the module docs), drawn from (seed, row, intervention).
pub fn new_value(variable: &str, labels: &[u8], age: f32, draw: u64) -> Value {
    if variable == "age" {
        let current = (age * 100.0).round() as i64;
        // 72 integers in 18..=90 besides the current one (73 when it is outside that range or missing).
        let choices: Vec<i64> = (18..=90).filter(|&y| y != current).collect();
        let y = choices[(draw % choices.len() as u64) as usize];
        return Value::Age(y as f32 / 100.0);
    }
    let vocab = Vocabulary::current();
    let i = vocab.label_index(variable).unwrap_or(0);
    let current = labels.get(i).copied().unwrap_or(0);
    if i < schema::FINDINGS.len() {
        // negative (1) <-> positive (2); missing becomes positive.
        return Value::Class(if current == 2 { 1 } else { 2 });
    }
    let classes = vocab.classes[i].len() as u8 - 1;
    let others: Vec<u8> = (1..=classes).filter(|&c| c != current).collect();
    Value::Class(others[(draw % others.len() as u64) as usize])
}

fn value_text(variable: &str, labels: &[u8], age: f32, value: Option<Value>) -> String {
    let vocab = Vocabulary::current();
    let class = |i: usize, c: u8| {
        if c == 0 {
            String::new()
        } else {
            vocab.classes[i][c as usize].clone()
        }
    };
    let i = vocab.label_index(variable);
    match (value, i) {
        (Some(Value::Age(a)), _) => format!("{:.0}", a * 100.0),
        (Some(Value::Class(c)), Some(i)) => class(i, c),
        (None, None) if age.is_finite() => format!("{:.2}", age * 100.0),
        (None, Some(i)) => class(i, labels[i]),
        _ => String::new(),
    }
}

/// The patient's own value of `variable` (empty for `none`).
fn from_same(variable: &str, p: &Patient) -> String {
    if variable == NONE {
        return String::new();
    }
    value_text(variable, &p.labels, p.age, None)
}

/// What an output directory is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub weights_sha256: String,
    pub scm_sha256: String,
    pub store: String,
    pub split: Split,
    /// sha256 of the drawn patients' image ids, in order.
    pub ids_sha256: String,
    pub patients: u64,
    pub seed: u64,
    pub interventions: Vec<String>,
    pub from_noise: bool,
    pub solver: Solver,
    pub batch: u64,
    pub precision: Precision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sha256: Option<String>,
}

/// One edit, as `edits.csv` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    pub row: u64,
    pub image_id: String,
    pub patient_id: String,
    pub intervention: String,
    pub from: String,
    pub to: String,
    pub factual_labels: Vec<u8>,
    /// Years/100; `None` when missing (JSON has no NaN).
    pub factual_age: Option<f32>,
    pub edited_labels: Vec<u8>,
    pub edited_age: Option<f32>,
    /// Model evaluations of the batch's abduction (0 from noise: the factual sample's solve) and prediction.
    pub nfe_abduction: u64,
    pub nfe_prediction: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UnitRecord {
    unit: u64,
    edits: Vec<EditRecord>,
}

fn journal_path(out: &Path, unit: u64) -> PathBuf {
    out.join(JOURNAL).join(format!("{unit:08}.json"))
}

fn edited_file(split: Split, intervention: &str, row: u64) -> String {
    format!("images/edited/{intervention}/{}-{row:08}.png", split.name())
}

fn original_file(split: Split, row: u64) -> String {
    format!("images/original/{}-{row:08}.png", split.name())
}

/// The units: for each intervention, the patients in batches.
fn unit_count(cfg: &EditConfig, patients: usize) -> u64 {
    cfg.interventions.len() as u64 * (patients as u64).div_ceil(cfg.batch)
}

/// The steps of the rank with the most units, over `world` ranks (reads the split's metadata).
pub fn planned_steps(cfg: &EditConfig, world: u64) -> Result<u64, RankError> {
    let reader = open_store(&cfg.store)?;
    let patients = draw_patients(&reader, cfg.split, cfg.patients, cfg.seed)?;
    Ok(total_steps(unit_count(cfg, patients.len()), world))
}

fn open_store(url: &str) -> Result<StoreReader, RankError> {
    Ok(StoreReader::open(
        Storage::open_existing(url).map_err(ShardError::from)?,
    )?)
}

/// What one rank did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EditSummary {
    pub rank: usize,
    pub units: u64,
    pub units_resumed: u64,
    pub edits_written: u64,
    /// Model evaluations per edited image (abduction and prediction), over this rank's batches.
    pub nfe_per_image: f64,
    pub images_per_second: f64,
    /// Seconds in the flow model's solves (abduction and prediction) and in the SCM's counterfactuals.
    pub solve_seconds: f64,
    pub scm_seconds: f64,
    pub seconds: f64,
    pub stopped_for_requeue: bool,
    /// Rank 0 only: every unit is committed and `edits.csv` written.
    pub finished: bool,
}

/// Runs this rank's part of the edit job (see the module docs). Collective.
pub fn edit(
    cfg: &EditConfig,
    comm: &dyn Collective,
    device: Device,
    handles: &RankHandles,
) -> Result<EditSummary, RankError> {
    cfg.validate().map_err(RankError::Config)?;
    let (rank, world) = (comm.rank(), comm.world());
    let started = Instant::now();
    handles.progress.set_phase(Phase::Starting);
    let precision = cfg.precision_on(device);
    let reader = open_store(&cfg.store)?;
    let patients = draw_patients(&reader, cfg.split, cfg.patients, cfg.seed)?;
    if patients.is_empty() {
        return Err(RankError::unusable(
            &cfg.store,
            format!("the {} split has no patients", cfg.split.name()),
        ));
    }
    if (patients.len() as u64) < cfg.patients {
        tracing::warn!(
            asked = cfg.patients,
            found = patients.len(),
            split = cfg.split.name(),
            "the split has fewer patients than asked for: editing all of them"
        );
    }
    let sampler = Sampler::load(&cfg.weights, cfg.preset.as_deref(), device, precision)?;
    let latent = sampler.network.in_channels() != 1;
    let decoder = match (&cfg.decoder, latent) {
        (Some(d), true) => Some(radit_models::autoencoder::LatentDecoder::load(
            d,
            Some(radit_models::autoencoder::store_statistics(&cfg.store)?),
            device,
        )?),
        (None, true) => {
            return Err(RankError::Config(ConfigError::new(
                "edit.decoder",
                format!(
                    "the model edits {}-channel latents: give [edit.decoder] to write images",
                    sampler.network.in_channels()
                ),
            )));
        }
        (Some(_), false) => {
            return Err(RankError::Config(ConfigError::new(
                "edit.decoder",
                "the model edits images: a decoder is for latent models",
            )));
        }
        (None, false) => None,
    };
    let latents = if latent && !cfg.from_noise {
        Some(reader.latents(cfg.split)?.ok_or_else(|| {
            RankError::unusable(
                &cfg.store,
                format!(
                    "no {}/latents: a latent model edits the store's latents (run `radit encode` first)",
                    cfg.split.name()
                ),
            )
        })?)
    } else {
        None
    };
    let scm = radit_models::scm::load(&cfg.scm, Device::Cpu)?;
    let ids = patients.iter().fold(Sha256::new(), |h, p| {
        h.chain_update(p.image_id.as_bytes()).chain_update(b"\n")
    });
    let fingerprint = Fingerprint {
        weights_sha256: sha256_file(&cfg.weights)?,
        scm_sha256: sha256_file(&cfg.scm)?,
        store: cfg.store.clone(),
        split: cfg.split,
        ids_sha256: hex::encode(ids.finalize()),
        patients: patients.len() as u64,
        seed: cfg.seed,
        interventions: cfg.interventions.clone(),
        from_noise: cfg.from_noise,
        solver: cfg.solver,
        batch: cfg.batch,
        precision,
        decoder_sha256: cfg
            .decoder
            .as_ref()
            .map(|d| sha256_file(&d.weights))
            .transpose()?,
    };
    let prepared = if rank == 0 {
        crate::journal::prepare_samples_dir(
            &cfg.out,
            ".edit",
            &fingerprint,
            cfg.overwrite,
            |f: &Fingerprint| {
                format!(
                    "{} patients of {} (weights {}, seed {}, {})",
                    f.patients,
                    f.store,
                    &f.weights_sha256[..12.min(f.weights_sha256.len())],
                    f.seed,
                    if f.from_noise {
                        "from noise"
                    } else {
                        "abducted"
                    }
                )
            },
        )
    } else {
        Ok(())
    };
    settled_by_rank0(comm, handles, cfg.out.display(), prepared)?;
    let all_units = unit_count(cfg, patients.len());
    let unit_list: Vec<u64> = (0..all_units).collect();
    tracing::info!(
        rank,
        units = rank_range(all_units as usize, rank, world).len(),
        patients = patients.len(),
        interventions = cfg.interventions.len(),
        "editing"
    );
    let source = UnitPatients {
        cfg,
        patients: &patients,
        reader: &reader,
        latents: latents.as_ref(),
    };
    let model = &sampler.network;
    let mut job = EditUnits {
        cfg,
        sampler: &sampler,
        decoder: decoder.as_ref(),
        scm: &scm,
        device,
        precision,
        flops_per_nfe: model.forward_flops_per_image(),
        parameters: model.parameters() as i64,
        nfe_total: 0,
        batches: 0,
        written: 0,
        solve_seconds: 0.0,
        scm_seconds: 0.0,
    };
    let run = run_units((comm, device, handles), &unit_list, &source, &mut job)?;
    let mut summary = EditSummary {
        rank,
        units: run.units,
        units_resumed: run.resumed,
        edits_written: job.written,
        nfe_per_image: job.nfe_total as f64 / job.batches.max(1) as f64,
        images_per_second: job.written as f64 / run.loop_seconds.max(1e-9),
        solve_seconds: job.solve_seconds,
        scm_seconds: job.scm_seconds,
        seconds: 0.0,
        stopped_for_requeue: run.stopped_anywhere,
        finished: false,
    };
    if !run.stopped_anywhere && rank == 0 {
        finish(cfg, all_units, &fingerprint)?;
        summary.finished = true;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A unit's patients with their images (pixels in [-1, 1], or standardised latents).
struct UnitInput {
    intervention: usize,
    patients: Vec<Patient>,
    /// `[n, C, S, S]`; empty when editing from noise.
    x: Option<Tensor>,
    /// The originals' 16-bit levels (pixel models' edits; latent models' store images) and their side.
    levels: Vec<u16>,
    side: i64,
}

struct UnitPatients<'a> {
    cfg: &'a EditConfig,
    patients: &'a [Patient],
    reader: &'a StoreReader,
    latents: Option<&'a radit_sharding::reader::LatentArray>,
}

impl UnitPatients<'_> {
    fn per_intervention(&self) -> u64 {
        (self.patients.len() as u64).div_ceil(self.cfg.batch)
    }
}

impl UnitReader for UnitPatients<'_> {
    type Unit = u64;
    type Input = UnitInput;
    fn read(&self, unit: u64) -> Result<UnitInput, RankError> {
        let per = self.per_intervention();
        let (intervention, chunk) = ((unit / per) as usize, unit % per);
        let first = (chunk * self.cfg.batch) as usize;
        let last = (first + self.cfg.batch as usize).min(self.patients.len());
        let patients = self.patients[first..last].to_vec();
        let side = i64::from(self.reader.layout().image_size);
        let pixels = (side * side) as usize;
        let per_shard = u64::from(self.reader.layout().shard_images);
        let mut levels = Vec::with_capacity(patients.len() * pixels);
        let mut latents: Vec<f32> = Vec::new();
        let mut shape = [0usize; 3];
        let mut shards: BTreeMap<u64, radit_sharding::reader::Shard> = BTreeMap::new();
        for p in &patients {
            let k = p.row / per_shard;
            if let std::collections::btree_map::Entry::Vacant(slot) = shards.entry(k) {
                let mut shard = self.reader.read_shard(self.cfg.split, k)?;
                if let Some(array) = self.latents {
                    shard.latents = self
                        .reader
                        .read_latent_shard(self.cfg.split, k, array)?
                        .latents;
                    shape = array.sample_shape;
                }
                slot.insert(shard);
            }
            let shard = &shards[&k];
            let i = (p.row % per_shard) as usize;
            levels.extend_from_slice(&shard.images[i * pixels..(i + 1) * pixels]);
            if self.latents.is_some() {
                let n: usize = shape.iter().product();
                latents.extend_from_slice(&shard.latents[i * n..(i + 1) * n]);
            }
        }
        let n = patients.len() as i64;
        let x = if self.cfg.from_noise {
            None
        } else if self.latents.is_some() {
            let [c, h, w] = shape.map(|v| v as i64);
            Some(Tensor::from_slice(&latents).view([n, c, h, w]))
        } else {
            let x: Vec<f32> = levels.iter().map(|&l| from_level(l)).collect();
            Some(Tensor::from_slice(&x).view([n, 1, side, side]))
        };
        Ok(UnitInput {
            intervention,
            patients,
            x,
            levels,
            side,
        })
    }
}

struct EditUnits<'a> {
    cfg: &'a EditConfig,
    sampler: &'a Sampler,
    decoder: Option<&'a radit_models::autoencoder::LatentDecoder>,
    scm: &'a LoadedScm,
    device: Device,
    precision: Precision,
    flops_per_nfe: f64,
    parameters: i64,
    nfe_total: u64,
    batches: u64,
    written: u64,
    solve_seconds: f64,
    scm_seconds: f64,
}

impl EditUnits<'_> {
    /// Each patient's counterfactual profile under its own new value (all solved together).
    fn counterfactuals(
        &self,
        variable: &str,
        intervention: usize,
        patients: &[Patient],
    ) -> Result<(Vec<Value>, Vec<Profile>), RankError> {
        if variable == NONE {
            let same = patients.iter().map(|p| (p.labels.clone(), p.age)).collect();
            return Ok((Vec::new(), same));
        }
        let scm = &self.scm.scm;
        let index = scm.graph.index(variable).ok_or_else(|| {
            RankError::unusable(
                self.cfg.scm.display(),
                format!("the SCM's graph has no variable `{variable}`"),
            )
        })?;
        let values: Vec<Value> = patients
            .iter()
            .map(|p| {
                let draw = draw(&[self.cfg.seed, p.row, intervention as u64, 0xed17]);
                new_value(variable, &p.labels, p.age, draw)
            })
            .collect();
        let observed = radit_models::scm::io::profiles(
            &patients
                .iter()
                .map(|p| (p.labels.clone(), p.age))
                .collect::<Vec<_>>(),
        );
        // Every patient's own new value, solved in one batch.
        let cf = infer::counterfactual_each(
            scm,
            &observed,
            index,
            &values,
            infer::Missing::Keep,
            infer::default_solver(),
        )?;
        let labels = Vec::<i64>::try_from(cf.labels.flatten(0, -1)).map_err(ModelError::from)?;
        let age = Vec::<f32>::try_from(&cf.age).map_err(ModelError::from)?;
        let width = schema::NUM_LABELS;
        let out = (0..patients.len())
            .map(|j| {
                (
                    labels[j * width..(j + 1) * width]
                        .iter()
                        .map(|&c| c as u8)
                        .collect(),
                    age[j],
                )
            })
            .collect();
        Ok((values, out))
    }

    fn condition_tensors(&self, rows: &[(Vec<u8>, f32)]) -> (Tensor, Tensor) {
        let p = radit_models::scm::io::profiles(rows);
        (
            p.labels.to_device(self.device),
            p.age.to_device(self.device),
        )
    }

    fn images(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self.decoder {
            Some(d) => d.decode(x),
            None => Ok(x.to_device(Device::Cpu)),
        }
    }
}

/// A unit's images and records, written by `write`.
struct Made {
    edited: Tensor,
    /// The originals' levels: the store's images, or (from noise) the factual samples.
    originals: Vec<u16>,
    original_side: i64,
    records: Vec<EditRecord>,
}

fn write_png(path: &Path, side: i64, levels: &[u16]) -> Result<(), RankError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let png = radit_sharding::image::encode_png16(side as u32, side as u32, levels);
    write_atomic(path, |tmp| std::fs::write(tmp, &png))
}

impl UnitJob for EditUnits<'_> {
    type Unit = u64;
    type Input = UnitInput;
    type Output = Made;
    type Written = Vec<EditRecord>;

    fn is_committed(&self, unit: u64) -> Result<bool, RankError> {
        Ok(journal_path(&self.cfg.out, unit).exists())
    }

    fn compute(&mut self, _: u64, input: UnitInput) -> Result<Made, RankError> {
        let cfg = self.cfg;
        let variable = cfg.interventions[input.intervention].as_str();
        let started = Instant::now();
        let (values, edited_profiles) =
            self.counterfactuals(variable, input.intervention, &input.patients)?;
        self.scm_seconds += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let factual: Vec<(Vec<u8>, f32)> = input
            .patients
            .iter()
            .map(|p| (p.labels.clone(), p.age))
            .collect();
        let (labels, age) = self.condition_tensors(&factual);
        let (new_labels, new_age) = self.condition_tensors(&edited_profiles);
        let model = self.sampler.model.as_ref();
        let (edited, (originals, original_side), nfe) =
            tch::no_grad(|| -> Result<_, RankError> {
                Ok(match &input.x {
                    Some(x) => {
                        let e = sampler::edit(
                            model,
                            &x.to_device(self.device),
                            &labels,
                            &age,
                            &new_labels,
                            &new_age,
                            cfg.solver,
                        )?;
                        (
                            e.image,
                            (input.levels.clone(), input.side),
                            (e.abduction.nfe, e.prediction.nfe),
                        )
                    }
                    None => {
                        let rows: Vec<u64> = input.patients.iter().map(|p| p.row).collect();
                        let noise = self.sampler.noise(cfg.seed, &rows);
                        let (a, sa) = sampler::generate(model, &noise, &labels, &age, cfg.solver)?;
                        let (b, sb) =
                            sampler::generate(model, &noise, &new_labels, &new_age, cfg.solver)?;
                        let factual = self.images(&a)?;
                        let side = factual.size()[3];
                        (
                            b,
                            (crate::generate::to_u16(&factual)?, side),
                            (sa.nfe, sb.nfe),
                        )
                    }
                })
            })?;
        self.solve_seconds += started.elapsed().as_secs_f64();
        let edited = self.images(&edited)?;
        self.nfe_total += (nfe.0 + nfe.1) as u64;
        self.batches += 1;
        let values: Vec<Option<Value>> = if values.is_empty() {
            vec![None; input.patients.len()]
        } else {
            values.into_iter().map(Some).collect()
        };
        let records = input
            .patients
            .iter()
            .zip(values)
            .zip(edited_profiles)
            .map(|((p, v), (labels, age))| EditRecord {
                row: p.row,
                image_id: p.image_id.clone(),
                patient_id: p.patient_id.clone(),
                intervention: variable.to_string(),
                from: from_same(variable, p),
                to: v.map_or_else(
                    || from_same(variable, p),
                    |v| value_text(variable, &p.labels, p.age, Some(v)),
                ),
                factual_labels: p.labels.clone(),
                factual_age: p.age.is_finite().then_some(p.age),
                edited_labels: labels,
                edited_age: age.is_finite().then_some(age),
                nfe_abduction: nfe.0 as u64,
                nfe_prediction: nfe.1 as u64,
            })
            .collect();
        Ok(Made {
            edited,
            originals,
            original_side,
            records,
        })
    }

    fn out_of_memory(&self, failed: AllocationFailed, unit: u64) -> OutOfMemory {
        OutOfMemory::new(
            failed,
            format!("unit {unit}"),
            self.device,
            format!(
                "{} parameters, edit.batch {} in {:?}{}",
                self.parameters,
                self.cfg.batch,
                self.precision,
                if self.decoder.is_some() {
                    ", decoded"
                } else {
                    ""
                }
            ),
            "lower edit.batch (images solved at once)",
        )
    }

    /// Each PNG whole or not at all (a rename); the journal record commits the unit.
    fn write(&mut self, _: u64, made: Made) -> Result<Vec<EditRecord>, RankError> {
        let cfg = self.cfg;
        let side = made.edited.size()[3];
        let per = (side * side) as usize;
        let edited = crate::generate::to_u16(&made.edited)?;
        let n = (made.original_side * made.original_side) as usize;
        for (i, r) in made.records.iter().enumerate() {
            let path = cfg.out.join(edited_file(cfg.split, &r.intervention, r.row));
            write_png(&path, side, &edited[i * per..(i + 1) * per])?;
            // The same bytes for every intervention: written once.
            let path = cfg.out.join(original_file(cfg.split, r.row));
            if !path.exists() {
                write_png(
                    &path,
                    made.original_side,
                    &made.originals[i * n..(i + 1) * n],
                )?;
            }
        }
        Ok(made.records)
    }

    fn commit(&mut self, unit: u64, records: Vec<EditRecord>) -> Result<UnitWork, RankError> {
        let path = journal_path(&self.cfg.out, unit);
        let n = records.len() as u64;
        let nfe = records
            .first()
            .map_or(0, |r| r.nfe_abduction + r.nfe_prediction);
        let bytes = serde_json::to_vec(&UnitRecord {
            unit,
            edits: records,
        })
        .map_err(|e| RankError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, |tmp| std::fs::write(tmp, &bytes))?;
        self.written += n;
        Ok(UnitWork {
            images: n,
            tokens: n * self.sampler.network.tokens_per_image(),
            flops: self.flops_per_nfe * nfe as f64 * n as f64,
        })
    }
}

/// A profile's cells in the vocabulary's order then age in years (`radit_models::scm::io::rows`).
fn profile_cells(labels: &[u8], age: f32) -> Vec<String> {
    let one = radit_models::scm::io::profiles(&[(labels.to_vec(), age)]);
    radit_models::scm::io::rows(&one)
        .into_iter()
        .flatten()
        .map(|(_, v)| csv_field(&v))
        .collect()
}

/// Rank 0, after every rank's range: every unit committed, `edits.csv` from the journal in unit order, the
/// manifest marked complete.
fn finish(cfg: &EditConfig, all_units: u64, fingerprint: &Fingerprint) -> Result<(), RankError> {
    let vocab = Vocabulary::current();
    let mut names: Vec<String> = vocab.labels.clone();
    names.push("age".into());
    let mut csv = String::from(
        "file,original,image_id,patient_id,row,intervention,from,to,nfe_abduction,nfe_prediction",
    );
    for n in &names {
        csv += &format!(",{n}");
    }
    for n in &names {
        csv += &format!(",factual_{n}");
    }
    csv += "\n";
    let mut edits = 0u64;
    for u in 0..all_units {
        let path = journal_path(&cfg.out, u);
        let text = std::fs::read_to_string(&path).map_err(|_| {
            RankError::unusable(
                cfg.out.display(),
                format!(
                    "unit {u} is not committed although every rank finished: run again to resume"
                ),
            )
        })?;
        let record: UnitRecord = serde_json::from_str(&text)
            .map_err(|e| RankError::unusable(path.display(), e.to_string()))?;
        for e in record.edits {
            let mut cells = vec![
                edited_file(cfg.split, &e.intervention, e.row),
                original_file(cfg.split, e.row),
                csv_field(&e.image_id),
                csv_field(&e.patient_id),
                e.row.to_string(),
                e.intervention.clone(),
                csv_field(&e.from),
                csv_field(&e.to),
                e.nfe_abduction.to_string(),
                e.nfe_prediction.to_string(),
            ];
            cells.extend(profile_cells(
                &e.edited_labels,
                e.edited_age.unwrap_or(f32::NAN),
            ));
            cells.extend(profile_cells(
                &e.factual_labels,
                e.factual_age.unwrap_or(f32::NAN),
            ));
            csv += &(cells.join(",") + "\n");
            edits += 1;
        }
    }
    write_atomic(&cfg.out.join(EDITS_CSV), |tmp| std::fs::write(tmp, &csv))?;
    let text = serde_json::json!({ "fingerprint": fingerprint, "complete": true, "edits": edits });
    write_atomic(&cfg.out.join(crate::journal::SAMPLES_MANIFEST), |tmp| {
        std::fs::write(tmp, format!("{text:#}\n"))
    })
}

/// The edits a finished output directory lists (see [`crate::predict_eval::read_listed`]), with the original of
/// each: (edited, original) paths, the intervention, and the listed profile.
pub fn read_edits(
    out: &Path,
) -> Result<Vec<(crate::predict_eval::Listed, PathBuf, String)>, RankError> {
    let manifest = out.join(crate::journal::SAMPLES_MANIFEST);
    let text = std::fs::read_to_string(&manifest).map_err(io_error(&manifest))?;
    let complete = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["complete"].as_bool())
        .unwrap_or(false);
    if !complete {
        return Err(RankError::unusable(
            out.display(),
            "the edit job has not finished: run it again to resume",
        ));
    }
    let csv = out.join(EDITS_CSV);
    let listed = crate::predict_eval::read_listed(&csv, "")?;
    let mut reader = csv::Reader::from_path(&csv)
        .map_err(|e| RankError::unusable(csv.display(), e.to_string()))?;
    let mut extra = Vec::new();
    for record in reader.records() {
        let r = record.map_err(|e| RankError::unusable(csv.display(), e.to_string()))?;
        extra.push((
            out.join(r.get(1).unwrap_or_default()),
            r.get(5).unwrap_or_default().to_string(),
        ));
    }
    Ok(listed
        .into_iter()
        .zip(extra)
        .map(|(l, (original, intervention))| (l, original, intervention))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing age (NaN) survives the journal (JSON has no NaN: it is written as absent).
    #[test]
    fn a_record_with_a_missing_age_reads_back() {
        let r = EditRecord {
            row: 3,
            image_id: "a".into(),
            patient_id: "p".into(),
            intervention: "sex".into(),
            from: "Male".into(),
            to: "Female".into(),
            factual_labels: vec![0; 18],
            factual_age: None,
            edited_labels: vec![1; 18],
            edited_age: Some(0.5),
            nfe_abduction: 4,
            nfe_prediction: 5,
        };
        let text = serde_json::to_string(&UnitRecord {
            unit: 0,
            edits: vec![r.clone()],
        })
        .unwrap();
        let back: UnitRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.edits, [r]);
        assert_eq!(profile_cells(&[0; 18], f32::NAN).last().unwrap(), "");
    }

    #[test]
    fn new_values_differ_from_the_current_ones_as_the_design_note_says() {
        let mut labels = vec![0u8; 18];
        labels[schema::SEX_INDEX] = 1;
        labels[9] = 2; // pleural effusion positive
        for draw in 0..200 {
            assert_eq!(new_value("sex", &labels, 0.5, draw), Value::Class(2));
            assert_eq!(
                new_value("pleural_effusion", &labels, 0.5, draw),
                Value::Class(1)
            );
            // missing finding -> positive
            assert_eq!(
                new_value("cardiomegaly", &labels, 0.5, draw),
                Value::Class(2)
            );
            match new_value("race", &labels, 0.5, draw) {
                Value::Class(c) => assert!((1..=3).contains(&c)),
                v => panic!("{v:?}"),
            }
            match new_value("dataset", &labels, 0.5, draw) {
                Value::Class(c) => assert!((1..=7).contains(&c)),
                v => panic!("{v:?}"),
            }
            match new_value("age", &labels, 0.5, draw) {
                Value::Age(a) => {
                    let y = (a * 100.0).round() as i64;
                    assert!((18..=90).contains(&y) && y != 50, "{y}");
                }
                v => panic!("{v:?}"),
            }
        }
        // Every other class is drawn.
        let views: std::collections::BTreeSet<String> = (0..100)
            .map(|d| {
                let mut l = labels.clone();
                l[schema::VIEW_INDEX] = 2;
                format!("{:?}", new_value("view", &l, 0.5, draw(&[d])))
            })
            .collect();
        assert_eq!(views.len(), 2);
    }
}
