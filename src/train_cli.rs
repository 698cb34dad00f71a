//! `radit train` and `radit export`: thin argument parsing over radit_jobs::train and the checkpointer.

use std::path::PathBuf;

use crate::rank_args::{RankArgs, device, run_rank};
use anyhow::Context;
use clap::Args;
use radit_engine::checkpoint;
use radit_engine::collective;
use radit_engine::fsdp::EngineConfig;
use radit_jobs::train::metrics_csv::MetricsCsv;
use radit_jobs::train::{TrainConfig, TrainError, train};
use radit_models::network::Architecture;
use radit_models::tch::Device;

#[derive(Args)]
pub struct TrainArgs {
    /// The run's TOML config (data, model, flow, engine, train, checkpoint).
    #[arg(long)]
    config: PathBuf,
    /// Append one row per logged step here (step, loss, validation loss, FD, gradient norm, lr, images/s);
    /// default: metrics.csv in the checkpoint directory when it is local.
    #[arg(long)]
    metrics: Option<PathBuf>,
    #[command(flatten)]
    rank: RankArgs,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The checkpoint directory URL (as in the run's [checkpoint] url).
    checkpoint: String,
    /// Output safetensors file (PyTorch parameter names, the model config in the metadata).
    #[arg(long)]
    out: PathBuf,
    /// Export the raw weights instead of the EMA.
    #[arg(long)]
    raw: bool,
}

/// A model kind's own training command (`radit vae train`, `radit vae finetune`, `radit predictors train`):
/// `radit train` for a config whose model `fits`; another model is a usage error naming the one `wanted`.
pub fn run_train_of(
    a: TrainArgs,
    fits: impl Fn(&radit_models::network::Architecture) -> bool,
    wanted: &str,
) -> anyhow::Result<u8> {
    let cfg = TrainConfig::load(&a.config)?;
    crate::exit::ensure_usage!(
        fits(cfg.model()),
        "{}: the model is {}; this command trains {wanted} (`radit train` trains any model)",
        a.config.display(),
        cfg.model().name()
    );
    train_with(a, cfg)
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<u8> {
    let cfg = TrainConfig::load(&a.config)?;
    train_with(a, cfg)
}

/// This process as a training rank of `cfg` (read from `a.config`, once).
fn train_with(a: TrainArgs, cfg: radit_jobs::train::ValidatedConfig) -> anyhow::Result<u8> {
    // One rank's step: its share of the global batch through the forward and backward.
    let world = crate::rank_args::launcher_world();
    let model = cfg.model();
    let flops = model.training_flops_per_token()
        * model.tokens_per_image() as f64
        * (cfg.train.global_batch as f64 / world as f64);
    let device = a.rank.device_for(Some(flops))?;
    let metrics_path = a.metrics.clone().or_else(|| {
        let url = &cfg.checkpoint.as_ref()?.url;
        (!url.contains("://")).then(|| PathBuf::from(url).join("metrics.csv"))
    });
    let done = run_rank(
        device,
        |comm, handles| {
            let rank = comm.rank();
            // A metrics file that cannot be written costs its rows, not the run.
            let mut csv = metrics_path
                .as_ref()
                .filter(|_| rank == 0)
                .and_then(|path| match MetricsCsv::open(path) {
                    Ok(c) => {
                        tracing::info!(file = %path.display(), "step metrics (CSV)");
                        Some(c)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, file = %path.display(), "cannot open the metrics CSV");
                        None
                    }
                });
            train(&cfg, comm, device, handles.clone(), |log| {
                if rank == 0 {
                    println!("{}", serde_json::to_string(log).unwrap_or_default());
                }
                let failed = csv.as_mut().and_then(|c| c.append(log).err());
                if let Some(e) = failed {
                    tracing::warn!(error = %e, "cannot write the metrics CSV: no more rows");
                    csv = None;
                }
            })
        },
        TrainError::repeats,
    )?;
    // 75: "checkpointed, requeue me" (the same code the sbatch script requeues on).
    Ok(crate::exit::done_or_requeue(
        done.summary.stopped_for_requeue,
    ))
}

pub fn run_export(a: ExportArgs) -> anyhow::Result<u8> {
    let (model, step, weights) = checkpoint::read_weights(&a.checkpoint, !a.raw)?;
    // A velocity network's model file, or an autoencoder's file (`radit encode`, `radit decode`).
    model.save_trained(&weights, &[], &a.out)?;
    println!(
        "wrote {} ({} weights of step {step})",
        a.out.display(),
        if a.raw { "raw" } else { "EMA" },
    );
    Ok(0)
}

#[derive(clap::Subcommand)]
pub enum SelftestCommand {
    /// Run the collective conformance suite on this rank group (e.g. under mpirun -np 4).
    Collectives {
        #[arg(long, default_value = "cpu")]
        device: String,
        /// NCCL even in a world of one (where training needs none): whether NCCL starts on this GPU.
        #[arg(long)]
        nccl: bool,
    },
    /// The same engine steps on --device and on the CPU (fp32 by default), and a checkpoint round trip on
    /// --device: prints a JSON report and exits 1 when they disagree.
    Parity {
        #[command(flatten)]
        run: EngineSteps,
        /// Where the device's checkpoint is written.
        #[arg(long)]
        checkpoint: PathBuf,
    },
}

pub fn run_selftest(cmd: SelftestCommand) -> anyhow::Result<u8> {
    match cmd {
        SelftestCommand::Collectives { device: name, nccl } => {
            let device = device(&name)?;
            let comm = match (nccl, device) {
                (true, Device::Cuda(gpu)) => collective::joined_from_environment()
                    .and_then(|base| collective::nccl_over(base, gpu)),
                (true, _) => crate::exit::bail_usage!("--nccl goes with --device cuda"),
                (false, _) => collective::from_environment(device),
            }
            .context("joining the rank group")?;
            let (rank, world) = (comm.rank(), comm.world());
            // Called directly, then as training calls it (CPU ranks: from the communication thread).
            let verdict = collective::conformance::run(comm.as_ref(), device).and_then(|()| {
                let comm =
                    collective::threaded::overlapping(comm, device).map_err(|e| e.to_string())?;
                collective::conformance::run(comm.as_ref(), device)
            });
            match verdict {
                Ok(()) => {
                    println!("rank {rank}/{world}: conformance ok");
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("rank {rank}/{world}: conformance FAILED: {e}");
                    Ok(1)
                }
            }
        }
        SelftestCommand::Parity { run, checkpoint } => {
            let (network, engine, device) = run.resolve()?;
            let Architecture::RadiT(model) = network else {
                crate::exit::bail_usage!(
                    "the parity check runs RadiT presets (b-latent, xl-latent, tiny, ...)"
                );
            };
            let check = radit_jobs::parity::ParityCheck {
                model,
                engine,
                batch: run.batch,
                steps: run.steps,
                checkpoint_dir: checkpoint,
            };
            let report = radit_jobs::parity::run(&check, device)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(if report.passed { 0 } else { 1 })
        }
    }
}

#[derive(clap::Subcommand)]
pub enum EngineCommand {
    /// Step time, tokens/s, MFU and bytes communicated per step of the FSDP engine on synthetic inputs (run it
    /// under mpirun for several ranks); --checkpoint DIR adds a checkpoint's stall and write bandwidth.
    Bench(EngineBenchArgs),
}

/// A preset's engine steps on synthetic inputs: what the engine benchmark and the parity check run.
#[derive(Args)]
pub struct EngineSteps {
    preset: String,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 8)]
    batch: i64,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value = "fp32")]
    precision: crate::rank_args::PrecisionArg,
    /// zero3 or zero2 (sharded, RadiT), or ddp (data-parallel, any network; a U-Net's only mode).
    #[arg(long)]
    mode: Option<String>,
}

impl EngineSteps {
    /// The network, the engine's settings and the device; without --mode, zero3 for RadiT and ddp for a U-Net.
    fn resolve(&self) -> anyhow::Result<(Architecture, EngineConfig, Device)> {
        crate::exit::ensure_usage!(
            self.batch > 0 && self.steps > 0,
            "--batch and --steps must be positive"
        );
        let network = Architecture::preset(&self.preset)?;
        let mode = match self.mode.as_deref() {
            None if network.is_chain() => radit_engine::fsdp::ShardingMode::Zero3,
            None | Some("ddp") => radit_engine::fsdp::ShardingMode::Ddp,
            Some("zero3") => radit_engine::fsdp::ShardingMode::Zero3,
            Some("zero2") => radit_engine::fsdp::ShardingMode::Zero2,
            Some(other) => {
                crate::exit::bail_usage!("--mode `{other}`: expected zero3, zero2 or ddp")
            }
        };
        let engine = EngineConfig {
            mode,
            precision: self.precision.into(),
            ..EngineConfig::default()
        };
        Ok((network, engine, device(&self.device)?))
    }
}

#[derive(Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    run: EngineSteps,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// One device's dense peak in TFLOP/s (989: H100/GH200 bf16).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// libtorch intra-op threads (default: this process's cores shared among the node's ranks, fewer for small
    /// work).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

pub fn run_engine(cmd: EngineCommand) -> anyhow::Result<u8> {
    let EngineCommand::Bench(a) = cmd;
    let (model, engine, device) = a.run.resolve()?;
    let flops =
        model.training_flops_per_token() * model.tokens_per_image() as f64 * a.run.batch as f64;
    radit_engine::threads::apply(a.threads.map(usize::from), Some(flops));
    let bench = radit_jobs::bench::EngineBench {
        model,
        engine,
        batch: a.run.batch,
        steps: a.run.steps,
        warmup: a.warmup,
        peak_tflops: a.peak_tflops,
        checkpoint_dir: a.checkpoint,
    };
    let comm = collective::from_environment(device).context("joining the rank group")?;
    let mode = format!("{:?}", bench.engine.mode).to_lowercase();
    let report = radit_jobs::bench::run_guarded(&bench, comm, device, (&a.run.preset, &mode))
        .map_err(|oom| anyhow::Error::new(*oom))??;
    if report.rank == 0 {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(0)
}
