//! Snapshot files: a group's state-machine keys streamed from a RocksDB
//! snapshot into a file, and loaded back in bounded batches. Neither side
//! ever holds a whole snapshot in memory.
//!
//! Format: `MFSSNAP1`, then records `[u32 key len][key][u32 value len][value]`,
//! then a record with key length `u32::MAX` and the record count as value.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rocksdb::WriteBatch;

use crate::store::{Store, CF_SM};

const MAGIC: &[u8; 8] = b"MFSSNAP1";
const END: u32 = u32::MAX;
/// Bytes of records loaded per write batch when installing.
const LOAD_BATCH_BYTES: usize = 4 << 20;

/// The data of a snapshot: an open file (it stays readable while a newer
/// snapshot replaces it on disk).
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl SnapshotFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            file: File::open(path)?,
        })
    }
}

pub fn group_dir(root: &Path, group: u32) -> PathBuf {
    root.join(format!("g{group}"))
}

/// Writes every state-machine key of `group`, as of a consistent RocksDB
/// snapshot, to `path` (via a temporary file, fsynced, renamed).
pub fn write_snapshot(
    store: &Store,
    db_snap: &rocksdb::Snapshot<'_>,
    group: u32,
    path: &Path,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    w.write_all(MAGIC)?;
    let prefix = group.to_be_bytes();
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_snapshot(db_snap);
    ro.set_iterate_lower_bound(prefix.to_vec());
    ro.set_iterate_upper_bound((group as u64 + 1).to_be_bytes()[4..].to_vec());
    let mut count = 0u64;
    let it = store
        .db
        .iterator_cf_opt(store.cf(CF_SM), ro, rocksdb::IteratorMode::Start);
    for item in it {
        let (k, v) = item.map_err(io::Error::other)?;
        if !k.starts_with(&prefix) {
            break;
        }
        w.write_all(&(k.len() as u32).to_le_bytes())?;
        w.write_all(&k)?;
        w.write_all(&(v.len() as u32).to_le_bytes())?;
        w.write_all(&v)?;
        count += 1;
    }
    w.write_all(&END.to_le_bytes())?;
    w.write_all(&count.to_le_bytes())?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(count)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {msg}"))
}

/// Replaces `group`'s state-machine keys with the snapshot's, in batches.
/// `finish` is added to the last batch (applied id, membership, clearing
/// the install marker), which is written with fsync.
pub fn load_snapshot(
    store: &Store,
    group: u32,
    path: &Path,
    finish: WriteBatch,
) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("wrong magic"));
    }
    let cf = store.cf(CF_SM);
    let prefix = group.to_be_bytes();
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(
        cf,
        prefix.to_vec(),
        ((group as u64) + 1).to_be_bytes()[4..].to_vec(),
    );
    if group == u32::MAX {
        return Err(bad("group id out of range"));
    }
    let mut bytes = 0usize;
    let mut count = 0u64;
    loop {
        let klen = read_u32(&mut r)?;
        if klen == END {
            let mut c = [0u8; 8];
            r.read_exact(&mut c)?;
            if u64::from_le_bytes(c) != count {
                return Err(bad("record count mismatch (truncated file?)"));
            }
            break;
        }
        if klen as usize > 1 << 20 {
            return Err(bad("key too long"));
        }
        let mut k = vec![0u8; klen as usize];
        r.read_exact(&mut k)?;
        let vlen = read_u32(&mut r)? as usize;
        if vlen > 256 << 20 {
            return Err(bad("value too long"));
        }
        let mut v = vec![0u8; vlen];
        r.read_exact(&mut v)?;
        if !k.starts_with(&prefix) {
            return Err(bad("key of another group"));
        }
        bytes += k.len() + v.len();
        batch.put_cf(cf, &k, &v);
        count += 1;
        if bytes >= LOAD_BATCH_BYTES {
            store
                .write(std::mem::take(&mut batch))
                .map_err(io::Error::other)?;
            bytes = 0;
        }
    }
    store.write(batch).map_err(io::Error::other)?;
    store.write_sync(finish).map_err(io::Error::other)?;
    Ok(count)
}
