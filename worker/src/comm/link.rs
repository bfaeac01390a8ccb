//! A point-to-point link between two ranks (neighbouring pipeline stages, or the first and last
//! stage sharing tied embeddings): one TCP connection, messages of f32 values.
//!
//! Sends go through a sender thread fed by a bounded queue ([`QUEUE`] messages), so a stage can
//! post an activation and go on to receive a gradient: with blocking sends on both sides, two
//! stages each writing a message larger than the socket buffers would wait on each other
//! forever. The queue bounds the memory a slow receiver can make a sender hold.

use super::dataplane::{DataPlane, Hello, connect};
use super::ring::Aborter;
use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swarm_sharding::{JobId, Peer, Rank};

/// Messages a sender may have queued before `send` blocks.
pub const QUEUE: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait for one message, a last resort: a dead peer's socket errors long before
/// this, and a silent one is found by the coordinator (lost lease), which cancels the job and
/// closes these sockets. It must outlast legitimate waits, such as a peer writing a large
/// model's checkpoint before the next step.
const IO_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct Link {
    /// Who is at the other end, for messages ("rank2 (stage 1 of 2, worker-3 at ...)").
    peer: String,
    recv: TcpStream,
    queue: Option<SyncSender<Vec<u8>>>,
    /// The sender thread's write error, if any.
    failed: Arc<Mutex<Option<String>>>,
    bytes_sent: u64,
}

impl Link {
    /// Connects `me` and `peer` on data-plane channel `channel`: the lower rank dials, the
    /// higher accepts. `what` describes the peer in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        dp: &DataPlane,
        job: JobId,
        attempt: u64,
        channel: u32,
        me: Rank,
        peer: &Peer,
        what: String,
        aborter: &Aborter,
    ) -> anyhow::Result<Link> {
        let stream = if me.0 < peer.rank.0 {
            connect(&peer.data_addr, Hello { job, attempt, from: me, channel }, CONNECT_TIMEOUT)
        } else {
            dp.accept_from(Hello { job, attempt, from: peer.rank, channel }, CONNECT_TIMEOUT)
        }
        .with_context(|| format!("linking to {what}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        aborter.add(stream.try_clone()?);
        let mut out = stream.try_clone()?;
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let f = failed.clone();
        // Detached: it ends when the queue closes (after writing what was queued, which the
        // peer may still be reading) or a write fails.
        std::thread::Builder::new().name("link-send".into()).spawn(move || {
            for msg in rx {
                if let Err(e) = out.write_all(&msg) {
                    *f.lock().expect("link lock") = Some(e.to_string());
                    return;
                }
            }
        })?;
        Ok(Link { peer: what, recv: stream, queue: Some(tx), failed, bytes_sent: 0 })
    }

    /// Queues `data` for the peer; blocks only while [`QUEUE`] messages are already waiting.
    pub fn send(&mut self, data: &[f32]) -> anyhow::Result<()> {
        let msg = super::encode_f32s(data);
        let n = msg.len() as u64;
        let queued = self.queue.as_ref().is_some_and(|q| q.send(msg).is_ok());
        if !queued {
            let why = self.failed.lock().expect("link lock").clone().unwrap_or_else(|| "closed".into());
            bail!("sending to {}: the peer is gone ({why})", self.peer);
        }
        self.bytes_sent += n;
        Ok(())
    }

    /// Receives the next message, which must hold `expect` values.
    pub fn recv(&mut self, expect: usize) -> anyhow::Result<Vec<f32>> {
        let mut header = [0u8; 8];
        self.recv.read_exact(&mut header).with_context(|| {
            format!("receiving from {}: the connection closed (the peer died or was cancelled)", self.peer)
        })?;
        let n = u64::from_le_bytes(header) as usize;
        if n != expect {
            bail!("{} sent {n} values where {expect} were expected (a different model or plan?)", self.peer);
        }
        super::read_f32s(&mut self.recv, n)
            .with_context(|| format!("receiving from {}: the connection closed mid-message", self.peer))
    }

    /// Bytes queued for sending so far (header and payload).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_sharding::WorkerId;

    /// Both ends send a message far larger than the socket buffers before either receives:
    /// with blocking sends this would deadlock; the queue lets both go on to receive.
    #[test]
    fn crossing_large_messages_do_not_deadlock() {
        let planes: Vec<DataPlane> = (0..2).map(|_| DataPlane::bind("127.0.0.1:0").unwrap()).collect();
        let peers: Vec<Peer> = planes
            .iter()
            .enumerate()
            .map(|(i, dp)| Peer {
                rank: Rank(i as u32),
                worker: WorkerId(i as u64 + 1),
                data_addr: dp.local_addr().to_string(),
            })
            .collect();
        let n = 4 << 20; // 16 MiB per message
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|i| {
                    let (dp, peers) = (&planes[i], &peers);
                    s.spawn(move || {
                        let other = &peers[1 - i];
                        let mut l = Link::connect(
                            dp,
                            JobId(1),
                            1,
                            2,
                            Rank(i as u32),
                            other,
                            format!("{}", other.rank),
                            &Aborter::default(),
                        )
                        .unwrap();
                        let mine: Vec<f32> = (0..n).map(|j| (i * 7 + j % 13) as f32).collect();
                        l.send(&mine).unwrap();
                        l.send(&mine[..5]).unwrap();
                        let got = l.recv(n).unwrap();
                        let small = l.recv(5).unwrap();
                        assert!(got.iter().enumerate().all(|(j, v)| *v == ((1 - i) * 7 + j % 13) as f32));
                        assert_eq!(small, got[..5]);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        });
    }
}
