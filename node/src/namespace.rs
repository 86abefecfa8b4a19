//! The namespace and chunk-index state machine of one metadata group.
//!
//! It is written against a small key-value interface so the same code runs
//! on RocksDB in a node and on a `BTreeMap` in property tests. Every command
//! runs in a [`Txn`] overlay: either all of its writes apply or, when it
//! returns an error, none do. The logic is deterministic: time comes from the
//! command, never from the clock.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use proto::meta::{
    command::Op, query::Q, Attr, ChunkDelta, ChunkInfo, ChunkRecord, Command, CommandResult,
    CommitLayoutOp, CreateOp, DirEntry, DirentRecord, Error as WireError, ErrorCode, Extent,
    FileKind, GroupRecord, InitOp, InodeRecord, LayoutRecord, LinkOp, NewInodeSub, Origin, Query,
    QueryResult, RemoveOp, RenameOp, SearchQuery, SetAttrOp, SetTagsOp, StatFs, Tags, Timespec,
    TrackHit,
};
use proto::{
    dir_group, group_of_ino, make_ino, validate_name, ChunkId, NameError, FORMAT_VERSION, ROOT_INO,
};

pub mod admission;
pub mod feed;
pub mod placement;
pub mod tagindex;
pub mod txn;
pub use admission::{is_client_op, op_name};
pub use txn::{DecisionInfo, IntentInfo, OutboxInfo};

/// Most hard links one inode may have (as ext4).
pub const MAX_LINKS: u32 = 65_000;
/// Largest page a directory listing returns.
pub const MAX_READDIR: usize = 4096;
/// Largest file size accepted (as ext4 with 4 KiB blocks).
pub const MAX_FILE_SIZE: u64 = 16 << 40;
/// Most creates one batch command carries.
pub const MAX_BATCH: usize = 1024;
/// Most tracks one search answer carries.
pub const MAX_SEARCH: usize = 1000;
/// Tag records one search call reads at most, and per page.
const MAX_SEARCH_SCAN: usize = 100_000;
const SEARCH_PAGE: usize = 1000;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o010;

/// Errors of the key-value layer under the state machine.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Errors of namespace operations. Each maps to one stable wire code.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} is not a directory")]
    NotDir(String),
    #[error("{0} is a directory")]
    IsDir(String),
    #[error("directory {0} is not empty")]
    NotEmpty(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("inode {ino} belongs to group {owner}, not to group {group}")]
    CrossShard { ino: u64, owner: u32, group: u32 },
    #[error("too many links to inode {0}")]
    TooManyLinks(u64),
    #[error("chunk {0} is not in the chunk index")]
    UnknownChunk(ChunkId),
    #[error("not permitted: {0}")]
    Permission(String),
    #[error("file size {0} exceeds the maximum")]
    FileTooBig(u64),
    #[error("group is not initialised")]
    NotInitialized,
    #[error("{0} is locked by an operation in progress")]
    Busy(String),
    #[error("stale layout commit: {0}")]
    Stale(String),
    #[error(transparent)]
    Kv(#[from] KvError),
}

impl NsError {
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            NsError::NotFound(_) => ErrorCode::NotFound,
            NsError::Exists(_) => ErrorCode::Exists,
            NsError::NotDir(_) => ErrorCode::NotDir,
            NsError::IsDir(_) => ErrorCode::IsDir,
            NsError::NotEmpty(_) => ErrorCode::NotEmpty,
            NsError::Invalid(_) => ErrorCode::Invalid,
            NsError::Name(NameError::TooLong(_)) => ErrorCode::NameTooLong,
            NsError::Name(_) => ErrorCode::Invalid,
            NsError::CrossShard { .. } => ErrorCode::CrossShard,
            NsError::TooManyLinks(_) => ErrorCode::TooManyLinks,
            NsError::UnknownChunk(_) => ErrorCode::UnknownChunk,
            NsError::Permission(_) => ErrorCode::Permission,
            NsError::FileTooBig(_) => ErrorCode::FileTooBig,
            NsError::NotInitialized => ErrorCode::NotInitialized,
            NsError::Busy(_) => ErrorCode::Busy,
            NsError::Stale(_) => ErrorCode::Stale,
            NsError::Kv(KvError::Corrupt { .. }) => ErrorCode::Corrupt,
            NsError::Kv(KvError::Storage(_)) => ErrorCode::Internal,
        };
        WireError::new(code, self.to_string())
    }
}

/// Key-value pairs returned by a scan.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A command's writes: key → new value, or `None` to delete.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Read access to one group's keys.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` pairs whose key starts with `prefix` and sorts after
    /// `prefix + after`, in key order.
    fn scan(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<KvPairs, KvError>;
}

/// An in-memory key-value store, for tests and tools.
#[derive(Default, Clone, Debug)]
pub struct MemKv(pub BTreeMap<Vec<u8>, Vec<u8>>);

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(key).cloned())
    }
    fn scan(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<KvPairs, KvError> {
        let mut start = prefix.to_vec();
        start.extend_from_slice(after);
        let mut out = Vec::new();
        for (k, v) in self.0.range(start.clone()..) {
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if !after.is_empty() && *k == start {
                continue;
            }
            out.push((k.clone(), v.clone()));
        }
        Ok(out)
    }
}

impl MemKv {
    pub fn apply_writes(&mut self, writes: Writes) {
        for (k, v) in writes {
            match v {
                Some(v) => self.0.insert(k, v),
                None => self.0.remove(&k),
            };
        }
    }
}

/// Key layout inside a group: `[group u32 BE][tag][...]`.
pub mod keys {
    pub const INODE: u8 = b'I';
    pub const DIRENT: u8 = b'D';
    pub const LAYOUT: u8 = b'L';
    pub const CHUNK: u8 = b'C';
    pub const GROUP: u8 = b'G';
    pub const REQUEST: u8 = b'R';
    /// Cross-shard intents, the locks they hold, and coordinator decisions.
    pub const INTENT: u8 = b'T';
    pub const LOCK: u8 = b'X';
    pub const DECISION: u8 = b'Y';
    /// Transactions this group has resolved (kept for a while, so a
    /// delayed prepare cannot revive one).
    pub const TOMBSTONE: u8 = b'K';
    pub const TOMBSTONE_AGE: u8 = b'k';
    /// Chunk reference batches queued for other groups, the next sequence
    /// per target, and the last sequence applied per source.
    pub const OUTBOX: u8 = b'O';
    pub const OUT_SEQ: u8 = b'Q';
    pub const WATERMARK: u8 = b'W';
    /// The last outbox sequence acknowledged per target: reads start past
    /// it instead of stepping over the deleted batches before it.
    pub const OUT_ACKED: u8 = b'A';
    /// Counts of open intents and decisions (`PendingRecord`).
    pub const PENDING: u8 = b'P';
    /// Live chunks with fewer locations than the replication factor.
    pub const UNDER: u8 = b'U';
    /// Storage nodes (group 0).
    pub const STORAGE: u8 = b'N';
    /// Unreferenced chunks by the time their refcount reached zero.
    pub const ZERO: u8 = b'z';
    /// Music tags of a regular file (`Tags`), by inode.
    pub const TAGS: u8 = b'M';
    /// The tag index (`tagindex`): a posting per track and indexed field,
    /// a record per distinct value, and the number of distinct values.
    pub const TAG_POSTING: u8 = b'S';
    pub const TAG_VALUE: u8 = b's';
    pub const TAG_DISTINCT: u8 = b'c';
    /// The change feed (`feed`): events by sequence, and the next sequence.
    pub const FEED: u8 = b'F';
    pub const FEED_SEQ: u8 = b'f';
    /// The key the directory-rename lock is taken on (group 0).
    pub const RENAME_LOCK: &[u8] = b"Zrename";

    pub fn group_prefix(group: u32) -> Vec<u8> {
        group.to_be_bytes().to_vec()
    }
    fn tagged(group: u32, tag: u8, cap: usize) -> Vec<u8> {
        let mut k = Vec::with_capacity(5 + cap);
        k.extend_from_slice(&group.to_be_bytes());
        k.push(tag);
        k
    }
    pub fn inode(group: u32, ino: u64) -> Vec<u8> {
        let mut k = tagged(group, INODE, 8);
        k.extend_from_slice(&ino.to_be_bytes());
        k
    }
    pub fn tags(group: u32, ino: u64) -> Vec<u8> {
        let mut k = tagged(group, TAGS, 8);
        k.extend_from_slice(&ino.to_be_bytes());
        k
    }
    pub fn tags_prefix(group: u32) -> Vec<u8> {
        tagged(group, TAGS, 0)
    }
    /// `[field][norm]\0`: the postings of one value; an inode follows.
    pub fn postings(group: u32, field: u8, norm: &[u8]) -> Vec<u8> {
        let mut k = tagged(group, TAG_POSTING, 2 + norm.len() + 8);
        k.push(field);
        k.extend_from_slice(norm);
        k.push(0);
        k
    }
    pub fn posting(group: u32, field: u8, norm: &[u8], ino: u64) -> Vec<u8> {
        let mut k = postings(group, field, norm);
        k.extend_from_slice(&ino.to_be_bytes());
        k
    }
    pub fn tag_values(group: u32, field: u8) -> Vec<u8> {
        let mut k = tagged(group, TAG_VALUE, 1);
        k.push(field);
        k
    }
    pub fn tag_value(group: u32, field: u8, norm: &[u8]) -> Vec<u8> {
        let mut k = tag_values(group, field);
        k.extend_from_slice(norm);
        k
    }
    /// The change feed: events by sequence, and the next sequence.
    pub fn feed_prefix(group: u32) -> Vec<u8> {
        tagged(group, FEED, 0)
    }
    pub fn feed_event(group: u32, seq: u64) -> Vec<u8> {
        let mut k = tagged(group, FEED, 8);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
    pub fn feed_seq(group: u32) -> Vec<u8> {
        tagged(group, FEED_SEQ, 0)
    }
    pub fn tag_distinct(group: u32, field: u8) -> Vec<u8> {
        let mut k = tagged(group, TAG_DISTINCT, 1);
        k.push(field);
        k
    }
    pub fn layout(group: u32, ino: u64) -> Vec<u8> {
        let mut k = tagged(group, LAYOUT, 8);
        k.extend_from_slice(&ino.to_be_bytes());
        k
    }
    pub fn dir_prefix(group: u32, parent: u64) -> Vec<u8> {
        let mut k = tagged(group, DIRENT, 8);
        k.extend_from_slice(&parent.to_be_bytes());
        k
    }
    pub fn dirent(group: u32, parent: u64, name: &[u8]) -> Vec<u8> {
        let mut k = dir_prefix(group, parent);
        k.extend_from_slice(name);
        k
    }
    pub fn chunk(group: u32, id: &[u8; 16]) -> Vec<u8> {
        let mut k = tagged(group, CHUNK, 16);
        k.extend_from_slice(id);
        k
    }
    pub fn chunk_prefix(group: u32) -> Vec<u8> {
        tagged(group, CHUNK, 0)
    }
    pub fn under(group: u32, id: &[u8; 16]) -> Vec<u8> {
        let mut k = tagged(group, UNDER, 16);
        k.extend_from_slice(id);
        k
    }
    pub fn under_prefix(group: u32) -> Vec<u8> {
        tagged(group, UNDER, 0)
    }
    pub fn zero(group: u32, since_ms: u64, id: &[u8; 16]) -> Vec<u8> {
        let mut k = tagged(group, ZERO, 24);
        k.extend_from_slice(&since_ms.to_be_bytes());
        k.extend_from_slice(id);
        k
    }
    pub fn zero_prefix(group: u32) -> Vec<u8> {
        tagged(group, ZERO, 0)
    }
    pub fn storage_node(group: u32, node: u64) -> Vec<u8> {
        let mut k = tagged(group, STORAGE, 8);
        k.extend_from_slice(&node.to_be_bytes());
        k
    }
    pub fn storage_prefix(group: u32) -> Vec<u8> {
        tagged(group, STORAGE, 0)
    }
    pub fn group_record(group: u32) -> Vec<u8> {
        tagged(group, GROUP, 0)
    }
    pub fn request_prefix(group: u32, client: u64) -> Vec<u8> {
        let mut k = tagged(group, REQUEST, 16);
        k.extend_from_slice(&client.to_be_bytes());
        k
    }
    pub fn request(group: u32, client: u64, seq: u64) -> Vec<u8> {
        let mut k = request_prefix(group, client);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
    pub fn intent(group: u32, txid: u64) -> Vec<u8> {
        let mut k = tagged(group, INTENT, 8);
        k.extend_from_slice(&txid.to_be_bytes());
        k
    }
    pub fn intent_prefix(group: u32) -> Vec<u8> {
        tagged(group, INTENT, 0)
    }
    pub fn decision(group: u32, txid: u64) -> Vec<u8> {
        let mut k = tagged(group, DECISION, 8);
        k.extend_from_slice(&txid.to_be_bytes());
        k
    }
    pub fn decision_prefix(group: u32) -> Vec<u8> {
        tagged(group, DECISION, 0)
    }
    pub fn tombstone(group: u32, txid: u64) -> Vec<u8> {
        let mut k = tagged(group, TOMBSTONE, 8);
        k.extend_from_slice(&txid.to_be_bytes());
        k
    }
    /// Tombstones by age, oldest first, for dropping them.
    pub fn tombstone_by_age(group: u32, sec: i64, txid: u64) -> Vec<u8> {
        let mut k = tagged(group, TOMBSTONE_AGE, 16);
        // Offset so that times sort as unsigned big-endian numbers.
        k.extend_from_slice(&((sec as u64) ^ (1 << 63)).to_be_bytes());
        k.extend_from_slice(&txid.to_be_bytes());
        k
    }
    pub fn tombstone_age_prefix(group: u32) -> Vec<u8> {
        tagged(group, TOMBSTONE_AGE, 0)
    }
    /// The lock on `key` (a key of the same group).
    pub fn lock(group: u32, key: &[u8]) -> Vec<u8> {
        let mut k = tagged(group, LOCK, key.len());
        k.extend_from_slice(key.get(4..).unwrap_or_default());
        k
    }
    /// A key of `group` from its group-relative form.
    pub fn absolute(group: u32, rel: &[u8]) -> Vec<u8> {
        let mut k = group.to_be_bytes().to_vec();
        k.extend_from_slice(rel);
        k
    }
    pub fn outbox_prefix(group: u32, target: u32) -> Vec<u8> {
        let mut k = tagged(group, OUTBOX, 12);
        k.extend_from_slice(&target.to_be_bytes());
        k
    }
    pub fn outbox(group: u32, target: u32, seq: u64) -> Vec<u8> {
        let mut k = outbox_prefix(group, target);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
    pub fn out_seq(group: u32, target: u32) -> Vec<u8> {
        let mut k = tagged(group, OUT_SEQ, 4);
        k.extend_from_slice(&target.to_be_bytes());
        k
    }
    pub fn out_seq_prefix(group: u32) -> Vec<u8> {
        tagged(group, OUT_SEQ, 0)
    }
    pub fn out_acked(group: u32, target: u32) -> Vec<u8> {
        let mut k = tagged(group, OUT_ACKED, 4);
        k.extend_from_slice(&target.to_be_bytes());
        k
    }
    pub fn pending(group: u32) -> Vec<u8> {
        tagged(group, PENDING, 0)
    }
    pub fn watermark(group: u32, source: u32) -> Vec<u8> {
        let mut k = tagged(group, WATERMARK, 4);
        k.extend_from_slice(&source.to_be_bytes());
        k
    }
}

/// A command's view of the store: reads see the command's own writes.
pub struct Txn<'a, R: KvRead + ?Sized> {
    base: &'a R,
    writes: Writes,
}

impl<'a, R: KvRead + ?Sized> Txn<'a, R> {
    pub fn new(base: &'a R) -> Self {
        Txn {
            base,
            writes: BTreeMap::new(),
        }
    }
    pub fn into_writes(self) -> Writes {
        self.writes
    }
    fn put<M: Message>(&mut self, key: Vec<u8>, value: &M) {
        self.writes.insert(key, Some(value.encode_to_vec()));
    }
    fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }
    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }
    /// Deletes a key this command may itself have written: a key that is
    /// not in the store is simply not written (no tombstone is left).
    fn unput(&mut self, key: Vec<u8>) -> Result<(), KvError> {
        if matches!(self.writes.get(&key), Some(Some(_))) && self.base.get(&key)?.is_none() {
            self.writes.remove(&key);
        } else {
            self.writes.insert(key, None);
        }
        Ok(())
    }
}

impl<R: KvRead + ?Sized> KvRead for Txn<'_, R> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<KvPairs, KvError> {
        // Base rows, corrected by this transaction's writes in the range.
        let pending = self
            .writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count();
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = self
            .base
            .scan(prefix, after, limit + pending)?
            .into_iter()
            .collect();
        let mut start = prefix.to_vec();
        start.extend_from_slice(after);
        for (k, v) in self.writes.range(start.clone()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if !after.is_empty() && *k == start {
                continue;
            }
            match v {
                Some(v) => rows.insert(k.clone(), v.clone()),
                None => rows.remove(k),
            };
        }
        Ok(rows.into_iter().take(limit).collect())
    }
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, KvError> {
    M::decode(bytes).map_err(|e| KvError::Corrupt {
        key: format!("{key:02x?}"),
        reason: e.to_string(),
    })
}

fn kind_of(a: &Attr) -> FileKind {
    FileKind::try_from(a.kind).unwrap_or(FileKind::Unspecified)
}

/// The reply to a copy of a request the client already has the answer to.
fn already_answered(seq: u64) -> CommandResult {
    CommandResult {
        error: Some(WireError::new(
            ErrorCode::Stale,
            format!("request {seq} was already answered"),
        )),
        ..Default::default()
    }
}

fn name_str(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// One group's state machine logic.
pub struct Namespace {
    pub group: u32,
    /// The cross-shard transaction whose locks this instance may pass
    /// (0: none).
    txid: u64,
    /// Applying a decided transaction: its changes were validated when it
    /// prepared, and no lock may stop it now.
    resolving: bool,
}

impl Namespace {
    pub fn new(group: u32) -> Self {
        Namespace {
            group,
            txid: 0,
            resolving: false,
        }
    }

    fn for_txn(group: u32, txid: u64) -> Self {
        Namespace {
            group,
            txid,
            resolving: false,
        }
    }

    fn resolver(group: u32, txid: u64) -> Self {
        Namespace {
            group,
            txid,
            resolving: true,
        }
    }

    /// Fails with `Busy` when another transaction holds a lock on `key`.
    fn check_lock<R: KvRead + ?Sized>(&self, kv: &R, key: &[u8]) -> Result<(), NsError> {
        if self.resolving {
            return Ok(());
        }
        if let Some(holder) = kv.get(&keys::lock(self.group, key))? {
            let holder = holder
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if holder != self.txid || holder == 0 {
                return Err(NsError::Busy(describe_key(key)));
            }
        }
        Ok(())
    }

    fn own(&self, ino: u64) -> Result<(), NsError> {
        let owner = group_of_ino(ino);
        if owner != self.group {
            return Err(NsError::CrossShard {
                ino,
                owner,
                group: self.group,
            });
        }
        Ok(())
    }

    fn group_record<R: KvRead + ?Sized>(&self, kv: &R) -> Result<GroupRecord, NsError> {
        let key = keys::group_record(self.group);
        match kv.get(&key)? {
            Some(b) => Ok(decode(&key, &b)?),
            None => Err(NsError::NotInitialized),
        }
    }

    fn load_inode<R: KvRead + ?Sized>(&self, kv: &R, ino: u64) -> Result<InodeRecord, NsError> {
        self.own(ino)?;
        let key = keys::inode(self.group, ino);
        self.check_lock(kv, &key)?;
        match kv.get(&key)? {
            Some(b) => Ok(decode(&key, &b)?),
            None => Err(NsError::NotFound(format!("inode {ino}"))),
        }
    }

    fn load_dir<R: KvRead + ?Sized>(&self, kv: &R, ino: u64) -> Result<InodeRecord, NsError> {
        let rec = self.load_inode(kv, ino)?;
        if kind_of(attr(&rec)) != FileKind::Directory {
            return Err(NsError::NotDir(format!("inode {ino}")));
        }
        Ok(rec)
    }

    fn load_dirent<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<DirentRecord>, NsError> {
        let key = keys::dirent(self.group, parent, name);
        self.check_lock(kv, &key)?;
        match kv.get(&key)? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    fn load_layout<R: KvRead + ?Sized>(&self, kv: &R, ino: u64) -> Result<Vec<Extent>, NsError> {
        let key = keys::layout(self.group, ino);
        match kv.get(&key)? {
            Some(b) => Ok(decode::<LayoutRecord>(&key, &b)?.extents),
            None => Ok(Vec::new()),
        }
    }

    fn load_chunk<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        id: &ChunkId,
    ) -> Result<Option<ChunkRecord>, NsError> {
        let key = keys::chunk(self.group, &id.0);
        match kv.get(&key)? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    // ---- commands ---------------------------------------------------------

    /// Applies one replicated command exactly once per (client, sequence):
    /// a retry of a command that already applied gets the recorded result
    /// and changes nothing. Returns the writes and the reply. Storage
    /// failures are returned as errors; every other failure is a reply.
    pub fn apply_request<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        cmd: &Command,
    ) -> Result<(Writes, CommandResult), KvError> {
        let dedup = cmd.client_id != 0 && cmd.request_seq != 0;
        if dedup {
            let key = keys::request(self.group, cmd.client_id, cmd.request_seq);
            if let Some(b) = kv.get(&key)? {
                return Ok((BTreeMap::new(), decode(&key, &b)?));
            }
            // Its result was forgotten because the client has its answer: a
            // copy arriving late (a delayed attempt, a stalled coordinator)
            // must not apply a second time.
            if cmd.request_seq < self.answered_below(kv, cmd.client_id)? {
                return Ok((BTreeMap::new(), already_answered(cmd.request_seq)));
            }
        }
        let mut txn = Txn::new(kv);
        let mut transient = false;
        let result = match self.apply(&mut txn, cmd) {
            Ok(r) => r,
            Err(NsError::Kv(e)) => return Err(e),
            Err(e) => {
                txn = Txn::new(kv);
                // A lock or a cross-shard hand-off changed nothing: the
                // retry of this request must run again, not replay this.
                transient = matches!(e, NsError::Busy(_) | NsError::CrossShard { .. });
                CommandResult {
                    error: Some(e.to_wire()),
                    ..Default::default()
                }
            }
        };
        if result.error.is_none() {
            feed::record(&mut txn, kv, self.group, cmd)?;
        }
        if dedup && !transient {
            self.record_result(
                &mut txn,
                cmd.client_id,
                cmd.request_seq,
                cmd.acked_below,
                &result,
            )?;
        }
        Ok((txn.into_writes(), result))
    }

    /// The client's low-water mark in this group: every request below it
    /// was answered and the client has said so (its results are dropped).
    pub(crate) fn answered_below<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        client: u64,
    ) -> Result<u64, KvError> {
        Ok(kv
            .get(&keys::request_prefix(self.group, client))?
            .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Records `result` as the reply to the client's request `seq`, and
    /// forgets results the client has seen: blind deletes from a per-client
    /// low-water mark, at most 64 per command, so no command ever iterates
    /// over old results.
    fn record_result<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        client: u64,
        seq: u64,
        acked_below: u64,
        result: &CommandResult,
    ) -> Result<(), KvError> {
        let mark_key = keys::request_prefix(self.group, client);
        let low = match txn.get(&mark_key)? {
            Some(b) => b
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(acked_below),
            // No earlier result of this client exists in this group.
            None => acked_below,
        };
        let target = acked_below.clamp(low, low.saturating_add(64));
        for s in low..target {
            txn.delete(keys::request(self.group, client, s));
        }
        txn.put_raw(mark_key, target.to_be_bytes().to_vec());
        txn.put(keys::request(self.group, client, seq), result);
        Ok(())
    }

    /// Applies one command. On error nothing in `txn` may be used.
    pub fn apply<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        cmd: &Command,
    ) -> Result<CommandResult, NsError> {
        let now = cmd.now.unwrap_or_default();
        let op = cmd
            .op
            .as_ref()
            .ok_or_else(|| NsError::Invalid("command has no operation".into()))?;
        if cmd.version > FORMAT_VERSION {
            return Err(NsError::Invalid(format!(
                "command format {} is newer than this node understands ({FORMAT_VERSION})",
                cmd.version
            )));
        }
        if cmd.origin() == Origin::Client && !is_client_op(op) {
            return Err(NsError::Permission(format!(
                "{} is an internal command: only cluster nodes propose it",
                op_name(op)
            )));
        }
        match op {
            Op::Init(op) => self.init(txn, op, now),
            Op::Create(op) => self.create(txn, op, now),
            Op::Link(op) => self.link(txn, op, now),
            Op::Remove(op) => self.remove(txn, op, now),
            Op::Rename(op) => self.rename(txn, op, now),
            Op::SetAttr(op) => self.set_attr(txn, op, now),
            Op::CommitLayout(op) => self.commit_layout(txn, op, now),
            Op::CreateBatch(op) => self.create_batch(txn, &op.creates, now),
            Op::TxnPrepare(op) => self.txn_prepare(txn, op, now),
            Op::TxnDecide(op) => self.txn_decide(txn, op, now),
            Op::TxnResolve(op) => self.txn_resolve(txn, op.txid, op.commit, now),
            Op::TxnForget(op) => self.txn_forget(txn, op.txid),
            Op::TxnGc(op) => self.txn_gc(txn, op),
            Op::DeliverRefs(op) => self.deliver_refs(txn, op, now),
            Op::AckRefs(op) => self.ack_refs(txn, op),
            Op::SetStorageNode(op) => self.set_storage_node(txn, op, now),
            Op::UpdateLocations(op) => self.update_locations(txn, op),
            Op::ReapChunks(op) => self.reap_chunks(txn, op),
            Op::Settle(op) => self.settle(txn, op),
            Op::SetTags(op) => self.set_tags(txn, op),
            Op::IndexTags(op) => self.index_tags(txn, op),
            Op::SetTagsBatch(op) => {
                if op.items.len() > MAX_BATCH {
                    return Err(NsError::Invalid(format!(
                        "a tag batch carries at most {MAX_BATCH} files"
                    )));
                }
                for item in &op.items {
                    self.set_tags(txn, item)?;
                }
                Ok(CommandResult::default())
            }
        }
    }

    fn set_tags<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &SetTagsOp,
    ) -> Result<CommandResult, NsError> {
        let rec = self.load_inode(txn, op.ino)?;
        if kind_of(attr(&rec)) != FileKind::Regular {
            return Err(NsError::Invalid(format!(
                "inode {} is not a regular file: only files have tags",
                op.ino
            )));
        }
        if let Some(t) = &op.tags {
            proto::tags::check_tags(t).map_err(|e| NsError::Invalid(e.to_string()))?;
        }
        self.drop_tags(txn, op.ino)?;
        if let Some(t) = &op.tags {
            tagindex::index(txn, self.group, op.ino, t, true)?;
            txn.put(keys::tags(self.group, op.ino), t);
        }
        Ok(CommandResult {
            attr: rec.attr,
            ..Default::default()
        })
    }

    /// Deletes a file's tags and their index entries, if it has any.
    fn drop_tags<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>, ino: u64) -> Result<(), NsError> {
        let key = keys::tags(self.group, ino);
        if let Some(b) = txn.get(&key)? {
            let old: Tags = decode(&key, &b)?;
            tagindex::index(txn, self.group, ino, &old, false)?;
            txn.delete(key);
        }
        Ok(())
    }

    /// Tracks of this group whose tags match `q`, in inode order.
    fn search<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &SearchQuery,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        proto::tags::check_terms(&q.terms).map_err(|e| NsError::Invalid(e.to_string()))?;
        let limit = (q.limit as usize).clamp(1, MAX_SEARCH);
        if self.search_indexed(kv, q, limit, out)? {
            return Ok(());
        }
        let prefix = keys::tags_prefix(self.group);
        let mut after = if q.after_ino == 0 {
            Vec::new()
        } else {
            q.after_ino.to_be_bytes().to_vec()
        };
        // Reads in pages, and at most MAX_SEARCH_SCAN records per call, so
        // a search that matches little still answers in bounded time; the
        // caller goes on from `next_ino`.
        let mut scanned = 0;
        loop {
            let page = kv.scan(&prefix, &after, SEARCH_PAGE)?;
            for (k, v) in &page {
                let ino = k
                    .get(prefix.len()..)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| NsError::Invalid("malformed tags key".into()))?;
                let tags: Tags = decode(k, v)?;
                if proto::tags::matches(&tags, &q.terms) {
                    if out.tracks.len() == limit {
                        out.more = true;
                        return Ok(());
                    }
                    out.tracks.push(TrackHit {
                        ino,
                        tags: Some(tags),
                    });
                }
                out.next_ino = ino;
            }
            scanned += page.len();
            if page.len() < SEARCH_PAGE {
                return Ok(());
            }
            if scanned >= MAX_SEARCH_SCAN {
                out.more = true;
                return Ok(());
            }
            after = out.next_ino.to_be_bytes().to_vec();
        }
    }

    /// Applies each create on its own: a failed one leaves the others.
    fn create_batch<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        creates: &[CreateOp],
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        if creates.len() > MAX_BATCH {
            return Err(NsError::Invalid(format!(
                "a batch holds at most {MAX_BATCH} creates, not {}",
                creates.len()
            )));
        }
        let mut out = CommandResult::default();
        for c in creates {
            let mut sub = Txn::new(&*txn);
            let r = match self.create(&mut sub, c, now) {
                Ok(r) => Some(r),
                Err(NsError::Kv(e)) => return Err(NsError::Kv(e)),
                // A locked parent or name: the whole batch is retried.
                Err(e @ NsError::Busy(_)) => return Err(e),
                Err(e) => {
                    out.results.push(CommandResult {
                        error: Some(e.to_wire()),
                        ..Default::default()
                    });
                    None
                }
            };
            if let Some(mut r) = r {
                let w = sub.into_writes();
                txn.writes.extend(w);
                // A batch's replies stay small: no parent per entry.
                r.parent_attr = None;
                out.results.push(r);
            }
        }
        Ok(out)
    }

    fn init<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &InitOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        if op.group_id != self.group {
            return Err(NsError::Invalid(format!(
                "init for group {} applied to group {}",
                op.group_id, self.group
            )));
        }
        if let Ok(existing) = self.group_record(txn) {
            if existing.cluster_id == op.cluster_id {
                return Ok(CommandResult::default());
            }
            return Err(NsError::Invalid(format!(
                "group already belongs to cluster {}",
                existing.cluster_id
            )));
        }
        // A new group has no tags, so its (empty) tag index is complete.
        tagindex::mark_built(txn, self.group);
        let mut rec = GroupRecord {
            format_version: FORMAT_VERSION,
            cluster_id: op.cluster_id.clone(),
            group_id: op.group_id,
            group_count: op.group_count.max(1),
            // Sequence 1 of group 0 is the root directory.
            next_seq: 2,
            replication: if op.replication == 0 {
                proto::DEFAULT_REPLICATION
            } else {
                op.replication
            },
            commit_window_secs: if op.commit_window_secs == 0 {
                proto::DEFAULT_COMMIT_WINDOW_SECS
            } else {
                op.commit_window_secs
            },
            ..Default::default()
        };
        if self.group == 0 {
            for n in &op.storage_nodes {
                let mut n = n.clone();
                n.state = proto::meta::StorageState::StorageActive as i32;
                n.since = Some(now);
                txn.put(keys::storage_node(0, n.node_id), &n);
            }
        }
        let mut result = CommandResult::default();
        if self.group == 0 {
            let root = InodeRecord {
                attr: Some(Attr {
                    ino: ROOT_INO,
                    kind: FileKind::Directory as i32,
                    perm: 0o755,
                    nlink: 2,
                    atime: Some(now),
                    mtime: Some(now),
                    ctime: Some(now),
                    crtime: Some(now),
                    ..Default::default()
                }),
                parent: ROOT_INO,
                ..Default::default()
            };
            rec.inode_count = 1;
            txn.put(keys::inode(0, ROOT_INO), &root);
            result.attr = root.attr;
        }
        txn.put(keys::group_record(self.group), &rec);
        Ok(result)
    }

    fn alloc_ino<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>) -> Result<u64, NsError> {
        let mut rec = self.group_record(txn)?;
        let ino = make_ino(self.group, rec.next_seq);
        rec.next_seq += 1;
        rec.inode_count += 1;
        txn.put(keys::group_record(self.group), &rec);
        Ok(ino)
    }

    fn count_inode_freed<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>) -> Result<(), NsError> {
        let mut rec = self.group_record(txn)?;
        rec.inode_count = rec.inode_count.saturating_sub(1);
        txn.put(keys::group_record(self.group), &rec);
        Ok(())
    }

    fn create<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &CreateOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        validate_name(&op.name)?;
        let kind = FileKind::try_from(op.kind).unwrap_or(FileKind::Unspecified);
        if kind == FileKind::Unspecified {
            return Err(NsError::Invalid("file kind not given".into()));
        }
        if kind == FileKind::Symlink
            && (op.symlink_target.is_empty()
                || op.symlink_target.len() > admission::MAX_SYMLINK_TARGET)
        {
            return Err(NsError::Invalid(
                "symlink target must be 1..4095 bytes".into(),
            ));
        }
        let mut parent = self.load_dir(txn, op.parent)?;
        if self.load_dirent(txn, op.parent, &op.name)?.is_some() {
            return Err(NsError::Exists(name_str(&op.name)));
        }
        if kind == FileKind::Directory {
            let count = self.group_record(txn)?.group_count;
            let home = dir_group(op.parent, &op.name, count);
            if home != self.group {
                // The new directory lives in another group: a cross-shard create.
                return Err(NsError::CrossShard {
                    ino: 0,
                    owner: home,
                    group: self.group,
                });
            }
        }
        let ino = self.alloc_ino(txn)?;
        let pattr = attr_mut(&mut parent);
        let (perm, gid) = inherit(pattr, kind, op.perm, op.gid);
        let is_dir = kind == FileKind::Directory;
        let rec = new_inode(
            &NewInodeSub {
                kind: kind as i32,
                perm,
                uid: op.uid,
                gid,
                rdev: op.rdev,
                symlink_target: op.symlink_target.clone(),
                parent: op.parent,
                ino,
            },
            now,
        );
        pattr.mtime = Some(now);
        pattr.ctime = Some(now);
        if is_dir {
            pattr.nlink += 1;
        }
        parent.entries += 1;
        txn.put(keys::inode(self.group, op.parent), &parent);
        txn.put(keys::inode(self.group, ino), &rec);
        txn.put(
            keys::dirent(self.group, op.parent, &op.name),
            &DirentRecord {
                ino,
                kind: kind as i32,
            },
        );
        Ok(CommandResult {
            attr: rec.attr,
            parent_attr: parent.attr,
            ..Default::default()
        })
    }

    fn link<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &LinkOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        validate_name(&op.new_name)?;
        let mut target = self.load_inode(txn, op.ino)?;
        let kind = kind_of(attr(&target));
        if kind == FileKind::Directory {
            return Err(NsError::Permission(
                "hard links to directories are not allowed".into(),
            ));
        }
        let mut parent = self.load_dir(txn, op.new_parent)?;
        if self
            .load_dirent(txn, op.new_parent, &op.new_name)?
            .is_some()
        {
            return Err(NsError::Exists(name_str(&op.new_name)));
        }
        let tattr = attr_mut(&mut target);
        if tattr.nlink >= MAX_LINKS {
            return Err(NsError::TooManyLinks(op.ino));
        }
        tattr.nlink += 1;
        tattr.ctime = Some(now);
        let pattr = attr_mut(&mut parent);
        pattr.mtime = Some(now);
        pattr.ctime = Some(now);
        parent.entries += 1;
        txn.put(keys::inode(self.group, op.new_parent), &parent);
        txn.put(keys::inode(self.group, op.ino), &target);
        txn.put(
            keys::dirent(self.group, op.new_parent, &op.new_name),
            &DirentRecord {
                ino: op.ino,
                kind: kind as i32,
            },
        );
        Ok(CommandResult {
            attr: target.attr,
            ..Default::default()
        })
    }

    /// Drops one link of `ino`; frees the inode, its layout and its chunk
    /// references when no link is left. Returns the inode's new attributes.
    fn drop_link<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        ino: u64,
        now: Timespec,
    ) -> Result<Attr, NsError> {
        let mut rec = self.load_inode(txn, ino)?;
        let is_dir = kind_of(attr(&rec)) == FileKind::Directory;
        let a = attr_mut(&mut rec);
        a.nlink = if is_dir { 0 } else { a.nlink.saturating_sub(1) };
        a.ctime = Some(now);
        let out = *a;
        if out.nlink == 0 {
            let old = self.load_layout(txn, ino)?;
            self.change_refs(txn, &old, &[], &HashMap::new(), now)?;
            txn.delete(keys::layout(self.group, ino));
            self.drop_tags(txn, ino)?;
            txn.delete(keys::inode(self.group, ino));
            self.count_inode_freed(txn)?;
        } else {
            txn.put(keys::inode(self.group, ino), &rec);
        }
        Ok(out)
    }

    fn remove<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &RemoveOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        validate_name(&op.name)?;
        let mut parent = self.load_dir(txn, op.parent)?;
        let entry = self
            .load_dirent(txn, op.parent, &op.name)?
            .ok_or_else(|| NsError::NotFound(name_str(&op.name)))?;
        let child = self.load_inode(txn, entry.ino)?;
        let child_is_dir = kind_of(attr(&child)) == FileKind::Directory;
        if op.dir {
            if !child_is_dir {
                return Err(NsError::NotDir(name_str(&op.name)));
            }
            if child.entries > 0 {
                return Err(NsError::NotEmpty(name_str(&op.name)));
            }
            if child.reserved > 0 {
                return Err(NsError::Busy(format!(
                    "directory {} (an entry is being added)",
                    name_str(&op.name)
                )));
            }
        } else if child_is_dir {
            return Err(NsError::IsDir(name_str(&op.name)));
        }
        let pattr = attr_mut(&mut parent);
        pattr.mtime = Some(now);
        pattr.ctime = Some(now);
        if child_is_dir {
            pattr.nlink = pattr.nlink.saturating_sub(1);
        }
        parent.entries = parent.entries.saturating_sub(1);
        txn.put(keys::inode(self.group, op.parent), &parent);
        txn.delete(keys::dirent(self.group, op.parent, &op.name));
        let removed = self.drop_link(txn, entry.ino, now)?;
        Ok(CommandResult {
            removed: Some(removed),
            ..Default::default()
        })
    }

    /// True when `dir` is `ancestor` or lies beneath it.
    fn is_within<R: KvRead + ?Sized>(
        &self,
        txn: &Txn<'_, R>,
        mut dir: u64,
        ancestor: u64,
    ) -> Result<bool, NsError> {
        // Bounded by the depth of the tree; a cycle would mean corruption.
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.load_inode(txn, dir)?.parent;
        }
        Err(NsError::Kv(KvError::Corrupt {
            key: format!("inode {dir}"),
            reason: "directory parent chain does not reach the root".into(),
        }))
    }

    fn rename<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &RenameOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        validate_name(&op.name)?;
        validate_name(&op.new_name)?;
        if op.noreplace && op.exchange {
            return Err(NsError::Invalid(
                "RENAME_NOREPLACE and RENAME_EXCHANGE together".into(),
            ));
        }
        self.load_dir(txn, op.parent)?;
        self.load_dir(txn, op.new_parent)?;
        let src = self
            .load_dirent(txn, op.parent, &op.name)?
            .ok_or_else(|| NsError::NotFound(name_str(&op.name)))?;
        let src_is_dir = src.kind == FileKind::Directory as i32;
        let dst = self.load_dirent(txn, op.new_parent, &op.new_name)?;
        // Checks in the order Linux makes them.
        if op.noreplace && dst.is_some() {
            return Err(NsError::Exists(name_str(&op.new_name)));
        }
        // A directory moving to another parent: the walk up from the new
        // parent must stay in this group (an inode of another group hands
        // the rename to the coordinator, which takes the rename lock); an
        // inode locked by a directory move in progress answers Busy.
        if src_is_dir
            && op.parent != op.new_parent
            && self.is_within(txn, op.new_parent, src.ino)?
        {
            return Err(NsError::Invalid(
                "cannot move a directory beneath itself".into(),
            ));
        }
        if let Some(d) = &dst {
            if d.ino != src.ino
                && d.kind == FileKind::Directory as i32
                && !op.exchange
                && op.parent != op.new_parent
                && self.is_within(txn, op.parent, d.ino)?
            {
                // Replacing an ancestor of the source: it cannot be empty.
                return Err(NsError::NotEmpty(name_str(&op.new_name)));
            }
        }
        if op.exchange {
            let dst = dst.ok_or_else(|| NsError::NotFound(name_str(&op.new_name)))?;
            let dst_is_dir = dst.kind == FileKind::Directory as i32;
            if dst_is_dir
                && op.parent != op.new_parent
                && self.is_within(txn, op.parent, dst.ino)?
            {
                return Err(NsError::Invalid(
                    "cannot move a directory beneath itself".into(),
                ));
            }
            txn.put(keys::dirent(self.group, op.parent, &op.name), &dst);
            txn.put(keys::dirent(self.group, op.new_parent, &op.new_name), &src);
            if op.parent != op.new_parent && src_is_dir != dst_is_dir {
                let (gains, loses) = if src_is_dir {
                    (op.new_parent, op.parent)
                } else {
                    (op.parent, op.new_parent)
                };
                self.touch_dir(txn, gains, now, 1, 0)?;
                self.touch_dir(txn, loses, now, -1, 0)?;
            }
            self.touch_dir(txn, op.parent, now, 0, 0)?;
            self.touch_dir(txn, op.new_parent, now, 0, 0)?;
            self.moved(txn, src.ino, src_is_dir, op.new_parent, now)?;
            self.moved(txn, dst.ino, dst_is_dir, op.parent, now)?;
            return Ok(CommandResult::default());
        }
        let mut removed = None;
        if let Some(d) = dst {
            if d.ino == src.ino {
                // Two links to one inode: POSIX says do nothing.
                return Ok(CommandResult::default());
            }
            let dst_is_dir = d.kind == FileKind::Directory as i32;
            if src_is_dir && !dst_is_dir {
                return Err(NsError::NotDir(name_str(&op.new_name)));
            }
            if !src_is_dir && dst_is_dir {
                return Err(NsError::IsDir(name_str(&op.new_name)));
            }
            if dst_is_dir && self.load_inode(txn, d.ino)?.entries > 0 {
                return Err(NsError::NotEmpty(name_str(&op.new_name)));
            }
            // The destination entry is replaced: the new parent loses it.
            self.touch_dir(txn, op.new_parent, now, if dst_is_dir { -1 } else { 0 }, -1)?;
            removed = Some(self.drop_link(txn, d.ino, now)?);
        }
        txn.delete(keys::dirent(self.group, op.parent, &op.name));
        txn.put(keys::dirent(self.group, op.new_parent, &op.new_name), &src);
        let link_delta = if src_is_dir { 1 } else { 0 };
        self.touch_dir(txn, op.parent, now, -link_delta, -1)?;
        self.touch_dir(txn, op.new_parent, now, link_delta, 1)?;
        let attr = self.moved(txn, src.ino, src_is_dir, op.new_parent, now)?;
        Ok(CommandResult {
            attr: Some(attr),
            removed,
            ..Default::default()
        })
    }

    fn touch_dir<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        dir: u64,
        now: Timespec,
        nlink_delta: i64,
        entries_delta: i64,
    ) -> Result<(), NsError> {
        let mut rec = self.load_dir(txn, dir)?;
        rec.entries = (rec.entries as i64 + entries_delta).max(0) as u64;
        let a = attr_mut(&mut rec);
        a.nlink = (i64::from(a.nlink) + nlink_delta).max(0) as u32;
        a.mtime = Some(now);
        a.ctime = Some(now);
        txn.put(keys::inode(self.group, dir), &rec);
        Ok(())
    }

    fn moved<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        ino: u64,
        is_dir: bool,
        new_parent: u64,
        now: Timespec,
    ) -> Result<Attr, NsError> {
        let mut rec = self.load_inode(txn, ino)?;
        if is_dir {
            rec.parent = new_parent;
        }
        attr_mut(&mut rec).ctime = Some(now);
        txn.put(keys::inode(self.group, ino), &rec);
        Ok(*attr(&rec))
    }

    fn set_attr<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &SetAttrOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        let mut rec = self.load_inode(txn, op.ino)?;
        let f = op.fields.unwrap_or_default();
        let kind = kind_of(attr(&rec));
        if let Some(size) = f.size {
            match kind {
                FileKind::Regular => {}
                FileKind::Directory => return Err(NsError::IsDir(format!("inode {}", op.ino))),
                _ => {
                    return Err(NsError::Invalid(
                        "only regular files can be truncated".into(),
                    ))
                }
            }
            if size > MAX_FILE_SIZE {
                return Err(NsError::FileTooBig(size));
            }
            let old = self.load_layout(txn, op.ino)?;
            let new = truncate_extents(&old, size);
            if new != old {
                self.change_refs(txn, &old, &new, &HashMap::new(), now)?;
                self.store_layout(txn, op.ino, &new);
            }
            let a = attr_mut(&mut rec);
            if a.size != size {
                a.layout_version += 1;
            }
            a.size = size;
            a.mtime = Some(now);
        }
        let a = attr_mut(&mut rec);
        if let Some(perm) = f.perm {
            a.perm = perm & 0o7777;
        }
        if let Some(uid) = f.uid {
            a.uid = uid;
        }
        if let Some(gid) = f.gid {
            a.gid = gid;
        }
        if f.kill_suid {
            kill_suid(a);
        }
        if let Some(t) = f.atime {
            a.atime = Some(t);
        }
        if let Some(t) = f.mtime {
            a.mtime = Some(t);
        }
        a.ctime = Some(now);
        txn.put(keys::inode(self.group, op.ino), &rec);
        Ok(CommandResult {
            attr: rec.attr,
            ..Default::default()
        })
    }

    fn store_layout<R: KvRead + ?Sized>(&self, txn: &mut Txn<'_, R>, ino: u64, extents: &[Extent]) {
        if extents.is_empty() {
            txn.delete(keys::layout(self.group, ino));
        } else {
            txn.put(
                keys::layout(self.group, ino),
                &LayoutRecord {
                    extents: extents.to_vec(),
                },
            );
        }
    }

    /// Moves chunk references from the `old` extents to the `new` ones:
    /// directly for chunks this group indexes, through the outbox for the
    /// others. `register` carries size and locations of newly uploaded
    /// chunks indexed elsewhere.
    fn change_refs<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        old: &[Extent],
        new: &[Extent],
        register: &HashMap<ChunkId, (u64, Vec<u64>)>,
        now: Timespec,
    ) -> Result<(), NsError> {
        let mut delta: BTreeMap<ChunkId, i64> = BTreeMap::new();
        for e in old {
            *delta.entry(extent_chunk(e)?).or_default() -= 1;
        }
        for e in new {
            *delta.entry(extent_chunk(e)?).or_default() += 1;
        }
        for id in register.keys() {
            delta.entry(*id).or_default();
        }
        let mut stats = self.group_record(txn)?;
        let group_count = stats.group_count;
        let mut remote: BTreeMap<u32, Vec<ChunkDelta>> = BTreeMap::new();
        for (id, d) in delta {
            let owner = id.group(group_count);
            if owner == self.group {
                if d != 0 {
                    self.adjust_chunk(txn, &mut stats, &id, d, 0, &[], now)?;
                }
                continue;
            }
            let (size, locations) = register.get(&id).cloned().unwrap_or_default();
            if d != 0 || size != 0 {
                remote.entry(owner).or_default().push(ChunkDelta {
                    chunk_id: id.0.to_vec().into(),
                    delta: d,
                    size,
                    locations,
                });
            }
        }
        txn.put(keys::group_record(self.group), &stats);
        for (target, deltas) in remote {
            self.queue_refs(txn, target, deltas)?;
        }
        Ok(())
    }

    /// Changes one chunk's refcount (creating its record when unknown) and
    /// the group's chunk totals.
    #[allow(clippy::too_many_arguments)]
    fn adjust_chunk<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        stats: &mut GroupRecord,
        id: &ChunkId,
        d: i64,
        size: u64,
        locations: &[u64],
        now: Timespec,
    ) -> Result<(), NsError> {
        let old = self.load_chunk(txn, id)?;
        let mut rec = old.clone().unwrap_or(ChunkRecord {
            size,
            refcount: 0,
            locations: Vec::new(),
            zero_since: Some(now),
        });
        if rec.size == 0 && size > 0 {
            rec.size = size;
            if rec.refcount > 0 {
                // Counted as live before its size was known.
                stats.chunk_bytes += size;
            }
        }
        for l in locations {
            if !rec.locations.contains(l) {
                rec.locations.push(*l);
            }
        }
        rec.locations.sort_unstable();
        let was = rec.refcount;
        let now_refs = rec.refcount as i64 + d;
        if now_refs < 0 {
            tracing::error!(group = self.group, chunk = %id, was, delta = d, "chunk refcount would go below zero");
        }
        rec.refcount = now_refs.max(0) as u64;
        if rec.refcount == 0 && was > 0 {
            rec.zero_since = Some(now);
        } else if rec.refcount > 0 {
            rec.zero_since = None;
        }
        if was == 0 && rec.refcount > 0 {
            stats.chunk_count += 1;
            stats.chunk_bytes += rec.size;
        } else if was > 0 && rec.refcount == 0 {
            stats.chunk_count = stats.chunk_count.saturating_sub(1);
            stats.chunk_bytes = stats.chunk_bytes.saturating_sub(rec.size);
        }
        self.store_chunk(txn, stats, id, old.as_ref(), &rec)
    }

    fn commit_layout<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &CommitLayoutOp,
        now: Timespec,
    ) -> Result<CommandResult, NsError> {
        let mut rec = self.load_inode(txn, op.ino)?;
        match kind_of(attr(&rec)) {
            FileKind::Regular => {}
            FileKind::Directory => return Err(NsError::IsDir(format!("inode {}", op.ino))),
            _ => return Err(NsError::Invalid("only regular files have a layout".into())),
        }
        if op.size > MAX_FILE_SIZE {
            return Err(NsError::FileTooBig(op.size));
        }
        let mut stats = self.group_record(txn)?;
        let group_count = stats.group_count;
        if !op.new_chunks.is_empty() {
            let window = placement::commit_window_ms(&stats);
            let age = now.as_millis().saturating_sub(op.checked_at_ms);
            if op.checked_at_ms == 0 || age > window {
                return Err(NsError::Stale(format!(
                    "the chunk index was asked {} s before this commit; the limit is {} s",
                    age / 1000,
                    window / 1000
                )));
            }
        }
        // Register uploaded chunks first so the layout can reference them;
        // chunks indexed by other groups are registered there through the
        // outbox, with the reference change.
        let mut register: HashMap<ChunkId, (u64, Vec<u64>)> = HashMap::new();
        for nc in &op.new_chunks {
            let id =
                ChunkId::try_from(&nc.chunk_id[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
            if id.group(group_count) != self.group {
                let entry = register.entry(id).or_insert((nc.size, Vec::new()));
                if entry.0 != nc.size {
                    return Err(NsError::Invalid(format!(
                        "chunk {id} listed with two sizes"
                    )));
                }
                entry.1.extend(nc.locations.iter().copied());
                continue;
            }
            let old = self.load_chunk(txn, &id)?;
            let mut c = old.clone().unwrap_or(ChunkRecord {
                size: nc.size,
                refcount: 0,
                locations: Vec::new(),
                zero_since: Some(now),
            });
            if c.size != nc.size {
                return Err(NsError::Invalid(format!(
                    "chunk {id} is {} bytes, not {}",
                    c.size, nc.size
                )));
            }
            for l in &nc.locations {
                if !c.locations.contains(l) {
                    c.locations.push(*l);
                }
            }
            c.locations.sort_unstable();
            self.store_chunk(txn, &mut stats, &id, old.as_ref(), &c)?;
        }
        txn.put(keys::group_record(self.group), &stats);
        // Validate the layout: sorted, non-overlapping, inside the file and
        // inside each referenced chunk.
        let old = self.load_layout(txn, op.ino)?;
        let old_ids: std::collections::HashSet<ChunkId> =
            old.iter().filter_map(|e| extent_chunk(e).ok()).collect();
        let mut end = 0u64;
        for e in &op.extents {
            let id = extent_chunk(e)?;
            if e.length == 0 || e.offset < end {
                return Err(NsError::Invalid("extents overlap or are empty".into()));
            }
            end = e
                .offset
                .checked_add(e.length)
                .ok_or_else(|| NsError::Invalid("extent overflows".into()))?;
            if end > op.size {
                return Err(NsError::Invalid("extent beyond the file size".into()));
            }
            let size = if id.group(group_count) == self.group {
                Some(
                    self.load_chunk(txn, &id)?
                        .ok_or(NsError::UnknownChunk(id))?
                        .size,
                )
            } else {
                register.get(&id).map(|r| r.0)
            };
            match size {
                Some(size) if e.chunk_offset.saturating_add(e.length) > size => {
                    return Err(NsError::Invalid(format!(
                        "extent beyond the end of chunk {id}"
                    )));
                }
                Some(_) => {}
                // A chunk indexed elsewhere that the file did not reference
                // before must come with its size (the client lists every
                // chunk it adds to a layout).
                None if !old_ids.contains(&id) => return Err(NsError::UnknownChunk(id)),
                None => {}
            }
        }
        self.change_refs(txn, &old, &op.extents, &register, now)?;
        self.store_layout(txn, op.ino, &op.extents);
        let a = attr_mut(&mut rec);
        a.size = op.size;
        a.layout_version += 1;
        a.mtime = Some(op.mtime.unwrap_or(now));
        a.ctime = Some(now);
        if op.kill_suid {
            kill_suid(a);
        }
        txn.put(keys::inode(self.group, op.ino), &rec);
        Ok(CommandResult {
            attr: rec.attr,
            ..Default::default()
        })
    }

    // ---- queries ----------------------------------------------------------

    pub fn query<R: KvRead + ?Sized>(&self, kv: &R, q: &Query) -> Result<QueryResult, NsError> {
        let q =
            q.q.as_ref()
                .ok_or_else(|| NsError::Invalid("query has no body".into()))?;
        let mut out = QueryResult::default();
        match q {
            Q::Lookup(l) => {
                validate_name(&l.name)?;
                self.load_dir(kv, l.parent)?;
                let e = self
                    .load_dirent(kv, l.parent, &l.name)?
                    .ok_or_else(|| NsError::NotFound(name_str(&l.name)))?;
                // An inode in another group: the client asks that group.
                if group_of_ino(e.ino) == self.group {
                    out.attr = self.load_inode(kv, e.ino)?.attr;
                }
                out.entry = Some(DirEntry {
                    name: l.name.clone(),
                    ino: e.ino,
                    kind: e.kind,
                    attr: out.attr,
                });
            }
            Q::GetAttr(g) => {
                let rec = self.load_inode(kv, g.ino)?;
                out.parent = rec.parent;
                out.attr = rec.attr;
            }
            Q::TxnStatus(t) => out.txn_state = self.txn_state(kv, t.txid)? as i32,
            Q::RequestResult(r) => {
                let key = keys::request(self.group, r.client_id, r.request_seq);
                if let Some(b) = kv.get(&key)? {
                    out.request_result = Some(decode(&key, &b)?);
                }
            }
            Q::ReadDir(r) => {
                let dir = self.load_dir(kv, r.ino)?;
                out.attr = dir.attr;
                let limit = (r.limit as usize).clamp(1, MAX_READDIR);
                let prefix = keys::dir_prefix(self.group, r.ino);
                // An entry being added or removed by a cross-shard operation
                // in progress: the listing waits for it, so it never shows
                // a moved entry in neither directory.
                if !kv
                    .scan(&keys::lock(self.group, &prefix), &r.after, 1)?
                    .is_empty()
                {
                    return Err(NsError::Busy(format!("directory {}", r.ino)));
                }
                let rows = kv.scan(&prefix, &r.after, limit + 1)?;
                out.more = rows.len() > limit;
                for (k, v) in rows.into_iter().take(limit) {
                    self.check_lock(kv, &k)?;
                    let d: DirentRecord = decode(&k, &v)?;
                    let attr = if r.plus {
                        // An entry whose inode lives in another group is
                        // returned without attributes; the client stats it.
                        if group_of_ino(d.ino) == self.group {
                            self.load_inode(kv, d.ino)?.attr
                        } else {
                            None
                        }
                    } else {
                        None
                    };
                    out.entries.push(DirEntry {
                        name: k[prefix.len()..].to_vec().into(),
                        ino: d.ino,
                        kind: d.kind,
                        attr,
                    });
                }
            }
            Q::ReadLink(r) => {
                let rec = self.load_inode(kv, r.ino)?;
                if kind_of(attr(&rec)) != FileKind::Symlink {
                    return Err(NsError::Invalid(format!(
                        "inode {} is not a symlink",
                        r.ino
                    )));
                }
                out.link_target = rec.symlink_target;
            }
            Q::GetLayout(g) => {
                let rec = self.load_inode(kv, g.ino)?;
                out.extents = self.load_layout(kv, g.ino)?;
                out.attr = rec.attr;
            }
            Q::ChunkInfo(c) => {
                for raw in &c.chunk_ids {
                    let id =
                        ChunkId::try_from(&raw[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
                    out.now_ms = Timespec::now().as_millis();
                    let info = match self.load_chunk(kv, &id)? {
                        // An unreferenced chunk may be freed any time: a
                        // writer must upload it again, not rely on it.
                        Some(rec) => ChunkInfo {
                            chunk_id: raw.clone(),
                            known: rec.refcount > 0,
                            size: rec.size,
                            refcount: rec.refcount,
                            locations: rec.locations,
                        },
                        None => ChunkInfo {
                            chunk_id: raw.clone(),
                            ..Default::default()
                        },
                    };
                    out.chunks.push(info);
                }
            }
            Q::StorageNodes(_) => self.query_storage_nodes(kv, &mut out)?,
            Q::NodeChunks(q) => out.count = self.count_node_chunks(kv, q.node_id)?,
            Q::OutSeq(q) => {
                out.count = self.next_out_seq(kv, q.target)?;
                out.now_ms = Timespec::now().as_millis();
            }
            Q::Holds(q) => self.query_holds(kv, q, &mut out)?,
            Q::GetTags(q) => {
                self.load_inode(kv, q.ino)?;
                let key = keys::tags(self.group, q.ino);
                if let Some(b) = kv.get(&key)? {
                    out.tags = Some(decode(&key, &b)?);
                }
            }
            Q::Search(q) => self.search(kv, q, &mut out)?,
            Q::TagValues(q) => self.tag_values(kv, q, &mut out)?,
            Q::TagTracks(q) => self.tag_tracks(kv, q, &mut out)?,
            Q::Changes(q) => self.changes(kv, q, &mut out)?,
            Q::StatFs(_) => {
                let g = self.group_record(kv)?;
                out.stat_fs = Some(StatFs {
                    inodes: g.inode_count,
                    chunks: g.chunk_count,
                    chunk_bytes: g.chunk_bytes,
                });
            }
        }
        Ok(out)
    }
}

/// Permission bits and group of a new inode under a directory with
/// attributes `parent`: BSD group semantics under a set-group-ID directory,
/// as Linux does.
pub fn inherit(parent: &Attr, kind: FileKind, perm: u32, gid: u32) -> (u32, u32) {
    let mut perm = perm & 0o7777;
    let mut gid = gid;
    if parent.perm & S_ISGID != 0 {
        gid = parent.gid;
        if kind == FileKind::Directory {
            perm |= S_ISGID;
        }
    }
    (perm, gid)
}

/// The record of a new inode numbered `sub.ino`.
fn new_inode(sub: &NewInodeSub, now: Timespec) -> InodeRecord {
    let kind = FileKind::try_from(sub.kind).unwrap_or(FileKind::Unspecified);
    let is_dir = kind == FileKind::Directory;
    let target = if kind == FileKind::Symlink {
        sub.symlink_target.clone()
    } else {
        Default::default()
    };
    InodeRecord {
        attr: Some(Attr {
            ino: sub.ino,
            kind: kind as i32,
            perm: if kind == FileKind::Symlink {
                0o777
            } else {
                sub.perm & 0o7777
            },
            uid: sub.uid,
            gid: sub.gid,
            size: target.len() as u64,
            nlink: if is_dir { 2 } else { 1 },
            atime: Some(now),
            mtime: Some(now),
            ctime: Some(now),
            crtime: Some(now),
            rdev: sub.rdev,
            layout_version: 0,
        }),
        symlink_target: target,
        entries: 0,
        parent: if is_dir { sub.parent } else { 0 },
        reserved: 0,
    }
}

/// Whether a reply says its operation spans groups (and must go to the
/// coordinator).
pub fn crossed(r: &CommandResult) -> bool {
    r.error
        .as_ref()
        .is_some_and(|e| e.code() == ErrorCode::CrossShard)
}

/// A key named for an error message.
fn describe_key(key: &[u8]) -> String {
    match key.get(4) {
        Some(&keys::INODE) => key
            .get(5..13)
            .and_then(|b| b.try_into().ok())
            .map(|b| format!("inode {}", u64::from_be_bytes(b)))
            .unwrap_or_else(|| "an inode".into()),
        Some(&keys::DIRENT) => format!("entry {:?}", name_str(key.get(13..).unwrap_or_default())),
        _ => "a record".into(),
    }
}

fn attr(rec: &InodeRecord) -> &Attr {
    // Every stored inode has attributes; a record without is treated as empty.
    static EMPTY: Attr = Attr {
        ino: 0,
        kind: 0,
        perm: 0,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 0,
        atime: None,
        mtime: None,
        ctime: None,
        rdev: 0,
        layout_version: 0,
        crtime: None,
    };
    rec.attr.as_ref().unwrap_or(&EMPTY)
}

fn attr_mut(rec: &mut InodeRecord) -> &mut Attr {
    rec.attr.get_or_insert_with(Attr::default)
}

fn kill_suid(a: &mut Attr) {
    a.perm &= !S_ISUID;
    if a.perm & S_IXGRP != 0 {
        a.perm &= !S_ISGID;
    }
}

fn extent_chunk(e: &Extent) -> Result<ChunkId, NsError> {
    ChunkId::try_from(&e.chunk_id[..]).map_err(|err| NsError::Invalid(err.to_string()))
}

/// The extents of a file cut to `size` bytes.
pub fn truncate_extents(extents: &[Extent], size: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len());
    for e in extents {
        if e.offset >= size {
            break;
        }
        let mut e = e.clone();
        if e.offset + e.length > size {
            e.length = size - e.offset;
        }
        out.push(e);
    }
    out
}
