//! The on-disk chunk cache of a mount (`--disk-cache-dir`). Chunks are
//! content-addressed, so a cached chunk can never be stale: a file's new
//! version names new chunk ids, and every chunk read back is checked
//! against its id (a torn or damaged file is a miss and is removed).
//!
//! Files live at `DIR/<2 hex>/<32 hex>`. The cache is bounded in bytes and
//! evicts the least recently used chunk first; the order survives a remount
//! through the files' modification times, which a hit refreshes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use proto::ChunkId;

#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("disk cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk cache {0} is in use by another mount (each mount needs its own directory)")]
    InUse(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskCacheError + '_ {
    move |source| DiskCacheError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Default)]
struct Index {
    used: u64,
    tick: u64,
    /// id → (bytes, tick of last use)
    map: HashMap<ChunkId, (u64, u64)>,
    order: BTreeMap<u64, ChunkId>,
}

impl Index {
    fn touch(&mut self, id: ChunkId) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let Some((_, t)) = self.map.get_mut(&id) else {
            return false;
        };
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, id);
        true
    }

    fn add(&mut self, id: ChunkId, len: u64) {
        if self.touch(id) {
            return;
        }
        self.tick += 1;
        self.used += len;
        self.map.insert(id, (len, self.tick));
        self.order.insert(self.tick, id);
    }

    fn remove(&mut self, id: &ChunkId) {
        if let Some((len, t)) = self.map.remove(id) {
            self.order.remove(&t);
            self.used -= len;
        }
    }
}

pub struct DiskCache {
    dir: PathBuf,
    cap: u64,
    index: Mutex<Index>,
    /// Holds the directory's lock for as long as the cache is open.
    _lock: File,
}

fn lock(m: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, holding at most `cap` bytes.
    /// Chunks left by an earlier mount are kept, oldest use evicted first.
    pub fn open(dir: &Path, cap: u64) -> Result<DiskCache, DiskCacheError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(".lock");
        let lock_file = File::create(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DiskCacheError::InUse(dir.display().to_string()));
        }
        let mut found: Vec<(SystemTime, ChunkId, u64)> = Vec::new();
        for sub in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let sub = sub.map_err(io_err(dir))?;
            if !sub.file_type().map_err(io_err(dir))?.is_dir() {
                continue;
            }
            let sub_path = sub.path();
            for f in std::fs::read_dir(&sub_path).map_err(io_err(&sub_path))? {
                let f = f.map_err(io_err(&sub_path))?;
                let name = f.file_name();
                let id = name.to_str().and_then(ChunkId::from_hex);
                match (id, f.metadata()) {
                    (Some(id), Ok(m)) if m.is_file() => {
                        found.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), id, m.len()))
                    }
                    // A write cut short (a temporary file) or a stranger.
                    _ => {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            cap,
            index: Mutex::new(Index::default()),
            _lock: lock_file,
        };
        {
            let mut ix = lock(&cache.index);
            for (_, id, len) in found {
                ix.add(id, len);
            }
        }
        cache.evict();
        crate::metrics::disk_cache_bytes(cache.used());
        Ok(cache)
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The chunk, if cached and intact. Blocking: call off the async
    /// runtime's workers.
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        if !lock(&self.index).touch(*id) {
            return None;
        }
        let path = self.path_of(id);
        match std::fs::read(&path) {
            Ok(data) if id.verify(&data) => {
                // Keeps the use order across remounts.
                if let Ok(f) = File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(Bytes::from(data))
            }
            Ok(_) => {
                tracing::warn!(%id, path = %path.display(), "disk cache file damaged: removed");
                self.drop_chunk(id);
                None
            }
            Err(_) => {
                // Evicted meanwhile, or removed by hand.
                self.drop_chunk(id);
                None
            }
        }
    }

    /// Stores a chunk (written whole or not at all), then evicts down to
    /// the limit. Blocking. A failure (a full disk) only costs the cache.
    pub fn put(&self, id: &ChunkId, data: &[u8]) {
        if data.len() as u64 > self.cap || lock(&self.index).map.contains_key(id) {
            return;
        }
        let path = self.path_of(id);
        let tmp = path.with_extension("tmp");
        let res = (|| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        })();
        match res {
            Ok(()) => {
                lock(&self.index).add(*id, data.len() as u64);
                self.evict();
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!(%id, error = %e, "disk cache write failed");
            }
        }
        crate::metrics::disk_cache_bytes(self.used());
    }

    fn drop_chunk(&self, id: &ChunkId) {
        lock(&self.index).remove(id);
        let _ = std::fs::remove_file(self.path_of(id));
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut ix = lock(&self.index);
                if ix.used <= self.cap {
                    return;
                }
                let Some((_, id)) = ix.order.pop_first() else {
                    return;
                };
                if let Some((len, _)) = ix.map.remove(&id) {
                    ix.used -= len;
                }
                id
            };
            let _ = std::fs::remove_file(self.path_of(&victim));
        }
    }

    /// Bytes the cache holds.
    pub fn used(&self) -> u64 {
        lock(&self.index).used
    }

    /// Chunks the cache holds.
    pub fn len(&self) -> usize {
        lock(&self.index).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let data = vec![n; len];
        (ChunkId::of(&data), data)
    }

    #[test]
    fn evicts_least_recently_used_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, da) = chunk(1, 400);
        let (b, db) = chunk(2, 400);
        let (c, dc) = chunk(3, 400);
        {
            let cache = DiskCache::open(dir.path(), 1000).expect("open");
            cache.put(&a, &da);
            cache.put(&b, &db);
            assert_eq!(cache.get(&a).as_deref(), Some(&da[..]));
            cache.put(&c, &dc);
            assert!(cache.get(&b).is_none(), "b was least recently used");
            assert_eq!(cache.used(), 800);
            assert!(
                DiskCache::open(dir.path(), 1000).is_err(),
                "a second mount must not share the directory"
            );
        }
        let cache = DiskCache::open(dir.path(), 1000).expect("reopen");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&a).as_deref(), Some(&da[..]));
        assert_eq!(cache.get(&c).as_deref(), Some(&dc[..]));
        // A smaller limit on reopen evicts down to it.
        drop(cache);
        let cache = DiskCache::open(dir.path(), 500).expect("reopen smaller");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_damaged_file_is_a_miss_and_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 20).expect("open");
        let (a, da) = chunk(7, 1000);
        cache.put(&a, &da);
        let path = cache.path_of(&a);
        std::fs::write(&path, b"not the chunk").expect("damage");
        assert!(cache.get(&a).is_none());
        assert!(!path.exists(), "the damaged file is removed");
        assert_eq!(cache.used(), 0);
        // Stored again, it reads back.
        cache.put(&a, &da);
        assert_eq!(cache.get(&a).as_deref(), Some(&da[..]));
    }
}
