//! Property test: the namespace state machine against a small in-memory
//! reference model of POSIX directory semantics. Random sequences of
//! create, mkdir, link, unlink, rmdir and rename (with RENAME_NOREPLACE)
//! must give the same outcome (success or the same error) in both, and the
//! same tree, link counts and chunk reference counts afterwards.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use musicfs_node::namespace::{MemKv, Namespace, Txn};
use proptest::prelude::*;
use proto::meta::{
    command::Op, query::Q, ChunkInfoQuery, Command, CommitLayoutOp, CreateOp, ErrorCode, Extent,
    FileKind, GetAttrQuery, HoldsQuery, InitOp, LinkOp, NewChunk, Query, ReadDirQuery,
    ReapChunksOp, RemoveOp, RenameOp, SettleOp, Timespec,
};
use proto::{make_ino, ChunkId, ROOT_INO};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Clone, Debug)]
enum Action {
    Create {
        dir: usize,
        name: usize,
        is_dir: bool,
    },
    Remove {
        dir: usize,
        name: usize,
        rmdir: bool,
    },
    Rename {
        sdir: usize,
        sname: usize,
        ddir: usize,
        dname: usize,
        noreplace: bool,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
    Write {
        file: usize,
        chunk: u8,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..8usize, 0..4usize, any::<bool>()).prop_map(|(dir, name, is_dir)| Action::Create {
            dir,
            name,
            is_dir
        }),
        (0..8usize, 0..4usize, any::<bool>()).prop_map(|(dir, name, rmdir)| Action::Remove {
            dir,
            name,
            rmdir
        }),
        (0..8usize, 0..4usize, 0..8usize, 0..4usize, any::<bool>()).prop_map(
            |(sdir, sname, ddir, dname, noreplace)| Action::Rename {
                sdir,
                sname,
                ddir,
                dname,
                noreplace
            }
        ),
        (0..8usize, 0..8usize, 0..4usize).prop_map(|(file, dir, name)| Action::Link {
            file,
            dir,
            name
        }),
        (0..8usize, 0..3u8).prop_map(|(file, chunk)| Action::Write { file, chunk }),
    ]
}

#[derive(Clone, Debug)]
struct MNode {
    is_dir: bool,
    nlink: u32,
    entries: BTreeMap<String, u64>,
    parent: u64,
    chunks: Vec<u8>,
}

#[derive(Default)]
struct Model {
    nodes: BTreeMap<u64, MNode>,
    next: u64,
}

impl Model {
    fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            ROOT_INO,
            MNode {
                is_dir: true,
                nlink: 2,
                entries: BTreeMap::new(),
                parent: ROOT_INO,
                chunks: vec![],
            },
        );
        Model { nodes, next: 2 }
    }
    fn dirs(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_dir)
            .map(|(i, _)| *i)
            .collect()
    }
    fn files(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.is_dir)
            .map(|(i, _)| *i)
            .collect()
    }
    fn within(&self, mut d: u64, anc: u64) -> bool {
        loop {
            if d == anc {
                return true;
            }
            if d == ROOT_INO {
                return false;
            }
            d = self.nodes[&d].parent;
        }
    }
    fn drop_link(&mut self, ino: u64) {
        let n = self.nodes.get_mut(&ino).unwrap();
        if n.is_dir {
            n.nlink = 0;
        } else {
            n.nlink -= 1;
        }
        if n.nlink == 0 {
            self.nodes.remove(&ino);
        }
    }
    fn create(&mut self, dir: u64, name: &str, is_dir: bool) -> Result<(), ErrorCode> {
        if self.nodes[&dir].entries.contains_key(name) {
            return Err(ErrorCode::Exists);
        }
        let ino = make_ino(0, self.next);
        self.next += 1;
        self.nodes.insert(
            ino,
            MNode {
                is_dir,
                nlink: if is_dir { 2 } else { 1 },
                entries: BTreeMap::new(),
                parent: dir,
                chunks: vec![],
            },
        );
        let p = self.nodes.get_mut(&dir).unwrap();
        p.entries.insert(name.into(), ino);
        if is_dir {
            p.nlink += 1;
        }
        Ok(())
    }
    fn remove(&mut self, dir: u64, name: &str, rmdir: bool) -> Result<(), ErrorCode> {
        let ino = *self.nodes[&dir]
            .entries
            .get(name)
            .ok_or(ErrorCode::NotFound)?;
        let child = &self.nodes[&ino];
        if rmdir {
            if !child.is_dir {
                return Err(ErrorCode::NotDir);
            }
            if !child.entries.is_empty() {
                return Err(ErrorCode::NotEmpty);
            }
        } else if child.is_dir {
            return Err(ErrorCode::IsDir);
        }
        let is_dir = child.is_dir;
        let p = self.nodes.get_mut(&dir).unwrap();
        p.entries.remove(name);
        if is_dir {
            p.nlink -= 1;
        }
        self.drop_link(ino);
        Ok(())
    }
    fn rename(
        &mut self,
        sd: u64,
        sn: &str,
        dd: u64,
        dn: &str,
        noreplace: bool,
    ) -> Result<(), ErrorCode> {
        let src = *self.nodes[&sd].entries.get(sn).ok_or(ErrorCode::NotFound)?;
        let dst = self.nodes[&dd].entries.get(dn).copied();
        if noreplace && dst.is_some() {
            return Err(ErrorCode::Exists);
        }
        let src_dir = self.nodes[&src].is_dir;
        if src_dir && self.within(dd, src) {
            return Err(ErrorCode::Invalid);
        }
        if let Some(d) = dst {
            if d != src && self.nodes[&d].is_dir && self.within(sd, d) {
                return Err(ErrorCode::NotEmpty);
            }
            if d == src {
                return Ok(());
            }
            let dst_dir = self.nodes[&d].is_dir;
            if src_dir && !dst_dir {
                return Err(ErrorCode::NotDir);
            }
            if !src_dir && dst_dir {
                return Err(ErrorCode::IsDir);
            }
            if dst_dir && !self.nodes[&d].entries.is_empty() {
                return Err(ErrorCode::NotEmpty);
            }
            self.nodes.get_mut(&dd).unwrap().entries.remove(dn);
            if dst_dir {
                self.nodes.get_mut(&dd).unwrap().nlink -= 1;
            }
            self.drop_link(d);
        }
        self.nodes.get_mut(&sd).unwrap().entries.remove(sn);
        self.nodes
            .get_mut(&dd)
            .unwrap()
            .entries
            .insert(dn.into(), src);
        if src_dir {
            self.nodes.get_mut(&sd).unwrap().nlink -= 1;
            self.nodes.get_mut(&dd).unwrap().nlink += 1;
            self.nodes.get_mut(&src).unwrap().parent = dd;
        }
        Ok(())
    }
    fn link(&mut self, ino: u64, dir: u64, name: &str) -> Result<(), ErrorCode> {
        if self.nodes[&dir].entries.contains_key(name) {
            return Err(ErrorCode::Exists);
        }
        self.nodes.get_mut(&ino).unwrap().nlink += 1;
        self.nodes
            .get_mut(&dir)
            .unwrap()
            .entries
            .insert(name.into(), ino);
        Ok(())
    }
    fn refcounts(&self) -> HashMap<u8, u64> {
        let mut m = HashMap::new();
        for n in self.nodes.values() {
            for c in &n.chunks {
                *m.entry(*c).or_default() += 1;
            }
        }
        m
    }
}

struct Real {
    ns: Namespace,
    kv: MemKv,
    t: i64,
}

impl Real {
    fn new() -> Self {
        Self::with_window(0)
    }

    /// A one-group namespace whose commit window is `secs` (0: default).
    fn with_window(secs: u32) -> Self {
        let mut r = Real {
            ns: Namespace::new(0),
            kv: MemKv::default(),
            t: 0,
        };
        r.run(Op::Init(InitOp {
            cluster_id: "test".into(),
            group_id: 0,
            group_count: 1,
            commit_window_secs: secs,
            ..Default::default()
        }))
        .expect("init");
        r
    }
    fn run(&mut self, mut op: Op) -> Result<proto::meta::CommandResult, ErrorCode> {
        self.t += 1;
        // Layout commits rely on an index answer given just now.
        if let Op::CommitLayout(c) = &mut op {
            if c.checked_at_ms == 0 {
                c.checked_at_ms = self.t as u64 * 1000;
            }
        }
        let cmd = Command {
            version: 1,
            now: Some(Timespec {
                sec: self.t,
                nsec: 0,
            }),
            op: Some(op),
            ..Default::default()
        };
        let mut txn = Txn::new(&self.kv);
        match self.ns.apply(&mut txn, &cmd) {
            Ok(r) => {
                let w = txn.into_writes();
                self.kv.apply_writes(w);
                Ok(r)
            }
            Err(e) => Err(e.to_wire().code()),
        }
    }
    fn query(&self, q: Q) -> proto::meta::QueryResult {
        self.ns
            .query(&self.kv, &Query { q: Some(q) })
            .expect("query")
    }
}

fn chunk(c: u8) -> (Bytes, ChunkId) {
    let data = vec![c; 10];
    (Bytes::from(data.clone()), ChunkId::of(&data))
}

fn check_same(model: &Model, real: &Real) {
    for (ino, n) in &model.nodes {
        let a = real
            .query(Q::GetAttr(GetAttrQuery { ino: *ino }))
            .attr
            .expect("attr");
        assert_eq!(a.nlink, n.nlink, "nlink of {ino}");
        assert_eq!(
            a.kind == FileKind::Directory as i32,
            n.is_dir,
            "kind of {ino}"
        );
        if n.is_dir {
            let r = real.query(Q::ReadDir(ReadDirQuery {
                ino: *ino,
                after: Bytes::new(),
                limit: 100,
                plus: false,
            }));
            let got: BTreeMap<String, u64> = r
                .entries
                .iter()
                .map(|e| (String::from_utf8_lossy(&e.name).into_owned(), e.ino))
                .collect();
            assert_eq!(got, n.entries, "entries of {ino}");
        }
    }
    let refs = model.refcounts();
    for c in 0..3u8 {
        let (_, id) = chunk(c);
        let r = real.query(Q::ChunkInfo(ChunkInfoQuery {
            chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
        }));
        let info = &r.chunks[0];
        let want = refs.get(&c).copied().unwrap_or(0);
        if info.known {
            assert_eq!(info.refcount, want, "refcount of chunk {c}");
        } else {
            assert_eq!(want, 0, "chunk {c} is referenced but unknown");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn namespace_matches_the_reference_model(actions in proptest::collection::vec(action(), 1..60)) {
        let mut model = Model::new();
        let mut real = Real::new();
        for a in actions {
            let dirs = model.dirs();
            let files = model.files();
            let (want, got) = match a {
                Action::Create { dir, name, is_dir } => {
                    let d = dirs[dir % dirs.len()];
                    let kind = if is_dir { FileKind::Directory } else { FileKind::Regular };
                    (
                        model.create(d, NAMES[name], is_dir),
                        real.run(Op::Create(CreateOp {
                            parent: d, name: NAMES[name].as_bytes().to_vec().into(), kind: kind as i32,
                            perm: 0o755, ..Default::default()
                        })).map(|_| ()),
                    )
                }
                Action::Remove { dir, name, rmdir } => {
                    let d = dirs[dir % dirs.len()];
                    (
                        model.remove(d, NAMES[name], rmdir),
                        real.run(Op::Remove(RemoveOp { parent: d, name: NAMES[name].as_bytes().to_vec().into(), dir: rmdir })).map(|_| ()),
                    )
                }
                Action::Rename { sdir, sname, ddir, dname, noreplace } => {
                    let (s, d) = (dirs[sdir % dirs.len()], dirs[ddir % dirs.len()]);
                    (
                        model.rename(s, NAMES[sname], d, NAMES[dname], noreplace),
                        real.run(Op::Rename(RenameOp {
                            parent: s, name: NAMES[sname].as_bytes().to_vec().into(),
                            new_parent: d, new_name: NAMES[dname].as_bytes().to_vec().into(),
                            noreplace, exchange: false,
                        })).map(|_| ()),
                    )
                }
                Action::Link { file, dir, name } => {
                    if files.is_empty() { continue; }
                    let (f, d) = (files[file % files.len()], dirs[dir % dirs.len()]);
                    (
                        model.link(f, d, NAMES[name]),
                        real.run(Op::Link(LinkOp { ino: f, new_parent: d, new_name: NAMES[name].as_bytes().to_vec().into() })).map(|_| ()),
                    )
                }
                Action::Write { file, chunk: c } => {
                    if files.is_empty() { continue; }
                    let f = files[file % files.len()];
                    let (data, id) = chunk(c);
                    model.nodes.get_mut(&f).unwrap().chunks = vec![c];
                    (
                        Ok(()),
                        real.run(Op::CommitLayout(CommitLayoutOp {
                            ino: f,
                            extents: vec![Extent { offset: 0, length: data.len() as u64, chunk_id: Bytes::copy_from_slice(&id.0), chunk_offset: 0 }],
                            size: data.len() as u64,
                            new_chunks: vec![NewChunk { chunk_id: Bytes::copy_from_slice(&id.0), size: data.len() as u64, locations: vec![1, 2], ..Default::default() }],
                            mtime: None,
                            kill_suid: false,
                            checked_at_ms: 0,
                            ..Default::default()
                        })).map(|_| ()),
                    )
                }
            };
            prop_assert_eq!(want, got);
            check_same(&model, &real);
        }
    }
}

#[test]
fn bad_names_are_refused_and_change_nothing() {
    let mut real = Real::new();
    for (name, code) in [
        (vec![b'x'; 256], ErrorCode::NameTooLong),
        (b"a/b".to_vec(), ErrorCode::Invalid),
        (b"a\0b".to_vec(), ErrorCode::Invalid),
        (b".".to_vec(), ErrorCode::Invalid),
        (b"..".to_vec(), ErrorCode::Invalid),
        (Vec::new(), ErrorCode::Invalid),
    ] {
        let before = real.kv.0.clone();
        let r = real.run(Op::Create(CreateOp {
            parent: ROOT_INO,
            name: name.into(),
            kind: FileKind::Regular as i32,
            perm: 0o644,
            ..Default::default()
        }));
        assert_eq!(r.err(), Some(code));
        assert_eq!(real.kv.0, before, "a refused command changed state");
    }
}

#[test]
fn layouts_reject_unknown_chunks_and_truncate_drops_references() {
    let mut real = Real::new();
    let f = real
        .run(Op::Create(CreateOp {
            parent: ROOT_INO,
            name: b"f".to_vec().into(),
            kind: FileKind::Regular as i32,
            perm: 0o644,
            ..Default::default()
        }))
        .expect("create")
        .attr
        .expect("attr")
        .ino;
    let (data, id) = chunk(7);
    let ext = Extent {
        offset: 0,
        length: 10,
        chunk_id: Bytes::copy_from_slice(&id.0),
        chunk_offset: 0,
    };
    let unknown = real.run(Op::CommitLayout(CommitLayoutOp {
        ino: f,
        extents: vec![ext.clone()],
        size: 10,
        ..Default::default()
    }));
    assert_eq!(unknown.err(), Some(ErrorCode::UnknownChunk));
    real.run(Op::CommitLayout(CommitLayoutOp {
        ino: f,
        extents: vec![ext],
        size: 10,
        new_chunks: vec![NewChunk {
            chunk_id: Bytes::copy_from_slice(&id.0),
            size: data.len() as u64,
            locations: vec![1],
            ..Default::default()
        }],
        ..Default::default()
    }))
    .expect("commit");
    let info = |r: &Real| {
        r.query(Q::ChunkInfo(ChunkInfoQuery {
            chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
        }))
        .chunks[0]
            .clone()
    };
    assert_eq!(info(&real).refcount, 1);
    real.run(Op::SetAttr(proto::meta::SetAttrOp {
        ino: f,
        fields: Some(proto::meta::SetAttrFields {
            size: Some(0),
            ..Default::default()
        }),
    }))
    .expect("truncate");
    assert_eq!(info(&real).refcount, 0, "truncate to 0 drops the reference");
    let a = real
        .query(Q::GetAttr(GetAttrQuery { ino: f }))
        .attr
        .expect("attr");
    assert_eq!(a.size, 0);
}

#[test]
fn a_retried_command_applies_once_and_gets_the_first_result() {
    let real = Real::new();
    let mut kv = real.kv.clone();
    let ns = Namespace::new(0);
    let cmd = |seq: u64, acked_below: u64, name: &str| Command {
        version: 1,
        now: Some(Timespec { sec: 10, nsec: 0 }),
        client_id: 42,
        request_seq: seq,
        acked_below,
        origin: 0,
        op: Some(Op::Create(CreateOp {
            parent: ROOT_INO,
            name: name.as_bytes().to_vec().into(),
            kind: FileKind::Regular as i32,
            perm: 0o644,
            ..Default::default()
        })),
    };
    let (w, first) = ns.apply_request(&kv, &cmd(1, 1, "x")).expect("apply");
    kv.apply_writes(w);
    assert!(first.error.is_none(), "{:?}", first.error);
    let before = kv.0.clone();
    // The same request again (a retry after a lost reply): same answer, no change.
    let (w, again) = ns.apply_request(&kv, &cmd(1, 1, "x")).expect("apply");
    assert!(w.is_empty());
    assert_eq!(again, first);
    assert_eq!(kv.0, before);
    // A new request with the same name is a real conflict.
    let (w, second) = ns.apply_request(&kv, &cmd(2, 1, "x")).expect("apply");
    kv.apply_writes(w);
    assert_eq!(second.error.map(|e| e.code()), Some(ErrorCode::Exists));
    // Once the client reports both done, their results are forgotten.
    let (w, _) = ns.apply_request(&kv, &cmd(3, 3, "y")).expect("apply");
    kv.apply_writes(w);
    let prefix = musicfs_node::namespace::keys::request_prefix(0, 42);
    let left: Vec<_> =
        kv.0.keys()
            .filter(|k| k.starts_with(&prefix) && k.len() == prefix.len() + 8)
            .collect();
    assert_eq!(left.len(), 1, "only the latest result is kept");
}

#[test]
fn unreferenced_chunks_are_reaped_only_past_the_horizon() {
    let mut real = Real::with_window(10);
    let f = real
        .run(Op::Create(CreateOp {
            parent: ROOT_INO,
            name: b"f".to_vec().into(),
            kind: FileKind::Regular as i32,
            perm: 0o644,
            ..Default::default()
        }))
        .expect("create")
        .attr
        .expect("attr")
        .ino;
    let (data, id) = chunk(9);
    let commit = |checked_at_ms: u64| {
        Op::CommitLayout(CommitLayoutOp {
            ino: f,
            extents: vec![Extent {
                offset: 0,
                length: 10,
                chunk_id: Bytes::copy_from_slice(&id.0),
                chunk_offset: 0,
            }],
            size: 10,
            new_chunks: vec![NewChunk {
                chunk_id: Bytes::copy_from_slice(&id.0),
                size: data.len() as u64,
                locations: vec![1, 2, 3],
                ..Default::default()
            }],
            checked_at_ms,
            ..Default::default()
        })
    };
    let truncate = Op::SetAttr(proto::meta::SetAttrOp {
        ino: f,
        fields: Some(proto::meta::SetAttrFields {
            size: Some(0),
            ..Default::default()
        }),
    });
    let info = |r: &Real| {
        r.query(Q::ChunkInfo(ChunkInfoQuery {
            chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
        }))
        .chunks[0]
            .clone()
    };
    let reap = |before_sec: i64| {
        Op::ReapChunks(ReapChunksOp {
            chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
            zero_before: Some(Timespec {
                sec: before_sec,
                nsec: 0,
            }),
        })
    };
    let zero_keys = |r: &Real| r.kv.0.keys().filter(|k| k.get(4) == Some(&b'z')).count();

    // A commit relying on an index answer older than the window is refused.
    real.t += 100;
    let t = real.t as u64;
    assert_eq!(
        real.run(commit((t - 10) * 1000)).err(),
        Some(ErrorCode::Stale),
        "an 11 s old answer with a 10 s window"
    );
    let t = real.t as u64;
    real.run(commit((t - 9) * 1000))
        .expect("a 10 s old answer is in time");
    real.run(commit(0)).expect("commit");
    assert!(info(&real).known);
    assert_eq!(zero_keys(&real), 0);

    real.run(truncate.clone()).expect("truncate");
    let zero_at = real.t;
    let i = info(&real);
    assert_eq!(i.refcount, 0);
    assert!(!i.known, "an unreferenced chunk is not vouched for");
    assert_eq!(zero_keys(&real), 1);

    // Unreferenced since after the cut-off: kept.
    let r = real.run(reap(zero_at - 1)).expect("reap");
    assert!(r.reaped.is_empty());
    // Referenced again, then dropped again later: the new time counts.
    real.run(commit(0)).expect("re-reference");
    assert_eq!(zero_keys(&real), 0, "a referenced chunk leaves the index");
    real.run(truncate).expect("truncate again");
    let r = real.run(reap(zero_at + 1)).expect("reap");
    assert!(r.reaped.is_empty(), "dropped again after the cut-off");
    assert_eq!(zero_keys(&real), 1);

    // Location removals apply only to the record they were planned from.
    let change = |remove: Vec<u64>, seen: Vec<u64>| {
        Op::UpdateLocations(proto::meta::UpdateLocationsOp {
            changes: vec![proto::meta::LocationChange {
                chunk_id: Bytes::copy_from_slice(&id.0),
                add: vec![],
                remove,
                seen,
            }],
        })
    };
    real.run(change(vec![3], vec![1, 2])).expect("update");
    assert_eq!(
        info(&real).locations,
        vec![1, 2, 3],
        "planned from another record"
    );
    real.run(change(vec![3], vec![3, 2, 1])).expect("update");
    assert_eq!(info(&real).locations, vec![1, 2]);
    real.run(change(vec![1, 2], vec![1, 2])).expect("update");
    assert_eq!(info(&real).locations, vec![2], "the last location stays");

    let r = real.run(reap(real.t + 1)).expect("reap");
    assert_eq!(r.reaped.len(), 1);
    assert_eq!(r.reaped[0].locations, vec![2]);
    assert_eq!(info(&real).size, 0, "the record is gone");
    assert_eq!(zero_keys(&real), 0);

    // Settling moves the horizon forward, never back.
    real.run(Op::Settle(SettleOp { settled_ms: 50_000 }))
        .expect("settle");
    real.run(Op::Settle(SettleOp { settled_ms: 40_000 }))
        .expect("settle");
    let holds = real.query(Q::Holds(HoldsQuery {
        node_id: 1,
        chunk_ids: vec![Bytes::copy_from_slice(&id.0)],
    }));
    assert_eq!(holds.settled_ms, 50_000);
    assert_eq!(holds.horizon_ms, 50_000 - 10_000 - 10_000, "horizon");
    assert_eq!(holds.present, vec![false]);
}
