//! The namespace and chunk-index invariant checker (an fsck): reads every
//! group's state and reports each broken invariant. Used offline on a
//! stopped node's data directory (`musicfs-node check`) and by tests.
//!
//! Invariants: every entry reaches an inode of its kind and lives in its
//! parent's group; every inode lives in the group its number names and is
//! reachable from the root; link counts and entry counts match the entries;
//! a directory's parent pointer names the directory holding it; every chunk
//! reference in a layout is counted exactly once in the chunk index; no
//! intent, lock, decision or queued reference batch is left.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use prost::Message;
use proto::meta::{ChunkRecord, DirentRecord, FileKind, GroupRecord, InodeRecord, LayoutRecord};
use proto::{group_of_ino, ChunkId, ROOT_INO};
use serde::Serialize;

use crate::namespace::{keys, tagindex, KvError, KvRead};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub groups: u32,
    pub inodes: u64,
    pub entries: u64,
    pub chunks: u64,
    pub chunk_refs: u64,
    pub open_intents: u64,
    pub queued_ref_batches: u64,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Every key of `group`, in order, page by page.
fn for_each<R: KvRead + ?Sized>(
    kv: &R,
    group: u32,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), KvError> {
    let prefix = keys::group_prefix(group);
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = kv.scan(&prefix, &after, 4096)?;
        let Some((last, _)) = rows.last() else {
            return Ok(());
        };
        after = last[prefix.len()..].to_vec();
        for (k, v) in &rows {
            f(k, v);
        }
    }
}

fn u32_at(b: &[u8]) -> u32 {
    b.get(..4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

struct Inode {
    group: u32,
    rec: InodeRecord,
}

/// Checks the whole cluster state visible through `kv` (all groups).
pub fn check<R: KvRead + ?Sized>(kv: &R) -> Result<Report, KvError> {
    let mut r = Report::default();
    let Some(g0) = kv.get(&keys::group_record(0))? else {
        r.problems.push("group 0 is not initialised".into());
        return Ok(r);
    };
    let g0 = GroupRecord::decode(&g0[..]).map_err(|e| KvError::Corrupt {
        key: "group 0 record".into(),
        reason: e.to_string(),
    })?;
    let count = g0.group_count.max(1);
    r.groups = count;
    let mut inodes: HashMap<u64, Inode> = HashMap::new();
    let mut dirents: Vec<(u32, u64, Vec<u8>, DirentRecord)> = Vec::new();
    let mut layouts: HashMap<u64, (u32, LayoutRecord)> = HashMap::new();
    let mut tagged: Vec<(u32, u64)> = Vec::new();
    // Per group: tag records, and the tag index as stored.
    let mut tag_records: BTreeMap<u32, Vec<(u64, proto::meta::Tags)>> = BTreeMap::new();
    let mut tag_index: BTreeMap<u32, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
    // Groups whose tag index is built (others wait for `tag reindex`).
    let mut built: HashSet<u32> = HashSet::new();
    let mut chunks: HashMap<ChunkId, (u32, ChunkRecord)> = HashMap::new();
    let mut records: BTreeMap<u32, GroupRecord> = BTreeMap::new();
    // Reference queues: next sequence per (source, target), batches still
    // queued, and the last sequence each target applied per source.
    let mut out_seq: HashMap<(u32, u32), u64> = HashMap::new();
    let mut queued: HashMap<(u32, u32), u64> = HashMap::new();
    let mut applied: HashMap<(u32, u32), u64> = HashMap::new();
    let mut problems = Vec::new();
    // Per group: intent and decision records seen, and the counts kept.
    let mut seen: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut kept: HashMap<u32, proto::meta::PendingRecord> = HashMap::new();
    let mut acked: HashMap<(u32, u32), u64> = HashMap::new();
    let mut lowest_queued: HashMap<(u32, u32), u64> = HashMap::new();
    let mut under: HashMap<ChunkId, u32> = HashMap::new();
    let mut zero: HashMap<ChunkId, (u32, u64)> = HashMap::new();
    for g in 0..count {
        for_each(kv, g, |k, v| {
            let tag = k.get(4).copied().unwrap_or(0);
            let rest = &k[5.min(k.len())..];
            let bad =
                |what: &str, e: prost::DecodeError| format!("group {g}: undecodable {what}: {e}");
            match tag {
                keys::INODE => match InodeRecord::decode(v) {
                    Ok(rec) => {
                        let ino = u64_at(rest, 0);
                        if group_of_ino(ino) != g {
                            problems.push(format!("inode {ino} stored in group {g}"));
                        }
                        if rec.attr.as_ref().map(|a| a.ino) != Some(ino) {
                            problems.push(format!("inode {ino}: attributes name another inode"));
                        }
                        if rec.reserved != 0 {
                            problems.push(format!(
                                "inode {ino}: {} entries still reserved",
                                rec.reserved
                            ));
                        }
                        inodes.insert(ino, Inode { group: g, rec });
                    }
                    Err(e) => problems.push(bad("inode", e)),
                },
                keys::DIRENT => match DirentRecord::decode(v) {
                    Ok(d) => {
                        dirents.push((g, u64_at(rest, 0), rest[8.min(rest.len())..].to_vec(), d))
                    }
                    Err(e) => problems.push(bad("entry", e)),
                },
                keys::TAGS => match proto::meta::Tags::decode(v) {
                    Ok(t) => {
                        tagged.push((g, u64_at(rest, 0)));
                        tag_records.entry(g).or_default().push((u64_at(rest, 0), t));
                    }
                    Err(e) => problems.push(bad("tags", e)),
                },
                keys::LAYOUT => match LayoutRecord::decode(v) {
                    Ok(l) => {
                        layouts.insert(u64_at(rest, 0), (g, l));
                    }
                    Err(e) => problems.push(bad("layout", e)),
                },
                keys::CHUNK => match (ChunkRecord::decode(v), ChunkId::try_from(rest)) {
                    (Ok(c), Ok(id)) => {
                        chunks.insert(id, (g, c));
                    }
                    _ => problems.push(format!("group {g}: undecodable chunk record")),
                },
                keys::GROUP => match GroupRecord::decode(v) {
                    Ok(rec) => {
                        records.insert(g, rec);
                    }
                    Err(e) => problems.push(bad("group record", e)),
                },
                keys::INTENT => {
                    seen.entry(g).or_default().0 += 1;
                    r.open_intents += 1;
                    problems.push(format!("group {g}: intent {:x} left open", u64_at(rest, 0)));
                }
                // An abort decision is kept a while on purpose; a commit
                // decision is forgotten once every participant applied it.
                keys::DECISION => match proto::meta::DecisionRecord::decode(v) {
                    Ok(d) if d.commit => {
                        seen.entry(g).or_default().1 += 1;
                        r.open_intents += 1;
                        problems.push(format!(
                            "group {g}: commit of {:x} not yet applied everywhere",
                            u64_at(rest, 0)
                        ));
                    }
                    Ok(_) => seen.entry(g).or_default().1 += 1,
                    Err(e) => problems.push(bad("decision", e)),
                },
                keys::PENDING => match proto::meta::PendingRecord::decode(v) {
                    Ok(p) => {
                        kept.insert(g, p);
                    }
                    Err(e) => problems.push(bad("pending counts", e)),
                },
                keys::OUT_ACKED => {
                    acked.insert((g, u32_at(rest)), u64_at(v, 0));
                }
                keys::TAG_DISTINCT if tagindex::is_marker(k) => {
                    built.insert(g);
                }
                keys::TAG_POSTING | keys::TAG_VALUE | keys::TAG_DISTINCT => {
                    tag_index
                        .entry(g)
                        .or_default()
                        .insert(k.to_vec(), tagindex::comparable(k, v.to_vec()));
                }
                keys::LOCK => problems.push(format!("group {g}: a lock is left")),
                keys::OUTBOX => {
                    r.queued_ref_batches += 1;
                    *queued.entry((g, u32_at(rest))).or_default() += 1;
                    let low = lowest_queued.entry((g, u32_at(rest))).or_insert(u64::MAX);
                    *low = (*low).min(u64_at(rest, 4));
                    problems.push(format!("group {g}: a chunk reference batch is undelivered"));
                }
                keys::OUT_SEQ => {
                    out_seq.insert((g, u32_at(rest)), u64_at(v, 0));
                }
                keys::WATERMARK => {
                    applied.insert((u32_at(rest), g), u64_at(v, 0));
                }
                keys::ZERO => match ChunkId::try_from(&rest[8.min(rest.len())..]) {
                    Ok(id) => {
                        zero.insert(id, (g, u64_at(rest, 0)));
                    }
                    Err(_) => problems.push(format!("group {g}: bad unreferenced-index key")),
                },
                keys::UNDER => match ChunkId::try_from(rest) {
                    Ok(id) => {
                        under.insert(id, g);
                    }
                    Err(_) => problems.push(format!("group {g}: bad under-replicated key")),
                },
                _ => {}
            }
        })?;
    }
    // The tag index holds exactly what the tag records call for.
    for g in (0..count).filter(|g| built.contains(g)) {
        let records = tag_records.remove(&g).unwrap_or_default();
        let want = match tagindex::expected(g, records.iter().map(|(i, t)| (*i, t))) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("group {g}: tag index not computable: {e}"));
                continue;
            }
        };
        let have = tag_index.remove(&g).unwrap_or_default();
        if want != have {
            let missing = want.keys().filter(|k| !have.contains_key(*k)).count();
            let extra = have.keys().filter(|k| !want.contains_key(*k)).count();
            let differ = want
                .iter()
                .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
                .count();
            problems.push(format!(
                "group {g}: tag index out of step with the tags: {missing} entries missing, \
                 {extra} extra, {differ} with other counts"
            ));
        }
    }
    // The counts the recovery loop trusts to skip its scans.
    for g in 0..count {
        let (intents, decisions) = seen.get(&g).copied().unwrap_or_default();
        let p = kept.remove(&g).unwrap_or_default();
        if (p.intents, p.decisions) != (intents, decisions) {
            problems.push(format!(
                "group {g}: counts {} intents and {} decisions, holds {intents} and {decisions}",
                p.intents, p.decisions
            ));
        }
    }
    for (pair, low) in &lowest_queued {
        let a = acked.get(pair).copied().unwrap_or(0);
        if *low <= a {
            problems.push(format!(
                "group {}: batch {low} to group {} kept after acknowledgement up to {a}",
                pair.0, pair.1
            ));
        }
    }
    for (id, (g, _)) in &zero {
        if !chunks.contains_key(id) {
            problems.push(format!(
                "group {g}: chunk {id} listed as unreferenced but not indexed"
            ));
        }
    }
    for (id, g) in &under {
        if !chunks.contains_key(id) {
            problems.push(format!(
                "group {g}: chunk {id} listed as under-replicated but not indexed"
            ));
        }
    }
    r.inodes = inodes.len() as u64;
    r.entries = dirents.len() as u64;
    r.chunks = chunks.len() as u64;

    let is_dir =
        |i: &Inode| i.rec.attr.as_ref().map(|a| a.kind) == Some(FileKind::Directory as i32);
    // Entries: parent and target exist, kinds agree, counts per inode.
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut entries_in: HashMap<u64, u64> = HashMap::new();
    let mut holder: HashMap<u64, u64> = HashMap::new();
    for (g, parent, name, d) in &dirents {
        let name = String::from_utf8_lossy(name);
        if group_of_ino(*parent) != *g {
            problems.push(format!("entry {parent}/{name} stored in group {g}"));
        }
        match inodes.get(parent) {
            Some(p) if is_dir(p) => {}
            Some(_) => problems.push(format!("entry {parent}/{name}: parent is not a directory")),
            None => problems.push(format!("entry {parent}/{name}: parent inode missing")),
        }
        *entries_in.entry(*parent).or_default() += 1;
        match inodes.get(&d.ino) {
            None => problems.push(format!("entry {parent}/{name} -> {}: dangling", d.ino)),
            Some(t) => {
                let kind = t.rec.attr.as_ref().map(|a| a.kind).unwrap_or(0);
                if kind != d.kind {
                    problems.push(format!(
                        "entry {parent}/{name}: kind differs from its inode"
                    ));
                }
                if is_dir(t) {
                    *subdirs.entry(*parent).or_default() += 1;
                    if let Some(other) = holder.insert(d.ino, *parent) {
                        problems.push(format!(
                            "directory {} has entries in {other} and {parent}",
                            d.ino
                        ));
                    }
                }
            }
        }
        *links.entry(d.ino).or_default() += 1;
        children.entry(*parent).or_default().push(d.ino);
    }
    // Inodes: link counts, entry counts, parent pointers.
    for (ino, i) in &inodes {
        let a = i.rec.attr.unwrap_or_default();
        let n = links.get(ino).copied().unwrap_or(0);
        if is_dir(i) {
            let want_nlink = 2 + subdirs.get(ino).copied().unwrap_or(0);
            if a.nlink != want_nlink {
                problems.push(format!(
                    "directory {ino}: nlink {} but {want_nlink} expected",
                    a.nlink
                ));
            }
            let e = entries_in.get(ino).copied().unwrap_or(0);
            if i.rec.entries != e {
                problems.push(format!(
                    "directory {ino}: entry count {} but {e} entries",
                    i.rec.entries
                ));
            }
            if *ino != ROOT_INO {
                match holder.get(ino) {
                    Some(p) if *p == i.rec.parent => {}
                    Some(p) => problems.push(format!(
                        "directory {ino}: parent pointer {} but held by {p}",
                        i.rec.parent
                    )),
                    None => {}
                }
            }
        } else if a.nlink != n {
            problems.push(format!("inode {ino}: nlink {} but {n} entries", a.nlink));
        }
    }
    // Reachability from the root.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut queue = VecDeque::from([ROOT_INO]);
    while let Some(d) = queue.pop_front() {
        if !seen.insert(d) {
            continue;
        }
        for c in children.get(&d).into_iter().flatten() {
            if !seen.contains(c) {
                queue.push_back(*c);
            }
        }
    }
    for ino in inodes.keys() {
        if !seen.contains(ino) {
            problems.push(format!(
                "inode {ino} is not reachable from the root (orphan)"
            ));
        }
    }
    for (g, ino) in &tagged {
        match inodes.get(ino) {
            Some(i) if i.group == *g && !is_dir(i) => {}
            _ => problems.push(format!("tags of inode {ino} without a regular file")),
        }
    }
    // Chunk references: every extent counted once, in the right group.
    let mut refs: HashMap<ChunkId, u64> = HashMap::new();
    for (ino, (g, l)) in &layouts {
        match inodes.get(ino) {
            Some(i) if i.group == *g && !is_dir(i) => {}
            _ => problems.push(format!("layout of inode {ino} without a regular file")),
        }
        for e in &l.extents {
            match ChunkId::try_from(&e.chunk_id[..]) {
                Ok(id) => *refs.entry(id).or_default() += 1,
                Err(_) => problems.push(format!("layout of inode {ino}: bad chunk id")),
            }
        }
    }
    r.chunk_refs = refs.values().sum();
    for (id, n) in &refs {
        match chunks.get(id) {
            None => problems.push(format!("chunk {id}: referenced {n} times, not indexed")),
            Some((_, c)) if c.refcount != *n => problems.push(format!(
                "chunk {id}: refcount {} but {n} references",
                c.refcount
            )),
            Some(_) => {}
        }
    }
    let mut live: HashMap<u32, (u64, u64)> = HashMap::new();
    // The under-replicated index lists exactly the live chunks with fewer
    // locations than the replication factor.
    let mut short: HashMap<u32, u64> = HashMap::new();
    for (id, (g, c)) in &chunks {
        if id.group(count) != *g {
            problems.push(format!("chunk {id} indexed by group {g}"));
        }
        let rf = records
            .get(g)
            .map(crate::namespace::placement::replication_of)
            .unwrap_or(proto::DEFAULT_REPLICATION);
        let is_short = c.refcount > 0 && (c.locations.len() as u32) < rf;
        if is_short {
            *short.entry(*g).or_default() += 1;
        }
        // The unreferenced index lists exactly the chunks nothing references,
        // under the time they became so.
        let zero_at = c.zero_since.map(|t| t.as_millis()).unwrap_or(0);
        match (c.refcount == 0, zero.get(id)) {
            (true, Some((zg, at))) if zg == g && *at == zero_at => {}
            (false, None) => {}
            (unreferenced, entry) => problems.push(format!(
                "chunk {id}: refcount {} but unreferenced-index entry {entry:?} (since {zero_at}, {unreferenced})",
                c.refcount
            )),
        }
        if is_short != (under.get(id) == Some(g)) {
            problems.push(format!(
                "chunk {id}: {} locations, refcount {}, but {} the under-replicated index",
                c.locations.len(),
                c.refcount,
                if is_short {
                    "missing from"
                } else {
                    "listed in"
                }
            ));
        }
        if c.refcount > 0 {
            if !refs.contains_key(id) {
                problems.push(format!(
                    "chunk {id}: refcount {} but no reference",
                    c.refcount
                ));
            }
            let e = live.entry(*g).or_default();
            e.0 += 1;
            e.1 += c.size;
        }
    }
    // Files have no parent pointer; inode numbers were allocated.
    for (ino, i) in &inodes {
        if !is_dir(i) && i.rec.parent != 0 {
            problems.push(format!("file {ino} has a parent pointer"));
        }
        if let Some(rec) = records.get(&i.group) {
            if ino & ((1 << proto::GROUP_SHIFT) - 1) >= rec.next_seq {
                problems.push(format!("inode {ino} beyond its group's allocation"));
            }
        }
    }
    // Reference queues: every batch sent was applied once or is queued.
    for ((src, dst), next) in &out_seq {
        let done = applied.get(&(*src, *dst)).copied().unwrap_or(0);
        let waiting = queued.get(&(*src, *dst)).copied().unwrap_or(0);
        if done + waiting + 1 != *next {
            problems.push(format!(
                "references from group {src} to {dst}: {done} applied + {waiting} queued, \
                 but {} sent",
                next - 1
            ));
        }
    }
    // Group totals.
    let mut per_group: HashMap<u32, u64> = HashMap::new();
    for i in inodes.values() {
        *per_group.entry(i.group).or_default() += 1;
    }
    for (g, rec) in &records {
        let n = per_group.get(g).copied().unwrap_or(0);
        if rec.inode_count != n {
            problems.push(format!(
                "group {g}: inode count {} but {n} inodes",
                rec.inode_count
            ));
        }
        let u = short.get(g).copied().unwrap_or(0);
        if rec.under_replicated != u {
            problems.push(format!(
                "group {g}: counts {} under-replicated chunks, holds {u}",
                rec.under_replicated
            ));
        }
        let (c, b) = live.get(g).copied().unwrap_or_default();
        if rec.chunk_count != c || rec.chunk_bytes != b {
            problems.push(format!(
                "group {g}: chunk totals {}/{} but {c}/{b} live",
                rec.chunk_count, rec.chunk_bytes
            ));
        }
    }
    for g in 0..count {
        match records.get(&g) {
            None => problems.push(format!("group {g} has no group record")),
            Some(rec) if rec.group_count != count => problems.push(format!(
                "group {g} counts {} groups, group 0 {count}",
                rec.group_count
            )),
            Some(_) => {}
        }
    }
    r.problems = problems;
    Ok(r)
}
