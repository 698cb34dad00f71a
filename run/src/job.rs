//! The job spec: one TOML file with everything an operator decides (data, model, training, checkpoints,
//! resources, launcher, restart policy, monitoring), validated at construction with errors that name the field, and
//! the plan it resolves to (ranks, their data slices, the launch command or script).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::kinds::{JobFolder, SectionJob, read_section};
use radit_coordinator::RestartPolicy;
use radit_jobs::edit_job::EditConfig;
use radit_jobs::encode::EncodeConfig;
use radit_jobs::features_job::FeaturesConfig;
use radit_jobs::generate_job::GenerateConfig;
use radit_jobs::recon_job::ReconConfig;
use radit_jobs::scm_fit::ScmTrainConfig;
use radit_jobs::train::preview::PreviewConfig;
use radit_jobs::train::{ConfigError, TrainConfig, ValidatedConfig};
use radit_launch::launcher::{Launcher, LocalLauncher, MpirunLauncher, SrunLauncher};
use radit_launch::slurm::{SlurmJob, render_sbatch};
use radit_protocol::REQUEUE_EXIT_CODE;
use serde::{Deserialize, Serialize};

/// A job spec that cannot be used, with the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{file}: {reason}")]
    Unreadable { file: PathBuf, reason: String },
    /// A setting that cannot work: the file, and the field and why.
    #[error("{}: {}: {}", file.display(), error.field, error.reason)]
    Invalid { file: PathBuf, error: ConfigError },
}

/// The ranks would fail at their start: found before any starts (or before the Slurm queue).
#[derive(Debug, thiserror::Error)]
#[error("{}: checked before launch, the ranks would fail at their start", file.display())]
pub struct LaunchCheckError {
    pub file: PathBuf,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// One job file: the work's sections beside the job's own ([job], [resources], [launcher], [restart],
/// [coordinator], [monitoring], [samples]). A training job's work is the train config's sections ([data], [model],
/// [flow], [engine], [train], [checkpoint]; checkpoints are needed for restarts and requeues to resume); an encode
/// job's (`[job] kind = "encode"`) is `[encode]`, a generate job's (`kind = "generate"`) is `[generate]`, each
/// resumed from its journal. The work is one value, read by its own
/// type; `radit run` writes it for the ranks as it was validated here.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub work: Work,
    pub job: JobSection,
    pub resources: Resources,
    pub launcher: LauncherSpec,
    pub restart: RestartPolicy,
    pub coordinator: CoordinatorSpec,
    pub monitoring: MonitoringSpec,
    pub samples: SampleSpec,
}

/// What the ranks of a job do.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Train(Box<TrainConfig>),
    Encode(EncodeConfig),
    Generate(Box<GenerateConfig>),
    Features(Box<FeaturesConfig>),
    Scm(Box<ScmTrainConfig>),
    Recon(Box<ReconConfig>),
    Edit(Box<EditConfig>),
}

impl Work {
    /// The work of a kind that is one section (every kind but training).
    pub fn section_job(&self) -> Option<&dyn SectionJob> {
        match self {
            Work::Train(_) => None,
            Work::Encode(e) => Some(e),
            Work::Generate(g) => Some(&**g),
            Work::Features(f) => Some(&**f),
            Work::Scm(s) => Some(&**s),
            Work::Recon(r) => Some(&**r),
            Work::Edit(e) => Some(&**e),
        }
    }

    fn section_job_mut(&mut self) -> Option<&mut dyn SectionJob> {
        match self {
            Work::Train(_) => None,
            Work::Encode(e) => Some(e),
            Work::Generate(g) => Some(&mut **g),
            Work::Features(f) => Some(&mut **f),
            Work::Scm(s) => Some(&mut **s),
            Work::Recon(r) => Some(&mut **r),
            Work::Edit(e) => Some(&mut **e),
        }
    }
}

/// `[job] kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Train,
    /// Training RadVAE (Scratch): a train job whose model is `[model] preset = "radvae"` or `[model.vae]`.
    #[serde(rename = "vae-train")]
    VaeTrain,
    /// Fine-tuning a released autoencoder's decoder (RadVAE (LoRA)): a train job whose model is
    /// `[model.finetune]`.
    #[serde(rename = "vae-finetune")]
    VaeFinetune,
    /// Training a metadata predictor: a train job whose model is `[model.predictor]`.
    Predictor,
    Encode,
    Generate,
    Features,
    Scm,
    /// An autoencoder's reconstructions of a split, with PSNR and SSIM: `[recon]`.
    Recon,
    /// Counterfactual edits of a split's patients: `[edit]`.
    Edit,
}

/// The job's own sections, as they are read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSections {
    job: JobSection,
    resources: Resources,
    launcher: LauncherSpec,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    coordinator: CoordinatorSpec,
    #[serde(default)]
    monitoring: MonitoringSpec,
    #[serde(default)]
    samples: SampleSpec,
}

/// The top-level sections that belong to the job rather than to the train config.
pub const RUN_SECTIONS: [&str; 7] = [
    "job",
    "resources",
    "launcher",
    "restart",
    "coordinator",
    "monitoring",
    "samples",
];

/// The top-level sections a job file may have for its kind, checked before they are read by type, so that a
/// mistyped or missing section is named as one (with the section that was meant) rather than as a field of
/// another, and a training config given to `radit run` is told apart from a job file.
fn check_job_sections(all: &toml::Table) -> Result<(), String> {
    if all.contains_key("sweep") {
        return Err(
            "this job spec has a [sweep]: `radit run FILE` runs its runs (each run's own spec is written to \
             <run_dir>/sweep/); give one of those here"
                .into(),
        );
    }
    let train_sections = radit_jobs::train::TrainConfig::SECTIONS;
    if !all.contains_key("job") && train_sections.iter().any(|s| all.contains_key(*s)) {
        return Err(
            "this is a training config (it has no [job] section): run it with `radit train --config FILE`, or \
             make it a job file by adding [job], [resources] and [launcher] (`radit quickstart` writes one: \
             radit-quickstart/job.toml; see also examples/radit-xl-job.toml)"
                .into(),
        );
    }
    let kind = all
        .get("job")
        .and_then(|j| j.get("kind"))
        .and_then(|k| k.as_str())
        .unwrap_or("train");
    let mut known: Vec<&str> = RUN_SECTIONS.to_vec();
    match kind {
        "train" | "vae-train" | "vae-finetune" | "predictor" => {
            known.extend(train_sections.iter().filter(|s| **s != "preview"))
        }
        "encode" | "generate" | "features" | "scm" | "recon" | "edit" => known.push(kind),
        // The kind itself is checked, and named, when [job] is read.
        _ => return Ok(()),
    }
    let found = all.keys().map(String::as_str).filter(|k| *k != "preview");
    radit_protocol::config::check_sections(found, &known, &["job", "resources", "launcher"])
        .map_err(|e| format!("[{}]: {}", e.field, e.reason))
}

impl JobSpec {
    /// Reads a job file's text: the job's sections by their types, everything else by the train config's.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let mut all: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        check_job_sections(&all)?;
        if all.contains_key("preview") {
            return Err(
                "[preview] is set by [samples] in a job file (samples.every, samples.count)".into(),
            );
        }
        let mut own = toml::Table::new();
        for key in RUN_SECTIONS {
            if let Some(v) = all.remove(key) {
                own.insert(key.into(), v);
            }
        }
        let r: RunSections = own.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        let work = match r.job.kind {
            JobKind::Train | JobKind::VaeTrain | JobKind::VaeFinetune | JobKind::Predictor => {
                Work::Train(Box::new(
                    all.try_into().map_err(|e: toml::de::Error| e.to_string())?,
                ))
            }
            JobKind::Encode => Work::Encode(read_section(all, "encode", "an encode job")?),
            JobKind::Generate => Work::Generate(read_section(all, "generate", "a generate job")?),
            JobKind::Features => Work::Features(read_section(all, "features", "a features job")?),
            JobKind::Scm => Work::Scm(read_section(all, "scm", "an scm job")?),
            JobKind::Recon => Work::Recon(read_section(all, "recon", "a recon job")?),
            JobKind::Edit => Work::Edit(read_section(all, "edit", "an edit job")?),
        };
        Ok(Self {
            work,
            job: r.job,
            resources: r.resources,
            launcher: r.launcher,
            restart: r.restart,
            coordinator: r.coordinator,
            monitoring: r.monitoring,
            samples: r.samples,
        })
    }

    /// The job file's text (the inverse of [`JobSpec::from_toml`]).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let own = RunSections {
            job: self.job.clone(),
            resources: self.resources.clone(),
            launcher: self.launcher.clone(),
            restart: self.restart.clone(),
            coordinator: self.coordinator.clone(),
            monitoring: self.monitoring.clone(),
            samples: self.samples.clone(),
        };
        let mut all = match self.work.section_job() {
            Some(s) => s.to_table()?,
            None => match &self.work {
                Work::Train(t) => toml::Table::try_from(&**t)?,
                _ => toml::Table::new(),
            },
        };
        all.extend(toml::Table::try_from(&own)?);
        toml::to_string(&all)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    /// train (default), encode, generate, features or scm.
    #[serde(default, skip_serializing_if = "is_train")]
    pub kind: JobKind,
    /// The run's directory on a filesystem every node sees: the token file, the resolved train config, rank logs,
    /// the Slurm script and output, the final samples. Relative paths are relative to the job file.
    pub run_dir: PathBuf,
}

/// CPU ranks (`cpu_ranks`), or GPUs (`nodes` x `gpus_per_node`, one rank per GPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub nodes: u32,
    #[serde(default)]
    pub gpus_per_node: Option<u32>,
    #[serde(default)]
    pub cpu_ranks: Option<u32>,
    /// libtorch threads per rank.
    #[serde(default)]
    pub threads_per_rank: Option<u32>,
    /// Slurm `--cpus-per-task` (Isambard-AI: 72 cores per GH200).
    #[serde(default)]
    pub cpus_per_task: Option<u32>,
}

fn is_train(k: &JobKind) -> bool {
    *k == JobKind::Train
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// Rank processes on this machine, talking over loopback TCP (CPU) or NCCL (GPUs).
    Local,
    /// One `mpirun` for all ranks (MPI carries CPU collectives and the NCCL bootstrap).
    Mpirun,
    /// An sbatch job: `radit run` submits it and follows it; inside, one srun task per GPU.
    Slurm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherSpec {
    pub kind: LauncherKind,
    /// Extra `mpirun` arguments (e.g. `["--bind-to", "none"]`).
    #[serde(default)]
    pub mpirun_args: Vec<String>,
    #[serde(default)]
    pub slurm: SlurmSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default = "default_time_limit")]
    pub time_limit: String,
    /// Seconds before the time limit at which Slurm warns (USR1): every rank checkpoints and the job requeues.
    #[serde(default = "default_warn")]
    pub warn_seconds: u32,
    /// Extra environment for the ranks (added to the Slingshot NCCL settings on GPU jobs).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Environment modules the batch script loads first (`module load ...`), e.g. the site's NCCL with its
    /// libfabric plugin (`brics/nccl` on Isambard-AI); the Slingshot NCCL settings are exported only when the
    /// plugin is then on the library path.
    #[serde(default)]
    pub modules: Vec<String>,
    /// How often `radit run` polls squeue while following the job.
    #[serde(default = "default_poll")]
    pub poll_seconds: f64,
}

impl Default for SlurmSpec {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            time_limit: default_time_limit(),
            warn_seconds: default_warn(),
            env: Default::default(),
            modules: Vec::new(),
            poll_seconds: default_poll(),
        }
    }
}

fn default_time_limit() -> String {
    "24:00:00".into()
}
fn default_warn() -> u32 {
    300
}
fn default_poll() -> f64 {
    5.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSpec {
    /// The one address the coordinator listens on (`IP:PORT`; port 0 picks a free one). `hostname:PORT` resolves
    /// this machine's hostname (the first node of a Slurm job), for ranks on other nodes.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// HTTPS with a certificate authority made for this run (its certificate in `RUN_DIR/coordinator-ca.pem`,
    /// pinned by the ranks by SHA-256). Default: on when the job spans nodes (the token then crosses the network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            tls: None,
        }
    }
}

impl CoordinatorSpec {
    /// Whether the coordinator serves HTTPS for a job of `nodes` nodes.
    pub fn tls_for(&self, nodes: u32) -> bool {
        self.tls.unwrap_or(nodes > 1)
    }
}

fn default_bind() -> String {
    "127.0.0.1:0".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSpec {
    /// Seconds between progress lines on stderr (0: none).
    #[serde(default = "default_progress")]
    pub progress_seconds: f64,
    /// Peak dense TFLOP/s of one device, for MFU (default on GPUs: 989, the H100/GH200 dense bf16 peak; none on
    /// CPU ranks).
    #[serde(default)]
    pub peak_tflops_per_device: Option<f64>,
    /// A Prometheus Pushgateway (`http://host:9091`) the coordinator pushes the job's metrics to, under
    /// `job=<job.name>`, every `push_seconds`; the series are deleted when `radit run` ends.
    #[serde(default)]
    pub pushgateway: Option<String>,
    #[serde(default = "default_push_seconds")]
    pub push_seconds: f64,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            progress_seconds: default_progress(),
            peak_tflops_per_device: None,
            pushgateway: None,
            push_seconds: default_push_seconds(),
        }
    }
}

fn default_push_seconds() -> f64 {
    15.0
}

fn default_progress() -> f64 {
    5.0
}

/// Samples drawn from the final EMA weights when the run completes, and a contact sheet every `every` steps
/// during training (in `run_dir/samples/progress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSpec {
    /// How many (0: none at the end). The sheets during training show as many, at most 64 (16 when 0).
    #[serde(default)]
    pub count: u64,
    /// A contact sheet every this many steps while training (0: none).
    #[serde(default)]
    pub every: u64,
    /// Euler steps.
    #[serde(default = "default_sample_steps")]
    pub steps: usize,
    /// For a latent model: `[samples.decoder]` (weights, autoencoder, batch) turns the samples and the sheets into
    /// images, de-standardised with the store's training statistics. Relative weights are relative to the job file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<radit_models::autoencoder::DecoderConfig>,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            count: 0,
            every: 0,
            steps: default_sample_steps(),
            decoder: None,
        }
    }
}

fn default_sample_steps() -> usize {
    50
}

/// The train config every rank runs: the job's, with [samples] as its preview.
/// A training job's store and checkpoint URLs and its files, relative to the job file's folder.
fn absolute_train_paths(t: &mut TrainConfig, folder: &JobFolder) {
    t.data.url = folder.url(&t.data.url);
    if let Some(c) = &mut t.checkpoint {
        c.url = folder.url(&c.url);
    }
    if let Some(v) = t.validation.as_mut() {
        if let Some(fd) = v.fd.as_mut() {
            fd.reference = fd.reference.as_deref().map(|p| folder.path(p));
            fd.net = folder.path(&fd.net);
        }
        v.best = v.best.as_deref().map(|p| folder.path(p));
    }
    if let Some(net) = t
        .reconstruction
        .as_mut()
        .and_then(|r| r.perceptual_net.as_mut())
    {
        *net = folder.path(net);
    }
    if let Some(f) = t.model.finetune.as_mut() {
        f.base = folder.path(&f.base);
    }
    if let Some(b) = t.model.predictor.as_mut().and_then(|p| p.backbone.as_mut()) {
        *b = folder.path(b);
    }
}

fn train_config_of(s: &JobSpec, training: &TrainConfig, run_dir: &Path) -> TrainConfig {
    TrainConfig {
        preview: (s.samples.every > 0).then(|| PreviewConfig {
            every: s.samples.every,
            dir: run_dir.join("samples").join("progress"),
            count: if s.samples.count > 0 {
                s.samples.count.min(64)
            } else {
                16
            },
            steps: s.samples.steps,
            seed: 0,
            decoder: s.samples.decoder.clone(),
        }),
        ..training.clone()
    }
}

/// What the ranks run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankDevice {
    Cpu,
    Cuda,
}

/// A validated job: the spec, where it came from, and what it resolves to.
#[derive(Debug, Clone)]
pub struct Job {
    pub spec: JobSpec,
    pub file: PathBuf,
    /// `job.run_dir`, made absolute.
    pub run_dir: PathBuf,
    pub world: u32,
    pub ranks_per_node: u32,
    pub device: RankDevice,
    /// What every rank runs (written to `run_dir/train.toml` or `run_dir/encode.toml`), validated once, here.
    pub work: ValidatedWork,
}

/// A job's work, validated.
#[derive(Debug, Clone)]
pub enum ValidatedWork {
    Train(Box<ValidatedConfig>),
    /// A kind that is one section, validated (never [`Work::Train`]).
    Section(Work),
}

impl ValidatedWork {
    /// The work of a kind that is one section.
    pub fn section_job(&self) -> Option<&dyn SectionJob> {
        match self {
            ValidatedWork::Train(_) => None,
            ValidatedWork::Section(w) => w.section_job(),
        }
    }
}

impl Job {
    /// Reads and validates a job file.
    pub fn load(file: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(file).map_err(|e| JobError::Unreadable {
            file: file.into(),
            reason: e.to_string(),
        })?;
        let spec = JobSpec::from_toml(&text).map_err(|reason| JobError::Unreadable {
            file: file.into(),
            reason,
        })?;
        Self::new(spec, file)
    }

    pub fn new(mut spec: JobSpec, file: &Path) -> Result<Self, JobError> {
        let bad = |field: &str, reason: String| JobError::Invalid {
            file: file.into(),
            error: ConfigError::new(field, reason),
        };
        let r = &spec.resources;
        let (world, ranks_per_node, device) = match (r.cpu_ranks, r.gpus_per_node) {
            (Some(n), None) if n > 0 => {
                if r.nodes != 1 && spec.launcher.kind == LauncherKind::Local {
                    return Err(bad(
                        "resources.nodes",
                        "the local launcher runs on one node".into(),
                    ));
                }
                (n * r.nodes, n, RankDevice::Cpu)
            }
            (None, Some(g)) if g > 0 && r.nodes > 0 => (g * r.nodes, g, RankDevice::Cuda),
            (Some(_), Some(_)) => {
                return Err(bad(
                    "resources",
                    "give cpu_ranks (ranks per node) or gpus_per_node, not both".into(),
                ));
            }
            _ => {
                return Err(bad(
                    "resources",
                    "give a positive cpu_ranks or gpus_per_node (and nodes)".into(),
                ));
            }
        };
        if spec.job.name.is_empty()
            || !spec
                .job
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(
                "job.name",
                format!("`{}`: use letters, digits, - _ .", spec.job.name),
            ));
        }
        // Paths and store URLs in the job file are relative to it.
        let folder = JobFolder::of(file);
        let absolute = |p: &Path| folder.path(p);
        let run_dir = absolute(&spec.job.run_dir);
        if let Some(d) = &mut spec.samples.decoder {
            d.validate("samples.decoder")
                .map_err(|e| bad(&e.field, e.reason))?;
            d.weights = absolute(&d.weights);
        }
        match &mut spec.work {
            Work::Train(t) => absolute_train_paths(t, &folder),
            w => {
                if let Some(s) = w.section_job_mut() {
                    s.make_paths_absolute(&folder);
                }
            }
        }
        let work = match &spec.work {
            Work::Train(training) => ValidatedWork::Train(Box::new(
                train_config_of(&spec, training, &run_dir)
                    .validated()
                    .and_then(|t| t.validate_for_world(u64::from(world)).map(|()| t))
                    .map_err(|e| {
                        // The job spec's [samples] becomes the train config's [preview].
                        let field = match e.field.strip_prefix("preview.") {
                            Some(rest) => format!("samples.{rest}"),
                            None => e.field,
                        };
                        bad(&field, e.reason)
                    })
                    .and_then(|t| {
                        use radit_models::network::Architecture as A;
                        let (wants, kind) = match spec.job.kind {
                            JobKind::VaeTrain => (matches!(t.model(), A::RadVae(_)), "vae-train"),
                            JobKind::VaeFinetune => {
                                (matches!(t.model(), A::VaeFinetune(_)), "vae-finetune")
                            }
                            JobKind::Predictor => (matches!(t.model(), A::Predictor(_)), "predictor"),
                            _ => (true, ""),
                        };
                        if wants {
                            Ok(t)
                        } else {
                            Err(bad(
                                "job.kind",
                                format!(
                                    "{kind} trains {}, but the model is {}: set [job] kind = \"train\" or \
                                     give that model",
                                    match kind {
                                        "vae-train" => "RadVAE ([model] preset = \"radvae\" or [model.vae])",
                                        "predictor" => "a metadata predictor ([model.predictor])",
                                        _ => "a decoder fine-tune ([model.finetune])",
                                    },
                                    t.model().name()
                                ),
                            ))
                        }
                    })
                    .and_then(|t| match t.model().role() {
                        radit_models::network::Role::Autoencoder
                        | radit_models::network::Role::Predictor
                            if spec.samples != SampleSpec::default() =>
                        {
                            Err(bad(
                                "samples",
                                format!(
                                    "{} draws no samples: remove [samples] (its best \
                                     weights are [validation] best)",
                                    t.model().name()
                                ),
                            ))
                        }
                        _ => Ok(t),
                    })?,
            )),
            other => {
                if let Some(s) = other.section_job() {
                    s.validate().map_err(|e| bad(&e.field, e.reason))?;
                    if spec.samples != SampleSpec::default() {
                        return Err(bad("samples", s.why_no_samples().into()));
                    }
                }
                ValidatedWork::Section(other.clone())
            }
        };
        if let (ValidatedWork::Train(t), Some(_)) = (&work, &spec.samples.decoder)
            && t.model().in_channels() == 1
        {
            return Err(bad(
                "samples.decoder",
                "is for latent models; this model makes images".into(),
            ));
        }
        let checkpoint = match work.section_job() {
            Some(s) => s.resumable().then_some(()),
            None => match &work {
                ValidatedWork::Train(t) => t.checkpoint.as_ref().map(|_| ()),
                ValidatedWork::Section(_) => None,
            },
        };
        if spec.restart.max_restarts > 0 && checkpoint.is_none() {
            return Err(bad(
                "checkpoint",
                "restarts resume from checkpoints: add a [checkpoint] section or set restart.max_restarts = 0"
                    .into(),
            ));
        }
        spec.restart.check().map_err(|e| bad(&e.field, e.reason))?;
        let poll = spec.launcher.slurm.poll_seconds;
        if !(poll.is_finite() && poll > 0.0) {
            return Err(bad(
                "launcher.slurm.poll_seconds",
                format!("must be a positive number of seconds, got {poll}"),
            ));
        }
        if spec.monitoring.progress_seconds.is_nan() || spec.monitoring.progress_seconds < 0.0 {
            return Err(bad("monitoring.progress_seconds", "must be >= 0".into()));
        }
        let m = &spec.monitoring;
        if !m.push_seconds.is_finite() || m.push_seconds < 0.1 {
            return Err(bad(
                "monitoring.push_seconds",
                format!("must be a number of seconds >= 0.1, got {}", m.push_seconds),
            ));
        }
        if let Some(p) = m.peak_tflops_per_device
            && !(p.is_finite() && p > 0.0)
        {
            return Err(bad(
                "monitoring.peak_tflops_per_device",
                format!("must be a positive number of TFLOP/s, got {p}"),
            ));
        }
        if let Some(url) = &spec.monitoring.pushgateway {
            radit_monitoring::Pushgateway::new(url, &spec.job.name, &[])
                .map_err(|e| bad("monitoring.pushgateway", e.to_string()))?;
        }
        if spec.launcher.kind == LauncherKind::Local && r.nodes != 1 {
            return Err(bad(
                "resources.nodes",
                "the local launcher runs on one node".into(),
            ));
        }
        if spec.launcher.kind == LauncherKind::Slurm
            && r.nodes > 1
            && spec.coordinator.bind.starts_with("127.")
        {
            return Err(bad(
                "coordinator.bind",
                format!(
                    "`{}` is loopback, which ranks on other nodes cannot reach: use hostname:PORT or the node's address",
                    spec.coordinator.bind
                ),
            ));
        }
        if spec.samples.count > 0 && checkpoint.is_none() {
            return Err(bad(
                "samples.count",
                "samples are drawn from the final checkpoint: add a [checkpoint] section".into(),
            ));
        }
        Ok(Self {
            spec,
            file: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
            run_dir,
            world,
            ranks_per_node,
            device,
            work,
        })
    }

    /// The training config, for a training job.
    pub fn train(&self) -> Option<&ValidatedConfig> {
        match &self.work {
            ValidatedWork::Train(t) => Some(t),
            _ => None,
        }
    }

    /// Where the ranks' config is written, named by their command: `train.toml`, `encode.toml`, `generate.toml`,
    /// `eval-features.toml` or `scm-train.toml` in the run directory.
    pub fn rank_config_path(&self) -> PathBuf {
        self.run_dir
            .join(format!("{}.toml", self.rank_command().join("-")))
    }

    /// The radit (sub)command every rank runs.
    fn rank_command(&self) -> &'static [&'static str] {
        match (self.work.section_job(), self.spec.job.kind) {
            (Some(s), _) => s.rank_command(),
            (None, JobKind::VaeTrain) => &["vae", "train"],
            (None, JobKind::VaeFinetune) => &["vae", "finetune"],
            (None, JobKind::Predictor) => &["predictors", "train"],
            (None, _) => &["train"],
        }
    }

    /// What every rank checks at its start (the store, its samples against the model, the splits, the weights'
    /// presets), checked once here: lines saying what was checked.
    pub fn check_before_launch(&self) -> Result<Vec<String>, LaunchCheckError> {
        let world = u64::from(self.world);
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| LaunchCheckError {
            file: self.file.clone(),
            source,
        };
        let line = match (&self.work, self.work.section_job()) {
            (ValidatedWork::Train(t), _) => {
                radit_jobs::train::check_before_launch(t, world).map_err(|e| failed(Box::new(e)))?
            }
            (_, Some(s)) => s.check_before_launch(world).map_err(failed)?,
            (ValidatedWork::Section(_), None) => String::new(),
        };
        let mut lines = vec![line];
        if let Some(d) = &self.spec.samples.decoder {
            let ae = radit_models::autoencoder::resolve(&d.autoencoder, &d.weights)
                .map_err(|e| failed(Box::new(e)))?;
            lines.push(format!(
                "samples.decoder {}: the {} autoencoder",
                d.weights.display(),
                ae.preset_name().unwrap_or("custom")
            ));
        }
        Ok(lines)
    }

    /// The ranks' config, as they read it.
    pub fn rank_config_toml(&self) -> Result<String, toml::ser::Error> {
        match (&self.work, self.work.section_job()) {
            (ValidatedWork::Train(t), _) => toml::to_string(&***t),
            (_, Some(s)) => toml::to_string(&s.to_table()?),
            (ValidatedWork::Section(_), None) => Ok(String::new()),
        }
    }

    /// The steps the slowest rank has to finish: the training steps, an encode job's most shards per rank or a
    /// generate job's most units per rank (these read the store).
    pub fn total_steps(&self) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        let world = u64::from(self.world);
        match (&self.work, self.work.section_job()) {
            (ValidatedWork::Train(t), _) => Ok(t.train.steps),
            (_, Some(s)) => s.planned_steps(world),
            (ValidatedWork::Section(_), None) => Ok(0),
        }
    }

    pub fn token_path(&self) -> PathBuf {
        self.run_dir.join("job.token")
    }

    /// Peak FLOP/s of one device for MFU: the configured one, else the GH200's dense bf16 peak on GPUs.
    pub fn peak_flops_per_device(&self) -> Option<f64> {
        let tflops = self
            .spec
            .monitoring
            .peak_tflops_per_device
            .or(match self.device {
                RankDevice::Cuda => Some(989.0),
                RankDevice::Cpu => None,
            });
        tflops.map(|t| t * 1e12)
    }

    /// The arguments after the radit binary that every rank runs.
    pub fn rank_args(&self) -> Vec<String> {
        let mut args: Vec<String> = self.rank_command().iter().map(|c| c.to_string()).collect();
        args.extend([
            "--config".into(),
            self.rank_config_path().display().to_string(),
            "--device".into(),
            match self.device {
                RankDevice::Cpu => "cpu".into(),
                RankDevice::Cuda => "cuda".into(),
            },
        ]);
        if let Some(t) = self.spec.resources.threads_per_rank {
            args.extend(["--threads".into(), t.to_string()]);
        }
        if let ValidatedWork::Train(_) = self.work {
            args.extend([
                "--metrics".into(),
                self.run_dir.join("metrics.csv").display().to_string(),
            ]);
        }
        args
    }

    /// The launcher that starts this job's ranks from here: `None` for a Slurm job outside its allocation (it is
    /// submitted with sbatch, and its batch script runs `radit run --in-allocation`, which launches with srun).
    pub fn launcher(&self, in_allocation: bool) -> Option<Box<dyn Launcher>> {
        match (self.spec.launcher.kind, in_allocation) {
            (LauncherKind::Local, _) => Some(Box::new(LocalLauncher)),
            (LauncherKind::Mpirun, _) => Some(Box::new(MpirunLauncher {
                extra_args: self.spec.launcher.mpirun_args.clone(),
            })),
            (LauncherKind::Slurm, true) => Some(Box::new(SrunLauncher {
                tasks_per_node: self.ranks_per_node,
                gpus_per_task: u32::from(self.device == RankDevice::Cuda),
                cpus_per_task: self.cpus_per_task(),
            })),
            (LauncherKind::Slurm, false) => None,
        }
    }

    /// The sbatch job for this spec (`radit` is the binary's absolute path).
    pub fn slurm_job(&self, radit: &str) -> SlurmJob {
        let s = &self.spec;
        let mut job = SlurmJob::isambard(
            &s.job.name,
            s.resources.nodes,
            &self.run_dir.display().to_string(),
            radit,
            &self.file.display().to_string(),
        );
        job.tasks_per_node = self.ranks_per_node;
        job.gpus_per_node = match self.device {
            RankDevice::Cuda => self.ranks_per_node,
            RankDevice::Cpu => 0,
        };
        job.cpus_per_task = self.cpus_per_task();
        job.time_limit = s.launcher.slurm.time_limit.clone();
        job.partition = s.launcher.slurm.partition.clone();
        job.account = s.launcher.slurm.account.clone();
        job.warn_seconds = s.launcher.slurm.warn_seconds;
        job.env = s.launcher.slurm.env.clone();
        job.modules = s.launcher.slurm.modules.clone();
        job
    }

    /// Slurm `--cpus-per-task`: `[resources] cpus_per_task`, else 72 per GH200 (Isambard-AI) or 1 per CPU rank.
    pub fn cpus_per_task(&self) -> u32 {
        self.spec
            .resources
            .cpus_per_task
            .unwrap_or(if self.device == RankDevice::Cpu {
                1
            } else {
                72
            })
    }

    fn describe_training(&self, t: &ValidatedConfig, o: &mut String) {
        let m = t.model();
        let count = match (m, m.parameters()) {
            (radit_models::network::Architecture::VaeFinetune(f), 0) => format!(
                "trainable parameters counted once {} is readable",
                f.base.display()
            ),
            (radit_models::network::Architecture::VaeFinetune(_), n) => {
                format!("{n} trainable parameters")
            }
            (radit_models::network::Architecture::Predictor(p), 0) => format!(
                "trainable parameters counted once {} is readable",
                p.backbone
                    .as_deref()
                    .unwrap_or(std::path::Path::new("its backbone"))
                    .display()
            ),
            (radit_models::network::Architecture::Predictor(p), n) => {
                format!("{n} trainable parameters, {} variant", p.variant.name())
            }
            (_, n) => format!("{n} parameters"),
        };
        let _ = writeln!(
            o,
            "model: {}{} ({count}){}",
            m.name(),
            t.model
                .preset
                .as_deref()
                .map_or(String::new(), |p| format!(" {p}")),
            t.reconstruction.as_ref().map_or(String::new(), |r| format!(
                "; objective {} x L1 + {} x KL + {} x Rad-DINO perceptual",
                r.l1, r.kl, r.perceptual
            ))
        );
        let per_rank = t.train.global_batch / u64::from(self.world);
        let _ = writeln!(
            o,
            "training: {} steps, global batch {} ({} per rank per step in {} micro-batch(es)), seed {}",
            t.train.steps, t.train.global_batch, per_rank, t.train.micro_batches, t.train.seed
        );
        let _ = writeln!(o, "data: {} split {:?}", t.data.url, t.data.split);
        let _ = writeln!(
            o,
            "data slices: the global batch of step k is samples [k*{b}, (k+1)*{b}) of the seeded order; rank r takes [r*{per_rank}, (r+1)*{per_rank}) of it",
            b = t.train.global_batch
        );
        for r in 0..self.world.min(8) {
            let first = u64::from(r) * per_rank;
            let _ = writeln!(
                o,
                "  rank {r}: batch positions {first}..{}",
                first + per_rank - 1
            );
        }
        if self.world > 8 {
            let _ = writeln!(o, "  ... ({} ranks in all)", self.world);
        }
        match &t.checkpoint {
            Some(c) => {
                let _ = writeln!(
                    o,
                    "checkpoints: {} every {} steps, keep {}",
                    c.url, c.every, c.keep
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "checkpoints: none (a stopped run starts again from scratch)"
                );
            }
        }
    }

    /// The resolved plan, as `--dry-run` prints it.
    pub fn describe(&self, radit: &str) -> String {
        let s = &self.spec;
        let mut o = String::new();
        let _ = writeln!(o, "job {} ({})", s.job.name, self.file.display());
        let _ = writeln!(o, "run directory: {}", self.run_dir.display());
        let _ = writeln!(
            o,
            "ranks: {} = {} node(s) x {} {} rank(s), launcher {:?}",
            self.world,
            s.resources.nodes,
            self.ranks_per_node,
            match self.device {
                RankDevice::Cpu => "CPU",
                RankDevice::Cuda => "GPU",
            },
            s.launcher.kind
        );
        match (&self.work, self.work.section_job()) {
            (ValidatedWork::Train(t), _) => self.describe_training(t, &mut o),
            (_, Some(job)) => job.describe(self.world, &mut o),
            (ValidatedWork::Section(_), None) => {}
        }
        let p = &s.restart;
        let _ = writeln!(
            o,
            "restarts: up to {}; a rank is dead after {} missed heartbeats of {} s; a hang is {} x the median step time (at least {} s); ranks that lose the coordinator for {} s checkpoint and exit {}",
            p.max_restarts,
            p.missed_heartbeats,
            p.heartbeat_seconds,
            p.hang_factor,
            p.hang_min_seconds,
            p.coordinator_grace_seconds,
            REQUEUE_EXIT_CODE
        );
        let _ = writeln!(
            o,
            "rank group: waits {} s for every rank to join, then {} s for a peer in any collective",
            p.rendezvous_seconds, p.collective_timeout_seconds
        );
        let _ = writeln!(
            o,
            "coordinator: binds {} ({})",
            s.coordinator.bind,
            if s.coordinator.tls_for(s.resources.nodes) {
                "HTTPS, with a certificate authority made for the run: RUN_DIR/coordinator-ca.pem"
            } else {
                "plain HTTP: the job stays on one node"
            }
        );
        let _ = writeln!(o, "launch:");
        let rank_cmd = format!("{radit} {}", self.rank_args().join(" "));
        match s.launcher.kind {
            LauncherKind::Local => {
                for r in 0..self.world {
                    let _ = writeln!(o, "  RADIT_RANK={r} RADIT_WORLD={} {rank_cmd}", self.world);
                }
            }
            LauncherKind::Mpirun => {
                let _ = writeln!(
                    o,
                    "  mpirun -np {} {} {rank_cmd}",
                    self.world,
                    s.launcher.mpirun_args.join(" ")
                );
            }
            LauncherKind::Slurm => {
                let _ = writeln!(
                    o,
                    "  sbatch {}/job.sbatch, which is:",
                    self.run_dir.display()
                );
                o.push_str(&render_sbatch(&self.slurm_job(radit)));
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str, text: &str) {
        radit_testkit::assert_golden(env!("CARGO_MANIFEST_DIR"), name, text);
    }

    #[test]
    fn the_encode_examples_are_encode_jobs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let xl = Job::load(&dir.join("encode-xl-job.toml")).unwrap();
        assert_eq!((xl.world, xl.device), (32, RankDevice::Cuda));
        assert_eq!(xl.rank_args()[..2], ["encode", "--config"]);
        assert!(xl.rank_config_path().ends_with("encode.toml"));
        let ValidatedWork::Section(Work::Encode(e)) = &xl.work else {
            panic!("an encode job")
        };
        assert_eq!(
            (e.autoencoder.as_str(), e.precision),
            ("flux2", Some(radit_models::model::Precision::Bf16))
        );
        assert!(xl.train().is_none());
        let text = xl.rank_config_toml().unwrap();
        assert!(text.starts_with("[encode]"), "{text}");
        // A job file's own text reads back to the same spec.
        let again = JobSpec::from_toml(&xl.spec.to_toml().unwrap()).unwrap();
        assert_eq!(again, xl.spec);
        let tiny = Job::load(&dir.join("encode-tiny-job.toml")).unwrap();
        let ValidatedWork::Section(Work::Encode(e)) = &tiny.work else {
            panic!("an encode job")
        };
        // Relative to the job file.
        assert!(e.weights.is_absolute() && e.weights.ends_with("examples/tiny-ae.safetensors"));
        // Training sections in an encode job are named, not ignored.
        let wrong = format!(
            "{}\n[model]\npreset = \"tiny\"\n",
            std::fs::read_to_string(dir.join("encode-tiny-job.toml")).unwrap()
        );
        let err = JobSpec::from_toml(&wrong).unwrap_err();
        assert!(err.contains("model"), "{err}");
    }

    #[test]
    fn the_radvae_example_trains_an_autoencoder_on_its_objective_and_wrong_sections_are_named() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let file = dir.join("radvae-job.toml");
        let job = Job::load(&file).unwrap();
        let train = job.train().unwrap();
        assert_eq!(
            train.model().role(),
            radit_models::network::Role::Autoencoder
        );
        assert_eq!(train.model().parameters(), 88_305_024);
        let r = train.reconstruction.as_ref().unwrap();
        assert_eq!((r.l1, r.kl, r.perceptual), (1.0, 0.0, 250.0));
        assert_eq!(
            (train.engine.adam.lr, train.engine.adam.weight_decay),
            (1e-4, 1e-4)
        );
        assert_eq!(
            (train.engine.adam.warmup_steps, train.train.global_batch),
            (4000, 192)
        );
        assert_eq!(train.engine.ema_decay, 0.9999);
        assert_eq!(job.rank_args()[..3], ["vae", "train", "--config"]);
        let text = std::fs::read_to_string(&file).unwrap();
        let load = |t: &str| {
            let path = std::env::temp_dir().join(format!(
                "radvae-{}-{}.toml",
                std::process::id(),
                t.len()
            ));
            std::fs::write(&path, t).unwrap();
            let out = Job::load(&path).map(|_| ()).map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&path);
            out
        };
        let cases = [
            (text.replace("[reconstruction]", "[unused]"), "unused"),
            (
                text.replace("l1 = 1.0\nkl = 0.0", "l1 = 1.0\nkl = -1.0"),
                "reconstruction.kl",
            ),
            (
                text.replace("mode = \"ddp\"", "mode = \"zero3\""),
                "engine.mode",
            ),
            (format!("{text}\n[samples]\ncount = 4\n"), "samples"),
            (
                text.replace("kind = \"vae-train\"", "kind = \"vae-finetune\""),
                "job.kind",
            ),
            (format!("{text}\n[flow]\nshift = 3.0\n"), "remove [flow]"),
            (
                text.replace(
                    "[model]\npreset = \"radvae\"",
                    "[model]\npreset = \"unet-pixel\"",
                ),
                "[reconstruction] is an autoencoder's objective",
            ),
        ];
        for (wrong, needle) in cases {
            assert_ne!(wrong, text, "{needle}: the case changed nothing");
            let err = load(&wrong).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let without = text.replace(
            text.get(text.find("[reconstruction]").unwrap()..text.find("[engine]").unwrap())
                .unwrap(),
            "",
        );
        let err = load(&without).unwrap_err();
        assert!(
            err.contains("is an autoencoder: give its objective"),
            "{err}"
        );
    }

    #[test]
    fn the_generate_example_is_a_generate_job() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let xl = Job::load(&dir.join("generate-xl-job.toml")).unwrap();
        assert_eq!((xl.world, xl.device), (32, RankDevice::Cuda));
        assert_eq!(xl.rank_args()[..2], ["generate", "--config"]);
        assert!(xl.rank_config_path().ends_with("generate.toml"));
        let ValidatedWork::Section(Work::Generate(g)) = &xl.work else {
            panic!("a generate job")
        };
        assert_eq!(g.limit, Some(50_000));
        assert!(g.decoder.is_some());
        let text = xl.rank_config_toml().unwrap();
        assert!(text.starts_with("[generate]"), "{text}");
        let again = JobSpec::from_toml(&xl.spec.to_toml().unwrap()).unwrap();
        assert_eq!(again, xl.spec);
        // [samples] belongs to training jobs.
        let wrong = format!(
            "{}\n[samples]\nevery = 10\n",
            std::fs::read_to_string(dir.join("generate-xl-job.toml")).unwrap()
        );
        let spec = JobSpec::from_toml(&wrong).unwrap();
        let err = Job::new(spec, &dir.join("generate-xl-job.toml")).unwrap_err();
        assert!(err.to_string().contains("samples"), "{err}");
    }

    #[test]
    fn the_scm_example_is_an_scm_job() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let job = Job::load(&dir.join("scm-job.toml")).unwrap();
        assert_eq!(job.rank_args()[..3], ["scm", "train", "--config"]);
        assert!(job.rank_config_path().ends_with("scm-train.toml"));
        let ValidatedWork::Section(Work::Scm(s)) = &job.work else {
            panic!("an scm job")
        };
        assert_eq!((s.steps, s.batch, s.model.width), (50_000, 4096, 512));
        let text = job.rank_config_toml().unwrap();
        assert!(text.starts_with("[scm]"), "{text}");
        assert_eq!(
            JobSpec::from_toml(&job.spec.to_toml().unwrap()).unwrap(),
            job.spec
        );
    }

    #[test]
    fn the_xl_job_spec_renders_its_golden_script() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/radit-xl-job.toml");
        let mut job = Job::load(&example).unwrap();
        // Paths as on the cluster, so the golden file does not depend on where this repository lives.
        job.file = "/scratch/radit/xl/job.toml".into();
        let text = render_sbatch(&job.slurm_job("/home/u/radit/bin/radit"));
        assert!(
            text.contains(
                "#SBATCH --nodes=8\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4"
            )
        );
        assert!(text.contains("#SBATCH --signal=B:USR1@300"));
        assert!(text.contains("#SBATCH --account=brics.a5k"));
        assert!(text.contains("  export NCCL_NET='AWS Libfabric'"));
        assert!(text.contains("  export FI_MR_CACHE_MONITOR=userfaultfd"));
        assert!(text.contains("\nexport NCCL_DEBUG=WARN"));
        assert!(text.contains("\nmodule load brics/nccl\nset -uo pipefail"));
        assert!(text.contains("radit run /scratch/radit/xl/job.toml --in-allocation &"));
        golden("sbatch-xl.sh", &text);
    }

    /// Loads `text` as a job file (written to a temporary file); the error's text.
    fn load_text(tag: &str, t: &str) -> Result<Job, String> {
        let path =
            std::env::temp_dir().join(format!("{tag}-{}-{}.toml", std::process::id(), t.len()));
        std::fs::write(&path, t).unwrap();
        let out = Job::load(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        out
    }

    #[test]
    fn the_predictor_example_is_the_papers_recipe_and_wrong_sections_are_named() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/predictors/rad-dino-ap-job.toml");
        let job = Job::load(&file).unwrap();
        let train = job.train().unwrap();
        assert_eq!(train.model().role(), radit_models::network::Role::Predictor);
        match train.model() {
            radit_models::network::Architecture::Predictor(p) => {
                assert_eq!(p.variant, radit_models::predictor::Variant::AttentionPool);
                assert_eq!(p.layers, [3, 6, 9, 12]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            (
                train.train.global_batch,
                train.train.steps,
                train.engine.ema_decay
            ),
            (360, 25_000, 0.999)
        );
        assert_eq!(
            (
                train.engine.adam.lr,
                train.engine.adam.weight_decay,
                train.engine.adam.warmup_steps
            ),
            (1e-4, 1e-4, 100)
        );
        assert_eq!(job.rank_args()[..3], ["predictors", "train", "--config"]);
        let text = std::fs::read_to_string(&file).unwrap();
        let cases = [
            (format!("{text}\n[flow]\nshift = 3.0\n"), "remove [flow]"),
            (
                format!("{text}\n[samples]\ncount = 4\n"),
                "draws no samples",
            ),
            (
                format!("{text}\n[reconstruction]\nl1 = 1.0\n"),
                "remove [reconstruction]",
            ),
            (
                text.replace("kind = \"predictor\"", "kind = \"vae-train\""),
                "job.kind",
            ),
            (
                text.replace("backbone = \"/projects/radit/rad-dino\"", ""),
                "model.predictor.backbone",
            ),
            (
                text.replace("layers = [3, 6, 9, 12]", "layers = [3, 3]"),
                "model.predictor.layers",
            ),
        ];
        for (wrong, needle) in cases {
            assert_ne!(wrong, text, "{needle}: the case changed nothing");
            let err = load_text("predictor", &wrong).map(|_| ()).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn the_edit_example_plans_the_papers_edits_and_a_wrong_variable_is_named() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/edit-xl-job.toml");
        let job = Job::load(&file).unwrap();
        assert_eq!(job.rank_args()[..2], ["edit", "--config"]);
        let text = std::fs::read_to_string(&file).unwrap();
        let wrong = text.replace("\"pleural_effusion\"]", "\"effusion\"]");
        assert_ne!(wrong, text);
        let err = load_text("edit", &wrong).map(|_| ()).unwrap_err();
        assert!(
            err.contains("edit.interventions") && err.contains("effusion"),
            "{err}"
        );
        let twice = text.replace("\"pleural_effusion\"]", "\"sex\"]");
        let err = load_text("edit", &twice).map(|_| ()).unwrap_err();
        assert!(err.contains("`sex` twice"), "{err}");
    }
}
