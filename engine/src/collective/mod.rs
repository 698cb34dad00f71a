//! Collectives behind one small trait, so the engine never knows what carries its bytes: MPI for CPU tensors
//! ([`mpi::MpiCollective`]), NCCL for GPU tensors ([`nccl`]), and an in-process group of threads for unit tests
//! ([`local::LocalGroup`]), and a TCP star for CPU ranks started without MPI ([`tcp::TcpCollective`]). One
//! conformance suite ([`conformance`]) runs against each. CPU ranks run their collectives on a communication
//! thread ([`threaded`]) so that started ones overlap compute.
//!
//! Every method is collective: all ranks of the group call it, in the same order, with tensors of the same shape
//! and kind. Tensors are contiguous and one-dimensional. Reductions are sums in rank order.

pub mod conformance;
pub mod counting;
pub mod local;
pub mod mpi;
pub mod nccl;
pub mod nccl_lib;
pub mod observed;
pub mod phase;
pub mod rendezvous;
pub mod tcp;
pub mod threaded;

use tch::{Kind, Tensor};

/// How long a rank group waits: `rendezvous`, for every rank to arrive when the group forms (ranks of a
/// multi-node job start minutes apart), and `operation`, for a peer in each collective after that (a hang is
/// caught earlier by the coordinator; this is the backstop when it is gone). A single duration is both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub rendezvous: std::time::Duration,
    pub operation: std::time::Duration,
}

impl Timeouts {
    /// The defaults of a job's `[restart]` section.
    pub const DEFAULT: Timeouts = Timeouts {
        rendezvous: std::time::Duration::from_secs(1800),
        operation: std::time::Duration::from_secs(900),
    };
}

impl From<std::time::Duration> for Timeouts {
    fn from(both: std::time::Duration) -> Self {
        Self {
            rendezvous: both,
            operation: both,
        }
    }
}

/// What can go wrong in a collective.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// A peer did not arrive within the timeout (it hung, or is still in an earlier collective).
    #[error("collective `{op}` timed out after {seconds} s waiting for a peer")]
    Timeout { op: &'static str, seconds: u64 },
    /// A peer left the group (its process or thread ended): the job has to restart.
    #[error("rank {rank} left the group during `{op}`")]
    RankFailed { op: &'static str, rank: usize },
    /// The caller broke the contract (shape, kind, device); a bug, not an infrastructure failure.
    #[error("collective `{op}`: {reason}")]
    Usage { op: &'static str, reason: String },
    /// The backend's library is not there (no libnccl / libcuda / MPI on this machine).
    #[error("collective backend `{backend}` is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// The backend reported an error.
    #[error("collective backend `{backend}` failed in `{op}`: {reason}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    /// The launcher's variables do not describe a group this process can join (named in the reason).
    #[error("cannot form the rank group: {reason}")]
    Launch { reason: String },
    #[error("libtorch")]
    Torch(#[from] tch::TchError),
}

/// A collective started by [`Collective::start_all_gather`].
#[must_use = "wait for it before using the output"]
pub enum InFlight {
    /// Already complete.
    Done,
    /// Completes when this CUDA event (on the backend's communication stream) fires.
    Event(CudaEvent),
    /// Completes when this call returns (a CPU backend that progresses the collective on a helper thread).
    Pending(Box<dyn FnOnce() -> Result<(), CollectiveError> + Send>),
}

/// A raw CUDA event owned by the backend that created it.
pub struct CudaEvent(pub(crate) cudarc::driver::sys::CUevent);

// SAFETY: a CUDA event handle may be used from any thread of the process that holds its context.
unsafe impl Send for CudaEvent {}

/// A fixed group of ranks that exchange tensors.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum across ranks, in place. Float32, float64 or int64.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError>;
    /// `out` ([world * n]) receives every rank's `input` ([n]) in rank order. Any kind.
    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError>;
    /// `out` ([n]) receives the sum over ranks of block `rank` of `input` ([world * n]). Float32 or float64.
    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError>;
    /// Every rank's `t` becomes `root`'s. Any kind.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// Starts an all-gather that may finish later, so it can overlap compute (NCCL runs it on its own stream);
    /// [`Collective::wait`] orders later compute after it. Both tensors must stay alive until then. Backends
    /// without a separate stream finish it here.
    fn start_all_gather(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        self.all_gather(input, out)?;
        Ok(InFlight::Done)
    }

    /// Starts a reduce-scatter that may finish later, so the backward of the next block overlaps it (CPU ranks run
    /// it on a communication thread, [`threaded`]); the same contract as [`Collective::start_all_gather`].
    fn start_reduce_scatter_sum(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        self.reduce_scatter_sum(input, out)?;
        Ok(InFlight::Done)
    }

    /// Starts an in-place all-reduce that may finish later, so the backward of the next stage overlaps it (the
    /// data-parallel engine's gradient buckets); the same contract as [`Collective::start_all_gather`].
    fn start_all_reduce_sum(&self, t: &mut Tensor) -> Result<InFlight, CollectiveError> {
        self.all_reduce_sum(t)?;
        Ok(InFlight::Done)
    }

    /// Makes work issued after this call see the result of a started collective.
    fn wait(&self, flight: InFlight) -> Result<(), CollectiveError> {
        match flight {
            InFlight::Done => Ok(()),
            InFlight::Pending(finish) => finish(),
            InFlight::Event(_) => Err(CollectiveError::Usage {
                op: "wait",
                reason: "this backend did not start that collective".into(),
            }),
        }
    }

    /// Sum of one f64 across ranks (loss, norms, flags).
    fn all_reduce_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let mut t = Tensor::from_slice(&[value]);
        self.all_reduce_sum(&mut t)?;
        Ok(t.double_value(&[0]))
    }

    /// The largest of one f64 across ranks (the worst rank's loss). The default gathers every rank's value;
    /// backends with a reduction of their own override it, so the cost does not grow with the world.
    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let mut all = Tensor::zeros([self.world() as i64], (tch::Kind::Double, tch::Device::Cpu));
        self.all_gather(&Tensor::from_slice(&[value]), &mut all)?;
        Ok(all.max().double_value(&[]))
    }

    /// Whether any rank's `flag` is set (a stop request, a refusal): every rank gets the same answer.
    fn any(&self, flag: bool) -> Result<bool, CollectiveError> {
        Ok(self.all_reduce_f64(f64::from(u8::from(flag)))? > 0.0)
    }
}

/// The collective this process should use when no `radit run` coordinator hands out ranks: MPI when an MPI
/// launcher started it, the TCP star of its srun step under plain `srun`, otherwise a world of one; NCCL on top
/// for GPU tensors. See [`rendezvous`].
pub fn from_environment(device: tch::Device) -> Result<Box<dyn Collective>, CollectiveError> {
    for_device(joined_from_environment()?, device)
}

/// The group [`from_environment`] joins, before a device's backend is put on top of it.
pub fn joined_from_environment() -> Result<Box<dyn Collective>, CollectiveError> {
    let var = |k: &str| std::env::var(k).ok();
    let plan = rendezvous::plan(var)?;
    let base: Box<dyn Collective> = match &plan {
        rendezvous::GroupPlan::Mpi => Box::new(mpi::MpiCollective::init()?),
        rendezvous::GroupPlan::SlurmStep { .. } => rendezvous::join_slurm_step(
            &plan,
            std::time::Duration::from_secs(1800),
            rendezvous::StepSecret::from_vars(
                var(radit_protocol::env::TOKEN_FILE),
                var(radit_protocol::env::ALLOW_DERIVED_SECRET),
            ),
        )?,
        rendezvous::GroupPlan::Single => {
            Box::new(local::LocalGroup::ranks(1, std::time::Duration::from_secs(600)).remove(0))
        }
    };
    Ok(base)
}

/// What carries a rank's collectives, decided from the world and the device alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The group the rank joined (MPI, TCP, in-process) moves CPU tensors itself.
    Joined,
    /// A world of one on a GPU: nothing leaves the device, so no NCCL is loaded or started (a GPU machine whose
    /// NCCL cannot start still trains, benchmarks, encodes and checks parity on one GPU).
    Alone,
    /// GPU tensors across ranks: NCCL, bootstrapped over the joined group.
    Nccl,
}

impl Backend {
    pub fn choose(world: usize, device: tch::Device) -> Backend {
        match device {
            tch::Device::Cuda(_) if world > 1 => Backend::Nccl,
            tch::Device::Cuda(_) => Backend::Alone,
            _ => Backend::Joined,
        }
    }
}

/// `base` for CPU tensors; a world of one on a GPU stays in-process; across GPUs, NCCL bootstrapped over `base`
/// (which carries the NCCL unique id). See [`Backend::choose`].
pub fn for_device(
    base: Box<dyn Collective>,
    device: tch::Device,
) -> Result<Box<dyn Collective>, CollectiveError> {
    let backend = Backend::choose(base.world(), device);
    tracing::debug!(
        ?backend,
        world = base.world(),
        ?device,
        "collective backend"
    );
    match (backend, device) {
        (Backend::Nccl, tch::Device::Cuda(gpu)) => nccl_over(base, gpu),
        (Backend::Alone, _) => Ok(Box::new(
            local::LocalGroup::ranks(1, std::time::Duration::from_secs(600)).remove(0),
        )),
        _ => Ok(base),
    }
}

/// NCCL over `base` whatever the world (the GPU check's NCCL part at world 1).
pub fn nccl_over(
    base: Box<dyn Collective>,
    gpu: usize,
) -> Result<Box<dyn Collective>, CollectiveError> {
    Ok(Box::new(nccl::NcclCollective::new(base, gpu)?))
}

/// Checks the shape contract shared by every backend.
pub(crate) fn check_1d(op: &'static str, t: &Tensor) -> Result<usize, CollectiveError> {
    if t.dim() != 1 || !t.is_contiguous() {
        return Err(CollectiveError::Usage {
            op,
            reason: format!("expected a contiguous 1-D tensor, got shape {:?}", t.size()),
        });
    }
    Ok(t.size()[0] as usize)
}

pub(crate) fn check_sizes(
    op: &'static str,
    input: &Tensor,
    out: &Tensor,
    world: usize,
    gather: bool,
) -> Result<usize, CollectiveError> {
    let (i, o) = (check_1d(op, input)?, check_1d(op, out)?);
    let (small, big) = if gather { (i, o) } else { (o, i) };
    if big != small * world || input.kind() != out.kind() {
        return Err(CollectiveError::Usage {
            op,
            reason: format!(
                "input {:?} {:?} and output {:?} {:?} do not fit a world of {world}",
                input.size(),
                input.kind(),
                out.size(),
                out.kind()
            ),
        });
    }
    Ok(small)
}

pub(crate) fn check_reducible(op: &'static str, t: &Tensor) -> Result<(), CollectiveError> {
    match t.kind() {
        Kind::Float | Kind::Double | Kind::Int64 => Ok(()),
        k => Err(CollectiveError::Usage {
            op,
            reason: format!("sums need float32, float64 or int64, got {k:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn only_a_world_of_several_gpus_starts_nccl() {
        assert_eq!(Backend::choose(1, Device::Cuda(0)), Backend::Alone);
        assert_eq!(Backend::choose(2, Device::Cuda(1)), Backend::Nccl);
        assert_eq!(Backend::choose(1, Device::Cpu), Backend::Joined);
        assert_eq!(Backend::choose(4, Device::Cpu), Backend::Joined);
    }

    #[test]
    fn one_gpu_rank_takes_the_in_process_branch_without_loading_nccl() {
        // On this machine NCCL cannot start (no GPU, no driver): asking for it fails, so an `Ok` here is the
        // branch that never tries.
        let base = || -> Box<dyn Collective> {
            Box::new(local::LocalGroup::ranks(1, std::time::Duration::from_secs(5)).remove(0))
        };
        if !crate::libraries::cuda_driver_present() {
            assert!(nccl_over(base(), 0).is_err());
        }
        let comm = for_device(base(), Device::Cuda(0)).unwrap();
        assert_eq!((comm.rank(), comm.world()), (0, 1));
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        comm.all_reduce_sum(&mut t).unwrap();
        comm.broadcast(&mut t, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
    }
}
