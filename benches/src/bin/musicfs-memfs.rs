//! The FUSE ceiling for the read benchmark (docs/BENCHMARKS.md): a
//! read-only file system that serves one file, `big.bin`, from memory,
//! mounted with the same FUSE settings as `musicfs mount` (1 MiB
//! requests, 64 background requests, the same kernel read-ahead, two
//! FUSE threads). Reading it measures what FUSE itself allows on this
//! machine; no file system behind FUSE can be faster.
//!
//! `musicfs-memfs MOUNTPOINT --file LOCAL` serves LOCAL's bytes (read into
//! memory at start) until SIGINT/SIGTERM.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, Request,
};

#[derive(Parser)]
struct Args {
    mountpoint: PathBuf,
    /// The file whose bytes `big.bin` serves.
    #[arg(long)]
    file: PathBuf,
    /// The kernel's read-ahead for the mount in KiB (as `musicfs mount`).
    #[arg(long, default_value_t = musicfs_client::admin::DEFAULT_READ_AHEAD_KIB)]
    read_ahead_kib: u32,
}

const TTL: Duration = Duration::from_secs(3600);
const FILE_INO: u64 = 2;
const NAME: &str = "big.bin";

struct MemFs {
    data: Arc<Vec<u8>>,
}

fn attr(ino: u64, size: u64) -> FileAttr {
    let dir = ino == 1;
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o444 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Filesystem for MemFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == NAME {
            reply.entry(&TTL, &attr(FILE_INO, self.data.len() as u64), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 => reply.attr(&TTL, &attr(1, 0)),
            FILE_INO => reply.attr(&TTL, &attr(FILE_INO, self.data.len() as u64)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // As `musicfs mount` for an unchanged file: the kernel keeps its pages.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.data.len() as u64;
        let start = offset.min(len) as usize;
        let end = (offset + u64::from(size)).min(len) as usize;
        reply.data(&self.data[start..end]);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let data = std::fs::read(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![MountOption::FSName("musicfs-memfs".into()), MountOption::RO];
    cfg.n_threads = Some(2);
    let fs = MemFs {
        data: Arc::new(data),
    };
    let session = fuser::spawn_mount(fs, &args.mountpoint, &cfg)
        .with_context(|| format!("mount at {}", args.mountpoint.display()))?;
    if args.read_ahead_kib > 0 {
        musicfs_client::admin::set_read_ahead(&args.mountpoint, args.read_ahead_kib)
            .context("set the mount's read-ahead")?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    session.umount_and_join()?;
    Ok(())
}
