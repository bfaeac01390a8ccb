//! The worker's data-plane listener: peers connect to it directly (never through the
//! coordinator) and introduce themselves with a hello naming the job, attempt, their rank and
//! the channel (which of several links between the same two ranks this is: the world ring, a
//! stage's data-parallel ring, a pipeline link, ...).
//!
//! Nobody gets a slot without proving they belong to the job. The coordinator gives every rank
//! of a job attempt the same secret (over TLS, in the assignment); the worker admits that
//! (job, attempt) here for as long as it trains it ([`DataPlane::admit`]). A connection then runs
//! a mutual challenge before anything else:
//! 1. the dialer sends its hello and a random nonce;
//! 2. the listener, if it has admitted that (job, attempt), answers with its own nonce and
//!    `mac(secret, "server", hello, both nonces)`; otherwise it closes at once;
//! 3. the dialer checks that MAC (the listener holds the secret too) and sends
//!    `mac(secret, "client", hello, both nonces)`;
//! 4. the listener checks it and answers one byte: the connection now waits, bound to that
//!    (job, attempt, rank, channel), in a bounded table until the job's training thread claims it.
//!
//! Anything else (another protocol, random bytes, a wrong secret, a job not running here, no
//! answer within [`HANDSHAKE_TIMEOUT`]) is dropped without taking a slot. Handshakes run on
//! threads of their own, at most [`MAX_HANDSHAKES`] at once, so slow strangers cannot stall the
//! accept loop. The hello and the tensors that follow are not encrypted: the LAN sees them.

use super::fetch::FileServer;
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use swarm_proto::trust::{Secret, ct_eq, mac};
use swarm_sharding::{JobId, Rank};

/// Connections admitted but not yet claimed; more are refused.
const MAX_PENDING: usize = 64;
/// Handshakes in progress at once; a connection beyond them is closed at once (a real peer
/// dials again).
pub const MAX_HANDSHAKES: usize = 32;
/// How long a connection may take to complete the challenge.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an admitted connection may wait to be claimed (a job's ranks connect within a
/// minute of each other: `Ring`'s and `Link`'s connect timeouts).
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);
const HELLO_MAGIC: u32 = 0x5357_524d; // "SWRM"
const HELLO_VERSION: u32 = 3;
const HELLO_BYTES: usize = 32;
const NONCE_BYTES: usize = 32;
const ADMITTED: u8 = 0xA5;

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

/// The two MACs of one handshake, over the same transcript.
fn challenge_macs(secret: &Secret, hello: &[u8; HELLO_BYTES], dialer: &[u8], listener: &[u8]) -> ([u8; 32], [u8; 32]) {
    let server = mac(secret, &[b"swarm data plane: listener", hello, dialer, listener]);
    let client = mac(secret, &[b"swarm data plane: dialer", hello, dialer, listener]);
    (server, client)
}

#[derive(Default)]
struct Pending {
    /// Each with the time it arrived.
    conns: HashMap<Hello, (TcpStream, Instant)>,
}

type Admitted = Arc<Mutex<HashMap<(JobId, u64), Secret>>>;
type Files = Arc<Mutex<Option<Arc<FileServer>>>>;

/// Fetch sessions served at once; a fetcher beyond them tries its next source.
pub const MAX_FETCH_SESSIONS: usize = 16;

/// The listener, the secrets of the job attempts it admits, the table of connections
/// waiting to be claimed, and the files it serves (`comm::fetch`).
pub struct DataPlane {
    addr: SocketAddr,
    pending: Arc<(Mutex<Pending>, Condvar)>,
    admitted: Admitted,
    files: Files,
}

/// While it lives, peers holding the job attempt's secret may connect ([`DataPlane::admit`]).
pub struct Admission {
    key: (JobId, u64),
    admitted: Admitted,
    pending: Arc<(Mutex<Pending>, Condvar)>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admitted.lock().expect("admitted lock").remove(&self.key);
        let mut p = self.pending.0.lock().expect("dataplane lock");
        p.conns.retain(|h, _| (h.job, h.attempt) != self.key);
    }
}

impl DataPlane {
    /// Binds `listen` and accepts in a background thread for the life of the process.
    pub fn bind(listen: &str) -> anyhow::Result<DataPlane> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("binding the data-plane listener on {listen}"))?;
        let dp = DataPlane {
            addr: listener.local_addr()?,
            pending: Arc::default(),
            admitted: Arc::default(),
            files: Arc::default(),
        };
        let (table, admitted, files) = (dp.pending.clone(), dp.admitted.clone(), dp.files.clone());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let fetching = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new().name("dataplane-accept".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(peer = ?conn.peer_addr().ok(), "refused a data-plane connection: {MAX_HANDSHAKES} handshakes already in progress");
                    continue;
                }
                let (table, admitted, in_flight) = (table.clone(), admitted.clone(), in_flight.clone());
                let (files, fetching) = (files.clone(), fetching.clone());
                let spawned = std::thread::Builder::new().name("dataplane-hello".into()).spawn(move || {
                    let peer = conn.peer_addr().ok();
                    match first_bytes(conn) {
                        Ok((first, conn)) if is_fetch(&first) => {
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            let server = files.lock().expect("files lock").clone();
                            let Some(server) = server else {
                                tracing::warn!(?peer, "refused a fetch: this data plane serves no files");
                                return;
                            };
                            if fetching.fetch_add(1, Ordering::SeqCst) >= MAX_FETCH_SESSIONS {
                                tracing::warn!(?peer, "refused a fetch: {MAX_FETCH_SESSIONS} already in progress");
                            } else if let Err(e) = super::fetch::serve(conn, &first, &server) {
                                tracing::warn!(?peer, "fetch ended: {e:#}");
                            }
                            fetching.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        Ok((first, conn)) => match handshake(conn, &first, &admitted) {
                            Ok((hello, conn)) => {
                                if let Err(e) = admit_connection(&table, hello, conn) {
                                    tracing::warn!(?peer, ?hello, "refused a data-plane connection: {e:#}");
                                }
                            }
                            Err(e) => tracing::warn!(?peer, "refused a data-plane connection: {e:#}"),
                        },
                        Err(e) => tracing::warn!(?peer, "refused a data-plane connection: {e:#}"),
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    tracing::warn!("refused a data-plane connection: no thread for its handshake");
                }
            }
        })?;
        Ok(dp)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `server`'s files to fetchers that hold its secret, from now on.
    pub fn serve_files(&self, server: Arc<FileServer>) {
        *self.files.lock().expect("files lock") = Some(server);
    }

    /// Lets peers that hold `secret` connect for `job`'s `attempt` until the returned value is
    /// dropped (which also drops that attempt's unclaimed connections).
    pub fn admit(&self, job: JobId, attempt: u64, secret: Secret) -> Admission {
        self.admitted.lock().expect("admitted lock").insert((job, attempt), secret);
        Admission { key: (job, attempt), admitted: self.admitted.clone(), pending: self.pending.clone() }
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

    /// Connects to a peer's data plane and proves this rank belongs to the job (the job
    /// attempt must be admitted here). Retries until `timeout`: the peer may still be starting,
    /// or not yet have been given the job.
    pub fn connect(&self, addr: &str, hello: Hello, timeout: Duration) -> anyhow::Result<TcpStream> {
        let secret = self.admitted.lock().expect("admitted lock").get(&(hello.job, hello.attempt)).copied();
        let Some(secret) = secret else {
            bail!("{} attempt {} is not admitted on this worker's data plane", hello.job, hello.attempt);
        };
        let deadline = Instant::now() + timeout;
        loop {
            match dial(addr, hello, &secret) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("connecting to {addr}: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("connecting to the data plane of a peer at {addr}")),
            }
        }
    }
}

/// The dialer's side of the challenge.
fn dial(addr: &str, hello: Hello, secret: &Secret) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let h = hello.encode();
    let mine: [u8; NONCE_BYTES] = rand::random();
    s.write_all(&[&h[..], &mine[..]].concat())?;
    let mut answer = [0u8; NONCE_BYTES + 32];
    s.read_exact(&mut answer).context("the peer closed the connection (it does not run this job yet)")?;
    let (theirs, their_mac) = answer.split_at(NONCE_BYTES);
    let (server, client) = challenge_macs(secret, &h, &mine, theirs);
    if !ct_eq(&server, their_mac) {
        bail!("the peer at {addr} does not hold {}'s secret: it is not the worker the coordinator assigned", hello.job);
    }
    s.write_all(&client)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).context("the peer refused the connection after the challenge")?;
    if ack[0] != ADMITTED {
        bail!("the peer answered the challenge with {:#x}", ack[0]);
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// A connection's hello and nonce, read within [`HANDSHAKE_TIMEOUT`] (which stays set for the
/// rest of the challenge).
fn first_bytes(mut conn: TcpStream) -> anyhow::Result<([u8; HELLO_BYTES + NONCE_BYTES], TcpStream)> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut first = [0u8; HELLO_BYTES + NONCE_BYTES];
    conn.read_exact(&mut first).context("no complete hello")?;
    Ok((first, conn))
}

fn is_fetch(first: &[u8; HELLO_BYTES + NONCE_BYTES]) -> bool {
    u32::from_le_bytes(first[0..4].try_into().expect("4 bytes")) == super::fetch::FETCH_MAGIC
}

/// The listener's side of the challenge: the proven hello and the connection.
fn handshake(
    mut conn: TcpStream,
    first: &[u8; HELLO_BYTES + NONCE_BYTES],
    admitted: &Admitted,
) -> anyhow::Result<(Hello, TcpStream)> {
    let h: [u8; HELLO_BYTES] = first[..HELLO_BYTES].try_into().expect("32 bytes");
    let hello = Hello::decode(&h)?;
    let secret = admitted.lock().expect("admitted lock").get(&(hello.job, hello.attempt)).copied();
    let Some(secret) = secret else {
        bail!("{} attempt {} does not run on this worker", hello.job, hello.attempt);
    };
    let mine: [u8; NONCE_BYTES] = rand::random();
    let (server, client) = challenge_macs(&secret, &h, &first[HELLO_BYTES..], &mine);
    conn.write_all(&[&mine[..], &server[..]].concat())?;
    let mut proof = [0u8; 32];
    conn.read_exact(&mut proof).context("no answer to the challenge")?;
    if !ct_eq(&proof, &client) {
        bail!("{hello:?} failed the job's challenge (a wrong secret)");
    }
    conn.set_read_timeout(None)?;
    conn.set_write_timeout(None)?;
    Ok((hello, conn))
}

/// Puts a proven connection in the table (and tells the dialer), unless the table is full.
fn admit_connection(table: &(Mutex<Pending>, Condvar), hello: Hello, mut conn: TcpStream) -> anyhow::Result<()> {
    let (lock, cv) = table;
    let mut p = lock.lock().expect("dataplane lock");
    // A connection nobody claimed for this long belongs to a job that never started here (it
    // failed while its ranks were connecting): drop it.
    p.conns.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_TTL);
    if p.conns.len() >= MAX_PENDING {
        bail!("{MAX_PENDING} proven connections are already waiting to be claimed");
    }
    conn.write_all(&[ADMITTED])?;
    p.conns.insert(hello, (conn, Instant::now()));
    cv.notify_all();
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello { job: JobId(7), attempt: 3, from: Rank(2), channel: 5 };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(Hello::decode(&bad).is_err());
    }

    pub(crate) const TEST_SECRET: Secret = Secret([5; 32]);

    #[test]
    fn connections_are_matched_by_hello() {
        let dp = DataPlane::bind("127.0.0.1:0").unwrap();
        let _admitted = dp.admit(JobId(1), 1, TEST_SECRET);
        let addr = dp.local_addr().to_string();
        let h1 = Hello { job: JobId(1), attempt: 1, from: Rank(1), channel: 0 };
        let h0 = Hello { job: JobId(1), attempt: 1, from: Rank(0), channel: 0 };
        // A second link from the same rank, on another channel.
        let h1b = Hello { channel: 2, ..h1 };
        let _a = dp.connect(&addr, h1, Duration::from_secs(5)).unwrap();
        let _b = dp.connect(&addr, h0, Duration::from_secs(5)).unwrap();
        let _c = dp.connect(&addr, h1b, Duration::from_secs(5)).unwrap();
        dp.accept_from(h0, Duration::from_secs(5)).unwrap();
        dp.accept_from(h1b, Duration::from_secs(5)).unwrap();
        dp.accept_from(h1, Duration::from_secs(5)).unwrap();
        let e = dp.accept_from(h1, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("rank1 of job-1 did not connect (channel 0)"), "{e}");
    }

    /// Strangers never get a slot: a wrong secret is refused on both sides, a job that does
    /// not run here is closed at once, and 200 connections of garbage or silence leave room
    /// for the real peer, who is admitted within a second.
    #[test]
    fn strangers_are_refused_and_the_real_peer_still_gets_in() {
        let listener = DataPlane::bind("127.0.0.1:0").unwrap();
        let _a = listener.admit(JobId(3), 1, TEST_SECRET);
        let addr = listener.local_addr().to_string();
        let hello = Hello { job: JobId(3), attempt: 1, from: Rank(1), channel: 0 };
        let impostor = DataPlane::bind("127.0.0.1:0").unwrap();
        let _b = impostor.admit(JobId(3), 1, Secret([6; 32]));
        let e = impostor.connect(&addr, hello, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("does not hold job-3's secret"), "{e:#}");
        // A listener that does not run the job closes the connection before any challenge.
        let _c = impostor.admit(JobId(4), 1, TEST_SECRET);
        let e = impostor.connect(&addr, Hello { job: JobId(4), ..hello }, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("does not run this job"), "{e:#}");

        let mut strangers = Vec::new();
        for i in 0..200u32 {
            let Ok(mut s) = TcpStream::connect(&addr) else { continue };
            if i % 2 == 0 {
                let junk: Vec<u8> = (0..64).map(|j| (i as u8).wrapping_mul(31).wrapping_add(j)).collect();
                let _ = s.write_all(&junk);
            }
            strangers.push(s); // the odd ones say nothing and wait
        }
        let dialer = DataPlane::bind("127.0.0.1:0").unwrap();
        let _d = dialer.admit(JobId(3), 1, TEST_SECRET);
        let t = Instant::now();
        let _conn = dialer.connect(&addr, hello, Duration::from_secs(20)).unwrap();
        listener.accept_from(hello, Duration::from_secs(1)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(HANDSHAKE_TIMEOUT.as_secs() + 2), "{:?}", t.elapsed());
        // Nothing the strangers sent took a slot.
        assert!(listener.pending.0.lock().unwrap().conns.is_empty());
    }
}
