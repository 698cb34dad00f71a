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
    /// Where peers' blocks of a reduce-scatter land, kept between calls (8-byte words: aligned for every kind).
    scratch: std::sync::Mutex<Vec<u64>>,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, so calls may come from any thread as long as they do not
// overlap; `&self` methods are only ever called by one thread at a time (the engine's, or its communication thread,
// which then makes every call).
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
            scratch: std::sync::Mutex::new(Vec::new()),
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

/// The tag of the pairwise exchanges that carry the all-gathers and reduce-scatters.
const BULK_TAG: i32 = 0x5261;

/// How long a wait tests flat out before it starts sleeping: a small exchange whose peer is there finishes within
/// it, without paying a sleep's wake-up.
const EAGER: std::time::Duration = std::time::Duration::from_micros(20);

/// The longest sleep between two tests of a pending exchange.
const MOST_IDLE: std::time::Duration = std::time::Duration::from_micros(200);

/// Waits for `pending` without spinning a core for long: a CPU rank's collectives run beside its compute on the
/// same cores (see [`super::threaded`]), and MPI's own wait polls flat out, taking that core from the compute. Tests
/// every request flat out for [`EAGER`], then sleeps between tests, twice as long each time up to [`MOST_IDLE`];
/// each test also progresses the transfers.
fn complete_without_spinning<'a, T: 'a + ?Sized, S: ::mpi::request::Scope<'a>>(
    mut pending: Vec<::mpi::request::Request<'a, T, S>>,
) {
    let start = std::time::Instant::now();
    let mut idle = std::time::Duration::from_micros(10);
    while !pending.is_empty() {
        pending = pending.into_iter().filter_map(|r| r.test().err()).collect();
        if pending.is_empty() {
            break;
        }
        if start.elapsed() < EAGER {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(idle);
            idle = (idle * 2).min(MOST_IDLE);
        }
    }
}

impl MpiCollective {
    /// Sends `outgoing(peer)` to every other rank and receives each one's message into the next of `incoming` (peers
    /// in rank order, this rank skipped), then waits for all of it without spinning.
    fn exchange_with_peers<'b, T>(
        &self,
        outgoing: impl Fn(usize) -> &'b [T],
        incoming: impl Iterator<Item = &'b mut [T]>,
    ) where
        T: ::mpi::datatype::Equivalence + 'b,
        [T]: ::mpi::datatype::Buffer + ::mpi::datatype::BufferMut,
    {
        let peers = (0..self.size).filter(|&r| r != self.rank);
        ::mpi::request::scope(|scope| {
            let mut pending = Vec::new();
            for (peer, slot) in peers.zip(incoming) {
                let p = self.world.process_at_rank(peer as i32);
                pending.push(p.immediate_send_with_tag(scope, outgoing(peer), BULK_TAG));
                pending.push(p.immediate_receive_into_with_tag(scope, slot, BULK_TAG));
            }
            complete_without_spinning(pending);
        });
    }

    /// Reduce-scatter by pairwise exchange: block `p` of `input` goes to rank `p`, every peer's block `rank` comes
    /// back, and the blocks are summed in rank order (so every run of the same inputs sums alike). Each rank moves
    /// (world-1)/world of its input once; MPI's own algorithms reduce on one root first.
    fn reduce_scatter_pairwise<T>(
        &self,
        input: &[T],
        out: &mut Tensor,
    ) -> Result<(), CollectiveError>
    where
        T: ::mpi::datatype::Equivalence + Copy,
        [T]: ::mpi::datatype::Buffer + ::mpi::datatype::BufferMut,
    {
        let n = input.len() / self.size;
        let kind = out.kind();
        let len = n * (self.size - 1);
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if scratch.len() < words {
            scratch.resize(words, 0);
        }
        // SAFETY: T is f32, f64 or i64 (alignment at most 8, any bit pattern valid); the scratch holds `len` of them
        // and stays locked while this view lives.
        let theirs: &mut [T] =
            unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut T, len) };
        self.exchange_with_peers(
            |peer| &input[peer * n..(peer + 1) * n],
            theirs.chunks_mut(n.max(1)),
        );
        // SAFETY: `theirs` and `input` are plain slices of `kind`'s element type, alive for these views.
        let view = |s: &[T]| unsafe {
            Tensor::from_blob(
                s.as_ptr() as *const u8,
                &[s.len() as i64],
                &[1],
                kind,
                Device::Cpu,
            )
        };
        let block = |r: usize| {
            if r == self.rank {
                view(&input[r * n..(r + 1) * n])
            } else {
                let k = if r < self.rank { r } else { r - 1 };
                view(&theirs[k * n..(k + 1) * n])
            }
        };
        out.f_copy_(&block(0))?;
        for r in 1..self.size {
            *out += block(r);
        }
        Ok(())
    }
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
        let n = check_sizes("all_gather", input, out, self.size, true)?;
        cpu_only("all_gather", input)?;
        cpu_only("all_gather", out)?;
        if n == 0 {
            return Ok(());
        }
        // Pairwise, as bytes: each peer's block arrives straight into its place in `out`.
        let width = input.kind().elt_size_in_bytes();
        let mine = bytes(input);
        let out = bytes_mut(out);
        let (before, rest) = out.split_at_mut(self.rank * n * width);
        let (own, after) = rest.split_at_mut(n * width);
        own.copy_from_slice(mine);
        let slots = before
            .chunks_mut(n * width)
            .chain(after.chunks_mut(n * width));
        self.exchange_with_peers(|_| mine, slots);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("reduce_scatter", input, out, self.size, false)?;
        check_reducible("reduce_scatter", input)?;
        cpu_only("reduce_scatter", input)?;
        cpu_only("reduce_scatter", out)?;
        match input.kind() {
            Kind::Float => self.reduce_scatter_pairwise(typed!(input, f32), out),
            Kind::Double => self.reduce_scatter_pairwise(typed!(input, f64), out),
            _ => self.reduce_scatter_pairwise(typed!(input, i64), out),
        }
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
