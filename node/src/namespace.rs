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
    command::Op, query::Q, Attr, ChunkInfo, ChunkRecord, Command, CommandResult, CommitLayoutOp,
    CreateOp, DirEntry, DirentRecord, Error as WireError, ErrorCode, Extent, FileKind, GroupRecord,
    InitOp, InodeRecord, LayoutRecord, LinkOp, Query, QueryResult, RemoveOp, RenameOp, SetAttrOp,
    StatFs, Timespec,
};
use proto::{group_of_ino, make_ino, validate_name, ChunkId, NameError, FORMAT_VERSION, ROOT_INO};

/// Most hard links one inode may have (as ext4).
pub const MAX_LINKS: u32 = 65_000;
/// Largest page a directory listing returns.
pub const MAX_READDIR: usize = 4096;
/// Largest file size accepted (as ext4 with 4 KiB blocks).
pub const MAX_FILE_SIZE: u64 = 16 << 40;

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

fn name_str(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// One group's state machine logic.
pub struct Namespace {
    pub group: u32,
}

impl Namespace {
    pub fn new(group: u32) -> Self {
        Namespace { group }
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

    fn own_chunk(&self, id: &ChunkId, group_count: u32) -> Result<(), NsError> {
        let owner = id.group(group_count);
        if owner != self.group {
            return Err(NsError::CrossShard {
                ino: 0,
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
        }
        let mut txn = Txn::new(kv);
        let result = match self.apply(&mut txn, cmd) {
            Ok(r) => r,
            Err(NsError::Kv(e)) => return Err(e),
            Err(e) => {
                txn = Txn::new(kv);
                CommandResult {
                    error: Some(e.to_wire()),
                    ..Default::default()
                }
            }
        };
        if dedup {
            // Forget results the client has seen: blind deletes from a
            // per-client low-water mark, at most 64 per command, so no
            // command ever iterates over old results.
            let mark_key = keys::request_prefix(self.group, cmd.client_id);
            let low = match txn.get(&mark_key)? {
                Some(b) => b
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(cmd.acked_below),
                // No earlier result of this client exists in this group.
                None => cmd.acked_below,
            };
            let target = cmd.acked_below.clamp(low, low.saturating_add(64));
            for seq in low..target {
                txn.delete(keys::request(self.group, cmd.client_id, seq));
            }
            txn.put_raw(mark_key, target.to_be_bytes().to_vec());
            txn.put(
                keys::request(self.group, cmd.client_id, cmd.request_seq),
                &result,
            );
        }
        Ok((txn.into_writes(), result))
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
        match op {
            Op::Init(op) => self.init(txn, op, now),
            Op::Create(op) => self.create(txn, op, now),
            Op::Link(op) => self.link(txn, op, now),
            Op::Remove(op) => self.remove(txn, op, now),
            Op::Rename(op) => self.rename(txn, op, now),
            Op::SetAttr(op) => self.set_attr(txn, op, now),
            Op::CommitLayout(op) => self.commit_layout(txn, op, now),
        }
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
        let mut rec = GroupRecord {
            format_version: FORMAT_VERSION,
            cluster_id: op.cluster_id.clone(),
            group_id: op.group_id,
            group_count: op.group_count.max(1),
            // Sequence 1 of group 0 is the root directory.
            next_seq: 2,
            ..Default::default()
        };
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
            && (op.symlink_target.is_empty() || op.symlink_target.len() > 4095)
        {
            return Err(NsError::Invalid(
                "symlink target must be 1..4095 bytes".into(),
            ));
        }
        let mut parent = self.load_dir(txn, op.parent)?;
        if self.load_dirent(txn, op.parent, &op.name)?.is_some() {
            return Err(NsError::Exists(name_str(&op.name)));
        }
        let ino = self.alloc_ino(txn)?;
        let pattr = attr_mut(&mut parent);
        let mut perm = op.perm & 0o7777;
        let mut gid = op.gid;
        if pattr.perm & S_ISGID != 0 {
            // BSD group semantics under a set-group-ID directory, as Linux does.
            gid = pattr.gid;
            if kind == FileKind::Directory {
                perm |= S_ISGID;
            }
        }
        let is_dir = kind == FileKind::Directory;
        let target = if kind == FileKind::Symlink {
            op.symlink_target.clone()
        } else {
            Default::default()
        };
        let rec = InodeRecord {
            attr: Some(Attr {
                ino,
                kind: kind as i32,
                perm: if kind == FileKind::Symlink {
                    0o777
                } else {
                    perm
                },
                uid: op.uid,
                gid,
                size: target.len() as u64,
                nlink: if is_dir { 2 } else { 1 },
                atime: Some(now),
                mtime: Some(now),
                ctime: Some(now),
                crtime: Some(now),
                rdev: op.rdev,
                layout_version: 0,
            }),
            symlink_target: target,
            entries: 0,
            parent: if is_dir { op.parent } else { 0 },
        };
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
            self.change_refs(txn, &old, &[], now)?;
            txn.delete(keys::layout(self.group, ino));
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
        if src_is_dir && self.is_within(txn, op.new_parent, src.ino)? {
            return Err(NsError::Invalid(
                "cannot move a directory beneath itself".into(),
            ));
        }
        if let Some(d) = &dst {
            if d.ino != src.ino
                && d.kind == FileKind::Directory as i32
                && !op.exchange
                && self.is_within(txn, op.parent, d.ino)?
            {
                // Replacing an ancestor of the source: it cannot be empty.
                return Err(NsError::NotEmpty(name_str(&op.new_name)));
            }
        }
        if op.exchange {
            let dst = dst.ok_or_else(|| NsError::NotFound(name_str(&op.new_name)))?;
            let dst_is_dir = dst.kind == FileKind::Directory as i32;
            if dst_is_dir && self.is_within(txn, op.parent, dst.ino)? {
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
            error: None,
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
                self.change_refs(txn, &old, &new, now)?;
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

    /// Moves chunk references from the `old` extents to the `new` ones.
    fn change_refs<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        old: &[Extent],
        new: &[Extent],
        now: Timespec,
    ) -> Result<(), NsError> {
        let mut delta: HashMap<ChunkId, i64> = HashMap::new();
        for e in old {
            *delta.entry(extent_chunk(e)?).or_default() -= 1;
        }
        for e in new {
            *delta.entry(extent_chunk(e)?).or_default() += 1;
        }
        let group_count = self.group_record(txn)?.group_count;
        let mut stats = self.group_record(txn)?;
        let mut ids: Vec<_> = delta.into_iter().filter(|(_, d)| *d != 0).collect();
        ids.sort();
        for (id, d) in ids {
            self.own_chunk(&id, group_count)?;
            let mut rec = self
                .load_chunk(txn, &id)?
                .ok_or(NsError::UnknownChunk(id))?;
            let was = rec.refcount;
            rec.refcount = (rec.refcount as i64 + d).max(0) as u64;
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
            txn.put(keys::chunk(self.group, &id.0), &rec);
        }
        txn.put(keys::group_record(self.group), &stats);
        Ok(())
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
        let group_count = self.group_record(txn)?.group_count;
        // Register uploaded chunks first so the layout can reference them.
        for nc in &op.new_chunks {
            let id =
                ChunkId::try_from(&nc.chunk_id[..]).map_err(|e| NsError::Invalid(e.to_string()))?;
            self.own_chunk(&id, group_count)?;
            let mut c = self.load_chunk(txn, &id)?.unwrap_or(ChunkRecord {
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
            txn.put(keys::chunk(self.group, &id.0), &c);
        }
        // Validate the layout: sorted, non-overlapping, inside the file and
        // inside each referenced chunk.
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
            self.own_chunk(&id, group_count)?;
            let c = self
                .load_chunk(txn, &id)?
                .ok_or(NsError::UnknownChunk(id))?;
            if e.chunk_offset.saturating_add(e.length) > c.size {
                return Err(NsError::Invalid(format!(
                    "extent beyond the end of chunk {id}"
                )));
            }
        }
        let old = self.load_layout(txn, op.ino)?;
        self.change_refs(txn, &old, &op.extents, now)?;
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
                out.attr = self.load_inode(kv, e.ino)?.attr;
            }
            Q::GetAttr(g) => out.attr = self.load_inode(kv, g.ino)?.attr,
            Q::ReadDir(r) => {
                let dir = self.load_dir(kv, r.ino)?;
                out.attr = dir.attr;
                let limit = (r.limit as usize).clamp(1, MAX_READDIR);
                let prefix = keys::dir_prefix(self.group, r.ino);
                let rows = kv.scan(&prefix, &r.after, limit + 1)?;
                out.more = rows.len() > limit;
                for (k, v) in rows.into_iter().take(limit) {
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
                    let info = match self.load_chunk(kv, &id)? {
                        Some(rec) => ChunkInfo {
                            chunk_id: raw.clone(),
                            known: true,
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
