//! The client core: an async file-system API over the cluster. The FUSE shim
//! and tests drive it; it never sees FUSE.
//!
//! Consistency is close-to-open (docs/SEMANTICS.md): an open loads the file's
//! committed layout; writes are buffered, chunked and uploaded, and the new
//! layout commits on flush, fsync or close.

use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, StreamExt, TryStreamExt};
use proto::meta::{
    command::Op, query::Q, Attr, ChunkInfo, ChunkInfoQuery, CommitLayoutOp, CreateBatchOp,
    CreateOp, DirEntry, ErrorCode, Extent, FileKind, GetAttrQuery, GetLayoutQuery, LinkOp,
    LookupQuery, NewChunk, QueryResult, ReadDirQuery, ReadLinkQuery, RemoveOp, RenameOp,
    SetAttrFields, SetAttrOp, StatFsQuery, Timespec,
};
use proto::meta::{
    GetTagsQuery, IndexTagsOp, SearchQuery, SetTagsOp, TagTerm, TagTracksQuery, TagValue,
    TagValuesQuery, Tags, TrackHit,
};
use proto::{group_of_ino, validate_name, ChunkId};
use tokio::sync::Mutex as AsyncMutex;

use crate::conn::{Cluster, RequestId};
use crate::diskcache::DiskCache;
use crate::error::{ClientError, Result};
use crate::layout::{self, ChunkCache, DirtyRuns};
use crate::views::{self, Views};

/// Bytes of unchunked writes an open file may hold before they are chunked
/// and stored (not yet committed). With `STORES_IN_FLIGHT` spills being
/// stored, it bounds memory per open file.
pub const SPILL_BYTES: usize = 32 << 20;
/// Bytes of writes all open files of a client may hold together, unchunked
/// or not stored yet: past it, a write spills its file's buffer from
/// `MIN_SPILL_BYTES` on and waits for its store, so many files written at
/// once do not add up to many times `SPILL_BYTES`.
pub const CLIENT_DIRTY_BYTES: usize = 256 << 20;
const MIN_SPILL_BYTES: usize = 4 << 20;
/// Default size of the in-memory chunk cache of a mount.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;
/// Read-ahead window of a reader that just turned out sequential; it
/// doubles with every further sequential read, up to a quarter of the
/// chunk cache (at most `READAHEAD_MAX`).
const READAHEAD_MIN: u64 = 2 << 20;
const READAHEAD_MAX: u64 = 64 << 20;
/// How far a read may land from the end of the last one and still count
/// as sequential: the kernel's read-ahead sends several requests at once,
/// and they may arrive out of order.
const SEQUENTIAL_SLACK: u64 = 16 << 20;
/// Concurrent chunk uploads per flush.
const UPLOAD_PARALLELISM: usize = 8;
/// Background stores of spilled chunks one open file may have running: a
/// writer fills its buffer again while the last one is stored, and waits
/// when this many are still under way (bounds memory per file).
pub const STORES_IN_FLIGHT: usize = 2;

/// Most creates one bulk command carries (the node's limit).
pub const BATCH_CREATES: usize = 1024;
/// Largest file whose tags are re-read after a write through the mount
/// (it is read whole into memory).
const MAX_TAG_READ: u64 = 512 << 20;
/// Bulk batches one `create_entries` call has in flight at once.
const BATCHES_IN_FLIGHT: usize = 16;

/// One entry of a bulk create.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub name: Vec<u8>,
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
}

impl NewEntry {
    /// An entry owned by root (uid and gid 0).
    pub fn new(name: impl Into<Vec<u8>>, kind: FileKind, perm: u32) -> Self {
        NewEntry {
            name: name.into(),
            kind,
            perm,
            uid: 0,
            gid: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// Totals for `statfs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsStats {
    pub inodes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// State of a file opened through this client, shared by all its handles.
struct FileState {
    ino: u64,
    /// Attributes as last seen; they answer `fstat` once the file is unlinked.
    attr: Attr,
    /// The layout as committed, plus uploaded but uncommitted chunks.
    extents: Vec<Extent>,
    size: u64,
    locations: HashMap<ChunkId, Vec<u64>>,
    new_chunks: Vec<NewChunk>,
    /// The oldest chunk-index answer `new_chunks` rely on (leader ms; 0
    /// when none), and when the first of them was added: a commit must
    /// follow within the cluster's commit window.
    checked_at_ms: u64,
    pending_since: Option<std::time::Instant>,
    /// The chunks `new_chunks` names.
    listed: std::collections::HashSet<ChunkId>,
    dirty: DirtyRuns,
    /// Chunks spilled into `extents` and not stored yet.
    unstored: Unstored,
    modified: bool,
    /// Written to since the file was opened (flush commits and clears
    /// `modified`; this lasts until the last close).
    written: bool,
    mtime: Option<Timespec>,
    opens: usize,
    /// Furthest end of the reads of the current sequential run.
    read_end: u64,
    /// Reads in the current sequential run, and its read-ahead window.
    read_streak: u32,
    read_window: u64,
    /// Bumped by every change to the extents, buffer or size.
    version: u64,
    /// A layout commit that failed without a definite answer, and the
    /// request id it went under: sent again unchanged, it goes under the
    /// same id, so if the first attempt did apply it does not apply again
    /// (over what other clients wrote since).
    unresolved: Option<(RequestId, CommitLayoutOp)>,
    /// This file's share of the client's buffered bytes, as last counted
    /// into `client_dirty`.
    counted: usize,
    client_dirty: Arc<AtomicUsize>,
}

impl Drop for FileState {
    fn drop(&mut self) {
        self.client_dirty.fetch_sub(self.counted, Ordering::Relaxed);
    }
}

impl FileState {
    /// Whether `other`, just loaded, is the committed version this state
    /// holds, with no local changes on top.
    fn same_version(&self, other: &FileState) -> bool {
        !self.modified && self.size == other.size && self.extents == other.extents
    }

    /// The state of a file whose committed layout is `extents`.
    fn new(
        attr: Attr,
        extents: Vec<Extent>,
        locations: HashMap<ChunkId, Vec<u64>>,
        client_dirty: Arc<AtomicUsize>,
    ) -> Self {
        FileState {
            ino: attr.ino,
            attr,
            extents,
            size: attr.size,
            locations,
            new_chunks: Vec::new(),
            checked_at_ms: 0,
            pending_since: None,
            listed: Default::default(),
            dirty: DirtyRuns::default(),
            unstored: Unstored::default(),
            modified: false,
            mtime: None,
            opens: 0,
            written: false,
            read_end: 0,
            read_streak: 0,
            read_window: 0,
            version: 0,
            unresolved: None,
            counted: 0,
            client_dirty,
        }
    }

    /// Brings the client's count of buffered bytes up to date with this
    /// file's buffer; returns the client's total.
    fn count_dirty(&mut self) -> usize {
        let now = self.dirty.bytes() + self.unstored.bytes;
        let total = if now >= self.counted {
            self.client_dirty
                .fetch_add(now - self.counted, Ordering::Relaxed)
                + (now - self.counted)
        } else {
            self.client_dirty
                .fetch_sub(self.counted - now, Ordering::Relaxed)
                - (self.counted - now)
        };
        self.counted = now;
        total
    }

    /// Takes what a store of chunks came to into the layout to commit.
    fn merge(&mut self, stored: Stored) {
        for c in stored.chunks {
            if let Some(data) = self.unstored.chunks.remove(&c.id) {
                self.unstored.bytes -= data.len();
            }
            self.locations.insert(c.id, c.locations);
            if self.listed.insert(c.id) {
                self.new_chunks.push(NewChunk {
                    chunk_id: Bytes::copy_from_slice(&c.id.0),
                    size: c.size,
                    locations: c.commit_locations,
                    receipts: c.receipts,
                });
            }
        }
        // The commit relies on this answer of the index from now on.
        self.checked_at_ms = match self.checked_at_ms {
            0 => stored.checked_at,
            t => t.min(stored.checked_at),
        };
        self.pending_since
            .get_or_insert_with(std::time::Instant::now);
    }
}

/// Chunks cut from an open file's writes and placed in its layout, whose
/// store (the index's dedup answer, uploads) runs in the background or
/// failed: reads take their bytes from here, and a flush stores whatever a
/// background store did not.
#[derive(Default)]
struct Unstored {
    chunks: HashMap<ChunkId, Bytes>,
    bytes: usize,
    /// Background stores of some of `chunks`, oldest first; each covers
    /// chunks no other covers.
    tasks: std::collections::VecDeque<tokio::task::JoinHandle<Result<Stored>>>,
}

/// What storing a set of chunks came to.
struct Stored {
    chunks: Vec<StoredChunk>,
    /// When the index answered (leader ms).
    checked_at: u64,
}

struct StoredChunk {
    id: ChunkId,
    size: u64,
    /// Where the layout commit says it was put: empty for a chunk the
    /// index already vouched for (what it said may change before the
    /// commit, which must not put a location back).
    commit_locations: Vec<u64>,
    /// The storage nodes' receipts for `commit_locations`.
    receipts: Vec<proto::meta::Receipt>,
    /// Where reads look first.
    locations: Vec<u64>,
}

/// Takes a background store's result into `st`; false if it failed (its
/// chunks stay unstored, for the next attempt).
async fn finish_store(st: &mut FileState, task: tokio::task::JoinHandle<Result<Stored>>) -> bool {
    match task.await {
        Ok(Ok(stored)) => {
            st.merge(stored);
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(ino = st.ino, error = %e, "background chunk store failed");
            false
        }
        Err(e) => {
            tracing::warn!(ino = st.ino, error = %e, "background chunk store ended");
            false
        }
    }
}

/// Puts a write into the file's buffer (not yet counted against the
/// client's bound: `count_dirty`).
fn buffer_write(st: &mut FileState, offset: u64, data: &[u8]) -> Result<()> {
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|e| *e <= 16 << 40)
        .ok_or_else(|| {
            ClientError::server(ErrorCode::FileTooBig, "write beyond the maximum file size")
        })?;
    st.dirty.write(offset, data);
    st.version += 1;
    st.size = st.size.max(end);
    st.modified = true;
    st.written = true;
    st.mtime = Some(Timespec::now());
    Ok(())
}

/// Asks the index which of `chunks` it has (dedup) and uploads the rest
/// to their placement.
async fn store_chunks(cluster: Arc<Cluster>, chunks: Vec<(ChunkId, Bytes)>) -> Result<Stored> {
    let ids = chunks.iter().map(|c| c.0).collect();
    let (infos, checked_at) = chunk_info(&cluster, ids).await?;
    let known: HashMap<ChunkId, ChunkInfo> = infos
        .into_iter()
        .filter(|i| i.known && !i.locations.is_empty())
        .filter_map(|i| Some((ChunkId::try_from(&i.chunk_id[..]).ok()?, i)))
        .collect();
    let mut out = Vec::new();
    let mut to_upload = Vec::new();
    for (id, data) in chunks {
        match known.get(&id) {
            Some(info) => out.push(StoredChunk {
                id,
                size: info.size,
                commit_locations: Vec::new(),
                receipts: Vec::new(),
                locations: info.locations.clone(),
            }),
            // Not vouched for (even if this file's old layout had it: a
            // truncate may have dropped its last reference): store it.
            None => to_upload.push((id, data)),
        }
    }
    let uploaded: Vec<StoredChunk> = stream::iter(to_upload)
        .map(|(id, data)| {
            let cluster = cluster.clone();
            async move {
                let size = data.len() as u64;
                let placed = cluster.put_chunk(id, data).await?;
                Ok::<_, ClientError>(StoredChunk {
                    id,
                    size,
                    commit_locations: placed.nodes.clone(),
                    receipts: placed.receipts,
                    locations: placed.nodes,
                })
            }
        })
        .buffer_unordered(UPLOAD_PARALLELISM)
        .try_collect()
        .await?;
    out.extend(uploaded);
    Ok(Stored {
        chunks: out,
        checked_at,
    })
}

/// Chunk-index entries, asked of each chunk's shard in batches, and the
/// oldest answer's time (leader clock, ms).
async fn chunk_info(cluster: &Cluster, ids: Vec<ChunkId>) -> Result<(Vec<ChunkInfo>, u64)> {
    let groups = cluster.group_count();
    let mut by_group: HashMap<u32, Vec<ChunkId>> = HashMap::new();
    for id in ids {
        by_group.entry(id.group(groups)).or_default().push(id);
    }
    let mut out = Vec::new();
    let mut oldest = u64::MAX;
    for (g, ids) in by_group {
        for batch in ids.chunks(1024) {
            let r = cluster
                .query(
                    g,
                    Q::ChunkInfo(ChunkInfoQuery {
                        chunk_ids: batch.iter().map(|i| Bytes::copy_from_slice(&i.0)).collect(),
                    }),
                )
                .await?;
            oldest = oldest.min(r.now_ms);
            out.extend(r.chunks);
        }
    }
    Ok((out, if oldest == u64::MAX { 0 } else { oldest }))
}

pub struct Fs {
    cluster: Arc<Cluster>,
    files: Mutex<HashMap<u64, Arc<AsyncMutex<FileState>>>>,
    handles: Mutex<HashMap<u64, Arc<AsyncMutex<FileState>>>>,
    next_fh: AtomicU64,
    cache: Arc<Mutex<ChunkCache>>,
    inflight: Arc<Mutex<HashMap<ChunkId, SharedFetch>>>,
    /// This file system, for tasks it starts on its own.
    me: std::sync::Weak<Fs>,
    /// Whether tags are re-read after a write (`keep_tags_current`).
    keep_tags: std::sync::atomic::AtomicBool,
    /// Tag views offered at the root (a mount sets them; tools do not).
    views: std::sync::OnceLock<Arc<Views>>,
    /// Where files were last seen (directory, name), so a content change
    /// tells the change feed its path.
    names: Mutex<HashMap<u64, (u64, Bytes)>>,
    /// Chunks kept on local disk across remounts (`--disk-cache-dir`).
    disk: std::sync::OnceLock<Arc<DiskCache>>,
    /// The version of each file whose bytes the kernel may hold in its
    /// page cache (a fingerprint of the layout the last open served): an
    /// open of the same version lets the kernel keep those pages.
    kernel_versions: Mutex<HashMap<u64, u64>>,
    readahead_max: u64,
    /// Bytes buffered by all open files (`CLIENT_DIRTY_BYTES`).
    dirty_bytes: Arc<AtomicUsize>,
    /// The directory this client last created an entry in, its attributes
    /// after that create, when, and `Cluster::command_count` then. The
    /// kernel drops a directory's attributes after each create in it and
    /// asks for them before the next (to check permissions):
    /// `getattr_within` answers that from here while no other command of
    /// this client has run since.
    created_in: Mutex<Option<(u64, Attr, Instant, u64)>>,
}

/// Most files whose kernel-cached version a mount remembers; past it the
/// table starts over (opens then drop the kernel's pages once).
const MAX_KERNEL_VERSIONS: usize = 262_144;

/// Most inodes whose names a client remembers for the change feed.
const MAX_NAMES: usize = 65_536;

/// A fingerprint of a file version: its size and layout.
fn layout_version(size: u64, extents: &[Extent]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&size.to_le_bytes());
    for e in extents {
        h.update(&e.offset.to_le_bytes());
        h.update(&e.length.to_le_bytes());
        h.update(&e.chunk_offset.to_le_bytes());
        h.update(&e.chunk_id);
    }
    h.digest()
}

/// A chunk fetch that several readers (and readahead) can await.
type SharedFetch = Shared<BoxFuture<'static, std::result::Result<Bytes, String>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fs {
    pub fn new(cluster: Arc<Cluster>, cache_bytes: usize) -> Arc<Self> {
        let fs = Arc::new_cyclic(|me| Fs {
            cluster,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cache: Arc::new(Mutex::new(ChunkCache::new(cache_bytes))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            me: me.clone(),
            keep_tags: std::sync::atomic::AtomicBool::new(false),
            views: std::sync::OnceLock::new(),
            names: Mutex::new(HashMap::new()),
            disk: std::sync::OnceLock::new(),
            kernel_versions: Mutex::new(HashMap::new()),
            readahead_max: (cache_bytes as u64 / 4).clamp(READAHEAD_MIN, READAHEAD_MAX),
            dirty_bytes: Arc::new(AtomicUsize::new(0)),
            created_in: Mutex::new(None),
        });
        // Checkpoint slow writers at a quarter of the commit window; the
        // task ends when the file system is dropped.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&fs);
            rt.spawn(async move {
                loop {
                    let window = match weak.upgrade() {
                        Some(fs) => fs.cluster.storage().commit_window,
                        None => return,
                    };
                    let every = (window / 8).clamp(
                        std::time::Duration::from_millis(200),
                        std::time::Duration::from_secs(60),
                    );
                    tokio::time::sleep(every).await;
                    let Some(fs) = weak.upgrade() else { return };
                    fs.checkpoint(window / 4).await;
                }
            });
        }
        fs
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Bytes of writes all open files hold in memory: unchunked, or cut
    /// into chunks not stored yet.
    pub fn buffered_bytes(&self) -> usize {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// Notes that `ino` is called `name` in `parent`.
    pub fn saw(&self, ino: u64, parent: u64, name: &[u8]) {
        let mut names = lock(&self.names);
        if names.len() >= MAX_NAMES && !names.contains_key(&ino) {
            names.clear();
        }
        names.insert(ino, (parent, Bytes::copy_from_slice(name)));
    }

    fn name_of(&self, ino: u64) -> (u64, Bytes) {
        lock(&self.names).get(&ino).cloned().unwrap_or_default()
    }

    /// The kernel dropped `n` references to `ino` (only tag views keep
    /// per-inode state that depends on it).
    pub fn forget(&self, ino: u64, n: u64) {
        if let (Some(v), true) = (self.views(), views::is_virtual(ino)) {
            v.forget(ino, n);
        }
    }

    /// Keeps fetched chunks in `cache` too (once).
    pub fn enable_disk_cache(&self, cache: DiskCache) {
        let _ = self.disk.set(Arc::new(cache));
    }

    /// Offers tag views under `views.dir_name` at the root (once).
    pub fn enable_views(&self, views: Views) {
        let _ = self.views.set(Arc::new(views));
    }

    fn views(&self) -> Option<&Arc<Views>> {
        self.views.get()
    }

    /// Refuses changes inside a tag view.
    fn writable(inos: &[u64]) -> Result<()> {
        if inos.iter().any(|&i| views::is_virtual(i)) {
            return Err(ClientError::ReadOnly(
                "tag views are read-only: change the tracks themselves".into(),
            ));
        }
        Ok(())
    }

    fn check_name(name: &[u8]) -> Result<()> {
        validate_name(name).map_err(|e| ClientError::Server(e.into()))
    }

    /// Attributes as this client sees them: the committed ones, with the
    /// size and mtime of local unflushed writes.
    async fn local_view(&self, mut attr: Attr) -> Attr {
        let state = lock(&self.files).get(&attr.ino).cloned();
        if let Some(st) = state {
            let mut st = st.lock().await;
            st.attr = attr;
            if st.modified {
                attr.size = st.size;
                if st.mtime.is_some() {
                    attr.mtime = st.mtime;
                }
            }
        }
        attr
    }

    fn attr_of(attr: Option<Attr>) -> Result<Attr> {
        attr.ok_or_else(|| ClientError::server(ErrorCode::Internal, "reply without attributes"))
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        Self::check_name(name)?;
        if let Some(v) = self.views() {
            if parent == proto::ROOT_INO && name == v.dir_name.as_bytes() {
                return v.getattr(self, v.top()).await;
            }
            if views::is_virtual(parent) {
                let a = v.lookup(self, parent, name).await?;
                v.looked_up(a.ino);
                return Ok(a);
            }
        }
        let r = self
            .cluster
            .query(
                group_of_ino(parent),
                Q::Lookup(LookupQuery {
                    parent,
                    name: Bytes::copy_from_slice(name),
                }),
            )
            .await?;
        let attr = match (r.attr, r.entry) {
            (Some(a), _) => a,
            // The entry names an inode of another group: ask that group.
            (None, Some(e)) => {
                self.saw(e.ino, parent, name);
                return self.getattr(e.ino).await;
            }
            (None, None) => Self::attr_of(None)?,
        };
        self.saw(attr.ino, parent, name);
        Ok(self.local_view(attr).await)
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr> {
        if let (Some(v), true) = (self.views(), views::is_virtual(ino)) {
            return Box::pin(v.getattr(self, ino)).await;
        }
        let r = match self
            .cluster
            .query(group_of_ino(ino), Q::GetAttr(GetAttrQuery { ino }))
            .await
        {
            Ok(r) => r,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                // Unlinked while open here: the handle keeps the file alive.
                let state = lock(&self.files).get(&ino).cloned();
                let Some(st) = state else { return Err(e) };
                let st = st.lock().await;
                let mut a = st.attr;
                a.nlink = 0;
                a.size = st.size;
                return Ok(a);
            }
            Err(e) => return Err(e),
        };
        Ok(self.local_view(Self::attr_of(r.attr)?).await)
    }

    pub async fn setattr(&self, ino: u64, fields: SetAttrFields) -> Result<Attr> {
        Self::writable(&[ino])?;
        // Local writes commit first, so explicit times and sizes apply on top.
        let state = lock(&self.files).get(&ino).cloned();
        if let Some(st) = &state {
            let mut st = st.lock().await;
            self.commit(&mut st).await?;
        }
        let size = fields.size;
        let r = self
            .cluster
            .propose(
                group_of_ino(ino),
                Op::SetAttr(SetAttrOp {
                    ino,
                    fields: Some(fields),
                }),
            )
            .await?;
        let attr = Self::attr_of(r.attr)?;
        if let (Some(st), Some(size)) = (state, size) {
            let mut st = st.lock().await;
            layout::truncate(&mut st.extents, size);
            st.dirty.truncate(size);
            st.count_dirty();
            st.size = size;
            st.version += 1;
        }
        Ok(attr)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        symlink_target: &[u8],
    ) -> Result<Attr> {
        Self::writable(&[parent])?;
        Self::check_name(name)?;
        let before = self.cluster.command_count();
        let r = self
            .cluster
            .propose(
                group_of_ino(parent),
                Op::Create(CreateOp {
                    parent,
                    name: Bytes::copy_from_slice(name),
                    kind: kind as i32,
                    perm,
                    uid,
                    gid,
                    rdev,
                    symlink_target: Bytes::copy_from_slice(symlink_target),
                }),
            )
            .await?;
        let a = Self::attr_of(r.attr)?;
        self.saw(a.ino, parent, name);
        let after = self.cluster.command_count();
        // Only when this create was the client's one command meanwhile:
        // another may have changed the directory after it.
        *lock(&self.created_in) = match r.parent_attr {
            Some(p) if after == before + 2 => Some((parent, p, Instant::now(), after)),
            _ => None,
        };
        Ok(a)
    }

    /// `getattr`, answered without a round trip for the directory this
    /// client just created an entry in: its attributes from that create's
    /// reply, younger than `ttl` (the attribute time the kernel caches
    /// for), while no other command of this client has run since.
    pub async fn getattr_within(&self, ino: u64, ttl: Duration) -> Result<Attr> {
        let recent = lock(&self.created_in)
            .as_ref()
            .and_then(|(dir, a, at, count)| {
                (*dir == ino && at.elapsed() < ttl && *count == self.cluster.command_count())
                    .then_some(*a)
            });
        match recent {
            Some(a) => Ok(self.local_view(a).await),
            None => self.getattr(ino).await,
        }
    }

    /// Creates many entries in one directory (see `create_entries`).
    pub async fn create_many(&self, parent: u64, items: &[NewEntry]) -> Result<Vec<Result<Attr>>> {
        let items: Vec<(u64, &NewEntry)> = items.iter().map(|e| (parent, e)).collect();
        self.create_entries(&items).await
    }

    /// Creates many entries, each `(parent, entry)`, in any directories:
    /// the bulk path of an import. Entries are grouped by the group of
    /// their parent, up to 1024 to a Raft entry, and up to 16 batches are in
    /// flight at once. A directory that belongs in another group is
    /// created by its parent's group (in one transaction with the batch's
    /// other such directories). Returns one outcome per entry, in order.
    pub async fn create_entries(&self, items: &[(u64, &NewEntry)]) -> Result<Vec<Result<Attr>>> {
        for (parent, e) in items {
            Self::writable(&[*parent])?;
            Self::check_name(&e.name)?;
        }
        let mut by_group: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, (parent, _)) in items.iter().enumerate() {
            by_group.entry(group_of_ino(*parent)).or_default().push(i);
        }
        let batches = by_group
            .into_iter()
            .flat_map(|(g, idx)| {
                idx.chunks(BATCH_CREATES)
                    .map(|c| (g, c.to_vec()))
                    .collect::<Vec<_>>()
            })
            .map(|(g, idx)| async move {
                let creates = idx
                    .iter()
                    .map(|&i| {
                        let (parent, e) = items[i];
                        CreateOp {
                            parent,
                            name: Bytes::copy_from_slice(&e.name),
                            kind: e.kind as i32,
                            perm: e.perm,
                            uid: e.uid,
                            gid: e.gid,
                            rdev: 0,
                            symlink_target: Bytes::new(),
                        }
                    })
                    .collect();
                let r = self
                    .cluster
                    .propose(g, Op::CreateBatch(CreateBatchOp { creates }))
                    .await?;
                if r.results.len() != idx.len() {
                    return Err(ClientError::server(
                        ErrorCode::Internal,
                        "batch reply does not match the request",
                    ));
                }
                Ok((idx, r.results))
            });
        let mut out: Vec<Option<Result<Attr>>> = (0..items.len()).map(|_| None).collect();
        let replies: Vec<_> = stream::iter(batches)
            .buffer_unordered(BATCHES_IN_FLIGHT)
            .try_collect()
            .await?;
        for (idx, results) in replies {
            for (i, r) in idx.into_iter().zip(results) {
                let (parent, e) = items[i];
                out[i] = Some(match r.error {
                    Some(err) if err.code() == ErrorCode::CrossShard => {
                        self.create(parent, &e.name, e.kind, e.perm, e.uid, e.gid, 0, b"")
                            .await
                    }
                    Some(err) => Err(ClientError::Server(err)),
                    None => Self::attr_of(r.attr),
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::server(ErrorCode::Internal, "no reply"))))
            .collect())
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Attr> {
        Self::writable(&[ino, new_parent])?;
        Self::check_name(new_name)?;
        let r = self
            .cluster
            .propose(
                group_of_ino(new_parent),
                Op::Link(LinkOp {
                    ino,
                    new_parent,
                    new_name: Bytes::copy_from_slice(new_name),
                }),
            )
            .await?;
        Ok(self.local_view(Self::attr_of(r.attr)?).await)
    }

    pub async fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        Self::writable(&[parent])?;
        Self::check_name(name)?;
        self.cluster
            .propose(
                group_of_ino(parent),
                Op::Remove(RemoveOp {
                    parent,
                    name: Bytes::copy_from_slice(name),
                    dir,
                }),
            )
            .await?;
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        Self::writable(&[parent, new_parent])?;
        Self::check_name(name)?;
        Self::check_name(new_name)?;
        self.cluster
            .propose(
                group_of_ino(parent),
                Op::Rename(RenameOp {
                    parent,
                    name: Bytes::copy_from_slice(name),
                    new_parent,
                    new_name: Bytes::copy_from_slice(new_name),
                    noreplace: flags.noreplace,
                    exchange: flags.exchange,
                }),
            )
            .await?;
        Ok(())
    }

    pub async fn readlink(&self, ino: u64) -> Result<Bytes> {
        let r = self
            .cluster
            .query(group_of_ino(ino), Q::ReadLink(ReadLinkQuery { ino }))
            .await?;
        Ok(r.link_target)
    }

    /// One page of a directory, in name order, after `after`.
    pub async fn readdir(
        &self,
        ino: u64,
        after: &[u8],
        limit: u32,
        plus: bool,
    ) -> Result<(Vec<DirEntry>, bool)> {
        if let Some(v) = self.views() {
            if views::is_virtual(ino) {
                return v.readdir(self, ino, after, limit, plus).await;
            }
            if ino == proto::ROOT_INO {
                let (entries, more) = self.readdir_real(ino, after, limit, plus).await?;
                return self.with_views_entry(v, entries, more, after, plus).await;
            }
        }
        self.readdir_real(ino, after, limit, plus).await
    }

    /// The root's listing with the views directory in its place by name
    /// (unless a real entry of that name hides it).
    async fn with_views_entry(
        &self,
        v: &Views,
        mut entries: Vec<DirEntry>,
        more: bool,
        after: &[u8],
        plus: bool,
    ) -> Result<(Vec<DirEntry>, bool)> {
        let name = v.dir_name.as_bytes();
        let in_page = name > after
            && (!more || entries.last().is_some_and(|e| &e.name[..] > name))
            && !entries.iter().any(|e| &e.name[..] == name);
        if in_page {
            let at = entries.partition_point(|e| &e.name[..] < name);
            let attr = v.getattr(self, v.top()).await?;
            entries.insert(
                at,
                DirEntry {
                    name: Bytes::copy_from_slice(name),
                    ino: v.top(),
                    kind: FileKind::Directory as i32,
                    attr: plus.then_some(attr),
                },
            );
        }
        Ok((entries, more))
    }

    async fn readdir_real(
        &self,
        ino: u64,
        after: &[u8],
        limit: u32,
        plus: bool,
    ) -> Result<(Vec<DirEntry>, bool)> {
        let r = self
            .cluster
            .query(
                group_of_ino(ino),
                Q::ReadDir(ReadDirQuery {
                    ino,
                    after: Bytes::copy_from_slice(after),
                    limit,
                    plus,
                }),
            )
            .await?;
        let mut entries = r.entries;
        if plus {
            for e in &mut entries {
                e.attr = match e.attr.take() {
                    Some(a) => Some(self.local_view(a).await),
                    None => Some(self.getattr(e.ino).await?),
                };
            }
        }
        Ok((entries, r.more))
    }

    pub async fn statfs(&self) -> Result<FsStats> {
        // Every group counts its own inodes and the chunks it indexes.
        let replies = futures::future::try_join_all(
            (0..self.cluster.group_count())
                .map(|g| self.cluster.query(g, Q::StatFs(StatFsQuery {}))),
        )
        .await?;
        let mut stats = FsStats::default();
        for r in replies {
            let s = r.stat_fs.unwrap_or_default();
            stats.inodes += s.inodes;
            stats.used_bytes += s.chunk_bytes;
        }
        // Capacity: the smallest node bounds what three replicas can hold.
        let mut min_free = u64::MAX;
        let mut min_total = u64::MAX;
        for addr in self.cluster.peers().values() {
            if let Ok(st) = self.cluster.status_of(addr).await {
                min_free = min_free.min(st.disk_free_bytes);
                min_total = min_total.min(st.disk_total_bytes);
            }
        }
        if min_total != u64::MAX {
            stats.free_bytes = min_free;
            stats.total_bytes = min_total;
        }
        Ok(stats)
    }

    // ---- files ----------------------------------------------------------

    /// Opens a file: loads its committed layout unless this client already
    /// has it open. Returns a handle.
    pub async fn open(&self, ino: u64) -> Result<u64> {
        if let (Some(v), true) = (self.views(), views::is_virtual(ino)) {
            // A cover's handle is its inode: the views serve its bytes.
            if v.is_cover(ino) {
                return Ok(ino);
            }
            return match v.real_ino(ino)? {
                Some(real) => self.open_with(real, None).await,
                None => Err(ClientError::server(
                    ErrorCode::IsDir,
                    "a directory of a tag view",
                )),
            };
        }
        self.open_with(ino, None).await
    }

    /// Opens a file for the kernel: also says whether the kernel may keep
    /// the pages and attributes it cached of the file (true when this
    /// mount last opened the same version; otherwise both must go).
    pub async fn open_cached(&self, ino: u64) -> Result<(u64, bool)> {
        let fh = self.open(ino).await?;
        if views::is_virtual(fh) {
            // A view's cover: small, and its track may have changed.
            return Ok((fh, false));
        }
        let st = self.handle(fh)?;
        let st = st.lock().await;
        if st.modified {
            // The kernel's pages already hold this client's own writes.
            return Ok((fh, true));
        }
        let version = layout_version(st.size, &st.extents);
        // Keyed by the kernel's inode: a file seen through a tag view has
        // pages of its own under its view inode.
        let mut known = lock(&self.kernel_versions);
        if known.len() >= MAX_KERNEL_VERSIONS && !known.contains_key(&ino) {
            known.clear();
        }
        let keep = known.insert(ino, version) == Some(version);
        Ok((fh, keep))
    }

    /// Creates a regular file and opens it, without asking for the layout
    /// of a file that was just created empty.
    pub async fn create_open(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(Attr, u64)> {
        let attr = self
            .create(parent, name, FileKind::Regular, perm, uid, gid, 0, b"")
            .await?;
        let fh = self.open_with(attr.ino, Some(attr)).await?;
        Ok((attr, fh))
    }

    async fn open_with(&self, ino: u64, created: Option<Attr>) -> Result<u64> {
        enum Opening {
            Share(Arc<AsyncMutex<FileState>>),
            New(Box<FileState>),
        }
        let existing = lock(&self.files).get(&ino).cloned();
        let opening = match (existing, created) {
            (Some(st), Some(_)) => Opening::Share(st),
            (Some(st), None) => match self.newer_layout(&st).await? {
                Some(r) => Opening::New(Box::new(self.state_of(ino, r)?)),
                None => Opening::Share(st),
            },
            (None, Some(attr)) => Opening::New(Box::new(FileState::new(
                attr,
                Vec::new(),
                HashMap::new(),
                self.dirty_bytes.clone(),
            ))),
            (None, None) => Opening::New(Box::new(self.load(ino).await?)),
        };
        let state = match opening {
            Opening::Share(st) => {
                st.lock().await.opens += 1;
                st
            }
            Opening::New(st) => {
                let st = *st;
                let arc = {
                    let mut files = lock(&self.files);
                    match files.get(&ino) {
                        // Another open raced us (to the same version, or
                        // with writes of this client on top): share it.
                        Some(other)
                            if other
                                .try_lock()
                                .map_or(true, |o| o.modified || o.same_version(&st)) =>
                        {
                            other.clone()
                        }
                        // Handles open on an older version keep it; opens
                        // from now on share this one.
                        _ => {
                            let arc = Arc::new(AsyncMutex::new(st));
                            files.insert(ino, arc.clone());
                            arc
                        }
                    }
                };
                arc.lock().await.opens += 1;
                arc
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, state);
        Ok(fh)
    }

    /// The committed layout when an open may not share `st`, the state of
    /// handles already open on the file; None when it may: `st` holds this
    /// client's own uncommitted writes, or is still the committed version
    /// (close-to-open: an open sees every close that came before it, also
    /// while older handles stay open).
    async fn newer_layout(&self, st: &Arc<AsyncMutex<FileState>>) -> Result<Option<QueryResult>> {
        let ino = {
            let g = st.lock().await;
            if g.modified {
                return Ok(None);
            }
            g.ino
        };
        let r = self.get_layout(ino).await?;
        let size = Self::attr_of(r.attr)?.size;
        let g = st.lock().await;
        Ok((!g.modified && (g.size != size || g.extents != r.extents)).then_some(r))
    }

    async fn get_layout(&self, ino: u64) -> Result<QueryResult> {
        self.cluster
            .query(group_of_ino(ino), Q::GetLayout(GetLayoutQuery { ino }))
            .await
    }

    async fn load(&self, ino: u64) -> Result<FileState> {
        let r = self.get_layout(ino).await?;
        self.state_of(ino, r)
    }

    /// The state of a file whose committed layout `r` answered. Chunk
    /// locations are not asked for: a read tries the nodes each chunk's
    /// placement prefers, where the writer put it, and moves on to the
    /// others if a repair moved it (one round trip less per open).
    fn state_of(&self, ino: u64, r: QueryResult) -> Result<FileState> {
        let attr = Self::attr_of(r.attr)?;
        if attr.kind == FileKind::Directory as i32 {
            return Err(ClientError::server(
                ErrorCode::IsDir,
                format!("inode {ino}"),
            ));
        }
        Ok(FileState::new(
            attr,
            r.extents,
            HashMap::new(),
            self.dirty_bytes.clone(),
        ))
    }

    fn handle(&self, fh: u64) -> Result<Arc<AsyncMutex<FileState>>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(ClientError::BadHandle(fh))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes> {
        if let (Some(v), true) = (self.views(), views::is_virtual(fh)) {
            return Box::pin(v.read_cover(self, fh, offset, size)).await;
        }
        let handle = self.handle(fh)?;
        // Fetch without holding the file's lock, so the kernel's parallel
        // reads overlap; redo if a write changed the file meanwhile.
        for _ in 0..8 {
            let (version, end, wanted) = {
                let mut st = handle.lock().await;
                if offset >= st.size || size == 0 {
                    return Ok(Bytes::new());
                }
                let end = (offset + u64::from(size)).min(st.size);
                // A chunk still being stored is read from memory.
                let wanted: Vec<(Extent, Result<Bytes, Vec<u64>>)> = st
                    .extents
                    .iter()
                    .filter(|e| layout::extent_end(e) > offset && e.offset < end)
                    .map(|e| {
                        let id = layout::extent_chunk(e);
                        let src = match id.and_then(|id| st.unstored.chunks.get(&id)) {
                            Some(data) => Ok(data.clone()),
                            None => Err(id
                                .and_then(|id| st.locations.get(&id).cloned())
                                .unwrap_or_default()),
                        };
                        (e.clone(), src)
                    })
                    .collect();
                self.note_read(&mut st, offset, end);
                (st.version, end, wanted)
            };
            let fetched = futures::future::try_join_all(wanted.iter().map(|(e, src)| async move {
                let id = layout::extent_chunk(e).ok_or_else(|| {
                    ClientError::server(ErrorCode::Corrupt, "bad chunk id in layout")
                })?;
                let data = match src {
                    Ok(data) => data.clone(),
                    Err(locs) => self.fetch(id, locs.clone()).await?,
                };
                Ok::<_, ClientError>((id, data))
            }))
            .await?;
            // The common case: one chunk holds the whole range and nothing
            // is buffered over it; hand out a slice of it, no copy.
            if let ([(e, _)], [(_, data)]) = (&wanted[..], &fetched[..]) {
                let from = e.chunk_offset + (offset - e.offset);
                let to = from + (end - offset);
                let st = handle.lock().await;
                if e.offset <= offset
                    && layout::extent_end(e) >= end
                    && to <= data.len() as u64
                    && st.dirty.is_empty()
                {
                    if st.version != version {
                        continue;
                    }
                    return Ok(data.slice(from as usize..to as usize));
                }
            }
            // Filled in file order; only holes are zeroed (extents are
            // sorted and do not overlap).
            let len = (end - offset) as usize;
            let mut buf = BytesMut::with_capacity(len);
            for ((e, _), (id, data)) in wanted.iter().zip(fetched) {
                let s = e.offset.max(offset);
                let t = layout::extent_end(e).min(end);
                let from = (e.chunk_offset + (s - e.offset)) as usize;
                let to = from + (t - s) as usize;
                if to > data.len() || ((s - offset) as usize) < buf.len() {
                    return Err(ClientError::server(
                        ErrorCode::Corrupt,
                        format!("extent of chunk {id} reaches past the chunk or overlaps another"),
                    ));
                }
                buf.resize((s - offset) as usize, 0);
                buf.extend_from_slice(&data[from..to]);
            }
            buf.resize(len, 0);
            let st = handle.lock().await;
            if st.version != version {
                continue;
            }
            st.dirty.overlay_onto(offset, &mut buf);
            return Ok(buf.freeze());
        }
        Err(ClientError::Unavailable(
            "file kept changing during a read".into(),
        ))
    }

    /// A chunk from the cache, or fetched once however many readers want it.
    async fn fetch(&self, id: ChunkId, locations: Vec<u64>) -> Result<Bytes> {
        let cached = lock(&self.cache).get(&id);
        crate::metrics::chunk_cache(cached.is_some());
        if let Some(d) = cached {
            return Ok(d);
        }
        self.fetch_shared(id, locations)
            .await
            .map_err(|reason| ClientError::ChunkUnreadable {
                id: id.to_hex(),
                reason,
            })
    }

    fn fetch_shared(&self, id: ChunkId, locations: Vec<u64>) -> SharedFetch {
        let mut inflight = lock(&self.inflight);
        if let Some(f) = inflight.get(&id) {
            return f.clone();
        }
        let (cluster, cache, table) = (
            self.cluster.clone(),
            self.cache.clone(),
            self.inflight.clone(),
        );
        let disk = self.disk.get().cloned();
        let fut = async move {
            let mut r = None;
            if let Some(d) = disk.clone() {
                if let Ok(Some(data)) = tokio::task::spawn_blocking(move || d.get(&id)).await {
                    crate::metrics::disk_cache_hit();
                    r = Some(Ok(data));
                }
            }
            let r = match r {
                Some(r) => r,
                None => {
                    let r = cluster.get_chunk(id, &locations).await;
                    if let (Ok(data), Some(d)) = (&r, disk) {
                        let data = data.clone();
                        // Written behind the reader: a slow disk does not
                        // hold up the read.
                        tokio::task::spawn_blocking(move || d.put(&id, &data));
                    }
                    r
                }
            };
            if let Ok(d) = &r {
                lock(&cache).insert(id, d.clone());
            }
            lock(&table).remove(&id);
            r.map_err(|e| e.to_string())
        }
        .boxed()
        .shared();
        inflight.insert(id, fut.clone());
        fut
    }

    /// Tracks sequential access and reads ahead of a sequential reader
    /// with a window that doubles while the run lasts. A read far from the
    /// last (a tag reader seeking to the end) starts over without any.
    fn note_read(&self, st: &mut FileState, offset: u64, end: u64) {
        if offset.abs_diff(st.read_end) <= SEQUENTIAL_SLACK {
            st.read_streak = st.read_streak.saturating_add(1);
            st.read_end = st.read_end.max(end);
        } else {
            st.read_streak = 1;
            st.read_window = 0;
            st.read_end = end;
        }
        // The second sequential read starts read-ahead: one read at the
        // start of a file (a tag reader) fetches only what it needs.
        if st.read_streak >= 2 {
            st.read_window = (st.read_window * 2).clamp(READAHEAD_MIN, self.readahead_max);
            self.readahead(st, st.read_end, st.read_window);
        }
    }

    /// Starts fetching the chunks in `[from, from + window)` into the cache.
    fn readahead(&self, st: &FileState, from: u64, window: u64) {
        let mut next: Vec<ChunkId> = Vec::new();
        for e in st
            .extents
            .iter()
            .filter(|e| layout::extent_end(e) > from)
            .take_while(|e| e.offset < from + window)
        {
            let Some(id) = layout::extent_chunk(e) else {
                continue;
            };
            if !next.contains(&id) {
                next.push(id);
            }
        }
        for id in next {
            if lock(&self.cache).contains(&id) || lock(&self.inflight).contains_key(&id) {
                continue;
            }
            let f = self.fetch_shared(id, st.locations.get(&id).cloned().unwrap_or_default());
            crate::metrics::prefetched();
            tokio::spawn(f);
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let st = self.handle(fh)?;
        let mut st = st.lock().await;
        buffer_write(&mut st, offset, data)?;
        let client_total = st.count_dirty();
        let buffered = st.dirty.bytes();
        if client_total > CLIENT_DIRTY_BYTES {
            // Over the client's bound: this file's bytes leave memory
            // before the write returns.
            if buffered >= MIN_SPILL_BYTES {
                self.spill(&mut st, false).await?;
            }
            self.store_all(&mut st).await?;
        } else if buffered >= SPILL_BYTES {
            self.collect_stores(&mut st, STORES_IN_FLIGHT - 1).await?;
            self.spill(&mut st, false).await?;
        } else {
            self.collect_stores(&mut st, usize::MAX).await?;
        }
        Ok(data.len() as u32)
    }

    /// A write's fast path, for the thread that took the request: buffers
    /// it at once when the file is not busy and the write leaves nothing
    /// to spill, collect or wait for. `Ok(None)`: nothing was done, the
    /// caller goes through `write`. A sequential writer waits on the
    /// kernel's reply to each request, so a hand-over to another thread
    /// per request is time it spends idle.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Result<Option<u32>> {
        let handle = self.handle(fh)?;
        let Ok(mut st) = handle.try_lock() else {
            return Ok(None);
        };
        let len = data.len();
        if st.dirty.bytes() + len >= SPILL_BYTES
            || st.client_dirty.load(Ordering::Relaxed) + len > CLIENT_DIRTY_BYTES
            || st.unstored.tasks.front().is_some_and(|t| t.is_finished())
        {
            return Ok(None);
        }
        buffer_write(&mut st, offset, data)?;
        st.count_dirty();
        Ok(Some(len as u32))
    }

    /// Cuts buffered writes into chunks, places them in the working layout
    /// and starts storing them in the background (`Unstored`). Unless
    /// `all`, the last chunk of each run stays buffered (its end is where
    /// the buffer filled, not a content boundary), so a sequential writer
    /// gets the same chunk boundaries as a whole-file cut, also when it
    /// writes over a longer old content (a re-tagged track).
    async fn spill(&self, st: &mut FileState, all: bool) -> Result<()> {
        let runs = Arc::new(st.dirty.take());
        // Cutting and hashing run on the blocking pool, beside the uploads
        // of the previous spill.
        let cut = {
            let runs = runs.clone();
            tokio::task::spawn_blocking(move || {
                runs.iter()
                    .map(|(off, run)| layout::cut(*off, run))
                    .collect::<Vec<_>>()
            })
            .await
        };
        let cuts = match cut {
            Ok(c) => c,
            Err(e) => {
                // Nothing was placed: every byte stays buffered.
                for (off, run) in runs.iter() {
                    st.dirty.write(*off, run);
                }
                st.count_dirty();
                return Err(ClientError::Unavailable(format!("chunking failed: {e}")));
            }
        };
        st.version += 1;
        // The cut is done: the runs are this function's alone again.
        let mut runs = Arc::try_unwrap(runs).unwrap_or_else(|shared| (*shared).clone());
        let mut fresh = Vec::new();
        for (i, mut cut) in cuts.into_iter().enumerate() {
            if !all && cut.len() > 1 {
                if let Some(last) = cut.pop() {
                    // The run's own buffer carries its tail on: its pages
                    // are mapped already for the appends that follow.
                    let (off, mut run) = std::mem::take(&mut runs[i]);
                    let from = (last.file_offset - off) as usize;
                    run.copy_within(from.., 0);
                    run.truncate(run.len() - from);
                    st.dirty.put_run(last.file_offset, run);
                }
            }
            for c in cut {
                // Keep the cache warm with what was just written.
                lock(&self.cache).insert(c.id, c.data.clone());
                layout::overlay(
                    &mut st.extents,
                    Extent {
                        offset: c.file_offset,
                        length: c.data.len() as u64,
                        chunk_id: Bytes::copy_from_slice(&c.id.0),
                        chunk_offset: 0,
                    },
                );
                if !st.listed.contains(&c.id) && !st.unstored.chunks.contains_key(&c.id) {
                    st.unstored.bytes += c.data.len();
                    st.unstored.chunks.insert(c.id, c.data.clone());
                    fresh.push((c.id, c.data));
                }
            }
        }
        if !fresh.is_empty() {
            let task = tokio::spawn(store_chunks(self.cluster.clone(), fresh));
            st.unstored.tasks.push_back(task);
        }
        st.count_dirty();
        Ok(())
    }

    /// Takes the results of this file's background stores, waiting until
    /// at most `running` are still under way. If one failed, its chunks
    /// are stored again here, and that attempt's error is the answer.
    async fn collect_stores(&self, st: &mut FileState, running: usize) -> Result<()> {
        let mut failed = false;
        while let Some(task) = st.unstored.tasks.pop_front() {
            if st.unstored.tasks.len() < running && !task.is_finished() {
                st.unstored.tasks.push_front(task);
                break;
            }
            if !finish_store(st, task).await {
                failed = true;
            }
        }
        st.count_dirty();
        if failed {
            self.store_all(st).await?;
        }
        Ok(())
    }

    /// Stores every chunk spilled so far: waits for the background stores,
    /// then stores here what they did not.
    async fn store_all(&self, st: &mut FileState) -> Result<()> {
        while let Some(task) = st.unstored.tasks.pop_front() {
            // A failed one leaves its chunks unstored: stored below.
            finish_store(st, task).await;
        }
        if !st.unstored.chunks.is_empty() {
            let chunks: Vec<(ChunkId, Bytes)> = st
                .unstored
                .chunks
                .iter()
                .map(|(id, d)| (*id, d.clone()))
                .collect();
            let res = store_chunks(self.cluster.clone(), chunks).await;
            match res {
                Ok(stored) => st.merge(stored),
                Err(e) => {
                    st.count_dirty();
                    return Err(e);
                }
            }
        }
        st.count_dirty();
        Ok(())
    }

    /// Uploads what is buffered and commits the layout.
    async fn commit(&self, st: &mut FileState) -> Result<()> {
        if !st.modified {
            return Ok(());
        }
        self.spill(st, true).await?;
        self.store_all(st).await?;
        let mut rechecked = false;
        let hint = self.name_of(st.ino);
        loop {
            let op = CommitLayoutOp {
                ino: st.ino,
                extents: st.extents.clone(),
                size: st.size,
                new_chunks: st.new_chunks.clone(),
                mtime: st.mtime,
                kill_suid: false,
                checked_at_ms: st.checked_at_ms,
                hint_parent: hint.0,
                hint_name: hint.1.clone(),
            };
            // The same commit as one that failed without an answer goes
            // under that one's id; any other is a new request.
            let id = match st.unresolved.take() {
                Some((id, sent)) if sent == op => id,
                _ => self.cluster.request_id(),
            };
            let res = self
                .cluster
                .propose_as(&id, group_of_ino(st.ino), Op::CommitLayout(op.clone()))
                .await;
            if let Err(e) = &res {
                if e.is_indefinite() {
                    st.unresolved = Some((id, op));
                }
            }
            match res {
                Ok(_) => break,
                // The file was deleted meanwhile: its content is gone with it.
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                    tracing::debug!(ino = st.ino, "commit to a deleted file dropped");
                    break;
                }
                Err(e) if e.code() == Some(ErrorCode::Stale) && !rechecked => {
                    rechecked = true;
                    self.recheck(st).await?;
                }
                Err(e) => return Err(e),
            }
        }
        st.new_chunks.clear();
        st.listed.clear();
        st.checked_at_ms = 0;
        st.pending_since = None;
        st.modified = false;
        st.mtime = None;
        Ok(())
    }

    /// After a commit was refused as stale: asks the index again about the
    /// uncommitted chunks and stores again those it no longer vouches for
    /// (they may have been freed meanwhile), from the cache.
    async fn recheck(&self, st: &mut FileState) -> Result<()> {
        let ids: Vec<ChunkId> = st
            .new_chunks
            .iter()
            .filter_map(|n| ChunkId::try_from(&n.chunk_id[..]).ok())
            .collect();
        let (infos, checked_at) = chunk_info(&self.cluster, ids).await?;
        let known: HashMap<ChunkId, ChunkInfo> = infos
            .into_iter()
            .filter(|i| i.known && !i.locations.is_empty())
            .filter_map(|i| Some((ChunkId::try_from(&i.chunk_id[..]).ok()?, i)))
            .collect();
        for n in st.new_chunks.iter_mut() {
            let Ok(id) = ChunkId::try_from(&n.chunk_id[..]) else {
                continue;
            };
            if known.contains_key(&id) {
                n.locations.clear();
                n.receipts.clear();
                continue;
            }
            let Some(data) = lock(&self.cache).get(&id) else {
                return Err(ClientError::Unavailable(format!(
                    "chunk {id} of inode {} was written more than the cluster's commit window \
                     ago and is no longer cached here; write the file again",
                    st.ino
                )));
            };
            let placed = self.cluster.put_chunk(id, data).await?;
            n.locations = placed.nodes;
            n.receipts = placed.receipts;
            st.locations.insert(id, n.locations.clone());
        }
        st.checked_at_ms = checked_at;
        Ok(())
    }

    /// Commits open files whose uncommitted chunks are getting old, so a
    /// commit never outlives the cluster's commit window (a file written
    /// slowly for hours shows its content so far to other clients).
    async fn checkpoint(&self, older_than: std::time::Duration) {
        let files: Vec<Arc<AsyncMutex<FileState>>> = lock(&self.files).values().cloned().collect();
        for f in files {
            let Ok(mut st) = f.try_lock() else { continue };
            // A background store that ended after the file's last write
            // is taken here, so its chunks are committed within the
            // window too, not at the next write or the close.
            if let Err(e) = self.collect_stores(&mut st, usize::MAX).await {
                tracing::warn!(ino = st.ino, error = %e, "storing spilled chunks failed");
            }
            if st.pending_since.is_some_and(|t| t.elapsed() >= older_than) {
                if let Err(e) = self.commit(&mut st).await {
                    tracing::warn!(ino = st.ino, error = %e, "checkpoint commit failed");
                }
            }
        }
    }

    pub async fn flush(&self, fh: u64) -> Result<()> {
        if views::is_virtual(fh) {
            return Ok(());
        }
        let st = self.handle(fh)?;
        let mut st = st.lock().await;
        self.commit(&mut st).await
    }

    pub async fn release(&self, fh: u64) -> Result<()> {
        if views::is_virtual(fh) {
            return Ok(());
        }
        let st = lock(&self.handles)
            .remove(&fh)
            .ok_or(ClientError::BadHandle(fh))?;
        let mut guard = st.lock().await;
        let res = self.commit(&mut guard).await;
        guard.opens = guard.opens.saturating_sub(1);
        // With other handles still open, the last one to close re-reads.
        let changed = guard.opens == 0 && std::mem::take(&mut guard.written);
        if guard.opens == 0 {
            let mut files = lock(&self.files);
            if files.get(&guard.ino).is_some_and(|s| Arc::ptr_eq(s, &st)) {
                files.remove(&guard.ino);
            }
        }
        if res.is_ok() && changed && self.keep_tags.load(Ordering::Relaxed) {
            if let Some(fs) = self.me.upgrade() {
                tokio::spawn(fs.refresh_tags(guard.ino));
            }
        }
        res
    }

    /// Re-reads a file's tags after it was written (the mount turns this
    /// on, so a tag editor's changes reach `musicfs search`).
    pub fn keep_tags_current(&self, on: bool) {
        self.keep_tags.store(on, Ordering::Relaxed);
    }

    /// Reads the tags of `ino` anew from its content and stores them, if it
    /// is audio or had tags. Runs after the last close of a changed file;
    /// failures only leave the old tags (logged).
    // Boxed: it closes a handle itself, and `release` starts it.
    fn refresh_tags(self: Arc<Self>, ino: u64) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.refresh_tags_now(ino).await })
    }

    async fn refresh_tags_now(&self, ino: u64) {
        let r = async {
            let attr = self.getattr(ino).await?;
            let old = self.get_tags(ino).await?;
            if attr.size == 0 || attr.size > MAX_TAG_READ {
                return Ok(());
            }
            let fh = self.open(ino).await?;
            let content = async {
                let head = self.read(fh, 0, 12).await?;
                if !crate::audio::is_audio_head(&head) && old.is_none() {
                    return Ok(None);
                }
                let mut all = Vec::with_capacity(attr.size as usize);
                loop {
                    let b = self.read(fh, all.len() as u64, 4 << 20).await?;
                    if b.is_empty() {
                        return Ok::<_, ClientError>(Some(all));
                    }
                    all.extend_from_slice(&b);
                }
            }
            .await;
            self.release(fh).await?;
            let Some(content) = content? else {
                return Ok(());
            };
            let tags = match crate::tags::read_bytes(&content) {
                Ok(mut t) => {
                    t.layout_version = attr.layout_version;
                    t.path = old.map(|o| o.path).unwrap_or_default();
                    Some(t)
                }
                Err(e) => {
                    tracing::debug!(ino, error = %e, "no tags read");
                    None
                }
            };
            self.set_tags(ino, tags).await
        }
        .await;
        if let Err(e) = r {
            tracing::info!(ino, error = %e, "tags not refreshed after a write");
        }
    }

    /// Number of open handles (for tests and metrics).
    pub fn open_handles(&self) -> usize {
        lock(&self.handles).len()
    }

    // ---- music tags ---------------------------------------------------------

    /// Stores the tags of the regular file `ino` (`None`: forgets them).
    pub async fn set_tags(&self, ino: u64, tags: Option<Tags>) -> Result<()> {
        self.cluster
            .propose(group_of_ino(ino), Op::SetTags(SetTagsOp { ino, tags }))
            .await?;
        Ok(())
    }

    /// Stores the tags of many files, one command per group and
    /// `BATCH_CREATES` files, `BATCHES_IN_FLIGHT` commands in flight (the
    /// bulk path, as `create_entries`).
    pub async fn set_tags_many(&self, items: Vec<(u64, Tags)>) -> Result<()> {
        let mut by_group: BTreeMap<u32, Vec<SetTagsOp>> = BTreeMap::new();
        for (ino, tags) in items {
            by_group
                .entry(group_of_ino(ino))
                .or_default()
                .push(SetTagsOp {
                    ino,
                    tags: Some(tags),
                });
        }
        let batches = by_group.into_iter().flat_map(|(g, ops)| {
            ops.chunks(BATCH_CREATES)
                .map(|c| (g, c.to_vec()))
                .collect::<Vec<_>>()
        });
        stream::iter(batches)
            .map(|(g, items)| {
                self.cluster
                    .propose(g, Op::SetTagsBatch(proto::meta::SetTagsBatchOp { items }))
            })
            .buffer_unordered(BATCHES_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// The tags stored for `ino`, if any.
    pub async fn get_tags(&self, ino: u64) -> Result<Option<Tags>> {
        let r = self
            .cluster
            .query(group_of_ino(ino), Q::GetTags(GetTagsQuery { ino }))
            .await?;
        Ok(r.tags)
    }

    /// Tracks whose tags match every term, from every group, in inode
    /// order within each group; at most `limit`.
    pub async fn search(&self, terms: &[TagTerm], limit: usize) -> Result<Vec<TrackHit>> {
        self.tracks_of_every_group(limit, |after, limit| {
            Q::Search(SearchQuery {
                terms: terms.to_vec(),
                after_ino: after,
                limit,
            })
        })
        .await
    }

    /// Tracks from every group, each group's pages followed by their
    /// `next_ino` cursor (`query(after, page_limit)` makes one page's
    /// query), at most `limit`.
    async fn tracks_of_every_group(
        &self,
        limit: usize,
        query: impl Fn(u64, u32) -> Q,
    ) -> Result<Vec<TrackHit>> {
        let query = &query;
        let per_group =
            futures::future::try_join_all((0..self.cluster.group_count()).map(|g| async move {
                let mut hits = Vec::new();
                let mut after = 0;
                loop {
                    let page = (limit - hits.len()).min(1000) as u32;
                    let r = self.cluster.query(g, query(after, page)).await?;
                    hits.extend(r.tracks);
                    if !r.more || hits.len() >= limit || r.next_ino <= after {
                        return Ok::<_, ClientError>(hits);
                    }
                    after = r.next_ino;
                }
            }))
            .await?;
        let mut all: Vec<TrackHit> = per_group.into_iter().flatten().collect();
        all.truncate(limit);
        Ok(all)
    }

    /// Distinct values of an indexed tag field over the whole cluster, in
    /// normalized order (`TagValue::key`), after `after`, at most `limit`
    /// (fewer only at the end). Values spelled alike by several groups
    /// come once, with their counts added.
    pub async fn tag_values(
        &self,
        field: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<TagValue>, bool)> {
        let limit = limit.clamp(1, 1000);
        let groups = self.cluster.group_count();
        let pages = futures::future::try_join_all((0..groups).map(|g| {
            self.cluster.query(
                g,
                Q::TagValues(TagValuesQuery {
                    field: field.to_string(),
                    after: after.map(Bytes::copy_from_slice),
                    limit: limit as u32,
                }),
            )
        }))
        .await?;
        // Every group answered its first `limit` values after the cursor,
        // so the merged first `limit` are complete; a group that stopped
        // early bounds what is certain.
        let mut merged: BTreeMap<Bytes, TagValue> = BTreeMap::new();
        let mut bound: Option<Bytes> = None;
        for r in pages {
            if r.more {
                if let Some(last) = r.values.last() {
                    if bound.as_ref().is_none_or(|b| last.key < *b) {
                        bound = Some(last.key.clone());
                    }
                }
            }
            for v in r.values {
                match merged.get_mut(&v.key) {
                    Some(m) => m.count += v.count,
                    None => {
                        merged.insert(v.key.clone(), v);
                    }
                }
            }
        }
        let mut out: Vec<TagValue> = merged
            .into_values()
            .filter(|v| bound.as_ref().is_none_or(|b| v.key <= *b))
            .collect();
        let more = bound.is_some() || out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Whether any track's indexed `field` equals `value` (one page of at
    /// most one track from each group).
    pub async fn tag_exists(&self, field: &str, value: &str) -> Result<bool> {
        let hits = self
            .tracks_of_every_group(1, |after, limit| {
                Q::TagTracks(TagTracksQuery {
                    field: field.to_string(),
                    value: value.to_string(),
                    after_ino: after,
                    limit,
                })
            })
            .await?;
        Ok(!hits.is_empty())
    }

    /// Every track whose indexed `field` equals `value`, from every group.
    pub async fn tag_tracks(&self, field: &str, value: &str) -> Result<Vec<TrackHit>> {
        self.tracks_of_every_group(usize::MAX, |after, limit| {
            Q::TagTracks(TagTracksQuery {
                field: field.to_string(),
                value: value.to_string(),
                after_ino: after,
                limit,
            })
        })
        .await
    }

    /// Events of `group`'s change feed after `after_seq` (`QueryResult`'s
    /// `changes`, `more`, `next_seq` and `oldest_seq`).
    pub async fn changes(
        &self,
        group: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<proto::meta::QueryResult> {
        self.cluster
            .query(
                group,
                Q::Changes(proto::meta::ChangesQuery { after_seq, limit }),
            )
            .await
    }

    /// The parent of directory `ino`.
    pub async fn parent_of(&self, ino: u64) -> Result<u64> {
        let r = self
            .cluster
            .query(group_of_ino(ino), Q::GetAttr(GetAttrQuery { ino }))
            .await?;
        Ok(r.parent)
    }

    /// Builds the tag index of every group that lacks one (tags stored
    /// before the index existed). Groups whose index is complete answer
    /// at once.
    pub async fn reindex_tags(&self) -> Result<()> {
        for g in 0..self.cluster.group_count() {
            let mut after = 0;
            loop {
                let r = self
                    .cluster
                    .propose(
                        g,
                        Op::IndexTags(IndexTagsOp {
                            after_ino: after,
                            limit: 1000,
                        }),
                    )
                    .await?;
                if r.done {
                    break;
                }
                after = r.next_ino;
            }
        }
        Ok(())
    }

    // ---- path helpers for tools and tests ----------------------------------

    /// Resolves a `/`-separated path from the root.
    pub async fn resolve(&self, path: &str) -> Result<Attr> {
        let mut attr = self.getattr(proto::ROOT_INO).await?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            attr = self.lookup(attr.ino, comp.as_bytes()).await?;
        }
        Ok(attr)
    }

    /// The chunks of a file's committed layout and where the chunk index
    /// says each is stored (for tools and tests).
    pub async fn chunk_locations(&self, path: &str) -> Result<Vec<(ChunkId, Vec<u64>)>> {
        let attr = self.resolve(path).await?;
        let st = self.load(attr.ino).await?;
        let ids: BTreeSet<ChunkId> = st.extents.iter().filter_map(layout::extent_chunk).collect();
        let (infos, _) = chunk_info(&self.cluster, ids.into_iter().collect()).await?;
        let mut v: Vec<(ChunkId, Vec<u64>)> = infos
            .into_iter()
            .filter_map(|i| Some((ChunkId::try_from(&i.chunk_id[..]).ok()?, i.locations)))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Reads a whole file by path.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out, |_, _| {}).await?;
        Ok(out)
    }

    /// Copies a file by path into `dst`, 4 MiB at a time (memory stays
    /// bounded whatever the file's size); `progress(done, size)` follows.
    /// Returns the bytes copied.
    pub async fn read_file_to(
        &self,
        path: &str,
        dst: &mut (impl std::io::Write + Send),
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<u64> {
        let attr = self.resolve(path).await?;
        let fh = self.open(attr.ino).await?;
        let res = async {
            let mut done = 0u64;
            loop {
                let b = self.read(fh, done, 4 << 20).await?;
                if b.is_empty() {
                    return Ok(done);
                }
                dst.write_all(&b)
                    .map_err(|e| ClientError::Local(e.to_string()))?;
                done += b.len() as u64;
                progress(done, attr.size.max(done));
            }
        }
        .await;
        self.release(fh).await?;
        res
    }

    /// Creates or replaces a regular file by path with `data`.
    pub async fn write_file(&self, path: &str, data: &[u8], perm: u32) -> Result<Attr> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.resolve(dir).await?;
        self.write_at(parent.ino, name.as_bytes(), data, perm).await
    }

    /// Creates or replaces the regular file `name` in `parent` with `data`.
    pub async fn write_at(&self, parent: u64, name: &[u8], data: &[u8], perm: u32) -> Result<Attr> {
        self.write_from(parent, name, &mut &data[..], perm, |_| {})
            .await
    }

    /// Creates or replaces a regular file by path with what `src` reads,
    /// 1 MiB at a time, so memory stays bounded; `progress(done)` follows.
    pub async fn write_file_from(
        &self,
        path: &str,
        src: &mut (impl std::io::Read + Send),
        perm: u32,
        progress: impl FnMut(u64) + Send,
    ) -> Result<Attr> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.resolve(dir).await?;
        self.write_from(parent.ino, name.as_bytes(), src, perm, progress)
            .await
    }

    async fn write_from(
        &self,
        parent: u64,
        name: &[u8],
        src: &mut (impl std::io::Read + Send),
        perm: u32,
        progress: impl FnMut(u64) + Send,
    ) -> Result<Attr> {
        let attr = match self.lookup(parent, name).await {
            Ok(a) => a,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                self.create(parent, name, FileKind::Regular, perm, 0, 0, 0, b"")
                    .await?
            }
            Err(e) => return Err(e),
        };
        self.replace_content(attr.ino, attr.size, src, progress)
            .await
    }

    /// Replaces the content of the regular file `ino` (now `size` bytes
    /// long) with what `src` reads, 1 MiB at a time, so memory stays
    /// bounded; `progress(done)` follows. Returns the new attributes.
    ///
    /// The new content is written over the old and the file cut to its
    /// length last, not emptied first: chunks the old and new content share
    /// (a re-tagged track's audio) stay referenced throughout, so the chunk
    /// index vouches for them and they are not sent again.
    pub async fn replace_content(
        &self,
        ino: u64,
        size: u64,
        src: &mut (impl std::io::Read + Send),
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<Attr> {
        let fh = self.open(ino).await?;
        let res = async {
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            loop {
                // Fill the buffer: short reads (pipes) would make small writes.
                let mut n = 0;
                while n < buf.len() {
                    match src.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(ClientError::Local(e.to_string())),
                    }
                }
                if n == 0 {
                    break;
                }
                self.write(fh, done, &buf[..n]).await?;
                done += n as u64;
                progress(done);
            }
            self.flush(fh).await?;
            Ok(done)
        }
        .await;
        let rel = self.release(fh).await;
        let done = res?;
        rel?;
        if done < size {
            return self
                .setattr(
                    ino,
                    SetAttrFields {
                        size: Some(done),
                        ..Default::default()
                    },
                )
                .await;
        }
        self.getattr(ino).await
    }

    /// Largest file `tag_set` edits (it holds the file in memory).
    pub const MAX_TAG_EDIT: u64 = 1 << 30;

    /// Writes `sets` (`field`, `value`) into the tags of the track at
    /// `path`: the file is rewritten in its own format with the new tags
    /// in front of its unchanged audio, whose chunks the cluster already
    /// holds and is not sent again; then the stored tags are updated.
    /// Returns the tags as stored and the chunk bytes sent.
    pub async fn tag_set(&self, path: &str, sets: &[(String, String)]) -> Result<(Tags, u64)> {
        let attr = self.resolve(path).await?;
        if FileKind::try_from(attr.kind) != Ok(FileKind::Regular) {
            return Err(ClientError::Invalid(format!(
                "{path} is not a regular file"
            )));
        }
        if attr.size > Self::MAX_TAG_EDIT {
            return Err(ClientError::Invalid(format!(
                "{path} is {} bytes; tags are edited in memory up to {} bytes",
                attr.size,
                Self::MAX_TAG_EDIT
            )));
        }
        let old = self.read_file(path).await?;
        let new = crate::tags::edit(old, sets)
            .map_err(|e| ClientError::Invalid(format!("{path}: {e}")))?;
        let mut tags = crate::tags::read_bytes(&new)
            .map_err(|e| ClientError::Invalid(format!("{path}: re-reading the tags: {e}")))?;
        let sent_before = self.cluster.chunk_bytes_sent();
        let attr = self
            .replace_content(attr.ino, attr.size, &mut &new[..], |_| {})
            .await?;
        tags.layout_version = attr.layout_version;
        tags.path = path.to_string();
        self.set_tags(attr.ino, Some(tags.clone())).await?;
        Ok((tags, self.cluster.chunk_bytes_sent() - sent_before))
    }

    pub async fn remove_path(&self, path: &str) -> Result<()> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.resolve(dir).await?;
        let a = self.lookup(parent.ino, name.as_bytes()).await?;
        self.remove(
            parent.ino,
            name.as_bytes(),
            a.kind == FileKind::Directory as i32,
        )
        .await
    }
}
