//! gRPC transport for Raft. One connection per node pair carries every
//! group; each message names its cluster and group. Snapshots stream as
//! bounded pieces read from and written to files.

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::BasicNode;
use proto::auth::method;
use proto::raft as pb;
use proto::raft::raft_service_client::RaftServiceClient;
use proto::MAX_MESSAGE_BYTES;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::convert::{self, Vote};
use crate::snapshot::SnapshotFile;
use crate::TypeConfig;

/// Bytes of entries one append carries at most (a single larger entry
/// still goes alone): a follower far behind catches up in bounded
/// messages, never one that exceeds the message limit or holds the
/// connection for long.
const MAX_APPEND_BYTES: usize = 8 << 20;

/// How many of `entries`, from the first, fit in `budget` encoded bytes;
/// at least one when there is one.
fn prefix_within(entries: &[pb::Entry], budget: usize) -> usize {
    use prost::Message;
    let mut used = 0usize;
    for (i, e) in entries.iter().enumerate() {
        used += e.encoded_len();
        if used > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// Bytes of snapshot data per streamed message.
const SNAPSHOT_PIECE: usize = 1 << 20;

/// Stable codes of Raft transport errors (docs/ERRORS.md).
pub mod codes {
    pub const WRONG_CLUSTER: u32 = 1;
    pub const UNKNOWN_GROUP: u32 = 2;
    pub const MALFORMED: u32 = 3;
    pub const FATAL: u32 = 4;
    pub const WRONG_NODE: u32 = 5;
}

/// Which of a peer's two connections a message takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Heartbeats (appends without entries), votes, leader transfers.
    Control,
    /// Appends that carry entries, snapshots.
    Bulk,
}

/// Outgoing connections of this node.
pub struct Transport {
    node_id: u64,
    cluster_id: RwLock<String>,
    channels: Mutex<HashMap<String, Channel>>,
    wire: proto::transport::Transport,
    /// Peers that stopped answering, and since when: logged once when they
    /// go and once when they return, not on every heartbeat of every group.
    down: Mutex<HashMap<u64, Instant>>,
    /// The incarnation (run) each peer last answered with, per group.
    incarnations: Mutex<HashMap<(u32, u64), u64>>,
}

impl Transport {
    pub fn new(node_id: u64, cluster_id: String, wire: proto::transport::Transport) -> Arc<Self> {
        Arc::new(Transport {
            node_id,
            cluster_id: RwLock::new(cluster_id),
            channels: Mutex::new(HashMap::new()),
            wire,
            down: Mutex::new(HashMap::new()),
            incarnations: Mutex::new(HashMap::new()),
        })
    }

    /// Notes how a call to `target` went (`None`: it answered).
    fn observe(&self, target: u64, addr: &str, err: Option<&Status>) {
        let gone = err.is_some_and(|s| {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        });
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match (gone, down.get(&target)) {
            (true, None) => {
                down.insert(target, Instant::now());
                tracing::warn!(
                    node = target,
                    addr,
                    error = err.map(|s| s.message()).unwrap_or_default(),
                    "peer unreachable; retrying until it answers"
                );
            }
            (false, Some(since)) if err.is_none() => {
                tracing::info!(
                    node = target,
                    addr,
                    after_secs = since.elapsed().as_secs(),
                    "peer answers again"
                );
                down.remove(&target);
            }
            _ => {}
        }
    }

    pub fn set_cluster_id(&self, id: &str) {
        *self.cluster_id.write().unwrap_or_else(|e| e.into_inner()) = id.to_string();
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn wire(&self) -> &proto::transport::Transport {
        &self.wire
    }

    /// The connection to `addr` for one kind of traffic. Heartbeats, votes
    /// and leader transfers have a connection of their own, so they never
    /// wait behind a large append or a snapshot in the same TCP stream
    /// (a stalled heartbeat is an election).
    fn client(&self, addr: &str, lane: Lane) -> Result<RaftServiceClient<Channel>, Status> {
        let key = match lane {
            Lane::Control => addr.to_string(),
            Lane::Bulk => format!("{addr}#bulk"),
        };
        let mut chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let ch = match chans.get(&key) {
            Some(c) => c.clone(),
            None => {
                let ep = self
                    .wire
                    .endpoint(addr)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(proto::CONNECTION_WINDOW_BYTES)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(3));
                let c = ep.connect_lazy();
                chans.insert(key, c.clone());
                c
            }
        };
        Ok(RaftServiceClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Records the incarnation `target` answered with for `group`; true if
    /// it differs from the one it answered with before (it restarted).
    fn incarnation_changed(&self, group: u32, target: u64, incarnation: u64) -> bool {
        if incarnation == 0 {
            return false;
        }
        let mut seen = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        let before = seen.insert((group, target), incarnation);
        before.is_some_and(|b| b != incarnation)
    }

    /// `raft` is filled in once the group's Raft exists (it needs the
    /// factory first).
    pub fn factory(
        self: &Arc<Self>,
        group: u32,
        raft: Arc<OnceLock<crate::Raft>>,
    ) -> NetworkFactory {
        NetworkFactory {
            group,
            transport: self.clone(),
            raft,
        }
    }
}

pub struct NetworkFactory {
    group: u32,
    transport: Arc<Transport>,
    raft: Arc<OnceLock<crate::Raft>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupClient {
        GroupClient {
            group: self.group,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            raft: self.raft.clone(),
        }
    }
}

/// Sends one group's Raft messages to one node.
pub struct GroupClient {
    group: u32,
    target: u64,
    addr: String,
    transport: Arc<Transport>,
    raft: Arc<OnceLock<crate::Raft>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetErr(String);

fn unreachable<E: std::fmt::Display>(e: E) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&NetErr(e.to_string())))
}

fn network<E: std::fmt::Display>(e: E) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&NetErr(e.to_string())))
}

fn status_err(s: Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            unreachable(s.message())
        }
        _ => network(s.message()),
    }
}

fn remote_err(e: pb::RaftError) -> RPCError<TypeConfig> {
    // A peer that refuses us (wrong cluster, group not hosted) is as good as
    // unreachable to this group: back off and retry.
    unreachable(format!("peer refused (code {}): {}", e.code, e.message))
}

impl GroupClient {
    fn header(&self) -> pb::RaftHeader {
        pb::RaftHeader {
            cluster_id: self.transport.cluster_id(),
            group_id: self.group,
            from_node: self.transport.node_id,
            to_node: self.target,
        }
    }
}

impl GroupClient {
    /// The target restarted. If it lost part of its log (restored from
    /// scratch or from an older copy), a leader that remembers it further
    /// ahead would send it only what follows, refused forever, since Raft
    /// assumes a follower never loses what it acknowledged; the group could
    /// stall. Allow its replication to start over should its log prove
    /// shorter, before this reply (which would show it) reaches Raft.
    async fn allow_log_restart(&self) {
        let Some(raft) = self.raft.get() else { return };
        tracing::info!(
            group = self.group,
            node = self.target,
            "node restarted; its log is replicated from the beginning if it lost entries"
        );
        match raft.trigger().allow_next_revert(&self.target, true).await {
            Ok(Ok(())) => {}
            // Not the leader any more, or the node is not a member: nothing
            // of its progress is remembered here.
            Ok(Err(e)) => tracing::debug!(group = self.group, error = %e, "allow_next_revert"),
            Err(e) => tracing::warn!(group = self.group, error = %e, "allow_next_revert"),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for GroupClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // At most MAX_APPEND_BYTES of entries per message (at least one):
        // the rest follow in the next append, and the follower is told to
        // commit no further than what it was sent.
        let mut entries: Vec<pb::Entry> = rpc.entries.iter().map(convert::entry_to_pb).collect();
        let keep = prefix_within(&entries, MAX_APPEND_BYTES);
        let last_sent = (keep < entries.len()).then(|| rpc.entries[keep - 1].log_id);
        entries.truncate(keep);
        let leader_commit = match (&rpc.leader_commit, &last_sent) {
            (Some(c), Some(l)) if c.index > l.index => Some(*l),
            (c, _) => *c,
        };
        let req = pb::AppendEnvelope {
            header: Some(self.header()),
            request: Some(pb::AppendEntriesRequest {
                vote: Some(convert::vote_to_pb(&rpc.vote)),
                prev_log_id: rpc.prev_log_id.as_ref().map(convert::log_id_to_pb),
                entries,
                leader_commit: leader_commit.as_ref().map(convert::log_id_to_pb),
            }),
        };
        let lane = if rpc.entries.is_empty() {
            Lane::Control
        } else {
            Lane::Bulk
        };
        let mut c = self
            .transport
            .client(&self.addr, lane)
            .map_err(unreachable)?;
        let mut r = Request::new(req);
        r.set_timeout(option.soft_ttl());
        self.transport.wire.sign(method::APPEND, &mut r);
        let reply = c.append_entries(r).await;
        self.transport
            .observe(self.target, &self.addr, reply.as_ref().err());
        let reply = reply.map_err(status_err)?.into_inner();
        if self
            .transport
            .incarnation_changed(self.group, self.target, reply.incarnation)
        {
            self.allow_log_restart().await;
        }
        if let Some(e) = reply.error {
            return Err(remote_err(e));
        }
        let resp = reply
            .response
            .ok_or_else(|| network("empty append reply"))?;
        use pb::append_entries_response::Result as R;
        Ok(match resp.result {
            Some(R::Success(_)) => match last_sent {
                Some(l) => AppendEntriesResponse::PartialSuccess(Some(l)),
                None => AppendEntriesResponse::Success,
            },
            Some(R::PartialSuccess(l)) => AppendEntriesResponse::PartialSuccess(Some(
                convert::log_id_from_pb(&l).map_err(network)?,
            )),
            Some(R::Conflict(_)) => AppendEntriesResponse::Conflict,
            Some(R::HigherVote(v)) => {
                AppendEntriesResponse::HigherVote(convert::vote_from_pb(&v).map_err(network)?)
            }
            None if resp.partial_none => AppendEntriesResponse::PartialSuccess(None),
            None => return Err(network("append reply without a result")),
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = pb::VoteEnvelope {
            header: Some(self.header()),
            request: Some(pb::VoteRequest {
                vote: Some(convert::vote_to_pb(&rpc.vote)),
                last_log_id: rpc.last_log_id.as_ref().map(convert::log_id_to_pb),
                leadership_transfer: rpc.leadership_transfer,
            }),
        };
        let mut c = self
            .transport
            .client(&self.addr, Lane::Control)
            .map_err(unreachable)?;
        let mut r = Request::new(req);
        r.set_timeout(option.soft_ttl());
        self.transport.wire.sign(method::VOTE, &mut r);
        let reply = c.vote(r).await;
        self.transport
            .observe(self.target, &self.addr, reply.as_ref().err());
        let reply = reply.map_err(status_err)?.into_inner();
        if let Some(e) = reply.error {
            return Err(remote_err(e));
        }
        let v = reply.response.ok_or_else(|| network("empty vote reply"))?;
        let vote = convert::vote_from_pb(v.vote.as_ref().ok_or_else(|| network("vote missing"))?)
            .map_err(network)?;
        Ok(VoteResponse::new(
            vote,
            convert::opt_log_id_from_pb(&v.last_log_id).map_err(network)?,
            v.vote_granted,
        ))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let env = pb::TransferLeaderEnvelope {
            header: Some(self.header()),
            request: Some(pb::TransferLeaderRequest {
                from_leader: Some(convert::vote_to_pb(req.from_leader())),
                to_node_id: *req.to_node_id(),
                last_log_id: req.last_log_id().map(convert::log_id_to_pb),
            }),
        };
        let mut c = self
            .transport
            .client(&self.addr, Lane::Control)
            .map_err(unreachable)?;
        let mut r = Request::new(env);
        r.set_timeout(option.soft_ttl());
        self.transport.wire.sign(method::TRANSFER, &mut r);
        let reply = c.transfer_leader(r).await.map_err(status_err)?.into_inner();
        match reply.error {
            Some(e) => Err(remote_err(e)),
            None => Ok(Ok(())),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = self.header();
        let meta = convert::snapshot_meta_to_pb(&snapshot.meta, "");
        let mut file = snapshot.snapshot.file;
        // Read the file on a blocking thread, piece by piece, into a bounded channel.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::SnapshotChunk>(4);
        let vote_pb = convert::vote_to_pb(&vote);
        // The call is signed before its pieces exist; each piece then
        // carries a MAC chained from the signature's.
        let mut opening = Request::new(());
        let mut chain = self
            .transport
            .wire
            .sign_stream(method::SNAPSHOT, &mut opening);
        let secret = self.transport.wire.secret().cloned();
        tokio::task::spawn_blocking(move || {
            let mut first = true;
            loop {
                let mut buf = vec![0u8; SNAPSHOT_PIECE];
                let n = match read_full(&mut file, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!("reading snapshot file: {e}");
                        return;
                    }
                };
                buf.truncate(n);
                let done = n < SNAPSHOT_PIECE;
                let mut chunk = pb::SnapshotChunk {
                    header: first.then(|| header.clone()),
                    vote: first.then_some(vote_pb),
                    meta: first.then(|| meta.clone()),
                    data: Bytes::from(buf),
                    done,
                    mac: Bytes::new(),
                };
                if let (Some(prev), Some(s)) = (chain.as_ref(), secret.as_ref()) {
                    use prost::Message;
                    let m = s.chain(prev, &chunk.encode_to_vec());
                    chunk.mac = Bytes::copy_from_slice(&m);
                    chain = Some(m);
                }
                first = false;
                if tx.blocking_send(chunk).is_err() || done {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut c = self
            .transport
            .client(&self.addr, Lane::Bulk)
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&NetErr(e.to_string()))))?;
        let mut req = Request::new(stream);
        *req.metadata_mut() = opening.metadata().clone();
        req.set_timeout(option.hard_ttl().max(Duration::from_secs(60)));
        let send = c.install_snapshot(req);
        let reply = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply
            .map_err(|s| {
                StreamingError::Unreachable(Unreachable::new(&NetErr(s.message().to_string())))
            })?
            .into_inner();
        if let Some(e) = reply.error {
            return Err(StreamingError::Unreachable(Unreachable::new(&NetErr(
                format!("peer refused snapshot (code {}): {}", e.code, e.message),
            ))));
        }
        let v = reply.vote.ok_or_else(|| {
            StreamingError::Network(NetworkError::new(&NetErr(
                "snapshot reply without vote".into(),
            )))
        })?;
        let v = convert::vote_from_pb(&v)
            .map_err(|e| StreamingError::Network(NetworkError::new(&NetErr(e.to_string()))))?;
        Ok(SnapshotResponse::new(v))
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_cut_to_the_byte_budget_but_never_empty() {
        let entry = |n: usize| pb::Entry {
            log_id: None,
            payload: Some(pb::entry::Payload::Normal(Bytes::from(vec![1u8; n]))),
        };
        assert_eq!(prefix_within(&[], 100), 0);
        assert_eq!(
            prefix_within(&[entry(500)], 100),
            1,
            "one big entry goes alone"
        );
        let small: Vec<_> = (0..10).map(|_| entry(10)).collect();
        assert_eq!(prefix_within(&small, 1000), 10);
        assert_eq!(prefix_within(&small, 30), 2, "12 bytes each");
        let mixed = vec![entry(10), entry(10), entry(500), entry(10)];
        assert_eq!(prefix_within(&mixed, 100), 2);
    }

    #[test]
    fn a_new_incarnation_is_noticed_once_per_group() {
        let t = Transport::new(1, "c".into(), proto::transport::Transport::plain());
        assert!(!t.incarnation_changed(0, 3, 7), "first answer");
        assert!(!t.incarnation_changed(0, 3, 7), "same run");
        assert!(
            !t.incarnation_changed(1, 3, 9),
            "another group's first answer"
        );
        assert!(!t.incarnation_changed(0, 3, 0), "a node that does not say");
        assert!(t.incarnation_changed(0, 3, 8), "restarted");
        assert!(!t.incarnation_changed(0, 3, 8), "noticed once");
        assert!(t.incarnation_changed(1, 3, 8), "and once in each group");
    }
}
