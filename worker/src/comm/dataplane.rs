//! The worker's data-plane listener: peers connect to it directly (never through the
//! coordinator) and introduce themselves with a hello naming the job, attempt, their rank and
//! the channel (which of several links between the same two ranks this is: the world ring, a
//! stage's data-parallel ring, a pipeline link, ...).
//! Connections wait in a bounded table until the training thread of that job claims them.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use swarm_sharding::{JobId, Rank};

/// Connections accepted but not yet claimed; more are refused.
const MAX_PENDING: usize = 64;
/// How long an accepted connection may wait to be claimed (a job's ranks connect within a
/// minute of each other: `Ring`'s and `Link`'s connect timeouts).
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);
const HELLO_MAGIC: u32 = 0x5357_524d; // "SWRM"
const HELLO_VERSION: u32 = 2;
const HELLO_BYTES: usize = 32;

/// Who is on the other end of a data-plane connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    pub job: JobId,
    pub attempt: u64,
    pub from: Rank,
    pub channel: u32,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&HELLO_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.job.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.attempt.to_le_bytes());
        b[24..28].copy_from_slice(&self.from.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.channel.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HELLO_BYTES]) -> anyhow::Result<Hello> {
        let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let long = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if word(0) != HELLO_MAGIC || word(4) != HELLO_VERSION {
            bail!("not a swarm data-plane peer (or another protocol version)");
        }
        Ok(Hello { job: JobId(long(8)), attempt: long(16), from: Rank(word(24)), channel: word(28) })
    }
}

#[derive(Default)]
struct Pending {
    /// Each with the time it arrived.
    conns: HashMap<Hello, (TcpStream, Instant)>,
}

/// The listener and the table of connections waiting to be claimed.
pub struct DataPlane {
    addr: SocketAddr,
    pending: Arc<(Mutex<Pending>, Condvar)>,
}

impl DataPlane {
    /// Binds `listen` and accepts in a background thread for the life of the process.
    pub fn bind(listen: &str) -> anyhow::Result<DataPlane> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("binding the data-plane listener on {listen}"))?;
        let addr = listener.local_addr()?;
        let pending: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
        let table = pending.clone();
        std::thread::Builder::new().name("dataplane-accept".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; HELLO_BYTES];
                let hello = conn.read_exact(&mut buf).map_err(anyhow::Error::from).and_then(|()| Hello::decode(&buf));
                let Ok(hello) = hello else {
                    tracing::warn!("refused a data-plane connection: bad hello");
                    continue;
                };
                let _ = conn.set_read_timeout(None);
                let (lock, cv) = &*table;
                let mut p = lock.lock().expect("dataplane lock");
                // A connection nobody claimed for this long belongs to a job that never started
                // here (it failed while its ranks were connecting): drop it.
                p.conns.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_TTL);
                if p.conns.len() >= MAX_PENDING {
                    tracing::warn!(?hello, "refused a data-plane connection: too many unclaimed");
                    continue;
                }
                p.conns.insert(hello, (conn, Instant::now()));
                cv.notify_all();
            }
        })?;
        Ok(DataPlane { addr, pending })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `timeout` for the peer described by `hello` to connect.
    pub fn accept_from(&self, hello: Hello, timeout: Duration) -> anyhow::Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.pending;
        let mut p = lock.lock().expect("dataplane lock");
        // Connections of older attempts of this job will never be claimed.
        p.conns.retain(|h, _| h.job != hello.job || h.attempt >= hello.attempt);
        loop {
            if let Some((c, _)) = p.conns.remove(&hello) {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{} of {} did not connect (channel {}) within {:?}",
                    hello.from,
                    hello.job,
                    hello.channel,
                    timeout
                );
            }
            p = cv.wait_timeout(p, deadline - now).expect("dataplane lock").0;
        }
    }
}

/// Connects to a peer's data plane, retrying until `timeout` (the peer may still be starting).
pub fn connect(addr: &str, hello: Hello, timeout: Duration) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                s.write_all(&hello.encode())?;
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connecting to {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to the data plane of a peer at {addr}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello { job: JobId(7), attempt: 3, from: Rank(2), channel: 5 };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(Hello::decode(&bad).is_err());
    }

    #[test]
    fn connections_are_matched_by_hello() {
        let dp = DataPlane::bind("127.0.0.1:0").unwrap();
        let addr = dp.local_addr().to_string();
        let h1 = Hello { job: JobId(1), attempt: 1, from: Rank(1), channel: 0 };
        let h0 = Hello { job: JobId(1), attempt: 1, from: Rank(0), channel: 0 };
        // A second link from the same rank, on another channel.
        let h1b = Hello { channel: 2, ..h1 };
        let _a = connect(&addr, h1, Duration::from_secs(5)).unwrap();
        let _b = connect(&addr, h0, Duration::from_secs(5)).unwrap();
        let _c = connect(&addr, h1b, Duration::from_secs(5)).unwrap();
        dp.accept_from(h0, Duration::from_secs(5)).unwrap();
        dp.accept_from(h1b, Duration::from_secs(5)).unwrap();
        dp.accept_from(h1, Duration::from_secs(5)).unwrap();
        let e = dp.accept_from(h1, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("rank1 of job-1 did not connect (channel 0)"), "{e}");
    }
}
