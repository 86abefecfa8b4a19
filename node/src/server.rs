//! Starting and stopping a node: configuration, data-directory checks,
//! the gRPC server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::admin::admin_service_server::AdminServiceServer;
use proto::meta::meta_service_server::MetaServiceServer;
use proto::raft::raft_service_server::RaftServiceServer;
use proto::storage::chunk_service_server::ChunkServiceServer;
use proto::MAX_MESSAGE_BYTES;
use raft::{RaftServer, RaftSettings, Registry, Store};
use serde::Deserialize;
use tonic::service::interceptor::InterceptedService;

use crate::app::NamespaceApp;
use crate::chunk_service::ChunkSvc;
use crate::chunkstore::{ChunkStore, DEFAULT_RESERVE_BYTES};
use crate::conns::{ConnLimits, ConnTable};
use crate::gc::{Gc, GcConfig};
use crate::repair::{ChunkClients, Repair, RepairConfig};
use crate::router::Router;
use crate::scrub::{Scrub, ScrubConfig};
use crate::service::{AdminSvc, MetaSvc};

/// Node settings, from `/etc/musicfs/node.toml` and/or flags.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster (a positive integer, unique, never reused).
    pub id: u64,
    /// Address the node listens on for clients and peers.
    pub listen: SocketAddr,
    /// Data directory: metadata database, snapshots and chunks.
    pub data: PathBuf,
    /// Build a Raft snapshot after this many log entries.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for followers that lag.
    #[serde(default = "default_keep_logs")]
    pub keep_logs: u64,
    /// Disk space (MiB) the chunk store leaves free.
    #[serde(default = "default_reserve_mib")]
    pub reserve_mib: u64,
    /// Seconds a storage node may stay silent before its chunks are
    /// re-replicated on other nodes.
    #[serde(default = "default_repair_after_secs")]
    pub repair_after_secs: u64,
    /// MiB per second repair may copy (0: unlimited).
    #[serde(default = "default_repair_mib_per_sec")]
    pub repair_mib_per_sec: u64,
    /// MiB per second a scrub may read (0: unlimited).
    #[serde(default = "default_scrub_mib_per_sec")]
    pub scrub_mib_per_sec: u64,
    /// Hours between automatic scrubs (0: only `musicfs scrub start`).
    #[serde(default = "default_scrub_every_hours")]
    pub scrub_every_hours: u64,
    /// Seconds between garbage-collection passes of the groups a node leads.
    #[serde(default = "default_gc_every_secs")]
    pub gc_every_secs: u64,
    /// Seconds between sweeps of a node's own chunk files for ones nothing
    /// lists (0: never).
    #[serde(default = "default_gc_sweep_every_secs")]
    pub gc_sweep_every_secs: u64,
    /// Where to serve Prometheus metrics (`/metrics`); none when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS credentials of this node (`ca.pem`, `cert.pem`, `key.pem`, from
    /// `musicfs certs init`); plain TCP when unset. With TLS every peer and
    /// client must present a certificate of the cluster's CA.
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    /// File holding the admin token that commands changing the cluster must
    /// carry (node add/drain/remove, gc, scrub, snapshot, transfer-leader,
    /// init); the same on every node. Unset: no token is asked for.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the cluster secret (64 hex digits, mode 0600, the same
    /// on every node; `musicfs certs init` and `musicfs certs secret` make
    /// one). Nodes sign the calls only nodes may make with it on plain TCP
    /// (Raft, internal commands, chunk deletion and repair), and storage
    /// nodes the receipts that let a chunk location into the index.
    /// Required.
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
    /// Connections the node keeps open at most, in all and from one
    /// address; more are closed as soon as they are accepted.
    /// File of revoked certificate serial numbers, one per line (hex, as
    /// `musicfs certs issue` prints them); re-read within 10 s of a change.
    /// A call with a revoked certificate is refused.
    #[serde(default)]
    pub revoked_certs_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
}

fn default_max_connections() -> usize {
    ConnLimits::default().total
}
fn default_max_connections_per_address() -> usize {
    ConnLimits::default().per_address
}

/// Calls one HTTP/2 connection may carry at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

fn default_gc_every_secs() -> u64 {
    60
}
fn default_gc_sweep_every_secs() -> u64 {
    6 * 3600
}

fn default_scrub_mib_per_sec() -> u64 {
    50
}
fn default_scrub_every_hours() -> u64 {
    24 * 30
}

fn default_repair_after_secs() -> u64 {
    600
}
fn default_repair_mib_per_sec() -> u64 {
    100
}

fn default_snapshot_every() -> u64 {
    RaftSettings::default().snapshot_every
}
fn default_keep_logs() -> u64 {
    RaftSettings::default().keep_behind_snapshot
}
fn default_reserve_mib() -> u64 {
    DEFAULT_RESERVE_BYTES >> 20
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node id must be a positive integer")]
    BadId,
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {path} is in use by another musicfs-node process")]
    Locked { path: String },
    #[error(
        "data directory {path} belongs to node {stored} (cluster {cluster}), not to node {wanted}; \
         start it with --id {stored} or use another directory"
    )]
    WrongNode {
        path: String,
        stored: u64,
        wanted: u64,
        cluster: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] raft::StoreError),
    #[error(transparent)]
    Group(#[from] raft::GroupError),
    #[error(transparent)]
    Chunks(#[from] crate::chunkstore::ChunkError),
    #[error("server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("{0}")]
    Metrics(String),
    #[error("credentials: {0}")]
    Credentials(#[from] proto::transport::TransportError),
    #[error(
        "{0}: the certificate is a client's; a node needs a node certificate \
         (`musicfs certs issue --ca CA_DIR --node ID --out DIR`)"
    )]
    NotANodeCertificate(String),
    #[error(
        "data directory {path} holds chunks with {found} ids; this version names chunks by \
         {want} and cannot serve them: copy the files out with the version that made it \
         (musicfs get / rsync from a mount) and into a new cluster",
        want = proto::CHUNK_ID_FORMAT
    )]
    ChunkFormat { path: String, found: String },
    #[error("revoked certificates file {path}: {why}")]
    Revoked { path: String, why: String },
    #[error("cluster secret: {0}")]
    Secret(#[from] proto::auth::AuthError),
    #[error(
        "a node needs the cluster secret (cluster_secret_file, or --cluster-secret-file; \
         `musicfs certs init` or `musicfs certs secret --out FILE` makes one, to copy to every \
         node): it signs the calls only nodes may make and the receipts of stored chunks"
    )]
    NoSecret,
}

fn data_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

/// Holds an exclusive lock on the data directory for the node's lifetime.
pub struct DirLock(#[allow(dead_code)] std::fs::File);

pub fn lock_dir(dir: &Path) -> Result<DirLock, NodeError> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(data_err(dir))?;
    // SAFETY: flock on a valid open file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(NodeError::Locked {
            path: dir.display().to_string(),
        });
    }
    Ok(DirLock(f))
}

/// The node's TLS credentials and admin token, checked before anything
/// else starts so a wrong file fails the start with its name.
fn credentials(cfg: &NodeConfig) -> Result<proto::transport::Transport, NodeError> {
    let wire = proto::transport::Transport::from_files(
        cfg.tls_dir.as_deref(),
        cfg.admin_token_file.as_deref(),
    )?;
    if let Some(dir) = cfg
        .tls_dir
        .as_ref()
        .filter(|_| !wire.holds_node_certificate())
    {
        return Err(NodeError::NotANodeCertificate(dir.display().to_string()));
    }
    match &cfg.cluster_secret_file {
        Some(f) => Ok(wire.with_secret(proto::auth::ClusterSecret::read(f)?, cfg.id)),
        None => Err(NodeError::NoSecret),
    }
}

/// Reads the revoked serials file.
fn read_revoked(path: &Path) -> Result<std::collections::HashSet<String>, NodeError> {
    let bad = |why: String| NodeError::Revoked {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    proto::transport::Revoked::parse(&text).map_err(bad)
}

/// Re-reads the revoked serials file when it changes; a file that turns
/// unreadable or malformed keeps the list in force (and says so).
async fn reload_revoked(path: PathBuf, revoked: Arc<proto::transport::Revoked>) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = mtime(&path);
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    every.tick().await;
    loop {
        every.tick().await;
        let now = mtime(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match read_revoked(&path) {
            Ok(set) => {
                tracing::info!(revoked = set.len(), file = %path.display(), "revoked certificates reloaded");
                revoked.replace(set);
            }
            Err(e) => tracing::error!(error = %e, "keeping the revoked certificates in force"),
        }
    }
}

/// An interceptor that refuses calls made with a revoked certificate.
fn not_revoked(
    revoked: &Arc<proto::transport::Revoked>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let revoked = revoked.clone();
    move |req| revoked.check(&req).map(|()| req)
}

/// Node-store key of the chunk-id format the data directory was made with.
const KEY_CHUNK_IDS: &str = "chunk_ids";

/// Records the chunk-id format in a new data directory, and refuses one
/// made with another: its chunk ids would all fail their checks here (and
/// a scrub would move every chunk aside). A directory from before the
/// format was recorded used XXH3-128.
fn check_chunk_format(store: &Store, data: &Path) -> Result<(), NodeError> {
    let err = |found: &str| NodeError::ChunkFormat {
        path: data.display().to_string(),
        found: found.to_string(),
    };
    match store.node_get(KEY_CHUNK_IDS)? {
        Some(f) if f == proto::CHUNK_ID_FORMAT => Ok(()),
        Some(f) => Err(err(&f)),
        None if store.node_get("node_id")?.is_some() => Err(err("xxh3-128")),
        None => Ok(store.node_set(KEY_CHUNK_IDS, proto::CHUNK_ID_FORMAT)?),
    }
}

/// How long a stopping node waits for requests in flight.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    if cfg.id == 0 {
        return Err(NodeError::BadId);
    }
    let wire = credentials(&cfg)?;
    let revoked = Arc::new(proto::transport::Revoked::default());
    if let Some(f) = &cfg.revoked_certs_file {
        revoked.replace(read_revoked(f)?);
    }
    let nofile = crate::conns::raise_nofile_limit();
    std::fs::create_dir_all(&cfg.data).map_err(data_err(&cfg.data))?;
    let _lock = lock_dir(&cfg.data)?;
    let store = Store::open(&cfg.data.join("meta"))?;
    check_chunk_format(&store, &cfg.data)?;
    match store.node_get("node_id")? {
        Some(stored) => {
            let stored: u64 = stored.parse().unwrap_or(0);
            if stored != cfg.id {
                return Err(NodeError::WrongNode {
                    path: cfg.data.display().to_string(),
                    stored,
                    wanted: cfg.id,
                    cluster: store
                        .node_get("cluster_id")?
                        .unwrap_or_else(|| "none".into()),
                });
            }
        }
        None => store.node_set("node_id", &cfg.id.to_string())?,
    }
    let chunks = Arc::new(ChunkStore::open(&cfg.data, cfg.reserve_mib << 20)?);
    // The status page and metrics listener, bound first so a taken port
    // fails the start at once.
    let http = match cfg.metrics_listen {
        Some(addr) => Some((
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| NodeError::Metrics(format!("status page listener on {addr}: {e}")))?,
            crate::metrics::install().map_err(NodeError::Metrics)?,
        )),
        None => None,
    };
    let settings = RaftSettings {
        snapshot_every: cfg.snapshot_every.max(1),
        keep_behind_snapshot: cfg.keep_logs,
        ..Default::default()
    };
    let snap_root = cfg.data.join("snapshots");
    let registry = Registry::open(
        cfg.id,
        store,
        Arc::new(NamespaceApp),
        settings,
        snap_root.clone(),
        wire.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let router = Router::new(registry.clone(), std::time::Duration::from_secs(10));
    let meta = Arc::new(MetaSvc {
        registry: registry.clone(),
        router: router.clone(),
    });
    let clients = Arc::new(ChunkClients::new(registry.wire().clone()));
    let repair = Repair::new(
        router.clone(),
        RepairConfig {
            repair_after: std::time::Duration::from_secs(cfg.repair_after_secs),
            bytes_per_sec: cfg.repair_mib_per_sec << 20,
        },
        clients.clone(),
    );
    let repair_task = tokio::spawn(repair.clone().run());
    let scrub = Scrub::new(
        router.clone(),
        chunks.clone(),
        clients.clone(),
        repair.clone(),
        ScrubConfig {
            bytes_per_sec: cfg.scrub_mib_per_sec << 20,
            every: (cfg.scrub_every_hours > 0)
                .then(|| std::time::Duration::from_secs(cfg.scrub_every_hours * 3600)),
        },
    );
    let scrub_task = tokio::spawn(scrub.clone().run());
    let gc = Gc::new(
        router.clone(),
        chunks.clone(),
        clients.clone(),
        GcConfig {
            every: std::time::Duration::from_secs(cfg.gc_every_secs.max(1)),
            sweep_every: (cfg.gc_sweep_every_secs > 0)
                .then(|| std::time::Duration::from_secs(cfg.gc_sweep_every_secs)),
        },
    );
    let gc_task = tokio::spawn(gc.clone().run());
    let conns = ConnTable::new(ConnLimits {
        total: cfg.max_connections.max(1),
        per_address: cfg.max_connections_per_address.max(1),
    });
    // The chunk store's size and free space, and the connections open,
    // for the metrics.
    let store_gauges = {
        let (chunks, conns) = (chunks.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let (free, _) = chunks.disk_space().unwrap_or((0, 0));
                crate::metrics::store(chunks.chunk_count(), chunks.chunk_bytes(), free);
                crate::metrics::connections(conns.open());
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        })
    };
    let background = tokio::spawn(crate::background::run(router));
    let _revoked_reload = cfg
        .revoked_certs_file
        .clone()
        .map(|f| crate::background::AbortOnDrop(tokio::spawn(reload_revoked(f, revoked.clone()))));
    let raft_svc = RaftServer::new(registry.clone(), snap_root.join("incoming"));
    let admin = Arc::new(AdminSvc {
        registry: registry.clone(),
        chunks: chunks.clone(),
        meta: meta.clone(),
        repair,
        scrub: scrub.clone(),
        gc,
    });
    let _status_page = http.map(|(listener, handle)| {
        crate::background::AbortOnDrop(tokio::spawn(crate::status_page::serve(
            listener,
            admin.clone(),
            handle,
        )))
    });
    tracing::info!(id = cfg.id, listen = %cfg.listen, data = %cfg.data.display(), cluster = %registry.cluster_id(), tls = wire.is_tls(), admin_token = wire.token().is_some(), cluster_secret = wire.secret().is_some(), open_files = nofile, "node started");
    if !wire.is_tls() {
        tracing::warn!(
            "PLAIN TCP: nothing is encrypted; node calls are signed with the cluster secret, \
             but clients are not authenticated and {} travels in clear text. \
             Use tls_dir (musicfs certs init) on any network the cluster does not own",
            if wire.token().is_some() {
                "the admin token"
            } else {
                "every request"
            }
        );
    }
    use futures::FutureExt;
    let shutdown = shutdown.boxed().shared();
    // Requests still waiting (a proposal behind a partition, a read behind
    // an election) get a grace period, not an unbounded wait: their clients
    // retry elsewhere.
    let grace = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    // Chunk reads over the direct protocol share the gRPC port; under TLS
    // every connection is gRPC's.
    let (incoming, accept_task) = crate::direct::split_incoming(
        listener,
        chunks.clone(),
        wire.clone(),
        conns.clone(),
        !wire.is_tls(),
    );
    let _accept_task = crate::background::AbortOnDrop(accept_task);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = wire.server_tls() {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(crate::metrics::RpcLayer)
        // Dead peers' connections close (a ping unanswered for 20 s); a
        // connection carries at most 1,024 calls at once.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(proto::CONNECTION_WINDOW_BYTES)
        .max_frame_size(proto::MAX_FRAME_BYTES)
        // Raft messages only from nodes: a client certificate is refused
        // before its body is read; each call's handler checks the node's
        // certificate or signature.
        .add_service(InterceptedService::new(
            RaftServiceServer::new(raft_svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            {
                let revoked = revoked.clone();
                move |req: tonic::Request<()>| {
                    proto::transport::deny_client_certificates(&req)?;
                    revoked.check(&req).map(|()| req)
                }
            },
        ))
        .add_service(InterceptedService::new(
            MetaServiceServer::from_arc(meta)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            not_revoked(&revoked),
        ))
        .add_service(InterceptedService::new(
            ChunkServiceServer::new(ChunkSvc {
                store: chunks,
                clients,
                scrub,
                wire: wire.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            not_revoked(&revoked),
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::from_arc(admin.clone()),
            not_revoked(&revoked),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        r = server => r?,
        () = grace => tracing::warn!(
            id = cfg.id,
            "requests still in flight after {SHUTDOWN_GRACE:?}; stopping without them"
        ),
    }
    background.abort();
    repair_task.abort();
    scrub_task.abort();
    gc_task.abort();
    store_gauges.abort();
    registry.shutdown().await;
    tracing::info!(id = cfg.id, "node stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NodeConfig;

    #[test]
    fn a_data_directory_of_another_chunk_id_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = raft::Store::open(&dir.path().join("fresh")).expect("store");
        super::check_chunk_format(&fresh, dir.path()).expect("a new directory");
        super::check_chunk_format(&fresh, dir.path()).expect("and again");
        // A directory a node used before the format was recorded.
        let old = raft::Store::open(&dir.path().join("old")).expect("store");
        old.node_set("node_id", "1").expect("set");
        let e = super::check_chunk_format(&old, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("xxh3-128") && e.contains("blake3-128"), "{e}");
    }

    /// The sample configuration and the one in docs/OPERATIONS.md name only
    /// fields a node takes (unknown fields fail the start).
    #[test]
    fn the_documented_configurations_parse() {
        let sample: NodeConfig =
            toml::from_str(include_str!("../../deploy/node.toml")).expect("deploy/node.toml");
        assert_eq!(
            sample.tls_dir.as_deref(),
            Some(std::path::Path::new("/etc/musicfs/tls"))
        );
        let doc = include_str!("../../docs/OPERATIONS.md");
        let block = doc
            .split("```toml")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block in OPERATIONS.md");
        let documented: NodeConfig = toml::from_str(block).expect("OPERATIONS.md's node.toml");
        assert!(documented.admin_token_file.is_some());
        assert_eq!(documented.gc_every_secs, 60);
    }
}
