//! `radit train` and `radit export`: thin argument parsing over radit_trainer::train and the checkpointer.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use radit_trainer::checkpoint;
use radit_trainer::collective;
use radit_trainer::engine::EngineConfig;
use radit_trainer::faults::Faults;
use radit_trainer::membership;
use radit_trainer::model::{RadiTConfig, save_named_weights};
use radit_trainer::placement;
use radit_trainer::tch::{self, Device};
use radit_trainer::train::{RunHandles, StepHook, TrainConfig, train};

#[derive(Args)]
pub struct TrainArgs {
    /// The run's TOML config (data, model, flow, engine, train, checkpoint).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    rank: RankArgs,
}

/// Where a rank runs (`radit run` passes both to every rank of every kind of job).
#[derive(Args)]
pub struct RankArgs {
    /// cpu, cuda (this rank's GPU: its local rank modulo the GPUs it can see) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads per rank.
    #[arg(long)]
    threads: Option<i32>,
}

impl RankArgs {
    /// Sets the threads and resolves the device.
    pub fn device(&self) -> anyhow::Result<Device> {
        if let Some(t) = self.threads {
            tch::set_num_threads(t);
        }
        device(&self.device)
    }
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

/// Every `--device`: `cpu`; `cuda`, this rank's GPU among those the process sees (see [`placement`]); or
/// `cuda:N`, that GPU.
pub fn device(name: &str) -> anyhow::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let explicit =
        match name.strip_prefix("cuda:") {
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                crate::exit::usage!("--device `{name}`: expected cpu, cuda or cuda:N")
            })?),
            None if name == "cuda" => None,
            None => crate::exit::bail_usage!("--device `{name}`: expected cpu, cuda or cuda:N"),
        };
    crate::exit::ensure_usage!(
        tch::Cuda::is_available(),
        "--device {name}: libtorch sees no CUDA device here ({})",
        radit_trainer::runtime::probe().describe_cuda()
    );
    let visible = tch::Cuda::device_count().max(0) as usize;
    let ordinal = match explicit {
        Some(n) => {
            crate::exit::ensure_usage!(
                n < visible,
                "--device {name}: this process sees {visible} CUDA device(s)"
            );
            n
        }
        None => placement::cuda_ordinal(
            &placement::local_placement(|k| std::env::var(k).ok()),
            visible,
        )?,
    };
    Ok(Device::Cuda(ordinal))
}

/// One rank of a journaled job (encode, generate), alone or under `radit run`: joins the rank group, runs `work`
/// and leaves. An error the same inputs would repeat (`repeats`) is reported to the coordinator, which then does
/// not relaunch, and ends the rank with exit 2. The summary goes to stderr. Returns the summary and this rank, or
/// the exit code.
pub fn run_journaled_rank<S: serde::Serialize, E: std::error::Error + Send + Sync + 'static>(
    device: Device,
    handles: &radit_trainer::journal::RankHandles,
    work: impl FnOnce(&dyn collective::Collective) -> Result<S, E>,
    repeats: impl Fn(&E) -> bool,
) -> anyhow::Result<Result<(S, usize), u8>> {
    let (comm, membership) = join_rank_group(device, &handles.stop, &handles.progress)?;
    let rank = comm.rank();
    let summary = match work(comm.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            if let (true, Some(m)) = (repeats(&e), membership) {
                let why = format!("{:#}", anyhow::Error::new(e));
                tracing::error!(rank, error = %why, "the rank failed");
                eprintln!("radit: rank {rank}: {why}");
                m.fail(why);
                return Ok(Err(crate::exit::BAD_INPUT));
            }
            return Err(e.into());
        }
    };
    eprintln!("{}", serde_json::to_string(&summary)?);
    if let Some(m) = membership {
        m.leave();
    }
    Ok(Ok((summary, rank)))
}

/// A rank's group and, under `radit run`, its membership (the coordinator hands out ranks and peers; otherwise
/// MPI or a world of one). SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption) set `stop`:
/// checkpoint and requeue.
pub fn join_rank_group(
    device: Device,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: &radit_trainer::progress::Progress,
) -> anyhow::Result<(
    Box<dyn collective::Collective>,
    Option<membership::Membership>,
)> {
    for signal in [signal_hook::consts::SIGUSR1, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("installing the signal handlers")?;
    }
    Ok(
        match membership::join_run(device, stop.clone(), progress.clone())? {
            Some(j) => (j.comm, Some(j.membership)),
            None => (
                collective::from_environment(device).context("joining the rank group")?,
                None,
            ),
        },
    )
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<u8> {
    let cfg = TrainConfig::load(&a.config)?;
    let device = a.rank.device()?;
    let handles = RunHandles {
        step_hook: Faults::from_env().map(|f| Box::new(f) as Box<dyn StepHook>),
        ..RunHandles::default()
    };
    let (comm, membership) = join_rank_group(device, &handles.stop, &handles.progress)?;
    let rank = comm.rank();
    let trained = train(&cfg, comm, device, handles, |log| {
        if rank == 0 {
            println!("{}", serde_json::to_string(log).unwrap_or_default());
        }
    });
    let summary = match trained {
        Err(e) if e.repeats() => {
            // Not an infrastructure failure: the supervisor must not relaunch it, and the operator must see why
            // (the whole chain: "training data: shard object ... is missing").
            let e = anyhow::Error::new(e);
            let why = format!("{e:#}");
            tracing::error!(rank, error = %why, "a relaunch would fail the same way");
            if let Some(m) = membership {
                m.fail(why);
            }
            return Err(e);
        }
        other => other?,
    };
    if rank == 0 {
        eprintln!("{}", serde_json::to_string(&summary)?);
    }
    if let Some(m) = membership {
        m.leave();
    }
    // 75: "checkpointed, requeue me" (the same code the sbatch script requeues on).
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

pub fn run_export(a: ExportArgs) -> anyhow::Result<u8> {
    let (model, step, weights) = checkpoint::read_weights(&a.checkpoint, !a.raw)?;
    save_named_weights(&weights, &model, &a.out)?;
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
            let (model, engine, device) = run.resolve()?;
            let check = radit_trainer::engine::parity::ParityCheck {
                model,
                engine,
                batch: run.batch,
                steps: run.steps,
                checkpoint_dir: checkpoint,
            };
            let report = radit_trainer::engine::parity::run(&check, device)?;
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
    precision: crate::model_cli::PrecisionArg,
    /// zero3 or zero2.
    #[arg(long, default_value = "zero3")]
    mode: String,
}

impl EngineSteps {
    fn resolve(&self) -> anyhow::Result<(RadiTConfig, EngineConfig, Device)> {
        crate::exit::ensure_usage!(
            self.batch > 0 && self.steps > 0,
            "--batch and --steps must be positive"
        );
        let mode = match self.mode.as_str() {
            "zero3" => radit_trainer::engine::ShardingMode::Zero3,
            "zero2" => radit_trainer::engine::ShardingMode::Zero2,
            other => crate::exit::bail_usage!("--mode `{other}`: expected zero3 or zero2"),
        };
        let engine = EngineConfig {
            mode,
            precision: self.precision.into(),
            ..EngineConfig::default()
        };
        Ok((
            RadiTConfig::preset(&self.preset)?,
            engine,
            device(&self.device)?,
        ))
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
    #[arg(long)]
    threads: Option<i32>,
}

pub fn run_engine(cmd: EngineCommand) -> anyhow::Result<u8> {
    let EngineCommand::Bench(a) = cmd;
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let (model, engine, device) = a.run.resolve()?;
    let bench = radit_trainer::engine::bench::EngineBench {
        model,
        engine,
        batch: a.run.batch,
        steps: a.run.steps,
        warmup: a.warmup,
        peak_tflops: a.peak_tflops,
        checkpoint_dir: a.checkpoint,
    };
    let comm = collective::from_environment(device).context("joining the rank group")?;
    let oom = |e: Box<dyn std::error::Error + Send + Sync>| {
        radit_trainer::out_of_memory::OutOfMemory::new(
            e,
            "the benchmark's steps",
            device,
            format!(
                "model {} ({} parameters), --batch {} per rank, precision {:?}, mode {}",
                a.run.preset,
                bench.model.parameter_count().total(),
                bench.batch,
                bench.engine.precision,
                a.run.mode
            ),
            "lower --batch, or run on more ranks (each holds 1/world of the training state)",
        )
    };
    let report = match radit_trainer::out_of_memory::guard(|| {
        radit_trainer::engine::bench::run(&bench, comm, device)
    }) {
        Err(failed) => return Err(oom(failed.into()).into()),
        Ok(Err(e)) if radit_trainer::out_of_memory::in_chain(&e) => {
            return Err(oom(e.into()).into());
        }
        Ok(r) => r?,
    };
    if report.rank == 0 {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(0)
}
