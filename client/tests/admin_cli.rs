//! The admin CLI against a real cluster: group list and leader transfer,
//! snapshots, df, repair status, get, bench and completions, each with the
//! exit code scripts rely on (also when stdout is a pipe whose reader has
//! gone); the RPC and Raft metrics those calls leave; and the node's status
//! page, read over HTTP and rendered in headless Chromium (Debian's
//! `chromium`, which `make deps` installs).

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{http, musicfs, scrape, wait_for, TestCluster};

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
    let metrics = c.restart_with_metrics(0).await;
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
    // node list: every node with its role, state and version.
    let out = musicfs(&c, &["node", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes = json(&out);
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["role"], "metadata+storage", "{n}");
        assert_eq!(n["state"], "active", "{n}");
        assert_eq!(n["up"], true, "{n}");
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"), "{n}");
    }
    // ls --json: one object per entry and line.
    let out = musicfs(&c, &["ls", "--json", "/"]);
    assert!(out.status.success());
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e["name"] == "track.flac" && e["size"] == 10 && e["kind"] == "REGULAR"),
        "{entries:?}"
    );
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

    // Node 1 balances three more times; group 1 is still its own after.
    let passes = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("musicfs_raft_balance_passes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let before = passes(&scrape(&metrics));
    wait_for(
        "three balancing passes",
        Duration::from_secs(30),
        || async { (passes(&scrape(&metrics)) >= before + 3).then_some(()) },
    )
    .await;
    let st = c.status(0).await.expect("status of node 1");
    assert!(
        st.groups
            .iter()
            .any(|g| g.group_id == 1 && g.state == "leader"),
        "balancing moved the group an operator placed"
    );

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
    // A symlink planted where get writes its partial file is not
    // followed: the file it points at keeps its bytes.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    let again = dir.path().join("again.flac");
    std::os::unix::fs::symlink(&victim, again.with_extension("musicfs-partial")).expect("plant");
    let out = musicfs(
        &c,
        &["get", "/track.flac", again.to_str().expect("utf-8 path")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&again).expect("copy"), b"some audio");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");

    // bench: a self-test that verifies what it wrote and leaves nothing.
    let out = musicfs(&c, &["bench", "--files", "20", "--big-mib", "4", "--json"]);
    assert!(
        out.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = json(&out);
    assert_eq!(b["files"], 20);
    for k in [
        "creates_per_sec",
        "small_reads_per_sec",
        "write_mib_per_sec",
        "read_mib_per_sec",
    ] {
        assert!(b[k].as_f64() > Some(0.0), "{k}: {b}");
    }
    let ls = musicfs(&c, &["ls", "/"]);
    assert!(ls.status.success());
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains(".musicfs-bench"),
        "bench removed its scratch directory"
    );

    // completions: a script that knows the subcommands.
    let out = musicfs(&c, &["completions", "bash"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("transfer-leader"));

    // Output into a pipe whose reader has gone (`musicfs status | head`):
    // the command ends quietly with SIGPIPE's status, without a panic.
    for args in [
        &["status"][..],
        &["group", "list"],
        &["cat", "/track.flac"],
        &["completions", "bash"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(common::bin_dir().join("musicfs"))
            .args(args)
            .env("MUSICFS_CLUSTER", c.seeds())
            .stdout(writer)
            .output()
            .expect("run musicfs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
    }

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

/// Runs headless Chromium on `url` with `args`, bounded in time; returns
/// its stdout.
async fn chromium(url: &str, args: &[&str]) -> String {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "headless Chromium is needed for this test: `make deps` installs Debian's chromium",
        );
    let profile = tempfile::tempdir().expect("profile dir");
    let child = tokio::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Dropped on timeout: the browser is killed with it.
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium did not finish within 90 s")
        .expect("wait for chromium");
    assert!(out.status.success(), "chromium failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_health_nodes_and_groups_in_a_browser() {
    let mut c = TestCluster::start(3, &[]).await;
    let web = c.restart_with_metrics(0).await;
    c.init_groups(3).await;

    // Over plain HTTP: healthy once every group has a leader and every
    // storage node answers; the page lists every node and group.
    let page = wait_for("a healthy status page", Duration::from_secs(30), || async {
        let r = http(&web, "GET", "/");
        r.contains("HEALTHY").then_some(r)
    })
    .await;
    assert!(page.starts_with("HTTP/1.0 200") || page.starts_with("HTTP/1.1 200"));
    assert!(page.contains("text/html"));
    for n in &c.nodes {
        assert!(page.contains(&n.addr), "node {} listed", n.id);
    }
    for g in 0..3 {
        assert!(
            page.contains(&format!("<tr><td>{g}</td>")),
            "group {g} listed"
        );
    }
    assert!(http(&web, "GET", "/metrics").contains("musicfs_raft_term"));
    // Read-only: nothing but GET and HEAD.
    let post = http(&web, "POST", "/");
    assert!(post.contains(" 405 "), "POST refused: {post}");
    assert!(http(&web, "GET", "/nothing").contains(" 404 "));

    // In a browser: the DOM it renders, and a screenshot of it.
    let url = format!("http://{web}/");
    // Leadership may move between groups right after init (balancing), and
    // the page shows that moment as degraded: render until it is healthy.
    let dom = wait_for(
        "a healthy page in the browser",
        Duration::from_secs(30),
        || async {
            let dom = chromium(&url, &["--dump-dom"]).await;
            dom.contains("HEALTHY").then_some(dom)
        },
    )
    .await;
    assert!(dom.contains("id=\"health\""), "{dom}");
    assert!(dom.contains("HEALTHY"));
    assert!(dom.contains("id=\"groups\""));
    let dir = tempfile::tempdir().expect("tempdir");
    let shot = dir.path().join("status.png");
    chromium(&url, &[&format!("--screenshot={}", shot.display())]).await;
    let png = std::fs::read(&shot).expect("screenshot written");
    // Kept for a human to look at when asked to.
    if let Ok(dir) = std::env::var("MUSICFS_TEST_ARTIFACTS") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(std::path::Path::new(&dir).join("status-page.png"), &png);
    }
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!((dim(16), dim(20)), (1280, 1000), "the window's size");
    // A blank page compresses to a few KiB; tables and text do not.
    assert!(
        png.len() > 12 * 1024,
        "the screenshot shows something ({} bytes)",
        png.len()
    );

    // A node down: the page says DEGRADED and names it.
    c.kill(2);
    let page = wait_for(
        "a degraded status page",
        Duration::from_secs(30),
        || async {
            let r = http(&web, "GET", "/");
            r.contains("DEGRADED").then_some(r)
        },
    )
    .await;
    assert!(
        page.contains(&format!(
            "storage node 3 ({}) does not answer",
            c.nodes[2].addr
        )),
        "{page}"
    );
}
