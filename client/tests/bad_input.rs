//! Bad input gets a clear error and loses nothing: a second `cluster init`,
//! a mount of an unreachable cluster, a node started with the wrong id or
//! another cluster's data directory, and bad names.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin_dir, free_port, wait_for, TestCluster};
use musicfs_client::{admin, parse_seeds};
use proto::meta::FileKind;

async fn fs_of(c: &TestCluster) -> std::sync::Arc<musicfs_client::Fs> {
    c.client(Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_init_is_refused_and_changes_nothing() {
    let c = TestCluster::start(3, &[]).await;
    let first = c.init().await;
    let fs = fs_of(&c).await;
    fs.write_file("/keep.txt", b"precious", 0o644)
        .await
        .expect("write");

    // On plain TCP `init` wants to be told that is meant.
    let out = Command::new(bin_dir().join("musicfs"))
        .args(["cluster", "init", "--peers", &c.peers()])
        .output()
        .expect("run musicfs");
    assert!(
        !out.status.success(),
        "init on plain TCP without --insecure"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure"), "says how: {err}");
    let out = Command::new(bin_dir().join("musicfs"))
        .args(["cluster", "init", "--insecure", "--peers", &c.peers()])
        .output()
        .expect("run musicfs");
    assert!(!out.status.success(), "second init must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already belongs to cluster"),
        "clear message: {err}"
    );
    assert!(err.contains(&first), "names the existing cluster: {err}");

    // Healthy once the file's chunks all have their copies (a third copy
    // that was slow to land is left to repair).
    let seeds = parse_seeds(&c.seeds()).unwrap();
    let view = wait_for("a healthy cluster", Duration::from_secs(30), || {
        let seeds = seeds.clone();
        async move {
            let v = admin::cluster_status(&seeds).await.ok()?;
            v.healthy.then_some(v)
        }
    })
    .await;
    assert_eq!(view.cluster_id, first);
    assert_eq!(fs.read_file("/keep.txt").await.expect("read"), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounting_an_unreachable_cluster_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let out = Command::new(bin_dir().join("musicfs"))
        .args(["mount", "--deadline-secs", "2", "--cluster"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(dir.path())
        .output()
        .expect("run musicfs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the cluster"),
        "clear message: {err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "fails within the deadline"
    );

    let bad = Command::new(bin_dir().join("musicfs"))
        .args(["mount", "--cluster", "not-an-address"])
        .arg(dir.path())
        .output()
        .expect("run musicfs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not HOST:PORT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_stays_with_its_node_and_cluster() {
    let mut a = TestCluster::start(3, &[]).await;
    let cluster_a = a.init().await;
    let fs = fs_of(&a).await;
    fs.write_file("/a.txt", b"cluster a", 0o644)
        .await
        .expect("write a");

    // Restarting node 3 with another id on its data directory is refused.
    a.kill(2);
    let out = Command::new(bin_dir().join("musicfs-node"))
        .args([
            "--id",
            "7",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data",
        ])
        .arg(&a.nodes[2].data)
        .env("MUSICFS_CLUSTER_SECRET_FILE", a.secret_file())
        .output()
        .expect("run musicfs-node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to node 3"), "clear message: {err}");

    // Node 3 of cluster A restarted on cluster B's node-3 data directory:
    // A's nodes are refused, both clusters keep their data.
    let mut b = TestCluster::start(3, &[]).await;
    let cluster_b = b.init().await;
    let fs_b = fs_of(&b).await;
    fs_b.write_file("/b.txt", b"cluster b", 0o644)
        .await
        .expect("write b");
    b.kill(2);
    let b3_data = b.nodes[2].data.clone();
    a.nodes[2].data = b3_data;
    a.spawn(2);
    a.wait_up(2).await;
    let st = a.status(2).await.expect("status");
    assert_eq!(
        st.cluster_id, cluster_b,
        "the node kept the cluster of its data directory"
    );
    wait_for(
        "the refusal in the node log",
        Duration::from_secs(20),
        || {
            let log = a.log_of(2);
            async move {
                log.contains("refusing raft message from another cluster")
                    .then_some(())
            }
        },
    )
    .await;
    // Cluster A still works on its two remaining nodes, cluster B's data is intact.
    fs.write_file("/a2.txt", b"still writable", 0o644)
        .await
        .expect("write a2");
    assert_eq!(fs.read_file("/a.txt").await.expect("read a"), b"cluster a");
    let view = admin::cluster_status(&parse_seeds(&a.nodes[0].addr).unwrap())
        .await
        .expect("status");
    assert_eq!(view.cluster_id, cluster_a);
    a.kill(2);
    b.nodes[2].data = a.nodes[2].data.clone();
    b.spawn(2);
    b.wait_up(2).await;
    assert_eq!(
        fs_b.read_file("/b.txt").await.expect("read b"),
        b"cluster b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_get_clear_errors() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = fs_of(&c).await;
    let long = vec![b'x'; 256];
    for (name, errno) in [
        (&long[..], libc::ENAMETOOLONG),
        (&b"a/b"[..], libc::EINVAL),
        (&b"a\0b"[..], libc::EINVAL),
        (&b".."[..], libc::EINVAL),
    ] {
        let e = fs
            .create(
                proto::ROOT_INO,
                name,
                FileKind::Regular,
                0o644,
                0,
                0,
                0,
                b"",
            )
            .await
            .expect_err("bad name accepted");
        assert_eq!(e.errno(), errno, "{e}");
    }
    let (entries, _) = fs
        .readdir(proto::ROOT_INO, b"", 100, false)
        .await
        .expect("readdir");
    assert!(entries.is_empty(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_writes_survive_a_failed_upload_and_commit_later() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(3)).await;
    let attr = fs
        .create(
            proto::ROOT_INO,
            b"big",
            FileKind::Regular,
            0o644,
            0,
            0,
            0,
            b"",
        )
        .await
        .expect("create");
    let fh = fs.open(attr.ino).await.expect("open");
    let mut gen = common::Gen(7);
    let first = gen.bytes(8 << 20);
    fs.write(fh, 0, &first).await.expect("buffered write");

    // Two of three nodes down: the write that spills returns without
    // waiting for its store, which cannot succeed now (the failure shows
    // at the flush, as EIO)...
    c.kill(1);
    c.kill(2);
    let second = gen.bytes(32 << 20);
    fs.write(fh, first.len() as u64, &second)
        .await
        .expect("a spill does not wait for its store");
    assert!(
        fs.buffered_bytes() >= first.len() + second.len(),
        "the spilled bytes are held until they are stored"
    );
    let err = fs
        .flush(fh)
        .await
        .expect_err("nothing can commit without a quorum");
    assert_eq!(err.errno(), libc::EIO, "{err}");

    // ...and once they are back, a flush commits every byte written.
    c.spawn(1);
    c.spawn(2);
    c.wait_up(1).await;
    c.wait_up(2).await;
    wait_for("a flush to succeed", Duration::from_secs(60), || {
        let fs = fs.clone();
        async move { fs.flush(fh).await.ok() }
    })
    .await;
    fs.release(fh).await.expect("release");
    let mut want = first;
    want.extend_from_slice(&second);
    let got = fs.read_file("/big").await.expect("read back");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "content differs after the failed upload");
}
