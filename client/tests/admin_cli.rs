//! The admin CLI against a real cluster: group list and leader transfer,
//! snapshots, df, repair status, get, and completions, each with the exit
//! code scripts rely on; and the RPC and Raft metrics those calls leave.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{bin_dir, free_port, scrape, wait_for, TestCluster};

fn musicfs(c: &TestCluster, args: &[&str]) -> Output {
    Command::new(bin_dir().join("musicfs"))
        .args(args)
        .env("MUSICFS_CLUSTER", c.seeds())
        .output()
        .expect("run musicfs")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_report_and_act_on_a_running_cluster() {
    let mut c = TestCluster::start(3, &[]).await;
    // Node 1 serves metrics.
    let metrics = format!("127.0.0.1:{}", free_port());
    c.kill(0);
    c.nodes[0]
        .args
        .extend(["--metrics-listen".to_string(), metrics.clone()]);
    c.spawn(0);
    c.wait_up(0).await;
    c.init_groups(3).await;
    let fs = c.client(Duration::from_secs(20)).await;
    fs.write_file("/track.flac", b"some audio", 0o644)
        .await
        .expect("write");

    // group list: every group, its leader among its members.
    let groups = wait_for("every group led", Duration::from_secs(30), || async {
        let out = musicfs(&c, &["group", "list", "--json"]);
        out.status.success().then(|| json(&out))
    })
    .await;
    let groups = groups.as_array().expect("array").clone();
    assert_eq!(groups.len(), 3);
    for g in &groups {
        let members: Vec<u64> = g["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m.as_u64())
            .collect();
        assert_eq!(members, vec![1, 2, 3], "group {g}");
        assert!(members.contains(&g["leader"].as_u64().expect("leader")));
    }
    let table = musicfs(&c, &["group", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("LEADER"));

    // transfer-leader: node 1 (not group 1's preferred voter) leads when
    // the command returns, and balancing leaves it there.
    let out = musicfs(&c, &["group", "transfer-leader", "1", "1"]);
    assert!(
        out.status.success(),
        "transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node 1 leads group 1"));
    // Refused with a clear message: a node that is not a voter, a group
    // that does not exist.
    let out = musicfs(&c, &["group", "transfer-leader", "1", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a voter of group 1"));
    let out = musicfs(&c, &["group", "transfer-leader", "7", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no group 7"));

    // snapshot: every group's snapshot index moves up to its applied index.
    let out = musicfs(&c, &["snapshot"]);
    assert!(
        out.status.success(),
        "snapshot: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("snapshots taken", Duration::from_secs(30), || async {
        let st = c.status(0).await?;
        st.groups.iter().all(|g| g.snapshot_index > 0).then_some(())
    })
    .await;

    // Balancing runs every 3 s; group 1 is still node 1's well after.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let st = c.status(0).await.expect("status of node 1");
        assert!(
            st.groups
                .iter()
                .any(|g| g.group_id == 1 && g.state == "leader"),
            "balancing moved the group an operator placed"
        );
    }

    // df: every node, with a disk size.
    let out = musicfs(&c, &["df", "--json"]);
    assert!(out.status.success());
    let df = json(&out);
    let df = df.as_array().expect("array");
    assert_eq!(df.len(), 3);
    assert!(df
        .iter()
        .all(|n| n["disk_total_bytes"].as_u64() > Some(0) && n["error"].is_null()));

    // repair status: nothing short of copies once the file is written.
    let r = wait_for("repair idle", Duration::from_secs(30), || async {
        let out = musicfs(&c, &["repair", "status", "--json"]);
        (out.status.code() == Some(0)).then(|| json(&out))
    })
    .await;
    assert_eq!(r["under_replicated"], 0);

    // get: the file's bytes in a local file.
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("track.flac");
    let out = musicfs(
        &c,
        &["get", "/track.flac", local.to_str().expect("utf-8 path")],
    );
    assert!(out.status.success());
    assert_eq!(std::fs::read(&local).expect("local copy"), b"some audio");
    let out = musicfs(
        &c,
        &["get", "/missing.flac", local.to_str().expect("utf-8 path")],
    );
    assert!(!out.status.success(), "a missing file fails");
    assert_eq!(
        std::fs::read(&local).expect("local copy"),
        b"some audio",
        "and leaves the local file alone"
    );

    // completions: a script that knows the subcommands.
    let out = musicfs(&c, &["completions", "bash"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("transfer-leader"));

    // Metrics: every RPC counted and timed by method and status, error
    // replies by code (the missing file above), each group's Raft state,
    // and the leader changes (balancing after init, the transfer).
    wait_for("RPC and Raft metrics", Duration::from_secs(30), || async {
        let text = scrape(&metrics);
        [
            "musicfs_rpc_requests_total{method=\"MetaService/Query\",status=\"0\"}",
            "musicfs_rpc_duration_seconds_bucket{method=\"MetaService/Query\",le=\"0.001\"}",
            "musicfs_rpc_requests_total{method=\"AdminService/Status\",status=\"0\"}",
            "musicfs_meta_errors_total{rpc=\"query\",code=\"NOT_FOUND\"}",
            "musicfs_raft_is_leader{group=\"2\"}",
            "musicfs_raft_applied_index{group=\"0\"}",
            "musicfs_raft_leader_changes_total{group=",
        ]
        .iter()
        .all(|m| text.contains(m))
        .then_some(())
    })
    .await;

    // With a node down, df says so in its exit code.
    c.kill(2);
    let out = musicfs(&c, &["df"]);
    assert_eq!(out.status.code(), Some(2), "df with a node down");
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not answer"));
}
