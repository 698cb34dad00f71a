//! One decorator for watching every call of any collective without changing it: each method is forwarded as the
//! same method (a started all-gather stays started, so what is measured is the overlap the engine gets), with an
//! [`Observer`] told about the call first and its guard held until the call returns. The traffic counter of the
//! engine benchmark ([`super::counting`]) and the rank's collective phase ([`super::phase`]) are two observers.

use tch::Tensor;

use super::{Collective, CollectiveError, InFlight};

/// Told about each call before it runs: the operation and its logical payload in bytes (the gathered output of an
/// all-gather, the reduced input of a reduce-scatter, the tensor of an all-reduce or broadcast, 8 for one f64;
/// `None` for a barrier or a wait). The guard lives until the call returns.
pub trait Observer: Send {
    type Guard<'a>
    where
        Self: 'a;
    fn enter(&self, op: &'static str, payload_bytes: Option<u64>) -> Self::Guard<'_>;
}

/// A collective whose calls `observer` sees.
pub struct Observed<O: Observer> {
    inner: Box<dyn Collective>,
    observer: O,
}

impl<O: Observer> Observed<O> {
    pub fn wrap(inner: Box<dyn Collective>, observer: O) -> Self {
        Self { inner, observer }
    }
}

fn bytes(t: &Tensor) -> Option<u64> {
    Some((t.numel() * t.kind().elt_size_in_bytes()) as u64)
}

impl<O: Observer> Collective for Observed<O> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("all_reduce_sum", bytes(t));
        self.inner.all_reduce_sum(t)
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("all_gather", bytes(out));
        self.inner.all_gather(input, out)
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("reduce_scatter_sum", bytes(input));
        self.inner.reduce_scatter_sum(input, out)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("broadcast", bytes(t));
        self.inner.broadcast(t, root)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("barrier", None);
        self.inner.barrier()
    }

    fn start_all_gather(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        let _seen = self.observer.enter("all_gather", bytes(out));
        self.inner.start_all_gather(input, out)
    }

    fn start_reduce_scatter_sum(
        &self,
        input: &Tensor,
        out: &mut Tensor,
    ) -> Result<InFlight, CollectiveError> {
        let _seen = self.observer.enter("reduce_scatter_sum", bytes(input));
        self.inner.start_reduce_scatter_sum(input, out)
    }

    fn start_all_reduce_sum(&self, t: &mut Tensor) -> Result<InFlight, CollectiveError> {
        let _seen = self.observer.enter("all_reduce_sum", bytes(t));
        self.inner.start_all_reduce_sum(t)
    }

    fn wait(&self, flight: InFlight) -> Result<(), CollectiveError> {
        let _seen = self.observer.enter("wait", None);
        self.inner.wait(flight)
    }

    fn all_reduce_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let _seen = self.observer.enter("all_reduce_f64", Some(8));
        self.inner.all_reduce_f64(value)
    }

    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let _seen = self.observer.enter("all_reduce_max_f64", Some(8));
        self.inner.all_reduce_max_f64(value)
    }
}
