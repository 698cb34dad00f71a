//! A TCP group for CPU ranks started as separate processes without MPI (radit's local launcher, plain `srun`):
//! a star through rank 0. Every collective sends each rank's bytes to rank 0, which combines them in rank order
//! (so sums are reproducible bit for bit) and sends each rank its part back. Meant for CPU ranks of small models
//! and for the NCCL bootstrap; bulk GPU traffic goes through NCCL.
//!
//! Rank 0 listens on the address it published at rendezvous (the coordinator hands it to the others as a peer);
//! a peer whose connection closes is reported as `RankFailed`, a silent one as `Timeout`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, check_1d, check_reducible, check_sizes};
use crate::progress::{self, Phase};

const HELLO: u64 = 0x7261_6469_745f_7463; // "radit_tc"

struct Link {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

/// One rank's handle on the star.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: one link per other rank (index r - 1). Others: the link to rank 0.
    links: Mutex<Vec<Link>>,
    timeout: Duration,
}

fn io_failed(
    op: &'static str,
    peer: usize,
    timeout: Duration,
    e: std::io::Error,
) -> CollectiveError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => CollectiveError::Timeout {
            op,
            seconds: timeout.as_secs(),
        },
        _ => CollectiveError::RankFailed { op, rank: peer },
    }
}

fn link(stream: TcpStream, timeout: Duration) -> std::io::Result<Link> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(Link {
        reader: BufReader::with_capacity(1 << 20, stream.try_clone()?),
        writer: BufWriter::with_capacity(1 << 20, stream),
    })
}

fn write_frame(l: &mut Link, op: u8, bytes: &[u8]) -> std::io::Result<()> {
    l.writer.write_all(&[op])?;
    l.writer.write_all(&(bytes.len() as u64).to_le_bytes())?;
    l.writer.write_all(bytes)?;
    l.writer.flush()
}

fn read_frame(l: &mut Link) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    l.reader.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or_default()) as usize;
    let mut bytes = vec![0u8; len];
    l.reader.read_exact(&mut bytes)?;
    Ok((head[0], bytes))
}

impl TcpCollective {
    /// Rank 0: accepts the other `world - 1` ranks on `listener` (each says who it is first).
    pub fn hub(
        listener: TcpListener,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let fail = |reason: String| CollectiveError::Backend {
            backend: "tcp",
            op: "connect",
            reason,
        };
        let deadline = Instant::now() + timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let mut slots: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        let mut missing = world - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| fail(e.to_string()))?;
                    let mut l = link(stream, timeout).map_err(|e| fail(e.to_string()))?;
                    let (_, hello) = read_frame(&mut l).map_err(|e| fail(e.to_string()))?;
                    let words: Vec<u64> = hello
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect();
                    match words[..] {
                        [HELLO, r, w]
                            if w as usize == world && (1..world).contains(&(r as usize)) =>
                        {
                            if slots[r as usize - 1].replace(l).is_some() {
                                return Err(fail(format!("rank {r} connected twice")));
                            }
                            missing -= 1;
                        }
                        _ => {
                            tracing::warn!("ignoring a connection that is not a rank of this world")
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(CollectiveError::Timeout {
                            op: "connect",
                            seconds: timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Ok(Self {
            rank: 0,
            world,
            links: Mutex::new(slots.into_iter().flatten().collect()),
            timeout,
        })
    }

    /// Rank `rank` > 0: connects to rank 0 at `hub` (retrying until `timeout`, rank 0 may start later).
    pub fn spoke(
        rank: usize,
        world: usize,
        hub: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect_timeout(&hub, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(CollectiveError::Backend {
                        backend: "tcp",
                        op: "connect",
                        reason: format!("rank 0 at {hub}: {e}"),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let fail = |e: std::io::Error| CollectiveError::Backend {
            backend: "tcp",
            op: "connect",
            reason: e.to_string(),
        };
        let mut l = link(stream, timeout).map_err(fail)?;
        let hello: Vec<u8> = [HELLO, rank as u64, world as u64]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        write_frame(&mut l, 0, &hello).map_err(fail)?;
        Ok(Self {
            rank,
            world,
            links: Mutex::new(vec![l]),
            timeout,
        })
    }

    /// The core exchange: every rank contributes `mine`; rank 0 gets all contributions in rank order and returns
    /// one reply per rank; each rank receives its reply.
    fn exchange(
        &self,
        op: &'static str,
        code: u8,
        mine: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError>,
    ) -> Result<Vec<u8>, CollectiveError> {
        let _phase = progress::enter(Phase::Collective);
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == 0 {
            let mut all = Vec::with_capacity(self.world);
            all.push(mine);
            for (i, l) in links.iter_mut().enumerate() {
                let (got, bytes) =
                    read_frame(l).map_err(|e| io_failed(op, i + 1, self.timeout, e))?;
                if got != code {
                    return Err(CollectiveError::Usage {
                        op,
                        reason: format!(
                            "rank {} is in a different collective ({got} vs {code})",
                            i + 1
                        ),
                    });
                }
                all.push(bytes);
            }
            let mut replies = combine(all)?.into_iter();
            let own = replies.next().unwrap_or_default();
            for (i, (l, r)) in links.iter_mut().zip(replies).enumerate() {
                write_frame(l, code, &r).map_err(|e| io_failed(op, i + 1, self.timeout, e))?;
            }
            Ok(own)
        } else {
            let l = &mut links[0];
            write_frame(l, code, &mine).map_err(|e| io_failed(op, 0, self.timeout, e))?;
            let (_, bytes) = read_frame(l).map_err(|e| io_failed(op, 0, self.timeout, e))?;
            Ok(bytes)
        }
    }
}

fn to_bytes(t: &Tensor) -> Vec<u8> {
    let cpu = t.to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut out = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
    cpu.copy_data_u8(&mut out, numel);
    out
}

fn from_bytes(bytes: &[u8], kind: Kind) -> Result<Tensor, CollectiveError> {
    let n = bytes.len() / kind.elt_size_in_bytes();
    Ok(Tensor::f_from_data_size(bytes, &[n as i64], kind)?)
}

/// Sums the contributions in rank order (as the in-process backend does).
fn sum_in_rank_order(all: &[Vec<u8>], kind: Kind) -> Result<Tensor, CollectiveError> {
    let mut acc = from_bytes(&all[0], kind)?;
    for x in &all[1..] {
        acc += from_bytes(x, kind)?;
    }
    Ok(acc)
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_1d("all_reduce", t)?;
        check_reducible("all_reduce", t)?;
        let kind = t.kind();
        let world = self.world;
        let got = self.exchange("all_reduce", 1, to_bytes(t), |all| {
            let sum = to_bytes(&sum_in_rank_order(&all, kind)?);
            Ok(vec![sum; world])
        })?;
        t.copy_(&from_bytes(&got, kind)?.to_device(t.device()));
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("all_gather", input, out, self.world, true)?;
        let world = self.world;
        let got = self.exchange("all_gather", 2, to_bytes(input), |all| {
            Ok(vec![all.concat(); world])
        })?;
        out.copy_(&from_bytes(&got, input.kind())?.to_device(out.device()));
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let n = check_sizes("reduce_scatter", input, out, self.world, false)? as i64;
        check_reducible("reduce_scatter", input)?;
        let (kind, world) = (input.kind(), self.world as i64);
        let got = self.exchange("reduce_scatter", 3, to_bytes(input), |all| {
            let sum = sum_in_rank_order(&all, kind)?;
            Ok((0..world)
                .map(|r| to_bytes(&sum.narrow(0, r * n, n)))
                .collect())
        })?;
        out.copy_(&from_bytes(&got, kind)?.to_device(out.device()));
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        check_1d("broadcast", t)?;
        if root >= self.world {
            return Err(CollectiveError::Usage {
                op: "broadcast",
                reason: format!("root {root} is not in a world of {}", self.world),
            });
        }
        let world = self.world;
        let mine = if self.rank == root {
            to_bytes(t)
        } else {
            Vec::new()
        };
        let got = self.exchange("broadcast", 4, mine, |mut all| {
            Ok(vec![std::mem::take(&mut all[root]); world])
        })?;
        t.copy_(&from_bytes(&got, t.kind())?.to_device(t.device()));
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let world = self.world;
        self.exchange("barrier", 5, Vec::new(), |_| Ok(vec![Vec::new(); world]))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(world: usize) -> Vec<TcpCollective> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(20);
        let spokes: Vec<_> = (1..world)
            .map(|r| {
                std::thread::spawn(move || TcpCollective::spoke(r, world, addr, timeout).unwrap())
            })
            .collect();
        let mut all = vec![TcpCollective::hub(listener, world, timeout).unwrap()];
        all.extend(spokes.into_iter().map(|h| h.join().unwrap()));
        all
    }

    #[test]
    fn the_tcp_backend_passes_the_conformance_suite_on_worlds_1_to_4() {
        for world in 1..=4 {
            let handles: Vec<_> = group(world)
                .into_iter()
                .map(|c| {
                    std::thread::spawn(move || super::super::conformance::run(&c, Device::Cpu))
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        }
    }

    #[test]
    fn a_peer_that_goes_away_is_named_and_a_silent_one_times_out() {
        let mut g = group(3);
        let spoke2 = g.pop().unwrap();
        drop(spoke2);
        let spoke1 = g.pop().unwrap();
        let hub = g.pop().unwrap();
        let h = std::thread::spawn(move || {
            let mut t = Tensor::from_slice(&[1.0f32]);
            spoke1.all_reduce_sum(&mut t)
        });
        let mut t = Tensor::from_slice(&[1.0f32]);
        match hub.all_reduce_sum(&mut t) {
            Err(CollectiveError::RankFailed { rank: 2, .. }) => {}
            other => panic!("expected rank 2 to be named, got {other:?}"),
        }
        drop(hub);
        assert!(matches!(
            h.join().unwrap(),
            Err(CollectiveError::RankFailed { rank: 0, .. })
        ));

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let short = Duration::from_millis(300);
        let spoke = std::thread::spawn(move || TcpCollective::spoke(1, 2, addr, short).unwrap());
        let hub = TcpCollective::hub(listener, 2, short).unwrap();
        let _silent = spoke.join().unwrap();
        assert!(matches!(
            hub.barrier(),
            Err(CollectiveError::Timeout { .. })
        ));
    }
}
