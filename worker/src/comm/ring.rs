//! Ring collectives over TCP between the workers of one data-parallel group: reduce-scatter and
//! all-gather of a flat f32 buffer (each sends 2(n-1)/n of the buffer per all-reduce, the
//! bandwidth-optimal amount), and a small deterministic all-reduce for scalars.
//!
//! Chunk `i` of a buffer is `shard_range(len, n, i)`, the same ranges ZeRO uses for ownership,
//! so after `reduce_scatter` rank `r` holds the sum of exactly the chunk whose optimizer state it owns.

use super::dataplane::{DataPlane, Hello};
use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swarm_sharding::plan::shard_range;
use swarm_sharding::{JobId, Peer, Rank};

/// How long a peer may take to connect when a job starts. Long, because a rank connects only
/// after it has fetched the job's dataset and model (a 70B model over 1 GbE takes about 20
/// minutes); a peer that died meanwhile is found by the coordinator (lost lease), which
/// cancels the job and so ends the wait ([`Aborter`]).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest wait for one message, a last resort: a dead peer's socket errors long before
/// this, and a silent one is found by the coordinator (lost lease), which cancels the job and
/// closes these sockets. It must outlast legitimate waits, such as a peer writing a large
/// model's checkpoint before the next step.
const IO_TIMEOUT: Duration = Duration::from_secs(3600);

/// Closes a ring's sockets from another thread, so a cancelled job stops at once, and ends
/// the waits for peers to connect ([`Aborter::wait_for`]).
#[derive(Clone, Default)]
pub struct Aborter(Arc<Mutex<Vec<TcpStream>>>, Arc<std::sync::atomic::AtomicBool>);

impl Aborter {
    /// Registers a socket to close on abort.
    pub fn add(&self, s: TcpStream) {
        self.0.lock().expect("aborter lock").push(s);
    }

    pub fn abort(&self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.0.lock().expect("aborter lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Calls `attempt` (which waits at most the slice it is given) until it succeeds, `total`
    /// has passed (its last error), or the job is aborted.
    pub fn wait_for<T>(
        &self,
        total: Duration,
        mut attempt: impl FnMut(Duration) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let deadline = std::time::Instant::now() + total;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match attempt(left.min(Duration::from_secs(1))) {
                Ok(t) => return Ok(t),
                Err(e) if left.is_zero() => return Err(e),
                Err(_) if self.1.load(std::sync::atomic::Ordering::SeqCst) => anyhow::bail!("the job was cancelled"),
                Err(_) => {}
            }
        }
    }
}

pub struct Ring {
    rank: usize,
    world: usize,
    /// Stream to rank+1 (we send) and from rank-1 (we receive); `None` when alone.
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    next_peer: String,
    prev_peer: String,
    bytes_sent: u64,
}

fn describe(p: &Peer) -> String {
    format!("{} ({} at {})", p.rank, p.worker, p.data_addr)
}

impl Ring {
    /// Connects rank `rank` to its neighbours in the ring of all `peers` (channel 0): rank r
    /// dials r+1 and accepts r-1.
    pub fn connect(
        dp: &DataPlane,
        job: JobId,
        attempt: u64,
        rank: Rank,
        peers: &[Peer],
        aborter: &Aborter,
    ) -> anyhow::Result<Ring> {
        Ring::connect_group(dp, job, attempt, 0, rank, peers, aborter)
    }

    /// Connects `rank` to its neighbours in the ring of `peers` (a group of the job's ranks, in
    /// ring order, which must include `rank`) on data-plane channel `channel`. Position i dials
    /// position i+1 and accepts position i-1.
    pub fn connect_group(
        dp: &DataPlane,
        job: JobId,
        attempt: u64,
        channel: u32,
        rank: Rank,
        peers: &[Peer],
        aborter: &Aborter,
    ) -> anyhow::Result<Ring> {
        let world = peers.len();
        let Some(r) = peers.iter().position(|p| p.rank == rank) else {
            bail!("{rank} is outside its group of {world}");
        };
        let next_p = &peers[(r + 1) % world];
        let prev_p = &peers[(r + world - 1) % world];
        let mut ring = Ring {
            rank: r,
            world,
            next: None,
            prev: None,
            next_peer: describe(next_p),
            prev_peer: describe(prev_p),
            bytes_sent: 0,
        };
        if world == 1 {
            return Ok(ring);
        }
        let next = aborter
            .wait_for(CONNECT_TIMEOUT, |t| {
                dp.connect(&next_p.data_addr, Hello { job, attempt, from: rank, channel }, t)
            })
            .with_context(|| format!("connecting to {}", ring.next_peer))?;
        let prev = aborter
            .wait_for(CONNECT_TIMEOUT, |t| dp.accept_from(Hello { job, attempt, from: prev_p.rank, channel }, t))
            .with_context(|| format!("waiting for {}", ring.prev_peer))?;
        for s in [&next, &prev] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            aborter.0.lock().expect("aborter lock").push(s.try_clone()?);
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Payload bytes this rank has sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// The chunk of a `len`-element buffer that this rank owns.
    pub fn own_range(&self, len: usize) -> Range<usize> {
        shard_range(len, self.world, self.rank)
    }

    /// Sends `out` to the next rank while receiving a message of `expect` floats from the previous.
    fn exchange(&mut self, out: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            bail!("ring exchange with a group of one");
        };
        let bytes = super::encode_f32s(out);
        let (next_peer, prev_peer) = (&self.next_peer, &self.prev_peer);
        let received = std::thread::scope(|s| -> anyhow::Result<Vec<f32>> {
            let sender =
                s.spawn(|| next.write_all(&bytes).with_context(|| format!("sending to {next_peer}: the peer is gone")));
            let mut header = [0u8; 8];
            let recv = prev
                .read_exact(&mut header)
                .with_context(|| {
                    format!("receiving from {prev_peer}: the connection closed (the peer died or was cancelled)")
                })
                .and_then(|()| {
                    let n = u64::from_le_bytes(header) as usize;
                    if n != expect {
                        bail!("{prev_peer} sent {n} values where {expect} were expected (a different model or plan?)");
                    }
                    super::read_f32s(prev, n)
                        .with_context(|| format!("receiving from {prev_peer}: the connection closed mid-message"))
                });
            let sent = sender.join().map_err(|_| anyhow::anyhow!("the ring sender thread panicked"))?;
            let received = recv?;
            sent?;
            Ok(received)
        })?;
        self.bytes_sent += bytes.len() as u64; // what went on the wire: header and payload
        Ok(received)
    }

    /// Sums `buf` over all ranks; afterwards this rank's own chunk holds the sum (the rest of
    /// `buf` holds partial sums). Returns the own chunk's range.
    pub fn reduce_scatter(&mut self, buf: &mut [f32]) -> anyhow::Result<Range<usize>> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        for k in 0..n.saturating_sub(1) {
            let send = shard_range(len, n, (r + 2 * n - k - 1) % n);
            let recv = shard_range(len, n, (r + 2 * n - k - 2) % n);
            let got = self.exchange(&buf[send], recv.len())?;
            for (d, s) in buf[recv].iter_mut().zip(got) {
                *d += s;
            }
        }
        Ok(self.own_range(len))
    }

    /// Given each rank's own chunk, fills in every other chunk of `buf`.
    pub fn all_gather(&mut self, buf: &mut [f32]) -> anyhow::Result<()> {
        let (n, len) = (self.world, buf.len());
        let ranges: Vec<Range<usize>> = (0..n).map(|i| shard_range(len, n, i)).collect();
        self.all_gather_ranges(buf, &ranges)
    }

    /// Gathers to position 0 of the ring: position i contributes `own` as `ranges[i]` of a
    /// `total`-element vector, which only position 0 gets back (`Some`). The messages are the
    /// all-gather's, but every other rank holds only the chunk in transit, never the whole.
    pub fn gather_ranges_to_first(
        &mut self,
        own: &[f32],
        ranges: &[Range<usize>],
        total: usize,
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let lists: Vec<Vec<Range<usize>>> = ranges.iter().map(|r| vec![r.clone()]).collect();
        self.gather_range_lists_to_first(own, &lists, total)
    }

    /// [`Ring::gather_ranges_to_first`] where each rank owns a list of ranges (`own` holds their
    /// values concatenated): a pipeline's last stage holds a tied embedding and its layers.
    pub fn gather_range_lists_to_first(
        &mut self,
        own: &[f32],
        lists: &[Vec<Range<usize>>],
        total: usize,
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let (n, r) = (self.world, self.rank);
        let len = |i: usize| lists[i].iter().map(Range::len).sum::<usize>();
        if lists.len() != n || len(r) != own.len() {
            bail!("gather: {} range lists for a ring of {n}, or a chunk of the wrong size", lists.len());
        }
        let mut full = (r == 0).then(|| vec![0f32; total]);
        let place = |full: &mut [f32], from: usize, values: &[f32]| {
            let mut off = 0;
            for g in &lists[from] {
                full[g.clone()].copy_from_slice(&values[off..off + g.len()]);
                off += g.len();
            }
        };
        if let Some(f) = &mut full {
            place(f, 0, own);
        }
        let mut carry = own.to_vec();
        for k in 0..n.saturating_sub(1) {
            let from = (r + 2 * n - k - 1) % n;
            let got = self.exchange(&carry, len(from))?;
            if let Some(f) = &mut full {
                place(f, from, &got);
            }
            carry = got;
        }
        Ok(full)
    }

    /// All-gather where position i of the ring contributes `ranges[i]` of `buf` (any ranges,
    /// e.g. what each rank of a pipeline owns); afterwards every rank holds all of them.
    pub fn all_gather_ranges(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> anyhow::Result<()> {
        let (n, r) = (self.world, self.rank);
        if ranges.len() != n {
            bail!("all-gather: {} ranges for a ring of {n}", ranges.len());
        }
        for k in 0..n.saturating_sub(1) {
            let send = ranges[(r + n - k) % n].clone();
            let recv = ranges[(r + 2 * n - k - 1) % n].clone();
            let got = self.exchange(&buf[send], recv.len())?;
            buf[recv].copy_from_slice(&got);
        }
        Ok(())
    }

    /// Sums a few f64 values over all ranks in rank order, so every rank gets the bit-identical
    /// result whatever the ring's direction. Values travel as pairs of f32 words (exact).
    pub fn all_reduce_small(&mut self, vals: &[f64]) -> anyhow::Result<Vec<f64>> {
        let (n, r, m) = (self.world, self.rank, vals.len());
        // Gather every rank's values: slot i holds rank i's m values, each split hi/lo.
        let mut buf = vec![0f32; 2 * m * n];
        for (j, v) in vals.iter().enumerate() {
            let bits = v.to_bits();
            buf[2 * m * r + 2 * j] = f32::from_bits((bits >> 32) as u32);
            buf[2 * m * r + 2 * j + 1] = f32::from_bits(bits as u32);
        }
        for k in 0..n.saturating_sub(1) {
            let send_rank = (r + n - k) % n;
            let recv_rank = (r + 2 * n - k - 1) % n;
            let got = self.exchange(&buf[2 * m * send_rank..2 * m * (send_rank + 1)], 2 * m)?;
            buf[2 * m * recv_rank..2 * m * (recv_rank + 1)].copy_from_slice(&got);
        }
        Ok((0..m)
            .map(|j| {
                (0..n)
                    .map(|i| {
                        let hi = buf[2 * m * i + 2 * j].to_bits() as u64;
                        let lo = buf[2 * m * i + 2 * j + 1].to_bits() as u64;
                        f64::from_bits((hi << 32) | lo)
                    })
                    .sum()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::dataplane::tests::TEST_SECRET;
    use swarm_sharding::WorkerId;

    /// Per rank: its reduced chunk, the all-gathered buffer, the small all-reduce, bytes sent.
    type RankResult = (Vec<f32>, Vec<f32>, Vec<f64>, u64);

    fn run_group(world: usize, len: usize) -> Vec<RankResult> {
        let planes: Vec<DataPlane> = (0..world).map(|_| DataPlane::bind("127.0.0.1:0").unwrap()).collect();
        let _admitted: Vec<_> = planes.iter().map(|dp| dp.admit(JobId(1), 1, TEST_SECRET)).collect();
        let peers: Vec<Peer> = planes
            .iter()
            .enumerate()
            .map(|(i, dp)| Peer {
                rank: Rank(i as u32),
                worker: WorkerId(i as u64 + 1),
                data_addr: dp.local_addr().to_string(),
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = planes
                .iter()
                .enumerate()
                .map(|(i, dp)| {
                    let peers = peers.clone();
                    s.spawn(move || {
                        let mut ring =
                            Ring::connect(dp, JobId(1), 1, Rank(i as u32), &peers, &Aborter::default()).unwrap();
                        let mut buf: Vec<f32> = (0..len).map(|j| (i * 1000 + j) as f32).collect();
                        let own = ring.reduce_scatter(&mut buf).unwrap();
                        let reduced = buf[own].to_vec();
                        ring.all_gather(&mut buf).unwrap();
                        let small = ring.all_reduce_small(&[i as f64 + 0.1, 1.0]).unwrap();
                        (reduced, buf, small, ring.bytes_sent())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn gather_to_first_delivers_every_range_to_rank_0_only() {
        let planes: Vec<DataPlane> = (0..3).map(|_| DataPlane::bind("127.0.0.1:0").unwrap()).collect();
        let _admitted: Vec<_> = planes.iter().map(|dp| dp.admit(JobId(1), 1, TEST_SECRET)).collect();
        let peers: Vec<Peer> = planes
            .iter()
            .enumerate()
            .map(|(i, dp)| Peer {
                rank: Rank(i as u32),
                worker: WorkerId(i as u64 + 1),
                data_addr: dp.local_addr().to_string(),
            })
            .collect();
        // Uneven, out-of-order ranges that partition 0..10.
        let ranges = [4..9, 0..4, 9..10];
        let got: Vec<Option<Vec<f32>>> = std::thread::scope(|s| {
            let hs: Vec<_> = planes
                .iter()
                .enumerate()
                .map(|(i, dp)| {
                    let (peers, ranges) = (peers.clone(), ranges.clone());
                    s.spawn(move || {
                        let mut ring =
                            Ring::connect(dp, JobId(1), 1, Rank(i as u32), &peers, &Aborter::default()).unwrap();
                        let own: Vec<f32> = ranges[i].clone().map(|j| j as f32).collect();
                        ring.gather_ranges_to_first(&own, &ranges, 10).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got[0].as_deref(), Some((0..10).map(|j| j as f32).collect::<Vec<_>>().as_slice()));
        assert!(got[1].is_none() && got[2].is_none());
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_all_reduce() {
        for (world, len) in [(1, 5), (2, 7), (3, 10), (4, 3)] {
            let results = run_group(world, len);
            let want: Vec<f32> = (0..len).map(|j| (0..world).map(|i| (i * 1000 + j) as f32).sum()).collect();
            for (r, (reduced, full, small, sent)) in results.iter().enumerate() {
                assert_eq!(reduced.as_slice(), &want[shard_range(len, world, r)], "world {world} rank {r}");
                assert_eq!(full, &want, "world {world} rank {r}");
                let want_small: f64 = (0..world).map(|i| i as f64 + 0.1).sum();
                assert_eq!(small, &vec![want_small, world as f64]);
                if world > 1 && len % world == 0 {
                    // Bandwidth-optimal: 2(n-1)/n of the buffer per all-reduce (plus the small one),
                    // and an 8-byte header per message: 3(n-1) messages.
                    let big = (2 * (world - 1) * len / world * 4) as u64;
                    assert_eq!(*sent, big + (world as u64 - 1) * 16 + 3 * (world as u64 - 1) * 8);
                }
            }
        }
    }
}
