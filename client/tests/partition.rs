//! One node partitioned away (iptables drops every packet to its port and
//! every packet it sends): stats and reads through a mount still succeed,
//! each within the mount's deadline, whichever groups the lost node led
//! and whichever chunks it held. Healed, the node catches up and serves.
//! Needs root and iptables.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{wait_for, Gen, Mount, TestCluster};

const DEADLINE_SECS: u64 = 20;

fn timed<T>(what: &str, f: impl FnOnce() -> std::io::Result<T>) -> (T, Duration) {
    let start = Instant::now();
    let v = f().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = start.elapsed();
    if took > Duration::from_secs(1) {
        eprintln!("{what}: {took:?}");
    }
    assert!(
        took < Duration::from_secs(DEADLINE_SECS),
        "{what} took {took:?}, past the {DEADLINE_SECS} s deadline"
    );
    (v, took)
}

fn files(root: &Path) -> Vec<String> {
    (0..12)
        .map(|i| format!("Artist {}/Album/track {i:02}.flac", i % 6))
        .map(|p| root.join(p).display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_and_reads_succeed_with_one_node_partitioned_away() {
    let c = TestCluster::start_partitionable(3, &[]).await;
    c.init().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    let m = Mount::with_args(&c.seeds(), &mnt, DEADLINE_SECS, &[]).await;
    let mut gen = Gen(0x9a47);
    let mut contents = Vec::new();
    for p in files(&m.path) {
        fs::create_dir_all(Path::new(&p).parent().expect("parent")).expect("mkdir");
        let data = gen.bytes(2 << 20);
        fs::write(&p, &data).unwrap_or_else(|e| panic!("write {p}: {e}"));
        contents.push((p, data));
    }

    // Cut off the node that leads group 0 (and, with leaders spread, some
    // of the files' groups): every call this client has cached for it
    // must move on.
    let victim = c.leader().await;
    let mut part = c.partition(victim);
    // The fault is real: the node no longer answers.
    let probe = tokio::time::timeout(
        Duration::from_secs(3),
        musicfs_client::admin::node_status(&c.nodes[victim].addr),
    )
    .await;
    assert!(
        !matches!(probe, Ok(Ok(_))),
        "the partitioned node still answers"
    );

    // A second mount started during the partition finds the cluster too.
    let late = Mount::with_args(
        &c.seeds(),
        &dir.path().join("late"),
        DEADLINE_SECS,
        &["--attr-timeout-ms", "0"],
    )
    .await;

    let mut slowest = Duration::ZERO;
    for round in 0..2 {
        for (mount, (p, data)) in [&m, &late]
            .iter()
            .flat_map(|mnt| contents.iter().map(move |c| (mnt, c)))
        {
            let p = p.replace(
                m.path.to_str().expect("utf-8"),
                mount.path.to_str().expect("utf-8"),
            );
            let (meta, took) = timed(&format!("stat {p} (round {round})"), || fs::metadata(&p));
            slowest = slowest.max(took);
            assert_eq!(meta.len(), data.len() as u64, "size of {p}");
            let (got, took) = timed(&format!("read {p} (round {round})"), || fs::read(&p));
            slowest = slowest.max(took);
            assert!(got == *data, "{p}: wrong bytes during the partition");
        }
        // A listing works too.
        let (entries, _) = timed("readdir", || {
            fs::read_dir(late.path.join("Artist 1/Album")).map(|d| d.count())
        });
        assert_eq!(entries, 2);
    }
    eprintln!("slowest stat or read during the partition: {slowest:?}");

    // A write during the partition is acknowledged by the majority.
    let during = gen.bytes(1 << 20);
    let (_, _) = timed("write during the partition", || {
        fs::write(m.path.join("Artist 0/during.flac"), &during)
    });

    part.heal();
    // The node serves again and has the write made without it.
    let victim_addr = c.nodes[victim].addr.clone();
    wait_for("the healed node to answer", Duration::from_secs(60), || {
        let addr = victim_addr.clone();
        async move {
            musicfs_client::admin::node_status(&addr)
                .await
                .ok()
                .filter(|s| s.groups.iter().all(|g| g.leader_id != 0))
        }
    })
    .await;
    let only_victim = Mount::with_args(
        &c.nodes[victim].addr,
        &dir.path().join("healed"),
        DEADLINE_SECS,
        &[],
    )
    .await;
    let got = fs::read(only_victim.path.join("Artist 0/during.flac")).expect("read after healing");
    assert!(got == during, "the write made during the partition");
}
