//! Files over the data plane: the dataset and model a job reads, and checkpoint shards (for
//! replicas, a resume on other hosts and `swarm checkpoint pull`). Bulk bytes on a plain TCP
//! connection, not gRPC messages, so a transfer runs at line rate.
//!
//! A fetch connection opens like a job's (a 32-byte hello and a nonce, on the same port), with
//! its own magic, and runs the same mutual challenge over the cluster's fetch secret: every
//! worker receives it when it joins, and an admin client (the submitter, `swarm checkpoint
//! pull`) asks the coordinator for it. Then, any number of times:
//! - dialer: `GET` (1 byte), the path's length (u16 LE), the path, the offset (u64 LE), the
//!   length it expects (u64 LE; 0 when unknown);
//! - listener: a status byte (0: found, 1: not here) and, when found, the file's length (u64
//!   LE) followed by its bytes from the offset. A file the listener is itself still fetching is
//!   sent as it arrives ([`open_served`]): a job's workers fetch a bundle along a chain (rank r
//!   from rank r-1, rank 0 from the submitter), so every link carries it once, at line rate.
//!
//! A listener serves only what its resolver maps a path to (a worker: files under the
//! `content/` and `checkpoints/` folders of its state directory; a submitter: the files it
//! registered). The fetcher never trusts the bytes: it hashes what it receives and keeps a
//! file only if its SHA-256 is the one it asked for. An interrupted file stays as
//! `.NAME.part` and the next attempt continues from its end.

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use swarm_proto::trust::{Secret, ct_eq, mac};

pub(crate) const FETCH_MAGIC: u32 = 0x5357_5246; // "SWRF"
const FETCH_VERSION: u32 = 2;
const OP_GET: u8 = 1;
const FOUND: u8 = 0;
const NOT_HERE: u8 = 1;
/// Bytes per read and write of a transfer.
const CHUNK: usize = 1 << 20;
/// The longest path a request may name.
const MAX_PATH: usize = 1024;
/// How long a fetch waits on a silent peer before it tries the next source.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Maps a requested path to the file that answers it, or `None`.
pub type Resolver = Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

/// What a data plane serves to fetchers that hold the secret.
pub struct FileServer {
    secret: Secret,
    resolve: Resolver,
    sent: AtomicU64,
}

impl FileServer {
    pub fn new(secret: Secret, resolve: Resolver) -> FileServer {
        FileServer { secret, resolve, sent: AtomicU64::new(0) }
    }

    /// Bytes of file content sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A resolver for a worker's state directory: `content/...` and `checkpoints/...`, plain
/// names only (no `..`, nothing hidden, so never a partial `.part` file).
pub fn state_dir_resolver(root: PathBuf) -> Resolver {
    Arc::new(move |path: &str| {
        let p = Path::new(path);
        let mut parts = p.components();
        let first = match parts.next() {
            Some(Component::Normal(c)) => c.to_str()?,
            _ => return None,
        };
        if !matches!(first, "content" | "checkpoints") {
            return None;
        }
        let plain = p.components().all(|c| match c {
            Component::Normal(n) => n.to_str().is_some_and(swarm_sharding::content::valid_file_name),
            _ => false,
        });
        plain.then(|| root.join(p))
    })
}

fn hello() -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&FETCH_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&FETCH_VERSION.to_le_bytes());
    b
}

fn macs(secret: &Secret, hello: &[u8], dialer: &[u8], listener: &[u8]) -> ([u8; 32], [u8; 32]) {
    (
        mac(secret, &[b"swarm fetch: listener", hello, dialer, listener]),
        mac(secret, &[b"swarm fetch: dialer", hello, dialer, listener]),
    )
}

/// The listener's side, after the first 64 bytes (hello and nonce) were read: the challenge,
/// then requests until the dialer closes.
pub(crate) fn serve(mut conn: TcpStream, first: &[u8; 64], server: &FileServer) -> anyhow::Result<()> {
    let version = u32::from_le_bytes(first[4..8].try_into().expect("4 bytes"));
    if version != FETCH_VERSION {
        bail!("a fetch of protocol version {version}; this worker speaks {FETCH_VERSION}");
    }
    let mine: [u8; 32] = rand::random();
    let (listener, dialer) = macs(&server.secret, &first[..32], &first[32..], &mine);
    conn.write_all(&[&mine[..], &listener[..]].concat())?;
    let mut proof = [0u8; 32];
    conn.read_exact(&mut proof).context("no answer to the challenge")?;
    if !ct_eq(&proof, &dialer) {
        bail!("a fetch failed the cluster's challenge (a wrong secret)");
    }
    conn.write_all(&[FOUND])?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    loop {
        let mut op = [0u8; 1];
        match conn.read_exact(&mut op) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if op[0] != OP_GET {
            bail!("unknown fetch request {:#x}", op[0]);
        }
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)?;
        let len = u16::from_le_bytes(len) as usize;
        if len > MAX_PATH {
            bail!("a fetch path of {len} bytes");
        }
        let mut path = vec![0u8; len];
        conn.read_exact(&mut path)?;
        let mut offset = [0u8; 8];
        conn.read_exact(&mut offset)?;
        let offset = u64::from_le_bytes(offset);
        let mut want = [0u8; 8];
        conn.read_exact(&mut want)?;
        let want = u64::from_le_bytes(want);
        let file =
            std::str::from_utf8(&path).ok().and_then(|p| (server.resolve)(p)).and_then(|p| open_served(&p, want));
        let Some((mut f, total, growing)) = file.filter(|(_, total, _)| offset <= *total) else {
            conn.write_all(&[NOT_HERE])?;
            continue;
        };
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(offset))?;
        conn.write_all(&[FOUND])?;
        conn.write_all(&total.to_le_bytes())?;
        // `io::copy` from a file to a socket is `sendfile` on Linux: no copy through this
        // process. A growing file is sent as far as it has arrived, then waited on.
        let (mut pos, end) = (offset, total);
        let mut idle_since = Instant::now();
        while pos < end {
            let have = f.metadata()?.len().min(end);
            if have <= pos {
                if !growing || idle_since.elapsed() > IO_TIMEOUT {
                    bail!("the file stopped with {} bytes to go", end - pos);
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let n = std::io::copy(&mut (&mut f).take(have - pos), &mut conn)?;
            if n == 0 {
                bail!("the file shrank while it was being sent");
            }
            idle_since = Instant::now();
            server.sent.fetch_add(n, Ordering::Relaxed);
            pos += n;
        }
    }
}

/// How long a request waits for a file this host has not started fetching yet.
const PART_WAIT: Duration = Duration::from_secs(10);

/// The file that answers a request for `path`: the complete file, with its length; or, while
/// this host is still fetching it, its partial download, with the length the requester expects
/// (`want`), to be sent as it grows (so a job's workers relay a bundle along a chain, each
/// link at line rate, instead of all pulling it from the submitter).
fn open_served(path: &Path, want: u64) -> Option<(std::fs::File, u64, bool)> {
    let deadline = Instant::now() + PART_WAIT;
    loop {
        if let Ok(f) = std::fs::File::open(path)
            && let Ok(m) = f.metadata()
            && m.is_file()
        {
            return Some((f, m.len(), false));
        }
        if let Ok(f) = std::fs::File::open(part_path(path)) {
            return (want > 0).then_some((f, want, true));
        }
        if Instant::now() >= deadline || want == 0 {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The dialer's side of the challenge.
fn connect(addr: &str, secret: &Secret) -> anyhow::Result<TcpStream> {
    let sock = addr
        .parse::<std::net::SocketAddr>()
        .map_err(anyhow::Error::from)
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)))
        .unwrap_or_else(|_| TcpStream::connect(addr))?;
    let mut s = sock;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let h = hello();
    let nonce: [u8; 32] = rand::random();
    s.write_all(&[&h[..], &nonce[..]].concat())?;
    let mut answer = [0u8; 64];
    s.read_exact(&mut answer).context("the peer closed the connection (it serves no files to this cluster)")?;
    let (listener, dialer) = macs(secret, &h, &nonce, &answer[..32]);
    if !ct_eq(&listener, &answer[32..]) {
        bail!("the peer at {addr} does not hold this cluster's fetch secret");
    }
    s.write_all(&dialer)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).context("the peer refused the fetch after the challenge")?;
    Ok(s)
}

/// Sends a `GET` of `path` from `offset` (of a file of `want` bytes; 0: unknown, only a
/// complete file will do); the file's length when the peer has it.
fn request(s: &mut TcpStream, path: &str, offset: u64, want: u64) -> anyhow::Result<Option<u64>> {
    let path_bytes = path.as_bytes();
    if path_bytes.len() > MAX_PATH {
        bail!("{path}: longer than {MAX_PATH} bytes");
    }
    let mut req = vec![OP_GET];
    req.extend_from_slice(&(path_bytes.len() as u16).to_le_bytes());
    req.extend_from_slice(path_bytes);
    req.extend_from_slice(&offset.to_le_bytes());
    req.extend_from_slice(&want.to_le_bytes());
    s.write_all(&req)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status)?;
    if status[0] != FOUND {
        return Ok(None);
    }
    let mut total = [0u8; 8];
    s.read_exact(&mut total)?;
    Ok(Some(u64::from_le_bytes(total)))
}

/// A host that may serve a file, and the path it serves it as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub addr: String,
    pub path: String,
}

impl Source {
    pub fn new(addr: impl Into<String>, path: impl Into<String>) -> Source {
        Source { addr: addr.into(), path: path.into() }
    }
}

/// What a fetch should produce: a file of this size and SHA-256.
#[derive(Clone, Debug)]
pub struct Want<'a> {
    pub sha256: &'a str,
    pub bytes: u64,
}

/// Fetches files that peers serve, verified on arrival.
#[derive(Clone)]
pub struct Fetcher {
    secret: Secret,
    /// Content bytes received, over every fetch of this fetcher.
    pub received: Arc<AtomicU64>,
}

/// Where a partial download of `dest` is kept.
fn part_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// The SHA-256 state of a file's first bytes, and how many there are.
fn hash_prefix(path: &Path) -> anyhow::Result<(Sha256, u64)> {
    let mut h = Sha256::new();
    let n = match std::fs::File::open(path) {
        Ok(mut f) => std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    Ok((h, n))
}

impl Fetcher {
    pub fn new(secret: Secret) -> Fetcher {
        Fetcher { secret, received: Arc::default() }
    }

    /// Makes `dest` the file `want` describes, fetched from the first of `sources` (each a
    /// host:port and the path it serves the file as) that serves it whole; a file already at
    /// `dest` with that content is kept. Stops with an error when `cancel` is set.
    pub fn fetch(&self, sources: &[Source], want: &Want<'_>, dest: &Path, cancel: &AtomicBool) -> anyhow::Result<()> {
        if let Ok(m) = std::fs::metadata(dest)
            && m.len() == want.bytes
            && hex::encode(hash_prefix(dest)?.0.finalize()) == want.sha256
        {
            return Ok(());
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let part = part_path(dest);
        let mut errors = Vec::new();
        let name = dest.display();
        for Source { addr: source, path } in sources {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled while fetching {name}");
            }
            match self.fetch_from(source, path, want, &part, cancel) {
                Ok(()) => {
                    std::fs::rename(&part, dest)
                        .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(%source, path, "fetch failed: {e:#}");
                    errors.push(format!("{source}: {e:#}"));
                }
            }
        }
        if sources.is_empty() {
            bail!("no host to fetch {name} from");
        }
        bail!("no host served {name} ({} bytes, sha256 {}): {}", want.bytes, want.sha256, errors.join("; "))
    }

    /// A small file (at most `max` bytes) as `path` from `addr`, unverified (a listing whose
    /// entries are then fetched by hash); `None` when the peer does not have it (yet).
    pub fn get_small(&self, addr: &str, path: &str, max: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let mut s = connect(addr, &self.secret)?;
        let total = match request(&mut s, path, 0, 0)? {
            None => return Ok(None),
            Some(t) => t,
        };
        if total > max {
            bail!("{path} on {addr} has {total} bytes, more than the {max} expected");
        }
        let mut out = vec![0u8; total as usize];
        s.read_exact(&mut out)?;
        Ok(Some(out))
    }

    /// One source: continues `part` from its end, then checks the whole file's hash.
    fn fetch_from(
        &self,
        source: &str,
        path: &str,
        want: &Want<'_>,
        part: &Path,
        cancel: &AtomicBool,
    ) -> anyhow::Result<()> {
        let (mut hash, mut have) = hash_prefix(part)?;
        if have > want.bytes {
            std::fs::remove_file(part)?;
            (hash, have) = (Sha256::new(), 0);
        }
        let mut s = connect(source, &self.secret)?;
        let Some(total) = request(&mut s, path, have, want.bytes)? else { bail!("not there") };
        if total != want.bytes {
            bail!("it has {total} bytes, not the {} asked for", want.bytes);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .with_context(|| format!("opening {}", part.display()))?;
        let mut out = BufWriter::with_capacity(CHUNK, file);
        let mut buf = vec![0u8; CHUNK];
        let mut left = total - have;
        while left > 0 {
            if cancel.load(Ordering::Relaxed) {
                out.flush()?;
                bail!("cancelled");
            }
            let n = s.read(&mut buf[..CHUNK.min(left as usize)])?;
            if n == 0 {
                out.flush()?;
                bail!("the connection closed with {left} bytes to go");
            }
            out.write_all(&buf[..n])?;
            hash.update(&buf[..n]);
            self.received.fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        let got = hex::encode(hash.finalize());
        if got != want.sha256 {
            std::fs::remove_file(part)?;
            bail!("it arrived with sha256 {got}, not {}: discarded", want.sha256);
        }
        Ok(())
    }
}

/// Logs a long transfer's progress every few seconds while `work` runs.
pub fn with_progress<T>(what: &str, total: u64, counter: &AtomicU64, work: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    let start = counter.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    let got = counter.load(Ordering::Relaxed) - start;
                    let mb_s = got as f64 / t0.elapsed().as_secs_f64() / 1e6;
                    tracing::info!("{what}: {} of {} MB ({mb_s:.0} MB/s)", got / 1_000_000, total / 1_000_000);
                }
            }
        });
        let out = work();
        done.store(true, Ordering::Relaxed);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::dataplane::DataPlane;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn serving(root: &Path, secret: Secret) -> (DataPlane, Arc<FileServer>) {
        let dp = DataPlane::bind("127.0.0.1:0").unwrap();
        let server = Arc::new(FileServer::new(secret, state_dir_resolver(root.to_path_buf())));
        dp.serve_files(server.clone());
        (dp, server)
    }

    #[test]
    fn files_arrive_verified_and_a_cut_transfer_continues() {
        let root = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::create_dir_all(root.path().join("content/b1")).unwrap();
        std::fs::write(root.path().join("content/b1/tokens.bin"), &data).unwrap();
        let (dp, server) = serving(root.path(), Secret([9; 32]));
        let addr = dp.local_addr().to_string();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("tokens.bin");
        // A third of the file is already here from a cut transfer.
        std::fs::write(part_path(&dest), &data[..1_000_000]).unwrap();
        let want = Want { sha256: &sha(&data), bytes: data.len() as u64 };
        let f = Fetcher::new(Secret([9; 32]));
        let no = AtomicBool::new(false);
        // The first source is down, the second has it.
        let p = "content/b1/tokens.bin";
        let sources = vec![Source::new("127.0.0.1:1", p), Source::new(addr.clone(), p)];
        f.fetch(&sources, &want, &dest, &no).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert_eq!(server.bytes_sent(), 2_000_000, "only the missing bytes cross the network");
        assert!(!part_path(&dest).exists());
        // Already there: nothing is sent again.
        f.fetch(&sources, &want, &dest, &no).unwrap();
        assert_eq!(server.bytes_sent(), 2_000_000);
    }

    /// A host still fetching a file serves it as it grows: the next host in the chain gets
    /// every byte (verified) without waiting for the first to finish.
    #[test]
    fn a_file_being_fetched_is_relayed_as_it_arrives() {
        let root = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let dir = root.path().join("content/b2");
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("tokens.bin");
        std::fs::write(part_path(&dest), &data[..1_500_000]).unwrap();
        let (dp, server) = serving(root.path(), Secret([9; 32]));
        let rest = data[1_500_000..].to_vec();
        let (part, fin) = (part_path(&dest), dest.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut f = std::fs::OpenOptions::new().append(true).open(&part).unwrap();
            for c in rest.chunks(500_000) {
                f.write_all(c).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            std::fs::rename(&part, &fin).unwrap();
        });
        let out = tempfile::tempdir().unwrap();
        let f = Fetcher::new(Secret([9; 32]));
        let want = Want { sha256: &sha(&data), bytes: data.len() as u64 };
        let from = [Source::new(dp.local_addr().to_string(), "content/b2/tokens.bin")];
        f.fetch(&from, &want, &out.path().join("tokens.bin"), &AtomicBool::new(false)).unwrap();
        writer.join().unwrap();
        assert_eq!(std::fs::read(out.path().join("tokens.bin")).unwrap(), data);
        assert_eq!(server.bytes_sent(), data.len() as u64);
    }

    #[test]
    fn wrong_content_wrong_secret_and_paths_outside_are_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("content/b1")).unwrap();
        std::fs::write(root.path().join("content/b1/a.bin"), b"hello").unwrap();
        std::fs::write(root.path().join("secret.key"), b"private").unwrap();
        let (dp, _server) = serving(root.path(), Secret([9; 32]));
        let addr = dp.local_addr().to_string();
        let at = |p: &str| vec![Source::new(addr.clone(), p)];
        let out = tempfile::tempdir().unwrap();
        let no = AtomicBool::new(false);
        let f = Fetcher::new(Secret([9; 32]));
        // Bytes that are not the ones asked for are discarded.
        let liar = Want { sha256: &sha(b"hellp"), bytes: 5 };
        let e = f.fetch(&at("content/b1/a.bin"), &liar, &out.path().join("a.bin"), &no).unwrap_err();
        assert!(format!("{e:#}").contains("arrived with sha256"), "{e:#}");
        assert!(!out.path().join("a.bin").exists() && !part_path(&out.path().join("a.bin")).exists());
        // Nothing outside content/ and checkpoints/, nothing with `..`.
        let key = Want { sha256: &sha(b"private"), bytes: 7 };
        for p in ["secret.key", "content/../secret.key", "/etc/passwd", "content/b1/.a.bin.part"] {
            let e = f.fetch(&at(p), &key, &out.path().join("k"), &no).unwrap_err();
            assert!(format!("{e:#}").contains("not there"), "{p}: {e:#}");
        }
        // Without the cluster's secret, nothing at all.
        let stranger = Fetcher::new(Secret([1; 32]));
        let ok = Want { sha256: &sha(b"hello"), bytes: 5 };
        let e = stranger.fetch(&at("content/b1/a.bin"), &ok, &out.path().join("a.bin"), &no).unwrap_err();
        assert!(format!("{e:#}").contains("does not hold this cluster's fetch secret"), "{e:#}");
        f.fetch(&at("content/b1/a.bin"), &ok, &out.path().join("a.bin"), &no).unwrap();
        assert_eq!(f.get_small(&addr, "content/b1/a.bin", 5).unwrap().unwrap(), b"hello");
        assert!(f.get_small(&addr, "content/b1/a.bin", 4).is_err());
        assert!(f.get_small(&addr, "content/b1/none", 4).unwrap().is_none());
    }
}
