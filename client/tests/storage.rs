//! Storage durability with real processes: a storage node lost for good is
//! replaced by repair (copies on the survivors and a fresh node), and a
//! drained node hands its chunks over before it may be removed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{scrape, wait_for, Gen, TestCluster};
use musicfs_client::{admin, parse_seeds, Fs};
use proto::meta::StorageState;
use proto::storage::chunk_service_client::ChunkServiceClient;
use proto::storage::HasChunksRequest;
use proto::ChunkId;

/// Writes `albums` albums of `tracks` tracks (64 KiB to ~3 MiB each);
/// Creates directory `name` in `parent`.
async fn mkdir(fs: &Fs, parent: u64, name: &str) -> proto::meta::Attr {
    fs.create(
        parent,
        name.as_bytes(),
        proto::meta::FileKind::Directory,
        0o755,
        0,
        0,
        0,
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("mkdir {name}: {e}"))
}

/// Wall-clock milliseconds, as the nodes stamp them.
fn now_ms() -> u64 {
    proto::meta::Timespec::now().as_millis()
}

/// Waits until every metadata group's garbage-collection horizon is past
/// `t_ms`: from then on GC may free anything unreferenced before `t_ms`.
async fn horizon_past(fs: &Fs, t_ms: u64) {
    let groups = fs.cluster().group_count();
    wait_for(
        "every group's GC horizon to pass",
        Duration::from_secs(60),
        || async {
            for g in 0..groups {
                let r = fs
                    .cluster()
                    .query(g, proto::meta::query::Q::Holds(Default::default()))
                    .await
                    .ok()?;
                if r.horizon_ms <= t_ms {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// returns path → content.
async fn write_library(
    fs: &Fs,
    g: &mut Gen,
    albums: usize,
    tracks: usize,
) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let artist = mkdir(fs, proto::ROOT_INO, "Artist").await;
    for a in 0..albums {
        let name = format!("Album {a}");
        mkdir(fs, artist.ino, &name).await;
        for t in 0..tracks {
            let size = (64 << 10) + g.pick(3 << 20);
            let data = g.bytes(size);
            let path = format!("/Artist/{name}/{t:02}.flac");
            fs.write_file(&path, &data, 0o644)
                .await
                .expect("write track");
            files.insert(path, data);
        }
    }
    files
}

/// Every chunk of every file with its recorded locations, once the chunk
/// index knows them all (chunks indexed by another group than the file's
/// are registered there shortly after the layout commits).
async fn locations(fs: &Fs, files: &BTreeMap<String, Vec<u8>>) -> BTreeMap<ChunkId, Vec<u64>> {
    wait_for(
        "the chunk index to know every chunk",
        Duration::from_secs(30),
        || async {
            let mut out = BTreeMap::new();
            for p in files.keys() {
                for (id, locs) in fs.chunk_locations(p).await.expect("chunk locations") {
                    if locs.is_empty() {
                        return None;
                    }
                    out.insert(id, locs);
                }
            }
            Some(out)
        },
    )
    .await
}

async fn fresh_client(c: &TestCluster) -> Arc<Fs> {
    c.client(Duration::from_secs(30)).await
}

/// Which of `ids` the node at `addr` holds.
async fn held(addr: &str, ids: &[ChunkId]) -> BTreeSet<ChunkId> {
    let mut c = ChunkServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to storage node");
    let r = c
        .has(HasChunksRequest {
            chunk_ids: ids.iter().map(|i| Bytes::copy_from_slice(&i.0)).collect(),
        })
        .await
        .expect("has")
        .into_inner();
    ids.iter()
        .zip(r.present)
        .filter(|(_, p)| *p)
        .map(|(i, _)| *i)
        .collect()
}

async fn read_back(fs: &Fs, files: &BTreeMap<String, Vec<u8>>) {
    for (p, data) in files {
        let got = fs
            .read_file(p)
            .await
            .unwrap_or_else(|e| panic!("read {p}: {e}"));
        assert!(got == *data, "{p}: content differs after the node loss");
    }
}

const LOST_NODE_FLAGS: &[&str] = &[
    "--repair-after-secs",
    "2",
    "--gc-every-secs",
    "1",
    "--gc-sweep-every-secs",
    "2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_is_replaced_by_repair_and_reconciled_when_it_returns() {
    let mut c = TestCluster::start(3, LOST_NODE_FLAGS).await;
    c.init_with(admin::InitOptions {
        groups: 4,
        replication: 3,
        commit_window_secs: 2,
    })
    .await;
    let fs = fresh_client(&c).await;
    let files = write_library(&fs, &mut Gen(0x5eed), 3, 4).await;
    let before = locations(&fs, &files).await;
    assert!(before.len() >= 12, "{} chunks", before.len());
    for (id, l) in &before {
        assert_eq!(l, &vec![1, 2, 3], "chunk {id} is not on every node");
    }

    // Node 3 dies for good. Every file stays readable from the others.
    c.kill(2);
    let survivors = format!("{},{}", c.nodes[0].addr, c.nodes[1].addr);
    read_back(&*fresh_client(&c).await, &files).await;

    // With only two nodes left, nothing can be copied: repair waits and
    // says so, and keeps node 3's copies on the books.
    let seeds = parse_seeds(&survivors).expect("seeds");
    wait_for(
        "repair to report chunks waiting for a node",
        Duration::from_secs(30),
        || {
            let seeds = seeds.clone();
            async move {
                let v = admin::cluster_status(&seeds).await.ok()?;
                (v.repair.waiting_for_nodes > 0).then_some(())
            }
        },
    )
    .await;

    // A fresh fourth node joins; repair copies every chunk to it and
    // drops the lost node from the locations.
    let i = c.add_node(LOST_NODE_FLAGS).await;
    let addr4 = c.nodes[i].addr.clone();
    admin::set_storage_node(&seeds, 4, &addr4, StorageState::StorageActive)
        .await
        .expect("node add");
    let fs2 = fresh_client(&c).await;
    let after = wait_for(
        "three live copies of every chunk",
        Duration::from_secs(90),
        || {
            let (fs2, files) = (fs2.clone(), &files);
            async move {
                let l = locations(&fs2, files).await;
                l.values().all(|v| v == &vec![1, 2, 4]).then_some(l)
            }
        },
    )
    .await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    let ids: Vec<ChunkId> = after.keys().copied().collect();
    assert_eq!(
        held(&addr4, &ids).await.len(),
        ids.len(),
        "the new node holds every chunk it is listed for"
    );
    let v = wait_for("repair to settle", Duration::from_secs(30), || {
        let seeds = seeds.clone();
        async move {
            let v = admin::cluster_status(&seeds).await.ok()?;
            (v.repair.under_replicated == 0 && v.repair.waiting_for_nodes == 0).then_some(v)
        }
    })
    .await;
    assert!(v.repair.copied_chunks >= ids.len() as u64, "{:?}", v.repair);
    // And the files read back intact from the new set of nodes.
    read_back(&fs2, &files).await;

    // New writes land on live nodes only (two copies may land first: a
    // slow third is left to repair rather than waited for).
    let more = write_library_more(&fs2).await;
    for (id, l) in locations(&fs2, &more).await {
        assert!(l.len() >= 2 && !l.contains(&3), "new chunk {id}: {l:?}");
    }
    wait_for(
        "three copies of the new chunks",
        Duration::from_secs(30),
        || async {
            let l = locations(&fs2, &more).await;
            l.values().all(|v| v == &vec![1, 2, 4]).then_some(())
        },
    )
    .await;

    // Node 3 comes back: its copies are no longer listed anywhere, so its
    // sweep deletes them; nothing the files need goes.
    c.spawn(2);
    c.wait_up(2).await;
    let old: BTreeSet<ChunkId> = ids.iter().copied().collect();
    wait_for(
        "node 3 to drop the copies nothing lists",
        Duration::from_secs(60),
        || async { files_on(&c.nodes[2].data).is_disjoint(&old).then_some(()) },
    )
    .await;
    read_back(&*fresh_client(&c).await, &files).await;
    read_back(&*fresh_client(&c).await, &more).await;
    for n in [0usize, 1, 3] {
        let on = files_on(&c.nodes[n].data);
        assert!(old.is_subset(&on), "node {} lost a copy", c.nodes[n].id);
    }
}

async fn write_library_more(fs: &Fs) -> BTreeMap<String, Vec<u8>> {
    let mut g = Gen(99);
    let mut files = BTreeMap::new();
    for t in 0..3 {
        let data = g.bytes(300_000 + t * 1000);
        let path = format!("/Artist/Album 0/extra{t}.flac");
        fs.write_file(&path, &data, 0o644).await.expect("write");
        files.insert(path, data);
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_hands_its_chunks_over_before_removal() {
    let mut c = TestCluster::start(3, &[]).await;
    c.init().await;
    let i = c.add_node(&[]).await;
    let addr4 = c.nodes[i].addr.clone();
    let seeds = parse_seeds(&c.seeds()).expect("seeds");
    // Joining checks who answers at the address.
    let err = admin::set_storage_node(&seeds, 5, &addr4, StorageState::StorageActive)
        .await
        .expect_err("node 4 answering as node 5");
    assert!(err.to_string().contains("answers as node 4"), "{err}");
    admin::set_storage_node(&seeds, 4, &addr4, StorageState::StorageActive)
        .await
        .expect("node add");

    let fs = fresh_client(&c).await;
    wait_for(
        "the client to learn of node 4",
        Duration::from_secs(30),
        || {
            let fs = fs.clone();
            async move { fs.cluster().storage().nodes.contains_key(&4).then_some(()) }
        },
    )
    .await;
    let files = write_library(&fs, &mut Gen(3), 2, 4).await;
    let before = locations(&fs, &files).await;
    // Four nodes, three copies: placement spreads chunks over all four.
    for n in 1..=4u64 {
        assert!(
            before.values().any(|l| l.contains(&n)),
            "no chunk placed on node {n}: {before:?}"
        );
    }
    assert!(before.values().all(|l| l.len() == 3));

    // Removing an active node is refused: drain first.
    let err = admin::set_storage_node(&seeds, 1, "", StorageState::StorageRemoved)
        .await
        .expect_err("remove before drain");
    assert!(err.to_string().contains("drained"), "{err}");

    admin::set_storage_node(&seeds, 1, "", StorageState::StorageDraining)
        .await
        .expect("drain");
    wait_for("node 1 to be drained", Duration::from_secs(90), || {
        let seeds = seeds.clone();
        async move {
            let left = admin::set_storage_node(&seeds, 1, "", StorageState::StorageDraining)
                .await
                .ok()?;
            (left == 0).then_some(())
        }
    })
    .await;
    let after = locations(&*fresh_client(&c).await, &files).await;
    for (id, l) in &after {
        assert_eq!(l, &vec![2, 3, 4], "chunk {id} after the drain");
    }
    admin::set_storage_node(&seeds, 1, "", StorageState::StorageRemoved)
        .await
        .expect("remove after drain");
    // Node 1 still runs (it is a metadata node), but holds nothing the
    // files need: they read back from the other three.
    read_back(&*fresh_client(&c).await, &files).await;
    let err = admin::set_storage_node(&seeds, 1, &c.nodes[0].addr, StorageState::StorageActive)
        .await
        .expect_err("re-adding a removed id");
    assert!(err.to_string().contains("never reused"), "{err}");
}

fn chunk_path(data: &std::path::Path, id: &ChunkId) -> std::path::PathBuf {
    let hex = id.to_hex();
    data.join("chunks")
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(hex)
}

/// A cluster without throttled scrubs whose node 2 serves metrics (its
/// address is returned), with a library of `files` files from `seed` and
/// three copies of every chunk: (cluster, metrics, client, files, chunks).
async fn replicated_library(
    seed: u64,
    files: usize,
) -> (
    TestCluster,
    String,
    Arc<Fs>,
    BTreeMap<String, Vec<u8>>,
    Vec<ChunkId>,
) {
    let mut c = TestCluster::start(3, &["--scrub-mib-per-sec", "0"]).await;
    let metrics_addr = c.restart_with_metrics(1).await;
    c.init().await;
    let fs = fresh_client(&c).await;
    let files = write_library(&fs, &mut Gen(seed), 1, files).await;
    let locs = wait_for(
        "three copies of every chunk",
        Duration::from_secs(30),
        || async {
            let l = locations(&fs, &files).await;
            l.values().all(|v| v == &vec![1, 2, 3]).then_some(l)
        },
    )
    .await;
    let ids = locs.keys().copied().collect();
    (c, metrics_addr, fs, files, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_repairs_a_rotten_and_a_missing_replica() {
    let (c, metrics_addr, fs, files, ids) = replicated_library(11, 4).await;
    let (rot, gone) = (ids[0], ids[1]);

    // Bit rot on node 2, a lost file on node 3.
    let p2 = chunk_path(&c.nodes[1].data, &rot);
    let mut bytes = std::fs::read(&p2).expect("chunk file on node 2");
    bytes[100] ^= 0xff;
    std::fs::write(&p2, &bytes).expect("flip a byte");
    std::fs::remove_file(chunk_path(&c.nodes[2].data, &gone)).expect("delete on node 3");

    // No read returns the rotten bytes: node 2 refuses them, and every
    // file reads back right through the client.
    let mut c2 = ChunkServiceClient::connect(format!("http://{}", c.nodes[1].addr))
        .await
        .expect("connect node 2");
    let r = c2
        .get(proto::storage::GetChunkRequest {
            chunk_id: Bytes::copy_from_slice(&rot.0),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        r.error.is_some() && r.data.is_empty(),
        "node 2 served a rotten chunk"
    );
    read_back(&*fresh_client(&c).await, &files).await;

    let seeds = parse_seeds(&c.seeds()).expect("seeds");
    let failed = admin::scrub_start(&seeds).await.expect("scrub start");
    assert!(failed.is_empty(), "{failed:?}");
    // A node that does not answer a leader's probe in time (a loaded
    // machine) is skipped by that scrub, as it should be: scrub again until
    // both replicas are found missing (the counts add up across scrubs).
    let report = wait_for(
        "scrubs to find both missing replicas",
        Duration::from_secs(120),
        || {
            let seeds = seeds.clone();
            async move {
                let v = admin::scrub_status(&seeds).await.ok()?;
                if !v.iter().all(|n| n.status.as_ref().is_some_and(|s| s.done)) {
                    return None;
                }
                let found: u64 = v
                    .iter()
                    .filter_map(|n| n.status.as_ref())
                    .map(|s| s.missing)
                    .sum();
                if found >= 2 {
                    return Some(v);
                }
                admin::scrub_start(&seeds).await.ok()?;
                None
            }
        },
    )
    .await;
    let missing: u64 = report
        .iter()
        .filter_map(|n| n.status.as_ref())
        .map(|s| s.missing)
        .sum();
    assert!(
        missing >= 2,
        "scrub found {missing} missing replicas: {report:?}"
    );
    let verified: u64 = report
        .iter()
        .filter_map(|n| n.status.as_ref())
        .map(|s| s.verified_chunks)
        .sum();
    assert!(verified >= 3 * ids.len() as u64 - 2, "{report:?}");

    // Repair puts good copies back where they were.
    wait_for(
        "both replicas repaired",
        Duration::from_secs(60),
        || async {
            let l = locations(&fs, &files).await;
            let good2 = std::fs::read(&p2).is_ok_and(|b| rot.verify(&b));
            let good3 =
                std::fs::read(chunk_path(&c.nodes[2].data, &gone)).is_ok_and(|b| gone.verify(&b));
            (l.values().all(|v| v == &vec![1, 2, 3]) && good2 && good3).then_some(())
        },
    )
    .await;
    read_back(&*fresh_client(&c).await, &files).await;

    // The same work, as metrics and as the common worker status.
    let text = scrape(&metrics_addr);
    assert!(
        text.lines()
            .any(|l| l.starts_with("musicfs_worker_bytes_total{worker=\"scrub\"}")),
        "{text}"
    );
    assert!(text.contains("musicfs_scrub_corrupt_total"), "{text}");
    assert!(text.contains("musicfs_store_chunks"), "{text}");
    let v = admin::cluster_status(&seeds).await.expect("status");
    let scrub = v
        .workers
        .iter()
        .find(|w| w.node == 2 && w.name == "scrub")
        .expect("node 2's scrub worker");
    assert!(
        scrub.bytes > 0 && scrub.limit_bytes_per_sec == 0,
        "{scrub:?}"
    );
    assert!(v.workers.iter().any(|w| w.name == "repair" && w.bytes > 0));
}

/// Chunk reads over the direct protocol: served by the node's gRPC port,
/// counted in its metrics; a rotten file sent that way is caught by the
/// client, which asks the node over gRPC (so the node moves the file aside)
/// and reads another replica; with direct reads off, reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_reads_are_verified_and_fall_back_to_grpc() {
    use musicfs_client::direct::{Direct, DirectChunks};
    let (c, metrics_addr, fs, files, ids) = replicated_library(17, 3).await;
    let node2 = c.nodes[1].addr.clone();

    // Straight from node 2: its bytes, a miss for an unknown id, and the
    // reads counted beside the gRPC calls.
    let direct = DirectChunks::new(None, Duration::from_secs(10));
    for id in &ids {
        match direct.get(&node2, id, "1:1").await {
            Direct::Chunk(b) => assert!(id.verify(&b), "node 2 sent other bytes for {id}"),
            Direct::NotFound(m) | Direct::Refused(m) => panic!("direct read of {id}: {m}"),
        }
    }
    let unknown = ChunkId::of(b"never stored");
    assert!(
        matches!(direct.get(&node2, &unknown, "").await, Direct::NotFound(_)),
        "an unknown chunk is a miss"
    );
    assert!(direct.usable(&node2));
    let text = scrape(&metrics_addr);
    assert!(
        text.contains("musicfs_rpc_requests_total{method=\"ChunkDirect/Get\",status=\"0\"}"),
        "{text}"
    );

    // Bit rot on node 2. The direct read sends the bytes as they are; the
    // client checks them, asks node 2 over gRPC (which finds the damage
    // and moves the file aside) and then reads another replica.
    let rot = ids[0];
    let p2 = chunk_path(&c.nodes[1].data, &rot);
    let mut bytes = std::fs::read(&p2).expect("chunk file on node 2");
    bytes[100] ^= 0xff;
    std::fs::write(&p2, &bytes).expect("flip a byte");
    match direct.get(&node2, &rot, "").await {
        Direct::Chunk(b) => assert!(!rot.verify(&b), "the rotten bytes as they are on disk"),
        Direct::NotFound(m) | Direct::Refused(m) => panic!("direct read of the rotten chunk: {m}"),
    }
    let got = fs
        .cluster()
        .get_chunk(rot, &[2, 1, 3])
        .await
        .expect("read the rotten chunk through the client");
    assert!(rot.verify(&got), "the client returned the rotten bytes");
    // (Repair may have put a good copy back since.)
    assert!(
        std::fs::read(&p2).map_or(true, |b| rot.verify(&b)),
        "node 2 still holds the rotten file: the client did not ask it over gRPC"
    );

    // Every file reads back whole with direct reads on, and with them off.
    read_back(&*fresh_client(&c).await, &files).await;
    let grpc_only = grpc_only_cluster(&c).await;
    let before = scrape(&metrics_addr);
    for id in &ids[1..] {
        let got = grpc_only.get_chunk(*id, &[2]).await.expect("gRPC read");
        assert!(id.verify(&got));
    }
    let count = |text: &str| calls(text, "ChunkDirect/Get", "0");
    assert_eq!(
        count(&before),
        count(&scrape(&metrics_addr)),
        "a client with direct reads off used them"
    );
}

/// A client of `c` that moves chunks over gRPC only.
async fn grpc_only_cluster(c: &TestCluster) -> Arc<musicfs_client::Cluster> {
    let mut cfg = musicfs_client::ClusterConfig::new(parse_seeds(&c.seeds()).expect("seeds"));
    cfg.direct_chunks = false;
    musicfs_client::Cluster::connect(cfg)
        .await
        .expect("connect")
}

/// The count of `method`'s calls that ended with `status` in a node's
/// metrics.
fn calls(text: &str, method: &str, status: &str) -> f64 {
    let key = format!("musicfs_rpc_requests_total{{method=\"{method}\",status=\"{status}\"}}");
    text.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Chunk uploads over the direct protocol: a client's writes take it (the
/// node counts them), the node stores what matches its id durably, with
/// or without a tail under one block, and refuses what does not with the
/// error's code; a client with direct transfers off uploads over gRPC;
/// a length no chunk has is refused and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_uploads_are_verified_and_fall_back_to_grpc() {
    use musicfs_client::direct::{Direct, DirectChunks, DirectPut};
    use proto::chunkwire::{decode_reply_head, encode_put, HELLO, REPLY_HEAD, STATUS_BAD_REQUEST};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PUT: &str = "ChunkDirect/Put";
    let (c, metrics_addr, _fs, _files, _ids) = replicated_library(19, 2).await;
    let node2 = c.nodes[1].addr.clone();
    assert!(
        calls(&scrape(&metrics_addr), PUT, "0") > 0.0,
        "the library's writes did not upload over the direct protocol"
    );

    let direct = DirectChunks::new(None, Duration::from_secs(10));
    for len in [64usize << 10, (1 << 20) + 123, 100] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 977 + len) as u8).collect();
        let id = ChunkId::of(&data);
        let first = direct.put(&node2, &id, &data, "1:2").await;
        match first {
            DirectPut::Stored(true, Some(r)) => assert_eq!(r.node, 2, "node 2's receipt"),
            other => panic!("first upload of {len} bytes: {other:?}"),
        }
        let again = direct.put(&node2, &id, &data, "1:3").await;
        assert!(
            matches!(again, DirectPut::Stored(false, Some(_))),
            "second upload of {len} bytes: a receipt for a chunk already held too"
        );
        let on_disk = std::fs::read(chunk_path(&c.nodes[1].data, &id)).expect("chunk file");
        assert!(on_disk == data, "node 2 holds other bytes for {len}");
        match direct.get(&node2, &id, "").await {
            Direct::Chunk(b) => assert!(b[..] == data[..], "read back {len} bytes"),
            Direct::NotFound(m) | Direct::Refused(m) => panic!("read back {len} bytes: {m}"),
        }
    }

    // Bytes that do not match the id: refused, nothing stored, and the
    // protocol stays on (a refusal is an answer).
    let id = ChunkId::of(b"the bytes the id names");
    match direct.put(&node2, &id, b"other bytes", "").await {
        DirectPut::Refused(e) => {
            assert_eq!(e.code(), proto::meta::ErrorCode::Invalid, "{e:?}")
        }
        DirectPut::Stored(..) => panic!("bytes that do not match their id were stored"),
        DirectPut::Unanswered(m) | DirectPut::Failed(m) => {
            panic!("no answer to a mismatched upload: {m}")
        }
    }
    assert!(!chunk_path(&c.nodes[1].data, &id).exists());
    assert!(direct.usable(&node2));
    assert!(calls(&scrape(&metrics_addr), PUT, "INVALID") >= 1.0);

    // A client with direct transfers off uploads over gRPC.
    let grpc_only = grpc_only_cluster(&c).await;
    let before = scrape(&metrics_addr);
    let data = Bytes::from(vec![7u8; 300 << 10]);
    let id = ChunkId::of(&data);
    let held = grpc_only
        .put_chunk(id, data.clone())
        .await
        .expect("gRPC upload");
    assert!(
        held.nodes.contains(&2),
        "node 2 does not hold the upload: {held:?}"
    );
    assert!(
        held.receipts.iter().any(|r| r.node == 2),
        "node 2's receipt over gRPC: {held:?}"
    );
    let after = scrape(&metrics_addr);
    assert_eq!(calls(&before, PUT, "0"), calls(&after, PUT, "0"));
    assert!(
        calls(&after, "ChunkService/Put", "0") > calls(&before, "ChunkService/Put", "0"),
        "{after}"
    );
    assert!(std::fs::read(chunk_path(&c.nodes[1].data, &id)).expect("file") == data[..]);

    // A length over the node's limit: refused, and the connection closed
    // (the bytes after it cannot be framed).
    let mut s = tokio::net::TcpStream::connect(&node2)
        .await
        .expect("connect");
    s.write_all(&HELLO).await.expect("hello");
    s.write_all(&encode_put(&[1u8; 16], "", 17 << 20))
        .await
        .expect("head");
    let mut head = [0u8; REPLY_HEAD];
    s.read_exact(&mut head).await.expect("reply");
    let (status, len) = decode_reply_head(&head);
    assert_eq!(status, STATUS_BAD_REQUEST);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the node closes the connection")
        .expect("read");
    assert_eq!(
        rest.len(),
        len as usize,
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// Chunk files on a node's disk.
fn files_on(data: &std::path::Path) -> BTreeSet<ChunkId> {
    let mut out = BTreeSet::new();
    let root = data.join("chunks");
    for l1 in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for l2 in std::fs::read_dir(l1.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(l2.path()).into_iter().flatten().flatten() {
                if let Some(id) = f.file_name().to_str().and_then(ChunkId::from_hex) {
                    out.insert(id);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_frees_unused_chunks_and_never_one_a_writer_uses() {
    let mut c =
        TestCluster::start(3, &["--gc-every-secs", "1", "--gc-sweep-every-secs", "2"]).await;
    c.init_with(admin::InitOptions {
        groups: 4,
        replication: 3,
        commit_window_secs: 2,
    })
    .await;
    let seeds = parse_seeds(&c.seeds()).expect("seeds");
    let (a, b) = (fresh_client(&c).await, fresh_client(&c).await);
    let mut g = Gen(0x6c);

    // A file nobody else shares: deleted, its chunks must go.
    let lonely = g.bytes(3 << 20);
    a.write_file("/lonely", &lonely, 0o644)
        .await
        .expect("write");
    let lonely_ids: Vec<ChunkId> = a
        .chunk_locations("/lonely")
        .await
        .expect("locations")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    a.remove_path("/lonely").await.expect("rm");
    // (Reference drops for chunks indexed by other groups than the file's
    // arrive through their outboxes, a moment later.)
    let n = lonely_ids.len() as u64;
    wait_for(
        "gc --dry-run to count the deleted file's chunks",
        Duration::from_secs(10),
        || {
            let seeds = seeds.clone();
            async move {
                let dry = admin::gc(&seeds, true).await.ok()?;
                (dry.reclaimable_chunks + dry.waiting_chunks + dry.reaped_chunks >= n).then_some(())
            }
        },
    )
    .await;

    // Races: one client deletes a file while the other writes a file with
    // the same content (so the same chunks): at the same moment, or once
    // GC may have freed the deleted file's chunks.
    let mut kept = BTreeMap::new();
    for i in 0..6u64 {
        let n = (1 << 20) + g.pick(2 << 20);
        let data = g.bytes(n);
        let (pa, pb) = (format!("/a{i}"), format!("/b{i}"));
        a.write_file(&pa, &data, 0o644).await.expect("write a");
        if i < 3 {
            let (ra, rb) = tokio::join!(a.remove_path(&pa), b.write_file(&pb, &data, 0o644));
            ra.expect("delete a");
            rb.expect("write b");
        } else {
            a.remove_path(&pa).await.expect("delete a");
            horizon_past(&b, now_ms()).await;
            b.write_file(&pb, &data, 0o644).await.expect("write b");
        }
        kept.insert(pb, data);
    }

    // GC runs for several horizons (window 2 s + clock leeway 2 s); every
    // kept file stays whole, on three nodes, while the lonely chunks go.
    let lonely_set: BTreeSet<ChunkId> = lonely_ids.iter().copied().collect();
    wait_for(
        "the unused chunks' files to be deleted",
        Duration::from_secs(60),
        || async {
            let gone = (0..3).all(|i| files_on(&c.nodes[i].data).is_disjoint(&lonely_set));
            gone.then_some(())
        },
    )
    .await;
    // GC may now have freed anything unreferenced before the last write.
    horizon_past(&b, now_ms()).await;
    read_back(&*fresh_client(&c).await, &kept).await;
    let locs = locations(&b, &kept).await;
    for (id, l) in &locs {
        assert_eq!(l, &vec![1, 2, 3], "chunk {id}");
        for i in 0..3 {
            assert!(
                files_on(&c.nodes[i].data).contains(id),
                "chunk {id} of a kept file is missing on node {}",
                i + 1
            );
        }
    }
    let done = wait_for("GC to have nothing left", Duration::from_secs(30), || {
        let seeds = seeds.clone();
        async move {
            let r = admin::gc(&seeds, true).await.ok()?;
            (r.reclaimable_chunks == 0 && r.waiting_chunks == 0 && r.reaped_chunks > 0).then_some(r)
        }
    })
    .await;
    assert!(
        done.deleted_files >= 3 * lonely_ids.len() as u64,
        "{done:?}"
    );

    // Every invariant holds on every node's metadata, the unreferenced
    // index included.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        let (report, ok) = c.check(i);
        assert!(ok, "node {}: {report}", i + 1);
    }
}

/// A tmpfs mounted for a test and unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(path.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(st.success(), "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_chunks_and_loses_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("musicfs-full")
        .tempdir()
        .expect("tempdir");
    // Node 3's data directory is a 96 MiB tmpfs, 16 MiB of it reserved.
    let disk = Tmpfs::mount(&dir.path().join("node3-data"), "96m");
    let mut c = TestCluster::start(3, &["--reserve-mib", "16"]).await;
    for i in 0..3 {
        c.kill(i);
    }
    c.nodes[2].data = disk.0.clone();
    for i in 0..3 {
        c.spawn(i);
    }
    for i in 0..3 {
        c.wait_up(i).await;
    }
    c.init().await;
    let fs = fresh_client(&c).await;
    let mut g = Gen(0xf011);
    let mut files = BTreeMap::new();
    for i in 0..40 {
        let n = (2 << 20) + g.pick(2 << 20);
        let data = g.bytes(n);
        let p = format!("/full{i:02}.flac");
        fs.write_file(&p, &data, 0o644)
            .await
            .unwrap_or_else(|e| panic!("write {p} with node 3 full: {e}"));
        files.insert(p, data);
    }
    let st = c.status(2).await.expect("node 3 status");
    assert!(
        st.disk_free_bytes < 40 << 20,
        "node 3 should be full: {} free",
        st.disk_free_bytes
    );
    let locs = locations(&fs, &files).await;
    let short = locs.values().filter(|l| !l.contains(&3)).count();
    assert!(short > 0, "every chunk fit on node 3");
    assert!(locs.values().all(|l| l.len() >= 2));
    assert!(
        c.log_of(2).contains("disk full"),
        "node 3 says why it refuses chunks"
    );
    // Node 3 keeps serving what it holds; every file reads back.
    read_back(&*fresh_client(&c).await, &files).await;

    // Space returns: repair gives every chunk its third copy.
    disk.resize("512m");
    wait_for(
        "three copies of every chunk",
        Duration::from_secs(90),
        || async {
            let l = locations(&fs, &files).await;
            l.values().all(|v| v == &vec![1, 2, 3]).then_some(())
        },
    )
    .await;
    read_back(&*fresh_client(&c).await, &files).await;
    for i in 0..3 {
        c.kill(i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_writer_commits_before_its_chunks_could_be_freed() {
    let c = TestCluster::start(3, &["--gc-every-secs", "1", "--gc-sweep-every-secs", "2"]).await;
    c.init_with(admin::InitOptions {
        groups: 4,
        replication: 3,
        commit_window_secs: 2,
    })
    .await;
    let seeds = parse_seeds(&c.seeds()).expect("seeds");
    let (a, b) = (fresh_client(&c).await, fresh_client(&c).await);
    let data = Gen(0x51).bytes(48 << 20);
    // B has a file with A's first 40 MiB, so A's spilled chunks are ones
    // the index knows.
    b.write_file("/shared.flac", &data[..40 << 20], 0o644)
        .await
        .expect("write shared");
    let f = a
        .create(
            proto::ROOT_INO,
            b"slow.flac",
            proto::meta::FileKind::Regular,
            0o644,
            0,
            0,
            0,
            b"",
        )
        .await
        .expect("create");
    let fh = a.open(f.ino).await.expect("open");
    for (i, piece) in data[..40 << 20].chunks(1 << 20).enumerate() {
        a.write(fh, (i as u64) << 20, piece).await.expect("write");
    }
    let spilled_at = now_ms();
    // More than 32 MiB is buffered: A spilled chunks it has not committed.
    // Its checkpoint commits them well within the 2 s window, visible to
    // another client before A closes.
    wait_for("A's checkpoint commit", Duration::from_secs(10), || async {
        let size = b.getattr(f.ino).await.ok()?.size;
        (size > 0).then_some(())
    })
    .await;
    // B deletes its copy; GC runs for several horizons while A is still
    // writing.
    b.remove_path("/shared.flac").await.expect("rm shared");
    wait_for(
        "GC to free what only B's file used",
        Duration::from_secs(30),
        || {
            let seeds = seeds.clone();
            async move {
                let r = admin::gc(&seeds, true).await.ok()?;
                (r.settled_groups == r.led_groups
                    && r.reclaimable_chunks == 0
                    && r.waiting_chunks == 0)
                    .then_some(())
            }
        },
    )
    .await;
    // The write session goes on past the commit window: until GC may free
    // anything unreferenced since A spilled.
    horizon_past(&b, spilled_at).await;
    for (i, piece) in data[40 << 20..].chunks(1 << 20).enumerate() {
        a.write(fh, (40 << 20) + ((i as u64) << 20), piece)
            .await
            .expect("write tail");
    }
    a.release(fh).await.expect("close commits");
    let got = fresh_client(&c)
        .await
        .read_file("/slow.flac")
        .await
        .expect("read");
    assert!(got == data, "the slow writer's file is intact");
    let files: BTreeMap<String, Vec<u8>> = [("/slow.flac".to_string(), data)].into();
    for (id, l) in locations(&a, &files).await {
        assert_eq!(l.len(), 3, "chunk {id}: {l:?}");
        for (i, n) in c.nodes.iter().enumerate() {
            assert!(
                files_on(&n.data).contains(&id),
                "chunk {id} missing on node {}",
                i + 1
            );
        }
    }
}
