//! A real three-node cluster mounted with FUSE: write and verify a few
//! hundred files and a 200 MiB one, SIGKILL the metadata leader, keep
//! reading and writing, restart it, and check it catches up (by snapshot,
//! since it misses more entries than the log keeps) and serves again.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::{wait_for, Gen, Mount, TestCluster};
use xxhash_rust::xxh3::Xxh3;

const BIG: usize = 200 << 20;

fn hash_file(p: &Path) -> (u64, u128) {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (n, h.digest128())
}

fn write_small_files(
    root: &Path,
    gen: &mut Gen,
    prefix: &str,
    count: usize,
) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..count {
        let dir = root.join(format!("{prefix}-dir{}", i % 7));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let size = (gen.next_u64() % 70_000) as usize;
        let data = gen.bytes(size);
        let name = format!("{prefix}-dir{}/file{i}.bin", i % 7);
        fs::write(root.join(&name), &data).unwrap_or_else(|e| panic!("write {name}: {e}"));
        files.insert(name, data);
    }
    files
}

fn verify_small_files(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in files {
        let got = fs::read(root.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert!(
            got == *data,
            "{name}: content differs ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_survive_a_leader_kill_and_catch_up() {
    // Small snapshot interval and log tail so a node down for a few hundred
    // operations must catch up by snapshot, not by log.
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let mut cluster =
        TestCluster::start(3, &["--snapshot-every", "200", "--keep-logs", "20"]).await;
    // One group: this test is about catching up by snapshot, which needs
    // one group to pass its snapshot interval while the node is down.
    cluster.init_groups(1).await;
    let mnt_dir = tempfile::tempdir().expect("tempdir");
    let mnt = mnt_dir.path().join("mnt");
    let metrics = format!("127.0.0.1:{}", common::free_port());
    // A cache smaller than the big file, so its reads go to the storage
    // nodes (and miss the cache) as well.
    let mount = Mount::with_args(
        &cluster.seeds(),
        &mnt,
        60,
        &["--metrics-listen", &metrics, "--cache-mib", "32"],
    )
    .await;
    let root = mount.path.clone();

    // A few hundred small files and one 200 MiB file.
    let mut gen = Gen(0x5eed_1234_abcd_9876);
    let small = write_small_files(&root, &mut gen, "a", 300);
    let big_path = root.join("big.bin");
    let mut big_hash = Xxh3::new();
    {
        let mut f = fs::File::create(&big_path).expect("create big");
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(BIG >> 20) {
            gen.fill(&mut buf);
            big_hash.update(&buf);
            f.write_all(&buf).expect("write big");
        }
        f.sync_all().expect("fsync big");
    }
    let big_digest = big_hash.digest128();
    verify_small_files(&root, &small);
    {
        // `isatty` on a file of the mount (Python's `open` asks): "not a
        // terminal", as on a local file system.
        use std::os::fd::AsRawFd;
        let f = fs::File::open(&big_path).expect("open big");
        // SAFETY: isatty reads nothing but its descriptor, open here.
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }
    assert_eq!(
        hash_file(&big_path),
        (BIG as u64, big_digest),
        "big file content"
    );

    phase("written and verified");
    // Kill the metadata leader with SIGKILL.
    let leader = cluster.leader().await;
    let killed_id = cluster.nodes[leader].id;
    cluster.kill(leader);

    phase("leader killed");
    // Reads and new writes go on through the mount.
    verify_small_files(&root, &small);
    assert_eq!(
        hash_file(&big_path),
        (BIG as u64, big_digest),
        "big file after leader kill"
    );
    let during = write_small_files(&root, &mut gen, "b", 300);
    verify_small_files(&root, &during);
    fs::rename(root.join("b-dir0"), root.join("b-renamed")).expect("rename dir");
    let during: BTreeMap<String, Vec<u8>> = during
        .into_iter()
        .map(|(k, v)| (k.replacen("b-dir0/", "b-renamed/", 1), v))
        .collect();

    phase("reads and writes after the kill done");
    // The new leader's applied index, which the restarted node must reach.
    let new_leader = cluster.leader().await;
    assert_ne!(
        cluster.nodes[new_leader].id, killed_id,
        "a new leader was elected"
    );
    let target = cluster
        .status(new_leader)
        .await
        .and_then(|s| s.groups.first().map(|g| g.last_applied))
        .expect("leader status");
    let leader_snapshot = cluster
        .status(new_leader)
        .await
        .and_then(|s| s.groups.first().map(|g| g.snapshot_index))
        .unwrap_or(0);
    assert!(
        leader_snapshot > 0,
        "the leader compacted its log while the node was down"
    );

    phase("about to restart the killed node");
    // Restart the killed node: it catches up.
    cluster.spawn(leader);
    cluster.wait_up(leader).await;
    let caught_up = wait_for(
        "the restarted node to catch up",
        Duration::from_secs(60),
        || {
            let c = &cluster;
            async move {
                let g = c.status(leader).await?.groups.into_iter().next()?;
                (g.last_applied >= target).then_some(g)
            }
        },
    )
    .await;
    assert!(
        caught_up.snapshot_index > 0,
        "the restarted node installed a snapshot (snapshot index {})",
        caught_up.snapshot_index
    );
    assert!(
        cluster.log_of(leader).contains("snapshot installed"),
        "the restarted node's log shows a snapshot install"
    );

    phase("restarted node caught up");
    // The survivors logged the node's absence once, not per heartbeat, and
    // the new leader (which sends to it) its return.
    wait_for(
        "the new leader to log the node's return",
        Duration::from_secs(20),
        || {
            let log = cluster.log_of(new_leader);
            async move { log.contains("peer answers again").then_some(()) }
        },
    )
    .await;
    for i in (0..3).filter(|i| *i != leader) {
        let log = cluster.log_of(i);
        let gone = log.matches("peer unreachable").count();
        let least = usize::from(i == new_leader);
        assert!(
            (least..=2).contains(&gone),
            "node {} logged the peer's absence {gone} times",
            i + 1
        );
        assert!(
            !log.contains("failed to send a heartbeat") && !log.contains("update progress error"),
            "per-message warnings about the peer are silenced"
        );
    }
    // The restarted node serves: stop another node so it is needed for the
    // metadata quorum, then read everything again.
    let other = (0..3)
        .find(|i| *i != leader && cluster.nodes[*i].child.is_some())
        .expect("another node");
    cluster.kill(other);
    verify_small_files(&root, &small);
    verify_small_files(&root, &during);
    assert_eq!(
        hash_file(&big_path),
        (BIG as u64, big_digest),
        "big file with the restarted node in the quorum"
    );
    fs::write(
        root.join("after.txt"),
        b"written with the restarted node in the quorum",
    )
    .expect("write after");
    assert_eq!(
        fs::read(root.join("after.txt")).expect("read after"),
        b"written with the restarted node in the quorum"
    );
    // The mount's metrics: operations by type and their errors, the chunk
    // cache, readahead, and the retries the two kills caused.
    let text = common::scrape(&metrics);
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for op in ["lookup", "write", "read", "flush", "rename"] {
        assert!(
            value(&format!("musicfs_client_fuse_ops_total{{op=\"{op}\"}}")) > 0.0,
            "FUSE {op} counted: {text}"
        );
    }
    assert!(text.contains("musicfs_client_fuse_op_seconds_bucket{op=\"read\",le=\"0.001\"}"));
    assert!(value("musicfs_client_chunk_cache_hits_total") > 0.0);
    assert!(value("musicfs_client_chunk_cache_misses_total") > 0.0);
    assert!(value("musicfs_client_prefetched_chunks_total") > 0.0);
    assert!(
        value("musicfs_client_retries_total") > 0.0,
        "retries after the kills: {text}"
    );
    phase("done");
    drop(mount);
}
