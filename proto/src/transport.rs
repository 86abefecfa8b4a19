//! How nodes, mounts and admin commands reach each other: plain TCP on a
//! trusted network, or TLS with the cluster's certificates (mutual: every
//! connection presents a certificate signed by the cluster's CA), plus the
//! admin token that destructive admin calls carry.
//!
//! A directory of credentials (`musicfs certs init` writes one per node and
//! one for clients) holds `ca.pem`, `cert.pem` and `key.pem`. Every node
//! certificate names [`NODE_NAME`], whatever its host: callers check that
//! they talk to a node of this cluster, not to a particular host, so
//! addresses can change without new certificates. Client certificates do
//! not carry that name, which is how a node tells a node from a client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::MetadataValue;

use crate::auth::{AuthError, ClusterSecret, AUTH_HEADER};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The DNS name in every node certificate.
pub const NODE_NAME: &str = "musicfs-node";
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// Shortest admin token accepted: guessing it must be out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    BadFile { path: PathBuf, why: String },
    #[error("bad address {addr}: {why}")]
    BadAddress { addr: String, why: String },
}

struct Tls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The credentials a process uses on every connection it makes or accepts.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<Arc<Tls>>,
    token: Option<Arc<str>>,
    /// Nodes only: the cluster secret, and the node id its signatures name.
    secret: Option<(Arc<ClusterSecret>, u64)>,
}

impl std::fmt::Debug for Transport {
    // Never prints the key or the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("secret", &self.secret.is_some())
            .finish()
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, TransportError> {
    std::fs::read(&path).map_err(|source| TransportError::Read { path, source })
}

/// Checks that a PEM file holds what it should, so a wrong file is named
/// when the process starts rather than at the first handshake.
fn expect_pem(path: &Path, bytes: &[u8], label: &str) -> Result<(), TransportError> {
    let text = String::from_utf8_lossy(bytes);
    if text.contains(&format!("-----BEGIN {label}")) {
        Ok(())
    } else {
        Err(TransportError::BadFile {
            path: path.to_path_buf(),
            why: format!("holds no PEM {label}"),
        })
    }
}

impl Transport {
    /// Plain TCP, no token.
    pub fn plain() -> Self {
        Self::default()
    }

    /// TLS with the credentials in `dir` (`ca.pem`, `cert.pem`, `key.pem`).
    pub fn tls_from_dir(dir: &Path) -> Result<Self, TransportError> {
        let ca = read(dir.join(CA_FILE))?;
        expect_pem(&dir.join(CA_FILE), &ca, "CERTIFICATE")?;
        let cert = read(dir.join(CERT_FILE))?;
        expect_pem(&dir.join(CERT_FILE), &cert, "CERTIFICATE")?;
        let key = read(dir.join(KEY_FILE))?;
        expect_pem(&dir.join(KEY_FILE), &key, "PRIVATE KEY")?;
        Ok(Transport {
            tls: Some(Arc::new(Tls { ca, cert, key })),
            token: None,
            secret: None,
        })
    }

    /// TLS from `tls_dir` (plain without one) and the admin token from
    /// `token_file` (none without one): how nodes and the CLI read their
    /// settings.
    pub fn from_files(
        tls_dir: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Self, TransportError> {
        let t = match tls_dir {
            Some(d) => Self::tls_from_dir(d)?,
            None => Self::plain(),
        };
        match token_file {
            Some(f) => t.with_token_file(f),
            None => Ok(t),
        }
    }

    /// The same credentials plus the admin token read from `path` (one
    /// line; surrounding white space ignored).
    pub fn with_token_file(self, path: &Path) -> Result<Self, TransportError> {
        let raw = read(path.to_path_buf())?;
        let token = String::from_utf8(raw).map_err(|_| TransportError::BadFile {
            path: path.to_path_buf(),
            why: "the token is not UTF-8".into(),
        })?;
        self.with_token(token.trim())
            .map_err(|why| TransportError::BadFile {
                path: path.to_path_buf(),
                why,
            })
    }

    pub fn with_token(mut self, token: &str) -> Result<Self, String> {
        check_token(token)?;
        self.token = Some(token.into());
        Ok(self)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The same credentials plus the cluster secret, with which node
    /// `node_id` signs the calls only nodes make.
    pub fn with_secret(mut self, secret: ClusterSecret, node_id: u64) -> Self {
        self.secret = Some((Arc::new(secret), node_id));
        self
    }

    /// The cluster secret, on a node that has one.
    pub fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref().map(|(s, _)| &**s)
    }

    /// This node's receipt for holding chunk `id` of `size` bytes now.
    pub fn receipt(&self, id: &[u8], size: u64) -> Option<crate::meta::Receipt> {
        let (s, node) = self.secret.as_ref()?;
        let at_ms = crate::auth::now_ms();
        Some(crate::meta::Receipt {
            node: *node,
            at_ms,
            mac: bytes::Bytes::copy_from_slice(&s.receipt(*node, id, size, at_ms)),
        })
    }

    /// Signs a call only nodes may make (a no-op without the secret: over
    /// TLS the node certificate speaks for the caller).
    pub fn sign<M: prost::Message>(&self, method: &str, req: &mut tonic::Request<M>) {
        if let Some((s, node)) = &self.secret {
            let body = req.get_ref().encode_to_vec();
            let (h, _) = s.sign_at(method, *node, crate::auth::now_ms(), &body);
            if let Ok(v) = MetadataValue::try_from(h) {
                req.metadata_mut().insert(AUTH_HEADER, v);
            }
        }
    }

    /// Signs the opening of a stream; the MAC its pieces chain from.
    pub fn sign_stream<T>(&self, method: &str, req: &mut tonic::Request<T>) -> Option<[u8; 32]> {
        let (s, node) = self.secret.as_ref()?;
        let (h, mac) = s.sign_at(method, *node, crate::auth::now_ms(), b"");
        let v = MetadataValue::try_from(h).ok()?;
        req.metadata_mut().insert(AUTH_HEADER, v);
        Some(mac)
    }

    /// The access check of a call only nodes make: a node certificate over
    /// TLS, else a valid signature with the cluster secret. The node that
    /// signed, when the call was signed.
    pub fn check_node_call<M: prost::Message>(
        &self,
        req: &tonic::Request<M>,
        method: &str,
    ) -> Result<Option<u64>, tonic::Status> {
        // The body is encoded only for a call that carries a signature: a
        // client's call is refused, or let through, without that cost.
        self.check_signed(req, method, || req.get_ref().encode_to_vec())
            .map(|s| s.map(|s| s.node))
    }

    /// The same for the opening of a stream: the MAC its first piece
    /// chains from, when it was signed (None: a node certificate vouches).
    pub fn check_node_stream<T>(
        &self,
        req: &tonic::Request<T>,
        method: &str,
    ) -> Result<Option<[u8; 32]>, tonic::Status> {
        self.check_signed(req, method, Vec::new)
            .map(|s| s.map(|s| s.mac))
    }

    fn check_signed<T>(
        &self,
        req: &tonic::Request<T>,
        method: &str,
        body: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<crate::auth::Signed>, tonic::Status> {
        match peer_of(req) {
            Peer::Node => return Ok(None),
            Peer::Client => {
                return Err(tonic::Status::permission_denied(
                    "only cluster nodes may make this call (the certificate is a client's)",
                ))
            }
            Peer::Unknown => {}
        }
        let Some((s, _)) = &self.secret else {
            return Err(tonic::Status::permission_denied(
                "only cluster nodes may make this call, and this node has no cluster secret to check it",
            ));
        };
        let header = req
            .metadata()
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok());
        let body = if header.is_some() { body() } else { Vec::new() };
        s.verify_at(method, header, &body, crate::auth::now_ms())
            .map(Some)
            .map_err(|e| match e {
                AuthError::Unsigned => tonic::Status::unauthenticated(format!(
                    "only cluster nodes may make this call ({method}): {e}"
                )),
                e => tonic::Status::permission_denied(format!("{method}: {e}")),
            })
    }

    /// Whether `req` comes from a node: a node certificate, or a valid
    /// signature of `method` over its body.
    pub fn is_node_call<M: prost::Message>(&self, req: &tonic::Request<M>, method: &str) -> bool {
        self.check_node_call(req, method).is_ok()
    }

    /// Whether the certificate this process presents is a node's (a node
    /// started with a client's credentials is refused at start).
    pub fn holds_node_certificate(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| {
            x509_parser::pem::parse_x509_pem(&t.cert)
                .is_ok_and(|(_, pem)| is_node_certificate(&pem.contents))
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// An endpoint for `addr` (`host:port`), over TLS when configured.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, TransportError> {
        let bad = |why: String| TransportError::BadAddress {
            addr: addr.to_string(),
            why,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let ep =
            Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(e.to_string()))?;
        match &self.tls {
            None => Ok(ep),
            Some(t) => ep
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&t.ca))
                        .identity(Identity::from_pem(&t.cert, &t.key))
                        .domain_name(NODE_NAME),
                )
                .map_err(|e| bad(e.to_string())),
        }
    }

    /// The server side: this node's certificate, and a client certificate
    /// signed by the cluster's CA required of every connection.
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        self.tls.as_ref().map(|t| {
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&t.cert, &t.key))
                .client_ca_root(Certificate::from_pem(&t.ca))
        })
    }

    /// Puts the admin token (if any) on a request.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) {
        if let Some(t) = &self.token {
            if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
                req.metadata_mut().insert(AUTHORIZATION, v);
            }
        }
    }

    /// A request carrying `msg` and the admin token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        self.authorize(&mut r);
        r
    }
}

const AUTHORIZATION: &str = "authorization";

pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the admin token is {} characters; at least {MIN_TOKEN_LEN} are needed",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the admin token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Who is calling, as far as the connection tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Plain TCP: nothing is known.
    Unknown,
    /// A TLS client certificate of the cluster's CA without the node name.
    Client,
    /// A node certificate of the cluster's CA.
    Node,
}

/// Classifies the caller of `req` by its TLS client certificate (already
/// verified against the cluster's CA during the handshake).
pub fn peer_of<T>(req: &tonic::Request<T>) -> Peer {
    match req.peer_certs() {
        None => Peer::Unknown,
        Some(certs) => match certs.first() {
            Some(c) if is_node_certificate(c) => Peer::Node,
            _ => Peer::Client,
        },
    }
}

/// Whether a DER certificate names [`NODE_NAME`] among its DNS names.
pub fn is_node_certificate(der: &[u8]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName(d) if *d == NODE_NAME))
}

/// The access check of a destructive admin call on a node whose admin token
/// is `required` (None: no token configured, every caller may act). Nodes
/// pass with their certificate (they forward admin calls to each other);
/// everyone else needs the token.
pub fn check_admin<T>(
    req: &tonic::Request<T>,
    required: Option<&str>,
) -> Result<(), tonic::Status> {
    let Some(required) = required else {
        return Ok(());
    };
    if peer_of(req) == Peer::Node {
        return Ok(());
    }
    let given = req
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(tonic::Status::unauthenticated(
            "this command needs the cluster's admin token (--token-file or MUSICFS_ADMIN_TOKEN_FILE)",
        )),
        Some(t) if constant_time_eq(t.as_bytes(), required.as_bytes()) => Ok(()),
        Some(_) => Err(tonic::Status::permission_denied(
            "the admin token does not match this cluster's",
        )),
    }
}

/// Refuses a client certificate early, before the body is read, on
/// services only nodes call (the handlers check the caller fully).
pub fn deny_client_certificates<T>(req: &tonic::Request<T>) -> Result<(), tonic::Status> {
    match peer_of(req) {
        Peer::Client => Err(tonic::Status::permission_denied(
            "only cluster nodes may make this call (the certificate is a client's)",
        )),
        Peer::Node | Peer::Unknown => Ok(()),
    }
}

/// A certificate serial as nodes compare them: lowercase hex without
/// separators or leading zeros (`0A:1b` and `a1b` are one serial).
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let t = hex.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.into()
    }
}

/// The serial number of a DER certificate, normalized.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(normalize_serial(&cert.raw_serial_as_string()))
}

/// Serial numbers of certificates a node no longer accepts (its
/// `revoked_certs_file`), replaced whole when the file changes.
#[derive(Default, Debug)]
pub struct Revoked {
    serials: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl Revoked {
    /// One serial per line (hex, `:` allowed); `#` starts a comment.
    pub fn parse(text: &str) -> Result<std::collections::HashSet<String>, String> {
        let mut out = std::collections::HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let l = line.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            if !l.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
                return Err(format!("line {}: {l:?} is not a hex serial number", i + 1));
            }
            out.insert(normalize_serial(l));
        }
        Ok(out)
    }

    pub fn replace(&self, serials: std::collections::HashSet<String>) {
        *self.serials.write().unwrap_or_else(|e| e.into_inner()) = serials;
    }

    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses a call whose TLS certificate is revoked.
    pub fn check<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let serials = self.serials.read().unwrap_or_else(|e| e.into_inner());
        if serials.is_empty() {
            return Ok(());
        }
        let Some(cert) = req.peer_certs().and_then(|c| c.first().cloned()) else {
            return Ok(());
        };
        match serial_of(&cert) {
            Some(s) if serials.contains(&s) => Err(tonic::Status::permission_denied(format!(
                "certificate {s} is revoked on this cluster"
            ))),
            _ => Ok(()),
        }
    }
}

/// Compares without an early exit, so timing does not tell how much of a
/// guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("0123456789 abcdef").is_err());
    }

    #[test]
    fn admin_calls_need_the_token_when_one_is_set() {
        let tok = "0123456789abcdef0123";
        let bare = tonic::Request::new(());
        assert!(check_admin(&bare, None).is_ok());
        assert_eq!(
            check_admin(&bare, Some(tok)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let t = Transport::plain().with_token(tok).expect("token");
        assert!(check_admin(&t.request(()), Some(tok)).is_ok());
        let wrong = Transport::plain()
            .with_token("0123456789abcdef0124")
            .expect("token");
        assert_eq!(
            check_admin(&wrong.request(()), Some(tok))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn revoked_serials_are_parsed_and_normalized() {
        let set = Revoked::parse("# jukebox, lost\n0A:1b:C3\n\n  ff00 # kitchen\n").expect("parse");
        assert!(set.contains("a1bc3"));
        assert!(set.contains("ff00"));
        assert_eq!(set.len(), 2);
        assert!(Revoked::parse("not-hex").is_err());
        assert_eq!(normalize_serial("00:00"), "0");
        let r = Revoked::default();
        assert!(
            r.check(&tonic::Request::new(())).is_ok(),
            "plain TCP carries no certificate"
        );
        r.replace(set);
        assert_eq!(r.len(), 2);
        assert!(r.check(&tonic::Request::new(())).is_ok());
    }

    #[test]
    fn a_missing_or_wrong_credential_file_is_named() {
        let dir = std::env::temp_dir().join(format!("musicfs-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let e = Transport::tls_from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(dir.join(CA_FILE), "not a certificate").expect("write");
        let e = Transport::tls_from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("holds no PEM CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
