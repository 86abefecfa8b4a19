//! Two mounts of one cluster: what one writes the other sees after
//! close/open, a file renamed or deleted by one yields the right errors
//! on the other, and no cache (the kernel's pages, the chunk cache in
//! memory or on disk) serves bytes of an older version once a new one is
//! visible — also across a remount with the same on-disk cache.

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use common::{wait_for, Gen, Mount, TestCluster};

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(p)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first wrong byte at {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_mounts_see_each_others_changes_after_close_and_open() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    let cache_dir = dir.path().join("disk-cache");
    let cache_arg = cache_dir.display().to_string();
    let a = Mount::new(&c.seeds(), &pa, 30).await;
    let mut b = Mount::with_args(
        &c.seeds(),
        &pb,
        30,
        &["--disk-cache-dir", &cache_arg, "--disk-cache-mib", "256"],
    )
    .await;
    let mut gen = Gen(0x2a);

    // A write on A is visible on B after A's close and B's open.
    fs::create_dir(pa.join("Album")).expect("mkdir on A");
    let v1 = gen.bytes(3 << 20);
    fs::write(pa.join("Album/track.flac"), &v1).expect("write v1 on A");
    assert_same(
        &read_all(&pb.join("Album/track.flac")).expect("read v1 on B"),
        &v1,
        "v1 on B",
    );

    // New versions of the same size and of other sizes: B reads each one
    // whole after A closes it, though B's kernel, memory and disk caches
    // hold the previous one.
    for (round, size) in [3 << 20, 5 << 20, 1 << 20, (1 << 20) + 4097]
        .into_iter()
        .enumerate()
    {
        let v = gen.bytes(size);
        fs::write(pa.join("Album/track.flac"), &v).expect("rewrite on A");
        let got = read_all(&pb.join("Album/track.flac")).expect("read on B");
        assert_same(&got, &v, &format!("version {} on B", round + 2));
        let meta = fs::metadata(pb.join("Album/track.flac")).expect("stat on B");
        assert_eq!(
            meta.len(),
            size as u64,
            "size on B after version {}",
            round + 2
        );
    }

    // A re-read of an unchanged file on B keeps the kernel's pages and
    // still returns the same bytes.
    let last = read_all(&pa.join("Album/track.flac")).expect("read on A");
    for _ in 0..2 {
        assert_same(
            &read_all(&pb.join("Album/track.flac")).expect("re-read on B"),
            &last,
            "re-read on B",
        );
    }

    // A part of the file changed in place (a tag edit): B's next open
    // reads the new bytes at that offset and the old ones elsewhere.
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(pa.join("Album/track.flac"))
            .expect("open on A for writing");
        f.seek(SeekFrom::Start(1000)).expect("seek");
        f.write_all(b"RETAGGED").expect("write in place");
    }
    let mut want = last.clone();
    want[1000..1008].copy_from_slice(b"RETAGGED");
    assert_same(
        &read_all(&pb.join("Album/track.flac")).expect("read after edit on B"),
        &want,
        "in-place edit on B",
    );

    // Deleted on A: B's open fails with ENOENT at once, even while its
    // kernel may still hold the name.
    fs::write(pa.join("Album/gone.mp3"), gen.bytes(70_000)).expect("write on A");
    read_all(&pb.join("Album/gone.mp3")).expect("read on B before the delete");
    fs::remove_file(pa.join("Album/gone.mp3")).expect("unlink on A");
    let e = read_all(&pb.join("Album/gone.mp3")).expect_err("open of a deleted file on B");
    assert_eq!(e.kind(), ErrorKind::NotFound, "deleted file on B: {e}");

    // Renamed on A: B finds it under the new name at once, and the old
    // name is gone once B's cached name expires (1 s); never other bytes.
    let moved = gen.bytes(100_000);
    fs::write(pa.join("Album/old name.ogg"), &moved).expect("write on A");
    read_all(&pb.join("Album/old name.ogg")).expect("read on B before the rename");
    fs::rename(pa.join("Album/old name.ogg"), pa.join("Album/new name.ogg")).expect("rename");
    assert_same(
        &read_all(&pb.join("Album/new name.ogg")).expect("new name on B"),
        &moved,
        "renamed file on B",
    );
    let pb2 = pb.clone();
    wait_for(
        "the old name to disappear on B",
        Duration::from_secs(10),
        || {
            let r = match read_all(&pb2.join("Album/old name.ogg")) {
                Err(e) if e.kind() == ErrorKind::NotFound => Some(()),
                Err(e) => panic!("old name on B: {e}"),
                Ok(bytes) => {
                    // Until then the name may still lead to the (same)
                    // file, never to anything else.
                    assert_same(&bytes, &moved, "old name on B before it expires");
                    None
                }
            };
            async move { r }
        },
    )
    .await;

    // B remounts with the same disk cache: every chunk of the current
    // version reads back right, whatever older versions the cache holds.
    b.unmount();
    let chunks_on_disk = walk_count(&cache_dir);
    assert!(
        chunks_on_disk > 0,
        "the disk cache kept chunks across the unmount"
    );
    let b = Mount::with_args(
        &c.seeds(),
        &pb,
        30,
        &["--disk-cache-dir", &cache_arg, "--disk-cache-mib", "256"],
    )
    .await;
    assert_same(
        &read_all(&b.path.join("Album/track.flac")).expect("read after remount"),
        &want,
        "after B's remount",
    );
    drop(a);
}

/// Files in `dir` and its subdirectories.
fn walk_count(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).expect("read cache dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            n += walk_count(&e.path());
        } else if e.file_name() != ".lock" {
            n += 1;
        }
    }
    n
}

/// A mount that caches attributes for a minute still reads a file in
/// full after another client grew or shrank it: the open drops the size
/// its kernel cached from an earlier lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_sees_the_new_size_despite_cached_attributes() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    let _a = Mount::new(&c.seeds(), &pa, 30).await;
    let _b = Mount::with_args(&c.seeds(), &pb, 30, &["--attr-timeout-ms", "60000"]).await;
    let mut gen = Gen(0x51e);
    for (round, (first, second)) in [(100_000, 3 << 20), (3 << 20, 70_000)]
        .into_iter()
        .enumerate()
    {
        let name = format!("track{round}.mp3");
        fs::write(pa.join(&name), gen.bytes(first)).expect("write on A");
        // B learns the size by a lookup only (no open).
        let m = fs::metadata(pb.join(&name)).expect("stat on B");
        assert_eq!(m.len(), first as u64);
        let v = gen.bytes(second);
        fs::write(pa.join(&name), &v).expect("rewrite on A");
        assert_same(
            &read_all(&pb.join(&name)).expect("read on B"),
            &v,
            &format!("round {round}: B's open after A's close"),
        );
    }
}
