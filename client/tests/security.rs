//! A cluster on TLS with an admin token: clients and nodes without the
//! cluster's certificate cannot talk to it or join it, a client certificate
//! cannot speak Raft, and commands that change the cluster need the token.
//! One test: this process's credentials are set once.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{bin_dir, wait_for, TestCluster};
use proto::transport::Transport;

fn musicfs(c: &TestCluster, tls: Option<&Path>, token: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin_dir().join("musicfs"));
    cmd.args(args)
        .env("MUSICFS_CLUSTER", c.seeds())
        .env_remove("MUSICFS_TLS_DIR")
        .env_remove("MUSICFS_ADMIN_TOKEN_FILE");
    if let Some(t) = tls {
        cmd.arg("--tls-dir").arg(t);
    }
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    cmd.output().expect("run musicfs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn storage_state(c: &TestCluster, tls: &Path, id: u64) -> Option<String> {
    let out = musicfs(c, Some(tls), None, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["storage"]
        .as_array()?
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .and_then(|s| s["state"].as_str().map(str::to_string))
}

/// `musicfs node add` with the client certificate and the admin token.
fn node_add(c: &TestCluster, certs: &Path, id: u64, addr: &str) -> Output {
    let token = certs.join("admin-token");
    musicfs(
        c,
        Some(&certs.join("client")),
        Some(&token),
        &["node", "add", &id.to_string(), addr],
    )
}

/// Asserts that the command was refused with exit code 4 and `why`.
fn refused(out: &Output, why: &str) {
    assert_eq!(out.status.code(), Some(4), "{}", stderr(out));
    assert!(stderr(out).contains(why), "{}", stderr(out));
}

/// A TLS connection to `addr` with the credentials in `creds`.
async fn connect(creds: &Path, addr: &str) -> Result<tonic::transport::Channel, String> {
    let t = Transport::tls_from_dir(creds).expect("credentials");
    t.endpoint(addr)
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Sends an (empty) Raft vote to `addr` with the credentials in `creds`:
/// Err(None) if the connection fails, Err(Some(code)) if the call does.
async fn raft_vote(creds: &Path, addr: &str) -> Result<(), Option<tonic::Code>> {
    let ch = connect(creds, addr).await.map_err(|_| None)?;
    proto::raft::raft_service_client::RaftServiceClient::new(ch)
        .vote(proto::raft::VoteEnvelope::default())
        .await
        .map(|_| ())
        .map_err(|s| Some(s.code()))
}

/// Proposes "drain node `id`" to group 0 at `addr` as a raw gRPC call with
/// the credentials in `creds`; the reply's error code.
async fn raw_drain(creds: &Path, addr: &str, id: u64) -> proto::meta::ErrorCode {
    use proto::meta::{command::Op, Command, ProposeRequest, SetStorageNodeOp, StorageState};
    let ch = connect(creds, addr).await.expect("connect");
    let r = proto::meta::meta_service_client::MetaServiceClient::new(ch)
        .propose(ProposeRequest {
            group_id: 0,
            command: Some(Command {
                version: proto::FORMAT_VERSION,
                op: Some(Op::SetStorageNode(SetStorageNodeOp {
                    node_id: id,
                    addr: String::new(),
                    state: StorageState::StorageDraining as i32,
                })),
                ..Default::default()
            }),
        })
        .await
        .expect("propose answers")
        .into_inner();
    r.error.map_or(proto::meta::ErrorCode::Ok, |e| e.code())
}

/// Waits until something accepts TCP connections at `addr`.
async fn listening(addr: &str) {
    wait_for(
        &format!("a listener at {addr}"),
        Duration::from_secs(30),
        || async { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_cluster_certificate_and_token_get_in() {
    let mut c = TestCluster::start_secure(3).await;
    let certs = c.certs_dir();
    let client = certs.join("client");
    let token = certs.join("admin-token");
    c.init_groups(2).await;

    // Data goes over TLS like over plain TCP.
    let fs = c.client(Duration::from_secs(20)).await;
    fs.write_file("/secret.flac", b"audio over tls", 0o644)
        .await
        .expect("write over TLS");
    assert_eq!(
        fs.read_file("/secret.flac").await.expect("read"),
        b"audio over tls"
    );

    // No certificate: nothing answers.
    let out = musicfs(&c, None, None, &["status"]);
    assert!(!out.status.success(), "status without TLS succeeded");
    // A certificate of another CA: the handshake fails.
    let rogue = c.dir.path().join("rogue");
    musicfs_client::certs::init(&rogue, 4, &[], 30).expect("rogue certs");
    let out = musicfs(&c, Some(&rogue.join("client")), None, &["status"]);
    assert!(
        !out.status.success(),
        "status with a foreign certificate succeeded"
    );

    // Reading needs no token; draining a node does.
    let out = musicfs(&c, Some(&client), None, &["status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let out = musicfs(&c, Some(&client), None, &["node", "drain", "3"]);
    refused(&out, "admin token");
    let wrong = c.dir.path().join("wrong-token");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef\n").expect("write");
    let out = musicfs(&c, Some(&client), Some(&wrong), &["node", "drain", "3"]);
    refused(&out, "does not match");
    refused(&musicfs(&c, Some(&client), None, &["gc"]), "admin token");
    assert_eq!(storage_state(&c, &client, 3).as_deref(), Some("active"));

    // A client certificate may not speak Raft: a vote from it is refused.
    match raft_vote(&client, &c.nodes[0].addr).await {
        Err(Some(code)) => assert_eq!(code, tonic::Code::PermissionDenied),
        other => panic!("a client's vote: {other:?}"),
    }

    // Nor propose the nodes' own commands: a raw Propose(SetStorageNode
    // DRAINING) with the client certificate and no token drains nothing,
    // on any node (each forwards nothing it refused).
    for n in &c.nodes {
        let code = raw_drain(&client, &n.addr, 3).await;
        assert_eq!(code, proto::meta::ErrorCode::Permission, "node {}", n.id);
    }
    assert_eq!(storage_state(&c, &client, 3).as_deref(), Some("active"));

    // A mount's own certificate works until its serial is revoked; then
    // every node refuses it (within the 10 s reload), the others go on.
    let jukebox = c.dir.path().join("jukebox");
    let serial = musicfs_client::certs::issue(
        &certs.join("ca"),
        &musicfs_client::certs::Subject::Client {
            name: "jukebox".into(),
        },
        &jukebox,
        30,
    )
    .expect("jukebox certificate");
    let out = musicfs(&c, Some(&jukebox), None, &["status"]);
    assert!(out.status.success(), "jukebox status: {}", stderr(&out));
    std::fs::write(
        certs.join("revoked"),
        format!("# the jukebox was stolen\n{serial}\n"),
    )
    .expect("revoke");
    wait_for(
        "the jukebox's certificate to be refused",
        Duration::from_secs(30),
        || async {
            let out = musicfs(&c, Some(&jukebox), None, &["status"]);
            (!out.status.success() && stderr(&out).contains("revoked")).then_some(())
        },
    )
    .await;
    let out = musicfs(&c, Some(&client), None, &["status"]);
    assert!(out.status.success(), "admin status: {}", stderr(&out));
    assert_eq!(
        fs.read_file("/secret.flac").await.expect("read"),
        b"audio over tls",
        "this process's certificate is not revoked"
    );

    // A node must start with a node certificate.
    let out = Command::new(bin_dir().join("musicfs-node"))
        .args(["--id", "9", "--listen", "127.0.0.1:1", "--data"])
        .arg(c.dir.path().join("node9"))
        .arg("--tls-dir")
        .arg(&client)
        .output()
        .expect("run musicfs-node");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the certificate is a client's"),
        "{}",
        stderr(&out)
    );

    // A node with another CA's certificate cannot join: the cluster does
    // not accept its handshake, and it is not listed afterwards.
    let rogue_node = rogue.join("node-4");
    let r = c.spawn_new_node(&["--tls-dir", rogue_node.to_str().expect("utf-8")]);
    let rogue_addr = c.nodes[r].addr.clone();
    listening(&rogue_addr).await;
    let out = node_add(&c, &certs, 4, &rogue_addr);
    assert!(
        !out.status.success(),
        "a node with a foreign certificate joined"
    );
    assert!(storage_state(&c, &client, 4).is_none());
    // Nor can it speak Raft to the cluster with its own certificate.
    assert!(
        raft_vote(&rogue_node, &c.nodes[0].addr).await.is_err(),
        "a foreign node certificate reached Raft"
    );
    c.kill(r);

    // With the token: a node with this cluster's certificate joins, and a
    // drain is accepted.
    let n5 = c.dir.path().join("node-5-creds");
    musicfs_client::certs::issue(
        &certs.join("ca"),
        &musicfs_client::certs::Subject::Node {
            id: 5,
            hosts: vec![],
        },
        &n5,
        30,
    )
    .expect("issue node 5");
    // Node ids follow the list: the rogue took 4, so this one is 5.
    let i5 = c.spawn_new_node(&["--tls-dir", n5.to_str().expect("utf-8")]);
    assert_eq!(c.nodes[i5].id, 5);
    c.wait_up(i5).await;
    let addr5 = c.nodes[i5].addr.clone();
    let out = node_add(&c, &certs, 5, &addr5);
    assert!(
        out.status.success(),
        "node add with the token: {}",
        stderr(&out)
    );
    assert_eq!(storage_state(&c, &client, 5).as_deref(), Some("active"));
    let out = musicfs(&c, Some(&client), Some(&token), &["node", "drain", "5"]);
    assert!(
        out.status.success(),
        "drain with the token: {}",
        stderr(&out)
    );
    assert_eq!(storage_state(&c, &client, 5).as_deref(), Some("draining"));

    // The data written first is still there.
    assert_eq!(
        fs.read_file("/secret.flac").await.expect("read"),
        b"audio over tls"
    );
}
