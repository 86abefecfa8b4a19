//! The server side of the Raft transport: checks that a node sent each
//! message (its certificate or its signature), finds the group, and hands
//! the message to openraft; snapshots arrive as a stream into a file.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, VoteRequest,
};
use proto::auth::method;
use proto::raft as pb;
use proto::raft::raft_service_server::RaftService;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::group::Registry;
use crate::network::codes;
use crate::snapshot::SnapshotFile;
use crate::TypeConfig;

/// Group ids a node accepts from peers.
const MAX_GROUPS: u32 = 4096;

/// Serves Raft RPCs for every group this node hosts.
pub struct RaftServer {
    registry: Arc<Registry>,
    snapshot_tmp: PathBuf,
}

impl RaftServer {
    pub fn new(registry: Arc<Registry>, snapshot_tmp: PathBuf) -> Self {
        RaftServer {
            registry,
            snapshot_tmp,
        }
    }

    fn err(code: u32, message: impl Into<String>) -> pb::RaftError {
        pb::RaftError {
            code,
            message: message.into(),
        }
    }

    /// Checks a message's header and finds its group. A node's vote, append
    /// or snapshot may create a replica of a group this node does not host
    /// yet (a new cluster's node at `cluster init`, a node restored from
    /// scratch); a leader transfer never does. Callers have checked that a
    /// node of this cluster (its certificate or its signature) sent it.
    async fn check(
        &self,
        h: &Option<pb::RaftHeader>,
        may_create: bool,
    ) -> Result<crate::Raft, pb::RaftError> {
        let h = h
            .as_ref()
            .ok_or_else(|| Self::err(codes::MALFORMED, "raft message without header"))?;
        // Addressed to this node before anything else is looked at: a
        // message for another node must change nothing here.
        if h.to_node != self.registry.node_id() {
            return Err(Self::err(
                codes::WRONG_NODE,
                format!(
                    "this is node {}, not node {}",
                    self.registry.node_id(),
                    h.to_node
                ),
            ));
        }
        let mine = self.registry.cluster_id();
        if mine.is_empty() {
            if !may_create {
                return Err(Self::err(
                    codes::UNKNOWN_GROUP,
                    format!("node {} belongs to no cluster yet", self.registry.node_id()),
                ));
            }
            // A fresh node joins the cluster whose nodes first contact it.
            self.registry
                .adopt_cluster(&h.cluster_id)
                .map_err(|e| Self::err(codes::FATAL, e.to_string()))?;
        } else if h.cluster_id != mine {
            tracing::error!(
                from = h.from_node,
                theirs = %h.cluster_id,
                ours = %mine,
                "refusing raft message from another cluster"
            );
            return Err(Self::err(
                codes::WRONG_CLUSTER,
                format!(
                    "node {} belongs to cluster {mine}, not to cluster {}",
                    self.registry.node_id(),
                    h.cluster_id
                ),
            ));
        }
        if let Some(r) = self.registry.raft(h.group_id) {
            return Ok(r);
        }
        if !may_create {
            return Err(Self::err(
                codes::UNKNOWN_GROUP,
                format!("group {} is not hosted here", h.group_id),
            ));
        }
        if h.group_id >= MAX_GROUPS {
            return Err(Self::err(
                codes::UNKNOWN_GROUP,
                format!("group {} is out of range", h.group_id),
            ));
        }
        self.registry
            .ensure_group(h.group_id)
            .await
            .map(|g| g.raft().clone())
            .map_err(|e| Self::err(codes::UNKNOWN_GROUP, e.to_string()))
    }

    /// Checks one piece of a signed snapshot stream (no-op when a node
    /// certificate vouched for the stream).
    fn check_piece(
        &self,
        chain: &mut Option<[u8; 32]>,
        piece: &pb::SnapshotChunk,
    ) -> Result<(), Status> {
        use prost::Message;
        let Some(prev) = chain.as_ref() else {
            return Ok(());
        };
        let secret = self.registry.wire().secret().ok_or_else(|| {
            Status::permission_denied("this node has no cluster secret to check the snapshot")
        })?;
        let mut bare = piece.clone();
        bare.mac = Bytes::new();
        let next = secret
            .verify_chain(prev, &bare.encode_to_vec(), &piece.mac)
            .map_err(|e| Status::permission_denied(format!("snapshot piece: {e}")))?;
        *chain = Some(next);
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEnvelope>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        self.registry
            .wire()
            .check_node_call(&request, method::APPEND)?;
        let env = request.into_inner();
        let raft = match self.check(&env.header, true).await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::AppendReply {
                    response: None,
                    error: Some(e),
                    incarnation: self.registry.incarnation(),
                }))
            }
        };
        let parse = || -> Result<AppendEntriesRequest<TypeConfig>, convert::Malformed> {
            let r = env
                .request
                .as_ref()
                .ok_or_else(|| convert::Malformed("no request".into()))?;
            Ok(AppendEntriesRequest {
                vote: convert::vote_from_pb(
                    r.vote
                        .as_ref()
                        .ok_or_else(|| convert::Malformed("no vote".into()))?,
                )?,
                prev_log_id: convert::opt_log_id_from_pb(&r.prev_log_id)?,
                entries: r
                    .entries
                    .iter()
                    .map(convert::entry_from_pb)
                    .collect::<Result<_, _>>()?,
                leader_commit: convert::opt_log_id_from_pb(&r.leader_commit)?,
            })
        };
        let req = match parse() {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::AppendReply {
                    response: None,
                    error: Some(Self::err(codes::MALFORMED, e.to_string())),
                    incarnation: self.registry.incarnation(),
                }))
            }
        };
        use pb::append_entries_response::Result as R;
        let reply = match raft.append_entries(req).await {
            Ok(resp) => {
                let mut out = pb::AppendEntriesResponse::default();
                match resp {
                    AppendEntriesResponse::Success => out.result = Some(R::Success(true)),
                    AppendEntriesResponse::PartialSuccess(Some(l)) => {
                        out.result = Some(R::PartialSuccess(convert::log_id_to_pb(&l)))
                    }
                    AppendEntriesResponse::PartialSuccess(None) => out.partial_none = true,
                    AppendEntriesResponse::Conflict => out.result = Some(R::Conflict(true)),
                    AppendEntriesResponse::HigherVote(v) => {
                        out.result = Some(R::HigherVote(convert::vote_to_pb(&v)))
                    }
                }
                pb::AppendReply {
                    response: Some(out),
                    error: None,
                    incarnation: self.registry.incarnation(),
                }
            }
            Err(e) => pb::AppendReply {
                response: None,
                error: Some(Self::err(codes::FATAL, e.to_string())),
                incarnation: self.registry.incarnation(),
            },
        };
        Ok(Response::new(reply))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteEnvelope>,
    ) -> Result<Response<pb::VoteReply>, Status> {
        self.registry
            .wire()
            .check_node_call(&request, method::VOTE)?;
        let env = request.into_inner();
        // `cluster init` bootstraps every group on one node, whose first
        // votes create the other nodes' replicas.
        let raft = match self.check(&env.header, true).await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::VoteReply {
                    response: None,
                    error: Some(e),
                }))
            }
        };
        let parse = || -> Result<VoteRequest<TypeConfig>, convert::Malformed> {
            let r = env
                .request
                .as_ref()
                .ok_or_else(|| convert::Malformed("no request".into()))?;
            let mut v = VoteRequest::new(
                convert::vote_from_pb(
                    r.vote
                        .as_ref()
                        .ok_or_else(|| convert::Malformed("no vote".into()))?,
                )?,
                convert::opt_log_id_from_pb(&r.last_log_id)?,
            );
            v.leadership_transfer = r.leadership_transfer;
            Ok(v)
        };
        let req = match parse() {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::VoteReply {
                    response: None,
                    error: Some(Self::err(codes::MALFORMED, e.to_string())),
                }))
            }
        };
        let reply = match raft.vote(req).await {
            Ok(v) => pb::VoteReply {
                response: Some(pb::VoteResponse {
                    vote: Some(convert::vote_to_pb(&v.vote)),
                    vote_granted: v.vote_granted,
                    last_log_id: v.last_log_id.as_ref().map(convert::log_id_to_pb),
                }),
                error: None,
            },
            Err(e) => pb::VoteReply {
                response: None,
                error: Some(Self::err(codes::FATAL, e.to_string())),
            },
        };
        Ok(Response::new(reply))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let mut chain = self
            .registry
            .wire()
            .check_node_stream(&request, method::SNAPSHOT)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_piece(&mut chain, &first)?;
        let raft = match self.check(&first.header, true).await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::SnapshotReply {
                    vote: None,
                    error: Some(e),
                }))
            }
        };
        let malformed = |m: String| {
            Ok(Response::new(pb::SnapshotReply {
                vote: None,
                error: Some(Self::err(codes::MALFORMED, m)),
            }))
        };
        let vote = match first.vote.as_ref().map(convert::vote_from_pb) {
            Some(Ok(v)) => v,
            _ => return malformed("snapshot without a valid vote".into()),
        };
        let meta = match first.meta.as_ref().map(convert::snapshot_meta_from_pb) {
            Some(Ok(m)) => m,
            _ => return malformed("snapshot without valid meta".into()),
        };
        let group = first
            .header
            .as_ref()
            .map(|h| h.group_id)
            .unwrap_or_default();
        tokio::fs::create_dir_all(&self.snapshot_tmp)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let path = self.snapshot_tmp.join(format!(
            "incoming-g{group}-{}.snap",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let write = async {
            let mut f = tokio::fs::File::create(&path).await?;
            f.write_all(&first.data).await?;
            let mut done = first.done;
            while !done {
                let Some(c) = stream.message().await.map_err(std::io::Error::other)? else {
                    return Err(std::io::Error::other("snapshot stream ended early"));
                };
                self.check_piece(&mut chain, &c)
                    .map_err(|e| std::io::Error::other(e.message().to_string()))?;
                f.write_all(&c.data).await?;
                done = c.done;
            }
            f.sync_all().await?;
            Ok::<_, std::io::Error>(())
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Status::internal(format!("receiving snapshot: {e}")));
        }
        let file = SnapshotFile::open(&path).map_err(|e| Status::internal(e.to_string()))?;
        let snap = openraft::storage::Snapshot {
            meta,
            snapshot: file,
        };
        match raft.install_full_snapshot(vote, snap).await {
            Ok(r) => Ok(Response::new(pb::SnapshotReply {
                vote: Some(convert::vote_to_pb(&r.vote)),
                error: None,
            })),
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Ok(Response::new(pb::SnapshotReply {
                    vote: None,
                    error: Some(Self::err(codes::FATAL, e.to_string())),
                }))
            }
        }
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderEnvelope>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        self.registry
            .wire()
            .check_node_call(&request, method::TRANSFER)?;
        let env = request.into_inner();
        let raft = match self.check(&env.header, false).await {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(pb::TransferLeaderReply { error: Some(e) })),
        };
        let parse = || -> Result<TransferLeaderRequest<TypeConfig>, convert::Malformed> {
            let r = env
                .request
                .as_ref()
                .ok_or_else(|| convert::Malformed("no request".into()))?;
            Ok(TransferLeaderRequest::new(
                convert::vote_from_pb(
                    r.from_leader
                        .as_ref()
                        .ok_or_else(|| convert::Malformed("no vote".into()))?,
                )?,
                r.to_node_id,
                convert::opt_log_id_from_pb(&r.last_log_id)?,
            ))
        };
        let req = match parse() {
            Ok(r) => r,
            Err(e) => {
                return Ok(Response::new(pb::TransferLeaderReply {
                    error: Some(Self::err(codes::MALFORMED, e.to_string())),
                }))
            }
        };
        let error = match raft.handle_transfer_leader(req).await {
            Ok(Ok(())) => None,
            Ok(Err(rejected)) => Some(Self::err(codes::FATAL, rejected.to_string())),
            Err(fatal) => Some(Self::err(codes::FATAL, fatal.to_string())),
        };
        Ok(Response::new(pb::TransferLeaderReply { error }))
    }
}
