//! Garbage collection of chunks no file references any more.
//!
//! A chunk is freed in two steps, so that a write in flight that uses the
//! chunk again never loses it:
//!
//! 1. The leader of the chunk's group drops its record (`ReapChunks`) once
//!    the chunk has been unreferenced since before the group's *horizon*:
//!    the settled time (every reference batch other groups queued before
//!    it has been applied here, `SettleOp`) minus the commit window (the
//!    longest a layout commit may rely on an index answer; older commits
//!    are refused as stale) minus a clock leeway. The command re-checks the
//!    refcount, in order with every commit. Then the leader asks the nodes
//!    that held the chunk to delete files last written before the horizon:
//!    a client that stored the chunk again meanwhile touched the file, and
//!    its commit registers it anew.
//! 2. Every node sweeps its own chunk files now and then and deletes those
//!    the index does not list on it and that were last written before the
//!    horizon of their group: copies left on a node that was lost and came
//!    back, on a drained node, uploads whose commit never came, and files a
//!    node could not delete in step 1.
//!
//! The index only answers "known" for chunks something references, so a
//! writer never skips uploading a chunk that is about to be freed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::admin::GcStatus;
use proto::meta::{
    command::Op, query::Q, HoldsQuery, OutSeqQuery, ReapChunksOp, SettleOp, StorageNode, Timespec,
};
use proto::storage::DeleteChunksRequest;
use proto::ChunkId;
use raft::KvView;
use tokio::sync::Notify;

use crate::app::ViewKv;
use crate::background::AbortOnDrop;
use crate::chunkstore::ChunkStore;
use crate::coordinator::Groups;
use crate::namespace::placement::{gc_horizon_ms, MAX_REAP};
use crate::namespace::Namespace;
use crate::repair::ChunkClients;
use crate::router::Router;
use crate::worker::{now_ms, Worker};

/// Garbage-collection settings (node configuration).
#[derive(Clone, Debug)]
pub struct GcConfig {
    /// How often the leader of each group settles and reaps.
    pub every: Duration,
    /// How often this node sweeps its own chunk files (None: never).
    pub sweep_every: Option<Duration>,
}

/// Chunk ids per `Holds` question while sweeping.
const SWEEP_BATCH: usize = 1024;

/// What a group's leader waits for before it may move the settled time:
/// the time it looked, and the next batch sequence of every other group
/// towards it then.
struct Pending {
    at_ms: u64,
    next: Vec<(u32, u64)>,
}

pub struct Gc {
    router: Arc<Router>,
    chunks: Arc<ChunkStore>,
    clients: Arc<ChunkClients>,
    cfg: GcConfig,
    pending: Mutex<HashMap<u32, Pending>>,
    reaped: AtomicU64,
    deleted: AtomicU64,
    worker: Worker,
    wake: Notify,
}

fn ts(ms: u64) -> Timespec {
    Timespec {
        sec: (ms / 1000) as i64,
        nsec: ((ms % 1000) * 1_000_000) as u32,
    }
}

impl Gc {
    pub fn new(
        router: Arc<Router>,
        chunks: Arc<ChunkStore>,
        clients: Arc<ChunkClients>,
        cfg: GcConfig,
    ) -> Arc<Self> {
        Arc::new(Gc {
            router,
            chunks,
            clients,
            cfg,
            pending: Mutex::new(HashMap::new()),
            reaped: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            worker: Worker::new("gc", "leaf directories", 0),
            wake: Notify::new(),
        })
    }

    fn note_error(&self, e: String) {
        self.worker.error(e);
    }

    /// The worker's common status (rate, limit, progress, last error).
    pub fn worker(&self) -> proto::admin::WorkerStatus {
        self.worker.status()
    }

    fn freed(&self, files: u64, bytes: u64) {
        self.deleted.fetch_add(files, Ordering::Relaxed);
        self.worker.moved(bytes);
        crate::metrics::gc_deleted(files, bytes);
    }

    /// Runs a pass now instead of at the next tick.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Runs until the node stops: reaping in the groups this node leads,
    /// and sweeping its own files.
    pub async fn run(self: Arc<Self>) {
        let _sweeper = self.cfg.sweep_every.map(|every| {
            let me = self.clone();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = me.sweep().await {
                        me.note_error(format!("sweep: {e}"));
                    }
                }
            }))
        });
        loop {
            let _ = tokio::time::timeout(self.cfg.every, self.wake.notified()).await;
            for g in self.router.registry().groups() {
                if !g.is_leader() {
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&g.id);
                    continue;
                }
                if let Err(e) = self.settle(g.id).await {
                    self.note_error(format!("group {}: settling: {e}", g.id));
                }
                if let Err(e) = self.reap(g.id).await {
                    self.note_error(format!("group {}: {e}", g.id));
                }
            }
        }
    }

    /// Moves the group's settled time forward when every batch queued for
    /// it before the last look has been applied, then looks again.
    async fn settle(&self, group: u32) -> Result<(), String> {
        let count = self.router.group_count().map_err(|e| e.to_string())?;
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&group);
        if let Some(p) = waiting {
            let router = self.router.clone();
            let next = p.next.clone();
            let done = tokio::task::spawn_blocking(move || {
                let view = KvView::new(router.registry().store());
                let kv = ViewKv(&view);
                let ns = Namespace::new(group);
                next.iter().try_fold(true, |ok, (source, n)| {
                    Ok::<_, crate::namespace::NsError>(
                        ok && ns.applied_from(&kv, *source)? + 1 >= *n,
                    )
                })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            if !done {
                // Not yet: keep waiting on the same look.
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(group, p);
                return Ok(());
            }
            self.router
                .propose(
                    group,
                    Op::Settle(SettleOp {
                        settled_ms: p.at_ms,
                    }),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        // The settled time is the earliest of this leader's clock and the
        // clocks of the leaders that answer: a leader whose clock runs
        // ahead cannot move the horizon past what the others' commit-window
        // checks (by their own clocks) still accept.
        let mut at_ms = now_ms();
        let mut next = Vec::new();
        for source in (0..count).filter(|s| *s != group) {
            let r = self
                .router
                .query(source, Q::OutSeq(OutSeqQuery { target: group }))
                .await
                .map_err(|e| format!("asking group {source}: {e}"))?;
            if r.now_ms > 0 {
                at_ms = at_ms.min(r.now_ms);
            }
            next.push((source, r.count));
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group, Pending { at_ms, next });
        Ok(())
    }

    fn storage_addrs(&self) -> HashMap<u64, String> {
        self.router
            .storage_nodes()
            .into_iter()
            .map(|n: StorageNode| (n.node_id, n.addr))
            .collect()
    }

    /// Drops the records of chunks unreferenced since before the horizon,
    /// then deletes their files.
    async fn reap(&self, group: u32) -> Result<(), String> {
        let router = self.router.clone();
        let (horizon, due) = tokio::task::spawn_blocking(move || {
            let view = KvView::new(router.registry().store());
            let kv = ViewKv(&view);
            let ns = Namespace::new(group);
            let horizon = gc_horizon_ms(&ns.stats(&kv)?);
            Ok::<_, crate::namespace::NsError>((horizon, ns.zero_before(&kv, horizon, MAX_REAP)?))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if due.is_empty() {
            return Ok(());
        }
        let r = self
            .router
            .propose(
                group,
                Op::ReapChunks(ReapChunksOp {
                    chunk_ids: due
                        .iter()
                        .map(|(id, _)| Bytes::copy_from_slice(&id.0))
                        .collect(),
                    zero_before: Some(ts(horizon)),
                }),
            )
            .await
            .map_err(|e| format!("reaping: {e}"))?;
        self.reaped
            .fetch_add(r.reaped.len() as u64, Ordering::Relaxed);
        crate::metrics::gc_reaped(r.reaped.len() as u64);
        let mut by_node: BTreeMap<u64, Vec<Bytes>> = BTreeMap::new();
        for c in &r.reaped {
            for n in &c.locations {
                by_node.entry(*n).or_default().push(c.chunk_id.clone());
            }
        }
        let addrs = self.storage_addrs();
        for (node, ids) in by_node {
            let Some(mut c) = addrs.get(&node).and_then(|a| self.clients.get(a)) else {
                continue;
            };
            let mut req = tonic::Request::new(DeleteChunksRequest {
                chunk_ids: ids,
                older_than_ms: horizon,
            });
            self.clients
                .wire()
                .sign(proto::auth::method::DELETE, &mut req);
            match c.delete(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.freed(r.deleted, r.bytes);
                }
                // The node's own sweep deletes them later.
                Err(s) => tracing::info!(node, error = %s.message(), "chunk delete deferred"),
            }
        }
        Ok(())
    }

    /// Deletes this node's chunk files that the index does not list here
    /// and that were written before their group's horizon.
    pub async fn sweep(&self) -> Result<(), String> {
        let r = self.sweep_all().await;
        self.worker.idle();
        r
    }

    async fn sweep_all(&self) -> Result<(), String> {
        let me = self.router.registry().node_id();
        let count = self.router.group_count().map_err(|e| e.to_string())?;
        let mut batch: HashMap<u32, Vec<(ChunkId, u64)>> = HashMap::new();
        // A group that cannot answer now is skipped, not the whole sweep.
        let mut failed: Vec<String> = Vec::new();
        for leaf in 0..=u16::MAX {
            self.worker.set("sweeping", u64::from(leaf), 1 << 16);
            let chunks = self.chunks.clone();
            let files = tokio::task::spawn_blocking(move || chunks.leaf(leaf))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            for (id, _) in files {
                let written = self.chunks.written_ms(&id).unwrap_or(u64::MAX);
                let g = id.group(count);
                let b = batch.entry(g).or_default();
                b.push((id, written));
                if b.len() >= SWEEP_BATCH {
                    let b = std::mem::take(b);
                    if let Err(e) = self.sweep_batch(me, g, b).await {
                        failed.push(format!("group {g}: {e}"));
                    }
                }
            }
        }
        for (g, b) in batch {
            if !b.is_empty() {
                if let Err(e) = self.sweep_batch(me, g, b).await {
                    failed.push(format!("group {g}: {e}"));
                }
            }
        }
        failed.dedup();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    async fn sweep_batch(
        &self,
        me: u64,
        group: u32,
        files: Vec<(ChunkId, u64)>,
    ) -> Result<(), String> {
        let r = self
            .router
            .query(
                group,
                Q::Holds(HoldsQuery {
                    node_id: me,
                    chunk_ids: files
                        .iter()
                        .map(|(id, _)| Bytes::copy_from_slice(&id.0))
                        .collect(),
                }),
            )
            .await
            .map_err(|e| e.to_string())?;
        let horizon = r.horizon_ms;
        for ((id, written), listed) in files.iter().zip(r.present) {
            if listed || *written >= horizon {
                continue;
            }
            let chunks = self.chunks.clone();
            let id = *id;
            match tokio::task::spawn_blocking(move || chunks.delete_older(&id, horizon)).await {
                Ok(Ok(Some(bytes))) => self.freed(1, bytes),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// What the groups this node leads hold unreferenced, and what this
    /// node has freed.
    pub async fn status(&self) -> GcStatus {
        let led = self.router.led_groups();
        let router = self.router.clone();
        let mut st = tokio::task::spawn_blocking(move || {
            let view = KvView::new(router.registry().store());
            let kv = ViewKv(&view);
            let mut st = GcStatus {
                led_groups: led.len() as u32,
                ..Default::default()
            };
            for g in led {
                let ns = Namespace::new(g);
                let Ok(stats) = ns.stats(&kv) else { continue };
                if stats.settled_ms > 0 {
                    st.settled_groups += 1;
                }
                if let Ok([due, later]) = ns.zero_report(&kv, gc_horizon_ms(&stats)) {
                    st.reclaimable_chunks += due.0;
                    st.reclaimable_bytes += due.1;
                    st.waiting_chunks += later.0;
                    st.waiting_bytes += later.1;
                }
            }
            st
        })
        .await
        .unwrap_or_default();
        st.reaped_chunks = self.reaped.load(Ordering::Relaxed);
        st.deleted_files = self.deleted.load(Ordering::Relaxed);
        let w = self.worker.status();
        st.deleted_bytes = w.bytes;
        st.last_error = w.last_error;
        st
    }
}
