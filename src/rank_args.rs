//! What every rank's command shares: where it runs (`--device`, `--threads`), its precision flag, and its life
//! through the rank agent.

use clap::{Args, ValueEnum};
use radit_engine::collective;
use radit_engine::faults::FaultPlan;
use radit_engine::membership::{self, RankHandles};
use radit_engine::placement;
use radit_models::model::Precision;
use radit_models::tch::{self, Device};

/// Where a rank runs (`radit run` passes both to every rank of every kind of job).
#[derive(Args)]
pub struct RankArgs {
    /// cpu, cuda (this rank's GPU: its local rank modulo the GPUs it can see) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads per rank (default: this process's cores shared among the node's ranks, fewer
    /// for small work; printed at start).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

impl RankArgs {
    /// Resolves the device and sets the threads, for work of unknown size.
    pub fn device(&self) -> anyhow::Result<Device> {
        self.device_for(None)
    }

    /// Resolves the device and sets the threads for work of `flops_per_step` (see
    /// [`radit_engine::threads`]).
    pub fn device_for(&self, flops_per_step: Option<f64>) -> anyhow::Result<Device> {
        let device = device(&self.device)?;
        radit_engine::threads::apply(self.threads.map(usize::from), flops_per_step);
        Ok(device)
    }
}

/// The world the launcher's variables describe (mpirun's, Slurm's, radit's own), 1 when none do: what a rank
/// sizes its share of the work by before the group exists.
pub fn launcher_world() -> usize {
    radit_protocol::env::rank_identity(|k| std::env::var(k).ok()).map_or(1, |r| r.world)
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
        radit_engine::runtime::probe().describe_cuda()
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

/// `--device` when given, else the GPU when there is one; the threads set for this process's share of the node.
pub fn device_or_gpu(flag: Option<&str>) -> anyhow::Result<Device> {
    let default = if tch::Cuda::is_available() {
        "cuda"
    } else {
        "cpu"
    };
    let device = device(flag.unwrap_or(default))?;
    radit_engine::threads::apply(None, None);
    Ok(device)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// One rank of any job, alone or under `radit run`, through the rank agent's lifecycle
/// ([`membership::run_rank`]): the fault plan read once here, the summary (JSON) to stderr.
pub fn run_rank<S, E>(
    device: Device,
    work: impl FnOnce(Box<dyn collective::Collective>, &RankHandles) -> Result<S, E>,
    repeats: impl Fn(&E) -> bool,
) -> anyhow::Result<membership::RankDone<S>>
where
    S: serde::Serialize,
    E: std::error::Error + Send + Sync + 'static,
{
    let handles = RankHandles {
        faults: fault_plan(),
        ..RankHandles::default()
    };
    let done = membership::run_rank(device, &handles, |comm| work(comm, &handles), repeats)
        .map_err(crate::exit::unwrapped)??;
    // One write: the ranks of an mpirun share stderr, and a line written in pieces can interleave with another's.
    let line = serde_json::to_string(&done.summary)? + "\n";
    std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes())?;
    Ok(done)
}

/// The tests' fault plan (`RADIT_FAULT_*`), read only in a build with the `fault-injection` feature: in any other
/// build no environment makes a rank abort, hang or exhaust memory on purpose.
#[cfg(feature = "fault-injection")]
fn fault_plan() -> FaultPlan {
    FaultPlan::from_env()
}

#[cfg(not(feature = "fault-injection"))]
fn fault_plan() -> FaultPlan {
    FaultPlan::default()
}
