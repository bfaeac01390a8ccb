//! A point-to-point link between two ranks (neighbouring pipeline stages, or the first and last
//! stage sharing tied embeddings): one TCP connection, messages of tensor values.
//!
//! A message is an 8-byte little-endian header (the value count, with the wire dtype in its top
//! byte) and the values, little endian. A tensor goes in its own dtype when that is bf16 (a GPU
//! stage computes in bf16, so f32 would double the bytes and carry nothing more), otherwise in
//! f32; the receiver converts to its own compute dtype. So a job that mixes a bf16 GPU stage with
//! an f32 CPU stage converts at the boundary, and loses nothing the sender had.
//!
//! Sends go through a sender thread fed by a bounded queue ([`QUEUE`] messages), so a stage can
//! post an activation and go on to receive a gradient: with blocking sends on both sides, two
//! stages each writing a message larger than the socket buffers would wait on each other
//! forever. The queue bounds the memory a slow receiver can make a sender hold.

use super::dataplane::{DataPlane, Hello};
use super::ring::Aborter;
use anyhow::{Context, bail};
use candle_core::{DType, Device, Shape, Tensor};
use half::bf16;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swarm_sharding::{JobId, Peer, Rank};

/// Messages a sender may have queued before `send` blocks.
pub const QUEUE: usize = 2;
use super::ring::CONNECT_TIMEOUT;
/// The longest wait for one message, a last resort: a dead peer's socket errors long before
/// this, and a silent one is found by the coordinator (lost lease), which cancels the job and
/// closes these sockets. It must outlast legitimate waits, such as a peer writing a large
/// model's checkpoint before the next step.
const IO_TIMEOUT: Duration = Duration::from_secs(3600);

/// The wire dtype, in the header's top byte.
const WIRE_F32: u8 = 0;
const WIRE_BF16: u8 = 1;
/// The header's value count: the low 56 bits.
const COUNT_MASK: u64 = (1 << 56) - 1;

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
        let stream = aborter
            .wait_for(CONNECT_TIMEOUT, |t| {
                if me.0 < peer.rank.0 {
                    dp.connect(&peer.data_addr, Hello { job, attempt, from: me, channel }, t)
                } else {
                    dp.accept_from(Hello { job, attempt, from: peer.rank, channel }, t)
                }
            })
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

    /// Queues `t`'s values for the peer (in bf16 if `t` is bf16, else in f32); blocks only
    /// while [`QUEUE`] messages are already waiting.
    pub fn send_tensor(&mut self, t: &Tensor) -> anyhow::Result<()> {
        let t = t.flatten_all()?;
        let msg = if t.dtype() == DType::BF16 {
            let v = t.to_vec1::<bf16>()?;
            message(WIRE_BF16, v.len(), bytemuck::cast_slice(&v))
        } else {
            let v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            message(WIRE_F32, v.len(), bytemuck::cast_slice(&v))
        };
        self.queue_msg(msg)
    }

    fn queue_msg(&mut self, msg: Vec<u8>) -> anyhow::Result<()> {
        let n = msg.len() as u64;
        let queued = self.queue.as_ref().is_some_and(|q| q.send(msg).is_ok());
        if !queued {
            let why = self.failed.lock().expect("link lock").clone().unwrap_or_else(|| "closed".into());
            bail!("sending to {}: the peer is gone ({why})", self.peer);
        }
        self.bytes_sent += n;
        Ok(())
    }

    /// Receives the next message as a tensor of `shape` on `device` in `dtype`, whatever the
    /// dtype it travelled in. The message must hold exactly `shape`'s element count.
    pub fn recv_tensor(&mut self, shape: impl Into<Shape>, device: &Device, dtype: DType) -> anyhow::Result<Tensor> {
        let shape = shape.into();
        let expect = shape.elem_count();
        let mut header = [0u8; 8];
        self.recv.read_exact(&mut header).with_context(|| {
            format!("receiving from {}: the connection closed (the peer died or was cancelled)", self.peer)
        })?;
        let header = u64::from_le_bytes(header);
        let (wire, n) = ((header >> 56) as u8, (header & COUNT_MASK) as usize);
        if n != expect {
            bail!("{} sent {n} values where {expect} were expected (a different model or plan?)", self.peer);
        }
        let closed = || format!("receiving from {}: the connection closed mid-message", self.peer);
        let t = match wire {
            WIRE_F32 => {
                let v = super::read_f32s(&mut self.recv, n).with_context(closed)?;
                Tensor::from_vec(v, shape, device)?
            }
            WIRE_BF16 => {
                let mut v = vec![bf16::ZERO; n];
                self.recv.read_exact(bytemuck::cast_slice_mut(&mut v)).with_context(closed)?;
                #[cfg(target_endian = "big")]
                for x in &mut v {
                    *x = bf16::from_bits(u16::from_le(x.to_bits()));
                }
                Tensor::from_vec(v, shape, device)?
            }
            other => bail!("{} sent a message of unknown wire dtype {other} (a different Swarm version?)", self.peer),
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// Bytes queued for sending so far (header and payload).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
}

/// A message: the header (`n` and the wire dtype) and the values' little-endian bytes
/// (`payload` holds them in native order).
fn message(wire: u8, n: usize, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.extend_from_slice(&((n as u64 & COUNT_MASK) | (u64::from(wire) << 56)).to_le_bytes());
    #[cfg(target_endian = "little")]
    msg.extend_from_slice(payload);
    #[cfg(target_endian = "big")]
    for v in payload.chunks_exact(payload.len() / n.max(1)) {
        msg.extend(v.iter().rev());
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::dataplane::tests::TEST_SECRET;
    use swarm_sharding::WorkerId;

    /// Both ends send a message far larger than the socket buffers before either receives:
    /// with blocking sends this would deadlock; the queue lets both go on to receive.
    #[test]
    fn crossing_large_messages_do_not_deadlock() {
        let planes: Vec<DataPlane> = (0..2).map(|_| DataPlane::bind("127.0.0.1:0").unwrap()).collect();
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
                        let mine = Tensor::from_vec(mine, n, &Device::Cpu).unwrap();
                        l.send_tensor(&mine).unwrap();
                        // A bf16 tensor travels in bf16 (2 bytes a value) and arrives as f32.
                        let sent = l.bytes_sent();
                        l.send_tensor(&mine.narrow(0, 0, 5).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
                        assert_eq!(l.bytes_sent() - sent, 8 + 2 * 5);
                        let got = l.recv_tensor(n, &Device::Cpu, DType::F32).unwrap().to_vec1::<f32>().unwrap();
                        let small = l.recv_tensor((5, 1), &Device::Cpu, DType::F32).unwrap();
                        assert_eq!(small.dims(), [5, 1]);
                        assert!(got.iter().enumerate().all(|(j, v)| *v == ((1 - i) * 7 + j % 13) as f32));
                        assert_eq!(small.flatten_all().unwrap().to_vec1::<f32>().unwrap(), got[..5]);
                        // A count that does not match the receiver's shape is an error naming both.
                        l.send_tensor(&mine.narrow(0, 0, 3).unwrap()).unwrap();
                        let err = l.recv_tensor(4, &Device::Cpu, DType::F32).unwrap_err().to_string();
                        assert!(err.contains("sent 3 values where 4 were expected"), "{err}");
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        });
    }
}
