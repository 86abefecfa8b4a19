//! `musicfs certs`: the cluster's certificate authority, a certificate per
//! node and one for clients, and the admin token, in the directory layout
//! the nodes (`tls_dir`) and the CLI and mounts (`--tls-dir`) read.
//!
//! ```text
//! OUT/ca/ca.pem, OUT/ca/ca.key   the CA (keep ca.key off the nodes)
//! OUT/node-N/{ca,cert,key}.pem   one per node, names `musicfs-node`
//! OUT/client/{ca,cert,key}.pem   for mounts and admin commands
//! OUT/admin-token                for destructive admin commands
//! OUT/cluster-secret             for every node (cluster_secret_file), never clients
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use proto::transport::{CA_FILE, CERT_FILE, KEY_FILE, NODE_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists already; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CertError>;

/// What a certificate is for.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A node: server and client of other nodes. `hosts` are extra DNS
    /// names or IP addresses to put in it (for tools that check them).
    Node { id: u64, hosts: Vec<String> },
    /// A mount or admin command.
    Client { name: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to a new file, readable by its owner only when `secret`.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_path_buf())
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn ca_params(days: u32) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(DnType::CommonName, "MusicFS cluster CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days);
    Ok(p)
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    // An hour back, for clocks a little behind the one that made it.
    p.not_before = (now - std::time::Duration::from_secs(3600)).into();
    p.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
}

fn leaf_params(subject: &Subject, days: u32) -> Result<CertificateParams> {
    let (cn, sans, usages) = match subject {
        Subject::Node { id, hosts } => {
            let mut sans = vec![NODE_NAME.to_string()];
            sans.extend(hosts.iter().cloned());
            (
                format!("musicfs node {id}"),
                sans,
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        }
        Subject::Client { name } => {
            if name.is_empty() || name == NODE_NAME {
                return Err(CertError::Invalid(format!(
                    "{name:?} cannot name a client certificate"
                )));
            }
            (
                format!("musicfs client {name}"),
                vec![],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            )
        }
    };
    let mut p = CertificateParams::new(sans)?;
    // A random serial (positive: its top bit clear) that `issue` reports,
    // so an operator can revoke this certificate by it.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = usages;
    validity(&mut p, days);
    Ok(p)
}

/// Issues a certificate for `subject` with the CA in `ca_dir` into a new
/// directory `out` (`ca.pem`, `cert.pem`, `key.pem`); returns its serial
/// number (hex), by which nodes can be told to refuse it.
pub fn issue(ca_dir: &Path, subject: &Subject, out: &Path, days: u32) -> Result<String> {
    let ca_pem_path = ca_dir.join(CA_FILE);
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(io(&ca_pem_path))?;
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let cert = leaf_params(subject, days)?.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    write_new(&out.join(CA_FILE), ca_pem.as_bytes(), false)?;
    write_new(&out.join(CERT_FILE), cert.pem().as_bytes(), false)?;
    write_new(&out.join(KEY_FILE), key.serialize_pem().as_bytes(), true)?;
    proto::transport::serial_of(cert.der())
        .ok_or_else(|| CertError::Invalid("the new certificate does not parse".into()))
}

/// A new random admin token (hex, 32 bytes of entropy).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `init` wrote.
pub struct Made {
    pub ca: PathBuf,
    pub nodes: Vec<PathBuf>,
    pub client: PathBuf,
    pub token: PathBuf,
    pub secret: PathBuf,
    /// The client certificate's serial number.
    pub client_serial: String,
}

/// Writes a new cluster secret to `path` (a new file, mode 0600).
pub fn new_secret(path: &Path) -> Result<()> {
    proto::auth::ClusterSecret::write_new(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            io(path)(e)
        }
    })
}

/// A new CA under `out/ca`, certificates for nodes `1..=nodes` and one
/// client, and an admin token. Refuses to touch an existing CA.
pub fn init(out: &Path, nodes: u64, hosts: &[String], days: u32) -> Result<Made> {
    init_with(out, nodes, hosts, days, days)
}

/// As [`init`], with the client certificate valid for `client_days`.
pub fn init_with(
    out: &Path,
    nodes: u64,
    hosts: &[String],
    days: u32,
    client_days: u32,
) -> Result<Made> {
    if nodes == 0 {
        return Err(CertError::Invalid("at least one node is needed".into()));
    }
    let ca_dir = out.join("ca");
    if ca_dir.join("ca.key").exists() {
        return Err(CertError::Exists(ca_dir.join("ca.key")));
    }
    std::fs::create_dir_all(&ca_dir).map_err(io(&ca_dir))?;
    let key = KeyPair::generate()?;
    let ca = ca_params(days)?.self_signed(&key)?;
    write_new(&ca_dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
    write_new(&ca_dir.join(CA_FILE), ca.pem().as_bytes(), false)?;
    let mut made = Made {
        ca: ca_dir.clone(),
        nodes: vec![],
        client: out.join("client"),
        token: out.join("admin-token"),
        secret: out.join("cluster-secret"),
        client_serial: String::new(),
    };
    for id in 1..=nodes {
        let dir = out.join(format!("node-{id}"));
        issue(
            &ca_dir,
            &Subject::Node {
                id,
                hosts: hosts.to_vec(),
            },
            &dir,
            days,
        )?;
        made.nodes.push(dir);
    }
    made.client_serial = issue(
        &ca_dir,
        &Subject::Client {
            name: "admin".into(),
        },
        &made.client,
        client_days,
    )?;
    write_new(&made.token, format!("{}\n", new_token()).as_bytes(), true)?;
    new_secret(&made.secret)?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::transport::Transport;

    fn node_cert(dir: &Path) -> bool {
        Transport::tls_from_dir(dir)
            .expect("credentials load")
            .holds_node_certificate()
    }

    #[test]
    fn init_makes_node_and_client_credentials_a_node_can_tell_apart() {
        let tmp = tempfile::tempdir().expect("tmp");
        let made = init(tmp.path(), 3, &["10.0.0.1".into()], 30).expect("init");
        assert_eq!(made.nodes.len(), 3);
        for n in &made.nodes {
            assert!(node_cert(n), "{}", n.display());
        }
        assert!(!node_cert(&made.client));
        let token = std::fs::read_to_string(&made.token).expect("token");
        Transport::plain()
            .with_token_file(&made.token)
            .expect("the token is accepted");
        assert_eq!(token.trim().len(), 64);
        use std::os::unix::fs::PermissionsExt;
        for secret in [
            made.token.clone(),
            made.client.join(KEY_FILE),
            made.ca.join("ca.key"),
        ] {
            let mode = std::fs::metadata(&secret)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} is readable by others",
                secret.display()
            );
        }
        // A second init over the same directory leaves the CA alone.
        let before = std::fs::read(made.ca.join("ca.key")).expect("key");
        assert!(matches!(
            init(tmp.path(), 3, &[], 30),
            Err(CertError::Exists(_))
        ));
        assert_eq!(std::fs::read(made.ca.join("ca.key")).expect("key"), before);
        // A later node from the same CA.
        let n4 = tmp.path().join("node-4");
        issue(
            &made.ca,
            &Subject::Node {
                id: 4,
                hosts: vec![],
            },
            &n4,
            30,
        )
        .expect("issue");
        assert!(node_cert(&n4));
    }
}
