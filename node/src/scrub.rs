//! Scrubbing: finding rotten and missing replicas before a reader does.
//!
//! A scrub has two passes. The *local* pass re-reads every chunk this node
//! stores, in the order of its leaf directories, through the shared
//! byte-rate limit, and moves a chunk whose bytes no longer hash to its id
//! aside (`chunks.bad/`). The *index* pass runs on the leader of each group
//! once every storage node that answers has finished its local pass: it
//! asks each node named in the group's chunk records whether it holds the
//! chunk (batched `Has`), and drops the locations that do not. Either way
//! the chunk is then short of copies, and repair copies a good replica
//! back. Reads never return corrupt data meanwhile: every get re-hashes,
//! on the node and again in the client.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::meta::{LocationChange, StorageNode, StorageState};
use proto::storage::{HasChunksRequest, ScrubProgressRequest, ScrubStatus};
use proto::ChunkId;
use raft::KvView;
use tokio::sync::Notify;

use crate::app::ViewKv;
use crate::chunkstore::{ChunkError, ChunkStore};
use crate::namespace::Namespace;
use crate::repair::{ChunkClients, Repair};
use crate::router::Router;
use crate::worker::{now_ms, Worker};

/// Scrub settings (node configuration).
#[derive(Clone, Debug)]
pub struct ScrubConfig {
    /// Bytes per second the local pass may read (0: unlimited).
    pub bytes_per_sec: u64,
    /// Start a scrub by itself this long after the last one finished
    /// (None: only when asked).
    pub every: Option<Duration>,
}

/// Chunk records checked per `Has` round.
const PAGE: usize = 512;
/// How long the index pass waits for the other nodes' local passes.
const WAIT_FOR_PEERS: Duration = Duration::from_secs(3600);
const LEAVES: u32 = 1 << 16;
/// Longest a group's index check keeps balancing from moving its leader.
const INDEX_HOLD: Duration = Duration::from_secs(600);
/// Node-store key: when the last scrub finished (ms).
const KEY_SCRUBBED: &str = "scrub_finished_ms";

pub struct Scrub {
    router: Arc<Router>,
    chunks: Arc<ChunkStore>,
    clients: Arc<ChunkClients>,
    repair: Arc<Repair>,
    cfg: ScrubConfig,
    worker: Worker,
    state: Mutex<ScrubStatus>,
    wake: Notify,
}

impl Scrub {
    pub fn new(
        router: Arc<Router>,
        chunks: Arc<ChunkStore>,
        clients: Arc<ChunkClients>,
        repair: Arc<Repair>,
        cfg: ScrubConfig,
    ) -> Arc<Self> {
        Arc::new(Scrub {
            router,
            chunks,
            clients,
            repair,
            worker: Worker::new(
                "scrub",
                "leaf directories or chunk records",
                cfg.bytes_per_sec,
            ),
            cfg,
            state: Mutex::new(ScrubStatus {
                phase: "idle".into(),
                ..Default::default()
            }),
            wake: Notify::new(),
        })
    }

    pub fn status(&self) -> ScrubStatus {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ScrubStatus)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        match st.phase.as_str() {
            "local" => self
                .worker
                .set("local", u64::from(st.leaves_done), u64::from(LEAVES)),
            "index" => self
                .worker
                .set("index", st.records_checked, st.records_checked),
            _ => self.worker.idle(),
        }
    }

    /// The worker's common status (rate, limit, progress, last error).
    pub fn worker(&self) -> proto::admin::WorkerStatus {
        self.worker.status()
    }

    /// Asks for a scrub; one already running finishes first, then a new
    /// one starts.
    pub fn start(&self) {
        self.update(|s| {
            s.requested += 1;
            s.requested_at_ms = now_ms();
        });
        self.wake.notify_one();
    }

    /// When the last scrub finished here, kept across restarts so that a
    /// restart (a rolling upgrade) does not start one on every node. A
    /// node's first start counts as a finish.
    fn last_finished_ms(&self) -> u64 {
        let store = self.router.registry().store();
        match store
            .node_get(KEY_SCRUBBED)
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
        {
            Some(ms) => ms,
            None => {
                let now = now_ms();
                let _ = store.node_set(KEY_SCRUBBED, &now.to_string());
                now
            }
        }
    }

    /// Runs until the node stops.
    pub async fn run(self: Arc<Self>) {
        let mut last_finished = self.last_finished_ms();
        loop {
            let st = self.status();
            if st.requested > st.local_done {
                let round = st.requested;
                let since = st.requested_at_ms;
                self.local_pass().await;
                self.update(|s| {
                    s.local_done = round;
                    s.local_done_at_ms = now_ms();
                });
                self.index_pass(since).await;
                last_finished = now_ms();
                self.update(|s| {
                    s.phase = "idle".into();
                    s.finished_at_ms = last_finished;
                });
                let _ = self
                    .router
                    .registry()
                    .store()
                    .node_set(KEY_SCRUBBED, &last_finished.to_string());
                continue;
            }
            let due = self.cfg.every.map(|every| {
                let last = last_finished.max(st.requested_at_ms);
                let next = last + every.as_millis() as u64;
                Duration::from_millis(next.saturating_sub(now_ms()))
            });
            match due {
                Some(d) if d.is_zero() => self.start(),
                Some(d) => {
                    let _ = tokio::time::timeout(d, self.wake.notified()).await;
                }
                None => self.wake.notified().await,
            }
        }
    }

    async fn local_pass(&self) {
        self.update(|s| {
            s.phase = "local".into();
            s.leaves_done = 0;
            s.verified_chunks = 0;
            s.verified_bytes = 0;
        });
        // One blocking call per top-level directory (256 leaves): a leaf
        // at a time costs a thread hand-off per leaf, minutes for 65,536
        // leaves even when they are empty.
        for top in 0..=u8::MAX {
            let chunks = self.chunks.clone();
            let ids = tokio::task::spawn_blocking(move || chunks.top(top)).await;
            let ids = match ids {
                Ok(Ok(ids)) => ids,
                Ok(Err(e)) => {
                    tracing::error!(top, error = %e, "scrub cannot list chunks");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            for (id, size) in ids {
                self.worker.throttle(size).await;
                let chunks = self.chunks.clone();
                let res = tokio::task::spawn_blocking(move || chunks.get(&id)).await;
                match res {
                    Ok(Ok(data)) => {
                        self.worker.moved(data.len() as u64);
                        self.update(|s| {
                            s.verified_chunks += 1;
                            s.verified_bytes += data.len() as u64;
                        })
                    }
                    Ok(Err(ChunkError::Corrupt { .. })) => {
                        let chunks = self.chunks.clone();
                        let moved =
                            tokio::task::spawn_blocking(move || chunks.quarantine(&id)).await;
                        if let Ok(Err(e)) = moved {
                            tracing::error!(%id, error = %e, "cannot move a corrupt chunk aside");
                        }
                        crate::metrics::scrub_found(1, 0);
                        self.update(|s| s.corrupt += 1);
                    }
                    // Deleted meanwhile (garbage collection): nothing to check.
                    Ok(Err(ChunkError::NotFound(_))) => {}
                    Ok(Err(e)) => tracing::error!(%id, error = %e, "scrub read failed"),
                    Err(_) => {}
                }
            }
            self.update(|s| s.leaves_done = (u32::from(top) + 1) * (LEAVES / 256));
        }
        tracing::info!(status = ?self.status(), "scrub: local pass done");
    }

    /// Waits until every storage node that answers has finished a local
    /// pass asked for no earlier than `since` (ms), so a chunk it moved
    /// aside is seen missing here.
    async fn wait_for_peers(&self, nodes: &[StorageNode], since: u64) {
        let me = self.router.registry().node_id();
        let start = tokio::time::Instant::now();
        loop {
            let mut waiting = Vec::new();
            for n in nodes {
                if n.node_id == me || n.state() == StorageState::StorageRemoved {
                    continue;
                }
                let done = match self.clients.get(&n.addr) {
                    Some(mut c) => match c.scrub_progress(ScrubProgressRequest {}).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            r.local_done >= 1 && r.local_done_at_ms >= since
                        }
                        // Not answering: nothing to wait for.
                        Err(_) => true,
                    },
                    None => true,
                };
                if !done {
                    waiting.push(n.node_id);
                }
            }
            if waiting.is_empty() || start.elapsed() > WAIT_FOR_PEERS {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn index_pass(&self, since: u64) {
        if self.router.led_groups().is_empty() {
            return;
        }
        let nodes = self.router.storage_nodes();
        self.update(|s| {
            s.phase = "index".into();
            s.records_checked = 0;
        });
        self.wait_for_peers(&nodes, since).await;
        let addrs: HashMap<u64, String> =
            nodes.iter().map(|n| (n.node_id, n.addr.clone())).collect();
        // The groups led after the wait, not before it: balancing may have
        // moved leaders meanwhile (a node that returned takes its groups
        // back), and a group checked by no one would keep its missing
        // replicas listed. Groups that become led here during the pass are
        // checked too.
        let mut checked = std::collections::BTreeSet::new();
        loop {
            let todo: Vec<u32> = self
                .router
                .led_groups()
                .into_iter()
                .filter(|g| !checked.contains(g))
                .collect();
            if todo.is_empty() {
                break;
            }
            for g in todo {
                checked.insert(g);
                // Balancing leaves the group here while it is checked; an
                // operator's hold stays as it was.
                let held = self.router.holds_leadership(g);
                if !held {
                    self.router.hold_leadership(g, INDEX_HOLD);
                }
                let r = self.check_group(g, &addrs).await;
                if !held {
                    self.router.release_leadership(g);
                }
                if let Err(e) = r {
                    self.worker.error(format!("index pass, group {g}: {e}"));
                }
            }
        }
        tracing::info!(status = ?self.status(), "scrub: index pass done");
    }

    async fn check_group(&self, group: u32, addrs: &HashMap<u64, String>) -> Result<(), String> {
        let mut cursor: Option<ChunkId> = None;
        loop {
            if !self
                .router
                .registry()
                .group(group)
                .is_some_and(|g| g.is_leader())
            {
                return Ok(());
            }
            let router = self.router.clone();
            let after = cursor;
            let page = tokio::task::spawn_blocking(move || {
                let view = KvView::new(router.registry().store());
                Namespace::new(group).chunks_after(&ViewKv(&view), after.as_ref(), PAGE)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            let mut by_node: BTreeMap<u64, Vec<ChunkId>> = BTreeMap::new();
            for (id, rec) in &page {
                for n in &rec.locations {
                    by_node.entry(*n).or_default().push(*id);
                }
            }
            let mut missing: BTreeMap<ChunkId, Vec<u64>> = BTreeMap::new();
            for (node, ids) in by_node {
                // A node that does not answer cannot be asked; repair
                // handles it if it stays away.
                if !self.repair.is_up(node) {
                    continue;
                }
                let present = if node == self.router.registry().node_id() {
                    // Stats block: off the runtime's threads.
                    let (chunks, mine) = (self.chunks.clone(), ids.clone());
                    match tokio::task::spawn_blocking(move || {
                        mine.iter().map(|id| chunks.has(id)).collect::<Vec<_>>()
                    })
                    .await
                    {
                        Ok(p) => p,
                        Err(_) => continue,
                    }
                } else {
                    let Some(mut c) = addrs.get(&node).and_then(|a| self.clients.get(a)) else {
                        continue;
                    };
                    match c
                        .has(HasChunksRequest {
                            chunk_ids: ids.iter().map(|i| Bytes::copy_from_slice(&i.0)).collect(),
                        })
                        .await
                    {
                        Ok(r) => r.into_inner().present,
                        Err(_) => continue,
                    }
                };
                for (id, p) in ids.iter().zip(present) {
                    if !p {
                        missing.entry(*id).or_default().push(node);
                    }
                }
            }
            if !missing.is_empty() {
                tracing::warn!(group, chunks = missing.len(), "scrub: replicas missing");
                let changes: Vec<LocationChange> = missing
                    .iter()
                    .map(|(id, nodes)| LocationChange {
                        chunk_id: Bytes::copy_from_slice(&id.0),
                        add: vec![],
                        remove: nodes.clone(),
                        // Unconditional: the node was just asked and does
                        // not hold the chunk, whatever else changed in the
                        // record meanwhile (at worst repair copies again).
                        seen: Vec::new(),
                    })
                    .collect();
                self.router
                    .update_locations(group, &changes)
                    .await
                    .map_err(|e| format!("recording missing replicas: {e}"))?;
                let n: u64 = missing.values().map(|v| v.len() as u64).sum();
                crate::metrics::scrub_found(0, n);
                self.update(|s| s.missing += n);
            }
            let n = page.len();
            self.update(|s| s.records_checked += n as u64);
            if n < PAGE {
                return Ok(());
            }
            cursor = page.last().map(|(id, _)| *id);
        }
    }
}
