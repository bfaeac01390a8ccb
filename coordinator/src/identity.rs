//! The cluster's identity, made by the first `swarm up` and kept in `<data-dir>/identity/`
//! (directory 0700, files 0600):
//! - `ca.pem`: the cluster CA's certificate. Its sha256 is the pin every token carries. The CA's
//!   key signs the server certificate once and is then discarded, so nothing on disk can issue
//!   another certificate the pin would accept;
//! - `server.pem` (the server certificate, then the CA) and `server.key`: what the coordinator
//!   presents, for the name [`SERVER_NAME`] (so addresses may change freely);
//! - `join.secret`, `admin.secret`: the secrets of the join and admin tokens;
//! - `cluster.secret`: keys the per-job data-plane secrets ([`Secrets::job_secret`]);
//! - `join.token`, `admin.token`: the tokens, rewritten at each start with the addresses the
//!   coordinator listens on (`swarm token` prints them; clients on this machine read them).

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use swarm_proto::trust::{Pin, SERVER_NAME, Secret, Token, TokenKind, mac};
use swarm_sharding::JobId;

/// The secrets the service checks requests against.
#[derive(Clone, Copy, Debug)]
pub struct Secrets {
    pub join: Secret,
    pub admin: Secret,
    pub cluster: Secret,
}

impl Secrets {
    /// The data-plane secret of one attempt of a job: the same for every rank, different for
    /// every job and attempt, and only derivable with the cluster secret.
    pub fn job_secret(&self, job: JobId, attempt: u64) -> Secret {
        Secret(mac(&self.cluster, &[b"swarm job data-plane secret", &job.0.to_le_bytes(), &attempt.to_le_bytes()]))
    }

    /// The secret that lets members fetch files from each other's data planes: every worker
    /// (given at registration) and admin clients (`ContentAccess`).
    pub fn fetch_secret(&self) -> Secret {
        Secret(mac(&self.cluster, &[b"swarm cluster fetch secret"]))
    }
}

#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    pub dir: PathBuf,
    pub ca_der: Vec<u8>,
    /// The server certificate followed by the CA's, PEM.
    pub server_chain_pem: String,
    pub server_key_pem: String,
    pub secrets: Secrets,
}

impl ClusterIdentity {
    pub const DIR: &'static str = "identity";
    pub const ADMIN_TOKEN: &'static str = "admin.token";
    pub const JOIN_TOKEN: &'static str = "join.token";

    /// Loads the identity under `data_dir`, creating it on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<ClusterIdentity> {
        let dir = data_dir.join(Self::DIR);
        if !dir.join("server.key").is_file() {
            create(&dir).with_context(|| format!("creating the cluster identity in {}", dir.display()))?;
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let secret = |name: &str| -> anyhow::Result<Secret> {
            Secret::from_hex(&read(name)?).with_context(|| {
                format!("{} is not 64 hex digits; delete {} to make a new identity", name, dir.display())
            })
        };
        let ca_pem = read("ca.pem")?;
        let ca_der =
            pem_body(&ca_pem).with_context(|| format!("{} holds no certificate", dir.join("ca.pem").display()))?;
        Ok(ClusterIdentity {
            server_chain_pem: read("server.pem")?,
            server_key_pem: read("server.key")?,
            secrets: Secrets {
                join: secret("join.secret")?,
                admin: secret("admin.secret")?,
                cluster: secret("cluster.secret")?,
            },
            ca_der,
            dir,
        })
    }

    pub fn pin(&self) -> Pin {
        Pin::of(&self.ca_der)
    }

    pub fn token(&self, kind: TokenKind, addrs: &[String]) -> Token {
        let secret = match kind {
            TokenKind::Join => self.secrets.join,
            TokenKind::Admin => self.secrets.admin,
        };
        Token { kind, addrs: addrs.to_vec(), pin: self.pin(), secret }
    }

    /// Writes `join.token` and `admin.token` for these addresses; returns both tokens' text.
    pub fn write_tokens(&self, addrs: &[String]) -> anyhow::Result<(String, String)> {
        let join = self.token(TokenKind::Join, addrs).encode();
        let admin = self.token(TokenKind::Admin, addrs).encode();
        write_private(&self.dir.join(Self::JOIN_TOKEN), join.as_bytes())?;
        write_private(&self.dir.join(Self::ADMIN_TOKEN), admin.as_bytes())?;
        Ok((join, admin))
    }
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, "swarm cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    for (name, secret) in
        [("join.secret", Secret::random()), ("admin.secret", Secret::random()), ("cluster.secret", Secret::random())]
    {
        write_private(&dir.join(name), secret.to_hex().as_bytes())?;
    }
    write_private(&dir.join("ca.pem"), ca.pem().as_bytes())?;
    write_private(&dir.join("server.pem"), format!("{}{}", cert.pem(), ca.pem()).as_bytes())?;
    // Last: its presence marks a complete identity.
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    Ok(())
}

/// The DER bytes of the first PEM block in `pem`.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let body: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Writes a file only its owner can read (temporary name, then rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Reads a token file written by [`ClusterIdentity::write_tokens`].
pub fn read_token(path: &Path, kind: TokenKind) -> anyhow::Result<Token> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match Token::decode_kind(&text, kind) {
        Ok(t) => Ok(t),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = ClusterIdentity::load_or_create(dir.path()).unwrap();
        let b = ClusterIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.ca_der, b.ca_der);
        assert!(a.secrets.admin.matches(&b.secrets.admin) && !a.secrets.admin.matches(&a.secrets.join));
        assert!(!dir.path().join("identity/ca.key").exists(), "the CA key is not kept");
        let (join, _) = a.write_tokens(&["10.1.2.3:7450".into()]).unwrap();
        let t = read_token(&dir.path().join("identity/join.token"), TokenKind::Join).unwrap();
        assert_eq!((t.encode(), t.pin), (join, a.pin()));
        assert!(read_token(&dir.path().join("identity/join.token"), TokenKind::Admin).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("identity/server.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let s = a.secrets;
        assert_ne!(s.job_secret(JobId(1), 1), s.job_secret(JobId(1), 2));
        assert_ne!(s.job_secret(JobId(1), 1), s.job_secret(JobId(2), 1));
    }
}
