//! The trust half of the wire contract: who may talk to whom.
//!
//! - The coordinator's TLS certificate is issued by the cluster's own CA; a [`Token`] carries the
//!   sha256 of that CA's certificate (a [`Pin`], as kubeadm's `--discovery-token-ca-cert-hash`),
//!   so a client verifies the coordinator with nothing but the token ([`PinnedCa`]).
//! - Every RPC carries a bearer secret in `authorization` metadata ([`Bearer`]): the join secret
//!   to register, the worker's own credential (issued at registration, bound to its id) for
//!   everything a worker does, the admin secret for what clients do.
//! - [`mac`] (HMAC-SHA256 over length-prefixed parts) is what the data plane's mutual challenge
//!   and the per-job secrets are made of; [`ct_eq`] compares secrets in constant time.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The DNS name in the coordinator's certificate. Clients verify this name, not an address, so
/// the coordinator's LAN address may change without new certificates.
pub const SERVER_NAME: &str = "swarm-coordinator";
/// The largest token accepted (bytes of its text).
pub const MAX_TOKEN_BYTES: usize = 2048;
/// Addresses one token may list.
pub const MAX_TOKEN_ADDRS: usize = 16;
/// How long one address may take to answer a connection attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const TOKEN_VERSION: u8 = 1;
const JOIN_PREFIX: &str = "swarm-join-";
const ADMIN_PREFIX: &str = "swarm-admin-";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "not a swarm token: {0}; `swarm token` on the coordinator's machine prints the admin token, `swarm up` the join command"
    )]
    BadToken(String),
    #[error("a {found} token was given where the {wanted} token is needed; {fix}")]
    WrongToken { found: &'static str, wanted: &'static str, fix: &'static str },
    #[error("no coordinator answers: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Tls(String),
}

/// 32 random bytes. Its `Debug` shows nothing of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl Secret {
    pub fn random() -> Secret {
        Secret(rand::random())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Secret> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Secret(out))
    }

    /// Constant-time comparison.
    pub fn matches(&self, other: &Secret) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The sha256 of the cluster CA's certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    pub fn of(cert_der: &[u8]) -> Pin {
        Pin(Sha256::digest(cert_der).into())
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", Secret(self.0).to_hex())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TokenKind {
    /// Lets a worker register (`swarm worker --join TOKEN`).
    Join,
    /// Lets a client submit, follow, cancel and list jobs (`swarm token` prints it).
    Admin,
}

impl TokenKind {
    fn name(self) -> &'static str {
        match self {
            TokenKind::Join => "join",
            TokenKind::Admin => "admin",
        }
    }
}

/// Where the coordinator is, how to recognise it, and the secret that proves the holder was
/// invited. Text form: `swarm-join-…` or `swarm-admin-…`, then base64url of a version byte,
/// the pin, the secret and the comma-separated `host:port` addresses.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Token {
    pub kind: TokenKind,
    pub addrs: Vec<String>,
    pub pin: Pin,
    pub secret: Secret,
}

impl Token {
    pub fn encode(&self) -> String {
        let mut bytes = vec![TOKEN_VERSION];
        bytes.extend_from_slice(&self.pin.0);
        bytes.extend_from_slice(&self.secret.0);
        bytes.extend_from_slice(self.addrs.join(",").as_bytes());
        let prefix = match self.kind {
            TokenKind::Join => JOIN_PREFIX,
            TokenKind::Admin => ADMIN_PREFIX,
        };
        format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<Token, TrustError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TrustError::BadToken(format!("{} bytes long (at most {MAX_TOKEN_BYTES})", text.len())));
        }
        let (kind, body) = if let Some(b) = text.strip_prefix(JOIN_PREFIX) {
            (TokenKind::Join, b)
        } else if let Some(b) = text.strip_prefix(ADMIN_PREFIX) {
            (TokenKind::Admin, b)
        } else {
            return Err(TrustError::BadToken(format!("it does not start with {JOIN_PREFIX} or {ADMIN_PREFIX}")));
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TrustError::BadToken(format!("its body is not base64url ({e})")))?;
        if bytes.len() < 65 || bytes[0] != TOKEN_VERSION {
            return Err(TrustError::BadToken("it is truncated, or of another version of swarm".into()));
        }
        let pin = Pin(bytes[1..33].try_into().expect("32 bytes"));
        let secret = Secret(bytes[33..65].try_into().expect("32 bytes"));
        let addrs = std::str::from_utf8(&bytes[65..])
            .map_err(|_| TrustError::BadToken("its addresses are not UTF-8".into()))?;
        let addrs: Vec<String> = addrs.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect();
        if addrs.len() > MAX_TOKEN_ADDRS {
            return Err(TrustError::BadToken(format!("{} addresses (at most {MAX_TOKEN_ADDRS})", addrs.len())));
        }
        Ok(Token { kind, addrs, pin, secret })
    }

    /// Decodes and checks the kind: a join token where an admin token is needed is refused
    /// with what to use instead.
    pub fn decode_kind(text: &str, wanted: TokenKind) -> Result<Token, TrustError> {
        let t = Token::decode(text)?;
        if t.kind != wanted {
            let fix = match wanted {
                TokenKind::Admin => "`swarm token` on the coordinator's machine prints the admin token",
                TokenKind::Join => "use the join command `swarm up` printed",
            };
            return Err(TrustError::WrongToken { found: t.kind.name(), wanted: wanted.name(), fix });
        }
        Ok(t)
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC-SHA256 keyed by `key` over `parts`, each prefixed by its length (so no two lists of
/// parts give the same input).
pub fn mac(key: &Secret, parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The `authorization` metadata every RPC carries: `Bearer <64 hex digits>`.
pub fn bearer_value(secret: &Secret) -> MetadataValue<Ascii> {
    format!("Bearer {}", secret.to_hex()).parse().expect("hex is ASCII")
}

/// The secret a request presents, if it presents one in the expected form.
pub fn bearer_of(meta: &tonic::metadata::MetadataMap) -> Option<Secret> {
    let v = meta.get("authorization")?.to_str().ok()?;
    Secret::from_hex(v.strip_prefix("Bearer ")?)
}

/// Adds the bearer secret to every request of a client.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(secret: &Secret) -> Bearer {
        Bearer(bearer_value(secret))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A coordinator client whose requests carry a bearer secret.
pub type Client = crate::v1::coordinator_client::CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// A client over `channel` presenting `secret`, with the wire contract's message limits.
pub fn client(channel: Channel, secret: &Secret) -> Client {
    crate::v1::coordinator_client::CoordinatorClient::with_interceptor(channel, Bearer::new(secret))
        .max_decoding_message_size(crate::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::limits::MAX_MESSAGE_BYTES)
}

/// Opens a TLS channel to the first of `addrs` that answers and proves it holds a certificate
/// issued by the pinned CA; returns it with the address. The error lists what each address said.
pub async fn connect_channel(addrs: &[String], pin: Pin) -> Result<(Channel, String), TrustError> {
    if addrs.is_empty() {
        return Err(TrustError::Unreachable("the token lists no address; pass --coordinator HOST:PORT".into()));
    }
    let mut tried = Vec::new();
    for addr in addrs {
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| TrustError::Unreachable(format!("{addr} is not a host:port ({e})")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_config_with_verifier(ClientTlsConfig::new().domain_name(SERVER_NAME), Arc::new(PinnedCa::new(pin)))
            .map_err(|e| TrustError::Tls(format!("TLS settings for {addr}: {e}")))?;
        match endpoint.connect().await {
            Ok(ch) => return Ok((ch, addr.clone())),
            Err(e) => tried.push(format!("{addr}: {}", error_chain(&e))),
        }
    }
    Err(TrustError::Unreachable(tried.join("; ")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Verifies a coordinator's certificate against the CA whose certificate hashes to the pin.
/// The server sends its leaf and the CA; the CA must be the pinned one, and the leaf must be
/// issued by it for [`SERVER_NAME`] (rustls's WebPKI verifier does that part).
#[derive(Debug)]
pub struct PinnedCa {
    pin: Pin,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCa {
    pub fn new(pin: Pin) -> PinnedCa {
        PinnedCa { pin, provider: Arc::new(rustls::crypto::ring::default_provider()) }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| Pin::of(c) == self.pin).ok_or_else(|| {
            rustls::Error::General(format!(
                "the server's certificate is not from the cluster's CA ({}): a different coordinator, or a token of another cluster",
                self.pin
            ))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the cluster CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("building the verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let t = Token {
            kind: TokenKind::Join,
            addrs: vec!["10.0.0.5:7450".into(), "[fe80::1]:7450".into()],
            pin: Pin([7; 32]),
            secret: Secret([9; 32]),
        };
        let text = t.encode();
        assert!(text.starts_with("swarm-join-"), "{text}");
        assert_eq!(Token::decode(&text).unwrap(), t);
        assert!(Token::decode_kind(&text, TokenKind::Admin).unwrap_err().to_string().contains("swarm token"));
        let admin = Token { kind: TokenKind::Admin, ..t.clone() }.encode();
        assert_eq!(Token::decode_kind(&admin, TokenKind::Admin).unwrap().secret, Secret([9; 32]));
        for bad in ["", "swarm-join-", "swarm-join-!!!", "hello", &text[..40], &"a".repeat(5000)] {
            assert!(Token::decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn secrets_compare_and_print_safely() {
        let s = Secret::random();
        assert_eq!(Secret::from_hex(&s.to_hex()), Some(s));
        assert!(s.matches(&s) && !s.matches(&Secret::random()));
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(Secret::from_hex("zz"), None);
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert("authorization", bearer_value(&s));
        assert_eq!(bearer_of(&meta), Some(s));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn mac_separates_its_parts() {
        let k = Secret([1; 32]);
        assert_ne!(mac(&k, &[b"ab", b"c"]), mac(&k, &[b"a", b"bc"]));
        assert_ne!(mac(&k, &[b"abc"]), mac(&Secret([2; 32]), &[b"abc"]));
        assert_eq!(mac(&k, &[b"abc"]), mac(&k, &[b"abc"]));
    }
}
