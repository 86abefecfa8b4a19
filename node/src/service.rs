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
    SnapshotResponse, StatusRequest, StatusResponse,
};
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::meta_service_server::MetaService;
use proto::meta::{
    command::Op, Command, CommandResult, Error as WireError, ErrorCode, InitOp, ProposeRequest,
    QueryRequest, QueryResult, Timespec,
};
use proto::storage::chunk_service_server::ChunkService;
use proto::storage::{
    GetChunkRequest, GetChunkResponse, HasChunksRequest, HasChunksResponse, PutChunkRequest,
    PutChunkResponse,
};
use proto::{ChunkId, FORMAT_VERSION};
use raft::{GroupError, KvView, Registry};
use tonic::{Request, Response, Status};

use crate::app::ViewKv;
use crate::chunkstore::{ChunkError, ChunkStore};
use crate::namespace::Namespace;

fn group_error(e: GroupError) -> WireError {
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

pub struct MetaSvc {
    pub registry: Arc<Registry>,
}

impl MetaSvc {
    pub async fn propose_command(&self, group_id: u32, mut cmd: Command) -> CommandResult {
        let Some(group) = self.registry.group(group_id) else {
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
        let fail = |e: WireError| {
            Ok(Response::new(QueryResult {
                error: Some(e),
                ..Default::default()
            }))
        };
        let Some(group) = self.registry.group(req.group_id) else {
            return fail(WireError::new(
                ErrorCode::Unavailable,
                format!("group {} is not hosted on this node", req.group_id),
            ));
        };
        let Some(q) = req.query else {
            return fail(WireError::new(
                ErrorCode::Invalid,
                "request carries no query",
            ));
        };
        if let Err(e) = group.read_barrier().await {
            return fail(group_error(e));
        }
        let store = self.registry.store().clone();
        let gid = req.group_id;
        let res = tokio::task::spawn_blocking(move || {
            let view = KvView::new(&store);
            Namespace::new(gid).query(&ViewKv(&view), &q)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match res {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => fail(e.to_wire()),
        }
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
                let cmd = Command {
                    version: FORMAT_VERSION,
                    now: Some(Timespec::now()),
                    client_id: 0,
                    request_seq: 0,
                    acked_below: 0,
                    op: Some(Op::Init(InitOp {
                        cluster_id: cluster_id.to_string(),
                        group_id: g,
                        group_count: count,
                    })),
                };
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
        let groups: Vec<PbGroupStatus> = self
            .registry
            .groups()
            .iter()
            .map(|g| {
                let s = g.status();
                PbGroupStatus {
                    group_id: s.group,
                    leader_id: s.leader.unwrap_or(0),
                    term: s.term,
                    voters: s.voters,
                    last_applied: s.last_applied,
                    last_log_index: s.last_log_index,
                    snapshot_index: s.snapshot_index,
                    state: s.state,
                }
            })
            .collect();
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
