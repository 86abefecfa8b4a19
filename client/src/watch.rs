//! `musicfs watch`: the cluster's change feed as paths, from a durable
//! cursor, so a media server rescans only what changed.
//!
//! Every metadata group keeps its own feed (created, deleted, modified,
//! re-tagged), in the order its commands applied; the cursor holds the last
//! sequence read per group. Events of one group come in order; events of
//! different groups are not ordered with each other (a rename across
//! groups may show its new name before the old one goes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use proto::meta::{ChangeEvent, ChangeKind, FileKind};
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};
use crate::fs::Fs;

/// Where a reader of the feed is: the last sequence read per group.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    pub groups: BTreeMap<u32, u64>,
}

impl Cursor {
    /// The cursor saved at `path`; a missing file is a new cursor.
    pub fn load(path: &Path) -> Result<Option<Cursor>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                ClientError::Local(format!("{}: not a watch cursor: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Local(format!("{}: {e}", path.display()))),
        }
    }

    /// Saves the cursor atomically (a crash leaves the old one or the new).
    pub fn save(&self, path: &Path) -> Result<()> {
        let local = |e: std::io::Error| ClientError::Local(format!("{}: {e}", path.display()));
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(self).map_err(|e| ClientError::Local(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(local)?;
            f.write_all(&body).map_err(local)?;
            f.sync_all().map_err(local)?;
        }
        std::fs::rename(&tmp, path).map_err(local)
    }
}

/// One change, as `watch` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    pub group: u32,
    pub seq: u64,
    /// created, deleted, modified, retagged; or rescan when the cursor
    /// fell behind the events the group keeps.
    pub kind: &'static str,
    /// Absolute path in the cluster ("" when it could not be told).
    pub path: String,
    pub ino: u64,
    pub dir: bool,
    pub time_ms: u64,
}

pub struct Watcher<'a> {
    fs: &'a Fs,
    /// Directory paths found so far.
    dirs: HashMap<u64, String>,
}

fn kind_name(k: i32) -> &'static str {
    match ChangeKind::try_from(k) {
        Ok(ChangeKind::Created) => "created",
        Ok(ChangeKind::Deleted) => "deleted",
        Ok(ChangeKind::Modified) => "modified",
        Ok(ChangeKind::Retagged) => "retagged",
        _ => "unknown",
    }
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl<'a> Watcher<'a> {
    pub fn new(fs: &'a Fs) -> Self {
        Watcher {
            fs,
            dirs: HashMap::new(),
        }
    }

    /// A cursor at the end of every group's feed (changes from now on).
    pub async fn cursor_now(&self) -> Result<Cursor> {
        let mut c = Cursor::default();
        for g in 0..self.fs.cluster().group_count() {
            let r = self.fs.changes(g, u64::MAX - 1, 1).await?;
            c.groups.insert(g, r.next_seq.saturating_sub(1));
        }
        Ok(c)
    }

    /// The path of directory `ino`: up its parents to the root, each name
    /// found in its parent's listing.
    async fn dir_path(&mut self, ino: u64) -> Result<String> {
        let mut chain = Vec::new();
        let mut at = ino;
        let base = loop {
            if at == proto::ROOT_INO {
                break "/".to_string();
            }
            if let Some(p) = self.dirs.get(&at) {
                break p.clone();
            }
            // Bounded: a namespace deeper than this is not a tree.
            if chain.len() > 4096 {
                return Err(ClientError::Invalid(format!(
                    "directory {ino} is deeper than 4096 levels"
                )));
            }
            let parent = self.fs.parent_of(at).await?;
            chain.push((at, parent));
            at = parent;
        };
        let mut path = base;
        for (dir, parent) in chain.into_iter().rev() {
            let name = self.name_in(parent, dir).await?;
            path = join(&path, &name);
            self.dirs.insert(dir, path.clone());
        }
        Ok(path)
    }

    async fn name_in(&self, parent: u64, ino: u64) -> Result<Vec<u8>> {
        let mut after = Vec::new();
        loop {
            let (entries, more) = self.fs.readdir(parent, &after, 1024, false).await?;
            if let Some(e) = entries.iter().find(|e| e.ino == ino) {
                return Ok(e.name.to_vec());
            }
            match entries.last() {
                Some(l) if more => after = l.name.to_vec(),
                _ => {
                    return Err(ClientError::server(
                        proto::meta::ErrorCode::NotFound,
                        format!("directory {ino} is no longer in {parent}"),
                    ))
                }
            }
        }
    }

    /// Where an entry in `parent` is; a directory gone since is told by
    /// its inode.
    async fn path_in(&mut self, parent: u64, name: &[u8]) -> String {
        match self.dir_path(parent).await {
            Ok(d) => join(&d, name),
            Err(_) => join(&format!("<directory {parent}>"), name),
        }
    }

    async fn change(&mut self, group: u32, e: ChangeEvent) -> Change {
        let dir = FileKind::try_from(e.file_kind) == Ok(FileKind::Directory);
        let path = match ChangeKind::try_from(e.kind) {
            Ok(ChangeKind::Created | ChangeKind::Deleted) => {
                let p = self.path_in(e.parent, &e.name).await;
                if dir && self.dirs.contains_key(&e.ino) {
                    // Paths under a removed or renamed directory may have
                    // changed: find them again. (One not found yet has no
                    // descendants found either: paths are found root first.)
                    self.dirs.clear();
                }
                p
            }
            Ok(ChangeKind::Modified) if e.parent != 0 => self.path_in(e.parent, &e.name).await,
            Ok(ChangeKind::Retagged) => e.path.clone(),
            _ => String::new(),
        };
        Change {
            group,
            seq: e.seq,
            kind: kind_name(e.kind),
            path,
            ino: e.ino,
            dir,
            time_ms: e.time_ms,
        }
    }

    /// Every change after `cursor`, group by group, moving the cursor past
    /// each one handed to `out`.
    pub async fn poll(&mut self, cursor: &mut Cursor, out: &mut impl FnMut(Change)) -> Result<()> {
        for g in 0..self.fs.cluster().group_count() {
            let mut after = cursor.groups.get(&g).copied().unwrap_or(0);
            loop {
                let r = self.fs.changes(g, after, 1000).await?;
                if after + 1 < r.oldest_seq {
                    // Events this reader never saw were dropped.
                    out(Change {
                        group: g,
                        seq: r.oldest_seq,
                        kind: "rescan",
                        path: "/".into(),
                        ino: proto::ROOT_INO,
                        dir: true,
                        time_ms: 0,
                    });
                    after = r.oldest_seq - 1;
                }
                let last = r.changes.last().map(|e| e.seq);
                for e in r.changes {
                    let seq = e.seq;
                    let c = self.change(g, e).await;
                    out(c);
                    after = seq;
                    cursor.groups.insert(g, after);
                }
                if !r.more || last.is_none() {
                    break;
                }
            }
            cursor.groups.insert(g, after);
        }
        Ok(())
    }
}
