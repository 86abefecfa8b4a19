//! The state-machine side of cross-shard operations: prepare (validate,
//! lock, reserve), decide (the coordinator's durable outcome), resolve
//! (apply or drop a prepared intent), and the ordered, exactly-once queue
//! of chunk reference changes between groups.
//!
//! Locks are records beside the keys they protect; every read of an inode
//! or a directory entry checks them, so no other command sees or changes a
//! key while a transaction that will change it is undecided. Prepare never
//! waits for a lock: it fails with `Busy` and the operation is retried, so
//! transactions cannot deadlock.

use std::collections::BTreeMap;

use proto::meta::{
    sub_op::S, AckRefsOp, AddEntrySub, Attr, ChunkDelta, CommandResult, DecisionRecord,
    DeliverRefsOp, DirentRecord, FileKind, IntentRecord, LinkSub, OutboxRecord, PendingRecord,
    RefBatch, RemoveEntrySub, SubOp, Timespec, TxnDecideOp, TxnGcOp, TxnPrepareOp, TxnState,
};
use proto::ChunkId;

use super::{
    attr, attr_mut, decode, keys, kind_of, name_str, new_inode, KvRead, Namespace, NsError, Txn,
    MAX_LINKS,
};

/// Most batches one delivery carries.
pub const MAX_DELIVERY_BATCHES: usize = 256;

/// A transaction's prepares and its commit decision must apply within this
/// many seconds of its start (by the leaders' clocks); later ones are
/// refused. Bounds how long a delayed message can matter.
pub const TXN_WINDOW_SECS: i64 = 30;
/// Tombstones of resolved transactions, and abort decisions, are kept this
/// long: well past the window, with room for clock differences.
pub const TXN_KEEP_SECS: i64 = 120;

/// Seconds from `a` to `b`.
pub fn secs_between(a: &Timespec, b: &Timespec) -> i64 {
    b.sec - a.sec
}

/// An unresolved intent, for the recovery loop.
#[derive(Clone, Debug)]
pub struct IntentInfo {
    pub txid: u64,
    pub coordinator: u32,
    pub prepared_at: Timespec,
}

/// A recorded decision, for the recovery loop.
#[derive(Clone, Debug)]
pub struct DecisionInfo {
    pub txid: u64,
    pub commit: bool,
    pub participants: Vec<u32>,
    pub decided_at: Timespec,
}

/// Queued reference batches for one target group, oldest first.
#[derive(Clone, Debug)]
pub struct OutboxInfo {
    pub target: u32,
    pub batches: Vec<RefBatch>,
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// The time in a tombstone-age key (`keys::tombstone_by_age`) at `at`.
fn age_sec(b: &[u8], at: usize) -> i64 {
    (u64_at(b, at) ^ (1 << 63)) as i64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn is_dir(kind: i32) -> bool {
    kind == FileKind::Directory as i32
}

impl Namespace {
    fn lock_key<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>, key: &[u8], txid: u64) {
        txn.put_raw(keys::lock(self.group, key), txid.to_be_bytes().to_vec());
    }

    /// Validates the sub-ops of this group, locks what they change and
    /// records the intent. Preparing the same transaction again answers as
    /// the first time.
    pub(super) fn txn_prepare<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &TxnPrepareOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        if op.txid == 0 {
            return Err(NsError::Invalid("transaction id 0".into()));
        }
        let ikey = keys::intent(self.group, op.txid);
        if let Some(b) = txn.get(&ikey)? {
            let rec: IntentRecord = decode(&ikey, &b)?;
            return Ok(CommandResult {
                prepared: rec.prepared,
                ..Default::default()
            });
        }
        // A prepare arriving after its transaction was resolved or past its
        // window is a delayed duplicate: it must not lock anything again.
        if txn.get(&keys::tombstone(self.group, op.txid))?.is_some() {
            return Err(NsError::Busy(format!("transaction {:x} is over", op.txid)));
        }
        if secs_between(&op.started_at.unwrap_or_default(), &now) > TXN_WINDOW_SECS {
            return Err(NsError::Busy(format!("transaction {:x} expired", op.txid)));
        }
        // Reads pass this transaction's own locks (two sub-ops may touch
        // one key), never another's.
        let ns = Namespace::for_txn(self.group, op.txid);
        let mut subs = op.subs.clone();
        let mut locks: Vec<Vec<u8>> = Vec::new();
        let mut out = Vec::with_capacity(subs.len());
        for sub in &mut subs {
            let s = sub
                .s
                .as_mut()
                .ok_or_else(|| NsError::Invalid("empty sub-operation".into()))?;
            let (locked, a) = ns.prepare_sub(txn, s, now)?;
            for k in locked {
                ns.lock_key(txn, &k, op.txid);
                locks.push(k[4..].to_vec());
            }
            out.push(a);
        }
        let rec = IntentRecord {
            coordinator: op.coordinator,
            subs,
            prepared_at: Some(now),
            locks: locks.into_iter().map(Into::into).collect(),
            prepared: out.clone(),
        };
        txn.put(ikey, &rec);
        self.count_pending(txn, |p| p.intents += 1)?;
        Ok(CommandResult {
            prepared: out,
            ..Default::default()
        })
    }

    /// Checks one sub-op; returns the keys to lock and the attributes the
    /// sub-op will leave.
    fn prepare_sub<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        s: &mut S,
        now: Timespec,
    ) -> Result<(Vec<Vec<u8>>, Attr), NsError> {
        let g = self.group;
        match s {
            S::AddEntry(a) => {
                proto::validate_name(&a.name)?;
                let mut parent = self.load_dir(txn, a.parent)?;
                let existing = self.load_dirent(txn, a.parent, &a.name)?;
                match (a.replace_ino, existing) {
                    (0, None) => {
                        // Reserve the entry: rmdir of the directory waits
                        // while the entry is undecided.
                        parent.reserved += 1;
                        txn.put(keys::inode(g, a.parent), &parent);
                    }
                    (0, Some(_)) if !a.rename => return Err(NsError::Exists(name_str(&a.name))),
                    (want, Some(d)) if d.ino == want => {}
                    (_, _) => {
                        return Err(NsError::Busy(format!(
                            "entry {:?} (changed meanwhile)",
                            name_str(&a.name)
                        )))
                    }
                }
                Ok((vec![keys::dirent(g, a.parent, &a.name)], Attr::default()))
            }
            S::RemoveEntry(r) => {
                self.load_dir(txn, r.parent)?;
                match self.load_dirent(txn, r.parent, &r.name)? {
                    None => return Err(NsError::NotFound(name_str(&r.name))),
                    Some(d) if d.ino != r.ino => {
                        return Err(NsError::Busy(format!(
                            "entry {:?} (changed meanwhile)",
                            name_str(&r.name)
                        )))
                    }
                    Some(_) => {}
                }
                Ok((vec![keys::dirent(g, r.parent, &r.name)], Attr::default()))
            }
            S::NewInode(n) => {
                if n.ino == 0 {
                    n.ino = self.alloc_ino(txn)?;
                }
                let rec = new_inode(n, now);
                Ok((vec![keys::inode(g, n.ino)], *attr(&rec)))
            }
            S::Link(l) => {
                let rec = self.load_inode(txn, l.ino)?;
                let a = *attr(&rec);
                let dir = kind_of(&a) == FileKind::Directory;
                if dir != is_dir(l.kind) {
                    return Err(if dir {
                        NsError::IsDir(format!("inode {}", l.ino))
                    } else {
                        NsError::NotDir(format!("inode {}", l.ino))
                    });
                }
                let mut after = a;
                if l.delta > 0 {
                    if dir {
                        return Err(NsError::Permission(
                            "hard links to directories are not allowed".into(),
                        ));
                    }
                    if a.nlink >= MAX_LINKS {
                        return Err(NsError::TooManyLinks(l.ino));
                    }
                    after.nlink += 1;
                } else if dir {
                    if rec.entries > 0 {
                        return Err(NsError::NotEmpty(format!("inode {}", l.ino)));
                    }
                    if rec.reserved > 0 {
                        return Err(NsError::Busy(format!(
                            "directory {} (an entry is being added)",
                            l.ino
                        )));
                    }
                    after.nlink = 0;
                } else {
                    after.nlink = after.nlink.saturating_sub(1);
                }
                after.ctime = Some(now);
                Ok((vec![keys::inode(g, l.ino)], after))
            }
            S::Moved(m) => {
                let rec = self.load_inode(txn, m.ino)?;
                let mut a = *attr(&rec);
                a.ctime = Some(now);
                Ok((vec![keys::inode(g, m.ino)], a))
            }
            S::RenameLock(_) => {
                let k = keys::absolute(g, keys::RENAME_LOCK);
                self.check_lock(txn, &k)?;
                Ok((vec![k], Attr::default()))
            }
        }
    }

    /// Applies (commit) or drops (abort) a prepared intent and releases its
    /// locks. An unknown transaction is already resolved: nothing to do.
    pub(super) fn txn_resolve<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        txid: u64,
        commit: bool,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        // Remember the transaction is over here, so a delayed prepare of it
        // is refused (dropped after TXN_KEEP_SECS by `txn_gc`).
        txn.put(keys::tombstone(self.group, txid), &now);
        // Indexed no earlier than the last one dropped: `txn_gc` reads from
        // there, and a leader whose clock runs behind must not file a
        // tombstone where it would never be dropped.
        let mut pending = self.pending_counts(txn)?;
        let floor = &pending.tombstone_floor;
        let floor_sec = (floor.len() >= 8).then(|| age_sec(floor, 0));
        let sec = match floor_sec {
            Some(f) if now.sec <= f => f + 1,
            _ => now.sec,
        };
        txn.put_raw(keys::tombstone_by_age(self.group, sec, txid), Vec::new());
        let ikey = keys::intent(self.group, txid);
        let Some(b) = txn.get(&ikey)? else {
            return Ok(CommandResult::default());
        };
        let rec: IntentRecord = decode(&ikey, &b)?;
        pending.intents = pending.intents.saturating_sub(1);
        txn.put(keys::pending(self.group), &pending);
        let ns = Namespace::resolver(self.group, txid);
        for sub in &rec.subs {
            let Some(s) = &sub.s else { continue };
            if commit {
                // A new inode carries the times its prepare reported.
                let at = match s {
                    S::NewInode(_) => rec.prepared_at.unwrap_or(now),
                    _ => now,
                };
                ns.commit_sub(txn, s, at)?;
            } else {
                ns.abort_sub(txn, s)?;
            }
        }
        for k in &rec.locks {
            txn.delete(keys::lock(self.group, &keys::absolute(self.group, k)));
        }
        txn.delete(ikey);
        Ok(CommandResult::default())
    }

    fn commit_sub<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        s: &S,
        now: Timespec,
    ) -> Result<(), NsError> {
        let g = self.group;
        match s {
            S::AddEntry(a) => {
                let mut parent = self.load_dir(txn, a.parent)?;
                let pa = attr_mut(&mut parent);
                let gained = i64::from(is_dir(a.kind));
                let lost = i64::from(a.replace_ino != 0 && is_dir(a.replace_kind));
                pa.nlink = (i64::from(pa.nlink) + gained - lost).max(0) as u32;
                pa.mtime = Some(now);
                pa.ctime = Some(now);
                if a.replace_ino == 0 {
                    // The reservation made at prepare becomes the entry.
                    parent.reserved = parent.reserved.saturating_sub(1);
                    parent.entries += 1;
                }
                txn.put(keys::inode(g, a.parent), &parent);
                txn.put(
                    keys::dirent(g, a.parent, &a.name),
                    &DirentRecord {
                        ino: a.ino,
                        kind: a.kind,
                    },
                );
            }
            S::RemoveEntry(r) => {
                let mut parent = self.load_dir(txn, r.parent)?;
                parent.entries = parent.entries.saturating_sub(1);
                let pa = attr_mut(&mut parent);
                if is_dir(r.kind) {
                    pa.nlink = pa.nlink.saturating_sub(1);
                }
                pa.mtime = Some(now);
                pa.ctime = Some(now);
                txn.put(keys::inode(g, r.parent), &parent);
                txn.delete(keys::dirent(g, r.parent, &r.name));
            }
            S::NewInode(n) => {
                txn.put(keys::inode(g, n.ino), &new_inode(n, now));
            }
            S::Link(l) => {
                if l.delta > 0 {
                    let mut rec = self.load_inode(txn, l.ino)?;
                    let a = attr_mut(&mut rec);
                    a.nlink += 1;
                    a.ctime = Some(now);
                    txn.put(keys::inode(g, l.ino), &rec);
                } else {
                    self.drop_link(txn, l.ino, now)?;
                }
            }
            S::Moved(m) => {
                let rec = self.load_inode(txn, m.ino)?;
                let dir = kind_of(attr(&rec)) == FileKind::Directory;
                self.moved(txn, m.ino, dir, m.new_parent, now)?;
            }
            S::RenameLock(_) => {}
        }
        Ok(())
    }

    fn abort_sub<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>, s: &S) -> Result<(), NsError> {
        match s {
            S::AddEntry(AddEntrySub {
                parent,
                replace_ino: 0,
                ..
            }) => {
                // Give back the reservation.
                let mut rec = self.load_dir(txn, *parent)?;
                rec.reserved = rec.reserved.saturating_sub(1);
                txn.put(keys::inode(self.group, *parent), &rec);
            }
            S::NewInode(_) => self.count_inode_freed(txn)?,
            _ => {}
        }
        Ok(())
    }

    /// Records the coordinator's outcome once. Commit is refused (and the
    /// transaction aborted) when the client's request already has a reply,
    /// success or error.
    pub(super) fn txn_decide<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &TxnDecideOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        let dkey = keys::decision(self.group, op.txid);
        if let Some(b) = txn.get(&dkey)? {
            let d: DecisionRecord = decode(&dkey, &b)?;
            return Ok(decided(d.commit));
        }
        // A commit past the window is refused: recovery may have settled
        // the transaction as aborted and forgotten it by then.
        let mut commit =
            op.commit && secs_between(&op.started_at.unwrap_or_default(), &now) <= TXN_WINDOW_SECS;
        let mut out = CommandResult::default();
        let dedup = op.client_id != 0 && op.request_seq != 0;
        if commit && dedup && op.request_seq < self.answered_below(txn, op.client_id)? {
            // The client has its answer from another run of this request
            // and has moved on (its result is forgotten): a run stalled
            // until now must not apply the request a second time.
            commit = false;
            out = duplicate(super::already_answered(op.request_seq));
        } else if commit && dedup {
            let rkey = keys::request(self.group, op.client_id, op.request_seq);
            if let Some(b) = txn.get(&rkey)? {
                let earlier: CommandResult = decode(&rkey, &b)?;
                // A batch whose cross-shard part is still to do is not an
                // answer yet. Any other recorded reply, an error included,
                // may have reached the client (a retry that ran while this
                // run was stalled): this run must not change the outcome.
                let unfinished = earlier.results.iter().any(super::crossed);
                if !unfinished {
                    commit = false;
                    out = duplicate(earlier);
                }
            }
        }
        txn.put(
            dkey,
            &DecisionRecord {
                commit,
                participants: op.participants.clone(),
                decided_at: Some(now),
            },
        );
        self.count_pending(txn, |p| p.decisions += 1)?;
        if out.txn_state == TxnState::TxnDuplicate as i32 {
            return Ok(out);
        }
        if commit && dedup {
            let mut result = op.result.clone().unwrap_or_default();
            result.txn_state = 0;
            self.record_result(txn, op.client_id, op.request_seq, op.acked_below, &result)?;
        }
        Ok(decided(commit))
    }

    /// Drops a decision every participant has applied.
    pub(super) fn txn_forget<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        txid: u64,
    ) -> Result<CommandResult, NsError> {
        let dkey = keys::decision(self.group, txid);
        if txn.get(&dkey)?.is_some() {
            txn.delete(dkey);
            self.count_pending(txn, |p| p.decisions = p.decisions.saturating_sub(1))?;
        }
        Ok(CommandResult::default())
    }

    /// This group's counts of open transaction records.
    pub fn pending_counts<R: KvRead + ?Sized>(&self, kv: &R) -> Result<PendingRecord, NsError> {
        let key = keys::pending(self.group);
        Ok(match kv.get(&key)? {
            Some(b) => decode(&key, &b)?,
            None => PendingRecord::default(),
        })
    }

    fn count_pending<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        f: impl FnOnce(&mut PendingRecord),
    ) -> Result<(), NsError> {
        let mut p = self.pending_counts(txn)?;
        f(&mut p);
        txn.put(keys::pending(self.group), &p);
        Ok(())
    }

    /// Drops tombstones older than `op.before`, oldest first (a bounded
    /// number per call).
    pub(super) fn txn_gc<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &TxnGcOp,
    ) -> Result<CommandResult, NsError> {
        let before = op.before.unwrap_or_default();
        let prefix = keys::tombstone_age_prefix(self.group);
        let mut pending = self.pending_counts(txn)?;
        let mut floor = None;
        for (k, _) in txn.scan(&prefix, &pending.tombstone_floor, 4096)? {
            if age_sec(&k, prefix.len()) >= before.sec {
                break;
            }
            txn.delete(keys::tombstone(self.group, u64_at(&k, prefix.len() + 8)));
            floor = Some(k[prefix.len()..].to_vec());
            txn.delete(k);
        }
        if let Some(f) = floor {
            pending.tombstone_floor = f.into();
            txn.put(keys::pending(self.group), &pending);
        }
        Ok(CommandResult::default())
    }

    /// Whether the oldest tombstone is older than `before`.
    pub fn has_old_tombstones<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        before: &Timespec,
    ) -> Result<bool, NsError> {
        let prefix = keys::tombstone_age_prefix(self.group);
        let floor = self.pending_counts(kv)?.tombstone_floor;
        Ok(kv
            .scan(&prefix, &floor, 1)?
            .first()
            .is_some_and(|(k, _)| age_sec(k, prefix.len()) < before.sec))
    }

    pub(super) fn txn_state<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        txid: u64,
    ) -> Result<TxnState, NsError> {
        let dkey = keys::decision(self.group, txid);
        Ok(match kv.get(&dkey)? {
            Some(b) => {
                if decode::<DecisionRecord>(&dkey, &b)?.commit {
                    TxnState::TxnCommitted
                } else {
                    TxnState::TxnAborted
                }
            }
            None => TxnState::TxnUnknown,
        })
    }

    // ---- chunk references between groups ------------------------------

    /// Appends a batch of reference changes for `target` to the outbox.
    pub(super) fn queue_refs<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        target: u32,
        deltas: Vec<ChunkDelta>,
    ) -> Result<(), NsError> {
        let skey = keys::out_seq(self.group, target);
        let seq = txn.get(&skey)?.map(|b| u64_at(&b, 0)).unwrap_or(1).max(1);
        txn.put(
            keys::outbox(self.group, target, seq),
            &OutboxRecord { deltas },
        );
        txn.put_raw(skey, (seq + 1).to_be_bytes().to_vec());
        Ok(())
    }

    /// Applies the batches from `source` that follow the last one applied,
    /// in order; replies with the new watermark.
    pub(super) fn deliver_refs<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &DeliverRefsOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        if op.batches.len() > MAX_DELIVERY_BATCHES {
            return Err(NsError::Invalid("too many batches in one delivery".into()));
        }
        let wkey = keys::watermark(self.group, op.source);
        let mut mark = txn.get(&wkey)?.map(|b| u64_at(&b, 0)).unwrap_or(0);
        let mut stats = self.group_record(txn)?;
        let count = stats.group_count;
        for b in &op.batches {
            if b.seq <= mark {
                continue;
            }
            if b.seq != mark + 1 {
                // A gap: the sender resends from the watermark.
                break;
            }
            for d in &b.deltas {
                let id = ChunkId::try_from(&d.chunk_id[..])
                    .map_err(|e| NsError::Invalid(e.to_string()))?;
                if id.group(count) != self.group {
                    return Err(NsError::Invalid(format!(
                        "chunk {id} is not indexed by group {}",
                        self.group
                    )));
                }
                self.adjust_chunk(txn, &mut stats, &id, d.delta, d.size, &d.locations, now)?;
            }
            mark = b.seq;
        }
        txn.put(keys::group_record(self.group), &stats);
        txn.put_raw(wkey, mark.to_be_bytes().to_vec());
        Ok(CommandResult {
            watermark: mark,
            ..Default::default()
        })
    }

    /// Drops delivered batches up to `upto`.
    pub(super) fn ack_refs<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &AckRefsOp,
    ) -> Result<CommandResult, NsError> {
        // Blind deletes from the last acknowledged sequence: no scan steps
        // over batches dropped before.
        let akey = keys::out_acked(self.group, op.target);
        let acked = txn.get(&akey)?.map(|b| u64_at(&b, 0)).unwrap_or(0);
        let next = txn
            .get(&keys::out_seq(self.group, op.target))?
            .map(|b| u64_at(&b, 0))
            .unwrap_or(1);
        let upto = op
            .upto
            .min(next.saturating_sub(1))
            .min(acked + (MAX_DELIVERY_BATCHES * 4) as u64);
        if upto <= acked {
            return Ok(CommandResult::default());
        }
        for seq in acked + 1..=upto {
            txn.delete(keys::outbox(self.group, op.target, seq));
        }
        txn.put_raw(akey, upto.to_be_bytes().to_vec());
        Ok(CommandResult::default())
    }

    // ---- what the recovery loop and status read --------------------------

    /// Unresolved intents of this group (at most `limit`).
    pub fn intents<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        limit: usize,
    ) -> Result<Vec<IntentInfo>, NsError> {
        let prefix = keys::intent_prefix(self.group);
        let mut out = Vec::new();
        if self.pending_counts(kv)?.intents == 0 {
            return Ok(out);
        }
        for (k, v) in kv.scan(&prefix, &[], limit)? {
            let rec: IntentRecord = decode(&k, &v)?;
            out.push(IntentInfo {
                txid: u64_at(&k, prefix.len()),
                coordinator: rec.coordinator,
                prepared_at: rec.prepared_at.unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Decisions this group coordinates that are not yet forgotten.
    pub fn decisions<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        limit: usize,
    ) -> Result<Vec<DecisionInfo>, NsError> {
        let prefix = keys::decision_prefix(self.group);
        let mut out = Vec::new();
        if self.pending_counts(kv)?.decisions == 0 {
            return Ok(out);
        }
        for (k, v) in kv.scan(&prefix, &[], limit)? {
            let rec: DecisionRecord = decode(&k, &v)?;
            out.push(DecisionInfo {
                txid: u64_at(&k, prefix.len()),
                commit: rec.commit,
                participants: rec.participants,
                decided_at: rec.decided_at.unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Queued reference batches, per target, oldest first.
    pub fn outbox<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        per_target: usize,
    ) -> Result<Vec<OutboxInfo>, NsError> {
        let mut out: BTreeMap<u32, Vec<RefBatch>> = BTreeMap::new();
        // Every target ever queued to has a next-sequence key (never
        // deleted, at most one per group); read past what it acknowledged.
        let seqs = keys::out_seq_prefix(self.group);
        for (k, v) in kv.scan(&seqs, &[], usize::MAX)? {
            let target = u32_at(&k, seqs.len());
            let next = u64_at(&v, 0);
            let acked = kv
                .get(&keys::out_acked(self.group, target))?
                .map(|b| u64_at(&b, 0))
                .unwrap_or(0);
            if next <= acked + 1 {
                continue;
            }
            let prefix = keys::outbox_prefix(self.group, target);
            for (k, v) in kv.scan(&prefix, &acked.to_be_bytes(), per_target)? {
                let rec: OutboxRecord = decode(&k, &v)?;
                out.entry(target).or_default().push(RefBatch {
                    seq: u64_at(&k, prefix.len()),
                    deltas: rec.deltas,
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|(target, batches)| OutboxInfo { target, batches })
            .collect())
    }
}

/// A decide's answer for a request that already has `reply`: a success
/// travels as the answer itself, an error inside it (an answer with an
/// error would read as a failed decide, and the intents would wait for
/// recovery).
fn duplicate(reply: CommandResult) -> CommandResult {
    let mut out = if reply.error.is_none() {
        reply
    } else {
        CommandResult {
            reply: Some(Box::new(reply)),
            ..Default::default()
        }
    };
    out.txn_state = TxnState::TxnDuplicate as i32;
    out
}

fn decided(commit: bool) -> CommandResult {
    CommandResult {
        txn_state: if commit {
            TxnState::TxnCommitted
        } else {
            TxnState::TxnAborted
        } as i32,
        ..Default::default()
    }
}

/// Sub-ops by kind, for building transactions.
pub fn add_entry(
    parent: u64,
    name: &[u8],
    ino: u64,
    kind: i32,
    replace: Option<(u64, i32)>,
    rename: bool,
) -> SubOp {
    let (replace_ino, replace_kind) = replace.unwrap_or((0, 0));
    SubOp {
        s: Some(S::AddEntry(AddEntrySub {
            parent,
            name: name.to_vec().into(),
            ino,
            kind,
            replace_ino,
            replace_kind,
            rename,
        })),
    }
}

pub fn remove_entry(parent: u64, name: &[u8], ino: u64, kind: i32) -> SubOp {
    SubOp {
        s: Some(S::RemoveEntry(RemoveEntrySub {
            parent,
            name: name.to_vec().into(),
            ino,
            kind,
        })),
    }
}

pub fn link(ino: u64, delta: i32, kind: i32) -> SubOp {
    SubOp {
        s: Some(S::Link(LinkSub { ino, delta, kind })),
    }
}
