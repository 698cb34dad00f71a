//! A TCP group for CPU ranks started as separate processes without MPI (radit's local launcher, plain `srun`):
//! a star through rank 0. Every collective sends each rank's bytes to rank 0, which combines them in rank order
//! (so sums are reproducible bit for bit) and sends each rank its part back. Meant for CPU ranks of small models
//! and for the NCCL bootstrap; bulk GPU traffic goes through NCCL.
//!
//! Rank 0 listens on the address it published at rendezvous (the coordinator hands it to the others as a peer);
//! a peer whose connection closes is reported as `RankFailed`, a silent one as `Timeout`.
//!
//! Joining is a challenge-response over fresh nonces, keyed by the group's secret (a digest of the job token):
//! the spoke says who it is with its nonce, rank 0 answers with its own nonce and an HMAC over both (so a spoke
//! knows it reached its own job's rank 0), and the spoke proves the secret with an HMAC over both nonces the other
//! way round. Neither the secret nor anything replayable crosses the wire: bytes captured from one handshake are
//! refused in the next, whose nonce differs.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, check_1d, check_reducible, check_sizes};

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

/// No frame between proven ranks is larger (a corrupt length must not turn into a huge allocation).
const MAX_FRAME_BYTES: u64 = 16 << 30;
/// No handshake frame is larger (a hello is 56 bytes, a challenge 64, an answer 32): a stranger's header cannot
/// make rank 0 allocate before it has proved anything.
const MAX_HANDSHAKE_FRAME: u64 = 256;
/// How long a connecting peer has for its whole handshake, however its bytes trickle in.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections in their handshake at once; more are closed at accept, so a flood cannot exhaust rank 0's threads.
const MAX_PENDING_HANDSHAKES: usize = 64;

fn read_frame(l: &mut Link) -> std::io::Result<(u8, Vec<u8>)> {
    read_frame_bounded(l, MAX_FRAME_BYTES, None)
}

/// A frame of at most `max` bytes, all of it read by `deadline` when one is given (each read waits only for what
/// is left of it, so a peer sending a byte at a time cannot stretch it).
fn read_frame_bounded(
    l: &mut Link,
    max: u64,
    deadline: Option<Instant>,
) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    read_exact_by(l, &mut head, deadline)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or_default());
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame is larger than {max} bytes"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    read_exact_by(l, &mut bytes, deadline)?;
    Ok((head[0], bytes))
}

fn read_exact_by(l: &mut Link, buf: &mut [u8], deadline: Option<Instant>) -> std::io::Result<()> {
    let Some(deadline) = deadline else {
        return l.reader.read_exact(buf);
    };
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake's deadline passed",
            ));
        }
        l.reader.get_ref().set_read_timeout(Some(left))?;
        match l.reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The socket's read timeout is the deadline (Unix reports it as EAGAIN): the check above names it.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The group's secret from the job's token: a digest, so that the token itself never crosses the wire.
pub fn group_secret(job_token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"radit tcp collective\0");
    h.update(job_token.as_bytes());
    h.finalize().into()
}

/// The hello a rank sends: magic, rank, world and its fresh nonce.
fn hello(rank: usize, world: usize, nonce: &[u8; 32]) -> Vec<u8> {
    let mut h: Vec<u8> = [HELLO, rank as u64, world as u64]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    h.extend_from_slice(nonce);
    h
}

/// The rank and nonce a hello announces, if it is a rank of this world.
fn read_hello(bytes: &[u8], world: usize) -> Option<(usize, [u8; 32])> {
    if bytes.len() != 24 + 32 {
        return None;
    }
    let word =
        |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let (magic, rank, w) = (word(0), word(1) as usize, word(2) as usize);
    let nonce = bytes[24..].try_into().ok()?;
    (magic == HELLO && w == world && (1..world).contains(&rank)).then_some((rank, nonce))
}

/// HMAC-SHA256 under the group's secret of who is speaking (`hub` or `spoke`), the rank, the world and the two
/// nonces in the speaker's order (its peer's first, so each side's proof covers the nonce it was challenged with).
fn proof(
    secret: &[u8; 32],
    speaker: &[u8],
    rank: usize,
    world: usize,
    nonces: [&[u8; 32]; 2],
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .expect("HMAC takes a key of any length");
    mac.update(speaker);
    mac.update(&(rank as u64).to_le_bytes());
    mac.update(&(world as u64).to_le_bytes());
    mac.update(nonces[0]);
    mac.update(nonces[1]);
    mac
}

/// Rank 0's side of one connection's handshake, all of it within [`HANDSHAKE_DEADLINE`] and in frames of at most
/// [`MAX_HANDSHAKE_FRAME`]: the spoke's rank and link once it proved the secret, `None` for anything else (a
/// stranger, another job, a replay, a peer too slow or too large).
fn admit(stream: TcpStream, world: usize, secret: &[u8; 32]) -> Option<(usize, Link)> {
    use hmac::Mac;
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    stream.set_nonblocking(false).ok()?;
    let mut proven = link(stream, HANDSHAKE_DEADLINE).ok()?;
    let l = &mut proven;
    let (_, hello) = read_frame_bounded(l, MAX_HANDSHAKE_FRAME, Some(deadline)).ok()?;
    let (rank, spoke_nonce) = read_hello(&hello, world)?;
    let hub_nonce = radit_protocol::random_bytes().ok()?;
    let mut challenge = hub_nonce.to_vec();
    challenge.extend_from_slice(
        &proof(secret, b"hub", rank, world, [&spoke_nonce, &hub_nonce])
            .finalize()
            .into_bytes(),
    );
    write_frame(l, 0, &challenge).ok()?;
    let (_, answer) = read_frame_bounded(l, MAX_HANDSHAKE_FRAME, Some(deadline)).ok()?;
    // Constant time, by the hmac crate.
    proof(secret, b"spoke", rank, world, [&hub_nonce, &spoke_nonce])
        .verify_slice(&answer)
        .ok()?;
    Some((rank, proven))
}

impl TcpCollective {
    /// Rank 0: accepts the other `world - 1` ranks on `listener` (each says who it is, with the group's secret;
    /// other connections are dropped).
    pub fn hub(
        listener: TcpListener,
        world: usize,
        timeouts: impl Into<super::Timeouts>,
        secret: &[u8; 32],
    ) -> Result<Self, CollectiveError> {
        let timeouts = timeouts.into();
        let timeout = timeouts.operation;
        let fail = |reason: String| CollectiveError::Backend {
            backend: "tcp",
            op: "connect",
            reason,
        };
        let deadline = Instant::now() + timeouts.rendezvous;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let mut slots: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        let mut missing = world - 1;
        // Each connection's handshake runs on a thread of its own, so a stranger (silent, trickling, lying about
        // its frame's size) holds up no rank for longer than it takes that rank to connect; it is dropped at its
        // deadline.
        let (done, admitted) = std::sync::mpsc::channel::<(SocketAddr, Option<(usize, Link)>)>();
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while missing > 0 {
            while let Ok((peer, result)) = admitted.try_recv() {
                match result {
                    Some((r, l)) if slots[r - 1].is_none() => {
                        let set = l
                            .reader
                            .get_ref()
                            .set_read_timeout(Some(timeout))
                            .and_then(|()| l.writer.get_ref().set_write_timeout(Some(timeout)));
                        set.map_err(|e| fail(e.to_string()))?;
                        slots[r - 1] = Some(l);
                        missing -= 1;
                    }
                    Some((r, _)) => {
                        tracing::warn!(%peer, rank = r, "dropping a second connection for one rank")
                    }
                    None => {
                        tracing::warn!(%peer, "dropping a connection that did not prove it is a rank of this job")
                    }
                }
            }
            if missing == 0 {
                break;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    use std::sync::atomic::Ordering;
                    if pending.load(Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!(%peer, "dropping a connection: too many handshakes in progress");
                        continue;
                    }
                    pending.fetch_add(1, Ordering::Relaxed);
                    let (done, in_flight, secret) = (done.clone(), pending.clone(), *secret);
                    let spawned = std::thread::Builder::new()
                        .name("radit-tcp-handshake".into())
                        .spawn(move || {
                            let result = admit(stream, world, &secret);
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            // The group may have formed (the receiver gone) while a stranger was timing out.
                            let _ = done.send((peer, result));
                        });
                    if let Err(e) = spawned {
                        pending.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, error = %e, "dropping a connection: cannot start its handshake");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(CollectiveError::Timeout {
                            op: "connect",
                            seconds: timeouts.rendezvous.as_secs(),
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

    /// Rank `rank` > 0: connects to rank 0 at `hub` (retrying until the rendezvous timeout: rank 0 may start
    /// later).
    pub fn spoke(
        rank: usize,
        world: usize,
        hub: SocketAddr,
        timeouts: impl Into<super::Timeouts>,
        secret: &[u8; 32],
    ) -> Result<Self, CollectiveError> {
        let timeouts = timeouts.into();
        let timeout = timeouts.operation;
        let deadline = Instant::now() + timeouts.rendezvous;
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
        let nonce = radit_protocol::random_bytes().map_err(fail)?;
        write_frame(&mut l, 0, &hello(rank, world, &nonce)).map_err(fail)?;
        let handshake = Instant::now() + HANDSHAKE_DEADLINE;
        let (_, challenge) =
            read_frame_bounded(&mut l, MAX_HANDSHAKE_FRAME, Some(handshake)).map_err(fail)?;
        l.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(fail)?;
        let (hub_nonce, hub_proof) = challenge.split_at(challenge.len().min(32));
        let hub_nonce: [u8; 32] = hub_nonce.try_into().unwrap_or([0; 32]);
        {
            use hmac::Mac;
            proof(secret, b"hub", rank, world, [&nonce, &hub_nonce])
                .verify_slice(hub_proof)
                .map_err(|_| CollectiveError::Backend {
                    backend: "tcp",
                    op: "connect",
                    reason: format!(
                        "rank 0 at {hub} did not prove the job's token (another job's rank 0, or a stranger)"
                    ),
                })?;
            let answer = proof(secret, b"spoke", rank, world, [&hub_nonce, &nonce]).finalize();
            write_frame(&mut l, 0, &answer.into_bytes()).map_err(fail)?;
        }
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
            let (got, bytes) = read_frame(l).map_err(|e| io_failed(op, 0, self.timeout, e))?;
            if got != code {
                return Err(CollectiveError::Usage {
                    op,
                    reason: format!("rank 0 answered collective {got}, not {code}"),
                });
            }
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

/// Every rank must contribute as many bytes as rank 0 (same shape and kind: the collective contract).
fn same_lengths(op: &'static str, all: &[Vec<u8>]) -> Result<(), CollectiveError> {
    match all.iter().position(|x| x.len() != all[0].len()) {
        None => Ok(()),
        Some(r) => Err(CollectiveError::Usage {
            op,
            reason: format!(
                "rank {r} sent {} bytes, rank 0 {}",
                all[r].len(),
                all[0].len()
            ),
        }),
    }
}

/// Sums the contributions in rank order (as the in-process backend does).
fn sum_in_rank_order(all: &[Vec<u8>], kind: Kind) -> Result<Tensor, CollectiveError> {
    let mut acc = from_bytes(&all[0], kind)?;
    for x in &all[1..] {
        acc = acc.f_add(&from_bytes(x, kind)?)?;
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
            same_lengths("all_reduce", &all)?;
            let sum = to_bytes(&sum_in_rank_order(&all, kind)?);
            Ok(vec![sum; world])
        })?;
        t.f_copy_(&from_bytes(&got, kind)?.to_device(t.device()))?;
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        check_sizes("all_gather", input, out, self.world, true)?;
        let world = self.world;
        let got = self.exchange("all_gather", 2, to_bytes(input), |all| {
            same_lengths("all_gather", &all)?;
            Ok(vec![all.concat(); world])
        })?;
        out.f_copy_(&from_bytes(&got, input.kind())?.to_device(out.device()))?;
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, out: &mut Tensor) -> Result<(), CollectiveError> {
        let n = check_sizes("reduce_scatter", input, out, self.world, false)? as i64;
        check_reducible("reduce_scatter", input)?;
        let (kind, world) = (input.kind(), self.world as i64);
        let got = self.exchange("reduce_scatter", 3, to_bytes(input), |all| {
            same_lengths("reduce_scatter", &all)?;
            let sum = sum_in_rank_order(&all, kind)?;
            Ok((0..world)
                .map(|r| to_bytes(&sum.narrow(0, r * n, n)))
                .collect())
        })?;
        out.f_copy_(&from_bytes(&got, kind)?.to_device(out.device()))?;
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
        t.f_copy_(&from_bytes(&got, t.kind())?.to_device(t.device()))?;
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let world = self.world;
        self.exchange("barrier", 5, Vec::new(), |_| Ok(vec![Vec::new(); world]))?;
        Ok(())
    }

    fn all_reduce_max_f64(&self, value: f64) -> Result<f64, CollectiveError> {
        let world = self.world;
        let value_of = |b: &[u8]| -> Result<f64, CollectiveError> {
            let bytes: [u8; 8] = b.try_into().map_err(|_| CollectiveError::Usage {
                op: "all_reduce_max",
                reason: format!("a rank sent {} bytes, not one f64", b.len()),
            })?;
            Ok(f64::from_le_bytes(bytes))
        };
        let got = self.exchange("all_reduce_max", 6, value.to_le_bytes().to_vec(), |all| {
            let mut max = f64::NEG_INFINITY;
            for b in &all {
                let v = value_of(b)?;
                // A NaN anywhere is the answer (as a tensor max gives it).
                max = if v.is_nan() || max.is_nan() {
                    f64::NAN
                } else {
                    max.max(v)
                };
            }
            Ok(vec![max.to_le_bytes().to_vec(); world])
        })?;
        value_of(&got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];

    fn group(world: usize) -> Vec<TcpCollective> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(20);
        let spokes: Vec<_> = (1..world)
            .map(|r| {
                std::thread::spawn(move || {
                    TcpCollective::spoke(r, world, addr, timeout, &SECRET).unwrap()
                })
            })
            .collect();
        let mut all = vec![TcpCollective::hub(listener, world, timeout, &SECRET).unwrap()];
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

    /// A group of rank 0 and rank 1 works: 1 + 2 reaches both.
    fn assert_the_pair_sums(hub: TcpCollective, spoke: TcpCollective) {
        let h = std::thread::spawn(move || {
            let mut t = Tensor::from_slice(&[2.0f32]);
            spoke.all_reduce_sum(&mut t).map(|()| t.double_value(&[0]))
        });
        let mut t = Tensor::from_slice(&[1.0f32]);
        hub.all_reduce_sum(&mut t).unwrap();
        assert_eq!(t.double_value(&[0]), 3.0);
        assert_eq!(h.join().unwrap().unwrap(), 3.0);
    }

    #[test]
    fn strangers_and_wrong_secrets_are_dropped_without_breaking_the_group() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(20);
        let hub = std::thread::spawn(move || TcpCollective::hub(listener, 2, timeout, &SECRET));
        // A port scan, garbage, and a rank of another job (wrong secret) come first.
        drop(TcpStream::connect(addr).unwrap());
        let mut junk = TcpStream::connect(addr).unwrap();
        junk.write_all(&[9u8; 9]).unwrap();
        drop(junk);
        // Another job's rank learns that this is not its rank 0 (the hub's proof fails under its secret).
        let other_job = TcpCollective::spoke(1, 2, addr, timeout, &[8; 32]);
        match other_job {
            Err(CollectiveError::Backend { reason, .. }) => {
                assert!(reason.contains("did not prove the job's token"), "{reason}")
            }
            Err(e) => panic!("another job's rank: {e}"),
            Ok(_) => panic!("another job's rank joined"),
        }
        let spoke = TcpCollective::spoke(1, 2, addr, timeout, &SECRET).unwrap();
        assert_the_pair_sums(hub.join().unwrap().unwrap(), spoke);
        assert_ne!(group_secret("a"), group_secret("b"));
    }

    /// Copies a connection to `to`, recording what the client sent.
    fn recording_proxy(to: SocketAddr) -> (SocketAddr, std::sync::Arc<Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = std::sync::Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let server = TcpStream::connect(to).unwrap();
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = c_read.read(&mut buf) {
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let (mut s_read, mut c_write) = (server, client);
            let _ = std::io::copy(&mut s_read, &mut c_write);
        });
        (addr, sent)
    }

    #[test]
    fn a_replayed_handshake_is_refused() {
        let timeout = Duration::from_secs(20);
        // A real handshake through a recording proxy: what a listener on the wire captures.
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let (proxy, captured) = recording_proxy(first.local_addr().unwrap());
        let hub = std::thread::spawn(move || TcpCollective::hub(first, 2, timeout, &SECRET));
        let spoke = TcpCollective::spoke(1, 2, proxy, timeout, &SECRET).unwrap();
        let hub = hub.join().unwrap().unwrap();
        drop((hub, spoke));
        let captured = captured.lock().unwrap().clone();
        assert!(captured.len() > 9 + 56, "captured {} bytes", captured.len());
        assert!(
            !captured.windows(32).any(|w| w == SECRET),
            "the secret crossed the wire"
        );

        // The same bytes replayed to the next group's rank 0 (same job secret) are dropped, and the real rank 1
        // joins: the group works, which it would not if the replay had taken rank 1's slot.
        let second = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = second.local_addr().unwrap();
        let hub = std::thread::spawn(move || TcpCollective::hub(second, 2, timeout, &SECRET));
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.write_all(&captured).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let spoke = TcpCollective::spoke(1, 2, addr, timeout, &SECRET).unwrap();
        assert_the_pair_sums(hub.join().unwrap().unwrap(), spoke);
        drop(replay);
    }

    /// Strangers that used to hold rank 0's serial accept loop: a header announcing a 16 GiB frame (an allocation
    /// before any proof), a peer that connects and says nothing, and one that trickles a hello a byte at a time.
    /// Rank 1, connecting after all three, joins at once beside them.
    #[test]
    fn a_huge_header_a_silent_peer_and_a_trickle_hold_up_no_rank() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(20);
        let hub = std::thread::spawn(move || TcpCollective::hub(listener, 2, timeout, &SECRET));
        let mut huge = TcpStream::connect(addr).unwrap();
        huge.write_all(&[0]).unwrap();
        huge.write_all(&(16u64 << 30).to_le_bytes()).unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let trickle = std::thread::spawn(move || {
            let mut t = TcpStream::connect(addr).unwrap();
            let mut frame = vec![0u8];
            frame.extend_from_slice(&56u64.to_le_bytes());
            frame.extend_from_slice(&hello(1, 2, &[1; 32]));
            for b in frame {
                if t.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let spoke = TcpCollective::spoke(1, 2, addr, timeout, &SECRET).unwrap();
        let hub = hub.join().unwrap().unwrap();
        assert!(
            started.elapsed() < HANDSHAKE_DEADLINE / 2,
            "rank 1 was held {:?} by the strangers",
            started.elapsed()
        );
        assert_the_pair_sums(hub, spoke);
        // The huge header was refused without the allocation: its connection is closed.
        huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        assert!(matches!(huge.read(&mut byte), Ok(0) | Err(_)));
        drop(trickle);
    }

    /// A handshake read keeps one deadline for all its bytes: a peer sending a byte every 100 ms is cut off at
    /// the deadline, not 100 ms after its last byte.
    #[test]
    fn a_trickling_peer_is_cut_off_at_the_handshake_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut t = TcpStream::connect(addr).unwrap();
            for _ in 0..100 {
                if t.write_all(&[1]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (stream, _) = listener.accept().unwrap();
        let mut l = link(stream, Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        let e = read_frame_bounded(
            &mut l,
            MAX_HANDSHAKE_FRAME,
            Some(started + Duration::from_millis(600)),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
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
        let spoke =
            std::thread::spawn(move || TcpCollective::spoke(1, 2, addr, short, &SECRET).unwrap());
        let hub = TcpCollective::hub(listener, 2, short, &SECRET).unwrap();
        let _silent = spoke.join().unwrap();
        assert!(matches!(
            hub.barrier(),
            Err(CollectiveError::Timeout { .. })
        ));
    }
}
