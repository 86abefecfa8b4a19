//! `musicfs import` and `musicfs sync`: copy a local tree into the cluster
//! like `rsync -a [--delete]`, without a mount.
//!
//! Three passes. The first walks the source and, one destination
//! directory at a time, lists what is there and creates what is missing
//! through the bulk path (many creates to one Raft entry); entries of the
//! wrong type, and with `delete` entries the source lacks, are removed.
//! The second uploads the files whose size or modification time differ,
//! several at once; the write path asks the chunk index first and stores
//! only chunks the cluster lacks. The third sets directories' times, which
//! the second pass moved.
//!
//! A file's time is set only after its content is committed, so an
//! interrupted run leaves every unfinished file with another time than its
//! source, and the next run copies exactly those again (resuming).

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt};
use proto::meta::{Attr, ErrorCode, FileKind, SetAttrFields, Timespec};

use crate::error::ClientError;
use crate::fs::{Fs, NewEntry};

type Result<T> = std::result::Result<T, ClientError>;

/// Entries one readdir page returns.
const PAGE: u32 = 1000;

#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Remove destination entries the source lacks.
    pub delete: bool,
    /// Files uploaded at once.
    pub jobs: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            delete: false,
            jobs: 4,
        }
    }
}

/// Where a run stands; `sent` is chunk data actually stored (after
/// deduplication), `copied` what was read from the source for it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncReport {
    /// Regular files in the source.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Files whose content was copied (new or changed).
    pub files_copied: u64,
    /// Bytes of those files.
    pub bytes_copied: u64,
    /// Chunk data stored in the cluster for them (new chunks only).
    pub bytes_sent: u64,
    /// Files left as they were (same size and modification time).
    pub files_unchanged: u64,
    pub bytes_unchanged: u64,
    pub dirs_created: u64,
    pub symlinks_created: u64,
    /// Destination entries removed (not in the source, or of another type).
    pub removed: u64,
    /// Paths that failed, with why; the rest of the run went on.
    pub errors: Vec<String>,
}

/// One source entry to look at, relative to the source root.
struct Local {
    name: Vec<u8>,
    path: PathBuf,
    md: std::fs::Metadata,
}

/// A file whose content goes up in the second pass.
struct Upload {
    local: PathBuf,
    dest: String,
    ino: u64,
    size: u64,
    existing_size: u64,
    mtime: Timespec,
    perm: u32,
}

fn kind_of(md: &std::fs::Metadata) -> Option<FileKind> {
    let t = md.file_type();
    if t.is_dir() {
        Some(FileKind::Directory)
    } else if t.is_file() {
        Some(FileKind::Regular)
    } else if t.is_symlink() {
        Some(FileKind::Symlink)
    } else {
        // Devices, sockets, fifos: a music library has none; skipped.
        None
    }
}

fn mtime_of(md: &std::fs::Metadata) -> Timespec {
    Timespec {
        sec: md.mtime(),
        nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
    }
}

fn same_time(a: Option<&Timespec>, b: &Timespec) -> bool {
    a.is_some_and(|a| a.sec == b.sec && a.nsec == b.nsec)
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Copies `src` (a directory) to `dest` in the cluster, creating `dest`
/// and its parents as needed. `progress` is called as the run goes on.
pub async fn sync(
    fs: &Arc<Fs>,
    src: &Path,
    dest: &str,
    opts: &SyncOptions,
    progress: &(dyn Fn(&SyncReport) + Sync),
) -> Result<SyncReport> {
    let md = std::fs::metadata(src)
        .map_err(|e| ClientError::Local(format!("{}: {e}", src.display())))?;
    if !md.is_dir() {
        return Err(ClientError::Local(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let root = mkdir_p(fs, dest).await?;
    let sent_before = fs.cluster().chunk_bytes_sent();
    let report = Mutex::new(SyncReport::default());
    let mut uploads: Vec<Upload> = Vec::new();
    let mut dir_times: Vec<(u64, Timespec)> = vec![(root.ino, mtime_of(&md))];

    // Pass 1: the namespace, one directory at a time, parents first.
    let mut queue: Vec<(PathBuf, String, u64)> =
        vec![(src.to_path_buf(), dest.to_string(), root.ino)];
    while let Some((local_dir, dest_dir, ino)) = queue.pop() {
        match namespace_pass(fs, &local_dir, &dest_dir, ino, opts, &report).await {
            Ok(found) => {
                for (local, dest, sub, mtime) in found.dirs {
                    dir_times.push((sub, mtime));
                    queue.push((local, dest, sub));
                }
                uploads.extend(found.uploads);
            }
            Err(e) => lock(&report).errors.push(format!("{dest_dir}: {e}")),
        }
        progress(&lock(&report));
    }

    // Pass 2: contents, several files at once.
    let report_ref = &report;
    let results: Vec<(String, Result<()>)> = stream::iter(uploads)
        .map(|u| {
            let report = report_ref;
            async move {
                let dest = u.dest.clone();
                let size = u.size;
                let r = upload(fs, u).await;
                if r.is_ok() {
                    let mut rep = lock(report);
                    rep.files_copied += 1;
                    rep.bytes_copied += size;
                    rep.bytes_sent = fs.cluster().chunk_bytes_sent() - sent_before;
                    progress(&rep);
                }
                (dest, r)
            }
        })
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    for (dest, r) in results {
        if let Err(e) = r {
            lock(&report).errors.push(format!("{dest}: {e}"));
        }
    }

    // Pass 3: directory times, which creating their entries moved.
    for (ino, mtime) in dir_times {
        let fields = SetAttrFields {
            mtime: Some(mtime),
            ..Default::default()
        };
        if let Err(e) = fs.setattr(ino, fields).await {
            lock(&report)
                .errors
                .push(format!("inode {ino}: setting its time: {e}"));
        }
    }
    let mut rep = report.into_inner().unwrap_or_else(|e| e.into_inner());
    rep.bytes_sent = fs.cluster().chunk_bytes_sent() - sent_before;
    progress(&rep);
    Ok(rep)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves `path`, creating missing directories on the way.
async fn mkdir_p(fs: &Fs, path: &str) -> Result<Attr> {
    let mut attr = fs.getattr(proto::ROOT_INO).await?;
    for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        attr = match fs.lookup(attr.ino, comp.as_bytes()).await {
            Ok(a) => a,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                match fs
                    .create(
                        attr.ino,
                        comp.as_bytes(),
                        FileKind::Directory,
                        0o755,
                        0,
                        0,
                        0,
                        b"",
                    )
                    .await
                {
                    Ok(a) => a,
                    // Another run made it meanwhile.
                    Err(e) if e.code() == Some(ErrorCode::Exists) => {
                        fs.lookup(attr.ino, comp.as_bytes()).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if attr.kind != FileKind::Directory as i32 {
            return Err(ClientError::Local(format!(
                "{path}: {comp} is not a directory"
            )));
        }
    }
    Ok(attr)
}

/// What one directory's pass found to do next.
#[derive(Default)]
struct Found {
    dirs: Vec<(PathBuf, String, u64, Timespec)>,
    uploads: Vec<Upload>,
}

async fn namespace_pass(
    fs: &Fs,
    local_dir: &Path,
    dest_dir: &str,
    ino: u64,
    opts: &SyncOptions,
    report: &Mutex<SyncReport>,
) -> Result<Found> {
    let mut locals: BTreeMap<Vec<u8>, Local> = BTreeMap::new();
    let rd = std::fs::read_dir(local_dir)
        .map_err(|e| ClientError::Local(format!("{}: {e}", local_dir.display())))?;
    for e in rd {
        let e = e.map_err(|e| ClientError::Local(format!("{}: {e}", local_dir.display())))?;
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(md) => {
                let name = e.file_name().as_bytes().to_vec();
                locals.insert(name.clone(), Local { name, path, md });
            }
            Err(err) => lock(report)
                .errors
                .push(format!("{}: {err}", path.display())),
        }
    }
    let existing = list(fs, ino).await?;

    // Entries of the wrong type, and (with `delete`) entries the source
    // lacks, go first, so their names are free for the creates below.
    for (name, attr) in &existing {
        let wanted = locals.get(name).and_then(|l| kind_of(&l.md));
        let keep = match wanted {
            Some(k) => attr.kind == k as i32,
            None => !opts.delete,
        };
        if !keep {
            remove_tree(fs, ino, name, attr).await?;
            lock(report).removed += 1;
        }
    }
    let existing: BTreeMap<Vec<u8>, Attr> = existing
        .into_iter()
        .filter(|(name, attr)| {
            locals
                .get(name)
                .and_then(|l| kind_of(&l.md))
                .is_some_and(|k| attr.kind == k as i32)
        })
        .collect();

    // Creates through the bulk path: directories and empty files.
    let mut new: Vec<NewEntry> = Vec::new();
    for l in locals.values() {
        if existing.contains_key(&l.name) {
            continue;
        }
        match kind_of(&l.md) {
            Some(k @ (FileKind::Directory | FileKind::Regular)) => {
                let mut e = NewEntry::new(l.name.clone(), k, l.md.permissions().mode() & 0o7777);
                e.uid = l.md.uid();
                e.gid = l.md.gid();
                new.push(e);
            }
            Some(FileKind::Symlink) => {
                let target = std::fs::read_link(&l.path)
                    .map_err(|e| ClientError::Local(format!("{}: {e}", l.path.display())))?;
                fs.create(
                    ino,
                    &l.name,
                    FileKind::Symlink,
                    0o777,
                    l.md.uid(),
                    l.md.gid(),
                    0,
                    target.as_os_str().as_bytes(),
                )
                .await?;
                lock(report).symlinks_created += 1;
            }
            _ => {}
        }
    }
    let mut created: BTreeMap<Vec<u8>, Attr> = BTreeMap::new();
    if !new.is_empty() {
        let outcomes = fs.create_many(ino, &new).await?;
        for (e, r) in new.iter().zip(outcomes) {
            match r {
                Ok(a) => {
                    if e.kind == FileKind::Directory {
                        lock(report).dirs_created += 1;
                    }
                    created.insert(e.name.clone(), a);
                }
                Err(err) => lock(report)
                    .errors
                    .push(format!("{}: {err}", join(dest_dir, &e.name))),
            }
        }
    }

    let mut found = Found::default();
    for l in locals.into_values() {
        let Some(kind) = kind_of(&l.md) else { continue };
        let Some(attr) = existing.get(&l.name).or_else(|| created.get(&l.name)) else {
            continue;
        };
        let dest = join(dest_dir, &l.name);
        match kind {
            FileKind::Directory => {
                found.dirs.push((l.path, dest, attr.ino, mtime_of(&l.md)));
            }
            FileKind::Regular => {
                let mtime = mtime_of(&l.md);
                let size = l.md.len();
                {
                    let mut rep = lock(report);
                    rep.files += 1;
                    rep.bytes += size;
                }
                if attr.size == size && same_time(attr.mtime.as_ref(), &mtime) {
                    let mut rep = lock(report);
                    rep.files_unchanged += 1;
                    rep.bytes_unchanged += size;
                    continue;
                }
                // The change feed names the file by where it is.
                fs.saw(attr.ino, ino, &l.name);
                found.uploads.push(Upload {
                    local: l.path,
                    dest,
                    ino: attr.ino,
                    size,
                    existing_size: attr.size,
                    mtime,
                    perm: l.md.permissions().mode() & 0o7777,
                });
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Every entry of a directory, with attributes.
async fn list(fs: &Fs, ino: u64) -> Result<BTreeMap<Vec<u8>, Attr>> {
    let mut out = BTreeMap::new();
    let mut after: Vec<u8> = Vec::new();
    loop {
        let (entries, more) = fs.readdir(ino, &after, PAGE, true).await?;
        let Some(last) = entries.last() else { break };
        after = last.name.to_vec();
        for e in entries {
            if let Some(a) = e.attr {
                out.insert(e.name.to_vec(), a);
            }
        }
        if !more {
            break;
        }
    }
    Ok(out)
}

/// Removes `name` from `parent`, a directory with everything below it.
async fn remove_tree(fs: &Fs, parent: u64, name: &[u8], attr: &Attr) -> Result<()> {
    let dir = attr.kind == FileKind::Directory as i32;
    if dir {
        // Depth first, bounded by the tree's depth.
        let mut stack: Vec<(u64, Vec<u8>, u64, bool)> =
            vec![(parent, name.to_vec(), attr.ino, false)];
        while let Some((p, n, ino, listed)) = stack.pop() {
            if listed {
                fs.remove(p, &n, true).await?;
                continue;
            }
            stack.push((p, n, ino, true));
            for (child, a) in list(fs, ino).await? {
                if a.kind == FileKind::Directory as i32 {
                    stack.push((ino, child, a.ino, false));
                } else {
                    fs.remove(ino, &child, false).await?;
                }
            }
        }
        return Ok(());
    }
    fs.remove(parent, name, false).await
}

async fn upload(fs: &Fs, u: Upload) -> Result<()> {
    let mut f = std::fs::File::open(&u.local)
        .map_err(|e| ClientError::Local(format!("{}: {e}", u.local.display())))?;
    let attr = fs
        .replace_content(u.ino, u.existing_size, &mut f, |_| {})
        .await?;
    // Tags, read as the content went up: a file lofty cannot read has none
    // (and loses ones it had), which is not a failure of the copy.
    if crate::tags::is_audio(&u.local) {
        let tags = match crate::tags::read(&u.local) {
            Ok(mut t) => {
                t.layout_version = attr.layout_version;
                t.path = u.dest.clone();
                Some(t)
            }
            Err(e) => {
                tracing::info!(path = %u.local.display(), error = %e, "no tags read");
                None
            }
        };
        fs.set_tags(u.ino, tags).await?;
    }
    // Last, so an interrupted copy is recognised as unfinished next time.
    fs.setattr(
        u.ino,
        SetAttrFields {
            perm: Some(u.perm),
            mtime: Some(u.mtime),
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}
