//! Collectives of CPU ranks run on a communication thread, so a started one overlaps the compute issued after it:
//! while the engine computes one block it gathers the next one's weights and, in the backward, reduce-scatters the
//! previous one's gradients (GPUs get the same from NCCL's stream). Any CPU backend (MPI, TCP, local) is moved onto the thread; calls run there one at a time in the
//! order they were made, so every rank still issues the same sequence, and a blocking call waits for everything
//! started before it.
//!
//! MPI is initialised `MPI_THREAD_SERIALIZED`, so the thread may call it; the backend is handed back and dropped on
//! the thread that drops this handle, which is where MPI must be finalised.

use std::sync::mpsc;
use std::time::Duration;

use tch::{Device, Tensor};

use super::{Collective, CollectiveError, InFlight};

type Job = Box<dyn FnOnce(&dyn Collective) + Send>;

/// A CPU collective whose calls run on its own thread.
pub struct CommThread {
    rank: usize,
    world: usize,
    jobs: Option<mpsc::Sender<Job>>,
    /// The backend comes back through this once the queue is closed and drained.
    handback: mpsc::Receiver<Box<dyn Collective>>,
}

/// How long dropping the handle waits for the thread to finish what it was doing. Only a collective still in
/// flight can take long (the engine stopped on an error while a peer never came); the process then goes on
/// without finalising that backend rather than hanging on it.
const DRAIN: Duration = Duration::from_secs(10);

/// `comm` on a communication thread where that lets collectives overlap compute (CPU tensors, more than one rank);
/// otherwise `comm` itself (one rank has nothing to wait for; NCCL overlaps on its own stream).
pub fn overlapping(
    comm: Box<dyn Collective>,
    device: Device,
) -> Result<Box<dyn Collective>, CollectiveError> {
    Ok(if device == Device::Cpu && comm.world() > 1 {
        Box::new(CommThread::spawn(comm)?)
    } else {
        comm
    })
}

fn thread_gone(op: &'static str) -> CollectiveError {
    CollectiveError::Backend {
        backend: "communication thread",
        op,
        reason: "the thread ended (a panic in the backend); the job has to restart".into(),
    }
}

/// How long the thread polls its queue, and a wait for a started collective polls for its result, before blocking:
/// a small model's collectives take microseconds, and waking a blocked thread costs about as much again. Short, because a polling thread takes its
/// core from the compute beside it (200 us made the tiny preset's world-2 step slower, not faster).
const EAGER: Duration = Duration::from_micros(20);

/// The next message, polled for [`EAGER`] before blocking on it.
fn receive_soon<T>(from: &mpsc::Receiver<T>) -> Result<T, mpsc::RecvError> {
    let start = std::time::Instant::now();
    loop {
        match from.try_recv() {
            Ok(v) => return Ok(v),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) if start.elapsed() < EAGER => std::hint::spin_loop(),
            Err(mpsc::TryRecvError::Empty) => return from.recv(),
        }
    }
}

impl CommThread {
    pub fn spawn(inner: Box<dyn Collective>) -> Result<Self, CollectiveError> {
        let (rank, world) = (inner.rank(), inner.world());
        let (jobs, queue) = mpsc::channel::<Job>();
        let (give_back, handback) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("comm-rank-{rank}"))
            .spawn(move || {
                // Collectives write into plain buffers: nothing they do is part of a graph.
                let _no_grad = tch::no_grad_guard();
                while let Ok(job) = receive_soon(&queue) {
                    job(inner.as_ref());
                }
                let _ = give_back.send(inner);
            })
            .map_err(|e| CollectiveError::Backend {
                backend: "communication thread",
                op: "spawn",
                reason: e.to_string(),
            })?;
        Ok(Self {
            rank,
            world,
            jobs: Some(jobs),
            handback,
        })
    }

    /// Queues `call` and returns the receiver of its result.
    fn submit<R: Send + 'static>(
        &self,
        op: &'static str,
        call: impl FnOnce(&dyn Collective) -> Result<R, CollectiveError> + Send + 'static,
    ) -> Result<mpsc::Receiver<Result<R, CollectiveError>>, CollectiveError> {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            // The caller may have stopped waiting (an error elsewhere); the result is then not needed.
            let _ = done.send(call(c));
        });
        self.jobs
            .as_ref()
            .ok_or_else(|| thread_gone(op))?
            .send(job)
            .map_err(|_| thread_gone(op))?;
        Ok(result)
    }

    fn call<R: Send + 'static>(
        &self,
        op: &'static str,
        call: impl FnOnce(&dyn Collective) -> Result<R, CollectiveError> + Send + 'static,
    ) -> Result<R, CollectiveError> {
        self.submit(op, call)?.recv().map_err(|_| thread_gone(op))?
    }

    fn start(
        &self,
        op: &'static str,
        call: impl FnOnce(&dyn Collective) -> Result<(), CollectiveError> + Send + 'static,
    ) -> Result<InFlight, CollectiveError> {
        let result = self.submit(op, call)?;
        Ok(InFlight::Pending(Box::new(move || {
            receive_soon(&result).map_err(|_| thread_gone(op))?
        })))
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        match self.handback.recv_timeout(DRAIN) {
            // Dropped here, on the owner's thread (MPI_Finalize must run where MPI_Init did).
            Ok(inner) => drop(inner),
            Err(mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                rank = self.rank,
                "a collective was still in flight when the group was dropped; leaving it unfinished"
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
    }
}

impl Collective for CommThread {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        // Every backend writes its result into the tensor's storage, which the shallow clone shares.
        let mut t = t.shallow_clone();
        self.call("all_reduce_sum", move |c| c.all_reduce_sum(&mut t))
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        self.wait(self.start_all_gather(input, out)?)
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        self.wait(self.start_reduce_scatter_sum(input, out)?)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let mut t = t.shallow_clone();
        self.call("broadcast", move |c| c.broadcast(&mut t, root))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.call("barrier", |c| c.barrier())
    }

    fn start_all_gather(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        let (input, mut out) = (input.shallow_clone(), out.shallow_clone());
        self.start("all_gather", move |c| c.all_gather(&input, &mut out))
    }

    fn start_reduce_scatter_sum(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        let (input, mut out) = (input.shallow_clone(), out.shallow_clone());
        self.start("reduce_scatter_sum", move |c| {
            c.reduce_scatter_sum(&input, &mut out)
        })
    }

    fn start_all_reduce_sum(&self, t: &mut Tensor) -> Result<InFlight, CollectiveError> {
        let mut t = t.shallow_clone();
        self.start("all_reduce_sum", move |c| c.all_reduce_sum(&mut t))
    }

    fn all_reduce_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        self.call("all_reduce_f64", move |c| c.all_reduce_f64(value))
    }

    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        self.call("all_reduce_max_f64", move |c| c.all_reduce_max_f64(value))
    }

    fn any(&self, flag: bool) -> Result<bool, CollectiveError> {
        self.call("any", move |c| c.any(flag))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Kind;

    use super::*;
    use crate::collective::local::LocalGroup;

    fn on_threads<R: Send + 'static>(
        world: usize,
        each: impl Fn(CommThread) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let each = std::sync::Arc::new(each);
        let handles: Vec<_> = LocalGroup::ranks(world, Duration::from_secs(30))
            .into_iter()
            .map(|r| {
                let each = each.clone();
                std::thread::spawn(move || each(CommThread::spawn(Box::new(r)).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn the_communication_thread_passes_the_conformance_suite_on_worlds_1_to_3() {
        for world in 1..=3 {
            for r in on_threads(world, |c| super::super::conformance::run(&c, Device::Cpu)) {
                r.unwrap();
            }
        }
    }

    /// Compute issued after a start runs while the collective waits for a late peer: rank 0's start returns at
    /// once although rank 1 arrives 200 ms late, rank 0 works for 300 ms, and finds the result there when it waits.
    #[test]
    fn a_started_collective_progresses_while_the_caller_computes() {
        let timings = on_threads(2, |c| {
            let input = Tensor::full([2], c.rank() as f64 + 1.0, (Kind::Float, Device::Cpu));
            let mut out = Tensor::zeros([1], (Kind::Float, Device::Cpu));
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let t = std::time::Instant::now();
            let flight = c.start_reduce_scatter_sum(&input, &mut out).unwrap();
            let starting = t.elapsed();
            if c.rank() == 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let t = std::time::Instant::now();
            c.wait(flight).unwrap();
            assert_eq!(out.double_value(&[0]), 3.0);
            (starting, t.elapsed())
        });
        let (starting, waited) = timings[0];
        assert!(
            starting < Duration::from_millis(50),
            "rank 0's start took {starting:?}: it waited for the late peer"
        );
        assert!(
            waited < Duration::from_millis(50),
            "rank 0 waited {waited:?} after its own work"
        );
    }

    /// A peer that left is reported to the waiter, and a started collective's error arrives at its wait.
    #[test]
    fn a_peer_that_left_fails_the_started_collective_at_its_wait() {
        let mut ranks = LocalGroup::ranks(2, Duration::from_secs(30));
        let survivor = CommThread::spawn(Box::new(ranks.pop().unwrap())).unwrap();
        drop(ranks);
        let input = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let mut out = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let flight = survivor.start_reduce_scatter_sum(&input, &mut out).unwrap();
        let err = survivor.wait(flight).unwrap_err();
        assert!(
            matches!(err, CollectiveError::RankFailed { rank: 0, .. }),
            "{err}"
        );
    }
}
