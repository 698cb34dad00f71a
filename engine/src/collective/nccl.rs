//! NCCL (found and loaded at run time by [`super::nccl_lib`]; cudarc for its types and the CUDA driver) for GPU
//! tensors: raw device pointers from libtorch, the unique id broadcast over a bootstrap collective (MPI or the TCP
//! star). Operations are enqueued on the CUDA legacy default stream, which is
//! the stream libtorch computes on, so they are ordered with the surrounding compute without extra synchronisation.
//!
//! This machine kind has no GPU: the backend compiles everywhere and reports a missing libcuda or libnccl as
//! [`CollectiveError::Unavailable`], but it only runs on a GPU machine (the engine's GPU check).

use std::sync::Arc;

use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use cudarc::driver::result::{event, stream};
use cudarc::driver::sys as cu;

use super::nccl_lib::{NcclLibrary, nccl};
use super::{
    Collective, CollectiveError, CudaEvent, InFlight, check_1d, check_reducible, check_sizes,
};

const BACKEND: &str = "nccl";

/// libcuda and NCCL, when both can be loaded here (cudarc panics instead of erroring when libcuda cannot).
pub fn available() -> Result<&'static NcclLibrary, CollectiveError> {
    let cuda = crate::libraries::cuda_driver_present();
    let nccl = nccl();
    let mut missing = Vec::new();
    if !cuda {
        missing.push("libcuda (the NVIDIA driver)".to_string());
    }
    if let Err(e) = &nccl {
        missing.push(e.to_string());
    }
    match nccl {
        Ok(lib) if missing.is_empty() => Ok(lib),
        _ => Err(CollectiveError::Unavailable {
            backend: BACKEND,
            reason: format!("cannot load {}", missing.join("; ")),
        }),
    }
}

fn failed(op: &'static str, e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Backend {
        backend: BACKEND,
        op,
        reason: e.to_string(),
    }
}

/// One rank's NCCL communicator on one GPU.
pub struct NcclCollective {
    lib: &'static NcclLibrary,
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: Device,
    _ctx: Arc<cudarc::driver::CudaContext>,
    /// A non-blocking stream for started all-gathers, so they overlap compute on the default stream.
    comm_stream: cu::CUstream,
    /// The group that carried the unique id (kept: an MPI bootstrap must outlive NCCL). It also carries the CPU
    /// tensors (loss and norm sums, stop flags, checkpoint records), as gloo does beside NCCL in PyTorch.
    bootstrap: Box<dyn Collective>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap; `&self` methods are
// only called by the engine's one thread at a time.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Creates the communicator for `gpu` (this rank's local device). Every rank of `bootstrap` calls this; rank 0's
    /// unique id reaches the others through `bootstrap.broadcast`.
    pub fn new(bootstrap: Box<dyn Collective>, gpu: usize) -> Result<Self, CollectiveError> {
        let lib = available()?;
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        let ctx = cudarc::driver::CudaContext::new(gpu).map_err(|e| failed("init", e))?;
        let mut id_bytes = Tensor::zeros([128], (Kind::Uint8, Device::Cpu));
        if rank == 0 {
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            // SAFETY: a valid out-pointer.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) })
                .map_err(|e| failed("init", e))?;
            let raw: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            id_bytes = Tensor::from_slice(&raw);
        }
        bootstrap.broadcast(&mut id_bytes, 0)?;
        let raw = Vec::<u8>::try_from(&id_bytes)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in id.internal.iter_mut().zip(raw) {
            *dst = src as ::core::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every rank passes the same id and world with its own rank.
        lib.check(unsafe { (lib.comm_init_rank)(&mut comm, world as i32, id, rank as i32) })
            .map_err(|e| failed("init", e))?;
        tracing::info!(rank, world, gpu, nccl = ?lib, "NCCL communicator up");
        let comm_stream =
            stream::create(stream::StreamKind::NonBlocking).map_err(|e| failed("init", e))?;
        Ok(Self {
            lib,
            comm,
            rank,
            world,
            device: Device::Cuda(gpu),
            _ctx: ctx,
            comm_stream,
            bootstrap,
        })
    }

    fn on_device(&self, op: &'static str, t: &Tensor) -> Result<(), CollectiveError> {
        if t.device() != self.device {
            return Err(CollectiveError::Usage {
                op,
                reason: format!(
                    "this communicator carries tensors on {:?}, got {:?}",
                    self.device,
                    t.device()
                ),
            });
        }
        Ok(())
    }
}

impl NcclCollective {
    /// Issues one NCCL call (`issue`, given the communication stream) after everything already queued on the
    /// default stream (the buffers' producers), and returns the event that [`Collective::wait`] orders later
    /// compute after.
    fn on_comm_stream(
        &self,
        op: &'static str,
        issue: impl FnOnce(*mut std::ffi::c_void) -> crate::collective::nccl_lib::NcclResult,
    ) -> Result<InFlight, CollectiveError> {
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let wait = cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        // SAFETY: the events and the communication stream belong to this communicator's context; `ready` is
        // destroyed once recorded and waited on, `done` by `wait`.
        unsafe {
            let ready = event::create(flags).map_err(|e| failed(op, e))?;
            event::record(ready, std::ptr::null_mut()).map_err(|e| failed(op, e))?;
            stream::wait_event(self.comm_stream, ready, wait).map_err(|e| failed(op, e))?;
            event::destroy(ready).map_err(|e| failed(op, e))?;
            let code = issue(self.comm_stream as *mut std::ffi::c_void);
            self.lib.check(code).map_err(|e| failed(op, e))?;
            let done = event::create(flags).map_err(|e| failed(op, e))?;
            event::record(done, self.comm_stream).map_err(|e| failed(op, e))?;
            Ok(InFlight::Event(CudaEvent(done)))
        }
    }
}

/// NCCL's type for `kind`, and how many of its elements make one of `kind`'s.
fn dtype(kind: Kind) -> (u32, usize) {
    use sys::ncclDataType_t as T;
    let (t, scale) = match kind {
        Kind::Float => (T::ncclFloat32, 1),
        Kind::Double => (T::ncclFloat64, 1),
        Kind::Int64 => (T::ncclInt64, 1),
        Kind::BFloat16 => (T::ncclBfloat16, 1),
        Kind::Uint8 => (T::ncclUint8, 1),
        // Moved as bytes by operations that do not reduce (check_reducible guards the sums).
        k => (T::ncclUint8, k.elt_size_in_bytes()),
    };
    (t as u32, scale)
}

const SUM: u32 = sys::ncclRedOp_t::ncclSum as u32;

/// The legacy default stream (libtorch's default compute stream).
const STREAM: *mut std::ffi::c_void = std::ptr::null_mut();

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if t.device() == Device::Cpu {
            return self.bootstrap.all_reduce_sum(t);
        }
        let n = check_1d("all_reduce", t)?;
        check_reducible("all_reduce", t)?;
        self.on_device("all_reduce", t)?;
        let (dt, _) = dtype(t.kind());
        let p = t.data_ptr();
        // SAFETY: `t` is a contiguous tensor of n elements on this communicator's GPU; in place is allowed.
        let code = unsafe { (self.lib.all_reduce)(p, p, n, dt, SUM, self.comm, STREAM) };
        self.lib.check(code).map_err(|e| failed("all_reduce", e))?;
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        if input.device() == Device::Cpu && out.device() == Device::Cpu {
            return self.bootstrap.all_gather(input, out);
        }
        // On the communication stream, then ordered before anything issued later on the default stream.
        let flight = self.start_all_gather(input, out)?;
        self.wait(flight)
    }

    fn start_all_gather(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        if input.device() == Device::Cpu && out.device() == Device::Cpu {
            self.bootstrap.all_gather(input, out)?;
            return Ok(InFlight::Done);
        }
        let n = check_sizes("all_gather", input, out, self.world, true)?;
        self.on_device("all_gather", input)?;
        self.on_device("all_gather", out)?;
        let (dt, scale) = dtype(input.kind());
        // SAFETY: contiguous buffers of n and world * n elements on this GPU, kept alive by the caller until `wait`.
        self.on_comm_stream("all_gather", |stream| unsafe {
            (self.lib.all_gather)(
                input.data_ptr(),
                out.data_ptr(),
                n * scale,
                dt,
                self.comm,
                stream,
            )
        })
    }

    fn start_reduce_scatter_sum(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        if input.device() == Device::Cpu && out.device() == Device::Cpu {
            self.bootstrap.reduce_scatter_sum(input, out)?;
            return Ok(InFlight::Done);
        }
        let n = check_sizes("reduce_scatter", input, out, self.world, false)?;
        check_reducible("reduce_scatter", input)?;
        self.on_device("reduce_scatter", input)?;
        self.on_device("reduce_scatter", out)?;
        let (dt, _) = dtype(input.kind());
        // SAFETY: contiguous buffers of world * n and n elements on this GPU, kept alive by the caller until `wait`.
        self.on_comm_stream("reduce_scatter", |stream| unsafe {
            (self.lib.reduce_scatter)(
                input.data_ptr(),
                out.data_ptr(),
                n,
                dt,
                SUM,
                self.comm,
                stream,
            )
        })
    }

    fn start_all_reduce_sum(&self, t: &mut Tensor) -> Result<InFlight, CollectiveError> {
        if t.device() == Device::Cpu {
            self.bootstrap.all_reduce_sum(t)?;
            return Ok(InFlight::Done);
        }
        let n = check_1d("all_reduce", t)?;
        check_reducible("all_reduce", t)?;
        self.on_device("all_reduce", t)?;
        let (dt, _) = dtype(t.kind());
        let p = t.data_ptr();
        // SAFETY: a contiguous tensor of n elements on this GPU, kept alive by the caller until `wait`; in place.
        self.on_comm_stream("all_reduce", |stream| unsafe {
            (self.lib.all_reduce)(p, p, n, dt, SUM, self.comm, stream)
        })
    }

    fn wait(&self, flight: InFlight) -> Result<(), CollectiveError> {
        let done = match flight {
            InFlight::Event(CudaEvent(done)) => done,
            InFlight::Pending(finish) => return finish(),
            InFlight::Done => return Ok(()),
        };
        let wait = cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        // SAFETY: `done` was created by start_all_gather on this context and is destroyed exactly once, here.
        unsafe {
            stream::wait_event(std::ptr::null_mut(), done, wait).map_err(|e| failed("wait", e))?;
            event::destroy(done).map_err(|e| failed("wait", e))?;
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let flight = self.start_reduce_scatter_sum(input, out)?;
        self.wait(flight)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if t.device() == Device::Cpu {
            return self.bootstrap.broadcast(t, root);
        }
        let n = check_1d("broadcast", t)?;
        self.on_device("broadcast", t)?;
        let (dt, scale) = dtype(t.kind());
        let p = t.data_ptr();
        // SAFETY: a contiguous buffer of n elements on this GPU; in place is allowed.
        let code =
            unsafe { (self.lib.broadcast)(p, p, n * scale, dt, root as i32, self.comm, STREAM) };
        self.lib.check(code).map_err(|e| failed("broadcast", e))?;
        Ok(())
    }

    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        self.bootstrap.all_reduce_max_f64(value)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        // NCCL has no barrier: a one-element all-reduce, waited for.
        let mut t = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce_sum(&mut t)?;
        let _ = t.double_value(&[0]);
        Ok(())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // SAFETY: the communicator and stream were created in `new` and are destroyed once.
        let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
        let _ = unsafe { stream::destroy(self.comm_stream) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::local::LocalGroup;

    /// Runs everywhere. With a GPU, NCCL must load and pass the conformance suite (world of one): a GPU machine
    /// where NCCL cannot be found fails here rather than passing vacuously. Without one, the missing driver is an
    /// error, not a panic.
    #[test]
    fn nccl_runs_the_conformance_suite_on_a_gpu_or_reports_why_it_cannot() {
        let bootstrap =
            Box::new(LocalGroup::ranks(1, std::time::Duration::from_secs(60)).remove(0));
        if tch::Cuda::is_available() {
            let comm = NcclCollective::new(bootstrap, 0)
                .unwrap_or_else(|e| panic!("a GPU is here, so NCCL must come up: {e}"));
            crate::collective::conformance::run(&comm, Device::Cuda(0)).unwrap();
        } else {
            match NcclCollective::new(bootstrap, 0) {
                Err(CollectiveError::Unavailable {
                    backend: "nccl",
                    reason,
                }) => {
                    assert!(reason.contains("libcuda"), "{reason}")
                }
                Err(e) => panic!("expected Unavailable, got {e}"),
                Ok(_) => panic!("NCCL came up without a GPU"),
            }
        }
    }
}
