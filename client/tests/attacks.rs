//! Attacks from outside against nodes on plain TCP (the cluster secret
//! signs node calls): what an outsider who reaches the port, or an ordinary
//! client, can send with a gRPC client generated from `proto/`. Each attack
//! is refused, the data stays intact, and the same call signed with the
//! cluster's secret (a node) still works, so the refusals are the secret's
//! doing. The TLS variants are in `security.rs`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, TestCluster};
use proto::auth::{method, ClusterSecret};
use proto::meta::meta_service_client::MetaServiceClient;
use proto::meta::{
    command::Op, ChunkDelta, Command, CreateOp, DeliverRefsOp, ErrorCode, FileKind, ProposeRequest,
    RefBatch, SetStorageNodeOp, StorageState,
};
use proto::raft::raft_service_client::RaftServiceClient;
use proto::storage::chunk_service_client::ChunkServiceClient;
use proto::storage::{DeleteChunksRequest, HasChunksRequest};
use proto::transport::Transport;
use tonic::transport::Channel;

async fn channel(addr: &str) -> Channel {
    Transport::plain()
        .endpoint(addr)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Credentials that sign like a node, with `secret`.
fn signer(secret: ClusterSecret) -> Transport {
    Transport::plain().with_secret(secret, 1)
}

fn another_clusters_secret() -> ClusterSecret {
    ClusterSecret::from_hex(&ClusterSecret::generate_hex()).expect("secret")
}

fn command(op: Op) -> Command {
    Command {
        version: proto::FORMAT_VERSION,
        op: Some(op),
        ..Default::default()
    }
}

/// Proposes `op` to group `group` at `addr`, signed by `sign` if given;
/// the reply's error code (OK when none).
async fn propose(addr: &str, group: u32, op: Op, sign: Option<&Transport>) -> ErrorCode {
    let mut req = tonic::Request::new(ProposeRequest {
        group_id: group,
        command: Some(command(op)),
    });
    if let Some(t) = sign {
        t.sign(method::PROPOSE, &mut req);
    }
    let r = MetaServiceClient::new(channel(addr).await)
        .max_encoding_message_size(usize::MAX)
        .propose(req)
        .await
        .expect("propose answers")
        .into_inner();
    r.error.map_or(ErrorCode::Ok, |e| e.code())
}

/// The address of group `g`'s leader.
async fn leader_of(c: &TestCluster, g: u32) -> String {
    wait_for(
        &format!("a leader of group {g}"),
        Duration::from_secs(20),
        || async {
            for n in &c.nodes {
                let st = musicfs_client::admin::node_status(&n.addr).await.ok()?;
                if st
                    .groups
                    .iter()
                    .any(|s| s.group_id == g && s.leader_id == st.node_id)
                {
                    return Some(n.addr.clone());
                }
            }
            None
        },
    )
    .await
}

/// Bytes of the files under `dir` (RocksDB's log, tables and WAL).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn storage_state(addr: &str, node: u64) -> Option<StorageState> {
    let st = musicfs_client::admin::node_status(addr).await.ok()?;
    st.storage_nodes
        .iter()
        .find(|s| s.node_id == node)
        .map(|s| s.state())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_internal_commands_are_refused_and_a_nodes_are_not() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    fs.write_file("/keep.flac", &vec![7u8; 300_000], 0o644)
        .await
        .expect("write");
    let leader0 = leader_of(&c, 0).await;
    let drain3 = || {
        Op::SetStorageNode(SetStorageNodeOp {
            node_id: 3,
            addr: String::new(),
            state: StorageState::StorageDraining as i32,
        })
    };

    // A client's (unsigned) internal command: refused, node 3 stays active.
    assert_eq!(
        propose(&leader0, 0, drain3(), None).await,
        ErrorCode::Permission
    );
    // Signed with another cluster's secret: refused the same way.
    let outsider = signer(another_clusters_secret());
    assert_eq!(
        propose(&leader0, 0, drain3(), Some(&outsider)).await,
        ErrorCode::Permission
    );
    // Negative reference deltas that would let GC free live chunks.
    let (id, _) = fs.chunk_locations("/keep.flac").await.expect("layout")[0].clone();
    let poison = Op::DeliverRefs(DeliverRefsOp {
        source: 1,
        batches: vec![RefBatch {
            seq: 1,
            deltas: vec![ChunkDelta {
                chunk_id: Bytes::copy_from_slice(&id.0),
                delta: -5,
                ..Default::default()
            }],
        }],
    });
    for g in 0..4 {
        let l = leader_of(&c, g).await;
        assert_eq!(
            propose(&l, g, poison.clone(), None).await,
            ErrorCode::Permission,
            "group {g}"
        );
    }
    assert_eq!(
        storage_state(&leader0, 3).await,
        Some(StorageState::StorageActive)
    );

    // The same call signed with the cluster's secret is a node's: accepted
    // (here: node 3 set active again, which it is).
    let node = signer(ClusterSecret::read(&c.secret_file()).expect("secret"));
    let keep3 = Op::SetStorageNode(SetStorageNodeOp {
        node_id: 3,
        addr: String::new(),
        state: StorageState::StorageActive as i32,
    });
    assert_eq!(
        propose(&leader0, 0, keep3, Some(&node)).await,
        ErrorCode::Ok
    );

    // File-system operations stay open to clients.
    let create = Op::Create(CreateOp {
        parent: proto::ROOT_INO,
        name: "by-hand.txt".into(),
        kind: FileKind::Regular as i32,
        perm: 0o644,
        ..Default::default()
    });
    let g_root = 0;
    let l = leader_of(&c, g_root).await;
    assert_eq!(propose(&l, g_root, create, None).await, ErrorCode::Ok);
    assert_eq!(
        fs.read_file("/keep.flac").await.expect("read back"),
        vec![7u8; 300_000]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_chunk_deletes_and_raft_messages_change_nothing() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs.write_file("/track.flac", &data, 0o644)
        .await
        .expect("write");
    let chunks = fs.chunk_locations("/track.flac").await.expect("layout");
    let ids: Vec<Bytes> = chunks
        .iter()
        .map(|(id, _)| Bytes::copy_from_slice(&id.0))
        .collect();
    let delete = || DeleteChunksRequest {
        chunk_ids: ids.clone(),
        older_than_ms: proto::auth::now_ms() + 3_600_000,
    };
    let outsider = signer(another_clusters_secret());
    for n in &c.nodes {
        let mut chunk = ChunkServiceClient::new(channel(&n.addr).await);
        let e = chunk.delete(delete()).await.expect_err("unsigned delete");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let mut req = tonic::Request::new(delete());
        outsider.sign(method::DELETE, &mut req);
        let e = chunk.delete(req).await.expect_err("forged delete");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    }

    // A forged append to a follower of group 0, with the right cluster id
    // (the unauthenticated Status call tells it) and a made-up entry.
    let st = musicfs_client::admin::node_status(&c.nodes[1].addr)
        .await
        .expect("status");
    let groups_before = st.groups.len();
    let header = |group: u32| proto::raft::RaftHeader {
        cluster_id: st.cluster_id.clone(),
        group_id: group,
        from_node: 1,
        to_node: 2,
    };
    let append = proto::raft::AppendEnvelope {
        header: Some(header(0)),
        request: Some(proto::raft::AppendEntriesRequest {
            vote: Some(proto::raft::Vote {
                leader_id: Some(proto::raft::LeaderId {
                    term: 1_000,
                    node_id: 1,
                }),
                committed: true,
            }),
            entries: vec![proto::raft::Entry {
                log_id: Some(proto::raft::LogId {
                    leader_id: Some(proto::raft::LeaderId {
                        term: 1_000,
                        node_id: 1,
                    }),
                    index: 1_000_000,
                }),
                payload: Some(proto::raft::entry::Payload::Blank(true)),
            }],
            ..Default::default()
        }),
    };
    let mut raft = RaftServiceClient::new(channel(&c.nodes[1].addr).await);
    let e = raft
        .append_entries(append.clone())
        .await
        .expect_err("unsigned append");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let mut req = tonic::Request::new(append);
    outsider.sign(method::APPEND, &mut req);
    let e = raft.append_entries(req).await.expect_err("forged append");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Votes for groups that do not exist create nothing.
    for g in 100..140 {
        let vote = proto::raft::VoteEnvelope {
            header: Some(header(g)),
            request: Some(proto::raft::VoteRequest {
                vote: Some(proto::raft::Vote {
                    leader_id: Some(proto::raft::LeaderId {
                        term: 5,
                        node_id: 1,
                    }),
                    committed: false,
                }),
                ..Default::default()
            }),
        };
        let e = raft.vote(vote).await.expect_err("unsigned vote");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }
    let st = musicfs_client::admin::node_status(&c.nodes[1].addr)
        .await
        .expect("status");
    assert_eq!(st.groups.len(), groups_before, "no group was created");
    // No term went to 1,000: the forged leader was never believed.
    assert!(st.groups.iter().all(|g| g.term < 1_000), "{:?}", st.groups);

    // Every replica still holds the chunks; the file reads back, also
    // after a restart of each node in turn (nothing diverged).
    for n in &c.nodes {
        let present = ChunkServiceClient::new(channel(&n.addr).await)
            .has(HasChunksRequest {
                chunk_ids: ids.clone(),
            })
            .await
            .expect("has")
            .into_inner()
            .present;
        assert!(present.iter().all(|p| *p), "node {}: {present:?}", n.id);
    }
    assert_eq!(fs.read_file("/track.flac").await.expect("read"), data);
    for i in 0..3 {
        c.kill(i);
        c.spawn(i);
        c.wait_up(i).await;
    }
    assert_eq!(fs.read_file("/track.flac").await.expect("read"), data);
    fs.write_file("/after.txt", b"still committing", 0o644)
        .await
        .expect("write after restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_invalid_work_is_refused_before_it_is_proposed() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    fs.write_file("/before.txt", b"x", 0o644)
        .await
        .expect("write");
    let leader0 = leader_of(&c, 0).await;
    let before: u64 = c
        .nodes
        .iter()
        .map(|n| dir_bytes(&n.data.join("meta")))
        .sum();
    // Four 30 MiB creates at once, as a client may send them.
    let huge = |i: u8| {
        Op::Create(CreateOp {
            parent: proto::ROOT_INO,
            name: vec![b'a' + i; 30 << 20].into(),
            kind: FileKind::Regular as i32,
            perm: 0o644,
            ..Default::default()
        })
    };
    let (a, b, cc, d) = tokio::join!(
        propose(&leader0, 0, huge(0), None),
        propose(&leader0, 0, huge(1), None),
        propose(&leader0, 0, huge(2), None),
        propose(&leader0, 0, huge(3), None),
    );
    assert_eq!([a, b, cc, d], [ErrorCode::Invalid; 4]);
    let bad_name = Op::Create(CreateOp {
        parent: proto::ROOT_INO,
        name: vec![b'n'; 256].into(),
        kind: FileKind::Regular as i32,
        ..Default::default()
    });
    assert_eq!(
        propose(&leader0, 0, bad_name, None).await,
        ErrorCode::NameTooLong
    );
    // Nothing of that reached any node's log: 4 x 30 MiB on every node
    // before this check existed.
    let after: u64 = c
        .nodes
        .iter()
        .map(|n| dir_bytes(&n.data.join("meta")))
        .sum();
    assert!(
        after < before + (20 << 20),
        "the nodes' metadata grew from {before} to {after} bytes"
    );
    // The group goes on committing at once.
    let t = std::time::Instant::now();
    fs.write_file("/after.txt", b"y", 0o644)
        .await
        .expect("write after");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Has: a flood of ids in one call is refused whole; the cap is served.
    let mut chunk = ChunkServiceClient::new(channel(&leader0).await);
    let many = |n: usize| HasChunksRequest {
        chunk_ids: (0..n)
            .map(|i| Bytes::copy_from_slice(&(i as u128).to_be_bytes()))
            .collect(),
    };
    let r = chunk
        .has(many(100_000))
        .await
        .expect("has answers")
        .into_inner();
    assert_eq!(
        r.error.map(|e| e.code()),
        Some(ErrorCode::Invalid),
        "100,000 ids refused"
    );
    let r = chunk.has(many(4096)).await.expect("has").into_inner();
    assert!(r.error.is_none());
    assert_eq!(r.present.len(), 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_nobody_uploaded_cannot_be_registered() {
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    let bait = fs
        .write_file("/bait.bin", b"", 0o644)
        .await
        .expect("create");
    // 70 KB that no node holds.
    let content: Vec<u8> = (0..70_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let id = proto::ChunkId::of(&content);
    let group = proto::group_of_ino(bait.ino);
    let leader = leader_of(&c, group).await;
    let poison = |receipts: Vec<proto::meta::Receipt>| {
        Op::CommitLayout(proto::meta::CommitLayoutOp {
            ino: bait.ino,
            extents: vec![proto::meta::Extent {
                offset: 0,
                length: content.len() as u64,
                chunk_id: Bytes::copy_from_slice(&id.0),
                chunk_offset: 0,
            }],
            size: content.len() as u64,
            new_chunks: vec![proto::meta::NewChunk {
                chunk_id: Bytes::copy_from_slice(&id.0),
                size: content.len() as u64,
                locations: vec![1, 2, 3],
                receipts,
            }],
            checked_at_ms: proto::auth::now_ms(),
            ..Default::default()
        })
    };
    // No receipts, and receipts made with another cluster's secret.
    assert_eq!(
        propose(&leader, group, poison(vec![]), None).await,
        ErrorCode::Invalid
    );
    let other = another_clusters_secret();
    let forged = (1..=3)
        .map(|node| {
            let at_ms = proto::auth::now_ms();
            proto::meta::Receipt {
                node,
                at_ms,
                mac: Bytes::copy_from_slice(&other.receipt(
                    node,
                    &id.0,
                    content.len() as u64,
                    at_ms,
                )),
            }
        })
        .collect();
    assert_eq!(
        propose(&leader, group, poison(forged), None).await,
        ErrorCode::Invalid
    );

    // The victim writes that content later: its write dedups against
    // nothing false and reads back, from a fresh client too.
    fs.write_file("/victim.bin", &content, 0o644)
        .await
        .expect("victim's write");
    let fresh = c.client(Duration::from_secs(20)).await;
    assert_eq!(
        fresh.read_file("/victim.bin").await.expect("read back"),
        content
    );
    let locs = fresh.chunk_locations("/victim.bin").await.expect("layout");
    for n in &c.nodes {
        let present = ChunkServiceClient::new(channel(&n.addr).await)
            .has(HasChunksRequest {
                chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
            })
            .await
            .expect("has")
            .into_inner()
            .present;
        let listed = locs.iter().any(|(_, l)| l.contains(&n.id));
        assert!(
            !listed || present[0],
            "node {} is listed but lacks the chunk",
            n.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_address_is_cut_and_the_node_serves_on() {
    let c = TestCluster::start(3, &["--max-connections-per-address", "40"]).await;
    c.init().await;
    let fs = c.client(Duration::from_secs(20)).await;
    let target: std::net::SocketAddr = c.nodes[0].addr.parse().expect("addr");
    // 120 idle connections from another loopback address than the
    // cluster's own.
    let mut flood = Vec::new();
    for _ in 0..120 {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
        flood.push(s.connect(target).await.expect("connect"));
    }
    // The node closes each one over the limit as soon as it accepts it;
    // the first 40 stay open (silent connections get 60 s).
    let mut closed = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(s, &mut b),
        )
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 80, "connections over the limit closed");
    // The cluster's own connections (from 127.0.0.1) are not affected.
    fs.write_file("/during.txt", b"served", 0o644)
        .await
        .expect("write during the flood");
    musicfs_client::admin::node_status(&c.nodes[0].addr)
        .await
        .expect("status during the flood");
    // Places are given back when the flood ends.
    drop(flood);
    wait_for(
        "a connection from the flooding address to be kept again",
        Duration::from_secs(10),
        || async {
            let s = tokio::net::TcpSocket::new_v4().ok()?;
            s.bind("127.0.0.2:0".parse().ok()?).ok()?;
            let mut conn = s.connect(target).await.ok()?;
            let mut b = [0u8; 1];
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::io::AsyncReadExt::read(&mut conn, &mut b),
            )
            .await
            {
                Err(_) => Some(()),
                Ok(_) => None,
            }
        },
    )
    .await;
    assert_eq!(fs.read_file("/during.txt").await.expect("read"), b"served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_after_its_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = TestCluster::start(3, &[]).await;
    c.init().await;
    let mut s = tokio::net::TcpStream::connect(&c.nodes[0].addr)
        .await
        .expect("connect");
    s.write_all(&proto::chunkwire::HELLO).await.expect("hello");
    // Announces a 1 MiB chunk, sends 1 KiB of it, then nothing.
    let head = proto::chunkwire::encode_put(&[9u8; 16], "", 1 << 20);
    s.write_all(&head).await.expect("head");
    s.write_all(&[0u8; 1024])
        .await
        .expect("a little of the body");
    let t = std::time::Instant::now();
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the node keeps a stalled upload: {r:?}"
    );
    // 5 s and a second per MiB, not the minute an idle connection gets.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}
