//! openraft's state machine for one group: applies entries through the
//! [`Application`], records the applied log id and membership in the same
//! write batch, and builds and installs file snapshots.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::type_config::alias::SnapshotOf;
use openraft::{EntryPayload, RaftSnapshotBuilder, StoredMembership};
use prost::Message;
use rocksdb::WriteBatch;

use crate::convert::{self, LogId, SnapshotMeta, StoredMem};
use crate::snapshot::{self, SnapshotFile};
use crate::store::{group_key, Store, StoreError, CF_RAFT, CF_SM};
use crate::{AppResponse, TypeConfig};

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const SNAP_META: &[u8] = b"snapmeta";
const INSTALLING: &[u8] = b"installing";

/// Key-value pairs read from the state machine.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;
/// Writes an application makes: a value, or `None` to delete the key.
pub type KvWrites = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Read access to the node's state-machine keys (column family `sm`).
pub struct KvView<'a> {
    store: &'a Store,
}

impl<'a> KvView<'a> {
    pub fn new(store: &'a Store) -> Self {
        KvView { store }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(CF_SM, key)
    }

    /// Up to `limit` pairs with keys starting with `prefix` and sorting after
    /// `prefix + after` (exclusive), in order.
    pub fn scan(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        let mut start = prefix.to_vec();
        start.extend_from_slice(after);
        let mut out = Vec::new();
        // Stop at the end of the prefix: without a bound the iterator would
        // walk every deleted key past it (pruned request results, resolved
        // intents) before finding the first live key beyond.
        let mut ro = rocksdb::ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let it = self.store.db.iterator_cf_opt(
            self.store.cf(CF_SM),
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| self.store.rocks_err(e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if !after.is_empty() && *k == start[..] {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What a group's state machine does with committed commands.
pub trait Application: Send + Sync + 'static {
    /// Applies one committed command of `group`. Returns the writes to make
    /// (key → value, or `None` to delete; keys must start with the group id)
    /// and the encoded reply. Must be deterministic.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        group: u32,
        view: &KvView<'_>,
        command: &[u8],
    ) -> (Vec<(Vec<u8>, Option<Vec<u8>>)>, Bytes);
}

pub struct GroupStateMachine {
    group: u32,
    store: Arc<Store>,
    app: Arc<dyn Application>,
    snap_dir: PathBuf,
    applied: Option<LogId>,
    membership: StoredMem,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl GroupStateMachine {
    /// Opens the state machine of `group`, finishing a snapshot install that
    /// a crash interrupted.
    pub fn open(
        store: Arc<Store>,
        group: u32,
        app: Arc<dyn Application>,
        snap_root: PathBuf,
    ) -> io::Result<Self> {
        let snap_dir = snapshot::group_dir(&snap_root, group);
        std::fs::create_dir_all(&snap_dir)?;
        let mut sm = GroupStateMachine {
            group,
            store,
            app,
            snap_dir,
            applied: None,
            membership: StoredMembership::default(),
        };
        if sm
            .store
            .get(CF_RAFT, &group_key(group, INSTALLING))
            .map_err(io_err)?
            .is_some()
        {
            tracing::warn!(group, "resuming an interrupted snapshot install");
            let (meta, path) = sm
                .current_snapshot_meta()?
                .ok_or_else(|| io_err("install marker set but no snapshot recorded"))?;
            sm.load(&meta, &path)?;
        }
        sm.reload()?;
        Ok(sm)
    }

    fn reload(&mut self) -> io::Result<()> {
        self.applied = match self
            .store
            .get(CF_RAFT, &group_key(self.group, APPLIED))
            .map_err(io_err)?
        {
            Some(v) => Some(
                convert::log_id_from_pb(&proto::raft::LogId::decode(&v[..]).map_err(io_err)?)
                    .map_err(io_err)?,
            ),
            None => None,
        };
        self.membership = match self
            .store
            .get(CF_RAFT, &group_key(self.group, MEMBERSHIP))
            .map_err(io_err)?
        {
            Some(v) => convert::stored_membership_from_pb(
                &proto::raft::StoredMembership::decode(&v[..]).map_err(io_err)?,
            )
            .map_err(io_err)?,
            None => StoredMembership::default(),
        };
        Ok(())
    }

    fn current_snapshot_meta(&self) -> io::Result<Option<(SnapshotMeta, PathBuf)>> {
        let Some(v) = self
            .store
            .get(CF_RAFT, &group_key(self.group, SNAP_META))
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let pb = proto::raft::SnapshotMeta::decode(&v[..]).map_err(io_err)?;
        let meta = convert::snapshot_meta_from_pb(&pb).map_err(io_err)?;
        let path = self.snap_dir.join(format!("{}.snap", pb.snapshot_id));
        Ok(Some((meta, path)))
    }

    fn state_batch(&self, applied: &Option<LogId>, membership: &StoredMem) -> WriteBatch {
        let mut b = WriteBatch::default();
        let cf = self.store.cf(CF_RAFT);
        match applied {
            Some(a) => b.put_cf(
                cf,
                group_key(self.group, APPLIED),
                convert::log_id_to_pb(a).encode_to_vec(),
            ),
            None => b.delete_cf(cf, group_key(self.group, APPLIED)),
        }
        b.put_cf(
            cf,
            group_key(self.group, MEMBERSHIP),
            convert::stored_membership_to_pb(membership).encode_to_vec(),
        );
        b
    }

    fn load(&mut self, meta: &SnapshotMeta, path: &std::path::Path) -> io::Result<()> {
        let mut finish = self.state_batch(&meta.last_log_id, &meta.last_membership);
        finish.delete_cf(self.store.cf(CF_RAFT), group_key(self.group, INSTALLING));
        let n = snapshot::load_snapshot(&self.store, self.group, path, finish)?;
        tracing::info!(group = self.group, records = n, "snapshot installed");
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    pub fn applied_index(&self) -> Option<u64> {
        self.applied.map(|l| l.index)
    }
}

fn snapshot_id(group: u32, meta: &SnapshotMeta) -> String {
    let (term, index) = meta
        .last_log_id
        .map(|l| (l.leader_id.term, l.index))
        .unwrap_or((0, 0));
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{group}-{term}-{index}-{ms}")
}

/// Builds a snapshot of a group from a point-in-time view of RocksDB.
pub struct GroupSnapshotBuilder {
    group: u32,
    store: Arc<Store>,
    snap_dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let (group, store, dir) = (self.group, self.store.clone(), self.snap_dir.clone());
        tokio::task::spawn_blocking(move || {
            let snap = store.db.snapshot();
            // Applied id and membership from the same point in time as the data.
            let get = |k: &[u8]| {
                snap.get_cf(store.cf(CF_RAFT), group_key(group, k))
                    .map_err(io_err)
            };
            let last_log_id = match get(APPLIED)? {
                Some(v) => Some(
                    convert::log_id_from_pb(&proto::raft::LogId::decode(&v[..]).map_err(io_err)?)
                        .map_err(io_err)?,
                ),
                None => None,
            };
            let last_membership = match get(MEMBERSHIP)? {
                Some(v) => convert::stored_membership_from_pb(
                    &proto::raft::StoredMembership::decode(&v[..]).map_err(io_err)?,
                )
                .map_err(io_err)?,
                None => StoredMembership::default(),
            };
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
            };
            let id = snapshot_id(group, &meta);
            let path = dir.join(format!("{id}.snap"));
            let n = snapshot::write_snapshot(&store, &snap, group, &path)?;
            drop(snap);
            let old = store
                .get(CF_RAFT, &group_key(group, SNAP_META))
                .map_err(io_err)?
                .and_then(|v| proto::raft::SnapshotMeta::decode(&v[..]).ok());
            let mut b = WriteBatch::default();
            b.put_cf(
                store.cf(CF_RAFT),
                group_key(group, SNAP_META),
                convert::snapshot_meta_to_pb(&meta, &id).encode_to_vec(),
            );
            store.write_sync(b).map_err(io_err)?;
            if let Some(old) = old {
                if old.snapshot_id != id {
                    let _ = std::fs::remove_file(dir.join(format!("{}.snap", old.snapshot_id)));
                }
            }
            tracing::info!(group, records = n, snapshot = %id, "snapshot built");
            let file = SnapshotFile::open(&path)?;
            Ok(Snapshot {
                meta,
                snapshot: file,
            })
        })
        .await
        .map_err(io_err)?
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMem), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<openraft::storage::EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + Send,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let mut response = AppResponse::default();
            let mut batch;
            match &entry.payload {
                EntryPayload::Blank => {
                    batch = self.state_batch(&Some(entry.log_id), &self.membership);
                }
                EntryPayload::Normal(req) => {
                    let (writes, reply) =
                        self.app
                            .apply(self.group, &KvView::new(&self.store), &req.0);
                    batch = self.state_batch(&Some(entry.log_id), &self.membership);
                    let cf = self.store.cf(CF_SM);
                    let prefix = self.group.to_be_bytes();
                    for (k, v) in writes {
                        if !k.starts_with(&prefix) {
                            return Err(io_err(format!(
                                "group {} application wrote a key outside its group",
                                self.group
                            )));
                        }
                        match v {
                            Some(v) => batch.put_cf(cf, k, v),
                            None => batch.delete_cf(cf, k),
                        }
                    }
                    response = AppResponse(reply);
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch = self.state_batch(&Some(entry.log_id), &self.membership);
                }
            }
            self.store.write(batch).map_err(io_err)?;
            self.applied = Some(entry.log_id);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        GroupSnapshotBuilder {
            group: self.group,
            store: self.store.clone(),
            snap_dir: self.snap_dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let id = snapshot_id(self.group, meta);
        let path = self.snap_dir.join(format!("{id}.snap"));
        drop(snapshot.file);
        if snapshot.path != path {
            std::fs::rename(&snapshot.path, &path)?;
        }
        let old = self.current_snapshot_meta()?;
        // Record the snapshot and the install marker durably first: if we
        // crash while loading, opening the group finishes the install.
        let mut b = WriteBatch::default();
        b.put_cf(
            self.store.cf(CF_RAFT),
            group_key(self.group, SNAP_META),
            convert::snapshot_meta_to_pb(meta, &id).encode_to_vec(),
        );
        b.put_cf(
            self.store.cf(CF_RAFT),
            group_key(self.group, INSTALLING),
            b"1",
        );
        self.store.write_sync(b).map_err(io_err)?;
        let (store, group, meta2, path2) =
            (self.store.clone(), self.group, meta.clone(), path.clone());
        let mut finish = self.state_batch(&meta.last_log_id, &meta.last_membership);
        finish.delete_cf(self.store.cf(CF_RAFT), group_key(self.group, INSTALLING));
        let n = tokio::task::spawn_blocking(move || {
            snapshot::load_snapshot(&store, group, &path2, finish)
        })
        .await
        .map_err(io_err)??;
        tracing::info!(group, records = n, "snapshot installed from leader");
        self.applied = meta2.last_log_id;
        self.membership = meta2.last_membership;
        if let Some((_, old_path)) = old {
            if old_path != path {
                let _ = std::fs::remove_file(old_path);
            }
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        match self.current_snapshot_meta()? {
            Some((meta, path)) if path.exists() => Ok(Some(Snapshot {
                meta,
                snapshot: SnapshotFile::open(&path)?,
            })),
            _ => Ok(None),
        }
    }
}
