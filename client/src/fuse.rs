//! The FUSE shim: converts kernel requests into client-core calls and the
//! results into replies. Every request runs as a task on the tokio runtime,
//! so no FUSE thread ever waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags as FuseRenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use proto::meta::{Attr, FileKind, SetAttrFields, Timespec};
use tokio::runtime::Handle;

use crate::error::ClientError;
use crate::fs::{Fs, RenameFlags};

/// How long the kernel may cache attributes and entries by default
/// (docs/SEMANTICS.md; `musicfs mount --attr-timeout-ms`).
pub const ATTR_TTL: Duration = Duration::from_secs(1);
const DIR_PAGE: u32 = 1024;
const BLOCK: u64 = 4096;

/// An open directory's listing, as a window that moves with the reader:
/// entries the kernel has consumed are dropped, so listing a directory of
/// millions of entries holds a page or two, not the whole directory.
struct DirListing {
    ino: u64,
    /// Stream position of `entries[0]`.
    base: usize,
    entries: Vec<(Vec<u8>, u64, FileKind, Option<Attr>)>,
    /// Name of the last entry fetched: the next page starts after it.
    cursor: Vec<u8>,
    more: bool,
    plus: bool,
}

impl DirListing {
    fn new(ino: u64, plus: bool) -> Self {
        DirListing {
            ino,
            base: 0,
            entries: Vec::new(),
            cursor: Vec::new(),
            more: true,
            plus,
        }
    }
}

pub struct MusicFuse {
    fs: Arc<Fs>,
    rt: Handle,
    dirs: Arc<Mutex<HashMap<u64, DirListing>>>,
    next_dir: AtomicU64,
    ttl: Duration,
    direct_io: bool,
    /// Set once the session is up: invalidates what the kernel caches of
    /// a file another client changed.
    notifier: Arc<OnceLock<Notifier>>,
}

impl MusicFuse {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        MusicFuse {
            fs,
            rt,
            dirs: Arc::new(Mutex::new(HashMap::new())),
            next_dir: AtomicU64::new(1),
            ttl: ATTR_TTL,
            direct_io: false,
            notifier: Arc::new(OnceLock::new()),
        }
    }

    /// How long the kernel may cache attributes and entries.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Whether reads bypass the kernel's page cache.
    pub fn with_direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }

    /// Where the mount puts the session's notifier once it is up.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    fn spawn<F>(&self, op: &'static str, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let span = tracing::debug_span!("fuse", op);
        let start = std::time::Instant::now();
        let f = async move {
            f.await;
            crate::metrics::fuse_op(op, start.elapsed().as_secs_f64());
        };
        self.rt.spawn(tracing::Instrument::instrument(f, span));
    }
}

fn errno(op: &'static str, e: &ClientError) -> Errno {
    let code = e.errno();
    crate::metrics::fuse_error(op, code);
    if code == libc::EIO {
        tracing::warn!(op, error = %e, "returning EIO");
    } else {
        tracing::debug!(op, error = %e, "returning errno {code}");
    }
    Errno::from_i32(code)
}

fn file_type(kind: i32) -> FileType {
    match FileKind::try_from(kind).unwrap_or(FileKind::Regular) {
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::Regular | FileKind::Unspecified => FileType::RegularFile,
    }
}

fn kind_from_mode(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        _ => FileKind::Regular,
    }
}

fn time(t: Option<Timespec>) -> SystemTime {
    t.map(SystemTime::from).unwrap_or(SystemTime::UNIX_EPOCH)
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.crtime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

/// Whether the process `pid` (primary group `gid`) is a member of `group`,
/// counting its supplementary groups from /proc.
fn in_group(pid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Groups:"))
                .map(|l| l.split_whitespace().skip(1).any(|g| g.parse() == Ok(group)))
        })
        .unwrap_or(false)
}

fn time_or_now(t: TimeOrNow) -> Timespec {
    match t {
        TimeOrNow::Now => Timespec::now(),
        TimeOrNow::SpecificTime(t) => t.into(),
    }
}

impl Filesystem for MusicFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // Enough read-ahead requests in flight to keep several chunk
        // fetches going (the kernel's default is 12).
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ttl = self.ttl;
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.spawn("lookup", async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        let fs = self.fs.clone();
        self.spawn("getattr", async move {
            match fs.getattr_within(ino.0, ttl).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.ttl;
        let fs = self.fs.clone();
        let (caller_uid, caller_gid, pid) = (req.uid(), req.gid(), req.pid());
        let mut fields = SetAttrFields {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_or_now),
            mtime: mtime.map(time_or_now),
            kill_suid: false,
        };
        self.spawn("setattr", async move {
            if let Some(perm) = fields
                .perm
                .filter(|p| p & libc::S_ISGID != 0 && caller_uid != 0)
            {
                // As chmod(2): a caller outside the file's group cannot set
                // the set-group-ID bit; it is cleared, not refused.
                match fs.getattr(ino.0).await {
                    Ok(a) if !in_group(pid, caller_gid, a.gid) => {
                        fields.perm = Some(perm & !libc::S_ISGID)
                    }
                    Ok(_) => {}
                    Err(e) => return reply.error(errno("setattr", &e)),
                }
            }
            match fs.setattr(ino.0, fields).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.spawn("readlink", async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno("readlink", &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let ttl = self.ttl;
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("mknod", async move {
            let kind = kind_from_mode(mode);
            match fs
                .create(parent.0, &name, kind, mode & 0o7777, uid, gid, rdev, b"")
                .await
            {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mknod", &e)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let ttl = self.ttl;
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("mkdir", async move {
            match fs
                .create(
                    parent.0,
                    &name,
                    FileKind::Directory,
                    mode & 0o7777,
                    uid,
                    gid,
                    0,
                    b"",
                )
                .await
            {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.spawn("unlink", async move {
            match fs.remove(parent.0, &name, false).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.spawn("rmdir", async move {
            match fs.remove(parent.0, &name, true).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let ttl = self.ttl;
        let fs = self.fs.clone();
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("symlink", async move {
            match fs
                .create(
                    parent.0,
                    &name,
                    FileKind::Symlink,
                    0o777,
                    uid,
                    gid,
                    0,
                    &target,
                )
                .await
            {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("symlink", &e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: FuseRenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = FuseRenameFlags::RENAME_NOREPLACE | FuseRenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            reply.error(Errno::EINVAL);
            return;
        }
        let fs = self.fs.clone();
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let flags = RenameFlags {
            noreplace: flags.contains(FuseRenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(FuseRenameFlags::RENAME_EXCHANGE),
        };
        self.spawn("rename", async move {
            match fs
                .rename(parent.0, &name, newparent.0, &newname, flags)
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let ttl = self.ttl;
        let (fs, newname) = (self.fs.clone(), newname.as_bytes().to_vec());
        self.spawn("link", async move {
            match fs.link(ino.0, newparent.0, &newname).await {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("link", &e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if crate::views::is_virtual(ino.0) && writes {
            reply.error(Errno::from_i32(libc::EROFS));
            return;
        }
        let (fs, notifier) = (self.fs.clone(), self.notifier.clone());
        let direct_io = self.direct_io;
        self.spawn("open", async move {
            match fs.open_cached(ino.0).await {
                Ok((fh, keep)) => {
                    if !keep {
                        // The kernel may hold attributes of an older
                        // version (from this mount's last open, or a
                        // lookup within the attribute timeout): its cached
                        // size would cut reads short or run them past the
                        // end. Its pages go too, as the reply does not
                        // keep them.
                        if let Some(n) = notifier.get() {
                            if let Err(e) = n.inval_inode(ino, -1, 0) {
                                tracing::debug!(ino = ino.0, error = %e, "attribute invalidation failed");
                            }
                        }
                    }
                    let flags = if direct_io {
                        FopenFlags::FOPEN_DIRECT_IO
                    } else if keep {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.spawn("read", async move {
            match fs.read(fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let start = std::time::Instant::now();
        match self.fs.write_now(fh.0, offset, data) {
            Ok(Some(n)) => {
                crate::metrics::fuse_op("write", start.elapsed().as_secs_f64());
                return reply.written(n);
            }
            Ok(None) => {}
            Err(e) => return reply.error(errno("write", &e)),
        }
        let (fs, data) = (self.fs.clone(), data.to_vec());
        self.spawn("write", async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn("flush", async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn("release", async move {
            match fs.release(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn("fsync", async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, DirListing::new(ino.0, false));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (fs, dirs) = (self.fs.clone(), self.dirs.clone());
        self.spawn("readdir", async move {
            if let Err(e) = fill_listing(&fs, &dirs, fh.0, ino.0, offset, false).await {
                reply.error(errno("readdir", &e));
                return;
            }
            let guard = dirs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = guard.get(&fh.0) else {
                reply.error(Errno::EBADF);
                return;
            };
            let skip = (offset as usize).saturating_sub(l.base);
            for (i, (name, ino, kind, _)) in l.entries.iter().enumerate().skip(skip) {
                if reply.add(
                    INodeNo(*ino),
                    (l.base + i) as u64 + 1,
                    file_type(*kind as i32),
                    OsStr::from_bytes(name),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        let (fs, dirs) = (self.fs.clone(), self.dirs.clone());
        self.spawn("readdirplus", async move {
            if let Err(e) = fill_listing(&fs, &dirs, fh.0, ino.0, offset, true).await {
                reply.error(errno("readdirplus", &e));
                return;
            }
            let guard = dirs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = guard.get(&fh.0) else {
                reply.error(Errno::EBADF);
                return;
            };
            let skip = (offset as usize).saturating_sub(l.base);
            for (i, (name, ino, _, attr)) in l.entries.iter().enumerate().skip(skip) {
                let Some(a) = attr else { continue };
                if reply.add(
                    INodeNo(*ino),
                    (l.base + i) as u64 + 1,
                    OsStr::from_bytes(name),
                    &ttl,
                    &file_attr(a),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are committed through Raft before they are acknowledged.
        reply.ok();
    }

    /// No file here takes an ioctl. Programs ask every file they open
    /// whether it is a terminal (`isatty`, as Python's `open` does):
    /// answered as a local file system answers, without fuser's warning
    /// in the mount's log for each.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let fs = self.fs.clone();
        self.spawn("statfs", async move {
            match fs.statfs().await {
                Ok(s) => {
                    let files_free = u64::from(u32::MAX);
                    reply.statfs(
                        s.total_bytes / BLOCK,
                        s.free_bytes / BLOCK,
                        s.free_bytes / BLOCK,
                        s.inodes + files_free,
                        files_free,
                        BLOCK as u32,
                        proto::MAX_NAME_LEN as u32,
                        BLOCK as u32,
                    )
                }
                Err(e) => reply.error(errno("statfs", &e)),
            }
        });
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // Extended attributes are not stored (docs/SEMANTICS.md).
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (mounted with default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let ttl = self.ttl;
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("create", async move {
            // A file just created is empty: opening it needs no layout query.
            let res = fs
                .create_open(parent.0, &name, mode & 0o7777, uid, gid)
                .await;
            match res {
                Ok((a, fh)) => reply.created(
                    &ttl,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }
}

/// Makes sure the listing behind `fh` holds the entry at `offset`, fetching
/// pages as needed and dropping what lies before it. Entry `i` of the
/// stream has FUSE offset `i + 1`; `.` and `..` come first.
async fn fill_listing(
    fs: &Fs,
    dirs: &Mutex<HashMap<u64, DirListing>>,
    fh: u64,
    ino: u64,
    offset: u64,
    plus: bool,
) -> Result<(), ClientError> {
    let offset = offset as usize;
    let want = offset + DIR_PAGE as usize;
    let mut first = true;
    loop {
        let (after, restart) = {
            let mut guard = dirs.lock().unwrap_or_else(|e| e.into_inner());
            let l = guard
                .entry(fh)
                .or_insert_with(|| DirListing::new(ino, plus));
            // A rewind (or a seek back before the window) starts over.
            let restart =
                first && (offset == 0 || l.plus != plus || l.ino != ino || offset < l.base);
            first = false;
            if restart {
                *l = DirListing::new(ino, plus);
            } else {
                let consumed = (offset - l.base).min(l.entries.len());
                l.entries.drain(..consumed);
                l.base += consumed;
                if !l.more || l.base + l.entries.len() >= want {
                    return Ok(());
                }
            }
            (l.cursor.clone(), restart)
        };
        let mut page = Vec::new();
        if restart {
            let dot = fs.getattr(ino).await?;
            page.push((b".".to_vec(), ino, FileKind::Directory, Some(dot)));
            page.push((b"..".to_vec(), ino, FileKind::Directory, Some(dot)));
        }
        let (entries, more) = fs.readdir(ino, &after, DIR_PAGE, plus).await?;
        let cursor = entries.last().map(|e| e.name.to_vec());
        for e in entries {
            let kind = FileKind::try_from(e.kind).unwrap_or(FileKind::Regular);
            page.push((e.name.to_vec(), e.ino, kind, e.attr));
        }
        let mut guard = dirs.lock().unwrap_or_else(|e| e.into_inner());
        let l = guard.get_mut(&fh).ok_or(ClientError::BadHandle(fh))?;
        l.entries.extend(page);
        if let Some(c) = cursor {
            l.cursor = c;
        }
        l.more = more;
        if !l.more || l.base + l.entries.len() >= want {
            return Ok(());
        }
    }
}
