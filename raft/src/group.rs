//! Raft groups hosted by a node, and the registry that creates, finds and
//! reports on them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, ReadPolicy, ServerState, SnapshotPolicy};

use crate::network::Transport;
use crate::state_machine::{Application, GroupStateMachine};
use crate::store::{Store, StoreError};
use crate::{AppRequest, LogStore, Raft};

/// Tunables of every group on a node.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, for slow followers.
    pub keep_behind_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("not the leader of group {group}")]
    NotLeader {
        group: u32,
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    #[error("group {0} is not hosted on this node")]
    UnknownGroup(u32),
    #[error("group {group} unavailable: {reason}")]
    Unavailable { group: u32, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// A snapshot of one group's Raft state for status reports.
#[derive(Clone, Debug, Default)]
pub struct GroupStatus {
    pub group: u32,
    pub leader: Option<u64>,
    pub term: u64,
    pub voters: Vec<u64>,
    pub last_applied: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub state: String,
    /// Members' addresses as recorded in the group's membership.
    pub nodes: Vec<(u64, String)>,
}

/// One Raft group on this node.
#[derive(Clone)]
pub struct Group {
    pub id: u32,
    raft: Raft,
}

impl Group {
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    fn not_leader(
        &self,
        f: Option<&openraft::errors::ForwardToLeader<crate::TypeConfig>>,
    ) -> GroupError {
        GroupError::NotLeader {
            group: self.id,
            leader_id: f.and_then(|f| f.leader_id),
            leader_addr: f.and_then(|f| f.leader_node.as_ref().map(|n| n.addr.clone())),
        }
    }

    /// Replicates `command` and returns the application's reply once it has
    /// been applied on this (leader) node.
    pub async fn propose(&self, command: Bytes) -> Result<Bytes, GroupError> {
        match self.raft.client_write(AppRequest(command)).await {
            Ok(r) => Ok(r.data.0),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Err(self.not_leader(Some(f))),
                None => Err(GroupError::Unavailable {
                    group: self.id,
                    reason: e.to_string(),
                }),
            },
        }
    }

    /// Waits until this node, as leader, has applied everything committed
    /// before the call (lease or read index): a read after this is
    /// linearizable.
    pub async fn read_barrier(&self) -> Result<(), GroupError> {
        // A leader that heard from a quorum within its lease (shorter than
        // the election timeout, so no other leader can exist yet) reads
        // without a network round; otherwise it confirms its leadership
        // with a quorum first (read index). The lease assumes the nodes'
        // clocks run at about the same rate (docs/SEMANTICS.md).
        if self
            .raft
            .ensure_linearizable(ReadPolicy::LeaseRead)
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Err(self.not_leader(Some(f))),
                None => Err(GroupError::Unavailable {
                    group: self.id,
                    reason: e.to_string(),
                }),
            },
        }
    }

    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        GroupStatus {
            group: self.id,
            leader: m.current_leader,
            term: m.current_term,
            voters: m.membership_config.membership().voter_ids().collect(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            nodes: m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// The last log index `node` is known to hold (leader only).
    pub fn replication_matched(&self, node: u64) -> Option<u64> {
        let m = self.raft.metrics().borrow_watched().clone();
        m.replication
            .as_ref()
            .and_then(|r| r.get(&node).cloned())
            .flatten()
            .map(|l| l.index)
    }

    /// Whether `node` acknowledged this leader's heartbeat or replication
    /// within `within` (false when this node does not lead).
    pub fn heard_from(&self, node: u64, within: Duration) -> bool {
        use openraft::Instant as _;
        let m = self.raft.metrics().borrow_watched().clone();
        m.heartbeat
            .as_ref()
            .and_then(|h| h.get(&node).cloned())
            .flatten()
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Asks this (leader) node to hand leadership of the group to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), GroupError> {
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| GroupError::Other(e.to_string()))
    }

    pub async fn trigger_snapshot(&self) -> Result<(), GroupError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| GroupError::Other(e.to_string()))
    }
}

const KEY_CLUSTER: &str = "cluster_id";
const KEY_GROUPS: &str = "groups";

/// Every group hosted by this node, and the node's cluster identity.
pub struct Registry {
    node_id: u64,
    store: Arc<Store>,
    transport: Arc<Transport>,
    app: Arc<dyn Application>,
    settings: RaftSettings,
    snap_root: PathBuf,
    cluster_id: RwLock<String>,
    incarnation: u64,
    groups: RwLock<HashMap<u32, Group>>,
    create: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the registry and every group this node hosted before.
    pub async fn open(
        node_id: u64,
        store: Arc<Store>,
        app: Arc<dyn Application>,
        settings: RaftSettings,
        snap_root: PathBuf,
        wire: proto::transport::Transport,
    ) -> Result<Arc<Self>, GroupError> {
        let cluster_id = store.node_get(KEY_CLUSTER)?.unwrap_or_default();
        let incarnation = new_incarnation();
        let transport = Transport::new(node_id, cluster_id.clone(), wire);
        let reg = Arc::new(Registry {
            node_id,
            store,
            transport,
            app,
            settings,
            snap_root,
            cluster_id: RwLock::new(cluster_id),
            incarnation,
            groups: RwLock::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
        });
        for g in reg.hosted()? {
            reg.ensure_group(g).await?;
        }
        Ok(reg)
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Identifies this run of the node, chosen at start: a leader that
    /// sees it change knows the node restarted, perhaps with less of its
    /// log than it acknowledged before (restored from scratch or from an
    /// older copy), and lets its replication start over if so.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// How this node connects to others (TLS credentials, admin token).
    pub fn wire(&self) -> &proto::transport::Transport {
        self.transport.wire()
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn hosted(&self) -> Result<Vec<u32>, GroupError> {
        Ok(self
            .store
            .node_get(KEY_GROUPS)?
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect())
    }

    /// Records the cluster this node belongs to (once).
    pub fn adopt_cluster(&self, id: &str) -> Result<(), GroupError> {
        if id.is_empty() {
            return Err(GroupError::Other("empty cluster id".into()));
        }
        let mut cur = self.cluster_id.write().unwrap_or_else(|e| e.into_inner());
        if cur.is_empty() {
            self.store.node_set(KEY_CLUSTER, id)?;
            self.transport.set_cluster_id(id);
            *cur = id.to_string();
            tracing::info!(cluster = id, "joined cluster");
        } else if *cur != id {
            return Err(GroupError::Other(format!(
                "node belongs to cluster {cur}, not {id}"
            )));
        }
        Ok(())
    }

    pub fn group(&self, id: u32) -> Option<Group> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn groups(&self) -> Vec<Group> {
        let mut v: Vec<Group> = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|g| g.id);
        v
    }

    /// The Raft of `group`, if hosted (used by the transport server).
    pub fn raft(&self, group: u32) -> Option<Raft> {
        self.group(group).map(|g| g.raft)
    }

    /// Opens `group` on this node, creating its Raft instance if needed.
    pub async fn ensure_group(&self, id: u32) -> Result<Group, GroupError> {
        if let Some(g) = self.group(id) {
            return Ok(g);
        }
        let _guard = self.create.lock().await;
        if let Some(g) = self.group(id) {
            return Ok(g);
        }
        let s = &self.settings;
        let config = Config {
            cluster_name: "musicfs".into(),
            heartbeat_interval: s.heartbeat_ms,
            election_timeout_min: s.election_min_ms,
            election_timeout_max: s.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(s.snapshot_every),
            max_in_snapshot_log_to_keep: s.keep_behind_snapshot,
            install_snapshot_timeout: 60_000,
            ..Default::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| GroupError::Other(e.to_string()))?,
        );
        let log = LogStore::new(self.store.clone(), id);
        let sm = GroupStateMachine::open(
            self.store.clone(),
            id,
            self.app.clone(),
            self.snap_root.clone(),
        )
        .map_err(|e| GroupError::Other(format!("opening group {id}: {e}")))?;
        let slot = Arc::new(std::sync::OnceLock::new());
        let raft = Raft::new(
            self.node_id,
            config,
            self.transport.factory(id, slot.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| GroupError::Other(format!("starting group {id}: {e}")))?;
        let _ = slot.set(raft.clone());
        let g = Group { id, raft };
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, g.clone());
        let mut hosted = self.hosted()?;
        if !hosted.contains(&id) {
            hosted.push(id);
            hosted.sort_unstable();
            let s: Vec<String> = hosted.iter().map(u32::to_string).collect();
            self.store.node_set(KEY_GROUPS, &s.join(","))?;
        }
        Ok(g)
    }

    /// Creates `count` groups with `peers` as voters. Run on one node only.
    pub async fn bootstrap(
        &self,
        cluster_id: &str,
        peers: &BTreeMap<u64, String>,
        count: u32,
    ) -> Result<(), GroupError> {
        self.adopt_cluster(cluster_id)?;
        let members: BTreeMap<u64, BasicNode> = peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        for id in 0..count {
            let g = self.ensure_group(id).await?;
            if let Err(e) = g.raft.initialize(members.clone()).await {
                return Err(GroupError::Other(format!("initialising group {id}: {e}")));
            }
        }
        Ok(())
    }

    /// Waits until `group` has a leader, up to `timeout`.
    pub async fn wait_leader(&self, group: u32, timeout: Duration) -> Result<u64, GroupError> {
        let g = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
        let m = g
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader elected")
            .await
            .map_err(|e| GroupError::Unavailable {
                group,
                reason: e.to_string(),
            })?;
        m.current_leader.ok_or(GroupError::Unavailable {
            group,
            reason: "no leader".into(),
        })
    }

    pub async fn shutdown(&self) {
        for g in self.groups() {
            let _ = g.raft.shutdown().await;
        }
    }
}

/// A random non-zero number (the process's random hash keys mixed with the
/// time): unique enough to tell one run of a node from the next.
fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}
