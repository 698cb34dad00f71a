//! The traffic counter of the engine benchmark: an [`Observer`] that adds up the logical payload of every call of
//! any collective (the gathered output of an all-gather, the reduced input of a reduce-scatter, the tensor of an
//! all-reduce or broadcast), per rank. Calls are forwarded unchanged ([`Observed`]), so a started all-gather
//! stays started.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Collective;
use super::observed::{Observed, Observer};

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
}

impl Observer for Arc<Traffic> {
    type Guard<'a> = ();

    fn enter(&self, _op: &'static str, payload_bytes: Option<u64>) {
        if let Some(b) = payload_bytes {
            self.bytes.fetch_add(b, Ordering::Relaxed);
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A collective whose traffic is counted.
pub type Counting = Observed<Arc<Traffic>>;

impl Counting {
    pub fn new(inner: Box<dyn Collective>) -> (Self, Arc<Traffic>) {
        let traffic = Arc::new(Traffic::default());
        (Observed::wrap(inner, traffic.clone()), traffic)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use tch::{Device, Kind};

    use super::*;
    use crate::collective::{CollectiveError, InFlight};
    use tch::Tensor;

    /// A world of two seen from rank 0, whose peer (the test) sends its half when it decides to. A started gather
    /// completes in `wait`; a blocking one gives up after a second, so a decorator that turned the start into a
    /// blocking call fails the test instead of hanging it.
    struct PeerOnChannel {
        peer: std::sync::Mutex<Option<mpsc::Receiver<Vec<f32>>>>,
    }

    impl PeerOnChannel {
        fn receive(&self) -> mpsc::Receiver<Vec<f32>> {
            self.peer
                .lock()
                .unwrap()
                .take()
                .expect("one gather per test")
        }
    }

    fn fill(out: &Tensor, mine: &Tensor, theirs: &[f32]) {
        let n = mine.size()[0];
        out.narrow(0, 0, n).copy_(mine);
        out.narrow(0, n, n).copy_(&Tensor::from_slice(theirs));
    }

    impl Collective for PeerOnChannel {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut Tensor) -> Result<(), CollectiveError> {
            unimplemented!()
        }
        fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
            let theirs = self
                .receive()
                .recv_timeout(Duration::from_secs(1))
                .map_err(|_| CollectiveError::Timeout {
                    op: "all_gather",
                    seconds: 1,
                })?;
            fill(out, input, &theirs);
            Ok(())
        }
        fn start_all_gather(
            &self,
            input: &Tensor,
            out: &mut Tensor,
        ) -> Result<InFlight, CollectiveError> {
            let (peer, mine, out) = (self.receive(), input.copy(), out.shallow_clone());
            Ok(InFlight::Pending(Box::new(move || {
                let theirs = peer.recv().map_err(|_| CollectiveError::RankFailed {
                    op: "all_gather",
                    rank: 1,
                })?;
                fill(&out, &mine, &theirs);
                Ok(())
            })))
        }
        fn reduce_scatter_sum(&self, _: &Tensor, _: &mut Tensor) -> Result<(), CollectiveError> {
            unimplemented!()
        }
        fn broadcast(&self, _: &mut Tensor, _: usize) -> Result<(), CollectiveError> {
            unimplemented!()
        }
        fn barrier(&self) -> Result<(), CollectiveError> {
            unimplemented!()
        }
    }

    #[test]
    fn a_started_gather_stays_in_flight_under_the_counter_while_the_caller_computes() {
        let (send, receive) = mpsc::channel();
        let inner = PeerOnChannel {
            peer: std::sync::Mutex::new(Some(receive)),
        };
        let (counted, traffic) = Counting::new(Box::new(inner));
        let mine = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut out = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        // The peer has sent nothing yet: only a gather that is really in flight can return here.
        let flight = counted
            .start_all_gather(&mine, &mut out)
            .expect("the start returns before the peer has sent its half");
        assert_eq!(traffic.bytes(), 16, "the gathered output is counted");
        assert_eq!(
            Vec::<f32>::try_from(&out).unwrap(),
            vec![0.0; 4],
            "still in flight: nothing is written yet"
        );
        // The caller computes while the gather is in flight, then the peer's half arrives.
        let a = Tensor::ones([64, 64], (Kind::Float, Device::Cpu));
        let busy = a.matmul(&a).sum(Kind::Float).double_value(&[]);
        assert_eq!(busy, 64.0 * 64.0 * 64.0);
        send.send(vec![3.0, 4.0]).unwrap();
        counted.wait(flight).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&out).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(traffic.calls(), 1);
    }
}
