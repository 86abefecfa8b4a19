//! The chunk service: puts (with the node's receipt), reads, presence
//! checks, and the calls only nodes make (deletion, replica copies).

use std::sync::Arc;

use bytes::Bytes;
use proto::meta::{Error as WireError, ErrorCode};
use proto::storage::chunk_service_server::ChunkService;
use proto::storage::{
    DeleteChunksRequest, DeleteChunksResponse, GetChunkRequest, GetChunkResponse, HasChunksRequest,
    HasChunksResponse, PutChunkRequest, PutChunkResponse, ReplicateRequest, ReplicateResponse,
    ScrubProgressRequest, ScrubStatus,
};
use proto::transport::Transport;
use proto::ChunkId;
use tonic::{Request, Response, Status};

use crate::chunkstore::{ChunkError, ChunkStore};
use crate::repair::ChunkClients;
use crate::scrub::Scrub;

pub struct ChunkSvc {
    pub store: Arc<ChunkStore>,
    pub clients: Arc<ChunkClients>,
    pub scrub: Arc<Scrub>,
    /// This node's credentials: who may delete and replicate.
    pub wire: Transport,
}

/// Most chunk ids one `Has` call may ask about: each costs a stat.
pub const MAX_HAS_IDS: usize = 4096;

pub fn chunk_error(e: &ChunkError) -> WireError {
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

fn parse_ids(raw: &[Bytes]) -> Result<Vec<ChunkId>, WireError> {
    raw.iter().map(|b| parse_id(b)).collect()
}

#[tonic::async_trait]
impl ChunkService for ChunkSvc {
    async fn put(
        &self,
        request: Request<PutChunkRequest>,
    ) -> Result<Response<PutChunkResponse>, Status> {
        let tag = proto::request_tag_of(&request).unwrap_or_default();
        let req = request.into_inner();
        let id = match parse_id(&req.chunk_id) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Response::new(PutChunkResponse {
                    error: Some(e),
                    stored: false,
                    receipt: None,
                }))
            }
        };
        let store = self.store.clone();
        let len = req.data.len();
        let res = tokio::task::spawn_blocking(move || store.put(&id, &req.data))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match res {
            Ok(stored) => {
                tracing::debug!(req = %tag, %id, bytes = len, new = stored, "chunk stored");
                PutChunkResponse {
                    error: None,
                    stored,
                    receipt: self.wire.receipt(&id.0, len as u64),
                }
            }
            Err(e) => {
                tracing::warn!(req = %tag, %id, error = %e, "chunk put refused");
                PutChunkResponse {
                    error: Some(chunk_error(&e)),
                    stored: false,
                    receipt: None,
                }
            }
        }))
    }

    async fn get(
        &self,
        request: Request<GetChunkRequest>,
    ) -> Result<Response<GetChunkResponse>, Status> {
        let tag = proto::request_tag_of(&request).unwrap_or_default();
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
            Ok(d) => {
                tracing::debug!(req = %tag, %id, bytes = d.len(), "chunk read");
                GetChunkResponse {
                    error: None,
                    data: Bytes::from(d),
                }
            }
            Err(e) => {
                tracing::debug!(req = %tag, %id, error = %e, "chunk read failed");
                if matches!(e, ChunkError::Corrupt { .. }) {
                    tracing::error!(req = %tag, %id, error = %e, "corrupt chunk on disk");
                    // Never read it again; a scrub then finds the replica
                    // missing and repair copies a good one back.
                    let store = self.store.clone();
                    let moved = tokio::task::spawn_blocking(move || store.quarantine(&id)).await;
                    if let Ok(Err(q)) = moved {
                        tracing::error!(%id, error = %q, "cannot move a corrupt chunk aside");
                    }
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
        if req.chunk_ids.len() > MAX_HAS_IDS {
            return Ok(Response::new(HasChunksResponse {
                error: Some(WireError::new(
                    ErrorCode::Invalid,
                    format!(
                        "{} chunk ids in one call; at most {MAX_HAS_IDS}",
                        req.chunk_ids.len()
                    ),
                )),
                present: vec![],
            }));
        }
        let ids = match parse_ids(&req.chunk_ids) {
            Ok(ids) => ids,
            Err(e) => {
                return Ok(Response::new(HasChunksResponse {
                    error: Some(e),
                    present: vec![],
                }))
            }
        };
        // Stats block: never on the runtime's threads, which carry Raft's
        // heartbeats.
        let store = self.store.clone();
        let present = tokio::task::spawn_blocking(move || {
            ids.iter().map(|id| store.has(id)).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(HasChunksResponse {
            error: None,
            present,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteChunksRequest>,
    ) -> Result<Response<DeleteChunksResponse>, Status> {
        self.wire
            .check_node_call(&request, proto::auth::method::DELETE)?;
        let req = request.into_inner();
        let ids = match parse_ids(&req.chunk_ids) {
            Ok(ids) => ids,
            Err(e) => {
                return Ok(Response::new(DeleteChunksResponse {
                    error: Some(e),
                    ..Default::default()
                }))
            }
        };
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || {
            let (mut n, mut bytes) = (0, 0);
            for id in &ids {
                if let Some(b) = store.delete_older(id, req.older_than_ms)? {
                    n += 1;
                    bytes += b;
                }
            }
            Ok::<_, ChunkError>((n, bytes))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match res {
            Ok((deleted, bytes)) => DeleteChunksResponse {
                error: None,
                deleted,
                bytes,
            },
            Err(e) => DeleteChunksResponse {
                error: Some(chunk_error(&e)),
                ..Default::default()
            },
        }))
    }

    async fn scrub_progress(
        &self,
        _request: Request<ScrubProgressRequest>,
    ) -> Result<Response<ScrubStatus>, Status> {
        Ok(Response::new(self.scrub.status()))
    }

    async fn replicate(
        &self,
        request: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        self.wire
            .check_node_call(&request, proto::auth::method::REPLICATE)?;
        let tag = proto::request_tag_of(&request).unwrap_or_default();
        let req = request.into_inner();
        let reply = |error: Option<WireError>, bytes: u64| {
            Ok(Response::new(ReplicateResponse { error, bytes }))
        };
        let id = match parse_id(&req.chunk_id) {
            Ok(id) => id,
            Err(e) => return reply(Some(e), 0),
        };
        // A copy already here counts only if it still hashes right, and
        // then as written now, so a sweep that judged it an orphan a
        // moment ago keeps it.
        let store = self.store.clone();
        let held = tokio::task::spawn_blocking(move || store.refresh(&id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match held {
            Ok(true) => return reply(None, 0),
            Ok(false) => {}
            Err(e) => return reply(Some(chunk_error(&e)), 0),
        }
        let mut errors = Vec::new();
        for src in &req.sources {
            let Some(mut c) = self.clients.get(src) else {
                errors.push(format!("{src}: bad address"));
                continue;
            };
            let mut get = Request::new(GetChunkRequest {
                chunk_id: req.chunk_id.clone(),
            });
            proto::tag_request(&mut get, &tag);
            let r = match c.get(get).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    errors.push(format!("{src}: {}", s.message()));
                    continue;
                }
            };
            if let Some(e) = r.error {
                errors.push(format!("{src}: {}", e.message));
                continue;
            }
            if !id.verify(&r.data) {
                errors.push(format!("{src}: returned bytes that do not match the id"));
                continue;
            }
            let (store, data) = (self.store.clone(), r.data);
            let len = data.len() as u64;
            let res = tokio::task::spawn_blocking(move || store.put(&id, &data))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            tracing::debug!(req = %tag, %id, from = %src, bytes = len, ok = res.is_ok(), "replica copied");
            return match res {
                Ok(_) => reply(None, len),
                Err(e) => reply(Some(chunk_error(&e)), 0),
            };
        }
        reply(
            Some(WireError::new(
                ErrorCode::Unavailable,
                format!("chunk {id}: no source returned it: {}", errors.join("; ")),
            )),
            0,
        )
    }
}
