//! Content-addressed chunk store on local disk.
//!
//! One file per chunk in a two-level directory tree (`ab/cd/abcd…`), so no
//! directory holds more than a few hundred files even at tens of millions of
//! chunks. A write goes to a temporary file (with `O_DIRECT`, see
//! `aligned`), is fsynced, renamed into place and the directory fsynced: a
//! chunk is either absent or whole after a crash.
//! Every read re-hashes the bytes, so bit rot is reported, never served.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use proto::ChunkId;

/// Largest chunk a node accepts (FastCDC's maximum is 4 MiB; leave room).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// Space kept free on the data disk; a put that would cross it is refused.
pub const DEFAULT_RESERVE_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    #[error("chunk {id} is corrupt on disk (hash mismatch), {path}")]
    Corrupt { id: ChunkId, path: String },
    #[error("chunk data does not hash to {0}")]
    HashMismatch(ChunkId),
    #[error("chunk of {0} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("disk full: {free} bytes free, {reserve} kept in reserve")]
    NoSpace { free: u64, reserve: u64 },
    #[error("chunk store I/O at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChunkError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return ChunkError::NoSpace {
                free: 0,
                reserve: 0,
            };
        }
        ChunkError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub struct ChunkStore {
    root: PathBuf,
    tmp: PathBuf,
    /// Corrupt chunks moved aside (kept for inspection, never served).
    bad: PathBuf,
    reserve: u64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    tmp_seq: AtomicU64,
    /// Put, delete and quarantine of one chunk exclude each other (striped
    /// by id), so a delete never removes a copy a put just confirmed.
    locks: Vec<std::sync::Mutex<()>>,
    /// Leaf directories whose entries in their parents are known durable:
    /// a put into any other one fsyncs its parents before it answers,
    /// even when another put created the directory a moment earlier and
    /// has not fsynced them yet.
    durable_dirs: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

const LOCK_STRIPES: usize = 256;

impl ChunkStore {
    /// Opens (creating if needed) a store under `dir`, counting what it holds.
    pub fn open(dir: &Path, reserve: u64) -> Result<Self, ChunkError> {
        let root = dir.join("chunks");
        let tmp = dir.join("chunks.tmp");
        let bad = dir.join("chunks.bad");
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        // Leftover temporaries are writes that never completed.
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let store = ChunkStore {
            root,
            tmp,
            bad,
            reserve,
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            locks: (0..LOCK_STRIPES)
                .map(|_| std::sync::Mutex::new(()))
                .collect(),
            durable_dirs: std::sync::Mutex::new(std::collections::HashSet::new()),
        };
        store.count()?;
        Ok(store)
    }

    fn count(&self) -> Result<(), ChunkError> {
        let (mut n, mut b) = (0u64, 0u64);
        for l1 in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let l1 = l1.map_err(io_err(&self.root))?.path();
            if !l1.is_dir() {
                continue;
            }
            for l2 in fs::read_dir(&l1).map_err(io_err(&l1))? {
                let l2 = l2.map_err(io_err(&l1))?.path();
                if !l2.is_dir() {
                    continue;
                }
                for f in fs::read_dir(&l2).map_err(io_err(&l2))? {
                    let f = f.map_err(io_err(&l2))?;
                    n += 1;
                    b += f.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        self.chunks.store(n, Ordering::Relaxed);
        self.bytes.store(b, Ordering::Relaxed);
        Ok(())
    }

    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn has(&self, id: &ChunkId) -> bool {
        self.path_of(id).exists()
    }

    /// (free, total) bytes of the file system holding the store.
    pub fn disk_space(&self) -> Result<(u64, u64), ChunkError> {
        disk_space(&self.root).map_err(io_err(&self.root))
    }

    /// Stores `data` under `id` durably. Returns false if it was already held.
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool, ChunkError> {
        if data.len() > MAX_CHUNK_BYTES {
            return Err(ChunkError::TooLarge(data.len()));
        }
        if !id.verify(data) {
            return Err(ChunkError::HashMismatch(*id));
        }
        let path = self.path_of(id);
        let _guard = self.lock(id);
        if self.refresh_locked(id)? {
            return Ok(false);
        }
        let (free, _) = self.disk_space()?;
        if free < self.reserve + data.len() as u64 {
            return Err(ChunkError::NoSpace {
                free,
                reserve: self.reserve,
            });
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{seq}", id.to_hex(), std::process::id()));
        let result = (|| {
            let (f, direct) = crate::aligned::create_new(&tmp).map_err(io_err(&tmp))?;
            crate::aligned::write_chunk(&f, direct, data).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            let dir = path.parent().unwrap_or(&self.root);
            let known = self
                .durable_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(dir);
            if !known {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            fsync_dir(dir).map_err(io_err(dir))?;
            if !known {
                // The directory (perhaps just made, here or by a put racing
                // this one) must be durable in its parents too.
                if let Some(p) = dir.parent() {
                    fsync_dir(p).map_err(io_err(p))?;
                    if let Some(pp) = p.parent() {
                        fsync_dir(pp).map_err(io_err(pp))?;
                    }
                }
                self.durable_dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(dir.to_path_buf());
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Reads a chunk and checks its hash.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>, ChunkError> {
        let path = self.path_of(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkError::NotFound(*id)),
            Err(e) => return Err(io_err(&path)(e)),
        };
        // One pread of the whole file into a buffer of its size.
        let len = f.metadata().map_err(io_err(&path))?.len();
        if len > MAX_CHUNK_BYTES as u64 {
            return Err(ChunkError::Corrupt {
                id: *id,
                path: path.display().to_string(),
            });
        }
        // Read into spare capacity: no zeroing of a buffer about to be filled.
        let mut data = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(&f, len), &mut data).map_err(io_err(&path))?;
        if data.len() as u64 != len {
            return Err(io_err(&path)(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunk file shorter than its length",
            )));
        }
        if !id.verify(&data) {
            return Err(ChunkError::Corrupt {
                id: *id,
                path: path.display().to_string(),
            });
        }
        Ok(data)
    }
}

impl ChunkStore {
    /// Moves a chunk's file aside to `chunks.bad/` (a corrupt copy): it is
    /// no longer served, and the node reports it missing.
    pub fn quarantine(&self, id: &ChunkId) -> Result<(), ChunkError> {
        let _guard = self.lock(id);
        self.quarantine_locked(id)
    }

    /// Whether the chunk is held intact; if so its file counts as written
    /// now (garbage collection keeps files written after its horizon: a
    /// commit or a repair may be about to name this copy). A rotten copy
    /// is moved aside and reported absent.
    pub fn refresh(&self, id: &ChunkId) -> Result<bool, ChunkError> {
        let _guard = self.lock(id);
        self.refresh_locked(id)
    }

    fn refresh_locked(&self, id: &ChunkId) -> Result<bool, ChunkError> {
        match self.get(id) {
            Ok(_) => {
                self.touch(&self.path_of(id))?;
                Ok(true)
            }
            Err(ChunkError::Corrupt { .. }) => {
                self.quarantine_locked(id)?;
                Ok(false)
            }
            Err(ChunkError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn lock(&self, id: &ChunkId) -> std::sync::MutexGuard<'_, ()> {
        self.locks[usize::from(id.0[15]) % LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, path: &Path) -> Result<(), ChunkError> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_modified(std::time::SystemTime::now())
            .map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))
    }

    /// When the chunk's file was last written or put again (ms since 1970).
    pub fn written_ms(&self, id: &ChunkId) -> Option<u64> {
        let m = fs::metadata(self.path_of(id)).ok()?.modified().ok()?;
        Some(
            m.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        )
    }

    /// Deletes a chunk if its file was last written before `older_than_ms`
    /// (garbage collection); returns the bytes freed, None if kept or absent.
    pub fn delete_older(
        &self,
        id: &ChunkId,
        older_than_ms: u64,
    ) -> Result<Option<u64>, ChunkError> {
        let _guard = self.lock(id);
        let path = self.path_of(id);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let written = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(u64::MAX);
        if written >= older_than_ms {
            return Ok(None);
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.chunks.fetch_sub(1, Ordering::Relaxed);
        let len = meta.len().min(self.bytes.load(Ordering::Relaxed));
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(Some(meta.len()))
    }

    fn quarantine_locked(&self, id: &ChunkId) -> Result<(), ChunkError> {
        // The copy may have been replaced by a good one since it was found
        // rotten (a put or a repair): check again under the lock.
        if self.get(id).is_ok() {
            return Ok(());
        }
        let path = self.path_of(id);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        fs::create_dir_all(&self.bad).map_err(io_err(&self.bad))?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let to = self
            .bad
            .join(format!("{}.{}.{seq}", id.to_hex(), std::process::id()));
        match fs::rename(&path, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.chunks.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(
            len.min(self.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        tracing::error!(%id, moved_to = %to.display(), "corrupt chunk moved aside");
        Ok(())
    }

    /// The chunks (id and size) in leaf directory `leaf` (the first two
    /// bytes of their ids): a scrub walks the 65,536 leaves in order.
    /// The chunks of the 256 leaves under top-level directory `top`, in
    /// leaf order.
    pub fn top(&self, top: u8) -> Result<Vec<(ChunkId, u64)>, ChunkError> {
        if !self.root.join(format!("{top:02x}")).exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for b in 0..=u8::MAX {
            out.extend(self.leaf(u16::from_be_bytes([top, b]))?);
        }
        Ok(out)
    }

    pub fn leaf(&self, leaf: u16) -> Result<Vec<(ChunkId, u64)>, ChunkError> {
        let [a, b] = leaf.to_be_bytes();
        let dir = self.root.join(format!("{a:02x}")).join(format!("{b:02x}"));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_err(&dir))?;
            let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) else {
                continue;
            };
            out.push((id, e.metadata().map(|m| m.len()).unwrap_or(0)));
        }
        out.sort();
        Ok(out)
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// (free, total) bytes of the file system at `path`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_has_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let data = b"some chunk bytes".to_vec();
        let id = ChunkId::of(&data);
        assert!(!store.has(&id));
        assert!(store.put(&id, &data).unwrap());
        assert!(!store.put(&id, &data).unwrap(), "second put is a no-op");
        assert!(store.has(&id));
        assert_eq!(store.get(&id).unwrap(), data);
        assert_eq!(store.chunk_count(), 1);

        let wrong = ChunkId::of(b"other");
        assert!(matches!(
            store.put(&wrong, &data),
            Err(ChunkError::HashMismatch(_))
        ));
        assert!(matches!(store.get(&wrong), Err(ChunkError::NotFound(_))));

        // Flip a byte on disk: the read must fail rather than return it.
        let p = store.path_of(&id);
        let mut bytes = fs::read(&p).unwrap();
        bytes[0] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        assert!(matches!(store.get(&id), Err(ChunkError::Corrupt { .. })));

        // Reopening counts what is on disk.
        drop(store);
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.chunk_count(), 1);
    }

    #[test]
    fn delete_keeps_chunks_written_after_the_horizon() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let data = b"garbage?".to_vec();
        let id = ChunkId::of(&data);
        store.put(&id, &data).unwrap();
        let written = store.written_ms(&id).unwrap();
        assert_eq!(store.delete_older(&id, written).unwrap(), None, "kept");
        assert!(store.has(&id));
        // A put of a chunk already held counts as a new write.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(store.path_of(&id))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(store.written_ms(&id), Some(1_000_000));
        assert!(!store.put(&id, &data).unwrap());
        assert!(store.written_ms(&id).unwrap() >= written);
        assert_eq!(store.delete_older(&id, written).unwrap(), None);
        assert_eq!(
            store.delete_older(&id, u64::MAX).unwrap(),
            Some(data.len() as u64)
        );
        assert!(!store.has(&id));
        assert_eq!(store.chunk_count(), 0);
        assert_eq!(store.delete_older(&id, u64::MAX).unwrap(), None);
    }

    #[test]
    fn refuses_writes_inside_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), u64::MAX / 2).unwrap();
        let data = b"x".to_vec();
        let err = store.put(&ChunkId::of(&data), &data).unwrap_err();
        assert!(matches!(err, ChunkError::NoSpace { .. }), "{err}");
        assert!(err.to_string().contains("disk full"));
    }
}
