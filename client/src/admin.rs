//! Cluster administration used by the CLI: initialisation, status and the
//! mount helper.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::admin::admin_service_client::AdminServiceClient;
use proto::admin::{
    InitRequest, Peer, RepairStatus, SetStorageNodeRequest, StatusRequest, StatusResponse,
};
use proto::meta::StorageState;
use serde::Serialize;

use crate::error::{ClientError, Result};
use crate::{out, outln};

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
    let ep = crate::transport()
        .endpoint(addr)
        .map_err(|e| ClientError::Invalid(e.to_string()))?
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
        .map_err(|s| ClientError::from_status(addr, s))?
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
/// Settings fixed when a cluster is initialised.
#[derive(Clone, Copy, Debug)]
pub struct InitOptions {
    /// Metadata groups.
    pub groups: u32,
    /// Copies of every chunk.
    pub replication: u32,
    /// Seconds a layout commit may rely on a chunk-index answer (0: the
    /// default, an hour); garbage collection frees a chunk no sooner than
    /// about twice this after its last reference goes.
    pub commit_window_secs: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            groups: DEFAULT_GROUPS,
            replication: 3,
            commit_window_secs: 0,
        }
    }
}

pub async fn init_cluster(peers: &[Peer], opts: InitOptions) -> Result<String> {
    let InitOptions {
        groups,
        replication,
        commit_window_secs,
    } = opts;
    if groups == 0 || groups > 4096 {
        return Err(ClientError::Invalid("--groups must be 1..=4096".into()));
    }
    if replication == 0 || replication as usize > peers.len() {
        return Err(ClientError::Invalid(format!(
            "--replication must be 1..={} (the number of nodes)",
            peers.len()
        )));
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
        .init(crate::transport().request(InitRequest {
            cluster_id: cluster_id.clone(),
            peers: peers.to_vec(),
            group_count: groups,
            bootstrap: true,
            replication,
            commit_window_secs,
        }))
        .await
        .map_err(|s| ClientError::from_status(&first.addr, s))?
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
    /// The node's software version (empty when it does not answer): a
    /// rolling upgrade shows here.
    pub version: String,
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
pub struct StorageView {
    pub id: u64,
    pub address: String,
    /// active, draining or removed.
    pub state: String,
    /// Answered the probes of the node that reported (None: not reachable
    /// from here either).
    pub up: bool,
    pub chunks: Option<u64>,
    pub chunk_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
}

/// One line of `musicfs node list`: a metadata node (which also stores
/// chunks) or a storage-only node.
#[derive(Serialize, Debug)]
pub struct NodeListEntry {
    pub id: u64,
    pub address: String,
    /// "metadata+storage" or "storage".
    pub role: &'static str,
    /// Storage state: active, draining or removed.
    pub state: String,
    pub up: bool,
    pub chunks: Option<u64>,
    pub chunk_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    /// Groups it leads (metadata nodes).
    pub leads: usize,
    /// Empty when unknown (a storage-only node, or one that does not answer).
    pub version: String,
}

pub fn node_list(v: &ClusterView) -> Vec<NodeListEntry> {
    let mut out: Vec<NodeListEntry> = v
        .nodes
        .iter()
        .map(|n| {
            let st = v.storage.iter().find(|s| s.id == n.id);
            NodeListEntry {
                id: n.id,
                address: n.address.clone(),
                role: "metadata+storage",
                state: st.map_or_else(|| "active".to_string(), |s| s.state.clone()),
                up: n.up,
                chunks: n.up.then_some(n.chunks),
                chunk_bytes: n.up.then_some(n.chunk_bytes),
                disk_free_bytes: n.up.then_some(n.disk_free_bytes),
                leads: n.leader_of,
                version: n.version.clone(),
            }
        })
        .collect();
    for s in &v.storage {
        if out.iter().any(|n| n.id == s.id) {
            continue;
        }
        out.push(NodeListEntry {
            id: s.id,
            address: s.address.clone(),
            role: "storage",
            state: s.state.clone(),
            up: s.up,
            chunks: s.chunks,
            chunk_bytes: s.chunk_bytes,
            disk_free_bytes: s.disk_free_bytes,
            leads: 0,
            version: String::new(),
        });
    }
    out.sort_by_key(|n| n.id);
    out
}

pub fn print_node_list(list: &[NodeListEntry]) {
    outln!(
        "{:>4}  {:<22} {:<17} {:<9} {:<4} {:>8} {:>10} {:>10} {:>5}  VERSION",
        "NODE",
        "ADDRESS",
        "ROLE",
        "STATE",
        "UP",
        "CHUNKS",
        "BYTES",
        "DISK FREE",
        "LEADS"
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |b| b.to_string());
    let bytes = |v: Option<u64>| v.map_or_else(|| "-".to_string(), human);
    for n in list {
        outln!(
            "{:>4}  {:<22} {:<17} {:<9} {:<4} {:>8} {:>10} {:>10} {:>5}  {}",
            n.id,
            n.address,
            n.role,
            n.state,
            if n.up { "yes" } else { "NO" },
            opt(n.chunks),
            bytes(n.chunk_bytes),
            bytes(n.disk_free_bytes),
            n.leads,
            n.version
        );
    }
}

/// Repair over the whole cluster (each group's leader reports its groups).
#[derive(Serialize, Debug, Default)]
pub struct RepairView {
    pub under_replicated: u64,
    pub scanned: u64,
    pub total: u64,
    pub copied_chunks: u64,
    pub copied_bytes: u64,
    pub bytes_per_sec: u64,
    pub waiting_for_nodes: u64,
    pub unavailable: u64,
    pub eta_secs: u64,
    pub errors: Vec<String>,
}

impl RepairView {
    fn add(&mut self, node: u64, r: &RepairStatus) {
        self.under_replicated += r.under_replicated;
        self.scanned += r.scanned;
        self.total += r.total;
        self.copied_chunks += r.copied_chunks;
        self.copied_bytes += r.copied_bytes;
        self.bytes_per_sec += r.bytes_per_sec;
        self.waiting_for_nodes += r.waiting_for_nodes;
        self.unavailable += r.unavailable;
        self.eta_secs = self.eta_secs.max(r.eta_secs);
        if !r.last_error.is_empty() {
            self.errors.push(format!("node {node}: {}", r.last_error));
        }
    }
}

/// One background worker of one node.
#[derive(Serialize, Debug)]
pub struct WorkerView {
    pub node: u64,
    pub name: String,
    pub state: String,
    pub done: u64,
    pub total: u64,
    pub unit: String,
    pub bytes: u64,
    pub bytes_per_sec: u64,
    pub limit_bytes_per_sec: u64,
    pub eta_secs: u64,
    pub last_error: String,
}

#[derive(Serialize, Debug)]
pub struct ClusterView {
    pub cluster_id: String,
    pub healthy: bool,
    pub problems: Vec<String>,
    /// How the first node that answered is secured: "tls" or "plain".
    pub transport: &'static str,
    pub admin_token: bool,
    pub replication: u32,
    pub nodes: Vec<NodeView>,
    pub storage: Vec<StorageView>,
    pub repair: RepairView,
    pub workers: Vec<WorkerView>,
    pub groups: Vec<GroupView>,
}

fn state_name(s: StorageState) -> &'static str {
    match s {
        StorageState::StorageActive => "active",
        StorageState::StorageDraining => "draining",
        StorageState::StorageRemoved => "removed",
    }
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
                version: st.version.clone(),
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
                    version: String::new(),
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
    let mut repair = RepairView::default();
    let mut workers = Vec::new();
    for st in statuses.values().flatten() {
        if let Some(r) = &st.repair {
            repair.add(st.node_id, r);
        }
        workers.extend(st.workers.iter().map(|w| WorkerView {
            node: st.node_id,
            name: w.name.clone(),
            state: w.state.clone(),
            done: w.done,
            total: w.total,
            unit: w.unit.clone(),
            bytes: w.bytes,
            bytes_per_sec: w.bytes_per_sec,
            limit_bytes_per_sec: w.limit_bytes_per_sec,
            eta_secs: w.eta_secs,
            last_error: w.last_error.clone(),
        }));
    }
    let mut storage = Vec::new();
    for n in &first.storage_nodes {
        let own = match statuses.get(&n.node_id) {
            Some(r) => r.as_ref().ok().cloned(),
            // A storage-only node: ask it directly.
            None if n.state() != StorageState::StorageRemoved => node_status(&n.addr).await.ok(),
            None => None,
        };
        let up = first.storage_up.contains(&n.node_id) || own.is_some();
        if !up && n.state() != StorageState::StorageRemoved {
            problems.push(format!(
                "storage node {} at {} does not answer",
                n.node_id, n.addr
            ));
        }
        storage.push(StorageView {
            id: n.node_id,
            address: n.addr.clone(),
            state: state_name(n.state()).into(),
            up,
            chunks: own.as_ref().map(|s| s.chunk_count),
            chunk_bytes: own.as_ref().map(|s| s.chunk_bytes),
            disk_free_bytes: own.as_ref().map(|s| s.disk_free_bytes),
        });
    }
    if repair.unavailable > 0 {
        problems.push(format!(
            "{} chunk(s) have no reachable replica",
            repair.unavailable
        ));
    }
    // Fewer copies than promised is a risk even while nothing is lost.
    if repair.waiting_for_nodes > 0 {
        problems.push(format!(
            "{} chunk(s) cannot get {} copies: too few usable storage nodes (bring one back or add one)",
            repair.waiting_for_nodes, first.replication
        ));
    } else if repair.under_replicated > 0 {
        problems.push(format!(
            "{} chunk(s) have fewer than {} copies; repair is copying them{}",
            repair.under_replicated,
            first.replication,
            if repair.eta_secs > 0 {
                format!(" (about {} s left)", repair.eta_secs)
            } else {
                String::new()
            }
        ));
    }
    Ok(ClusterView {
        cluster_id: first.cluster_id,
        healthy: problems.is_empty(),
        problems,
        transport: if first.tls { "tls" } else { "plain" },
        admin_token: first.admin_token,
        replication: first.replication,
        nodes,
        storage,
        repair,
        workers,
        groups: groups.into_values().collect(),
    })
}

pub fn print_status(v: &ClusterView) {
    if v.healthy {
        outln!("cluster {}: HEALTHY", v.cluster_id);
    } else {
        outln!("cluster {}: DEGRADED", v.cluster_id);
        for p in &v.problems {
            outln!("  ! {p}");
        }
    }
    match (v.transport, v.admin_token) {
        ("tls", true) => {}
        ("tls", false) => outln!("  ! TLS without an admin token: client certificates may change the cluster"),
        _ => outln!(
            "  ! PLAIN TCP: not encrypted, clients not authenticated{} (see docs/OPERATIONS.md, \"Security\")",
            if v.admin_token { ", admin token in clear text" } else { ", no admin token" }
        ),
    }
    outln!();
    outln!(
        "{:>4}  {:<22} {:<5} {:>8} {:>10} {:>12} {:>6} {:>8}  VERSION",
        "NODE",
        "ADDRESS",
        "UP",
        "CHUNKS",
        "BYTES",
        "DISK FREE",
        "LEADS",
        "LAG"
    );
    for n in &v.nodes {
        outln!(
            "{:>4}  {:<22} {:<5} {:>8} {:>10} {:>12} {:>6} {:>8}  {}",
            n.id,
            n.address,
            if n.up { "yes" } else { "NO" },
            n.chunks,
            human(n.chunk_bytes),
            human(n.disk_free_bytes),
            n.leader_of,
            n.lag,
            n.version
        );
    }
    outln!();
    outln!(
        "STORAGE (replication {})\n{:>4}  {:<22} {:<9} {:<5} {:>8} {:>10} {:>12}",
        v.replication,
        "NODE",
        "ADDRESS",
        "STATE",
        "UP",
        "CHUNKS",
        "BYTES",
        "DISK FREE"
    );
    let opt = |v: Option<u64>, f: fn(u64) -> String| v.map(f).unwrap_or_else(|| "-".into());
    for n in &v.storage {
        outln!(
            "{:>4}  {:<22} {:<9} {:<5} {:>8} {:>10} {:>12}",
            n.id,
            n.address,
            n.state,
            if n.up { "yes" } else { "NO" },
            opt(n.chunks, |c| c.to_string()),
            opt(n.chunk_bytes, human),
            opt(n.disk_free_bytes, human),
        );
    }
    outln!();
    print_repair(&v.repair);
    outln!();
    outln!(
        "BACKGROUND WORK\n{:>4}  {:<7} {:<18} {:>22} {:>11} {:>11} {:>8} {:>10}",
        "NODE",
        "WORKER",
        "STATE",
        "PROGRESS",
        "RATE",
        "LIMIT",
        "ETA",
        "MOVED"
    );
    for w in &v.workers {
        let progress = if w.total > 0 {
            format!("{}/{}", w.done, w.total)
        } else {
            "-".into()
        };
        outln!(
            "{:>4}  {:<7} {:<18} {:>22} {:>11} {:>11} {:>8} {:>10}",
            w.node,
            w.name,
            w.state,
            progress,
            format!("{}/s", human(w.bytes_per_sec)),
            proto::display::limit(w.limit_bytes_per_sec),
            proto::display::eta(w.eta_secs),
            human(w.bytes)
        );
        if !w.last_error.is_empty() {
            outln!("        last error: {}", w.last_error);
        }
    }
    outln!();
    print_groups(&v.groups);
}

/// The repair summary line and its notes.
pub fn print_repair(r: &RepairView) {
    out!(
        "repair: {} under-replicated, full pass {}/{} records, {} copies ({}) done, {}/s",
        r.under_replicated,
        r.scanned,
        r.total,
        r.copied_chunks,
        human(r.copied_bytes),
        human(r.bytes_per_sec)
    );
    if r.eta_secs > 0 {
        out!(", ETA {}s", r.eta_secs);
    }
    outln!();
    if r.waiting_for_nodes > 0 {
        outln!(
            "  {} chunk(s) wait for a usable node to copy to (fewer usable nodes than the replication factor)",
            r.waiting_for_nodes
        );
    }
    for e in &r.errors {
        outln!("  last error: {e}");
    }
}

/// One line per Raft group.
pub fn print_groups(groups: &[GroupView]) {
    outln!(
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
    for g in groups {
        let members: Vec<String> = g.members.iter().map(u64::to_string).collect();
        outln!(
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

pub use proto::display::human;

/// Adds, drains or removes a storage node through any node of the cluster.
/// Returns the chunk records that still list the node (drain, remove).
pub async fn set_storage_node(
    seeds: &[String],
    node_id: u64,
    addr: &str,
    state: StorageState,
) -> Result<u64> {
    let mut errors = Vec::new();
    for s in seeds {
        let mut c = match admin(s).await {
            Ok(c) => c,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let r = c
            .set_storage_node(crate::transport().request(SetStorageNodeRequest {
                node_id,
                addr: addr.to_string(),
                state: state as i32,
            }))
            .await
            .map_err(|st| ClientError::from_status(s, st))?
            .into_inner();
        return match r.error {
            Some(e) => Err(ClientError::Server(e)),
            None => Ok(r.chunks_remaining),
        };
    }
    Err(ClientError::Connect(errors.join("; ")))
}

/// Garbage collection over the cluster: each metadata node reports the
/// groups it leads. Unless `dry_run`, each also runs a pass now.
pub async fn gc(seeds: &[String], dry_run: bool) -> Result<proto::admin::GcStatus> {
    let mut total = proto::admin::GcStatus::default();
    let mut errors = Vec::new();
    let first = cluster_status(seeds).await?;
    for n in &first.nodes {
        if !n.up {
            errors.push(format!("node {} does not answer", n.id));
            continue;
        }
        let r = async {
            admin(&n.address)
                .await?
                .gc(crate::transport().request(proto::admin::GcRequest { dry_run }))
                .await
                .map_err(|s| ClientError::from_status(&n.address, s))
        }
        .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                total.reclaimable_chunks += r.reclaimable_chunks;
                total.reclaimable_bytes += r.reclaimable_bytes;
                total.waiting_chunks += r.waiting_chunks;
                total.waiting_bytes += r.waiting_bytes;
                total.reaped_chunks += r.reaped_chunks;
                total.deleted_files += r.deleted_files;
                total.deleted_bytes += r.deleted_bytes;
                total.settled_groups += r.settled_groups;
                total.led_groups += r.led_groups;
                if !r.last_error.is_empty() {
                    errors.push(format!("node {}: {}", n.id, r.last_error));
                }
            }
            // A refusal is the caller's to fix, not a node's failure.
            Err(e @ ClientError::Denied(_)) => return Err(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    total.last_error = errors.join("; ");
    Ok(total)
}

/// Hands the leadership of `group` to node `to` and waits until `to`
/// reports itself leader (at most 10 s); `to` keeps it against automatic
/// balancing for ten minutes. Also when `to` already leads.
pub async fn transfer_leader(seeds: &[String], group: u32, to: u64) -> Result<()> {
    let view = cluster_status(seeds).await?;
    let g = view.groups.iter().find(|g| g.id == group).ok_or_else(|| {
        ClientError::Invalid(format!(
            "there is no group {group} (groups 0 to {})",
            view.groups.len().saturating_sub(1)
        ))
    })?;
    if !g.members.contains(&to) {
        return Err(ClientError::Invalid(format!(
            "node {to} is not a voter of group {group} (voters: {:?})",
            g.members
        )));
    }
    if g.leader.is_none() {
        return Err(ClientError::Unavailable(format!(
            "group {group} has no leader now (an election is under way, or a majority is down); try again"
        )));
    }
    let addr_of = |id: u64| {
        view.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.address.clone())
            .ok_or_else(|| ClientError::Invalid(format!("node {id} is not a metadata node")))
    };
    let to_addr = addr_of(to)?;
    // The target asks the leader itself, holding the leadership it gets
    // against automatic balancing for a while.
    let r = admin(&to_addr)
        .await?
        .transfer_leader(
            crate::transport().request(proto::admin::TransferLeaderRequest {
                group_id: group,
                to_node: to,
            }),
        )
        .await
        .map_err(|s| ClientError::from_status(&to_addr, s))?
        .into_inner();
    if let Some(e) = r.error {
        return Err(ClientError::Server(e));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(st) = node_status(&to_addr).await {
            if st
                .groups
                .iter()
                .any(|g| g.group_id == group && g.state == "leader")
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Unavailable(format!(
                "node {to} has not taken over group {group} within 10 s; `musicfs group list` shows who leads"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks every metadata node to snapshot each of its groups (and so
/// compact their logs); returns, per node, None or why it failed.
pub async fn snapshot_all(seeds: &[String]) -> Result<Vec<(u64, String, Option<String>)>> {
    let view = cluster_status(seeds).await?;
    let mut out = Vec::new();
    for n in &view.nodes {
        let r = async {
            let r = admin(&n.address)
                .await?
                .trigger_snapshot(crate::transport().request(proto::admin::SnapshotRequest {}))
                .await
                .map_err(|s| ClientError::from_status(&n.address, s))?
                .into_inner();
            match r.error {
                Some(e) => Err(ClientError::Server(e)),
                None => Ok(()),
            }
        }
        .await;
        if let Err(e @ ClientError::Denied(_)) = r {
            return Err(e);
        }
        out.push((n.id, n.address.clone(), r.err().map(|e| e.to_string())));
    }
    Ok(out)
}

/// Capacity and use of one node's data disk.
#[derive(Serialize, Debug)]
pub struct DfView {
    pub node: u64,
    pub address: String,
    /// None when the node did not answer.
    pub error: Option<String>,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// Disk capacity and use of every node (metadata and storage).
pub async fn df(seeds: &[String]) -> Result<Vec<DfView>> {
    let mut out = Vec::new();
    for (id, addr) in all_nodes(seeds).await? {
        let (error, st) = match node_status(&addr).await {
            Ok(st) => (None, st),
            Err(e) => (Some(e.to_string()), StatusResponse::default()),
        };
        out.push(DfView {
            node: id,
            address: addr,
            error,
            disk_total_bytes: st.disk_total_bytes,
            disk_free_bytes: st.disk_free_bytes,
            chunks: st.chunk_count,
            chunk_bytes: st.chunk_bytes,
        });
    }
    Ok(out)
}

/// Every node of the cluster (metadata and storage) by id and address.
async fn all_nodes(seeds: &[String]) -> Result<BTreeMap<u64, String>> {
    let mut errors = Vec::new();
    for s in seeds {
        match node_status(s).await {
            Ok(st) if !st.cluster_id.is_empty() => {
                let mut nodes: BTreeMap<u64, String> = st
                    .peers
                    .iter()
                    .map(|p| (p.node_id, p.addr.clone()))
                    .collect();
                for n in &st.storage_nodes {
                    if n.state() != StorageState::StorageRemoved {
                        nodes.insert(n.node_id, n.addr.clone());
                    }
                }
                return Ok(nodes);
            }
            Ok(_) => errors.push(format!("{s}: not initialised")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(ClientError::Connect(errors.join("; ")))
}

/// Starts a scrub on every node; returns the nodes that could not be asked.
pub async fn scrub_start(seeds: &[String]) -> Result<Vec<String>> {
    let mut failed = Vec::new();
    for (id, addr) in all_nodes(seeds).await? {
        let r = match admin(&addr).await {
            Ok(mut c) => match c
                .scrub(crate::transport().request(proto::admin::ScrubRequest {}))
                .await
            {
                Ok(_) => Ok(()),
                Err(s) => match ClientError::from_status(&addr, s) {
                    e @ ClientError::Denied(_) => return Err(e),
                    e => Err(e.to_string()),
                },
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            failed.push(format!("node {id} at {addr}: {e}"));
        }
    }
    Ok(failed)
}

#[derive(Serialize, Debug)]
pub struct ScrubView {
    pub node: u64,
    pub address: String,
    /// None when the node did not answer.
    pub status: Option<ScrubNodeView>,
}

#[derive(Serialize, Debug)]
pub struct ScrubNodeView {
    pub phase: String,
    /// Every scrub asked of this node has finished.
    pub done: bool,
    pub local_progress_pct: f64,
    pub verified_chunks: u64,
    pub verified_bytes: u64,
    pub corrupt: u64,
    pub records_checked: u64,
    pub missing: u64,
    pub finished_at_ms: u64,
}

/// The scrub progress of every node.
pub async fn scrub_status(seeds: &[String]) -> Result<Vec<ScrubView>> {
    let mut out = Vec::new();
    for (id, addr) in all_nodes(seeds).await? {
        let status = node_status(&addr)
            .await
            .ok()
            .and_then(|st| st.scrub)
            .map(|s| ScrubNodeView {
                done: s.phase == "idle"
                    && s.local_done >= s.requested
                    && s.finished_at_ms >= s.requested_at_ms,
                phase: s.phase,
                local_progress_pct: f64::from(s.leaves_done) * 100.0 / 65536.0,
                verified_chunks: s.verified_chunks,
                verified_bytes: s.verified_bytes,
                corrupt: s.corrupt,
                records_checked: s.records_checked,
                missing: s.missing,
                finished_at_ms: s.finished_at_ms,
            });
        out.push(ScrubView {
            node: id,
            address: addr,
            status,
        });
    }
    Ok(out)
}

/// How a mount caches and reads.
pub struct MountOptions {
    /// Memory for chunks (read and read-ahead).
    pub cache_bytes: usize,
    pub allow_other: bool,
    pub views: Option<crate::views::Views>,
    /// How long the kernel caches attributes and entries.
    pub attr_timeout: Duration,
    /// A directory that keeps chunks across remounts, and its size.
    pub disk_cache: Option<(PathBuf, u64)>,
    /// The kernel's read-ahead for the mount (0 keeps the kernel's).
    pub read_ahead_kib: u32,
    /// Reads bypass the kernel's page cache (every read reaches the
    /// client; for comparison in benchmarks).
    pub direct_io: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_bytes: crate::fs::DEFAULT_CACHE_BYTES,
            allow_other: false,
            views: None,
            attr_timeout: crate::fuse::ATTR_TTL,
            disk_cache: None,
            read_ahead_kib: DEFAULT_READ_AHEAD_KIB,
            direct_io: false,
        }
    }
}

/// The kernel read-ahead a mount asks for: large enough that a sequential
/// reader sends 1 MiB requests, several at once (docs/BENCHMARKS.md).
pub const DEFAULT_READ_AHEAD_KIB: u32 = 4096;

/// Sets the kernel's read-ahead of the file system mounted at `mountpoint`
/// (its backing device's `read_ahead_kb`; FUSE can only lower it at init).
pub fn set_read_ahead(mountpoint: &Path, kib: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(&path, kib.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Mounts the cluster at `mountpoint` and serves it until SIGINT/SIGTERM,
/// then unmounts.
pub async fn mount_until_signal(
    cluster: Arc<crate::Cluster>,
    mountpoint: &Path,
    opts: MountOptions,
) -> std::result::Result<(), MountError> {
    use fuser::MountOption;
    let fs = crate::Fs::new(cluster, opts.cache_bytes);
    if let Some((dir, bytes)) = &opts.disk_cache {
        let dc = crate::diskcache::DiskCache::open(dir, *bytes)?;
        tracing::info!(dir = %dir.display(), chunks = dc.len(), bytes = dc.used(), "disk cache opened");
        fs.enable_disk_cache(dc);
    }
    if let Some(v) = opts.views {
        fs.enable_views(v);
    }
    // A tag editor writing through the mount keeps `musicfs search` current.
    fs.keep_tags_current(true);
    let shim = crate::fuse::MusicFuse::new(fs, tokio::runtime::Handle::current())
        .with_ttl(opts.attr_timeout)
        .with_direct_io(opts.direct_io);
    let notifier = shim.notifier_slot();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("musicfs".into()),
        MountOption::Subtype("musicfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(2);
    let session = fuser::spawn_mount(shim, mountpoint, &cfg)
        .map_err(|e| MountError::Mount(mountpoint.display().to_string(), e))?;
    let _ = notifier.set(session.notifier());
    if opts.read_ahead_kib > 0 {
        if let Err(e) = set_read_ahead(mountpoint, opts.read_ahead_kib) {
            // Not root, or no sysfs: the kernel's default read-ahead
            // (128 KiB) still works, in smaller requests.
            tracing::warn!(error = %e, "cannot set the mount's read-ahead");
        }
    }
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
    #[error(transparent)]
    DiskCache(#[from] crate::diskcache::DiskCacheError),
    #[error("unmount failed: {0}")]
    Unmount(#[source] std::io::Error),
}
