//! Connections to the cluster: discovery, per-group leader routing that
//! follows `NotLeader` hints, deadlines, and retries with exponential backoff
//! and jitter.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use proto::admin::admin_service_client::AdminServiceClient;
use proto::admin::{StatusRequest, StatusResponse};
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::{
    Command, CommandResult, ErrorCode, ProposeRequest, Query, QueryRequest, QueryResult, Receipt,
    StorageState, Timespec,
};
use proto::storage::chunk_service_client::ChunkServiceClient;
use proto::storage::{GetChunkRequest, PutChunkRequest};
use proto::{placement, ChunkId, FORMAT_VERSION, MAX_MESSAGE_BYTES};
use tonic::transport::Channel;

use crate::direct::DirectPut;
use crate::error::{ClientError, Result};

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Addresses (`host:port`) of one or more nodes.
    pub seeds: Vec<String>,
    /// How long an operation keeps retrying before it fails with EIO.
    pub deadline: Duration,
    /// Timeout of a single RPC (a chunk transfer).
    pub rpc_timeout: Duration,
    /// How long one metadata query may go unanswered before the client
    /// tries another node (a partitioned leader never answers). Commands
    /// wait out `rpc_timeout`.
    pub attempt_timeout: Duration,
    /// Local address to connect from (default: the system's choice).
    pub local_address: Option<std::net::IpAddr>,
    /// TLS credentials and admin token (default: this process's).
    pub transport: proto::transport::Transport,
    /// Read and upload chunks over the direct protocol where the cluster
    /// has no TLS (`proto::chunkwire`); off, every chunk transfer is a gRPC
    /// call.
    pub direct_chunks: bool,
}

impl ClusterConfig {
    pub fn new(seeds: Vec<String>) -> Self {
        ClusterConfig {
            seeds,
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            local_address: None,
            transport: crate::transport(),
            direct_chunks: true,
        }
    }
}

/// Parses `host:port[,host:port...]`.
pub fn parse_seeds(s: &str) -> Result<Vec<String>> {
    let seeds: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if seeds.is_empty() {
        return Err(ClientError::Invalid("no cluster address given".into()));
    }
    for s in &seeds {
        if s.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(ClientError::Invalid(format!(
                "cluster address {s:?} is not HOST:PORT"
            )));
        }
    }
    Ok(seeds)
}

pub struct Cluster {
    cfg: ClusterConfig,
    /// Identifies this client's commands for retry deduplication.
    client_id: u64,
    next_seq: std::sync::atomic::AtomicU64,
    in_flight: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    peers: RwLock<BTreeMap<u64, String>>,
    group_count: RwLock<u32>,
    leaders: RwLock<HashMap<u32, u64>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Nodes that failed a call, and when: writes do not wait for them
    /// once a quorum is in, reads try them last, metadata calls without a
    /// known leader go to them last. A background probe clears a node
    /// that answers again.
    suspects: Mutex<HashMap<u64, Instant>>,
    /// Smoothed time of a chunk read (µs): a read slower than a few times
    /// this is hedged on another replica.
    read_latency_us: std::sync::atomic::AtomicU64,
    /// Storage nodes (group 0's record) and the cluster's replication factor.
    storage: RwLock<Storage>,
    /// When on, every metadata answer as (group, node), for tools that
    /// must say which node said what (the chaos tests' histories).
    answers: Mutex<Option<Vec<(u32, u64)>>>,
    /// Bytes of chunk data this client stored (each chunk counted once,
    /// not per replica): what an import sent after deduplication.
    chunk_bytes_sent: std::sync::atomic::AtomicU64,
    /// Direct chunk transfers, when the cluster is reached without TLS.
    direct: Option<Arc<crate::direct::DirectChunks>>,
    /// Commands of this client started plus commands ended (see
    /// [`Self::command_count`]).
    commands: std::sync::atomic::AtomicU64,
}

/// Counts a command's end, also when its caller gives up on it.
struct CommandEnd<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for CommandEnd<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a chunk was stored: the nodes that hold it durably, and their
/// receipts, which the layout commit carries to the chunk index.
#[derive(Clone, Debug, Default)]
pub struct Placed {
    pub nodes: Vec<u64>,
    pub receipts: Vec<Receipt>,
}

#[derive(Clone, Debug, Default)]
pub struct Storage {
    /// Every storage node not removed: id → (address, state).
    pub nodes: BTreeMap<u64, (String, StorageState)>,
    pub replication: usize,
    /// How long a layout commit may rely on a chunk-index answer.
    pub commit_window: Duration,
}

impl Storage {
    /// Nodes that take new chunks, in the order `id` prefers them.
    fn targets(&self, id: &ChunkId) -> Vec<u64> {
        placement(
            id,
            self.nodes
                .iter()
                .filter(|(_, (_, s))| *s == StorageState::StorageActive)
                .map(|(n, _)| *n),
        )
    }
}

/// How often a client re-reads the cluster's members.
const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// How long a failed node stays suspect when no probe reaches it either
/// (probes clear it sooner once it answers).
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// How often suspect nodes are probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bounds of the delay after which a chunk read is sent to a second
/// replica too.
const HEDGE_MIN: Duration = Duration::from_millis(100);
const HEDGE_MAX: Duration = Duration::from_millis(500);

/// A request id in flight; dropping it lets the cluster forget the reply
/// of the command sent under it (see [`Cluster::request_id`]).
#[derive(Debug)]
pub struct RequestId {
    seq: u64,
    in_flight: Arc<Mutex<std::collections::BTreeSet<u64>>>,
}

impl Drop for RequestId {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.seq);
    }
}

impl Cluster {
    /// Connects to whichever seed answers first and learns the members.
    pub async fn connect(cfg: ClusterConfig) -> Result<Arc<Self>> {
        let cluster = Arc::new(Cluster {
            client_id: rand::random::<u64>().max(1),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            in_flight: Arc::new(Mutex::new(std::collections::BTreeSet::new())),
            peers: RwLock::new(BTreeMap::new()),
            group_count: RwLock::new(1),
            leaders: RwLock::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            read_latency_us: std::sync::atomic::AtomicU64::new(0),
            storage: RwLock::new(Storage::default()),
            answers: Mutex::new(None),
            chunk_bytes_sent: std::sync::atomic::AtomicU64::new(0),
            commands: std::sync::atomic::AtomicU64::new(0),
            direct: (cfg.direct_chunks && !cfg.transport.is_tls()).then(|| {
                Arc::new(crate::direct::DirectChunks::new(
                    cfg.local_address,
                    cfg.rpc_timeout,
                ))
            }),
            cfg,
        });
        cluster.refresh().await?;
        // Keep up with nodes added, drained and removed; stops when the
        // client is dropped.
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_EVERY).await;
                let Some(c) = weak.upgrade() else { return };
                let _ = c.refresh_once().await;
            }
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(c) = weak.upgrade() else { return };
                c.probe_suspects().await;
            }
        });
        Ok(cluster)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Starts recording which node answered each metadata call.
    pub fn trace_answers(&self) {
        *self.answers.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// The (group, node) answers recorded since the last call.
    pub fn take_answers(&self) -> Vec<(u32, u64)> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Re-reads membership from any reachable node.
    pub async fn refresh(&self) -> Result<StatusResponse> {
        let start = Instant::now();
        let mut errors = Vec::new();
        let mut backoff = backoff();
        loop {
            let mut candidates: Vec<String> = self.peers().into_values().collect();
            for s in &self.cfg.seeds {
                if !candidates.contains(s) {
                    candidates.push(s.clone());
                }
            }
            for addr in &candidates {
                match self.status_of(addr).await {
                    // A node of a cluster still being initialised may not
                    // know the number of groups yet (0): ask again.
                    Ok(st)
                        if st.error.is_none()
                            && !st.cluster_id.is_empty()
                            && st.group_count > 0 =>
                    {
                        let peers: BTreeMap<u64, String> = st
                            .peers
                            .iter()
                            .map(|p| (p.node_id, p.addr.clone()))
                            .collect();
                        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
                        *self.group_count.write().unwrap_or_else(|e| e.into_inner()) =
                            st.group_count;
                        self.set_storage(&st);
                        let mut leaders = self.leaders.write().unwrap_or_else(|e| e.into_inner());
                        for g in &st.groups {
                            if g.leader_id != 0 {
                                leaders.insert(g.group_id, g.leader_id);
                            }
                        }
                        return Ok(st);
                    }
                    Ok(st) => errors.push(format!(
                        "{addr}: {}",
                        st.error.map(|e| e.to_string()).unwrap_or_else(|| {
                            if st.cluster_id.is_empty() {
                                "node is not part of an initialised cluster".into()
                            } else {
                                "the cluster's initialisation has not finished on this node".into()
                            }
                        })
                    )),
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
            if start.elapsed() >= self.cfg.deadline {
                errors.dedup();
                return Err(ClientError::Connect(format!(
                    "no node answered within {:?} ({})",
                    self.cfg.deadline,
                    errors.join("; ")
                )));
            }
            errors.clear();
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
        }
    }

    /// One round of `refresh` over the known members, without retrying.
    async fn refresh_once(&self) -> Result<()> {
        for addr in self.peers().values() {
            if let Ok(st) = self.status_of(addr).await {
                if st.error.is_none() && !st.cluster_id.is_empty() {
                    self.set_storage(&st);
                    return Ok(());
                }
            }
        }
        Err(ClientError::Unavailable("no member answered".into()))
    }

    fn set_storage(&self, st: &StatusResponse) {
        let mut nodes: BTreeMap<u64, (String, StorageState)> = st
            .storage_nodes
            .iter()
            .filter(|n| n.state() != StorageState::StorageRemoved)
            .map(|n| (n.node_id, (n.addr.clone(), n.state())))
            .collect();
        if nodes.is_empty() {
            // Not recorded yet: every metadata node stores chunks.
            nodes = st
                .peers
                .iter()
                .map(|p| (p.node_id, (p.addr.clone(), StorageState::StorageActive)))
                .collect();
        }
        let replication = if st.replication == 0 {
            proto::DEFAULT_REPLICATION as usize
        } else {
            st.replication as usize
        };
        let window = match st.commit_window_secs {
            0 => proto::DEFAULT_COMMIT_WINDOW_SECS,
            w => w,
        };
        *self.storage.write().unwrap_or_else(|e| e.into_inner()) = Storage {
            nodes,
            replication,
            commit_window: Duration::from_secs(u64::from(window)),
        };
    }

    /// The storage nodes this client knows.
    pub fn storage(&self) -> Storage {
        self.storage
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn status_of(&self, addr: &str) -> Result<StatusResponse> {
        let ch = self.channel(addr)?;
        let mut c = AdminServiceClient::new(ch);
        let r = tokio::time::timeout(self.cfg.attempt_timeout, c.status(StatusRequest {}))
            .await
            .map_err(|_| ClientError::Unavailable(format!("{addr}: status timed out")))?
            .map_err(|s| ClientError::Unavailable(format!("{addr}: {}", s.message())))?;
        Ok(r.into_inner())
    }

    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn group_count(&self) -> u32 {
        *self.group_count.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn channel(&self, addr: &str) -> Result<Channel> {
        let mut chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = chans.get(addr) {
            return Ok(c.clone());
        }
        let ep = self
            .cfg
            .transport
            .endpoint(addr)
            .map_err(|e| ClientError::Invalid(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .local_address(self.cfg.local_address)
            .timeout(self.cfg.rpc_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(proto::CONNECTION_WINDOW_BYTES)
            // Chunks arrive in large frames: fewer frames, less work per byte.
            .max_frame_size(proto::MAX_FRAME_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = ep.connect_lazy();
        chans.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn meta_client(&self, addr: &str) -> Result<MetaServiceClient<Channel>> {
        Ok(MetaServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    pub fn chunk_client(&self, addr: &str) -> Result<ChunkServiceClient<Channel>> {
        Ok(ChunkServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The node to try next for `group`: the cached leader, else the
    /// `attempt`-th peer.
    fn target(&self, group: u32, attempt: usize) -> Option<(u64, String)> {
        let peers = self.peers();
        let cached = self
            .leaders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .copied();
        // A cached leader that just failed another call (of any group) is
        // skipped: a partitioned node would make every group it led wait
        // out a timeout of its own.
        if let Some(l) = cached.filter(|l| !self.is_suspect(*l)) {
            if let Some(a) = peers.get(&l) {
                return Some((l, a.clone()));
            }
        }
        let n = peers.len();
        if n == 0 {
            return None;
        }
        // Without a known leader, go round the members, those that failed
        // recently last.
        let mut order: Vec<(u64, String)> = peers.into_iter().collect();
        order.sort_by_key(|(id, _)| self.is_suspect(*id));
        order.into_iter().nth(attempt % n)
    }

    /// The node this client sends `group`'s calls to first, if it knows one.
    pub fn cached_leader(&self, group: u32) -> Option<u64> {
        self.leaders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .copied()
    }

    fn remember_leader(&self, group: u32, node: u64) {
        let known = self
            .leaders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .copied();
        if known != Some(node) {
            self.set_leader(group, Some(node));
        }
    }

    fn set_leader(&self, group: u32, leader: Option<u64>) {
        let mut l = self.leaders.write().unwrap_or_else(|e| e.into_inner());
        match leader {
            Some(id) if id != 0 => l.insert(group, id),
            _ => l.remove(&group),
        };
    }

    /// Runs `call` against the leader of `group`, following leader hints and
    /// retrying transient failures until the deadline.
    async fn with_leader<T, F, Fut>(
        &self,
        group: u32,
        what: &str,
        attempt_timeout: Duration,
        call: F,
    ) -> Result<T>
    where
        F: Fn(MetaServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
        T: HasError,
    {
        let start = Instant::now();
        let mut backoff = backoff();
        let mut last = String::from("no attempt made");
        let mut hints_in_a_row = 0u32;
        for attempt in 0usize.. {
            let Some((node, addr)) = self.target(group, attempt) else {
                last = "no known cluster members".into();
                break;
            };
            let mut hinted = false;
            let reason: &'static str;
            let answer = tokio::time::timeout(attempt_timeout, call(self.meta_client(&addr)?))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(format!(
                        "no answer within {attempt_timeout:?}"
                    )))
                });
            match answer {
                Ok(r) => match r.error() {
                    None => {
                        self.note_node(node, true);
                        // The node that answered leads: remember it, or
                        // every later call would start with whichever node
                        // comes first (dead, perhaps) and back off.
                        self.remember_leader(group, node);
                        if let Some(v) = self
                            .answers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_mut()
                        {
                            v.push((group, node));
                        }
                        return Ok(r);
                    }
                    Some(e) if e.code() == ErrorCode::NotLeader => {
                        reason = "not_leader";
                        last = format!("node {node} ({addr}): {e}");
                        // A hint naming a node that just failed us is
                        // likely stale (a leader cut off by a partition
                        // that the others have not yet replaced): look
                        // among the others until one is elected.
                        hinted = e.leader_id != 0
                            && e.leader_id != node
                            && !self.is_suspect(e.leader_id);
                        self.set_leader(group, Some(e.leader_id).filter(|_| hinted));
                        if !hinted {
                            // No leader known there: try another node next.
                            self.set_leader(group, None);
                        }
                    }
                    Some(e) if e.code() == ErrorCode::Unavailable => {
                        reason = "unavailable";
                        last = format!("node {node} ({addr}): {e}");
                        self.set_leader(group, None);
                    }
                    Some(e) if e.code() == ErrorCode::Busy => {
                        // A cross-shard operation holds the key: it resolves
                        // within milliseconds (or recovery takes it over).
                        reason = "busy";
                        last = format!("node {node} ({addr}): {e}");
                    }
                    Some(e) => return Err(ClientError::Server(e.clone())),
                },
                Err(s) => {
                    reason = "transport";
                    last = format!("node {node} ({addr}): {}", s.message());
                    tracing::debug!(group, node, %addr, error = %s.message(), "{what} failed");
                    self.note_node(node, false);
                    self.set_leader(group, None);
                }
            }
            if start.elapsed() >= self.cfg.deadline {
                break;
            }
            crate::metrics::retry(reason);
            hints_in_a_row = if hinted { hints_in_a_row + 1 } else { 0 };
            // Follow a fresh hint at once; back off when hints go in circles
            // (an election in progress) or there is none.
            if !hinted || hints_in_a_row > 2 {
                let d = backoff.next().unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(d.min(self.cfg.deadline.saturating_sub(start.elapsed()))).await;
            }
        }
        tracing::warn!(group, error = %last, "{what} gave up after {:?}", start.elapsed());
        Err(ClientError::Unavailable(format!(
            "{what} on group {group} failed for {:?}: {last}",
            start.elapsed()
        )))
    }

    /// Replicates a command through the group's Raft log. Retries carry the
    /// same request id, so a command applies once even if a reply is lost.
    pub async fn propose(&self, group: u32, op: proto::meta::command::Op) -> Result<CommandResult> {
        let id = self.request_id();
        self.propose_as(&id, group, op).await
    }

    /// The tag of a chunk transfer in the nodes' logs: this client's id and
    /// a number from the same sequence as its commands, so one grep for
    /// the client finds both.
    fn transfer_tag(&self) -> String {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        proto::request_tag(self.client_id, seq)
    }

    /// A request id for a command that may have to be sent again after
    /// its call failed without a definite answer (a layout commit the
    /// client retries later). While the id lives, the cluster keeps the
    /// command's reply, so sending the same command under it again
    /// returns that reply instead of applying the command twice.
    pub fn request_id(&self) -> RequestId {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq);
        RequestId {
            seq,
            in_flight: self.in_flight.clone(),
        }
    }

    /// Replicates `op` under the request id `id` (see [`Self::request_id`]).
    pub async fn propose_as(
        &self,
        id: &RequestId,
        group: u32,
        op: proto::meta::command::Op,
    ) -> Result<CommandResult> {
        self.commands
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _end = CommandEnd(&self.commands);
        // The cluster forgets replies below the oldest id still in flight.
        let acked_below = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .copied()
            .unwrap_or(id.seq);
        let req = ProposeRequest {
            group_id: group,
            command: Some(Command {
                version: FORMAT_VERSION,
                now: Some(Timespec::now()),
                client_id: self.client_id,
                request_seq: id.seq,
                acked_below,
                // The node that proposes it sets where it comes from.
                origin: 0,
                op: Some(op),
            }),
        };
        let res = self
            // A command may be slow to commit (a node's disk stalls) yet
            // apply: sending it again sooner would race a second run of it
            // (deduplicated, but cross-shard runs are costly); a command
            // waits out the whole RPC timeout.
            .with_leader(group, "propose", self.cfg.rpc_timeout, |mut c| {
                let req = req.clone();
                async move { c.propose(req).await.map(|r| r.into_inner()) }
            })
            .await;
        if let Err(e) = &res {
            // The nodes' log lines about this request carry the same tag.
            tracing::debug!(req = %proto::request_tag(self.client_id, id.seq), group, error = %e, "propose failed");
        }
        res
    }

    /// Commands of this client started plus commands ended: a caller that
    /// reads it before and after its own command and finds it grown by
    /// exactly two knows no other command of this client ran meanwhile,
    /// and as long as it stays at that value, none has since.
    pub fn command_count(&self) -> u64 {
        self.commands.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This client's id in the cluster's request table.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// A linearizable read from the group's leader.
    pub async fn query(&self, group: u32, q: proto::meta::query::Q) -> Result<QueryResult> {
        let req = QueryRequest {
            group_id: group,
            query: Some(Query { q: Some(q) }),
        };
        self.with_leader(group, "query", self.cfg.attempt_timeout, |mut c| {
            let req = req.clone();
            async move { c.query(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Records that `node` answered (`ok`) or failed a call.
    fn note_node(&self, node: u64, ok: bool) {
        let mut s = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            s.remove(&node);
        } else if s.insert(node, Instant::now()).is_none() {
            tracing::info!(
                node,
                "node failed a call: trying it last until it answers a probe"
            );
        }
    }

    /// Nodes this client currently avoids.
    pub fn suspects(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, t)| t.elapsed() < SUSPECT_FOR)
            .map(|(n, _)| *n)
            .collect();
        v.sort_unstable();
        v
    }

    /// Asks every suspect node whether it answers again (an empty `Has`
    /// on its chunk service, or a status call for a metadata-only
    /// member), and clears those that do.
    async fn probe_suspects(&self) {
        let storage = self.storage();
        let peers = self.peers();
        for node in self.suspects() {
            let ok = if let Some((addr, _)) = storage.nodes.get(&node) {
                let Ok(mut c) = self.chunk_client(addr) else {
                    continue;
                };
                let req = proto::storage::HasChunksRequest { chunk_ids: vec![] };
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, c.has(req)).await,
                    Ok(Ok(_))
                )
            } else if let Some(addr) = peers.get(&node) {
                let Ok(mut c) = self.channel(addr).map(AdminServiceClient::new) else {
                    continue;
                };
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, c.status(StatusRequest {})).await,
                    Ok(Ok(_))
                )
            } else {
                true
            };
            if ok {
                tracing::info!(node, "node answers again");
                self.note_node(node, true);
            }
        }
    }

    fn is_suspect(&self, node: u64) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
    }

    /// Bytes of chunk data stored by this client so far (once per chunk).
    pub fn chunk_bytes_sent(&self) -> u64 {
        self.chunk_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a chunk on the storage nodes the chunk prefers
    /// (`proto::placement`), moving on to the next ones when a node fails
    /// or is full. Succeeds once a majority of the replication factor holds
    /// it durably; returns the nodes that do and their receipts.
    pub async fn put_chunk(&self, id: ChunkId, data: Bytes) -> Result<Placed> {
        let tag = self.transfer_tag();
        let start = Instant::now();
        let mut backoff = backoff();
        let mut stored: Vec<u64> = Vec::new();
        let mut receipts: Vec<Receipt> = Vec::new();
        let mut failed: Vec<u64> = Vec::new();
        let mut errors: BTreeMap<u64, String> = BTreeMap::new();
        loop {
            let storage = self.storage();
            let rf = storage.replication.min(storage.nodes.len()).max(1);
            let quorum = rf / 2 + 1;
            let mut order = storage.targets(&id);
            // Nodes that failed recently last (a stable sort keeps the rest).
            order.sort_by_key(|n| self.is_suspect(*n));
            if order
                .iter()
                .all(|n| stored.contains(n) || failed.contains(n))
            {
                // Every node was tried: try the failed ones again.
                failed.clear();
            }
            let mut pending = FuturesUnordered::new();
            let mut waiting: Vec<u64> = Vec::new();
            let missing = rf.saturating_sub(stored.len());
            for node in order
                .iter()
                .filter(|n| !stored.contains(n) && !failed.contains(n))
                .take(missing)
            {
                let Some((addr, _)) = storage.nodes.get(node) else {
                    continue;
                };
                let (node, addr, data) = (*node, addr.clone(), data.clone());
                waiting.push(node);
                let client = self.chunk_client(&addr);
                let direct = self.direct.clone().filter(|d| d.usable(&addr));
                let tag = tag.as_str();
                pending.push(async move {
                    let res = async {
                        if let Some(d) = direct {
                            match d.put(&addr, &id, &data, tag).await {
                                DirectPut::Stored(_, receipt) => return Ok(receipt),
                                DirectPut::Refused(e) => return Err(ClientError::Server(e)),
                                DirectPut::Failed(why) => {
                                    return Err(ClientError::Unavailable(why))
                                }
                                DirectPut::Unanswered(why) => {
                                    tracing::debug!(req = %tag, %id, node, error = %why, "direct chunk upload failed; uploading over gRPC");
                                }
                            }
                        }
                        let mut req = tonic::Request::new(PutChunkRequest {
                            chunk_id: Bytes::copy_from_slice(&id.0),
                            data,
                        });
                        proto::tag_request(&mut req, tag);
                        let r = client?
                            .put(req)
                            .await
                            .map_err(|s| {
                                ClientError::Unavailable(format!("{addr}: {}", s.message()))
                            })?
                            .into_inner();
                        match r.error {
                            Some(e) => Err(ClientError::Server(e)),
                            None => Ok(r.receipt),
                        }
                    }
                    .await;
                    (node, res)
                });
            }
            let mut quorum_at: Option<Instant> = None;
            loop {
                let next = match quorum_at {
                    // Quorum reached: give the remaining replicas a moment
                    // (a third copy that lands needs no repair), but not a
                    // node that failed recently: every write would wait.
                    Some(t) => {
                        if waiting.iter().all(|n| self.is_suspect(*n)) {
                            break;
                        }
                        let grace = Duration::from_millis(500);
                        match tokio::time::timeout_at((t + grace).into(), pending.next()).await {
                            Ok(n) => n,
                            Err(_) => break,
                        }
                    }
                    None => pending.next().await,
                };
                let Some((node, res)) = next else { break };
                waiting.retain(|n| *n != node);
                self.note_node(node, res.is_ok());
                match res {
                    Ok(receipt) => {
                        stored.push(node);
                        receipts.extend(receipt);
                        if stored.len() >= quorum && quorum_at.is_none() {
                            quorum_at = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(req = %tag, %id, node, error = %e, "chunk upload failed");
                        errors.insert(node, e.to_string());
                        failed.push(node);
                    }
                }
            }
            if stored.len() >= quorum {
                stored.sort_unstable();
                self.chunk_bytes_sent
                    .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                return Ok(Placed {
                    nodes: stored,
                    receipts,
                });
            }
            if start.elapsed() >= self.cfg.deadline {
                let detail: Vec<String> = errors
                    .iter()
                    .map(|(n, e)| format!("node {n}: {e}"))
                    .collect();
                return Err(ClientError::Unavailable(format!(
                    "chunk {id}: only {} of {quorum} required replicas stored ({})",
                    stored.len(),
                    detail.join("; ")
                )));
            }
            if waiting.is_empty() && failed.len() + stored.len() < order.len() {
                // Untried nodes remain: go on at once.
                continue;
            }
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
        }
    }

    /// Reads a chunk from one of `locations`, verifying its hash. A replica
    /// that fails moves the read on to the next at once; one that is slow
    /// (no answer after eight times the usual read time) gets a second
    /// replica asked in parallel, and the first intact answer wins. When
    /// every replica failed, the read backs off and tries again until the
    /// deadline.
    pub async fn get_chunk(&self, id: ChunkId, locations: &[u64]) -> Result<Bytes> {
        let tag = self.transfer_tag();
        let start = Instant::now();
        let mut backoff = backoff();
        let mut last = String::new();
        loop {
            let storage = self.storage();
            let mut order: Vec<u64> = locations.to_vec();
            // Nodes not listed may hold the chunk too (a repair copy not yet
            // recorded, or locations this client read before a repair); try
            // them last, best-placed first.
            for n in placement(&id, storage.nodes.keys().copied()) {
                if !order.contains(&n) {
                    order.push(n);
                }
            }
            // Replicas that failed recently last (a stable sort keeps the rest).
            order.sort_by_key(|n| self.is_suspect(*n));
            order.retain(|n| storage.nodes.contains_key(n));
            let mut next = order.iter();
            let mut pending = FuturesUnordered::new();
            // The node asked last and not answered yet.
            let mut newest: Option<u64> = None;
            let mut launch =
                |pending: &mut FuturesUnordered<_>, newest: &mut Option<u64>| -> bool {
                    let Some(node) = next.next() else {
                        return false;
                    };
                    *newest = Some(*node);
                    let addr = storage.nodes[node].0.clone();
                    let (node, tag) = (*node, tag.clone());
                    let client = self.chunk_client(&addr);
                    let direct = self.direct.clone().filter(|d| d.usable(&addr));
                    pending.push(async move {
                        let sent = Instant::now();
                        let res = fetch(client, direct, &addr, node, &id, &tag).await;
                        (node, sent.elapsed(), res)
                    });
                    true
                };
            launch(&mut pending, &mut newest);
            let mut hedge_at = tokio::time::Instant::now() + self.hedge_delay();
            while !pending.is_empty() {
                let (node, took, res) = tokio::select! {
                    r = pending.next() => match r {
                        Some(r) => r,
                        None => break,
                    },
                    _ = tokio::time::sleep_until(hedge_at) => {
                        // Too slow: later reads try it last until a probe
                        // finds it answering again.
                        if let Some(slow) = newest {
                            self.note_node(slow, false);
                        }
                        if launch(&mut pending, &mut newest) {
                            crate::metrics::hedged();
                            tracing::debug!(req = %tag, %id, "chunk read slow: asking another replica too");
                        }
                        hedge_at = tokio::time::Instant::now() + self.hedge_delay();
                        continue;
                    }
                };
                if newest == Some(node) {
                    newest = None;
                }
                match res {
                    Fetched::Chunk(data) => {
                        self.note_node(node, true);
                        self.note_read_time(took);
                        return Ok(data);
                    }
                    Fetched::Failed(why) => {
                        self.note_node(node, true);
                        last = why;
                    }
                    Fetched::Transport(why) => {
                        self.note_node(node, false);
                        tracing::debug!(req = %tag, %id, node, error = %why, "chunk read failed");
                        last = why;
                    }
                }
                // This replica is out: the next one starts now.
                crate::metrics::retry("replica");
                launch(&mut pending, &mut newest);
                hedge_at = tokio::time::Instant::now() + self.hedge_delay();
            }
            if last.is_empty() {
                last = "no storage node is known".into();
            }
            if start.elapsed() >= self.cfg.deadline {
                tracing::warn!(%id, error = %last, "chunk read gave up");
                return Err(ClientError::ChunkUnreadable {
                    id: id.to_hex(),
                    reason: last,
                });
            }
            let d = backoff.next().unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(d.min(self.cfg.deadline.saturating_sub(start.elapsed()))).await;
        }
    }

    /// How long a chunk read waits before a second replica is asked too.
    fn hedge_delay(&self) -> Duration {
        let us = self
            .read_latency_us
            .load(std::sync::atomic::Ordering::Relaxed);
        if us == 0 {
            return HEDGE_MAX;
        }
        (Duration::from_micros(us) * 8).clamp(HEDGE_MIN, HEDGE_MAX)
    }

    fn note_read_time(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let _ = self.read_latency_us.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |old| Some(if old == 0 { us } else { (old * 7 + us) / 8 }),
        );
    }
}

/// One replica's answer to a chunk read.
enum Fetched {
    /// The chunk, verified against its id.
    Chunk(Bytes),
    /// The node answered without the chunk (or with damaged bytes).
    Failed(String),
    /// The call failed: the node may be down or cut off.
    Transport(String),
}

/// Reads chunk `id` from one node: over the direct protocol when `direct`
/// is given, else (or when the node refuses it) over gRPC.
async fn fetch(
    client: Result<ChunkServiceClient<Channel>>,
    direct: Option<Arc<crate::direct::DirectChunks>>,
    addr: &str,
    node: u64,
    id: &ChunkId,
    tag: &str,
) -> Fetched {
    if let Some(d) = direct {
        match d.get(addr, id, tag).await {
            crate::direct::Direct::Chunk(data) if id.verify(&data) => return Fetched::Chunk(data),
            // gRPC reads check the file on the node, which moves a damaged
            // copy aside; ask that way.
            crate::direct::Direct::Chunk(_) => {
                tracing::error!(%id, node, "replica sent a chunk that does not match its id; asking it over gRPC")
            }
            crate::direct::Direct::NotFound(why) => {
                return Fetched::Failed(format!("node {node}: {why}"))
            }
            crate::direct::Direct::Refused(why) => {
                tracing::debug!(req = %tag, %id, node, error = %why, "direct chunk read failed; asking over gRPC");
            }
        }
    }
    let mut req = tonic::Request::new(GetChunkRequest {
        chunk_id: Bytes::copy_from_slice(&id.0),
    });
    proto::tag_request(&mut req, tag);
    let res = match client {
        Ok(mut c) => c.get(req).await.map(|r| r.into_inner()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    match res {
        Ok(r) => match r.error {
            Some(e) => Fetched::Failed(format!("node {node}: {e}")),
            None if id.verify(&r.data) => Fetched::Chunk(r.data),
            None => {
                tracing::error!(%id, node, "replica returned corrupt chunk");
                Fetched::Failed(format!(
                    "node {node}: returned bytes that do not match the id"
                ))
            }
        },
        Err(s) => Fetched::Transport(format!("node {node} ({addr}): {}", s.message())),
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build()
}

/// Replies that carry a wire error.
pub trait HasError {
    fn error(&self) -> Option<&proto::meta::Error>;
}

impl HasError for CommandResult {
    fn error(&self) -> Option<&proto::meta::Error> {
        self.error.as_ref()
    }
}

impl HasError for QueryResult {
    fn error(&self) -> Option<&proto::meta::Error> {
        self.error.as_ref()
    }
}
