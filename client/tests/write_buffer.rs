//! A client's write buffers are bounded as a whole, not only per file.

mod common;

use std::time::Duration;

use common::{Gen, TestCluster};

/// Many files written at once: the client's buffered bytes stay near its
/// bound (256 MiB, or 4 MiB per file being written) instead of adding up
/// to 32 MiB per file, and every file reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_written_at_once_share_a_bounded_buffer() {
    const FILES: usize = 24;
    const SIZE: usize = 24 << 20;
    const PIECE: usize = 1 << 20;
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    let mut handles = Vec::new();
    for i in 0..FILES {
        let (a, fh) = fs
            .create_open(
                proto::ROOT_INO,
                format!("mix{i:02}.flac").as_bytes(),
                0o644,
                0,
                0,
            )
            .await
            .expect("create");
        handles.push((a.ino, fh));
    }
    // Round-robin 1 MiB pieces: every file is mid-write at once. Unbounded,
    // the buffers would reach FILES * SIZE (576 MiB) before any spilled.
    let piece = |i: usize, k: usize| Gen((i * 1000 + k) as u64).bytes(PIECE);
    let mut peak = 0;
    for k in 0..SIZE / PIECE {
        for (i, (_, fh)) in handles.iter().enumerate() {
            fs.write(*fh, (k * PIECE) as u64, &piece(i, k))
                .await
                .expect("write");
            peak = peak.max(fs.buffered_bytes());
        }
    }
    let bound = musicfs_client::fs::CLIENT_DIRTY_BYTES + FILES * (4 << 20) + (4 << 20);
    assert!(
        peak <= bound,
        "buffered {peak} bytes at the peak, over the bound of {bound}"
    );
    assert!(peak > 64 << 20, "the test did buffer (peak {peak})");
    for (_, fh) in &handles {
        fs.release(*fh).await.expect("close");
    }
    assert_eq!(fs.buffered_bytes(), 0, "nothing stays counted after close");
    for (i, (ino, _)) in handles.iter().enumerate() {
        let fh = fs.open(*ino).await.expect("open");
        for k in [0, SIZE / PIECE / 2, SIZE / PIECE - 1] {
            let got = fs
                .read(fh, (k * PIECE) as u64, PIECE as u32)
                .await
                .expect("read");
            assert!(got[..] == piece(i, k)[..], "file {i} piece {k}");
        }
        fs.release(fh).await.expect("close");
    }
}

/// A spill does not wait for its chunks to be stored: while they are, the
/// file reads back what was written, and memory stays within the per-file
/// bound. Stores that fail (two of three nodes down) are done again by
/// the flush once the nodes are back, and nothing written is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_chunks_read_back_and_outlive_a_failed_store() {
    use musicfs_client::fs::{SPILL_BYTES, STORES_IN_FLIGHT};
    const PIECE: usize = 1 << 20;
    const BEFORE: usize = 80;
    const DURING: usize = 40;
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(3)).await;
    let (a, fh) = fs
        .create_open(proto::ROOT_INO, b"long.flac", 0o644, 0, 0)
        .await
        .expect("create");
    let piece = |k: usize| Gen(k as u64 + 7).bytes(PIECE);
    let mut peak = 0;
    for k in 0..BEFORE {
        fs.write(fh, (k * PIECE) as u64, &piece(k))
            .await
            .expect("write");
        peak = peak.max(fs.buffered_bytes());
        let back = k / 2;
        let got = fs
            .read(fh, (back * PIECE) as u64, PIECE as u32)
            .await
            .expect("read back while writing");
        assert!(got[..] == piece(back)[..], "piece {back} after write {k}");
    }
    // The buffer, the stores under way, one piece, and the chunk a spill
    // keeps buffered (at most 4 MiB).
    let bound = SPILL_BYTES * (1 + STORES_IN_FLIGHT) + PIECE + (4 << 20);
    assert!(peak <= bound, "{peak} bytes held, over {bound}");
    assert!(peak > SPILL_BYTES, "the writes spilled (peak {peak})");

    // Two nodes down: no store can succeed.
    c.kill(1);
    c.kill(2);
    let mut refused = 0;
    for k in BEFORE..BEFORE + DURING {
        if fs.write(fh, (k * PIECE) as u64, &piece(k)).await.is_err() {
            refused += 1;
        }
    }
    assert!(
        fs.flush(fh).await.is_err(),
        "a flush with two of three nodes down succeeded"
    );
    assert!(fs.buffered_bytes() > 0, "the unstored bytes are still held");
    c.spawn(1);
    c.spawn(2);
    c.wait_up(1).await;
    c.wait_up(2).await;
    common::wait_for(
        "the flush to succeed once the nodes are back",
        Duration::from_secs(60),
        || {
            let fs = fs.clone();
            async move { fs.flush(fh).await.ok() }
        },
    )
    .await;
    fs.release(fh).await.expect("close");
    assert_eq!(fs.buffered_bytes(), 0, "nothing stays held after close");

    let other = c.client(Duration::from_secs(20)).await;
    let fh = other.open(a.ino).await.expect("open");
    for k in 0..BEFORE + DURING {
        let got = other
            .read(fh, (k * PIECE) as u64, PIECE as u32)
            .await
            .expect("read");
        assert!(
            got[..] == piece(k)[..],
            "piece {k} (writes refused while nodes were down: {refused})"
        );
    }
    other.release(fh).await.expect("close");
}
