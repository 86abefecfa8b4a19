//! The node's gRPC services for clients and operators: metadata (propose
//! and query through the group's Raft), chunks, and administration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use proto::admin::admin_service_server::AdminService;
use proto::admin::{
    GroupStatus as PbGroupStatus, InitRequest, InitResponse, Peer, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::meta_service_server::MetaService;
use proto::meta::{
    command::Op, Command, CommandResult, Error as WireError, ErrorCode, FileKind, GroupRecord,
    InitOp, ProposeRequest, QueryRequest, QueryResult, Timespec,
};
use proto::storage::chunk_service_server::ChunkService;
use proto::storage::{
    GetChunkRequest, GetChunkResponse, HasChunksRequest, HasChunksResponse, PutChunkRequest,
    PutChunkResponse,
};
use proto::ChunkId;
use raft::{KvView, Registry};
use tonic::{Request, Response, Status};

use crate::app::ViewKv;
use crate::chunkstore::{ChunkError, ChunkStore};
use crate::coordinator;
use crate::namespace::{crossed, keys, Namespace};
use crate::router::{internal_command, propose_local, query_local, Router};

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
        let count = match self.group_count(group_id) {
            Ok(c) => c,
            Err(e) => {
                return CommandResult {
                    error: Some(e),
                    ..Default::default()
                }
            }
        };
        let (router, cmd) = (self.router.clone(), cmd.clone());
        tokio::spawn(async move {
            match batch {
                Some(b) => coordinator::mkdir_batch(&*router, group_id, count, &cmd, b).await,
                None => coordinator::run(&*router, group_id, count, &cmd).await,
            }
        })
        .await
        .unwrap_or_else(|e| CommandResult {
            error: Some(WireError::new(ErrorCode::Internal, e.to_string())),
            ..Default::default()
        })
    }

    fn group_count(&self, group_id: u32) -> Result<u32, WireError> {
        let view = KvView::new(self.registry.store());
        let key = keys::group_record(group_id);
        let rec = view
            .get(&key)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
            .ok_or_else(|| WireError::new(ErrorCode::NotInitialized, "group not initialised"))?;
        let rec = GroupRecord::decode(&rec[..])
            .map_err(|e| WireError::new(ErrorCode::Corrupt, e.to_string()))?;
        Ok(rec.group_count.max(1))
    }
}

#[tonic::async_trait]
impl MetaService for MetaSvc {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let req = request.into_inner();
        let Some(cmd) = req.command else {
            return Ok(Response::new(CommandResult {
                error: Some(WireError::new(
                    ErrorCode::Invalid,
                    "request carries no command",
                )),
                ..Default::default()
            }));
        };
        if matches!(cmd.op, Some(Op::Init(_))) {
            return Ok(Response::new(CommandResult {
                error: Some(WireError::new(
                    ErrorCode::Invalid,
                    "groups are initialised by `cluster init`",
                )),
                ..Default::default()
            }));
        }
        Ok(Response::new(self.propose_command(req.group_id, cmd).await))
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
        Ok(Response::new(
            query_local(&self.registry, req.group_id, q).await,
        ))
    }
}

pub struct ChunkSvc {
    pub store: Arc<ChunkStore>,
}

fn chunk_error(e: &ChunkError) -> WireError {
    let code = match e {
        ChunkError::NotFound(_) => ErrorCode::NotFound,
        ChunkError::Corrupt { .. } => ErrorCode::Corrupt,
        ChunkError::HashMismatch(_) | ChunkError::TooLarge(_) => ErrorCode::Invalid,
        ChunkError::NoSpace { .. } => ErrorCode::NoSpace,
        ChunkError::Io { .. } => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}

fn parse_id(b: &[u8]) -> Result<ChunkId, WireError> {
    ChunkId::try_from(b).map_err(|e| WireError::new(ErrorCode::Invalid, e.to_string()))
}

#[tonic::async_trait]
impl ChunkService for ChunkSvc {
    async fn put(
        &self,
        request: Request<PutChunkRequest>,
    ) -> Result<Response<PutChunkResponse>, Status> {
        let req = request.into_inner();
        let id = match parse_id(&req.chunk_id) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Response::new(PutChunkResponse {
                    error: Some(e),
                    stored: false,
                }))
            }
        };
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || store.put(&id, &req.data))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match res {
            Ok(stored) => PutChunkResponse {
                error: None,
                stored,
            },
            Err(e) => {
                tracing::warn!(%id, error = %e, "chunk put refused");
                PutChunkResponse {
                    error: Some(chunk_error(&e)),
                    stored: false,
                }
            }
        }))
    }

    async fn get(
        &self,
        request: Request<GetChunkRequest>,
    ) -> Result<Response<GetChunkResponse>, Status> {
        let req = request.into_inner();
        let id = match parse_id(&req.chunk_id) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Response::new(GetChunkResponse {
                    error: Some(e),
                    data: Bytes::new(),
                }))
            }
        };
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || store.get(&id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match res {
            Ok(d) => GetChunkResponse {
                error: None,
                data: Bytes::from(d),
            },
            Err(e) => {
                if matches!(e, ChunkError::Corrupt { .. }) {
                    tracing::error!(%id, error = %e, "corrupt chunk on disk");
                }
                GetChunkResponse {
                    error: Some(chunk_error(&e)),
                    data: Bytes::new(),
                }
            }
        }))
    }

    async fn has(
        &self,
        request: Request<HasChunksRequest>,
    ) -> Result<Response<HasChunksResponse>, Status> {
        let req = request.into_inner();
        let mut present = Vec::with_capacity(req.chunk_ids.len());
        for raw in &req.chunk_ids {
            match parse_id(raw) {
                Ok(id) => present.push(self.store.has(&id)),
                Err(e) => {
                    return Ok(Response::new(HasChunksResponse {
                        error: Some(e),
                        present: vec![],
                    }))
                }
            }
        }
        Ok(Response::new(HasChunksResponse {
            error: None,
            present,
        }))
    }
}

pub struct AdminSvc {
    pub registry: Arc<Registry>,
    pub chunks: Arc<ChunkStore>,
    pub meta: Arc<MetaSvc>,
}

impl AdminSvc {
    /// Proposes each group's InitOp (root directory, cluster id) through
    /// whichever node leads it, retrying until done or `timeout`.
    async fn init_groups(
        &self,
        cluster_id: &str,
        count: u32,
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
                }));
                let mut res = self.meta.propose_command(g, cmd.clone()).await;
                if let Some(e) = &res.error {
                    if e.code() == ErrorCode::NotLeader && !e.leader_addr.is_empty() {
                        res = forward(&e.leader_addr, g, cmd).await;
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

async fn forward(addr: &str, group: u32, cmd: Command) -> CommandResult {
    let res = async {
        let mut c = MetaServiceClient::connect(format!("http://{addr}")).await?;
        let r = c
            .propose(ProposeRequest {
                group_id: group,
                command: Some(cmd),
            })
            .await?;
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
        if let Err(e) = self
            .init_groups(&req.cluster_id, req.group_count, Duration::from_secs(60))
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
        let peers: Vec<Peer> = self
            .registry
            .group(0)
            .map(|g| {
                g.status()
                    .nodes
                    .into_iter()
                    .map(|(node_id, addr)| Peer { node_id, addr })
                    .collect()
            })
            .unwrap_or_default();
        let (free, total) = self.chunks.disk_space().unwrap_or((0, 0));
        Ok(Response::new(StatusResponse {
            error: None,
            node_id: self.registry.node_id(),
            cluster_id: self.registry.cluster_id(),
            peers,
            group_count: groups.len() as u32,
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
        if !g.is_leader() {
            let mut e = WireError::new(
                ErrorCode::NotLeader,
                format!("not the leader of group {}", req.group_id),
            );
            e.leader_id = st.leader.unwrap_or(0);
            e.leader_addr = st
                .nodes
                .iter()
                .find(|(id, _)| Some(*id) == st.leader)
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            return Ok(Response::new(TransferLeaderResponse { error: Some(e) }));
        }
        if let Err(e) = g.transfer_leader(req.to_node).await {
            return fail(ErrorCode::Unavailable, e.to_string());
        }
        Ok(Response::new(TransferLeaderResponse { error: None }))
    }

    async fn trigger_snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
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
