//! The change feed of one group: every applied command that adds or
//! removes a directory entry, changes a file's layout or its tags appends
//! events (`F` + sequence), in apply order, so a media server can rescan
//! only what changed (`musicfs watch`). The events are derived from the
//! command's writes, so every path that changes an entry (cross-shard
//! transactions included) is covered by the same code.
//!
//! The feed keeps the newest `KEEP` events of the group; a reader whose
//! cursor fell behind that learns it from `oldest_seq` and rescans.

use proto::meta::{
    command::Op, ChangeEvent, ChangeKind, ChangesQuery, Command, DirentRecord, FileKind,
    QueryResult, Tags,
};

use super::txn::u64_at;
use super::{decode, keys, KvError, KvRead, Namespace, NsError, Txn};

/// Events kept per group.
pub const KEEP: u64 = 200_000;
/// Most events one query returns.
const MAX_PAGE: usize = 1000;

/// The sequence the next event gets (sequences start at 1).
fn next_seq<R: KvRead + ?Sized>(kv: &R, group: u32) -> Result<u64, KvError> {
    Ok(kv
        .get(&keys::feed_seq(group))?
        .map(|v| u64_at(&v, 0))
        .unwrap_or(1))
}

fn dirent_event(
    kind: ChangeKind,
    parent: u64,
    name: &[u8],
    d: &DirentRecord,
    time_ms: u64,
) -> ChangeEvent {
    ChangeEvent {
        kind: kind as i32,
        ino: d.ino,
        file_kind: d.kind,
        parent,
        name: name.to_vec().into(),
        time_ms,
        ..Default::default()
    }
}

/// Appends the events that `txn`'s writes make, compared with `base` (the
/// state before the command).
pub(super) fn record<R: KvRead + ?Sized>(
    txn: &mut Txn<'_, R>,
    base: &R,
    group: u32,
    cmd: &Command,
) -> Result<(), KvError> {
    let time_ms = cmd.now.map(|t| t.as_millis()).unwrap_or(0);
    let (committed, hint) = match &cmd.op {
        Some(Op::CommitLayout(op)) => (Some(op.ino), Some((op.hint_parent, op.hint_name.clone()))),
        _ => (None, None),
    };
    let modified = |ino: u64| ChangeEvent {
        kind: ChangeKind::Modified as i32,
        ino,
        file_kind: FileKind::Regular as i32,
        parent: hint.as_ref().map_or(0, |h| h.0),
        name: hint.as_ref().map(|h| h.1.clone()).unwrap_or_default(),
        time_ms,
        ..Default::default()
    };
    let mut events = Vec::new();
    // A file's content changed: its layout was written or cut (but not
    // dropped with the inode), or a commit wrote it even if to the same.
    let mut changed: Vec<u64> = committed.into_iter().collect();
    for k in txn.writes.keys() {
        if k.len() == 13 && k[..4] == group.to_be_bytes() && k[4] == keys::LAYOUT {
            let ino = u64_at(k, 5);
            let inode_gone = matches!(txn.writes.get(&keys::inode(group, ino)), Some(None));
            if !inode_gone && !changed.contains(&ino) {
                changed.push(ino);
            }
        }
    }
    for (k, new) in &txn.writes {
        if k.len() < 5 || k[..4] != group.to_be_bytes() {
            continue;
        }
        let rest = &k[5..];
        match k[4] {
            keys::DIRENT if rest.len() >= 8 => {
                let parent = u64_at(rest, 0);
                let name = &rest[8..];
                let old: Option<DirentRecord> = match base.get(k)? {
                    Some(b) => Some(decode(k, &b)?),
                    None => None,
                };
                let new: Option<DirentRecord> = match new {
                    Some(b) => Some(decode(k, b)?),
                    None => None,
                };
                match (old, new) {
                    (None, Some(n)) => {
                        events.push(dirent_event(ChangeKind::Created, parent, name, &n, time_ms))
                    }
                    (Some(o), None) => {
                        events.push(dirent_event(ChangeKind::Deleted, parent, name, &o, time_ms))
                    }
                    // Replaced by another inode (a rename over it).
                    (Some(o), Some(n)) if o.ino != n.ino => {
                        events.push(dirent_event(ChangeKind::Deleted, parent, name, &o, time_ms));
                        events.push(dirent_event(ChangeKind::Created, parent, name, &n, time_ms));
                    }
                    _ => {}
                }
            }
            keys::LAYOUT if rest.len() == 8 => {
                let ino = u64_at(rest, 0);
                if let Some(i) = changed.iter().position(|c| *c == ino) {
                    changed.remove(i);
                    events.push(modified(ino));
                }
            }
            keys::TAGS if rest.len() == 8 => {
                let old = base.get(k)?;
                let tags: Tags = match (new, old) {
                    (Some(b), old) if old.as_deref() != Some(&b[..]) => decode(k, b)?,
                    // Tags forgotten while the file stays (a file that goes
                    // takes its tags along: its entry's deletion says so).
                    (None, Some(b))
                        if !matches!(
                            txn.writes.get(&keys::inode(group, u64_at(rest, 0))),
                            Some(None)
                        ) =>
                    {
                        decode(k, &b)?
                    }
                    _ => continue,
                };
                events.push(ChangeEvent {
                    kind: ChangeKind::Retagged as i32,
                    ino: u64_at(rest, 0),
                    file_kind: FileKind::Regular as i32,
                    path: tags.path,
                    time_ms,
                    ..Default::default()
                });
            }
            _ => {}
        }
    }
    // A commit that left the layout as it was.
    events.extend(changed.into_iter().map(modified));
    if events.is_empty() {
        return Ok(());
    }
    let mut seq = next_seq(txn, group)?;
    for mut e in events {
        e.seq = seq;
        txn.put(keys::feed_event(group, seq), &e);
        if seq > KEEP {
            txn.delete(keys::feed_event(group, seq - KEEP));
        }
        seq += 1;
    }
    txn.put_raw(keys::feed_seq(group), seq.to_be_bytes().to_vec());
    Ok(())
}

impl Namespace {
    pub(super) fn changes<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &ChangesQuery,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        let next = next_seq(kv, self.group)?;
        out.next_seq = next;
        out.oldest_seq = next.saturating_sub(KEEP).max(1);
        let limit = (q.limit as usize).clamp(1, MAX_PAGE);
        let start = q.after_seq.max(out.oldest_seq - 1);
        let after = if start == 0 {
            Vec::new()
        } else {
            start.to_be_bytes().to_vec()
        };
        let rows = kv.scan(&keys::feed_prefix(self.group), &after, limit + 1)?;
        out.more = rows.len() > limit;
        for (k, v) in rows.iter().take(limit) {
            out.changes.push(decode(k, v)?);
        }
        Ok(())
    }
}
