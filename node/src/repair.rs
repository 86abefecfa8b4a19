//! Keeping every chunk at its replication factor.
//!
//! Each node probes every storage node once a second. A node that has not
//! answered for `repair_after` is lost: its replicas no longer count.
//! Draining and removed nodes' replicas do not count either (a draining
//! node's are still read until replaced).
//!
//! The leader of each group repairs the chunks that group indexes. Every
//! tick it works through the under-replicated index (chunks written while a
//! node was down or full) and, after the set of usable nodes changed, a
//! full pass over the group's chunk records, resumable, a page per tick.
//! For a chunk short of copies it asks the best-ranked usable node that
//! lacks it (`proto::placement`) to copy it from a replica, then records
//! the new location, and drops locations on lost, draining or removed nodes
//! once enough copies exist elsewhere. Copies go through a byte-rate limit
//! so repair never starves clients.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use proto::admin::RepairStatus;
use proto::meta::{ChunkRecord, LocationChange, StorageNode, StorageState};
use proto::storage::chunk_service_client::ChunkServiceClient;
use proto::storage::{HasChunksRequest, ReplicateRequest};
use proto::{placement, ChunkId, MAX_MESSAGE_BYTES};
use raft::KvView;
use tonic::transport::Channel;

use crate::app::ViewKv;
use crate::namespace::placement::replication_of;
use crate::namespace::Namespace;
use crate::router::Router;
use crate::worker::{Meter, Worker};

/// Repair settings (node configuration).
#[derive(Clone, Debug)]
pub struct RepairConfig {
    /// A storage node silent this long is lost and its chunks re-replicated.
    pub repair_after: Duration,
    /// Bytes per second repair may copy (0: unlimited).
    pub bytes_per_sec: u64,
}

/// How often storage nodes are probed and repair looks for work.
const TICK: Duration = Duration::from_secs(1);
/// A probe that takes longer than this counts as no answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Chunks examined per group and tick, from each source of work.
const PAGE: usize = 512;
/// Copies in flight at once.
const PARALLEL_COPIES: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Health {
    up: bool,
    /// When `up` last changed (or when this node first saw it).
    since: Instant,
}

/// A finished pass that left chunks short of copies runs again after this.
const RETRY_PASS: Duration = Duration::from_secs(10);
/// Every group's records are looked over at least this often anyway.
const PASS_EVERY: Duration = Duration::from_secs(3600);

/// Chunks that could not be brought to the replication factor.
#[derive(Default, Clone, Copy)]
struct Shortfall {
    /// No usable node left to copy to.
    waiting: u64,
    /// No replica answers.
    unavailable: u64,
    /// Every copy attempt failed.
    failed: u64,
}

impl Shortfall {
    fn any(&self) -> bool {
        self.waiting + self.unavailable + self.failed > 0
    }
}

/// A full pass over one group's chunk records.
#[derive(Default)]
struct FullPass {
    /// The usable nodes the pass works towards; a change restarts it.
    usable: Vec<u64>,
    /// Resume after this chunk; None before the first page.
    cursor: Option<ChunkId>,
    scanned: u64,
    finished: Option<Instant>,
    short: Shortfall,
}

impl FullPass {
    fn due_again(&self) -> bool {
        self.finished.is_some_and(|t| {
            (self.short.any() && t.elapsed() >= RETRY_PASS) || t.elapsed() >= PASS_EVERY
        })
    }
}

#[derive(Default)]
struct GroupWork {
    pass: FullPass,
    total: u64,
    under: u64,
    /// From the latest look at the under-replicated index.
    under_short: Shortfall,
    /// Where the next look at it starts.
    under_cursor: Option<ChunkId>,
}

/// gRPC clients of other nodes' chunk services, one connection per address.
pub struct ChunkClients {
    channels: Mutex<HashMap<String, Channel>>,
    wire: proto::transport::Transport,
}

impl ChunkClients {
    pub fn new(wire: proto::transport::Transport) -> Self {
        ChunkClients {
            channels: Mutex::new(HashMap::new()),
            wire,
        }
    }

    /// This node's credentials, which sign the calls only nodes make.
    pub fn wire(&self) -> &proto::transport::Transport {
        &self.wire
    }

    pub fn get(&self, addr: &str) -> Option<ChunkServiceClient<Channel>> {
        let mut chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let ch = match chans.get(addr) {
            Some(c) => c.clone(),
            None => {
                let ch = self
                    .wire
                    .endpoint(addr)
                    .ok()?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(60))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(proto::CONNECTION_WINDOW_BYTES)
                    .connect_lazy();
                chans.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Some(
            ChunkServiceClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }
}

/// Numbers repair's copies for their request tags.
static COPY_SEQ: AtomicU64 = AtomicU64::new(1);

pub struct Repair {
    router: Arc<Router>,
    cfg: RepairConfig,
    health: Mutex<HashMap<u64, Health>>,
    work: Mutex<BTreeMap<u32, GroupWork>>,
    clients: Arc<ChunkClients>,
    worker: Worker,
    copied_chunks: AtomicU64,
    chunk_rate: Meter,
}

/// What one chunk needs.
#[derive(Debug, PartialEq)]
struct Plan {
    /// Nodes to copy to, best first (more than needed: later ones are
    /// fallbacks when one refuses).
    targets: Vec<u64>,
    need: usize,
    /// Nodes to read from.
    sources: Vec<u64>,
    /// Locations that no longer count, dropped once enough copies that
    /// count and answer exist.
    stale: Vec<u64>,
    /// Copies that count and answer now.
    good_up: usize,
    /// The locations planned from.
    seen: Vec<u64>,
}

/// Decides what a chunk needs. `nodes` maps every storage node to its
/// state; `up` tells whether a node answers, `lost` whether it has been
/// silent past the repair timeout.
fn plan(
    id: &ChunkId,
    rec: &ChunkRecord,
    rf: usize,
    nodes: &HashMap<u64, StorageState>,
    up: &dyn Fn(u64) -> bool,
    lost: &dyn Fn(u64) -> bool,
) -> Plan {
    let counts = |n: u64| nodes.get(&n) == Some(&StorageState::StorageActive) && !lost(n);
    let good = rec.locations.iter().filter(|n| counts(**n)).count();
    let stale: Vec<u64> = rec
        .locations
        .iter()
        .copied()
        .filter(|n| !counts(*n))
        .collect();
    let good_up = rec
        .locations
        .iter()
        .filter(|n| counts(**n) && up(**n))
        .count();
    let need = rf.saturating_sub(good);
    let targets = if need == 0 {
        Vec::new()
    } else {
        placement(
            id,
            nodes
                .iter()
                .filter(|(n, s)| {
                    **s == StorageState::StorageActive && up(**n) && !rec.locations.contains(n)
                })
                .map(|(n, _)| *n),
        )
    };
    let mut sources: Vec<u64> = rec.locations.iter().copied().filter(|n| up(*n)).collect();
    // Replicas on nodes that count first: a draining node is busy enough.
    sources.sort_by_key(|n| !counts(*n));
    Plan {
        targets,
        need,
        sources,
        stale,
        good_up,
        seen: rec.locations.clone(),
    }
}

impl Repair {
    pub fn new(router: Arc<Router>, cfg: RepairConfig, clients: Arc<ChunkClients>) -> Arc<Self> {
        Arc::new(Repair {
            router,
            clients,
            worker: Worker::new("repair", "chunk records", cfg.bytes_per_sec),
            cfg,
            health: Mutex::new(HashMap::new()),
            work: Mutex::new(BTreeMap::new()),
            copied_chunks: AtomicU64::new(0),
            chunk_rate: Meter::default(),
        })
    }

    fn client(&self, addr: &str) -> Option<ChunkServiceClient<Channel>> {
        self.clients.get(addr)
    }

    /// Whether `node` answered its last probe (true until first probed).
    pub fn is_up(&self, node: u64) -> bool {
        if node == self.router.registry().node_id() {
            return true;
        }
        // Not probed yet (this node just started): assume it answers.
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .is_none_or(|h| h.up)
    }

    fn is_lost(&self, node: u64) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .is_some_and(|h| !h.up && h.since.elapsed() >= self.cfg.repair_after)
    }

    /// Storage nodes that answered their last probe.
    pub fn up_nodes(&self) -> Vec<u64> {
        let me = self.router.registry().node_id();
        let mut v: Vec<u64> = self
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(n, h)| h.up && **n != me)
            .map(|(n, _)| *n)
            .collect();
        v.push(me);
        v.sort_unstable();
        v
    }

    async fn probe(&self, nodes: &[StorageNode]) {
        let me = self.router.registry().node_id();
        let probes = nodes
            .iter()
            .filter(|n| n.node_id != me && n.state() != StorageState::StorageRemoved)
            .map(|n| {
                let client = self.client(&n.addr);
                let id = n.node_id;
                async move {
                    let ok = match client {
                        Some(mut c) => matches!(
                            tokio::time::timeout(
                                PROBE_TIMEOUT,
                                c.has(HasChunksRequest { chunk_ids: vec![] })
                            )
                            .await,
                            Ok(Ok(_))
                        ),
                        None => false,
                    };
                    (id, ok)
                }
            });
        let results = futures::future::join_all(probes).await;
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        for n in nodes
            .iter()
            .filter(|n| n.state() == StorageState::StorageRemoved)
        {
            crate::metrics::storage_node_removed(n.node_id);
        }
        for (id, ok) in results {
            crate::metrics::storage_node_up(id, ok);
            let h = health.entry(id).or_insert(Health {
                up: ok,
                since: Instant::now(),
            });
            if h.up != ok {
                if ok {
                    tracing::info!(node = id, "storage node answers again");
                } else {
                    tracing::warn!(node = id, "storage node stopped answering");
                }
                *h = Health {
                    up: ok,
                    since: Instant::now(),
                };
            }
        }
    }

    /// Runs until the node stops.
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let nodes = self.router.storage_nodes();
            if nodes.is_empty() {
                continue;
            }
            self.probe(&nodes).await;
            let states: HashMap<u64, StorageState> =
                nodes.iter().map(|n| (n.node_id, n.state())).collect();
            let addrs: HashMap<u64, String> =
                nodes.iter().map(|n| (n.node_id, n.addr.clone())).collect();
            for g in self.router.registry().groups() {
                if !g.is_leader() {
                    self.work
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&g.id);
                    continue;
                }
                if let Err(e) = self.repair_group(g.id, &states, &addrs).await {
                    self.worker.error(format!("group {}: {e}", g.id));
                }
            }
            let st = self.status();
            crate::metrics::repair(
                st.under_replicated,
                st.waiting_for_nodes,
                st.unavailable,
                st.eta_secs,
            );
            let todo = st.under_replicated.saturating_sub(st.waiting_for_nodes);
            if st.scanned < st.total {
                self.worker.set("full pass", st.scanned, st.total);
            } else if todo > 0 {
                self.worker.set("copying", 0, todo);
            } else if st.waiting_for_nodes > 0 {
                self.worker.set("waiting for nodes", 0, 0);
            } else {
                self.worker.idle();
            }
        }
    }

    /// The worker's common status (rate, limit, progress, last error).
    pub fn worker(&self) -> proto::admin::WorkerStatus {
        self.worker.status()
    }

    /// One tick of one group: the under-replicated index, then a page of
    /// the full pass if one is due.
    async fn repair_group(
        &self,
        group: u32,
        states: &HashMap<u64, StorageState>,
        addrs: &HashMap<u64, String>,
    ) -> Result<(), String> {
        let mut usable: Vec<u64> = states
            .iter()
            .filter(|(n, s)| **s == StorageState::StorageActive && !self.is_lost(**n))
            .map(|(n, _)| *n)
            .collect();
        usable.sort_unstable();
        let cursor = {
            let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
            let w = work.entry(group).or_default();
            if w.pass.usable != usable || w.pass.due_again() {
                // A node was lost, drained, removed or added: every record
                // may need work. (The first pass after taking leadership
                // runs too: the previous leader's may not have finished.)
                w.pass = FullPass {
                    usable: usable.clone(),
                    ..Default::default()
                };
            }
            w.pass.finished.is_none().then_some(w.pass.cursor)
        };
        let under_after = self
            .work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .and_then(|w| w.under_cursor);
        let router = self.router.clone();
        let read = tokio::task::spawn_blocking(move || {
            let view = KvView::new(router.registry().store());
            let kv = ViewKv(&view);
            let ns = Namespace::new(group);
            let stats = ns.stats(&kv)?;
            let under = ns.under_replicated(&kv, under_after.as_ref(), PAGE)?;
            let page = match cursor {
                Some(c) => Some(ns.chunks_after(&kv, c.as_ref(), PAGE)?),
                None => None,
            };
            Ok::<_, crate::namespace::NsError>((stats, under, page))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let (stats, under, page) = read;
        let rf = replication_of(&stats) as usize;
        let mut changes: Vec<LocationChange> = Vec::new();
        {
            let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
            let w = work.entry(group).or_default();
            w.total = stats.chunk_count;
            w.under = stats.under_replicated;
        }
        // The next look at the index starts after this page, and wraps, so
        // chunks that cannot be repaired do not hide the ones behind them.
        let next_under = if under.len() < PAGE {
            None
        } else {
            under.last().map(|(id, _)| *id)
        };
        let under_ids: std::collections::HashSet<ChunkId> =
            under.iter().map(|(id, _)| *id).collect();
        let under_short = self.work_on(under, rf, states, addrs, &mut changes).await;
        let page_len = page.as_ref().map(Vec::len);
        let page_short = match page {
            Some(mut p) => {
                let last = p.last().map(|(id, _)| *id);
                // Chunks just handled from the index are not copied twice.
                p.retain(|(id, _)| !under_ids.contains(id));
                let short = self.work_on(p, rf, states, addrs, &mut changes).await;
                Some((last, short))
            }
            None => None,
        };
        {
            let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
            let w = work.entry(group).or_default();
            w.under_short = under_short;
            w.under_cursor = next_under;
            if let (Some(len), Some((last, short))) = (page_len, page_short) {
                // Only if the pass was not restarted meanwhile.
                if w.pass.cursor == cursor.flatten() && w.pass.finished.is_none() {
                    w.pass.scanned += len as u64;
                    w.pass.cursor = last.or(w.pass.cursor);
                    w.pass.short.waiting += short.waiting;
                    w.pass.short.unavailable += short.unavailable;
                    w.pass.short.failed += short.failed;
                    if len < PAGE {
                        w.pass.finished = Some(Instant::now());
                    }
                }
            }
        }
        self.router
            .update_locations(group, &changes)
            .await
            .map_err(|e| format!("recording locations: {e}"))?;
        Ok(())
    }

    /// Plans and carries out the copies `chunks` need, adding the location
    /// changes to record to `changes`; returns what could not be done.
    async fn work_on(
        &self,
        mut chunks: Vec<(ChunkId, ChunkRecord)>,
        rf: usize,
        states: &HashMap<u64, StorageState>,
        addrs: &HashMap<u64, String>,
        changes: &mut Vec<LocationChange>,
    ) -> Shortfall {
        chunks.retain(|(_, r)| r.refcount > 0);
        let up = |n: u64| self.is_up(n);
        let lost = |n: u64| self.is_lost(n);
        let mut short = Shortfall::default();
        let mut copies = FuturesUnordered::new();
        for (id, rec) in &chunks {
            let p = plan(id, rec, rf, states, &up, &lost);
            if p.need == 0 {
                // A draining node's copy goes only while enough others
                // answer (one that is down, not yet lost, still counts).
                if !p.stale.is_empty() && p.good_up >= rf {
                    changes.push(LocationChange {
                        chunk_id: Bytes::copy_from_slice(&id.0),
                        add: vec![],
                        remove: p.stale,
                        seen: p.seen,
                    });
                }
                continue;
            }
            if p.sources.is_empty() {
                short.unavailable += 1;
                continue;
            }
            if p.targets.is_empty() {
                short.waiting += 1;
                continue;
            }
            if copies.len() >= PARALLEL_COPIES {
                match copies.next().await {
                    Some(Some(c)) => changes.push(c),
                    Some(None) => short.failed += 1,
                    None => {}
                }
            }
            copies.push(self.copy(*id, rec.size, p, rf, addrs));
        }
        while let Some(c) = copies.next().await {
            match c {
                Some(c) => changes.push(c),
                None => short.failed += 1,
            }
        }
        short
    }

    /// Copies one chunk to as many targets as it needs, trying fallbacks
    /// when one refuses. Returns the location change to record.
    async fn copy(
        &self,
        id: ChunkId,
        size: u64,
        p: Plan,
        rf: usize,
        addrs: &HashMap<u64, String>,
    ) -> Option<LocationChange> {
        let sources: Vec<String> = p
            .sources
            .iter()
            .filter_map(|n| addrs.get(n).cloned())
            .collect();
        let mut added = Vec::new();
        for t in &p.targets {
            if added.len() >= p.need {
                break;
            }
            let Some(mut c) = addrs.get(t).and_then(|a| self.client(a)) else {
                continue;
            };
            self.worker.throttle(size).await;
            // Repair's copies carry this node's id as the client part of
            // their tag, so the target's and the source's logs name them.
            let tag = proto::request_tag(
                self.router.registry().node_id(),
                COPY_SEQ.fetch_add(1, Ordering::Relaxed),
            );
            let mut req = tonic::Request::new(ReplicateRequest {
                chunk_id: Bytes::copy_from_slice(&id.0),
                sources: sources.clone(),
            });
            proto::tag_request(&mut req, &tag);
            self.clients
                .wire()
                .sign(proto::auth::method::REPLICATE, &mut req);
            let r = c.replicate(req).await;
            match r.map(|r| r.into_inner()) {
                Ok(r) if r.error.is_none() => {
                    added.push(*t);
                    self.copied_chunks.fetch_add(1, Ordering::Relaxed);
                    self.worker.moved(r.bytes);
                    self.chunk_rate.add(1);
                    crate::metrics::repair_copy();
                }
                Ok(r) => {
                    let e = r.error.map(|e| e.message).unwrap_or_default();
                    tracing::warn!(req = %tag, %id, target = t, error = %e, "replica copy refused");
                }
                Err(s) => {
                    tracing::warn!(req = %tag, %id, target = t, error = %s.message(), "replica copy failed");
                }
            }
        }
        if added.is_empty() {
            return None;
        }
        // Stale locations go only once the chunk has its copies elsewhere.
        let remove = if added.len() >= p.need && p.good_up + added.len() >= rf {
            p.stale
        } else {
            Vec::new()
        };
        Some(LocationChange {
            chunk_id: Bytes::copy_from_slice(&id.0),
            add: added,
            remove,
            seen: p.seen,
        })
    }

    /// Repair's progress over the groups this node leads.
    pub fn status(&self) -> RepairStatus {
        let work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = RepairStatus::default();
        for w in work.values() {
            st.under_replicated += w.under;
            st.total += w.total;
            st.scanned += if w.pass.finished.is_some() {
                w.total
            } else {
                w.pass.scanned.min(w.total)
            };
            st.waiting_for_nodes += w.pass.short.waiting.max(w.under_short.waiting);
            st.unavailable += w.pass.short.unavailable.max(w.under_short.unavailable);
        }
        drop(work);
        let w = self.worker.status();
        st.copied_chunks = self.copied_chunks.load(Ordering::Relaxed);
        st.copied_bytes = w.bytes;
        st.bytes_per_sec = w.bytes_per_sec;
        let chunks_per_sec = self.chunk_rate.rate();
        let todo = st.under_replicated.saturating_sub(st.waiting_for_nodes);
        if todo > 0 && chunks_per_sec > 0.0 {
            st.eta_secs = (todo as f64 / chunks_per_sec).ceil() as u64;
        }
        st.last_error = w.last_error;
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(locs: &[u64]) -> ChunkRecord {
        ChunkRecord {
            size: 10,
            refcount: 1,
            locations: locs.to_vec(),
            zero_since: None,
        }
    }

    fn nodes(v: &[(u64, StorageState)]) -> HashMap<u64, StorageState> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_lost_node_is_replaced_and_dropped() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[
            (1, StorageActive),
            (2, StorageActive),
            (3, StorageActive),
            (4, StorageActive),
        ]);
        let p = plan(&id, &rec(&[1, 2, 3]), 3, &n, &|n| n != 3, &|n| n == 3);
        assert_eq!(p.need, 1);
        assert_eq!(p.targets, vec![4]);
        assert_eq!(p.stale, vec![3]);
        assert_eq!(p.sources, vec![1, 2]);
    }

    #[test]
    fn a_node_down_but_not_lost_still_counts() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[(1, StorageActive), (2, StorageActive), (3, StorageActive)]);
        let p = plan(&id, &rec(&[1, 2, 3]), 3, &n, &|n| n != 3, &|_| false);
        assert_eq!(p.need, 0);
        assert!(p.stale.is_empty());
    }

    #[test]
    fn draining_nodes_are_read_but_not_counted_or_chosen() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[
            (1, StorageActive),
            (2, StorageDraining),
            (3, StorageActive),
            (4, StorageActive),
        ]);
        let p = plan(&id, &rec(&[1, 2]), 3, &n, &|_| true, &|_| false);
        assert_eq!(p.need, 2);
        let mut t = p.targets.clone();
        t.sort_unstable();
        assert_eq!(t, vec![3, 4]);
        assert_eq!(p.stale, vec![2]);
        assert_eq!(p.sources, vec![1, 2], "counting replicas are read first");
    }

    #[test]
    fn copies_that_do_not_answer_are_not_counted_as_safe() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[
            (1, StorageActive),
            (2, StorageActive),
            (3, StorageDraining),
            (4, StorageActive),
        ]);
        // Node 2 is down but not lost: it still counts, but a draining
        // copy must not go while only node 1 and 4 answer.
        let p = plan(&id, &rec(&[1, 2, 3, 4]), 3, &n, &|n| n != 2, &|_| false);
        assert_eq!(p.need, 0);
        assert_eq!(p.stale, vec![3]);
        assert_eq!(p.good_up, 2, "below the replication factor: keep node 3");
        assert_eq!(p.seen, vec![1, 2, 3, 4]);
    }

    #[test]
    fn too_few_nodes_leaves_nothing_to_copy_to() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[(1, StorageActive), (2, StorageActive), (3, StorageActive)]);
        // Node 3 is lost and no fourth node exists.
        let p = plan(&id, &rec(&[1, 2, 3]), 3, &n, &|n| n != 3, &|n| n == 3);
        assert_eq!(p.need, 1);
        assert!(p.targets.is_empty());
    }

    #[test]
    fn unknown_and_removed_nodes_are_stale() {
        use StorageState::*;
        let id = ChunkId::of(b"x");
        let n = nodes(&[
            (1, StorageActive),
            (2, StorageActive),
            (3, StorageActive),
            (5, StorageRemoved),
        ]);
        let p = plan(&id, &rec(&[1, 2, 3, 5, 9]), 3, &n, &|_| true, &|_| false);
        assert_eq!(p.need, 0);
        assert_eq!(p.stale, vec![5, 9]);
    }
}
