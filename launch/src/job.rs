//! The job spec: one TOML file with everything an operator decides (data, model, training, checkpoints,
//! resources, launcher, restart policy, monitoring), validated at construction with errors that name the field, and
//! the plan it resolves to (ranks, their data slices, the launch command or script).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use radit_trainer::checkpoint::CheckpointConfig;
use radit_trainer::engine::EngineConfig;
use radit_trainer::flow::FlowConfig;
use radit_trainer::preview::PreviewConfig;
use radit_trainer::train::{DataConfig, LoopConfig, ModelChoice, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::slurm::{SlurmJob, render_sbatch};

/// A job spec that cannot be used, with the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{file}: {reason}")]
    Unreadable { file: PathBuf, reason: String },
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobSection,
    pub data: DataConfig,
    pub model: ModelChoice,
    #[serde(default)]
    pub flow: FlowConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    pub train: LoopConfig,
    /// Where checkpoints go; needed for restarts and requeues to resume.
    pub checkpoint: Option<CheckpointConfig>,
    pub resources: Resources,
    pub launcher: LauncherSpec,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub coordinator: CoordinatorSpec,
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    #[serde(default)]
    pub samples: SampleSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
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

/// What happens when a rank fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Relaunches of every rank from the last committed checkpoint before the run is declared failed.
    #[serde(default = "default_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: f64,
    /// A rank silent for this many heartbeats is dead.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
    /// No step finished for `hang_factor` x the median step time (and at least `hang_min_seconds`): a hang.
    #[serde(default = "default_hang_factor")]
    pub hang_factor: f64,
    #[serde(default = "default_hang_min")]
    pub hang_min_seconds: f64,
    /// The hang deadline until the first step is done (building the model, loading a checkpoint).
    #[serde(default = "default_hang_startup")]
    pub hang_startup_seconds: f64,
    /// Ranks that cannot reach the coordinator for this long checkpoint and exit with the requeue code.
    #[serde(default = "default_grace")]
    pub coordinator_grace_seconds: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: default_restarts(),
            heartbeat_seconds: default_heartbeat(),
            missed_heartbeats: default_missed(),
            hang_factor: default_hang_factor(),
            hang_min_seconds: default_hang_min(),
            hang_startup_seconds: default_hang_startup(),
            coordinator_grace_seconds: default_grace(),
        }
    }
}

fn default_restarts() -> u32 {
    3
}
fn default_heartbeat() -> f64 {
    5.0
}
fn default_missed() -> u32 {
    3
}
fn default_hang_factor() -> f64 {
    10.0
}
fn default_hang_min() -> f64 {
    300.0
}
fn default_hang_startup() -> f64 {
    900.0
}
fn default_grace() -> f64 {
    60.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSpec {
    /// The one address the coordinator listens on (`IP:PORT`; port 0 picks a free one). `hostname:PORT` resolves
    /// this machine's hostname (the first node of a Slurm job), for ranks on other nodes.
    #[serde(default = "default_bind")]
    pub bind: String,
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        Self {
            bind: default_bind(),
        }
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
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            count: 0,
            every: 0,
            steps: default_sample_steps(),
        }
    }
}

fn default_sample_steps() -> usize {
    50
}

/// The training part of a job spec, as `radit train` reads it.
fn train_config_of(s: &JobSpec, run_dir: &Path) -> TrainConfig {
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
        }),
        data: s.data.clone(),
        model: s.model.clone(),
        flow: s.flow,
        engine: s.engine.clone(),
        train: s.train.clone(),
        checkpoint: s.checkpoint.clone(),
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
}

impl Job {
    /// Reads and validates a job file.
    pub fn load(file: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(file).map_err(|e| JobError::Unreadable {
            file: file.into(),
            reason: e.to_string(),
        })?;
        let spec: JobSpec = toml::from_str(&text).map_err(|e| JobError::Unreadable {
            file: file.into(),
            reason: e.to_string(),
        })?;
        Self::new(spec, file)
    }

    pub fn new(spec: JobSpec, file: &Path) -> Result<Self, JobError> {
        let bad = |field: &str, reason: String| JobError::Invalid {
            file: file.into(),
            field: field.into(),
            reason,
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
        let train = train_config_of(&spec, &spec.job.run_dir);
        train
            .validate()
            .and_then(|_| train.validate_for_world(u64::from(world)))
            .map_err(|e| match e {
                radit_trainer::train::TrainError::InvalidConfig { field, reason } => {
                    // The job spec's [samples] becomes the train config's [preview].
                    let field = match field.strip_prefix("preview.") {
                        Some(rest) => format!("samples.{rest}"),
                        None => field,
                    };
                    bad(&field, reason)
                }
                other => bad("model", format!("{other:#}")),
            })?;
        if spec.restart.max_restarts > 0 && spec.checkpoint.is_none() {
            return Err(bad(
                "checkpoint",
                "restarts resume from checkpoints: add a [checkpoint] section or set restart.max_restarts = 0"
                    .into(),
            ));
        }
        let p = &spec.restart;
        for (field, v) in [
            ("restart.heartbeat_seconds", p.heartbeat_seconds),
            ("restart.hang_factor", p.hang_factor),
            ("restart.hang_min_seconds", p.hang_min_seconds),
            ("restart.hang_startup_seconds", p.hang_startup_seconds),
            (
                "restart.coordinator_grace_seconds",
                p.coordinator_grace_seconds,
            ),
            (
                "launcher.slurm.poll_seconds",
                spec.launcher.slurm.poll_seconds,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(
                    field,
                    format!("must be a positive number of seconds, got {v}"),
                ));
            }
        }
        if p.missed_heartbeats == 0 {
            return Err(bad("restart.missed_heartbeats", "must be positive".into()));
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
        if spec.samples.count > 0 && spec.checkpoint.is_none() {
            return Err(bad(
                "samples.count",
                "samples are drawn from the final checkpoint: add a [checkpoint] section".into(),
            ));
        }
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let run_dir = if spec.job.run_dir.is_absolute() {
            spec.job.run_dir.clone()
        } else {
            let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
            base.join(&spec.job.run_dir)
        };
        Ok(Self {
            spec,
            file: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
            run_dir,
            world,
            ranks_per_node,
            device,
        })
    }

    /// The train config every rank runs (written to `run_dir/train.toml`).
    pub fn train_config(&self) -> TrainConfig {
        train_config_of(&self.spec, &self.run_dir)
    }

    pub fn train_config_path(&self) -> PathBuf {
        self.run_dir.join("train.toml")
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

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.spec.restart.heartbeat_seconds)
    }

    /// The arguments after the radit binary that every rank runs.
    pub fn rank_args(&self) -> Vec<String> {
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            self.train_config_path().display().to_string(),
            "--device".into(),
            match self.device {
                RankDevice::Cpu => "cpu".into(),
                RankDevice::Cuda => "cuda".into(),
            },
        ];
        if let Some(t) = self.spec.resources.threads_per_rank {
            args.extend(["--threads".into(), t.to_string()]);
        }
        args
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

    /// The resolved plan, as `--dry-run` prints it.
    pub fn describe(&self, radit: &str) -> String {
        let s = &self.spec;
        let mut o = String::new();
        let model = s.model.resolve().ok();
        let _ = writeln!(o, "job {} ({})", s.job.name, self.file.display());
        let _ = writeln!(o, "run directory: {}", self.run_dir.display());
        if let Some(m) = &model {
            let _ = writeln!(
                o,
                "model: {} ({} parameters)",
                s.model.preset.as_deref().unwrap_or("custom"),
                m.parameter_count().total()
            );
        }
        let per_rank = s.train.global_batch / u64::from(self.world);
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
        let _ = writeln!(
            o,
            "training: {} steps, global batch {} ({} per rank per step in {} micro-batch(es)), seed {}",
            s.train.steps, s.train.global_batch, per_rank, s.train.micro_batches, s.train.seed
        );
        let _ = writeln!(o, "data: {} split {:?}", s.data.url, s.data.split);
        let _ = writeln!(
            o,
            "data slices: the global batch of step k is samples [k*{b}, (k+1)*{b}) of the seeded order; rank r takes [r*{per_rank}, (r+1)*{per_rank}) of it",
            b = s.train.global_batch
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
        match &s.checkpoint {
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
            crate::slurm::REQUEUE_EXIT_CODE
        );
        let _ = writeln!(o, "coordinator: binds {}", s.coordinator.bind);
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
