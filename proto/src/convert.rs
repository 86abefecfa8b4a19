//! Domain helpers shared by nodes and clients: chunk ids, inode numbers that
//! carry their shard, name checks, timestamps and wire errors.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::meta::{Error, ErrorCode, Timespec};

/// Largest gRPC message either side accepts: a 4 MiB chunk plus framing, or a
/// large layout commit.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// HTTP/2 flow-control windows for every connection. The 64 KiB default
/// would stall each multi-MiB chunk transfer on window updates.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame a peer may send (the protocol's default is 16 KiB,
/// which cuts a 4 MiB chunk into 256 frames).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Longest file name in bytes, as on Linux.
pub const MAX_NAME_LEN: usize = 255;

/// The root directory's inode number (FUSE requires 1). It lives in group 0.
pub const ROOT_INO: u64 = 1;

/// Inode numbers carry their Raft group in the bits above this shift.
pub const GROUP_SHIFT: u32 = 48;

/// Wire-format version of replicated commands and stored values.
pub const FORMAT_VERSION: u32 = 1;

/// The Raft group (metadata shard) that owns an inode.
pub fn group_of_ino(ino: u64) -> u32 {
    (ino >> GROUP_SHIFT) as u32
}

/// The inode number of the `seq`-th inode allocated by `group`.
pub fn make_ino(group: u32, seq: u64) -> u64 {
    (u64::from(group) << GROUP_SHIFT) | (seq & ((1 << GROUP_SHIFT) - 1))
}

/// The group a new directory named `name` under `parent` lives in: spread by
/// hash so that a big tree's directories (and the files they hold) spread
/// over every group.
pub fn dir_group(parent: u64, name: &[u8], group_count: u32) -> u32 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&parent.to_be_bytes());
    h.update(name);
    (h.digest() % u64::from(group_count.max(1))) as u32
}

/// Copies kept of every chunk unless the cluster was initialised otherwise.
pub const DEFAULT_REPLICATION: u32 = 3;

/// Storage nodes in the order a chunk prefers them (rendezvous hashing):
/// writes go to the first nodes that accept the chunk, repair copies to the
/// first that lack it. Adding or removing a node moves only the chunks that
/// rank it first, and every client and node computes the same order.
pub fn placement(id: &ChunkId, nodes: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut ranked: Vec<(u64, u64)> = nodes
        .into_iter()
        .map(|n| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&id.0);
            h.update(&n.to_be_bytes());
            (h.digest(), n)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.dedup_by_key(|r| r.1);
    ranked.into_iter().map(|(_, n)| n).collect()
}

/// A chunk's content address: the first 16 bytes of the BLAKE3 hash of
/// its bytes. Clients deduplicate against each other's chunks by id, so
/// the hash must be one whose collisions cannot be made on purpose (XXH3,
/// used before, is not); docs/ARCHITECTURE.md ("Chunks") has the
/// measurement behind the choice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 16]);

/// The chunk-id format a node's data directory records: a directory made
/// with another one cannot be served by this version.
pub const CHUNK_ID_FORMAT: &str = "blake3-128";

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        let mut id = [0u8; 16];
        id.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
        ChunkId(id)
    }

    /// The chunk-index shard that records this chunk.
    pub fn group(&self, group_count: u32) -> u32 {
        let prefix = u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]);
        prefix % group_count.max(1)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the 32 lowercase hex digits `to_hex` writes.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkId(id))
    }

    pub fn verify(&self, data: &[u8]) -> bool {
        ChunkId::of(data) == *self
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("chunk id must be 16 bytes, got {0}")]
pub struct BadChunkId(pub usize);

impl TryFrom<&[u8]> for ChunkId {
    type Error = BadChunkId;
    fn try_from(b: &[u8]) -> Result<Self, BadChunkId> {
        let arr: [u8; 16] = b.try_into().map_err(|_| BadChunkId(b.len()))?;
        Ok(ChunkId(arr))
    }
}

/// Why a name cannot be used as a directory entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes, longer than {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("name contains '/'")]
    Slash,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("'.' and '..' cannot be used as names")]
    Dot,
}

/// Checks a single path component for use as a new or looked-up name.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.contains(&b'/') {
        return Err(NameError::Slash);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dot);
    }
    Ok(())
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        let code = match e {
            NameError::TooLong(_) => ErrorCode::NameTooLong,
            _ => ErrorCode::Invalid,
        };
        Error::new(code, e.to_string())
    }
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code: code as i32,
            message: message.into(),
            leader_id: 0,
            leader_addr: String::new(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message)?;
        if self.leader_id != 0 {
            write!(f, " (leader {} at {})", self.leader_id, self.leader_addr)?;
        }
        Ok(())
    }
}

impl Timespec {
    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// Milliseconds since 1970 (0 before it; saturating: a time comes from
    /// the network and may be anything).
    pub fn as_millis(&self) -> u64 {
        if self.sec < 0 {
            return 0;
        }
        (self.sec as u64)
            .saturating_mul(1000)
            .saturating_add(u64::from(self.nsec / 1_000_000))
    }
}

/// Seconds a layout commit may rely on a chunk-index answer unless the
/// cluster was initialised otherwise.
pub const DEFAULT_COMMIT_WINDOW_SECS: u32 = 3600;

impl From<SystemTime> for Timespec {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: negative seconds with a non-negative nanosecond part.
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec { sec, nsec }
            }
        }
    }
}

/// Seconds either side of 1970 a time is clamped to when it becomes a
/// `SystemTime` (about 34,000 years): any stored value converts without
/// overflowing.
const MAX_TIME_SECS: u64 = 1 << 40;

impl From<Timespec> for SystemTime {
    fn from(t: Timespec) -> Self {
        let nsec = t.nsec.min(999_999_999);
        if t.sec >= 0 {
            UNIX_EPOCH + std::time::Duration::new((t.sec as u64).min(MAX_TIME_SECS), nsec)
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(t.sec.unsigned_abs().min(MAX_TIME_SECS))
                + std::time::Duration::from_nanos(u64::from(nsec))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_stored_time_converts_without_overflow() {
        use super::Timespec;
        use std::time::SystemTime;
        for (sec, nsec) in [
            (i64::MAX, u32::MAX),
            (i64::MIN, u32::MAX),
            (0, 2_000_000_000),
        ] {
            let t = Timespec { sec, nsec };
            let _ = SystemTime::from(t);
            let _ = t.as_millis();
        }
        assert_eq!(
            Timespec {
                sec: i64::MAX,
                nsec: 0
            }
            .as_millis(),
            u64::MAX
        );
        let t = Timespec {
            sec: 1_700_000_000,
            nsec: 5,
        };
        assert_eq!(Timespec::from(SystemTime::from(t)), t);
    }

    #[test]
    fn chunk_ids_round_trip_through_hex() {
        let id = super::ChunkId::of(b"abc");
        assert_eq!(super::ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(super::ChunkId::from_hex("xyz"), None);
        assert_eq!(super::ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
    }

    #[test]
    fn placement_is_stable_and_moves_little_when_a_node_joins() {
        let ids: Vec<super::ChunkId> = (0..1000u32)
            .map(|i| super::ChunkId::of(&i.to_be_bytes()))
            .collect();
        let mut moved = 0;
        for id in &ids {
            let three = super::placement(id, [1, 2, 3]);
            assert_eq!(three, super::placement(id, [3, 1, 2]), "order of input");
            let four = super::placement(id, [1, 2, 3, 4]);
            let without: Vec<u64> = four.iter().copied().filter(|n| *n != 4).collect();
            assert_eq!(without, three, "relative order kept");
            if four[..3].contains(&4) {
                moved += 1;
            }
        }
        // Node 4 takes a replica of about three quarters of the chunks (3 of
        // 4 slots), never reshuffling the others.
        assert!((650..850).contains(&moved), "{moved}");
    }

    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(validate_name(b"a"), Ok(()));
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(validate_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(validate_name(b".."), Err(NameError::Dot));
        assert_eq!(validate_name(&[b'x'; 256]), Err(NameError::TooLong(256)));
        assert_eq!(validate_name(&[b'x'; 255]), Ok(()));
    }

    #[test]
    fn inode_numbers_carry_their_group() {
        assert_eq!(make_ino(0, 1), ROOT_INO);
        let ino = make_ino(7, 42);
        assert_eq!(group_of_ino(ino), 7);
        assert_eq!(ino & 0xffff_ffff, 42);
    }

    #[test]
    fn timespec_round_trips_before_and_after_epoch() {
        for t in [
            Timespec { sec: 5, nsec: 7 },
            Timespec { sec: -5, nsec: 7 },
            Timespec { sec: 0, nsec: 0 },
        ] {
            let st: SystemTime = t.into();
            assert_eq!(Timespec::from(st), t);
        }
    }

    #[test]
    fn chunk_id_verifies_content() {
        let id = ChunkId::of(b"hello");
        assert!(id.verify(b"hello"));
        assert!(!id.verify(b"hellp"));
        assert_eq!(ChunkId::try_from(&id.0[..]), Ok(id));
        assert_eq!(ChunkId::try_from(&[1u8, 2][..]), Err(BadChunkId(2)));
    }
}
