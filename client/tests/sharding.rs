//! Many metadata groups on three real nodes: leaders spread over the nodes,
//! several clients run seeded random cross-shard work while a node is
//! killed and restarted, and afterwards the offline checker finds every
//! invariant true on every node's copy.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, Gen, TestCluster};
use musicfs_client::fs::{NewEntry, RenameFlags};
use musicfs_client::Fs;
use proto::meta::{ErrorCode, FileKind};
use proto::{group_of_ino, ROOT_INO};

const GROUPS: u32 = 8;

/// Leader count per node id, from the nodes' own reports.
async fn leaders(c: &TestCluster) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for i in 0..c.nodes.len() {
        if let Some(st) = c.status(i).await {
            let n = st.groups.iter().filter(|g| g.state == "leader").count();
            out.insert(st.node_id, n);
        }
    }
    out
}

/// One client's random work over `dirs`; returns the operations that
/// succeeded. Errors a racing client can cause are expected; EIO is not.
async fn work(
    fs: Arc<Fs>,
    dirs: Arc<Vec<u64>>,
    seed: u64,
    steps: usize,
    until: Instant,
    progress: Arc<AtomicUsize>,
) -> usize {
    let mut rng = Gen(seed.max(1));
    let mut ok = 0;
    for _ in 0..steps {
        if Instant::now() > until {
            break;
        }
        let p = dirs[rng.pick(dirs.len())];
        let q = dirs[rng.pick(dirs.len())];
        let name = format!("n{}", rng.pick(8));
        let other = format!("n{}", rng.pick(8));
        let r = match rng.pick(7) {
            0 => fs
                .create(p, name.as_bytes(), FileKind::Directory, 0o755, 0, 0, 0, b"")
                .await
                .map(|_| ()),
            1 => {
                let data = vec![rng.pick(256) as u8; 300 + rng.pick(3000)];
                fs.write_at(p, name.as_bytes(), &data, 0o644)
                    .await
                    .map(|_| ())
            }
            2 | 3 => {
                fs.rename(
                    p,
                    name.as_bytes(),
                    q,
                    other.as_bytes(),
                    RenameFlags::default(),
                )
                .await
            }
            4 => fs.remove(p, name.as_bytes(), false).await,
            5 => fs.remove(p, name.as_bytes(), true).await,
            _ => match fs.lookup(p, name.as_bytes()).await {
                Ok(a) => fs.link(a.ino, q, other.as_bytes()).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(()) => {
                ok += 1;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => match e.code() {
                Some(
                    ErrorCode::NotFound
                    | ErrorCode::Exists
                    | ErrorCode::NotDir
                    | ErrorCode::IsDir
                    | ErrorCode::NotEmpty
                    | ErrorCode::Invalid
                    | ErrorCode::Permission,
                ) => {}
                // A node is down for part of the run: an operation may run
                // out of its deadline; it must then be all or nothing,
                // which the checker verifies.
                _ => eprintln!("operation failed: {e}"),
            },
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_cross_shard_work_with_a_node_killed_keeps_every_invariant() {
    let seed: u64 = std::env::var("MUSICFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c0_ffee_1234);
    eprintln!("seed {seed} (MUSICFS_SEED={seed} reproduces the workload)");
    let mut c = TestCluster::start(3, &[]).await;
    c.init_groups(GROUPS).await;

    // Leaders spread: every node leads at least two of the eight groups.
    let spread = wait_for(
        "leaders spread over the nodes",
        Duration::from_secs(60),
        || {
            let c = &c;
            async move {
                let l = leaders(c).await;
                (l.len() == 3 && l.values().all(|n| *n >= 2)).then_some(l)
            }
        },
    )
    .await;
    eprintln!("leaders per node: {spread:?}");

    // A library skeleton, created with the bulk path.
    let fs = c.client(Duration::from_secs(60)).await;
    let artists: Vec<NewEntry> = (0..6)
        .map(|i| NewEntry::new(format!("artist{i}"), FileKind::Directory, 0o755))
        .collect();
    let mut dirs = vec![ROOT_INO];
    for r in fs
        .create_many(ROOT_INO, &artists)
        .await
        .expect("bulk mkdir")
    {
        dirs.push(r.expect("artist dir").ino);
    }
    for a in dirs.clone().iter().skip(1) {
        let tracks: Vec<NewEntry> = (0..20)
            .map(|t| NewEntry::new(format!("{t:02} track.flac"), FileKind::Regular, 0o644))
            .collect();
        for r in fs.create_many(*a, &tracks).await.expect("bulk create") {
            r.expect("track");
        }
    }
    let groups_used: std::collections::BTreeSet<u32> =
        dirs.iter().map(|d| group_of_ino(*d)).collect();
    assert!(
        groups_used.len() >= 3,
        "directories spread over groups: {groups_used:?}"
    );

    // The loop check across groups: mv artist0 artist0/x/y/artist0.
    let x = fs
        .create(dirs[1], b"x", FileKind::Directory, 0o755, 0, 0, 0, b"")
        .await
        .expect("mkdir x");
    let y = fs
        .create(x.ino, b"y", FileKind::Directory, 0o755, 0, 0, 0, b"")
        .await
        .expect("mkdir y");
    let e = fs
        .rename(
            ROOT_INO,
            b"artist0",
            y.ino,
            b"artist0",
            RenameFlags::default(),
        )
        .await
        .expect_err("moving a directory beneath itself");
    assert_eq!(e.code(), Some(ErrorCode::Invalid), "{e}");
    dirs.push(x.ino);
    dirs.push(y.ino);

    // Four clients of random work; a node is killed and restarted meanwhile.
    let dirs = Arc::new(dirs);
    let until = Instant::now() + Duration::from_secs(120);
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..4u64 {
        let fs = c.client(Duration::from_secs(30)).await;
        let dirs = dirs.clone();
        tasks.push(tokio::spawn(work(
            fs,
            dirs,
            seed ^ (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            150,
            until,
            progress.clone(),
        )));
    }
    // Kill node 2 once work is under way, restart it once work has gone on
    // without it.
    let done_by = |n: usize| {
        let progress = progress.clone();
        move || {
            let progress = progress.clone();
            async move { (progress.load(Ordering::Relaxed) >= n).then_some(()) }
        }
    };
    wait_for(
        "20 operations before the kill",
        Duration::from_secs(60),
        done_by(20),
    )
    .await;
    c.kill(1);
    let before = progress.load(Ordering::Relaxed);
    wait_for(
        "20 operations with node 2 down",
        Duration::from_secs(60),
        done_by(before + 20),
    )
    .await;
    c.spawn(1);
    c.wait_up(1).await;
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("client task");
    }
    eprintln!("{done} operations succeeded");
    assert!(done >= 100, "only {done} operations succeeded");

    // Quiet: no open intents, nothing queued, every replica applied the same.
    wait_for(
        "intents resolved and queues drained",
        Duration::from_secs(60),
        || {
            let c = &c;
            async move {
                let mut applied: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
                let mut pending = 0;
                for i in 0..3 {
                    let st = c.status(i).await?;
                    for g in st.groups {
                        pending += g.open_intents + g.queued_ref_batches;
                        applied.entry(g.group_id).or_default().push(g.last_applied);
                    }
                }
                let same = applied.len() == GROUPS as usize
                    && applied
                        .values()
                        .all(|v| v.len() == 3 && v.iter().all(|a| *a == v[0]));
                (pending == 0 && same).then_some(())
            }
        },
    )
    .await;
    let st = c.status(0).await.expect("status");
    let inodes: u64 = st.groups.iter().map(|g| g.inodes).sum();
    for i in 0..3 {
        c.kill(i);
    }
    let mut counts = Vec::new();
    for i in 0..3 {
        let (report, ok) = c.check(i);
        assert!(ok, "node {} fails the invariant check: {report:#}", i + 1);
        counts.push((
            report["inodes"].clone(),
            report["entries"].clone(),
            report["chunks"].clone(),
        ));
    }
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "the three copies differ: {counts:?}"
    );
    assert_eq!(counts[0].0.as_u64(), Some(inodes), "inode totals");
}

/// Waits until node 1 (index 0) leads group 0, its preferred node.
async fn node1_leads_group0(c: &TestCluster) {
    wait_for(
        "node 1 to lead group 0",
        Duration::from_secs(60),
        || async move {
            let st = c.status(0).await?;
            st.groups
                .iter()
                .any(|g| g.group_id == 0 && g.state == "leader")
                .then_some(())
        },
    )
    .await;
}

/// A directory name under the root that lands in a group other than 0.
fn remote_name(prefix: &str, groups: u32) -> String {
    (0..1000)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| proto::dir_group(ROOT_INO, n.as_bytes(), groups) != 0)
        .expect("a remote name")
}

/// The node that coordinates a mkdir in the root (the leader of group 0)
/// dies at each step of the transaction: between its two prepares and
/// before the decision (recovery must undo the prepared intents; the
/// client's retry then succeeds), after the decision and after resolving
/// (recovery must finish it; the retry gets the recorded reply). Each time
/// the directory exists exactly once and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_crash_at_any_step_is_recovered() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init_groups(4).await;
    let points = [
        "txn_mkdir_between_prepares",
        "txn_before_decide",
        "txn_after_decide",
        "txn_after_resolve",
    ];
    for (round, point) in points.iter().enumerate() {
        // Group 0 is led by its preferred node, node 1 (index 0).
        node1_leads_group0(&c).await;
        // Restart node 1 with the failure point armed.
        c.kill(0);
        c.nodes[0].env = vec![("FAILPOINTS".into(), format!("{point}=return(crash)"))];
        c.spawn(0);
        c.wait_up(0).await;
        node1_leads_group0(&c).await;
        let fs = c.client(Duration::from_secs(60)).await;
        let name = remote_name(&format!("album{round}-"), 4);
        let made = fs
            .create(
                ROOT_INO,
                name.as_bytes(),
                FileKind::Directory,
                0o755,
                0,
                0,
                0,
                b"",
            )
            .await;
        assert!(
            c.exited(0),
            "node 1 did not crash at {point}: was the node built with the `failpoints` \
             feature? (`make test` builds it so)"
        );
        let attr = made.unwrap_or_else(|e| panic!("mkdir across a crash at {point}: {e}"));
        let found = fs.lookup(ROOT_INO, name.as_bytes()).await.expect("lookup");
        assert_eq!(
            found.ino, attr.ino,
            "{point}: the reply names the directory that exists"
        );
        assert_ne!(
            group_of_ino(found.ino),
            0,
            "{point}: it lives in another group"
        );
        // Node 1 comes back without the failure point.
        c.nodes[0].env.clear();
        c.spawn(0);
        c.wait_up(0).await;
        wait_for("intents resolved", Duration::from_secs(60), || {
            let c = &c;
            async move {
                let mut open = 0;
                for i in 0..3 {
                    open += c
                        .status(i)
                        .await?
                        .groups
                        .iter()
                        .map(|g| g.open_intents)
                        .sum::<u64>();
                }
                (open == 0).then_some(())
            }
        })
        .await;
        let (entries, _) = fs
            .readdir(ROOT_INO, b"", 1000, false)
            .await
            .expect("readdir");
        let copies = entries
            .iter()
            .filter(|e| e.name[..] == *name.as_bytes())
            .count();
        assert_eq!(copies, 1, "{point}: the directory appears once");
    }
    let recovered: usize = (0..3)
        .map(|i| {
            c.log_of(i)
                .matches("resolved an interrupted cross-shard intent")
                .count()
        })
        .sum();
    assert!(
        recovered >= 2,
        "recovery resolved {recovered} intents, expected at least 2"
    );
    // Same applied state everywhere, then the offline check on each copy.
    wait_for("replicas to converge", Duration::from_secs(60), || {
        let c = &c;
        async move {
            let mut applied: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
            for i in 0..3 {
                for g in c.status(i).await?.groups {
                    applied.entry(g.group_id).or_default().push(g.last_applied);
                }
            }
            applied
                .values()
                .all(|v| v.len() == 3 && v.iter().all(|a| *a == v[0]))
                .then_some(())
        }
    })
    .await;
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        let (report, ok) = c.check(i);
        assert!(ok, "node {} fails the invariant check: {report:#}", i + 1);
    }
}
