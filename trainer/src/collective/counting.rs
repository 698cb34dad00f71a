//! A decorator that counts what any collective carries: the logical payload of each call (the gathered output of
//! an all-gather, the reduced input of a reduce-scatter, the tensor of an all-reduce or broadcast), per rank.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Tensor;

use super::{Collective, CollectiveError};

/// Bytes and calls seen so far; shared with whoever reads them.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes: AtomicU64,
    pub calls: AtomicU64,
}

impl Traffic {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn add(&self, t: &Tensor) {
        self.bytes.fetch_add(
            (t.numel() * t.kind().elt_size_in_bytes()) as u64,
            Ordering::Relaxed,
        );
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Wraps a collective and counts its traffic.
pub struct Counting {
    inner: Box<dyn Collective>,
    traffic: Arc<Traffic>,
}

impl Counting {
    pub fn new(inner: Box<dyn Collective>) -> (Self, Arc<Traffic>) {
        let traffic = Arc::new(Traffic::default());
        (
            Self {
                inner,
                traffic: traffic.clone(),
            },
            traffic,
        )
    }
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.traffic.add(t);
        self.inner.all_reduce_sum(t)
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        self.traffic.add(out);
        self.inner.all_gather(input, out)
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        self.traffic.add(input);
        self.inner.reduce_scatter_sum(input, out)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.traffic.add(t);
        self.inner.broadcast(t, root)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}
