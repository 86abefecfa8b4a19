//! The node's one RocksDB: every group's log, Raft state and state machine,
//! keyed by group id. A single long-lived flusher thread makes appends
//! durable in batches: one WAL fsync covers every group that appended since
//! the last one, so fsyncs grow with time, not with groups.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::TypeConfig;

/// Raft log entries: `[group u32][index u64]` → `raft.Entry`.
pub const CF_LOG: &str = "log";
/// Raft state per group: vote, committed, purged, applied, membership, snapshot meta.
pub const CF_RAFT: &str = "raft";
/// State machine data; keys start with the group id.
pub const CF_SM: &str = "sm";
/// Block cache of the state-machine column family.
const SM_CACHE_BYTES: usize = 128 << 20;
/// Node-wide settings: node id, cluster id.
pub const CF_NODE: &str = "node";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Rocks {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("flusher thread stopped")]
    FlusherGone,
}

type Flush = openraft::storage::IOFlushed<TypeConfig>;

pub struct Store {
    pub db: Arc<DB>,
    path: PathBuf,
    flush_tx: Option<mpsc::Sender<Flush>>,
    flusher: Option<thread::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Stop the flusher and wait for it to release the database, so the
        // database is closed before the process exits.
        self.flush_tx.take();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

/// Memory for memtables, all column families together.
const MEMTABLE_BYTES: usize = 128 << 20;

impl Store {
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        // A column family written rarely (votes, membership) would otherwise
        // keep every WAL file since its last flush alive: past this total,
        // RocksDB flushes it so old WAL files can go.
        opts.set_max_total_wal_size(128 << 20);
        // Every append is fsynced before it is acknowledged, so only the last
        // record of a log can be torn by a crash. A corrupt record before
        // others is damage, and dropping every later record with it (the
        // default, point-in-time recovery) would silently lose acknowledged
        // entries: refuse to open instead, naming the corruption.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        // All memtables of all column families together: without a cap each
        // of the four may hold two 64 MiB memtables.
        opts.set_db_write_buffer_size(MEMTABLE_BYTES);
        // State-machine reads are point lookups, many for keys that do not
        // exist (free names, absent locks): bloom filters answer those
        // without touching data blocks. Index and filter blocks live in one
        // bounded cache, so memory stays flat as the namespace grows.
        let cache = rocksdb::Cache::new_lru_cache(SM_CACHE_BYTES);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_cache_index_and_filter_blocks_with_high_priority(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // Partitioned: a lookup loads one 4 KiB filter and index partition,
        // not the whole filter of a 64 MiB file (about 1 MiB, read and
        // checksummed again each time data blocks pushed it out of the
        // cache: that was most of the CPU past a million files). Only the
        // small top levels stay pinned.
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
        table.set_optimize_filters_for_memory(true);
        let mut sm = Options::default();
        sm.set_block_based_table_factory(&table);
        sm.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = [CF_LOG, CF_RAFT, CF_SM, CF_NODE].into_iter().map(|n| {
            let o = if n == CF_SM {
                sm.clone()
            } else {
                Options::default()
            };
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| StoreError::Rocks {
            path: path.display().to_string(),
            source,
        })?;
        let db = Arc::new(db);
        let (flush_tx, flush_rx) = mpsc::channel::<Flush>();
        let fdb = db.clone();
        let flusher = thread::Builder::new()
            .name("raft-flusher".into())
            .spawn(move || flusher(fdb, flush_rx))
            .map_err(|_| StoreError::FlusherGone)?;
        Ok(Arc::new(Store {
            db,
            path: path.to_path_buf(),
            flush_tx: Some(flush_tx),
            flusher: Some(flusher),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created at open; a missing one is a bug.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub(crate) fn rocks_err(&self, source: rocksdb::Error) -> StoreError {
        self.err(source)
    }

    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Writes a batch without waiting for the disk.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    /// Writes a batch and fsyncs the WAL before returning.
    pub fn write_sync(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(cf), key).map_err(|e| self.err(e))
    }

    /// Hands `cb` to the flusher; it fires once the WAL is on disk.
    pub fn flush_then(&self, cb: Flush) {
        let Some(tx) = &self.flush_tx else {
            cb.io_completed(Err(std::io::Error::other("raft flusher stopped")));
            return;
        };
        if let Err(mpsc::SendError(cb)) = tx.send(cb) {
            cb.io_completed(Err(std::io::Error::other("raft flusher stopped")));
        }
    }

    /// Node-wide setting.
    pub fn node_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(CF_NODE, key.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn node_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_NODE), key.as_bytes(), value.as_bytes());
        self.write_sync(b)
    }

    /// Approximate bytes on disk of the whole store.
    /// Approximate bytes on disk of one group's log and state (files only,
    /// not what is still in memory).
    pub fn group_size(&self, group: u32) -> u64 {
        let start = group.to_be_bytes();
        let end = (u64::from(group) + 1).to_be_bytes();
        // Keys start with the 4-byte group id; the end bound is the next id.
        let end = &end[4..];
        let range = [rocksdb::Range::new(&start, end)];
        [CF_SM, CF_LOG]
            .iter()
            .map(|cf| {
                self.db
                    .get_approximate_sizes_cf(self.cf(cf), &range)
                    .iter()
                    .sum::<u64>()
            })
            .sum()
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db
            .property_int_value(rocksdb::properties::TOTAL_SST_FILES_SIZE)
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

fn flusher(db: Arc<DB>, rx: mpsc::Receiver<Flush>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let res = db.flush_wal(true);
        for cb in waiting {
            cb.io_completed(match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(format!("WAL fsync failed: {e}"))),
            });
        }
    }
}

pub(crate) fn group_key(group: u32, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + suffix.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(suffix);
    k
}

pub(crate) fn log_key(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}
