//! Reads keep going through node deaths: a reader streams a 500 MiB file
//! while a storage node is SIGKILLed, and later the leader of the file's
//! metadata group; the read finishes with the right bytes and no error.

mod common;

use std::time::Duration;

use common::{Gen, TestCluster};
use proto::group_of_ino;

const SIZE: usize = 500 << 20;
const PIECE: usize = 1 << 20;

/// Index of the node that leads `group`, as the nodes report it.
async fn leader_of(c: &TestCluster, group: u32) -> usize {
    common::wait_for(
        "a leader of the file's group",
        Duration::from_secs(30),
        || async {
            for (i, n) in c.nodes.iter().enumerate() {
                if n.child.is_none() {
                    continue;
                }
                if let Some(st) = c.status(i).await {
                    if st
                        .groups
                        .iter()
                        .any(|g| g.group_id == group && g.state == "leader")
                    {
                        return Some(i);
                    }
                }
            }
            None
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_survives_a_storage_node_and_the_leader_dying() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(30)).await;
    let data = Gen(0x500).bytes(SIZE);
    // A directory whose metadata group node 1 does not lead: node 1 is
    // the replica readers try first (the lowest id), so its death and the
    // leader's are two different faults.
    let mut dir = None;
    for i in 0..32 {
        let name = format!("Album {i}");
        let d = fs
            .create(
                proto::ROOT_INO,
                name.as_bytes(),
                proto::meta::FileKind::Directory,
                0o755,
                0,
                0,
                0,
                b"",
            )
            .await
            .expect("mkdir");
        // Group g prefers the (g mod 3)-th node as its leader.
        if !group_of_ino(d.ino).is_multiple_of(3) {
            dir = Some((name, group_of_ino(d.ino)));
            break;
        }
    }
    let (dir, g) = dir.expect("a directory in a group node 1 does not lead");
    // Leaders spread within seconds of `cluster init`.
    common::wait_for(
        "leadership to move off node 1",
        Duration::from_secs(30),
        || async { (leader_of(&c, g).await != 0).then_some(()) },
    )
    .await;
    let a = fs
        .write_file(&format!("/{dir}/long-mix.flac"), &data, 0o644)
        .await
        .expect("write 500 MiB");
    let group = group_of_ino(a.ino);

    // A fresh client streams the file.
    let reader = c.client(Duration::from_secs(30)).await;
    let fh = reader.open(a.ino).await.expect("open");
    let storage_victim = 0;
    let mut off = 0usize;
    while off < SIZE {
        if off == 100 << 20 {
            // The storage node the reader reads from (not the group's
            // leader) dies mid-song...
            c.kill(storage_victim);
        }
        if off == 250 << 20 {
            // ...comes back...
            c.spawn(storage_victim);
            c.wait_up(storage_victim).await;
        }
        if off == 300 << 20 {
            // ...and then the leader of the file's group dies.
            let l = leader_of(&c, group).await;
            c.kill(l);
        }
        let got = reader
            .read(fh, off as u64, PIECE as u32)
            .await
            .unwrap_or_else(|e| panic!("read at {off} failed: {e}"));
        assert_eq!(got.len(), PIECE.min(SIZE - off), "short read at {off}");
        assert!(
            got[..] == data[off..off + got.len()],
            "wrong bytes at {off}"
        );
        off += got.len();
    }
    reader.release(fh).await.expect("release");
}
