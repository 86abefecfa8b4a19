//! One group's Raft log and vote, stored in the node's shared RocksDB.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;
use prost::Message;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::convert::{self, Entry, LogId, Vote};
use crate::store::{group_key, log_key, Store, CF_LOG, CF_RAFT};
use crate::TypeConfig;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

#[derive(Clone)]
pub struct LogStore {
    group: u32,
    store: Arc<Store>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    pub fn new(store: Arc<Store>, group: u32) -> Self {
        LogStore { group, store }
    }

    fn get_pb<M: Message + Default>(&self, key: &[u8]) -> io::Result<Option<M>> {
        let k = group_key(self.group, key);
        match self.store.get(CF_RAFT, &k).map_err(io_err)? {
            Some(v) => Ok(Some(M::decode(&v[..]).map_err(io_err)?)),
            None => Ok(None),
        }
    }

    fn last_purged(&self) -> io::Result<Option<LogId>> {
        match self.get_pb::<proto::raft::LogId>(PURGED)? {
            Some(l) => Ok(Some(convert::log_id_from_pb(&l).map_err(io_err)?)),
            None => Ok(None),
        }
    }

    /// Reads limited to this group's entries in `[from, to)`: purged
    /// entries are deleted keys until compaction, and an unbounded iterator
    /// steps over every one of them (this group's before `from`, the next
    /// group's after `to`) on each read.
    fn bounded(&self, from: u64, to: u64) -> rocksdb::ReadOptions {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(log_key(self.group, from).to_vec());
        ro.set_iterate_upper_bound(log_key(self.group, to).to_vec());
        ro
    }

    /// Index of the first entry not purged.
    fn first_kept(&self) -> io::Result<u64> {
        Ok(self.last_purged()?.map_or(0, |l| l.index + 1))
    }

    fn last_entry(&self) -> io::Result<Option<LogId>> {
        let upper = log_key(self.group, u64::MAX);
        let mut it = self.store.db.iterator_cf_opt(
            self.store.cf(CF_LOG),
            self.bounded(self.first_kept()?, u64::MAX),
            IteratorMode::From(&upper, Direction::Reverse),
        );
        match it.next() {
            Some(Ok((k, v))) if k.starts_with(&self.group.to_be_bytes()) => {
                let e = proto::raft::Entry::decode(&v[..]).map_err(io_err)?;
                let e = convert::entry_from_pb(&e).map_err(io_err)?;
                Ok(Some(e.log_id))
            }
            Some(Err(e)) => Err(io_err(e)),
            _ => Ok(None),
        }
    }

    /// Index of the first entry still in the log (for status reports).
    pub fn first_index(&self) -> io::Result<Option<u64>> {
        let first = self.first_kept()?;
        let mut it = self.store.db.iterator_cf_opt(
            self.store.cf(CF_LOG),
            self.bounded(first, u64::MAX),
            IteratorMode::From(&log_key(self.group, first), Direction::Forward),
        );
        match it.next() {
            Some(Ok((k, _))) if k.starts_with(&self.group.to_be_bytes()) && k.len() == 12 => Ok(
                Some(u64::from_be_bytes(k[4..12].try_into().unwrap_or_default())),
            ),
            Some(Err(e)) => Err(io_err(e)),
            _ => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end_excl = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let mut out = Vec::new();
        if start >= end_excl {
            return Ok(out);
        }
        let from = log_key(self.group, start);
        for item in self.store.db.iterator_cf_opt(
            self.store.cf(CF_LOG),
            self.bounded(start, end_excl),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, v) = item.map_err(io_err)?;
            if !k.starts_with(&self.group.to_be_bytes()) || k.len() != 12 {
                break;
            }
            let idx = u64::from_be_bytes(k[4..12].try_into().map_err(io_err)?);
            if idx >= end_excl {
                break;
            }
            let e = proto::raft::Entry::decode(&v[..]).map_err(io_err)?;
            out.push(convert::entry_from_pb(&e).map_err(io_err)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.get_pb::<proto::raft::Vote>(VOTE)? {
            Some(v) => Ok(Some(convert::vote_from_pb(&v).map_err(io_err)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = self.last_entry()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.store.cf(CF_RAFT),
            group_key(self.group, VOTE),
            convert::vote_to_pb(vote).encode_to_vec(),
        );
        // A vote must be on disk before it is acted upon.
        self.store.write_sync(b).map_err(io_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        let k = group_key(self.group, COMMITTED);
        match committed {
            Some(c) => b.put_cf(
                self.store.cf(CF_RAFT),
                k,
                convert::log_id_to_pb(&c).encode_to_vec(),
            ),
            None => b.delete_cf(self.store.cf(CF_RAFT), k),
        }
        self.store.write(b).map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.get_pb::<proto::raft::LogId>(COMMITTED)? {
            Some(l) => Ok(Some(convert::log_id_from_pb(&l).map_err(io_err)?)),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut b = WriteBatch::default();
        let cf = self.store.cf(CF_LOG);
        for e in entries {
            b.put_cf(
                cf,
                log_key(self.group, e.log_id.index),
                convert::entry_to_pb(&e).encode_to_vec(),
            );
        }
        // Readable now; durable when the flusher's next WAL fsync completes.
        self.store.write(b).map_err(io_err)?;
        self.store.flush_then(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = match last_log_id {
            Some(l) => l.index + 1,
            None => 0,
        };
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            self.store.cf(CF_LOG),
            log_key(self.group, from),
            log_key(self.group, u64::MAX),
        );
        b.delete_cf(self.store.cf(CF_LOG), log_key(self.group, u64::MAX));
        self.store.write(b).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.store.cf(CF_RAFT),
            group_key(self.group, PURGED),
            convert::log_id_to_pb(&log_id).encode_to_vec(),
        );
        b.delete_range_cf(
            self.store.cf(CF_LOG),
            log_key(self.group, 0),
            log_key(self.group, log_id.index + 1),
        );
        self.store.write(b).map_err(io_err)
    }
}
