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
