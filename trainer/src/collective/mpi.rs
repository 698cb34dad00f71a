//! MPI (OpenMPI through the `mpi` crate) for CPU tensors: one rank per process, started by `mpirun`/`srun`.

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, check_1d, check_reducible, check_sizes};

/// The world communicator of this process's MPI job.
pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, so calls may come from any thread as long as they do not
// overlap; `&self` methods are only ever called by the one thread that owns the engine at a time.
unsafe impl Send for MpiCollective {}

/// Variables an MPI launcher (OpenMPI, or Slurm's PMI/PMIx) sets in every rank.
pub const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// True when this process was started by an MPI launcher.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

impl MpiCollective {
    /// Initialises MPI (once per process). Without a launcher this is a world of one.
    pub fn init() -> Result<Self, CollectiveError> {
        let (universe, _level) = ::mpi::initialize_with_threading(::mpi::Threading::Serialized)
            .ok_or(CollectiveError::Unavailable {
                backend: "mpi",
                reason: "MPI was already initialised in this process".into(),
            })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            rank,
            size,
            _universe: universe,
        })
    }
}

fn cpu_only(op: &'static str, t: &Tensor) -> Result<(), CollectiveError> {
    if t.device() != Device::Cpu {
        return Err(CollectiveError::Usage {
            op,
            reason: format!("MPI carries CPU tensors; got one on {:?}", t.device()),
        });
    }
    Ok(())
}

/// The tensor's bytes. Callers checked it is a contiguous CPU tensor.
fn bytes(t: &Tensor) -> &[u8] {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    // SAFETY: a contiguous CPU tensor owns `n` initialised bytes at data_ptr, alive as long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    // SAFETY: as in `bytes`, and `&mut` guarantees no other Rust reference to this tensor; callers never pass
    // views that alias another argument.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) }
}

macro_rules! typed {
    ($t:expr, $ty:ty) => {{
        let n = $t.numel();
        // SAFETY: the kind was checked to match $ty; contiguous CPU storage of n elements.
        unsafe { std::slice::from_raw_parts($t.data_ptr() as *const $ty, n) }
    }};
}

macro_rules! typed_mut {
    ($t:expr, $ty:ty) => {{
        let n = $t.numel();
        // SAFETY: as in `typed`, with exclusive access through `&mut`.
        unsafe { std::slice::from_raw_parts_mut($t.data_ptr() as *mut $ty, n) }
    }};
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        // Waiting here is waiting for peers: the heartbeat says so, for hang diagnosis.
        check_1d("all_reduce", t)?;
        check_reducible("all_reduce", t)?;
        cpu_only("all_reduce", t)?;
        let input = t.copy();
        let op = SystemOperation::sum();
        match t.kind() {
            Kind::Float => self
                .world
                .all_reduce_into(typed!(input, f32), typed_mut!(t, f32), op),
            Kind::Double => self
                .world
                .all_reduce_into(typed!(input, f64), typed_mut!(t, f64), op),
            _ => self
                .world
                .all_reduce_into(typed!(input, i64), typed_mut!(t, i64), op),
        }
        Ok(())
    }

    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let mut max = f64::NEG_INFINITY;
        self.world
            .all_reduce_into(&value, &mut max, SystemOperation::max());
        Ok(max)
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("all_gather", input, out, self.size, true)?;
        cpu_only("all_gather", input)?;
        cpu_only("all_gather", out)?;
        self.world.all_gather_into(bytes(input), bytes_mut(out));
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("reduce_scatter", input, out, self.size, false)?;
        check_reducible("reduce_scatter", input)?;
        cpu_only("reduce_scatter", input)?;
        cpu_only("reduce_scatter", out)?;
        let op = SystemOperation::sum();
        match input.kind() {
            Kind::Float => {
                self.world
                    .reduce_scatter_block_into(typed!(input, f32), typed_mut!(out, f32), op)
            }
            Kind::Double => {
                self.world
                    .reduce_scatter_block_into(typed!(input, f64), typed_mut!(out, f64), op)
            }
            _ => self
                .world
                .reduce_scatter_block_into(typed!(input, i64), typed_mut!(out, i64), op),
        }
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        check_1d("broadcast", t)?;
        cpu_only("broadcast", t)?;
        if root >= self.size {
            return Err(CollectiveError::Usage {
                op: "broadcast",
                reason: format!("root {root} is not a rank of a world of {}", self.size),
            });
        }
        self.world
            .process_at_rank(root as i32)
            .broadcast_into(bytes_mut(t));
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.world.barrier();
        Ok(())
    }
}
