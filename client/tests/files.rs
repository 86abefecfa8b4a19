//! File semantics through the client core against a real cluster: sparse
//! files, overwrites and truncation, and close-to-open visibility between
//! two clients (docs/SEMANTICS.md).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gen, TestCluster};
use musicfs_client::Fs;
use proto::meta::{FileKind, SetAttrFields};

async fn client(c: &TestCluster) -> Arc<Fs> {
    c.client(Duration::from_secs(20)).await
}

async fn read_all(fs: &Fs, fh: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = fs.read(fh, out.len() as u64, 1 << 20).await.expect("read");
        assert!(!b.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_files_overwrites_and_truncation() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = client(&c).await;
    let a = fs
        .create(
            proto::ROOT_INO,
            b"sparse",
            FileKind::Regular,
            0o644,
            0,
            0,
            0,
            b"",
        )
        .await
        .expect("create");
    let fh = fs.open(a.ino).await.expect("open");
    // 4 KiB at 0 and 4 KiB at 3 GiB: a 3 GiB file that stores 8 KiB.
    let far = 3u64 << 30;
    fs.write(fh, 0, &[1u8; 4096]).await.expect("write head");
    fs.write(fh, far, &[2u8; 4096]).await.expect("write tail");
    fs.flush(fh).await.expect("flush");
    let st = fs.getattr(a.ino).await.expect("stat");
    assert_eq!(st.size, far + 4096);
    let hole = fs.read(fh, 1 << 30, 4096).await.expect("read hole");
    assert!(hole.iter().all(|b| *b == 0), "holes read as zeros");
    assert_eq!(
        &fs.read(fh, far, 4096).await.expect("read tail")[..],
        &[2u8; 4096][..]
    );
    let stats = fs.statfs().await.expect("statfs");
    assert!(
        stats.used_bytes < 1 << 20,
        "a sparse file stores only its data ({} bytes)",
        stats.used_bytes
    );

    // Overwrite the middle of a committed region, then shrink and grow.
    let mut gen = Gen(99);
    let mut want = gen.bytes(3 << 20);
    fs.write(fh, 0, &want).await.expect("write 3 MiB");
    fs.flush(fh).await.expect("flush");
    let patch = gen.bytes(100_000);
    fs.write(fh, 1_000_000, &patch).await.expect("patch");
    want[1_000_000..1_100_000].copy_from_slice(&patch);
    fs.setattr(
        a.ino,
        SetAttrFields {
            size: Some(2_000_000),
            ..Default::default()
        },
    )
    .await
    .expect("truncate down");
    want.truncate(2_000_000);
    fs.setattr(
        a.ino,
        SetAttrFields {
            size: Some(2_500_000),
            ..Default::default()
        },
    )
    .await
    .expect("extend");
    want.resize(2_500_000, 0);
    assert_eq!(
        read_all(&fs, fh, 2_500_000).await,
        want,
        "content after patch, shrink and grow"
    );
    fs.release(fh).await.expect("release");
    assert_eq!(
        fs.read_file("/sparse").await.expect("reopen"),
        want,
        "committed content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_truncated_away_and_written_again_commits() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = client(&c).await;
    let data = Gen(5).bytes(3 << 20);
    let a = fs
        .write_file("/again.flac", &data, 0o644)
        .await
        .expect("write");
    // One open handle keeps the file's old layout and chunk locations
    // while its references are dropped by a truncate, then the same bytes
    // (so the same chunks) are written again: they must be stored and
    // named again, not assumed still there.
    let ids: Vec<proto::ChunkId> = fs
        .chunk_locations("/again.flac")
        .await
        .expect("locations")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let fh = fs.open(a.ino).await.expect("open");
    fs.setattr(
        a.ino,
        SetAttrFields {
            size: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("truncate");
    // Until the dropped references have reached every chunk's group.
    let groups = fs.cluster().group_count();
    common::wait_for(
        "the chunks to be unreferenced",
        Duration::from_secs(10),
        || async {
            for id in &ids {
                let r = fs
                    .cluster()
                    .query(
                        id.group(groups),
                        proto::meta::query::Q::ChunkInfo(proto::meta::ChunkInfoQuery {
                            chunk_ids: vec![id.0.to_vec().into()],
                        }),
                    )
                    .await
                    .ok()?;
                if r.chunks.first().is_none_or(|c| c.known) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        fs.write(fh, (i as u64) << 20, piece).await.expect("write");
    }
    fs.flush(fh).await.expect("flush commits");
    fs.release(fh).await.expect("release");
    assert_eq!(fs.read_file("/again.flac").await.expect("read"), data);
}

/// A cluster, a writer and a reader client, and the inode of
/// `/song.flac`, written as "version one".
async fn writer_and_reader() -> (TestCluster, Arc<Fs>, Arc<Fs>, u64) {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let (w, r) = (client(&c).await, client(&c).await);
    w.write_file("/song.flac", b"version one", 0o644)
        .await
        .expect("write v1");
    let ino = r.resolve("/song.flac").await.expect("resolve").ino;
    (c, w, r, ino)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_to_open_between_two_clients() {
    let (_c, w, r, ino) = writer_and_reader().await;

    // A reader that opened before the writer's close keeps its version...
    let old = r.open(ino).await.expect("open old");
    let wh = w.open(ino).await.expect("open for write");
    w.write(wh, 0, b"VERSION TWO, longer")
        .await
        .expect("write v2");
    assert_eq!(
        &r.read(old, 0, 100).await.expect("read")[..],
        b"version one",
        "no uncommitted data is visible"
    );
    w.release(wh).await.expect("close commits");
    assert_eq!(
        &r.read(old, 0, 100).await.expect("read")[..],
        b"version one",
        "an open handle keeps its version"
    );
    r.release(old).await.expect("release");
    // ...and an open after the close sees the new version in full.
    assert_eq!(
        r.read_file("/song.flac").await.expect("reopen"),
        b"VERSION TWO, longer"
    );

    // A file deleted by one client is gone for the other.
    w.remove_path("/song.flac").await.expect("unlink");
    let e = r.resolve("/song.flac").await.expect_err("deleted");
    assert_eq!(e.errno(), libc::ENOENT);
}

/// With node 1 (the first a client tries when it knows no leader) dead,
/// calls must not keep starting there: the node that answers is
/// remembered as the group's leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_that_answers_is_remembered_as_leader() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init_groups(1).await;
    c.kill(0);
    let fs = client(&c).await;
    for i in 0..5 {
        fs.write_file(&format!("/f{i}"), b"x", 0o644)
            .await
            .expect("write with node 1 down");
        let leader = c.nodes[c.leader().await].id;
        assert_eq!(
            fs.cluster().cached_leader(0),
            Some(leader),
            "call {i}: the client remembers the leader that answered"
        );
    }
}

/// Close-to-open holds for every open, also while the same client keeps
/// an older handle on the file open: the new open sees the new version,
/// the older handle keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_sees_earlier_closes_while_older_handles_stay_open() {
    let (_c, w, r, ino) = writer_and_reader().await;
    let old = r.open(ino).await.expect("open v1");
    w.write_file("/song.flac", b"VERSION TWO, longer", 0o644)
        .await
        .expect("write v2");

    let new = r.open(ino).await.expect("open v2");
    assert_eq!(
        &r.read(new, 0, 100).await.expect("read new")[..],
        b"VERSION TWO, longer",
        "an open after the writer's close sees its version"
    );
    assert_eq!(
        &r.read(old, 0, 100).await.expect("read old")[..],
        b"version one",
        "the handle opened before keeps its version"
    );
    let again = r.open(ino).await.expect("open v2 again");
    assert_eq!(
        &r.read(again, 0, 100).await.expect("read again")[..],
        b"VERSION TWO, longer"
    );
    for fh in [old, new, again] {
        r.release(fh).await.expect("release");
    }
    assert_eq!(r.open_handles(), 0);
}

/// A layout commit whose replies were all lost (its retries ran out, the
/// application saw EIO) is sent again at close under the same request id:
/// it applied once already, so it does not apply again over what another
/// client wrote meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_sent_again_after_lost_replies_applies_once() {
    let mut c = TestCluster::start(1, &[]).await;
    c.init_groups(1).await;
    let a = c.client(Duration::from_secs(2)).await;
    let b = client(&c).await;
    a.write_file("/song.flac", b"version one", 0o644)
        .await
        .expect("write v1");
    let ino = a.resolve("/song.flac").await.expect("resolve").ino;

    // The node applies A's commands and drops every answer to them.
    c.kill(0);
    c.nodes[0].env = vec![(
        "FAILPOINTS".into(),
        format!("reply-lost=return({})", a.cluster().client_id()),
    )];
    c.spawn(0);
    c.wait_up(0).await;
    let fh = a.open(ino).await.expect("open");
    a.write(fh, 0, b"version two, from A")
        .await
        .expect("buffered write");
    let e = a.flush(fh).await.expect_err("A hears no answer");
    assert!(e.is_indefinite(), "a lost answer is no definite error: {e}");
    assert_eq!(
        b.read_file("/song.flac").await.expect("read A's"),
        b"version two, from A",
        "the commit did apply"
    );
    b.write_file("/song.flac", b"version three, from B", 0o644)
        .await
        .expect("B overwrites");

    // Answers flow again; A's close sends its unanswered commit again.
    c.kill(0);
    c.nodes[0].env.clear();
    c.spawn(0);
    c.wait_up(0).await;
    assert_eq!(
        b.read_file("/song.flac").await.expect("read after restart"),
        b"version three, from B"
    );
    a.release(fh)
        .await
        .expect("the commit sent again gets the first attempt's answer");
    assert_eq!(
        b.read_file("/song.flac")
            .await
            .expect("read after A's close"),
        b"version three, from B",
        "A's commit did not apply a second time"
    );
}

/// A file rewritten through the write path (here 80 MiB, so the buffer
/// spills twice before the close) is cut exactly as a whole-file cut of
/// its new content: a rewrite with a changed header then shares every
/// chunk after it with the old content, and sends only what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_bigger_than_the_buffer_is_cut_as_a_whole_file() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = client(&c).await;
    let mut data = vec![0u8; 80 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let a = fs.write_file("/big", &data, 0o644).await.expect("write");
    // The chunk index learns of the chunks after the commit (references
    // are delivered in the background); the rewrite's dedup asks it.
    common::wait_for(
        "the chunk index to know every chunk",
        Duration::from_secs(60),
        || async {
            let locs = fs.chunk_locations("/big").await.ok()?;
            locs.iter().all(|(_, l)| !l.is_empty()).then_some(())
        },
    )
    .await;
    // A longer header: everything after it moves by 100 bytes.
    let mut new = vec![7u8; 100];
    new.extend_from_slice(&data);
    new.truncate(data.len());
    let before = fs.cluster().chunk_bytes_sent();
    fs.replace_content(a.ino, a.size, &mut &new[..], |_| {})
        .await
        .expect("rewrite");
    let sent = fs.cluster().chunk_bytes_sent() - before;
    let stored: Vec<_> = fs
        .chunk_locations("/big")
        .await
        .expect("layout")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut whole: Vec<_> = musicfs_client::layout::cut(0, &new)
        .into_iter()
        .map(|c| c.id)
        .collect();
    whole.sort();
    whole.dedup();
    assert_eq!(stored, whole, "the same chunks as a whole-file cut");
    assert!(fs.read_file("/big").await.expect("read") == new);
    // Only the first chunk (or two, where FastCDC finds its way back) is new.
    assert!(sent < 8 << 20, "{sent} bytes sent for a 100-byte shift");
}

async fn make(fs: &Fs, parent: u64, name: &str, kind: FileKind) -> proto::meta::Attr {
    fs.create(parent, name.as_bytes(), kind, 0o755, 0, 0, 0, b"")
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// The kernel asks for a directory's attributes after every create in it
/// (its cached ones are dropped): the client answers from the create's
/// reply, without a round trip (it answers with every node down), and
/// asks the cluster once another command of this client ran or the
/// attribute time ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_stat_after_a_create_is_the_create_s_answer() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = client(&c).await;
    let other = client(&c).await;
    let ttl = Duration::from_secs(60);
    let d = make(&fs, proto::ROOT_INO, "album", FileKind::Directory).await;

    // After a create: the directory as the cluster has it now.
    make(&fs, d.ino, "01.flac", FileKind::Regular).await;
    let server = fs.getattr(d.ino).await.expect("stat");
    let fresh = fs.getattr_within(d.ino, ttl).await.expect("stat");
    assert_eq!(
        fresh, server,
        "the create's answer is not the directory now"
    );
    assert_ne!(
        server.mtime, d.mtime,
        "the create did not touch the directory"
    );

    // Another command of this client (an unlink in it): asked again.
    fs.remove(d.ino, b"01.flac", false).await.expect("unlink");
    let server = fs.getattr(d.ino).await.expect("stat");
    assert_eq!(fs.getattr_within(d.ino, ttl).await.expect("stat"), server);

    // Another client's create is seen once the attribute time is over
    // (here at once: a zero time).
    make(&fs, d.ino, "02.flac", FileKind::Regular).await;
    make(&other, d.ino, "03.flac", FileKind::Regular).await;
    let server = other.getattr(d.ino).await.expect("stat");
    let zero = fs
        .getattr_within(d.ino, Duration::ZERO)
        .await
        .expect("stat");
    assert_eq!(zero, server, "a zero attribute time served a cached answer");

    // No round trip: with every node down the answer still comes.
    let last = make(&fs, d.ino, "04.flac", FileKind::Regular).await;
    let server = fs.getattr(d.ino).await.expect("stat");
    for i in 0..3 {
        c.kill(i);
    }
    let got = tokio::time::timeout(Duration::from_secs(5), fs.getattr_within(d.ino, ttl))
        .await
        .expect("the stat waited on the cluster")
        .expect("stat");
    assert_eq!(got, server);
    assert_eq!(
        got.mtime, last.ctime,
        "the directory's time is the create's"
    );
}
