//! The cluster secret: how a node proves it is one without TLS, and how a
//! storage node's word that it holds a chunk travels through a client.
//!
//! Every node holds the same 32 random bytes (`cluster_secret_file`, made by
//! `musicfs certs init` or `musicfs certs secret`); no client does. A call
//! only nodes may make (Raft, internal commands, chunk deletion and repair)
//! carries a header with the signing node, a timestamp, a nonce and a MAC
//! over those and the call's encoded body, keyed with the secret (keyed
//! BLAKE3, a PRF). Without the secret nobody can make such a call, change
//! one in flight or move a header to another body; a captured call can be
//! replayed unchanged only within [`MAX_SKEW_MS`], which every internal
//! operation tolerates (Raft messages may be duplicated, commands are
//! idempotent or deduplicated, chunk deletion re-checks file ages).
//!
//! Plain TCP with the secret is "not encrypted", never "anyone may write".

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes of the secret.
pub const SECRET_LEN: usize = 32;
/// The gRPC header that carries a node's signature of its call.
pub const AUTH_HEADER: &str = "musicfs-node-auth";
/// How far a signed call's timestamp may be from the receiver's clock. The
/// nodes' clocks are assumed to agree within about a minute (NTP), as the
/// cross-shard transactions assume already.
pub const MAX_SKEW_MS: u64 = 120_000;
/// What a signed header starts with: its format.
const HEADER_VERSION: &str = "1";
/// Key-derivation contexts: a key per use, so a MAC made for one purpose is
/// never valid for another.
const CALL_CONTEXT: &str = "musicfs 2026-12 node call v1";
const RECEIPT_CONTEXT: &str = "musicfs 2026-12 chunk receipt v1";

/// Names of the calls nodes sign; part of every MAC.
pub mod method {
    pub const APPEND: &str = "raft/AppendEntries";
    pub const VOTE: &str = "raft/Vote";
    pub const SNAPSHOT: &str = "raft/InstallSnapshot";
    pub const TRANSFER: &str = "raft/TransferLeader";
    pub const PROPOSE: &str = "meta/Propose";
    pub const DELETE: &str = "chunk/Delete";
    pub const REPLICATE: &str = "chunk/Replicate";
    pub const JOIN: &str = "admin/Join";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the call is not signed by a node of this cluster")]
    Unsigned,
    #[error("malformed node signature: {0}")]
    Malformed(&'static str),
    #[error("the node signature does not match (another cluster's secret, or a changed call)")]
    BadMac,
    #[error(
        "the node signature is {skew_ms} ms away from this node's clock (at most {MAX_SKEW_MS} ms)"
    )]
    Expired { skew_ms: u64 },
    #[error("the cluster secret is {0}")]
    BadSecret(String),
}

/// The cluster's shared secret.
#[derive(Clone)]
pub struct ClusterSecret {
    call_key: [u8; 32],
    receipt_key: [u8; 32],
}

impl std::fmt::Debug for ClusterSecret {
    // Never prints the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A MAC over `parts`, each prefixed with its length so no two different
/// lists of parts hash alike.
fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Compares without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A verified signature: who signed, and the MAC that later pieces of the
/// same stream chain from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signed {
    pub node: u64,
    pub mac: [u8; 32],
}

impl ClusterSecret {
    fn from_bytes(raw: [u8; SECRET_LEN]) -> Self {
        ClusterSecret {
            call_key: blake3::derive_key(CALL_CONTEXT, &raw),
            receipt_key: blake3::derive_key(RECEIPT_CONTEXT, &raw),
        }
    }

    /// A new random secret, as the hex text its file holds.
    pub fn generate_hex() -> String {
        hex(&rand::random::<[u8; SECRET_LEN]>())
    }

    /// The secret written as 64 hex digits (white space around is ignored).
    pub fn from_hex(text: &str) -> Result<Self, AuthError> {
        unhex::<SECRET_LEN>(text.trim())
            .map(Self::from_bytes)
            .ok_or_else(|| AuthError::BadSecret(format!("not {} hex digits", 2 * SECRET_LEN)))
    }

    /// Reads a secret file; a file others may read is refused, since
    /// anyone who reads it can act as a node.
    pub fn read(path: &Path) -> Result<Self, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| AuthError::BadSecret(format!("{}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(AuthError::BadSecret(format!(
                "{}: readable by others (mode {:o}); `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthError::BadSecret(format!("{}: {e}", path.display())))?;
        Self::from_hex(&text).map_err(|e| AuthError::BadSecret(format!("{}: {e}", path.display())))
    }

    /// Writes a new random secret to `path` (a new file, mode 0600).
    pub fn write_new(path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(format!("{}\n", Self::generate_hex()).as_bytes())?;
        f.sync_all()
    }

    fn call_mac(&self, method: &str, node: u64, ts: u64, nonce: &[u8], body: &[u8]) -> [u8; 32] {
        mac(
            &self.call_key,
            &[
                method.as_bytes(),
                &node.to_le_bytes(),
                &ts.to_le_bytes(),
                nonce,
                body,
            ],
        )
    }

    /// The header value with which node `node` signs a call of `method`
    /// whose encoded body is `body`, at `ts` (ms), and its MAC.
    pub fn sign_at(&self, method: &str, node: u64, ts: u64, body: &[u8]) -> (String, [u8; 32]) {
        let nonce: [u8; 16] = rand::random();
        let m = self.call_mac(method, node, ts, &nonce, body);
        (
            format!("{HEADER_VERSION}.{node}.{ts}.{}.{}", hex(&nonce), hex(&m)),
            m,
        )
    }

    /// Checks a signed header against the call's method and body at the
    /// receiver's time `now`.
    pub fn verify_at(
        &self,
        method: &str,
        header: Option<&str>,
        body: &[u8],
        now: u64,
    ) -> Result<Signed, AuthError> {
        let header = header.ok_or(AuthError::Unsigned)?;
        let mut it = header.split('.');
        if it.next() != Some(HEADER_VERSION) {
            return Err(AuthError::Malformed("unknown version"));
        }
        let node: u64 = it
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(AuthError::Malformed("node"))?;
        let ts: u64 = it
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(AuthError::Malformed("timestamp"))?;
        let nonce = it
            .next()
            .and_then(unhex::<16>)
            .ok_or(AuthError::Malformed("nonce"))?;
        let given = it
            .next()
            .and_then(unhex::<32>)
            .ok_or(AuthError::Malformed("mac"))?;
        if it.next().is_some() {
            return Err(AuthError::Malformed("trailing fields"));
        }
        let want = self.call_mac(method, node, ts, &nonce, body);
        if !same(&want, &given) {
            return Err(AuthError::BadMac);
        }
        // Checked after the MAC, so an outsider learns nothing of the clock.
        let skew_ms = now.abs_diff(ts);
        if skew_ms > MAX_SKEW_MS {
            return Err(AuthError::Expired { skew_ms });
        }
        Ok(Signed { node, mac: want })
    }

    /// The MAC of the next piece of a signed stream, chained from the
    /// previous piece's (or the call's) MAC: pieces cannot be dropped,
    /// reordered or moved to another stream.
    pub fn chain(&self, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
        mac(&self.call_key, &[b"stream piece", prev, body])
    }

    /// Checks a stream piece's MAC.
    pub fn verify_chain(
        &self,
        prev: &[u8; 32],
        body: &[u8],
        given: &[u8],
    ) -> Result<[u8; 32], AuthError> {
        let want = self.chain(prev, body);
        if same(&want, given) {
            Ok(want)
        } else {
            Err(AuthError::BadMac)
        }
    }

    /// A storage node's receipt: node `node` held chunk `id` of `size`
    /// bytes, durably, at `at_ms`.
    pub fn receipt(&self, node: u64, id: &[u8], size: u64, at_ms: u64) -> [u8; 16] {
        let m = mac(
            &self.receipt_key,
            &[
                &node.to_le_bytes(),
                id,
                &size.to_le_bytes(),
                &at_ms.to_le_bytes(),
            ],
        );
        let mut out = [0u8; 16];
        out.copy_from_slice(&m[..16]);
        out
    }

    /// Whether `given` is node `node`'s receipt for chunk `id`.
    pub fn check_receipt(&self, node: u64, id: &[u8], size: u64, at_ms: u64, given: &[u8]) -> bool {
        same(&self.receipt(node, id, size, at_ms), given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::from_hex(&ClusterSecret::generate_hex()).expect("secret")
    }

    #[test]
    fn a_signature_holds_only_for_its_method_body_and_secret() {
        let s = secret();
        let now = 1_000_000;
        let (h, m) = s.sign_at(method::APPEND, 2, now, b"body");
        let ok = s
            .verify_at(method::APPEND, Some(&h), b"body", now + 5)
            .expect("valid");
        assert_eq!(ok, Signed { node: 2, mac: m });
        assert_eq!(
            s.verify_at(method::APPEND, Some(&h), b"bodY", now),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            s.verify_at(method::VOTE, Some(&h), b"body", now),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            secret().verify_at(method::APPEND, Some(&h), b"body", now),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            s.verify_at(method::APPEND, None, b"body", now),
            Err(AuthError::Unsigned)
        );
        // Another node id in the same header is another MAC.
        let forged = h.replacen(".2.", ".3.", 1);
        assert_eq!(
            s.verify_at(method::APPEND, Some(&forged), b"body", now),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn an_old_or_future_signature_is_refused() {
        let s = secret();
        let (h, _) = s.sign_at(method::DELETE, 1, 10_000_000, b"");
        assert!(s
            .verify_at(method::DELETE, Some(&h), b"", 10_000_000 + MAX_SKEW_MS)
            .is_ok());
        assert!(matches!(
            s.verify_at(method::DELETE, Some(&h), b"", 10_000_000 + MAX_SKEW_MS + 1),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            s.verify_at(method::DELETE, Some(&h), b"", 10_000_000 - MAX_SKEW_MS - 1),
            Err(AuthError::Expired { .. })
        ));
    }

    #[test]
    fn garbage_headers_are_malformed_not_panics() {
        let s = secret();
        for bad in [
            "",
            "1",
            "2.1.1.00.00",
            "1.x.1.00.00",
            "1.1.1.zz.00",
            "1.1.1.00000000000000000000000000000000.00",
            "1.1.1.00000000000000000000000000000000.\u{e9}\u{e9}",
        ] {
            assert!(
                matches!(
                    s.verify_at(method::VOTE, Some(bad), b"", 1),
                    Err(AuthError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_pieces_chain_in_order() {
        let s = secret();
        let (_, m0) = s.sign_at(method::SNAPSHOT, 1, 5, b"");
        let m1 = s.chain(&m0, b"one");
        let m2 = s.chain(&m1, b"two");
        assert_eq!(s.verify_chain(&m0, b"one", &m1), Ok(m1));
        assert_eq!(s.verify_chain(&m1, b"two", &m2), Ok(m2));
        assert_eq!(s.verify_chain(&m0, b"two", &m2), Err(AuthError::BadMac));
        assert_eq!(s.verify_chain(&m0, b"one", &m2), Err(AuthError::BadMac));
    }

    #[test]
    fn receipts_bind_node_chunk_size_and_time() {
        let s = secret();
        let r = s.receipt(1, b"chunk", 70_000, 42);
        assert!(s.check_receipt(1, b"chunk", 70_000, 42, &r));
        assert!(!s.check_receipt(2, b"chunk", 70_000, 42, &r));
        assert!(!s.check_receipt(1, b"chunK", 70_000, 42, &r));
        assert!(!s.check_receipt(1, b"chunk", 70_001, 42, &r));
        assert!(!s.check_receipt(1, b"chunk", 70_000, 43, &r));
        assert!(!secret().check_receipt(1, b"chunk", 70_000, 42, &r));
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("musicfs-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("cluster-secret");
        let _ = std::fs::remove_file(&p);
        ClusterSecret::write_new(&p).expect("write");
        assert!(ClusterSecret::read(&p).is_ok());
        assert!(ClusterSecret::write_new(&p).is_err(), "never overwritten");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = ClusterSecret::read(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&p, "short").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = ClusterSecret::read(&p).unwrap_err().to_string();
        assert!(e.contains("hex digits"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
