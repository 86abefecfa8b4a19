//! Storage nodes (recorded in group 0) and where each chunk's replicas
//! live: the under-replicated index repair works from, and the location
//! changes repair makes.
//!
//! Whether a chunk is under-replicated is decided here by counting its
//! locations only: the state machine cannot know which nodes are down
//! (replicas would disagree). Lost, drained and removed nodes are found by
//! repair's full passes, which read the storage nodes' states and health.

use proto::meta::{
    ChunkInfo, ChunkRecord, GroupRecord, HoldsQuery, LocationChange, ReapChunksOp,
    SetStorageNodeOp, SettleOp, StorageNode, StorageState, Timespec, UpdateLocationsOp,
};
use proto::meta::{CommandResult, QueryResult};
use proto::{ChunkId, DEFAULT_COMMIT_WINDOW_SECS, DEFAULT_REPLICATION};

use super::txn::u64_at;
use super::{decode, keys, KvRead, Namespace, NsError, Txn};

/// Most chunks one reap command drops.
pub const MAX_REAP: usize = 1024;

/// Most location changes one command carries.
pub const MAX_LOCATION_CHANGES: usize = 1024;

/// The replication factor a group record asks for.
pub fn replication_of(rec: &GroupRecord) -> u32 {
    if rec.replication == 0 {
        DEFAULT_REPLICATION
    } else {
        rec.replication
    }
}

/// How long (ms) a layout commit may rely on a chunk-index answer.
pub fn commit_window_ms(rec: &GroupRecord) -> u64 {
    let secs = if rec.commit_window_secs == 0 {
        DEFAULT_COMMIT_WINDOW_SECS
    } else {
        rec.commit_window_secs
    };
    u64::from(secs) * 1000
}

/// Leeway for leaders' clocks disagreeing (ms): a minute, or the commit
/// window if that is shorter (test clusters).
pub fn clock_leeway_ms(rec: &GroupRecord) -> u64 {
    commit_window_ms(rec).min(60_000)
}

/// The time before which an unreferenced chunk may be freed, and a chunk
/// file the index does not list may be deleted: no commit that could still
/// reference it can land. A commit relies on an index answer for at most
/// the commit window; every reference batch queued before `settled_ms` has
/// applied; and leaders' clocks may disagree by the leeway.
pub fn gc_horizon_ms(rec: &GroupRecord) -> u64 {
    rec.settled_ms
        .saturating_sub(commit_window_ms(rec))
        .saturating_sub(clock_leeway_ms(rec))
}

fn zero_ms(rec: &ChunkRecord) -> u64 {
    rec.zero_since.map(|t| t.as_millis()).unwrap_or(0)
}

fn under(rec: &ChunkRecord, rf: u32) -> bool {
    rec.refcount > 0 && (rec.locations.len() as u32) < rf
}

impl Namespace {
    /// Writes a chunk record, keeping the under-replicated index (and its
    /// count) and the unreferenced index in step with it. `old` is the record as it was before this
    /// command (None when new).
    pub(super) fn store_chunk<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        stats: &mut GroupRecord,
        id: &ChunkId,
        old: Option<&ChunkRecord>,
        rec: &ChunkRecord,
    ) -> Result<(), NsError> {
        let rf = replication_of(stats);
        let (was, is) = (old.is_some_and(|o| under(o, rf)), under(rec, rf));
        if is && !was {
            txn.put_raw(keys::under(self.group, &id.0), Vec::new());
            stats.under_replicated += 1;
        } else if was && !is {
            txn.unput(keys::under(self.group, &id.0))?;
            stats.under_replicated = stats.under_replicated.saturating_sub(1);
        }
        // Unreferenced chunks are indexed by when they became so, for
        // garbage collection.
        let zkey =
            |r: &ChunkRecord| (r.refcount == 0).then(|| keys::zero(self.group, zero_ms(r), &id.0));
        let (old_z, new_z) = (old.and_then(zkey), zkey(rec));
        if old_z != new_z {
            if let Some(k) = old_z {
                txn.unput(k)?;
            }
            if let Some(k) = new_z {
                txn.put_raw(k, Vec::new());
            }
        }
        txn.put(keys::chunk(self.group, &id.0), rec);
        Ok(())
    }

    pub(super) fn set_storage_node<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &SetStorageNodeOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        if self.group != 0 {
            return Err(NsError::Invalid(format!(
                "storage nodes are recorded in group 0, not group {}",
                self.group
            )));
        }
        if op.node_id == 0 {
            return Err(NsError::Invalid("node id must be positive".into()));
        }
        let key = keys::storage_node(0, op.node_id);
        let state = StorageState::try_from(op.state)
            .map_err(|_| NsError::Invalid(format!("unknown storage state {}", op.state)))?;
        let rec = match txn.get(&key)? {
            None => {
                if state != StorageState::StorageActive {
                    return Err(NsError::NotFound(format!("storage node {}", op.node_id)));
                }
                if op.addr.is_empty() {
                    return Err(NsError::Invalid(format!(
                        "adding storage node {} needs its address",
                        op.node_id
                    )));
                }
                StorageNode {
                    node_id: op.node_id,
                    addr: op.addr.clone(),
                    state: state as i32,
                    since: Some(now),
                }
            }
            Some(b) => {
                let mut rec: StorageNode = decode(&key, &b)?;
                if rec.state() == StorageState::StorageRemoved {
                    return Err(NsError::Invalid(format!(
                        "storage node {} was removed; node ids are never reused",
                        op.node_id
                    )));
                }
                if !op.addr.is_empty() {
                    rec.addr = op.addr.clone();
                }
                if rec.state != state as i32 {
                    rec.state = state as i32;
                    rec.since = Some(now);
                }
                rec
            }
        };
        txn.put(key, &rec);
        Ok(CommandResult {
            ..Default::default()
        })
    }

    pub(super) fn update_locations<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &UpdateLocationsOp,
    ) -> Result<CommandResult, NsError> {
        if op.changes.len() > MAX_LOCATION_CHANGES {
            return Err(NsError::Invalid(format!(
                "at most {MAX_LOCATION_CHANGES} location changes per command, not {}",
                op.changes.len()
            )));
        }
        let mut stats = self.group_record(txn)?;
        let group_count = stats.group_count;
        for LocationChange {
            chunk_id,
            add,
            remove,
            seen,
        } in &op.changes
        {
            let id =
                ChunkId::try_from(&chunk_id[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
            if id.group(group_count) != self.group {
                return Err(NsError::Invalid(format!(
                    "chunk {id} is indexed by group {}, not {}",
                    id.group(group_count),
                    self.group
                )));
            }
            // Garbage collection may have dropped the record meanwhile.
            let Some(old) = self.load_chunk(txn, &id)? else {
                continue;
            };
            let mut rec = old.clone();
            let mut was = rec.locations.clone();
            was.sort_unstable();
            let mut seen = seen.clone();
            seen.sort_unstable();
            // No `seen`: the caller checked the removal itself.
            let may_remove = seen.is_empty() || seen == was;
            for a in add {
                if *a != 0 && !rec.locations.contains(a) {
                    rec.locations.push(*a);
                }
            }
            for r in remove.iter().filter(|_| may_remove) {
                if rec.locations.len() > 1 {
                    rec.locations.retain(|l| l != r);
                }
            }
            rec.locations.sort_unstable();
            if rec != old {
                self.store_chunk(txn, &mut stats, &id, Some(&old), &rec)?;
            }
        }
        txn.put(keys::group_record(self.group), &stats);
        Ok(CommandResult::default())
    }

    pub(super) fn reap_chunks<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &ReapChunksOp,
    ) -> Result<CommandResult, NsError> {
        if op.chunk_ids.len() > MAX_REAP {
            return Err(NsError::Invalid(format!(
                "at most {MAX_REAP} chunks per reap, not {}",
                op.chunk_ids.len()
            )));
        }
        let before = op.zero_before.map(|t| t.as_millis()).unwrap_or(0);
        let mut out = CommandResult::default();
        for raw in &op.chunk_ids {
            let id = ChunkId::try_from(&raw[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
            let Some(rec) = self.load_chunk(txn, &id)? else {
                continue;
            };
            // Re-checked here, in order with every commit: a chunk
            // referenced again meanwhile is kept.
            if rec.refcount != 0 || zero_ms(&rec) > before {
                continue;
            }
            txn.unput(keys::zero(self.group, zero_ms(&rec), &id.0))?;
            txn.delete(keys::chunk(self.group, &id.0));
            out.reaped.push(ChunkInfo {
                chunk_id: raw.clone(),
                known: false,
                size: rec.size,
                refcount: 0,
                locations: rec.locations,
            });
        }
        Ok(out)
    }

    pub(super) fn settle<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &SettleOp,
    ) -> Result<CommandResult, NsError> {
        let mut stats = self.group_record(txn)?;
        if op.settled_ms > stats.settled_ms {
            stats.settled_ms = op.settled_ms;
            txn.put(keys::group_record(self.group), &stats);
        }
        Ok(CommandResult::default())
    }

    /// The next sequence this group will give a reference batch for `target`.
    pub(super) fn next_out_seq<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        target: u32,
    ) -> Result<u64, NsError> {
        Ok(kv
            .get(&keys::out_seq(self.group, target))?
            .map(|b| u64_at(&b, 0))
            .unwrap_or(1)
            .max(1))
    }

    /// The last sequence applied here of the batches from `source`.
    pub fn applied_from<R: KvRead + ?Sized>(&self, kv: &R, source: u32) -> Result<u64, NsError> {
        Ok(kv
            .get(&keys::watermark(self.group, source))?
            .map(|b| u64_at(&b, 0))
            .unwrap_or(0))
    }

    pub(super) fn query_holds<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &HoldsQuery,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        let stats = self.group_record(kv)?;
        out.settled_ms = stats.settled_ms;
        // Files older than the horizon that the index does not list may be
        // deleted.
        out.horizon_ms = gc_horizon_ms(&stats);
        for raw in &q.chunk_ids {
            let id = ChunkId::try_from(&raw[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
            let listed = self
                .load_chunk(kv, &id)?
                .is_some_and(|r| r.locations.contains(&q.node_id));
            out.present.push(listed);
        }
        Ok(())
    }

    /// Unreferenced chunks that became so before `before_ms`, oldest first.
    pub fn zero_before<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(ChunkId, ChunkRecord)>, NsError> {
        let prefix = keys::zero_prefix(self.group);
        let mut out = Vec::new();
        for (k, _) in kv.scan(&prefix, &[], limit)? {
            let rest = &k[prefix.len()..];
            if u64_at(rest, 0) >= before_ms {
                break;
            }
            let Ok(id) = ChunkId::try_from(&rest[8.min(rest.len())..]) else {
                continue;
            };
            if let Some(rec) = self.load_chunk(kv, &id)? {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// Unreferenced chunks and their bytes: (freeable before `before_ms`,
    /// not yet). Reads the whole unreferenced index: for reports.
    pub fn zero_report<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        before_ms: u64,
    ) -> Result<[(u64, u64); 2], NsError> {
        let prefix = keys::zero_prefix(self.group);
        let mut out = [(0u64, 0u64); 2];
        let mut after = Vec::new();
        loop {
            let page = kv.scan(&prefix, &after, 4096)?;
            for (k, _) in &page {
                let rest = &k[prefix.len()..];
                let Ok(id) = ChunkId::try_from(&rest[8.min(rest.len())..]) else {
                    continue;
                };
                let size = self.load_chunk(kv, &id)?.map(|r| r.size).unwrap_or(0);
                let slot = usize::from(u64_at(rest, 0) >= before_ms);
                out[slot].0 += 1;
                out[slot].1 += size;
            }
            match page.last() {
                Some((k, _)) if page.len() == 4096 => after = k[prefix.len()..].to_vec(),
                _ => return Ok(out),
            }
        }
    }

    /// The storage nodes (group 0), by id.
    pub fn storage_nodes<R: KvRead + ?Sized>(&self, kv: &R) -> Result<Vec<StorageNode>, NsError> {
        let prefix = keys::storage_prefix(self.group);
        let mut out = Vec::new();
        let mut after = Vec::new();
        loop {
            let page = kv.scan(&prefix, &after, 1024)?;
            let done = page.len() < 1024;
            for (k, v) in &page {
                out.push(decode::<StorageNode>(k, v)?);
            }
            match page.last() {
                Some((k, _)) if !done => after = k[prefix.len()..].to_vec(),
                _ => return Ok(out),
            }
        }
    }

    /// The group's record: replication factor and counters.
    pub fn stats<R: KvRead + ?Sized>(&self, kv: &R) -> Result<GroupRecord, NsError> {
        self.group_record(kv)
    }

    /// Up to `limit` chunks the under-replicated index lists after `after`
    /// (wrapping to the start), with their records.
    pub fn under_replicated<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<(ChunkId, ChunkRecord)>, NsError> {
        let prefix = keys::under_prefix(self.group);
        let mut keys = match after {
            Some(a) => kv.scan(&prefix, &a.0, limit)?,
            None => Vec::new(),
        };
        if keys.len() < limit {
            for kvp in kv.scan(&prefix, &[], limit - keys.len())? {
                if !keys.iter().any(|k| k.0 == kvp.0) {
                    keys.push(kvp);
                }
            }
        }
        let mut out = Vec::new();
        for (k, _) in keys {
            let Ok(id) = ChunkId::try_from(&k[prefix.len()..]) else {
                continue;
            };
            if let Some(rec) = self.load_chunk(kv, &id)? {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// Up to `limit` chunk records in id order, after `after` (None: from the start).
    pub fn chunks_after<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<(ChunkId, ChunkRecord)>, NsError> {
        let prefix = keys::chunk_prefix(self.group);
        let after = after.map(|a| a.0.to_vec()).unwrap_or_default();
        let mut out = Vec::new();
        for (k, v) in kv.scan(&prefix, &after, limit)? {
            let Ok(id) = ChunkId::try_from(&k[prefix.len()..]) else {
                continue;
            };
            out.push((id, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Storage-node list and replication factor (group 0).
    pub(super) fn query_storage_nodes<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        out.storage_nodes = self.storage_nodes(kv)?;
        out.replication = replication_of(&self.group_record(kv)?);
        Ok(())
    }

    /// How many of the group's live chunk records list `node` (a full scan).
    pub(super) fn count_node_chunks<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        node: u64,
    ) -> Result<u64, NsError> {
        let mut after: Option<ChunkId> = None;
        let mut n = 0;
        loop {
            let page = self.chunks_after(kv, after.as_ref(), 4096)?;
            // Unreferenced chunks do not count: nothing needs their copies.
            n += page
                .iter()
                .filter(|(_, r)| r.refcount > 0 && r.locations.contains(&node))
                .count() as u64;
            if page.len() < 4096 {
                return Ok(n);
            }
            after = page.last().map(|(id, _)| *id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_replication_counts_live_chunks_only() {
        let rec = |refcount, locs: &[u64]| ChunkRecord {
            size: 1,
            refcount,
            locations: locs.to_vec(),
            zero_since: None,
        };
        assert!(under(&rec(1, &[1, 2]), 3));
        assert!(!under(&rec(1, &[1, 2, 3]), 3));
        assert!(!under(&rec(0, &[1]), 3), "unreferenced chunks are GC's");
        assert!(!under(&rec(2, &[4]), 1));
    }
}
