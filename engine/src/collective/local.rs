//! An in-process group: one `LocalCollective` per thread, exchanging tensors through shared slots. Used by unit
//! tests of the engine (worlds 1-4 in one test process) and by every rank alone in its world, on the CPU or a GPU
//! (at world 1 its collectives touch nothing but the tensors given). A thread that panics or drops its handle
//! breaks the group, and its peers get `RankFailed` instead of hanging.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::{Collective, CollectiveError, check_1d, check_reducible, check_sizes};

struct State {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    left: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
    timeout: Duration,
}

/// Creates the handles of an in-process group.
pub struct LocalGroup;

impl LocalGroup {
    /// One handle per rank (move each into its thread). `timeout` bounds every wait for peers.
    pub fn ranks(world: usize, timeout: Duration) -> Vec<LocalCollective> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: (0..world).map(|_| None).collect(),
                arrived: 0,
                generation: 0,
                left: None,
            }),
            turn: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank's handle.
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCollective {
    /// Waits until every rank has reached this point (a generation-counting barrier with a timeout).
    fn wait_all<'a>(
        &'a self,
        op: &'static str,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        if let Some(rank) = st.left {
            return Err(CollectiveError::RankFailed { op, rank });
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.turn.notify_all();
            return Ok(st);
        }
        let deadline = Instant::now() + self.shared.timeout;
        while st.generation == generation {
            if let Some(rank) = st.left {
                return Err(CollectiveError::RankFailed { op, rank });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CollectiveError::Timeout {
                    op,
                    seconds: self.shared.timeout.as_secs(),
                });
            }
            st = self
                .shared
                .turn
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts `mine`, waits for everyone, hands all contributions (rank order) to `f`, waits again so the slots can
    /// be reused.
    fn exchange<R>(
        &self,
        op: &'static str,
        mine: Tensor,
        f: impl FnOnce(&[Tensor]) -> R,
    ) -> Result<R, CollectiveError> {
        let mut st = self.lock();
        st.slots[self.rank] = Some(mine);
        let st = self.wait_all(op, st)?;
        let all: Vec<Tensor> = st
            .slots
            .iter()
            .map(|s| s.as_ref().map(Tensor::shallow_clone))
            .collect::<Option<Vec<_>>>()
            .ok_or(CollectiveError::Usage {
                op,
                reason: "a rank posted nothing".into(),
            })?;
        drop(st);
        let result = f(&all);
        let mut st = self.wait_all(op, self.lock())?;
        st.slots[self.rank] = None;
        Ok(result)
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.left.is_none() {
            st.left = Some(self.rank);
        }
        self.shared.turn.notify_all();
    }
}

fn cpu_copy(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).copy()
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_1d("all_reduce", t)?;
        check_reducible("all_reduce", t)?;
        if self.world() == 1 {
            // Alone (one GPU rank included): nothing to add, and no round trip through the host.
            return Ok(());
        }
        let sum = self.exchange("all_reduce", cpu_copy(t), |all| {
            let mut acc = all[0].copy();
            for x in &all[1..] {
                acc += x;
            }
            acc
        })?;
        t.copy_(&sum);
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("all_gather", input, out, self.world(), true)?;
        if self.world() == 1 {
            out.copy_(input);
            return Ok(());
        }
        let cat = self.exchange("all_gather", cpu_copy(input), |all| Tensor::cat(all, 0))?;
        out.copy_(&cat);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let n = check_sizes("reduce_scatter", input, out, self.world(), false)? as i64;
        check_reducible("reduce_scatter", input)?;
        if self.world() == 1 {
            out.copy_(input);
            return Ok(());
        }
        let rank = self.rank as i64;
        let mine = self.exchange("reduce_scatter", cpu_copy(input), |all| {
            let mut acc = all[0].narrow(0, rank * n, n).copy();
            for x in &all[1..] {
                acc += x.narrow(0, rank * n, n);
            }
            acc
        })?;
        out.copy_(&mine);
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        check_1d("broadcast", t)?;
        if self.world() == 1 {
            return Ok(());
        }
        let theirs = self.exchange("broadcast", cpu_copy(t), |all| all[root].copy())?;
        t.copy_(&theirs);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.exchange("barrier", Tensor::zeros([0], tch::kind::FLOAT_CPU), |_| ())
    }
}
