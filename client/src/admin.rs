//! Cluster administration used by the CLI: initialisation, status and the
//! mount helper.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::admin::admin_service_client::AdminServiceClient;
use proto::admin::{InitRequest, Peer, StatusRequest, StatusResponse};
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::error::{ClientError, Result};

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(s: &str) -> Result<Vec<Peer>> {
    let mut peers = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ClientError::Invalid(format!("peer {part:?} is not ID=HOST:PORT")))?;
        let node_id: u64 = id.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            ClientError::Invalid(format!("node id {id:?} is not a positive integer"))
        })?;
        crate::conn::parse_seeds(addr)?;
        if peers.iter().any(|p: &Peer| p.node_id == node_id) {
            return Err(ClientError::Invalid(format!(
                "node id {node_id} given twice"
            )));
        }
        if peers.iter().any(|p: &Peer| p.addr == addr) {
            return Err(ClientError::Invalid(format!("address {addr} given twice")));
        }
        peers.push(Peer {
            node_id,
            addr: addr.to_string(),
        });
    }
    if peers.is_empty() {
        return Err(ClientError::Invalid("no peers given".into()));
    }
    Ok(peers)
}

async fn admin(addr: &str) -> Result<AdminServiceClient<tonic::transport::Channel>> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Invalid(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let ch = ep
        .connect()
        .await
        .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
    Ok(AdminServiceClient::new(ch))
}

pub async fn node_status(addr: &str) -> Result<StatusResponse> {
    let mut c = admin(addr).await?;
    let st = c
        .status(StatusRequest {})
        .await
        .map_err(|s| ClientError::Unavailable(format!("{addr}: {}", s.message())))?
        .into_inner();
    Ok(st)
}

/// Metadata groups of a new cluster unless told otherwise: enough that
/// leaders spread over three to eight nodes and no state machine holds a
/// large share of a 10M-file namespace.
pub const DEFAULT_GROUPS: u32 = 16;

/// Initialises a new cluster over `peers` with `groups` metadata groups.
/// Every peer must be reachable, carry the node id it is given here and not
/// belong to a cluster yet; otherwise nothing is changed.
pub async fn init_cluster(peers: &[Peer], groups: u32) -> Result<String> {
    if groups == 0 || groups > 4096 {
        return Err(ClientError::Invalid("--groups must be 1..=4096".into()));
    }
    for p in peers {
        let st = node_status(&p.addr)
            .await
            .map_err(|e| ClientError::Connect(format!("node {} at {}: {e}", p.node_id, p.addr)))?;
        if st.node_id != p.node_id {
            return Err(ClientError::Invalid(format!(
                "the node at {} has id {}, not {}",
                p.addr, st.node_id, p.node_id
            )));
        }
        if !st.cluster_id.is_empty() {
            return Err(ClientError::server(
                proto::meta::ErrorCode::AlreadyInitialized,
                format!(
                    "node {} at {} already belongs to cluster {}; nothing was changed",
                    p.node_id, p.addr, st.cluster_id
                ),
            ));
        }
    }
    let cluster_id = new_cluster_id();
    let first = &peers[0];
    let mut c = admin(&first.addr).await?;
    let r = c
        .init(InitRequest {
            cluster_id: cluster_id.clone(),
            peers: peers.to_vec(),
            group_count: groups,
            bootstrap: true,
        })
        .await
        .map_err(|s| ClientError::Unavailable(format!("{}: {}", first.addr, s.message())))?
        .into_inner();
    if let Some(e) = r.error {
        return Err(ClientError::Server(e));
    }
    // Wait until every group has a leader, so the cluster is usable on return.
    let start = Instant::now();
    loop {
        if let Ok(st) = node_status(&first.addr).await {
            if st.groups.len() == groups as usize && st.groups.iter().all(|g| g.leader_id != 0) {
                return Ok(cluster_id);
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(ClientError::Unavailable(format!(
                "cluster {cluster_id} initialised but not every group elected a leader within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn new_cluster_id() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

#[derive(Serialize, Debug)]
pub struct NodeView {
    pub id: u64,
    pub address: String,
    pub up: bool,
    pub error: Option<String>,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub leader_of: usize,
    /// Log entries this node has yet to apply, summed over the groups (each
    /// against its leader's applied index).
    pub lag: u64,
}

#[derive(Serialize, Debug)]
pub struct GroupView {
    pub id: u32,
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<u64>,
    pub last_applied: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    /// Approximate bytes on disk of the group's log and state (leader's).
    pub size_bytes: u64,
    pub inodes: u64,
    /// Unresolved cross-shard intents and decisions (leader's view).
    pub open_intents: u64,
    /// Chunk reference batches queued for other groups (leader's view).
    pub queued_ref_batches: u64,
}

#[derive(Serialize, Debug)]
pub struct ClusterView {
    pub cluster_id: String,
    pub healthy: bool,
    pub problems: Vec<String>,
    pub nodes: Vec<NodeView>,
    pub groups: Vec<GroupView>,
}

/// Gathers the status of every node reachable from `seeds`.
pub async fn cluster_status(seeds: &[String]) -> Result<ClusterView> {
    let mut first: Option<StatusResponse> = None;
    let mut errors = Vec::new();
    for s in seeds {
        match node_status(s).await {
            Ok(st) if !st.cluster_id.is_empty() => {
                first = Some(st);
                break;
            }
            Ok(_) => errors.push(format!("{s}: not initialised (run `musicfs cluster init`)")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let first = first.ok_or_else(|| ClientError::Connect(errors.join("; ")))?;
    let mut statuses: BTreeMap<u64, std::result::Result<StatusResponse, String>> = BTreeMap::new();
    for p in &first.peers {
        let r = if p.node_id == first.node_id {
            Ok(first.clone())
        } else {
            match node_status(&p.addr).await {
                // A node answering with another cluster's data is not a member.
                Ok(st) if st.cluster_id != first.cluster_id => Err(format!(
                    "answers as node {} of cluster {}, not of cluster {}",
                    st.node_id,
                    if st.cluster_id.is_empty() {
                        "(none)"
                    } else {
                        &st.cluster_id
                    },
                    first.cluster_id
                )),
                Ok(st) => Ok(st),
                Err(e) => Err(e.to_string()),
            }
        };
        statuses.insert(p.node_id, r);
    }
    let mut groups: BTreeMap<u32, GroupView> = BTreeMap::new();
    for st in statuses.values().flatten() {
        for g in &st.groups {
            let view = groups.entry(g.group_id).or_insert(GroupView {
                id: g.group_id,
                leader: None,
                term: 0,
                members: g.voters.clone(),
                last_applied: 0,
                last_log_index: 0,
                snapshot_index: 0,
                size_bytes: 0,
                inodes: 0,
                open_intents: 0,
                queued_ref_batches: 0,
            });
            // The leader's own report is authoritative for its group.
            if g.leader_id == st.node_id || (view.leader.is_none() && g.term >= view.term) {
                view.leader = (g.leader_id != 0).then_some(g.leader_id);
                view.term = g.term;
                view.members = g.voters.clone();
                view.last_applied = g.last_applied;
                view.last_log_index = g.last_log_index;
                view.snapshot_index = g.snapshot_index;
                view.size_bytes = g.size_bytes;
                view.inodes = g.inodes;
                view.open_intents = g.open_intents;
                view.queued_ref_batches = g.queued_ref_batches;
            }
        }
    }
    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    for p in &first.peers {
        let r = &statuses[&p.node_id];
        let leader_of = groups
            .values()
            .filter(|g| g.leader == Some(p.node_id))
            .count();
        match r {
            Ok(st) => nodes.push(NodeView {
                id: p.node_id,
                address: p.addr.clone(),
                up: true,
                error: None,
                chunks: st.chunk_count,
                chunk_bytes: st.chunk_bytes,
                disk_free_bytes: st.disk_free_bytes,
                disk_total_bytes: st.disk_total_bytes,
                leader_of,
                lag: st
                    .groups
                    .iter()
                    .map(|mine| {
                        groups
                            .get(&mine.group_id)
                            .map(|g| g.last_applied.saturating_sub(mine.last_applied))
                            .unwrap_or(0)
                    })
                    .sum(),
            }),
            Err(e) => {
                problems.push(format!(
                    "node {} at {} is unreachable: {e}",
                    p.node_id, p.addr
                ));
                nodes.push(NodeView {
                    id: p.node_id,
                    address: p.addr.clone(),
                    up: false,
                    error: Some(e.clone()),
                    chunks: 0,
                    chunk_bytes: 0,
                    disk_free_bytes: 0,
                    disk_total_bytes: 0,
                    leader_of,
                    lag: 0,
                });
            }
        }
    }
    for g in groups.values() {
        if g.leader.is_none() {
            problems.push(format!("group {} has no leader", g.id));
        }
    }
    Ok(ClusterView {
        cluster_id: first.cluster_id,
        healthy: problems.is_empty(),
        problems,
        nodes,
        groups: groups.into_values().collect(),
    })
}

pub fn print_status(v: &ClusterView) {
    if v.healthy {
        println!("cluster {}: HEALTHY", v.cluster_id);
    } else {
        println!("cluster {}: DEGRADED", v.cluster_id);
        for p in &v.problems {
            println!("  ! {p}");
        }
    }
    println!();
    println!(
        "{:>4}  {:<22} {:<5} {:>8} {:>10} {:>12} {:>6} {:>8}",
        "NODE", "ADDRESS", "UP", "CHUNKS", "BYTES", "DISK FREE", "LEADS", "LAG"
    );
    for n in &v.nodes {
        println!(
            "{:>4}  {:<22} {:<5} {:>8} {:>10} {:>12} {:>6} {:>8}",
            n.id,
            n.address,
            if n.up { "yes" } else { "NO" },
            n.chunks,
            human(n.chunk_bytes),
            human(n.disk_free_bytes),
            n.leader_of,
            n.lag
        );
    }
    println!();
    println!(
        "{:>5}  {:>6} {:>6} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6}",
        "GROUP",
        "LEADER",
        "TERM",
        "MEMBERS",
        "APPLIED",
        "LAST LOG",
        "SNAPSHOT",
        "INODES",
        "SIZE",
        "INTENTS",
        "QUEUED"
    );
    for g in &v.groups {
        let members: Vec<String> = g.members.iter().map(u64::to_string).collect();
        println!(
            "{:>5}  {:>6} {:>6} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6}",
            g.id,
            g.leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            g.term,
            members.join(","),
            g.last_applied,
            g.last_log_index,
            g.snapshot_index,
            g.inodes,
            human(g.size_bytes),
            g.open_intents,
            g.queued_ref_batches
        );
    }
}

pub fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Mounts the cluster at `mountpoint` and serves it until SIGINT/SIGTERM,
/// then unmounts.
pub async fn mount_until_signal(
    cluster: Arc<crate::Cluster>,
    mountpoint: &Path,
    cache_bytes: usize,
    allow_other: bool,
) -> std::result::Result<(), MountError> {
    use fuser::MountOption;
    let fs = crate::Fs::new(cluster, cache_bytes);
    let shim = crate::fuse::MusicFuse::new(fs, tokio::runtime::Handle::current());
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("musicfs".into()),
        MountOption::Subtype("musicfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    if allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(2);
    let session = fuser::spawn_mount(shim, mountpoint, &cfg)
        .map_err(|e| MountError::Mount(mountpoint.display().to_string(), e))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(MountError::Signal)?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("unmounting {}", mountpoint.display());
    tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .map_err(|e| MountError::Unmount(std::io::Error::other(e)))?
        .map_err(MountError::Unmount)?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount at {0}: {1}")]
    Mount(String, #[source] std::io::Error),
    #[error("cannot watch for signals: {0}")]
    Signal(#[source] std::io::Error),
    #[error("unmount failed: {0}")]
    Unmount(#[source] std::io::Error),
}
