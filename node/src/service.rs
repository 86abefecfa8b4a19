//! The node's gRPC services for clients and operators: metadata (propose
//! and query through the group's Raft) and administration. The chunk
//! service is in `chunk_service.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use proto::admin::admin_service_server::AdminService;
use proto::admin::{
    GcRequest, GcStatus, GroupStatus as PbGroupStatus, InitRequest, InitResponse, JoinRequest,
    JoinResponse, Peer, ScrubRequest, ScrubResponse, SetStorageNodeRequest, SetStorageNodeResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse,
};
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::meta_service_server::MetaService;
use proto::meta::{
    command::Op, query::Q, Command, CommandResult, Error as WireError, ErrorCode, FileKind,
    GroupRecord, InitOp, NodeChunksQuery, Origin, ProposeRequest, QueryRequest, QueryResult,
    SetStorageNodeOp, StorageNode, StorageState, Timespec,
};
use proto::transport::Transport;
use raft::{KvView, Registry};
use tonic::{Request, Response, Status};

use crate::app::ViewKv;
use crate::chunkstore::ChunkStore;
use crate::coordinator::{self, Groups};
use crate::gc::Gc;
use crate::namespace::{admission, crossed, is_client_op, keys, op_name, Namespace};
use crate::repair::Repair;
use crate::router::{internal_command, propose_local, query_local, Router};
use crate::scrub::Scrub;

pub struct MetaSvc {
    pub registry: Arc<Registry>,
    pub router: Arc<Router>,
}

/// Client operations that may span groups.
fn may_cross(cmd: &Command) -> bool {
    matches!(
        cmd.op,
        Some(Op::Create(_) | Op::Link(_) | Op::Remove(_) | Op::Rename(_))
    )
}

/// mkdir lands in another group for all but one group in N: worth a dry
/// run. Other operations cross only now and then (an inode moved or linked
/// into another group) and fall back when the single-group attempt says so.
fn likely_cross(cmd: &Command) -> bool {
    matches!(&cmd.op, Some(Op::Create(c)) if c.kind == FileKind::Directory as i32)
}

impl MetaSvc {
    /// Proposes a command to `group_id`; a client operation that turns out
    /// to span groups runs as a cross-shard transaction coordinated here.
    pub async fn propose_command(&self, group_id: u32, cmd: Command) -> CommandResult {
        if likely_cross(&cmd) {
            // Try it on this leader's state first: a cross-shard operation
            // then skips the single-group attempt.
            if let Some(dry) = self.dry_run(group_id, &cmd).await {
                if crossed(&dry) {
                    return self.cross_shard(group_id, &cmd).await;
                }
            }
        }
        let r = propose_local(&self.registry, group_id, cmd.clone()).await;
        if may_cross(&cmd) && crossed(&r) {
            return self.cross_shard(group_id, &cmd).await;
        }
        if matches!(cmd.op, Some(Op::CreateBatch(_))) && r.results.iter().any(crossed) {
            return self.coordinate(group_id, &cmd, Some(r)).await;
        }
        r
    }

    async fn dry_run(&self, group_id: u32, cmd: &Command) -> Option<CommandResult> {
        let group = self.registry.group(group_id)?;
        if !group.is_leader() {
            return None;
        }
        let store = self.registry.store().clone();
        let mut cmd = cmd.clone();
        cmd.now = Some(Timespec::now());
        tokio::task::spawn_blocking(move || {
            let view = KvView::new(&store);
            Namespace::new(group_id)
                .apply_request(&ViewKv(&view), &cmd)
                .ok()
                .map(|(_, r)| r)
        })
        .await
        .ok()
        .flatten()
    }

    async fn cross_shard(&self, group_id: u32, cmd: &Command) -> CommandResult {
        self.coordinate(group_id, cmd, None).await
    }

    /// Runs the coordinator for `cmd` (or, with `batch`, for the
    /// directories of a create batch that belong in other groups) in its
    /// own task: a client that gives up on its request must not abandon a
    /// transaction between two of its steps.
    async fn coordinate(
        &self,
        group_id: u32,
        cmd: &Command,
        batch: Option<CommandResult>,
    ) -> CommandResult {
        let count = match self.router.recorded_group_count(group_id) {
            Ok(c) => c,
            Err(e) => {
                return CommandResult {
                    error: Some(e),
                    ..Default::default()
                }
            }
        };
        let (router, cmd) = (self.router.clone(), cmd.clone());
        let tag = crate::router::current_request_tag().unwrap_or_default();
        let work = async move {
            match batch {
                Some(b) => coordinator::mkdir_batch(&*router, group_id, count, &cmd, b).await,
                None => coordinator::run(&*router, group_id, count, &cmd).await,
            }
        };
        // The task keeps the request's span and tag: its steps log them.
        tokio::spawn(tracing::Instrument::instrument(
            crate::router::REQUEST_TAG.scope(tag, work),
            tracing::Span::current(),
        ))
        .await
        .unwrap_or_else(|e| CommandResult {
            error: Some(WireError::new(ErrorCode::Internal, e.to_string())),
            ..Default::default()
        })
    }

    /// The cluster's number of groups once this node knows it for sure (0
    /// until then): a client that took a smaller count would route to the
    /// wrong groups.
    fn known_group_count(&self) -> u32 {
        self.router.group_count().unwrap_or(0)
    }
}

#[tonic::async_trait]
impl MetaService for MetaSvc {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let forwarded_tag = proto::request_tag_of(&request);
        // A node (its certificate, or its signature with the cluster
        // secret) may propose anything; everyone else only what a file
        // system needs, checked before it costs a log entry.
        // Only an internal command asks who the caller is (a certificate
        // parse or a signature check): a file-system command is a client's
        // whoever sends it, and gets the checks before it is proposed.
        let internal = request
            .get_ref()
            .command
            .as_ref()
            .and_then(|c| c.op.as_ref())
            .is_some_and(|op| !is_client_op(op));
        let from_node = internal
            && self
                .registry
                .wire()
                .is_node_call(&request, proto::auth::method::PROPOSE);
        let encoded_len = request
            .get_ref()
            .command
            .as_ref()
            .map_or(0, |c| c.encoded_len());
        let req = request.into_inner();
        let refuse = |e: WireError| {
            crate::metrics::meta_error("propose", e.code().as_str_name());
            Ok(Response::new(CommandResult {
                error: Some(e),
                ..Default::default()
            }))
        };
        let Some(mut cmd) = req.command else {
            return refuse(WireError::new(
                ErrorCode::Invalid,
                "request carries no command",
            ));
        };
        if internal {
            if !from_node {
                let op = cmd.op.as_ref().map_or("?", op_name);
                tracing::warn!(
                    op,
                    group = req.group_id,
                    "internal command from a client refused"
                );
                return refuse(WireError::new(
                    ErrorCode::Permission,
                    format!("{op} is an internal command: only cluster nodes may propose it"),
                ));
            }
            cmd.origin = Origin::Node as i32;
        } else {
            let checked = admission::check(&cmd, encoded_len).and_then(|()| {
                match self.registry.wire().secret() {
                    Some(secret) => admission::check_receipts(&cmd, secret, proto::auth::now_ms()),
                    None => Err(WireError::new(
                        ErrorCode::Internal,
                        "this node has no cluster secret to check chunk receipts",
                    )),
                }
            });
            if let Err(e) = checked {
                return refuse(e);
            }
            cmd.origin = Origin::Client as i32;
        }
        #[cfg(feature = "failpoints")]
        let client = cmd.client_id;
        // Every log line of the request, here and in the transactions it
        // runs, carries the id the client logs too (CLIENT:SEQ in hex); a
        // node's step of another node's transaction carries that client's.
        let tag = if cmd.client_id != 0 {
            proto::request_tag(cmd.client_id, cmd.request_seq)
        } else {
            forwarded_tag.unwrap_or_default()
        };
        let span = tracing::info_span!("propose", req = %tag, group = req.group_id);
        let r = crate::router::REQUEST_TAG
            .scope(
                tag,
                tracing::Instrument::instrument(self.propose_command(req.group_id, cmd), span),
            )
            .await;
        if let Some(e) = &r.error {
            crate::metrics::meta_error("propose", e.code().as_str_name());
        }
        // Tests of retries after a lost reply: `reply-lost=return(CLIENT)`
        // applies CLIENT's commands and drops the answers.
        fail::fail_point!("reply-lost", |arg: Option<String>| {
            if arg.is_some_and(|a| a == client.to_string()) {
                Err(Status::unavailable("failpoint reply-lost"))
            } else {
                Ok(Response::new(r.clone()))
            }
        });
        Ok(Response::new(r))
    }

    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<QueryResult>, Status> {
        let req = request.into_inner();
        let Some(q) = req.query.and_then(|q| q.q) else {
            return Ok(Response::new(QueryResult {
                error: Some(WireError::new(
                    ErrorCode::Invalid,
                    "request carries no query",
                )),
                ..Default::default()
            }));
        };
        let r = query_local(&self.registry, req.group_id, q).await;
        if let Some(e) = &r.error {
            crate::metrics::meta_error("query", e.code().as_str_name());
        }
        Ok(Response::new(r))
    }
}

pub struct AdminSvc {
    pub registry: Arc<Registry>,
    pub chunks: Arc<ChunkStore>,
    pub meta: Arc<MetaSvc>,
    pub repair: Arc<Repair>,
    pub scrub: Arc<Scrub>,
    pub gc: Arc<Gc>,
}

impl AdminSvc {
    /// Lets a call that changes the cluster through if it carries the admin
    /// token (when one is configured) or comes from a node; logs refusals.
    fn allow<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        proto::transport::check_admin(request, self.registry.wire().token()).inspect_err(|s| {
            tracing::warn!(
                call = what,
                peer = ?request.remote_addr(),
                reason = s.message(),
                "admin call refused"
            );
        })
    }

    /// Proposes each group's InitOp (root directory, cluster id) through
    /// whichever node leads it, retrying until done or `timeout`.
    async fn init_groups(
        &self,
        cluster_id: &str,
        count: u32,
        replication: u32,
        commit_window_secs: u32,
        storage_nodes: &[StorageNode],
        timeout: Duration,
    ) -> Result<(), WireError> {
        let start = Instant::now();
        let mut pending: Vec<u32> = (0..count).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for g in pending {
                let cmd = internal_command(Op::Init(InitOp {
                    cluster_id: cluster_id.to_string(),
                    group_id: g,
                    group_count: count,
                    replication,
                    commit_window_secs,
                    storage_nodes: if g == 0 {
                        storage_nodes.to_vec()
                    } else {
                        Vec::new()
                    },
                }));
                let mut res = self.meta.propose_command(g, cmd.clone()).await;
                if let Some(e) = &res.error {
                    if e.code() == ErrorCode::NotLeader && !e.leader_addr.is_empty() {
                        res = forward(self.registry.wire(), &e.leader_addr, g, cmd).await;
                    }
                }
                match res.error {
                    None => {}
                    Some(e)
                        if e.code() == ErrorCode::NotLeader
                            || e.code() == ErrorCode::Unavailable =>
                    {
                        still.push(g)
                    }
                    Some(e) => return Err(e),
                }
            }
            pending = still;
            if !pending.is_empty() {
                if start.elapsed() > timeout {
                    return Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!("groups {pending:?} elected no leader within {timeout:?}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl AdminSvc {
    /// The metadata nodes (group 0's members).
    fn meta_peers(&self) -> Vec<Peer> {
        self.meta
            .router
            .meta_nodes()
            .into_iter()
            .map(|(node_id, addr)| Peer { node_id, addr })
            .collect()
    }

    /// Chunk records, over every group, that list `node`.
    async fn chunks_on(&self, node: u64) -> Result<u64, WireError> {
        let router = &self.meta.router;
        let count = router.group_count()?;
        let mut total = 0;
        for g in 0..count {
            let r = router
                .query(g, Q::NodeChunks(NodeChunksQuery { node_id: node }))
                .await?;
            total += r.count;
        }
        Ok(total)
    }

    /// Adds, drains or removes a storage node. Returns the chunk records
    /// still listing it (for drain and remove).
    async fn storage_node_change(
        &self,
        req: SetStorageNodeRequest,
    ) -> Result<u64, (WireError, u64)> {
        let state = StorageState::try_from(req.state).map_err(|_| {
            (
                WireError::new(ErrorCode::Invalid, format!("unknown state {}", req.state)),
                0,
            )
        })?;
        let router = &self.meta.router;
        let nodes = router
            .query(0, Q::StorageNodes(Default::default()))
            .await
            .map_err(|e| (e, 0))?
            .storage_nodes;
        let known = nodes.iter().find(|n| n.node_id == req.node_id);
        match state {
            StorageState::StorageActive if known.is_none() => {
                // A node joins only if it answers as the node it is said to be.
                let st = status_of(self.registry.wire(), &req.addr)
                    .await
                    .map_err(|e| (e, 0))?;
                if st.node_id != req.node_id {
                    return Err((
                        WireError::new(
                            ErrorCode::Invalid,
                            format!(
                                "{} answers as node {}, not node {}",
                                req.addr, st.node_id, req.node_id
                            ),
                        ),
                        0,
                    ));
                }
                let ours = self.registry.cluster_id();
                if st.groups.is_empty() {
                    // A storage-only node learns the cluster and where its
                    // metadata lives.
                    join(
                        self.registry.wire(),
                        &req.addr,
                        &ours,
                        self.meta_peers(),
                        router.group_count().map_err(|e| (e, 0))?,
                    )
                    .await
                    .map_err(|e| (e, 0))?;
                }
                if !st.cluster_id.is_empty() && st.cluster_id != ours {
                    return Err((
                        WireError::new(
                            ErrorCode::WrongCluster,
                            format!(
                                "node {} belongs to cluster {}, not {ours}",
                                req.node_id, st.cluster_id
                            ),
                        ),
                        0,
                    ));
                }
            }
            StorageState::StorageRemoved => {
                match known.map(|n| n.state()) {
                    Some(StorageState::StorageDraining) => {}
                    Some(StorageState::StorageRemoved) => return Ok(0),
                    _ => {
                        return Err((
                            WireError::new(
                                ErrorCode::Invalid,
                                format!(
                                    "storage node {} must be drained before it is removed \
                                     (`musicfs node drain {}`)",
                                    req.node_id, req.node_id
                                ),
                            ),
                            0,
                        ))
                    }
                }
                let left = self.chunks_on(req.node_id).await.map_err(|e| (e, 0))?;
                if left > 0 {
                    return Err((
                        WireError::new(
                            ErrorCode::Busy,
                            format!(
                                "storage node {} still holds the only counted copies of {left} \
                                 chunk(s); wait for the drain to finish",
                                req.node_id
                            ),
                        ),
                        left,
                    ));
                }
            }
            _ => {}
        }
        router
            .propose(
                0,
                Op::SetStorageNode(SetStorageNodeOp {
                    node_id: req.node_id,
                    addr: req.addr.clone(),
                    state: state as i32,
                }),
            )
            .await
            .map_err(|e| (e, 0))?;
        if state == StorageState::StorageDraining {
            return self.chunks_on(req.node_id).await.map_err(|e| (e, 0));
        }
        Ok(0)
    }
}

fn unreachable(addr: &str, e: String) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("node at {addr}: {e}"))
}

/// The admin service of the node at `addr`.
async fn admin_at(
    wire: &Transport,
    addr: &str,
) -> Result<
    proto::admin::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    WireError,
> {
    let ep = wire
        .endpoint(addr)
        .map_err(|e| WireError::new(ErrorCode::Invalid, e.to_string()))?;
    let ch = ep
        .connect()
        .await
        .map_err(|e| unreachable(addr, e.to_string()))?;
    Ok(proto::admin::admin_service_client::AdminServiceClient::new(
        ch,
    ))
}

async fn join(
    wire: &Transport,
    addr: &str,
    cluster: &str,
    peers: Vec<Peer>,
    groups: u32,
) -> Result<(), WireError> {
    let mut c = admin_at(wire, addr).await?;
    let mut req = wire.request(JoinRequest {
        cluster_id: cluster.to_string(),
        peers,
        group_count: groups,
    });
    wire.sign(proto::auth::method::JOIN, &mut req);
    let r = c
        .join(req)
        .await
        .map_err(|s| unreachable(addr, s.message().to_string()))?
        .into_inner();
    match r.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Asks the node at `addr` (a group's leader) to hand the group over.
async fn transfer_at(
    wire: &Transport,
    addr: &str,
    req: TransferLeaderRequest,
) -> Result<(), WireError> {
    let mut c = admin_at(wire, addr).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.transfer_leader(wire.request(req)),
    )
    .await
    .map_err(|_| unreachable(addr, "no answer within 10 s".into()))?
    .map_err(|s| unreachable(addr, s.message().to_string()))?;
    match r.into_inner().error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A node's status, for checking who answers at an address.
async fn status_of(wire: &Transport, addr: &str) -> Result<StatusResponse, WireError> {
    let mut c = admin_at(wire, addr).await?;
    let r = tokio::time::timeout(Duration::from_secs(5), c.status(StatusRequest {}))
        .await
        .map_err(|_| unreachable(addr, "no answer within 5 s".into()))?
        .map_err(|s| unreachable(addr, s.message().to_string()))?;
    Ok(r.into_inner())
}

async fn forward(wire: &Transport, addr: &str, group: u32, cmd: Command) -> CommandResult {
    let res = async {
        let ch = wire.endpoint(addr)?.connect().await?;
        let mut c = MetaServiceClient::new(ch);
        let mut req = Request::new(ProposeRequest {
            group_id: group,
            command: Some(cmd),
        });
        wire.sign(proto::auth::method::PROPOSE, &mut req);
        let r = c.propose(req).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(r.into_inner())
    }
    .await;
    res.unwrap_or_else(|e| CommandResult {
        error: Some(WireError::new(ErrorCode::Unavailable, e.to_string())),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        self.allow(&request, "cluster init")?;
        let req = request.into_inner();
        let fail = |code, msg: String| {
            Ok(Response::new(InitResponse {
                error: Some(WireError::new(code, msg)),
            }))
        };
        if !req.bootstrap {
            return fail(
                ErrorCode::Invalid,
                "only bootstrap initialisation is supported".into(),
            );
        }
        let me = self.registry.node_id();
        let existing = self.registry.cluster_id();
        if !existing.is_empty() {
            return fail(
                ErrorCode::AlreadyInitialized,
                format!("node {me} already belongs to cluster {existing}"),
            );
        }
        if req.cluster_id.is_empty() || req.group_count == 0 {
            return fail(
                ErrorCode::Invalid,
                "cluster id and group count are required".into(),
            );
        }
        let replication = if req.replication == 0 {
            proto::DEFAULT_REPLICATION
        } else {
            req.replication
        };
        if replication as usize > req.peers.len() {
            return fail(
                ErrorCode::Invalid,
                format!(
                    "replication factor {replication} needs at least {replication} nodes, not {}",
                    req.peers.len()
                ),
            );
        }
        if !req.peers.iter().any(|p| p.node_id == me) {
            return fail(
                ErrorCode::Invalid,
                format!("peer list does not include this node ({me})"),
            );
        }
        let peers: BTreeMap<u64, String> = req
            .peers
            .iter()
            .map(|p| (p.node_id, p.addr.clone()))
            .collect();
        if let Err(e) = self
            .registry
            .bootstrap(&req.cluster_id, &peers, req.group_count)
            .await
        {
            return fail(ErrorCode::Internal, e.to_string());
        }
        let storage_nodes: Vec<StorageNode> = req
            .peers
            .iter()
            .map(|p| StorageNode {
                node_id: p.node_id,
                addr: p.addr.clone(),
                ..Default::default()
            })
            .collect();
        if let Err(e) = self
            .init_groups(
                &req.cluster_id,
                req.group_count,
                replication,
                req.commit_window_secs,
                &storage_nodes,
                Duration::from_secs(60),
            )
            .await
        {
            return Ok(Response::new(InitResponse { error: Some(e) }));
        }
        tracing::info!(cluster = %req.cluster_id, groups = req.group_count, "cluster initialised");
        Ok(Response::new(InitResponse { error: None }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let store = self.registry.store().clone();
        let statuses: Vec<(raft::GroupStatus, bool)> = self
            .registry
            .groups()
            .iter()
            .map(|g| (g.status(), g.is_leader()))
            .collect();
        let groups = tokio::task::spawn_blocking(move || {
            statuses
                .into_iter()
                .map(|(s, leader)| group_status(&store, s, leader))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let peers = self.meta_peers();
        let (free, total) = self.chunks.disk_space().unwrap_or((0, 0));
        let (storage_nodes, replication, commit_window_secs) = if self.registry.group(0).is_some() {
            let store = self.registry.store().clone();
            tokio::task::spawn_blocking(move || {
                let view = KvView::new(&store);
                let ns = Namespace::new(0);
                let kv = ViewKv(&view);
                let nodes = ns.storage_nodes(&kv).unwrap_or_default();
                let (rf, window) = ns
                    .stats(&kv)
                    .map(|r| {
                        (
                            crate::namespace::placement::replication_of(&r),
                            (crate::namespace::placement::commit_window_ms(&r) / 1000) as u32,
                        )
                    })
                    .unwrap_or((0, 0));
                (nodes, rf, window)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
        } else {
            (Vec::new(), 0, 0)
        };
        Ok(Response::new(StatusResponse {
            storage_nodes,
            replication,
            commit_window_secs,
            storage_up: self.repair.up_nodes(),
            repair: Some(self.repair.status()),
            scrub: Some(self.scrub.status()),
            gc: Some(self.gc.status().await),
            workers: vec![self.repair.worker(), self.scrub.worker(), self.gc.worker()],
            tls: self.registry.wire().is_tls(),
            admin_token: self.registry.wire().token().is_some(),
            cluster_secret: self.registry.wire().secret().is_some(),
            error: None,
            node_id: self.registry.node_id(),
            cluster_id: self.registry.cluster_id(),
            peers,
            group_count: self.meta.known_group_count(),
            groups,
            chunk_count: self.chunks.chunk_count(),
            chunk_bytes: self.chunks.chunk_bytes(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            disk_free_bytes: free,
            disk_total_bytes: total,
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.allow(&request, "group transfer-leader")?;
        let req = request.into_inner();
        let fail = |code, msg: String| {
            Ok(Response::new(TransferLeaderResponse {
                error: Some(WireError::new(code, msg)),
            }))
        };
        let Some(g) = self.registry.group(req.group_id) else {
            return fail(
                ErrorCode::Invalid,
                format!("group {} is not hosted here", req.group_id),
            );
        };
        let st = g.status();
        if !st.voters.contains(&req.to_node) {
            return fail(
                ErrorCode::Invalid,
                format!(
                    "node {} is not a voter of group {}",
                    req.to_node, req.group_id
                ),
            );
        }
        let leader_addr = st
            .nodes
            .iter()
            .find(|(id, _)| Some(*id) == st.leader)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        let router = &self.meta.router;
        if req.to_node == self.registry.node_id() {
            // Asked to take over: balancing must not move the group away
            // again at once, so hold it here first, then ask the leader.
            router.hold_leadership(req.group_id, crate::router::LEADER_HOLD);
            if g.is_leader() {
                return Ok(Response::new(TransferLeaderResponse { error: None }));
            }
            let r = match leader_addr.as_str() {
                "" => Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!("group {} has no leader now", req.group_id),
                )),
                addr => transfer_at(self.registry.wire(), addr, req).await,
            };
            if r.is_err() {
                router.release_leadership(req.group_id);
            }
            return Ok(Response::new(TransferLeaderResponse { error: r.err() }));
        }
        if !g.is_leader() {
            let mut e = WireError::new(
                ErrorCode::NotLeader,
                format!("not the leader of group {}", req.group_id),
            );
            e.leader_id = st.leader.unwrap_or(0);
            e.leader_addr = leader_addr;
            return Ok(Response::new(TransferLeaderResponse { error: Some(e) }));
        }
        router.release_leadership(req.group_id);
        if let Err(e) = g.transfer_leader(req.to_node).await {
            return fail(ErrorCode::Unavailable, e.to_string());
        }
        Ok(Response::new(TransferLeaderResponse { error: None }))
    }

    async fn set_storage_node(
        &self,
        request: Request<SetStorageNodeRequest>,
    ) -> Result<Response<SetStorageNodeResponse>, Status> {
        self.allow(&request, "node add/drain/remove")?;
        let req = request.into_inner();
        Ok(Response::new(match self.storage_node_change(req).await {
            Ok(remaining) => SetStorageNodeResponse {
                error: None,
                chunks_remaining: remaining,
            },
            Err((e, remaining)) => SetStorageNodeResponse {
                error: Some(e),
                chunks_remaining: remaining,
            },
        }))
    }

    async fn gc(&self, request: Request<GcRequest>) -> Result<Response<GcStatus>, Status> {
        if !request.get_ref().dry_run {
            self.allow(&request, "gc")?;
            self.gc.kick();
        }
        Ok(Response::new(self.gc.status().await))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // Only a node of the cluster hands a storage node its cluster (an
        // operator's `node add` goes through one), token or not.
        self.registry
            .wire()
            .check_node_call(&request, proto::auth::method::JOIN)
            .inspect_err(|s| {
                tracing::warn!(peer = ?request.remote_addr(), reason = s.message(), "join refused")
            })?;
        let req = request.into_inner();
        let fail = |code, msg: String| {
            Ok(Response::new(JoinResponse {
                error: Some(WireError::new(code, msg)),
            }))
        };
        if req.peers.is_empty() {
            return fail(ErrorCode::Invalid, "no metadata nodes given".into());
        }
        if let Err(e) = self.registry.adopt_cluster(&req.cluster_id) {
            return fail(ErrorCode::WrongCluster, e.to_string());
        }
        let store = self.registry.store();
        let addrs: Vec<String> = req.peers.iter().map(|p| p.addr.clone()).collect();
        let saved = store
            .node_set(crate::router::KEY_META_PEERS, &addrs.join(","))
            .and_then(|_| {
                store.node_set(crate::router::KEY_GROUP_COUNT, &req.group_count.to_string())
            });
        if let Err(e) = saved {
            return fail(ErrorCode::Internal, e.to_string());
        }
        tracing::info!(cluster = %req.cluster_id, peers = ?addrs, "joined as a storage node");
        Ok(Response::new(JoinResponse { error: None }))
    }

    async fn scrub(
        &self,
        request: Request<ScrubRequest>,
    ) -> Result<Response<ScrubResponse>, Status> {
        self.allow(&request, "scrub start")?;
        self.scrub.start();
        Ok(Response::new(ScrubResponse { error: None }))
    }

    async fn trigger_snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        self.allow(&request, "snapshot")?;
        for g in self.registry.groups() {
            if let Err(e) = g.trigger_snapshot().await {
                return Ok(Response::new(SnapshotResponse {
                    error: Some(WireError::new(ErrorCode::Internal, e.to_string())),
                }));
            }
        }
        Ok(Response::new(SnapshotResponse { error: None }))
    }
}

/// One group's status with the counts only its leader's state answers.
fn group_status(store: &raft::Store, s: raft::GroupStatus, leader: bool) -> PbGroupStatus {
    let view = KvView::new(store);
    let kv = ViewKv(&view);
    let ns = Namespace::new(s.group);
    let (mut open, mut queued) = (0, 0);
    if leader {
        // Abort decisions stay a while on purpose (a slow coordinator must
        // find them): they are settled, not open.
        open = ns.intents(&kv, 10_000).map(|v| v.len()).unwrap_or(0)
            + ns.decisions(&kv, 10_000)
                .map(|v| v.iter().filter(|d| d.commit).count())
                .unwrap_or(0);
        queued = ns
            .outbox(&kv, 10_000)
            .map(|v| v.iter().map(|o| o.batches.len()).sum())
            .unwrap_or(0);
    }
    let inodes = view
        .get(&keys::group_record(s.group))
        .ok()
        .flatten()
        .and_then(|b| GroupRecord::decode(&b[..]).ok())
        .map(|r| r.inode_count)
        .unwrap_or(0);
    PbGroupStatus {
        group_id: s.group,
        leader_id: s.leader.unwrap_or(0),
        term: s.term,
        voters: s.voters,
        last_applied: s.last_applied,
        last_log_index: s.last_log_index,
        snapshot_index: s.snapshot_index,
        state: s.state,
        open_intents: open as u64,
        queued_ref_batches: queued as u64,
        size_bytes: store.group_size(s.group),
        inodes,
    }
}
