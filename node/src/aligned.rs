//! Chunk bytes at a page-aligned address, and the writing of a chunk file
//! with `O_DIRECT`.
//!
//! A buffered write copies every chunk into the page cache, and the kernel
//! then manages, writes back and reclaims those pages: on a node receiving
//! three replicas' worth of a client's writes that copy was a quarter of
//! the node's CPU. With `O_DIRECT` the disk reads the chunk from the
//! node's own buffer. The file's aligned prefix goes that way; the tail
//! (under one block) is written buffered, so no padding ever reaches the
//! file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Alignment of `O_DIRECT` buffers, offsets and lengths: the page size,
/// a multiple of the logical block size of the disks in use (512 or 4096
/// bytes). A device that wants more refuses the write with `EINVAL`, and
/// the chunk is written buffered.
pub const ALIGN: usize = 4096;
/// Buffers kept for reuse: a new buffer costs the kernel a page fault and
/// a page clear for every 4 KiB the first time it is touched.
const POOLED: usize = 8;
/// Buffers larger than this are not kept (FastCDC's largest chunk is 4 MiB).
const POOL_MAX_BYTES: usize = (4 << 20) + ALIGN;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// `len` bytes starting at a page-aligned address inside a pooled buffer.
pub struct AlignedBuf {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer for `len` bytes; its content is unspecified until filled.
    pub fn new(len: usize) -> Self {
        let need = len + ALIGN;
        let pooled = if need <= POOL_MAX_BYTES {
            POOL.lock().unwrap_or_else(|e| e.into_inner()).pop()
        } else {
            None
        };
        let mut buf = pooled.unwrap_or_default();
        if buf.len() < need {
            // Poolable buffers are allocated at the pool's size, so each is
            // allocated (and zeroed) once.
            buf.resize(need.max(POOL_MAX_BYTES), 0);
        }
        let off = buf.as_ptr().align_offset(ALIGN);
        AlignedBuf { buf, off, len }
    }

    /// A copy of `data` at an aligned address.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.buf.len() <= POOL_MAX_BYTES {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOLED {
                pool.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// Creates `path` as a new file for writing, switched to `O_DIRECT` where
/// the file system allows it (tmpfs before Linux 6.6 does not). Returns
/// the file and whether it is direct.
pub fn create_new(path: &std::path::Path) -> io::Result<(File, bool)> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    // Switched after the create: an open with O_DIRECT that the file
    // system refuses has created the file already.
    match set_direct(&f, true) {
        Ok(()) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((f, false)),
        Err(e) => Err(e),
    }
}

/// Writes `data` at offset 0 of the new file `f`: its aligned prefix
/// directly when `direct` and `data` sits at an aligned address (copied to
/// one otherwise), the rest buffered. Durability is the caller's fsync.
pub fn write_chunk(f: &File, direct: bool, data: &[u8]) -> io::Result<()> {
    let prefix = data.len() / ALIGN * ALIGN;
    if direct && prefix > 0 {
        let copy;
        let src = if data.as_ptr().align_offset(ALIGN) == 0 {
            &data[..prefix]
        } else {
            copy = AlignedBuf::copy_of(&data[..prefix]);
            copy.as_slice()
        };
        match f.write_all_at(src, 0) {
            Ok(()) => {}
            // A device whose blocks are larger than ALIGN: write it all
            // buffered instead.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(f, false)?;
                return f.write_all_at(data, 0);
            }
            Err(e) => return Err(e),
        }
        if prefix == data.len() {
            return Ok(());
        }
        set_direct(f, false)?;
        return f.write_all_at(&data[prefix..], prefix as u64);
    }
    if direct {
        set_direct(f, false)?;
    }
    f.write_all_at(data, 0)
}

fn set_direct(f: &File, on: bool) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above; only the O_DIRECT status flag changes.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        for len in [0, 1, ALIGN - 1, ALIGN, 3 << 20, POOL_MAX_BYTES] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr().align_offset(ALIGN), 0);
            assert_eq!(b.as_mut_slice().len(), len);
        }
        let big = AlignedBuf::new(8 << 20);
        assert_eq!(big.as_slice().len(), 8 << 20);
    }

    #[test]
    fn every_length_and_alignment_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 3 * ALIGN + 7)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let aligned = AlignedBuf::copy_of(&data);
        let mut n = 0;
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            5 * ALIGN,
            (1 << 20) + 3,
            data.len(),
        ] {
            // An aligned source, and one a byte off alignment (copied).
            for src in [&aligned.as_slice()[..len], &data[1..len.max(1)]] {
                let p = dir.path().join(format!("f{n}"));
                n += 1;
                let (f, direct) = create_new(&p).unwrap();
                write_chunk(&f, direct, src).unwrap();
                f.sync_all().unwrap();
                drop(f);
                assert_eq!(std::fs::read(&p).unwrap(), src, "length {}", src.len());
            }
        }
    }
}
