//! A node's way to any group's leader: locally when this node leads the
//! group, otherwise over gRPC to the leader its Raft metrics name, following
//! `NotLeader` hints and retrying transient failures with backoff until a
//! deadline. Used by the cross-shard coordinator and the recovery loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use prost::Message;
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::{
    command::Op, query::Q, Command, CommandResult, Error as WireError, ErrorCode, ProposeRequest,
    Query, QueryRequest, QueryResult, Timespec,
};
use proto::{FORMAT_VERSION, MAX_MESSAGE_BYTES};
use raft::{GroupError, KvView, Registry};
use tonic::transport::Channel;

use crate::app::ViewKv;
use crate::coordinator::Groups;
use crate::namespace::Namespace;

/// Maps a Raft group error to the wire.
pub fn group_error(e: GroupError) -> WireError {
    match e {
        GroupError::NotLeader {
            leader_id,
            leader_addr,
            group,
        } => {
            let mut w = WireError::new(
                ErrorCode::NotLeader,
                format!("not the leader of group {group}"),
            );
            w.leader_id = leader_id.unwrap_or(0);
            w.leader_addr = leader_addr.unwrap_or_default();
            w
        }
        GroupError::UnknownGroup(g) => WireError::new(
            ErrorCode::Unavailable,
            format!("group {g} is not hosted here"),
        ),
        e => WireError::new(ErrorCode::Unavailable, e.to_string()),
    }
}

/// Proposes `cmd` to `group` on this node (which must lead it).
pub async fn propose_local(registry: &Registry, group_id: u32, mut cmd: Command) -> CommandResult {
    let Some(group) = registry.group(group_id) else {
        return CommandResult {
            error: Some(WireError::new(
                ErrorCode::Unavailable,
                format!("group {group_id} is not hosted on this node"),
            )),
            ..Default::default()
        };
    };
    // The leader's clock stamps the command, so every replica applies the same time.
    cmd.now = Some(Timespec::now());
    cmd.version = cmd.version.max(1);
    match group.propose(Bytes::from(cmd.encode_to_vec())).await {
        Ok(reply) => CommandResult::decode(reply).unwrap_or_else(|e| CommandResult {
            error: Some(WireError::new(
                ErrorCode::Internal,
                format!("undecodable reply: {e}"),
            )),
            ..Default::default()
        }),
        Err(e) => CommandResult {
            error: Some(group_error(e)),
            ..Default::default()
        },
    }
}

/// Whether reads confirm leadership first: always, unless the
/// `stale-reads` failure point (builds with `failpoints` only) is set, a
/// deliberately broken node that the chaos tests' checker must catch.
fn confirm_reads() -> bool {
    fail::fail_point!("stale-reads", |_| false);
    true
}

/// A linearizable query of `group` on this node (which must lead it).
pub async fn query_local(registry: &Registry, group_id: u32, q: Q) -> QueryResult {
    let fail = |e: WireError| QueryResult {
        error: Some(e),
        ..Default::default()
    };
    let Some(group) = registry.group(group_id) else {
        return fail(WireError::new(
            ErrorCode::Unavailable,
            format!("group {group_id} is not hosted on this node"),
        ));
    };
    if confirm_reads() {
        if let Err(e) = group.read_barrier().await {
            return fail(group_error(e));
        }
    }
    let store = registry.store().clone();
    let query = Query { q: Some(q) };
    let res = tokio::task::spawn_blocking(move || {
        let view = KvView::new(&store);
        Namespace::new(group_id).query(&ViewKv(&view), &query)
    })
    .await;
    match res {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => fail(e.to_wire()),
        Err(e) => fail(WireError::new(ErrorCode::Internal, e.to_string())),
    }
}

pub struct Router {
    registry: Arc<Registry>,
    channels: Mutex<HashMap<String, Channel>>,
    deadline: Duration,
    /// Rotates over the metadata nodes when this node hosts no replica of
    /// a group (a storage-only node) and no hint names the leader.
    next_peer: std::sync::atomic::AtomicUsize,
    /// Groups an operator moved here (`musicfs group transfer-leader`):
    /// balancing leaves their leadership here until the time given.
    leader_holds: Mutex<HashMap<u32, std::time::Instant>>,
}

/// How long balancing leaves a leader an operator placed.
pub const LEADER_HOLD: Duration = Duration::from_secs(600);

/// Node-store keys a storage-only node keeps from `Join`.
pub const KEY_META_PEERS: &str = "meta_peers";
pub const KEY_GROUP_COUNT: &str = "group_count";

fn retryable(e: &WireError) -> bool {
    matches!(e.code(), ErrorCode::NotLeader | ErrorCode::Unavailable)
}

impl Router {
    pub fn new(registry: Arc<Registry>, deadline: Duration) -> Arc<Self> {
        Arc::new(Router {
            registry,
            channels: Mutex::new(HashMap::new()),
            deadline,
            next_peer: std::sync::atomic::AtomicUsize::new(0),
            leader_holds: Mutex::new(HashMap::new()),
        })
    }

    /// Keeps leadership of `group` here, against balancing, for `d`.
    pub fn hold_leadership(&self, group: u32, d: Duration) {
        let mut h = self.leader_holds.lock().unwrap_or_else(|e| e.into_inner());
        h.insert(group, std::time::Instant::now() + d);
    }

    pub fn release_leadership(&self, group: u32) {
        let mut h = self.leader_holds.lock().unwrap_or_else(|e| e.into_inner());
        h.remove(&group);
    }

    /// Whether an operator placed `group`'s leadership here lately.
    pub fn holds_leadership(&self, group: u32) -> bool {
        let mut h = self.leader_holds.lock().unwrap_or_else(|e| e.into_inner());
        h.retain(|_, until| *until > std::time::Instant::now());
        h.contains_key(&group)
    }

    /// The cluster's number of metadata groups, once this node knows it for
    /// sure: from group 0's record (written by `cluster init`), or what
    /// `Join` told a storage-only node. Never the count of groups hosted so
    /// far: a node restored from scratch, or a new cluster's node, receives
    /// its groups one by one, and a count that is too small sends chunk ids
    /// and inodes to the wrong group (the GC sweep would then delete chunk
    /// files that another group lists).
    pub fn group_count(&self) -> Result<u32, WireError> {
        if self.registry.group(0).is_some() {
            return self.recorded_group_count(0).map_err(|e| {
                if e.code() == ErrorCode::NotInitialized {
                    WireError::new(
                        ErrorCode::Unavailable,
                        "group 0 has not caught up on this node yet: the group count is not known",
                    )
                } else {
                    e
                }
            });
        }
        let store = self.registry.store();
        store
            .node_get(KEY_GROUP_COUNT)
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::NotInitialized,
                    "this node has not joined a cluster",
                )
            })
    }

    /// The cluster's group count as `group`'s record (local copy) says.
    pub fn recorded_group_count(&self, group: u32) -> Result<u32, WireError> {
        let view = KvView::new(self.registry.store());
        let rec = view
            .get(&crate::namespace::keys::group_record(group))
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
            .ok_or_else(|| WireError::new(ErrorCode::NotInitialized, "group not initialised"))?;
        proto::meta::GroupRecord::decode(&rec[..])
            .map(|r| r.group_count.max(1))
            .map_err(|e| WireError::new(ErrorCode::Corrupt, e.to_string()))
    }

    /// A metadata node to ask, for a node that hosts no replica of `group`.
    fn some_peer(&self, group: u32) -> Result<Option<String>, WireError> {
        let peers: Vec<String> = self
            .registry
            .store()
            .node_get(KEY_META_PEERS)
            .ok()
            .flatten()
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if peers.is_empty() {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!("group {group} is not hosted on this node"),
            ));
        }
        let i = self
            .next_peer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(peers[i % peers.len()].clone()))
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The groups this node leads now.
    pub fn led_groups(&self) -> Vec<u32> {
        self.registry
            .groups()
            .iter()
            .filter(|g| g.is_leader())
            .map(|g| g.id)
            .collect()
    }

    /// The storage nodes as this node's replica of group 0 records them
    /// (empty on a node that hosts no metadata).
    pub fn storage_nodes(&self) -> Vec<proto::meta::StorageNode> {
        if self.registry.group(0).is_none() {
            return Vec::new();
        }
        let view = KvView::new(self.registry.store());
        let nodes = Namespace::new(0)
            .storage_nodes(&ViewKv(&view))
            .unwrap_or_default();
        if !nodes.is_empty() {
            return nodes;
        }
        // A cluster made before storage nodes were recorded: every
        // metadata node stores chunks.
        self.meta_nodes()
            .into_iter()
            .map(|(node_id, addr)| proto::meta::StorageNode {
                node_id,
                addr,
                ..Default::default()
            })
            .collect()
    }

    /// The metadata nodes (group 0's members) and their addresses.
    pub fn meta_nodes(&self) -> Vec<(u64, String)> {
        self.registry
            .group(0)
            .map(|g| g.status().nodes)
            .unwrap_or_default()
    }

    /// Records location changes of `group`'s chunks, in commands of the
    /// largest size the state machine takes.
    pub async fn update_locations(
        &self,
        group: u32,
        changes: &[proto::meta::LocationChange],
    ) -> Result<(), WireError> {
        use crate::namespace::placement::MAX_LOCATION_CHANGES;
        for batch in changes.chunks(MAX_LOCATION_CHANGES) {
            self.propose(
                group,
                Op::UpdateLocations(proto::meta::UpdateLocationsOp {
                    changes: batch.to_vec(),
                }),
            )
            .await?;
        }
        Ok(())
    }

    fn client(&self, addr: &str) -> Result<MetaServiceClient<Channel>, WireError> {
        let mut chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let ch = match chans.get(addr) {
            Some(c) => c.clone(),
            None => {
                let ch = self
                    .registry
                    .wire()
                    .endpoint(addr)
                    .map_err(|e| WireError::new(ErrorCode::Invalid, e.to_string()))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .connect_lazy();
                chans.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(MetaServiceClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Where the group's leader is, as this node's replica knows it:
    /// `None` for here, else its address.
    fn leader(&self, group: u32, hint: Option<&WireError>) -> Result<Option<String>, WireError> {
        if let Some(h) = hint {
            if h.leader_id != 0 && !h.leader_addr.is_empty() {
                if h.leader_id == self.registry.node_id() {
                    return Ok(None);
                }
                return Ok(Some(h.leader_addr.clone()));
            }
        }
        let Some(g) = self.registry.group(group) else {
            return self.some_peer(group);
        };
        let st = g.status();
        match st.leader {
            Some(l) if l == self.registry.node_id() => Ok(None),
            Some(l) => st
                .nodes
                .iter()
                .find(|(id, _)| *id == l)
                .map(|(_, a)| Some(a.clone()))
                .ok_or_else(|| {
                    WireError::new(ErrorCode::Unavailable, format!("leader {l} has no address"))
                }),
            None => Err(WireError::new(
                ErrorCode::Unavailable,
                format!("group {group} has no leader"),
            )),
        }
    }

    async fn retry<T, F, Fut>(&self, group: u32, call: F) -> Result<T, WireError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, WireError>>,
    {
        let start = Instant::now();
        let mut backoff = ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(500))
            .without_max_times()
            .build();
        let mut hint: Option<WireError> = None;
        let mut hints_in_a_row = 0u32;
        loop {
            let res = match self.leader(group, hint.as_ref()) {
                Ok(target) => call(target).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(v) => return Ok(v),
                Err(e) if retryable(&e) && start.elapsed() < self.deadline => {
                    let hinted = e.code() == ErrorCode::NotLeader && e.leader_id != 0;
                    hint = Some(e).filter(|_| hinted);
                    hints_in_a_row = if hinted { hints_in_a_row + 1 } else { 0 };
                    // Follow a fresh hint at once; back off when there is
                    // none or hints go in circles (an election).
                    if !hinted || hints_in_a_row > 2 {
                        let d = backoff.next().unwrap_or(Duration::from_millis(500));
                        tokio::time::sleep(d).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn rpc_err(addr: &str, s: tonic::Status) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("{addr}: {}", s.message()))
}

tokio::task_local! {
    /// The tag (`CLIENT:SEQ`) of the client request the current task works
    /// for, so the steps it makes in other groups carry it too.
    pub static REQUEST_TAG: String;
}

pub fn current_request_tag() -> Option<String> {
    REQUEST_TAG
        .try_with(|t| t.clone())
        .ok()
        .filter(|t| !t.is_empty())
}

/// A node's own command (no client request id: not deduplicated).
pub fn internal_command(op: Op) -> Command {
    Command {
        version: FORMAT_VERSION,
        now: Some(Timespec::now()),
        client_id: 0,
        request_seq: 0,
        acked_below: 0,
        origin: proto::meta::Origin::Node as i32,
        op: Some(op),
    }
}

/// A reply whose wire error becomes the `Err` side.
trait Reply: Sized {
    fn take_error(&mut self) -> Option<WireError>;
    fn into_result(mut self) -> Result<Self, WireError> {
        match self.take_error() {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }
}

impl Reply for CommandResult {
    fn take_error(&mut self) -> Option<WireError> {
        self.error.take()
    }
}

impl Reply for QueryResult {
    fn take_error(&mut self) -> Option<WireError> {
        self.error.take()
    }
}

impl Groups for Router {
    async fn propose(&self, group: u32, op: Op) -> Result<CommandResult, WireError> {
        let cmd = internal_command(op);
        self.retry(group, |target| {
            let cmd = cmd.clone();
            async move {
                let r = match target {
                    None => propose_local(&self.registry, group, cmd).await,
                    Some(addr) => {
                        let mut req = tonic::Request::new(ProposeRequest {
                            group_id: group,
                            command: Some(cmd),
                        });
                        // The other group's leader logs the client request
                        // this step belongs to.
                        if let Some(tag) = current_request_tag() {
                            proto::tag_request(&mut req, &tag);
                        }
                        self.registry
                            .wire()
                            .sign(proto::auth::method::PROPOSE, &mut req);
                        self.client(&addr)?
                            .propose(req)
                            .await
                            .map_err(|s| rpc_err(&addr, s))?
                            .into_inner()
                    }
                };
                r.into_result()
            }
        })
        .await
    }

    async fn query(&self, group: u32, q: Q) -> Result<QueryResult, WireError> {
        self.retry(group, |target| {
            let q = q.clone();
            async move {
                let r = match target {
                    None => query_local(&self.registry, group, q).await,
                    Some(addr) => self
                        .client(&addr)?
                        .query(QueryRequest {
                            group_id: group,
                            query: Some(Query { q: Some(q) }),
                        })
                        .await
                        .map_err(|s| rpc_err(&addr, s))?
                        .into_inner(),
                };
                r.into_result()
            }
        })
        .await
    }
}
