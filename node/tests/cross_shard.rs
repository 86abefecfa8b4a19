//! Cross-shard operations against an in-memory multi-group state machine:
//! every operation crashed after each of its steps, then recovered, leaves
//! the namespace consistent and the operation applied all or nothing; many
//! concurrent clients doing random cross-shard work leave every invariant
//! true; chunk reference batches apply exactly once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use musicfs_node::check::check;
use musicfs_node::coordinator::{self, Groups};
use musicfs_node::namespace::{MemKv, Namespace};
use proto::meta::{
    command::Op, query::Q, Command, CommandResult, CommitLayoutOp, CreateOp, Error as WireError,
    ErrorCode, Extent, FileKind, InitOp, LinkOp, LookupQuery, NewChunk, Query, QueryResult,
    RemoveOp, RenameOp, Timespec,
};
use proto::{dir_group, group_of_ino, ChunkId, ROOT_INO};

/// Every group of a cluster in one in-memory store.
struct Mem {
    kv: Mutex<MemKv>,
    groups: u32,
    clock: AtomicU64,
}

impl Mem {
    fn new(groups: u32) -> Arc<Mem> {
        let m = Arc::new(Mem {
            kv: Mutex::new(MemKv::default()),
            groups,
            clock: AtomicU64::new(1_700_000_000_000),
        });
        for g in 0..groups {
            m.apply(
                g,
                Op::Init(InitOp {
                    cluster_id: "test".into(),
                    group_id: g,
                    group_count: groups,
                    ..Default::default()
                }),
                0,
                0,
            )
            .expect("init");
        }
        m
    }

    fn apply(&self, g: u32, op: Op, client: u64, seq: u64) -> Result<CommandResult, WireError> {
        self.apply_acked(g, op, client, seq, 0)
    }

    /// `apply` of a client that has every answer below `acked_below`.
    fn apply_acked(
        &self,
        g: u32,
        mut op: Op,
        client: u64,
        seq: u64,
        acked_below: u64,
    ) -> Result<CommandResult, WireError> {
        // A millisecond passes per command.
        let ms = self.clock.fetch_add(1, Ordering::Relaxed);
        // Layout commits rely on an index answer given just now.
        if let Op::CommitLayout(c) = &mut op {
            if c.checked_at_ms == 0 {
                c.checked_at_ms = ms.max(1);
            }
        }
        let cmd = Command {
            version: 1,
            now: Some(Timespec {
                sec: (ms / 1000) as i64,
                nsec: (ms % 1000) as u32 * 1_000_000,
            }),
            client_id: client,
            request_seq: seq,
            acked_below,
            origin: 0,
            op: Some(op),
        };
        let mut kv = self.kv.lock().unwrap();
        let (writes, r) = Namespace::new(g)
            .apply_request(&*kv, &cmd)
            .expect("storage");
        kv.apply_writes(writes);
        match r.error {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    fn snapshot(&self) -> MemKv {
        self.kv.lock().unwrap().clone()
    }
}

/// Proposals through this handle stop working after `budget` of them: the
/// node running the operation died there.
struct Node {
    mem: Arc<Mem>,
    budget: AtomicUsize,
}

impl Node {
    fn new(mem: &Arc<Mem>, budget: usize) -> Node {
        Node {
            mem: mem.clone(),
            budget: AtomicUsize::new(budget),
        }
    }
}

impl Groups for Node {
    async fn propose(&self, group: u32, op: Op) -> Result<CommandResult, WireError> {
        tokio::task::yield_now().await;
        if self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            return Err(WireError::new(ErrorCode::Unavailable, "node crashed"));
        }
        self.mem.apply(group, op, 0, 0)
    }

    async fn query(&self, group: u32, q: Q) -> Result<QueryResult, WireError> {
        tokio::task::yield_now().await;
        let kv = self.mem.kv.lock().unwrap();
        let r = Namespace::new(group)
            .query(&*kv, &Query { q: Some(q) })
            .map_err(|e| e.to_wire())?;
        Ok(r)
    }
}

/// A client request as a node serves it: the addressed group first, the
/// coordinator when the operation spans groups.
/// Requests that ran as cross-shard transactions.
static CROSSED: AtomicUsize = AtomicUsize::new(0);

async fn request(
    node: &Node,
    g: u32,
    op: Op,
    client: u64,
    seq: u64,
) -> Result<CommandResult, WireError> {
    match node.mem.apply(g, op.clone(), client, seq) {
        Err(e) if e.code() == ErrorCode::CrossShard => {
            CROSSED.fetch_add(1, Ordering::Relaxed);
            let cmd = Command {
                version: 1,
                now: None,
                client_id: client,
                request_seq: seq,
                acked_below: 0,
                origin: 0,
                op: Some(op),
            };
            let r = coordinator::run(node, g, node.mem.groups, &cmd).await;
            match r.error {
                Some(e) => Err(e),
                None => Ok(r),
            }
        }
        // A create batch whose directories belong elsewhere.
        Ok(r)
            if r.results.iter().any(|x| {
                x.error
                    .as_ref()
                    .is_some_and(|e| e.code() == ErrorCode::CrossShard)
            }) =>
        {
            CROSSED.fetch_add(1, Ordering::Relaxed);
            let cmd = Command {
                version: 1,
                now: None,
                client_id: client,
                request_seq: seq,
                acked_below: 0,
                origin: 0,
                op: Some(op),
            };
            let r = coordinator::mkdir_batch(node, g, node.mem.groups, &cmd, r).await;
            // Acknowledged means every create of the batch succeeded.
            match r.results.iter().find_map(|x| x.error.clone()) {
                Some(e) => Err(e),
                None => Ok(r),
            }
        }
        other => other,
    }
}

/// What the recovery loops of all leaders do, regardless of age.
async fn recover(mem: &Arc<Mem>) {
    let node = Node::new(mem, usize::MAX);
    for _ in 0..4 {
        for g in 0..mem.groups {
            let (intents, decisions, outbox) = {
                let kv = mem.kv.lock().unwrap();
                let ns = Namespace::new(g);
                (
                    ns.intents(&*kv, 1000).unwrap(),
                    ns.decisions(&*kv, 1000).unwrap(),
                    ns.outbox(&*kv, 256).unwrap(),
                )
            };
            for i in intents {
                coordinator::resolve_orphan(&node, g, i.txid, i.coordinator)
                    .await
                    .expect("resolve orphan");
            }
            for d in decisions {
                coordinator::finish_decision(&node, g, d.txid, d.commit, &d.participants, true)
                    .await
                    .expect("finish decision");
            }
            coordinator::deliver_outbox(&node, g, outbox)
                .await
                .expect("deliver");
        }
    }
}

fn assert_consistent(mem: &Mem, what: &str) {
    let report = check(&mem.snapshot()).expect("check");
    assert!(report.ok(), "{what}: {:#?}", report.problems);
}

fn create(parent: u64, name: &str, kind: FileKind) -> Op {
    Op::Create(CreateOp {
        parent,
        name: name.as_bytes().to_vec().into(),
        kind: kind as i32,
        perm: 0o755,
        ..Default::default()
    })
}

async fn mk(mem: &Arc<Mem>, parent: u64, name: &str, kind: FileKind) -> u64 {
    let node = Node::new(mem, usize::MAX);
    request(
        &node,
        group_of_ino(parent),
        create(parent, name, kind),
        0,
        0,
    )
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
    .attr
    .expect("attr")
    .ino
}

fn lookup(mem: &Mem, parent: u64, name: &str) -> Option<u64> {
    let kv = mem.kv.lock().unwrap();
    Namespace::new(group_of_ino(parent))
        .query(
            &*kv,
            &Query {
                q: Some(Q::Lookup(LookupQuery {
                    parent,
                    name: name.as_bytes().to_vec().into(),
                })),
            },
        )
        .ok()
        .and_then(|r| r.entry)
        .map(|e| e.ino)
}

/// A name under `parent` whose directory lands in a group other than the
/// parent's (and other than `avoid`).
fn remote_name(parent: u64, prefix: &str, groups: u32, avoid: u32) -> String {
    (0..1000)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| {
            let g = dir_group(parent, n.as_bytes(), groups);
            g != group_of_ino(parent) && g != avoid
        })
        .expect("a remote name")
}

/// Runs `op` with a crash after each possible step, recovers, and checks
/// the invariants and that `applied` or `untouched` holds.
async fn crash_every_step<S>(name: &str, setup: S)
where
    S: Fn(Arc<Mem>) -> futures::future::BoxFuture<'static, (u32, Op, Check, Check)>,
{
    let mut completed = false;
    for budget in 0..20 {
        let mem = Mem::new(4);
        let (g, op, applied, untouched) = setup(mem.clone()).await;
        assert_consistent(&mem, &format!("{name}: setup"));
        let node = Node::new(&mem, budget);
        let r = request(&node, g, op, 7, 1).await;
        recover(&mem).await;
        assert_consistent(&mem, &format!("{name}: crash after {budget} steps"));
        let (a, u) = (applied(&mem), untouched(&mem));
        assert!(
            a != u,
            "{name}: after a crash at step {budget} the operation is neither applied nor undone \
             (applied {a}, untouched {u}, reply {r:?})"
        );
        if r.is_ok() {
            assert!(a, "{name}: acknowledged at step {budget} but not applied");
            completed = true;
            break;
        }
    }
    assert!(completed, "{name}: never completed within 20 steps");
}

type Check = Box<dyn Fn(&Mem) -> bool + Send>;

#[tokio::test]
async fn mkdir_in_another_group_survives_a_crash_at_every_step() {
    crash_every_step("mkdir", |mem| {
        Box::pin(async move {
            let name = remote_name(ROOT_INO, "d", mem.groups, u32::MAX);
            let a: Check = {
                let n = name.clone();
                Box::new(move |m| lookup(m, ROOT_INO, &n).is_some())
            };
            let u: Check = {
                let n = name.clone();
                Box::new(move |m| lookup(m, ROOT_INO, &n).is_none())
            };
            (0, create(ROOT_INO, &name, FileKind::Directory), a, u)
        })
    })
    .await;
}

#[tokio::test]
async fn rmdir_of_a_remote_directory_survives_a_crash_at_every_step() {
    crash_every_step("rmdir", |mem| {
        Box::pin(async move {
            let name = remote_name(ROOT_INO, "d", mem.groups, u32::MAX);
            mk(&mem, ROOT_INO, &name, FileKind::Directory).await;
            let n1 = name.clone();
            let n2 = name.clone();
            (
                0,
                Op::Remove(RemoveOp {
                    parent: ROOT_INO,
                    name: name.into_bytes().into(),
                    dir: true,
                }),
                Box::new(move |m: &Mem| lookup(m, ROOT_INO, &n1).is_none()) as Check,
                Box::new(move |m: &Mem| lookup(m, ROOT_INO, &n2).is_some()) as Check,
            )
        })
    })
    .await;
}

#[tokio::test]
async fn a_directory_moved_across_groups_over_an_empty_one_survives_a_crash_at_every_step() {
    crash_every_step("rename dir", |mem| {
        Box::pin(async move {
            let a = remote_name(ROOT_INO, "a", mem.groups, u32::MAX);
            let ai = mk(&mem, ROOT_INO, &a, FileKind::Directory).await;
            let b = remote_name(ROOT_INO, "b", mem.groups, group_of_ino(ai));
            let bi = mk(&mem, ROOT_INO, &b, FileKind::Directory).await;
            let c = remote_name(ai, "c", mem.groups, group_of_ino(bi));
            let ci = mk(&mem, ai, &c, FileKind::Directory).await;
            mk(&mem, ci, "song.flac", FileKind::Regular).await;
            // b/x exists and is empty: the move replaces it.
            mk(&mem, bi, "x", FileKind::Directory).await;
            let (c1, c2) = (c.clone(), c.clone());
            (
                group_of_ino(ai),
                Op::Rename(RenameOp {
                    parent: ai,
                    name: c.into_bytes().into(),
                    new_parent: bi,
                    new_name: b"x".to_vec().into(),
                    ..Default::default()
                }),
                Box::new(move |m: &Mem| {
                    lookup(m, ai, &c1).is_none() && lookup(m, bi, "x") == Some(ci)
                }) as Check,
                Box::new(move |m: &Mem| {
                    lookup(m, ai, &c2) == Some(ci) && lookup(m, bi, "x").is_some_and(|x| x != ci)
                }) as Check,
            )
        })
    })
    .await;
}

#[tokio::test]
async fn a_cross_group_hard_link_and_unlink_survive_a_crash_at_every_step() {
    crash_every_step("link", |mem| {
        Box::pin(async move {
            let d = remote_name(ROOT_INO, "d", mem.groups, u32::MAX);
            let di = mk(&mem, ROOT_INO, &d, FileKind::Directory).await;
            let f = mk(&mem, ROOT_INO, "track.mp3", FileKind::Regular).await;
            (
                group_of_ino(di),
                Op::Link(LinkOp {
                    ino: f,
                    new_parent: di,
                    new_name: b"alias.mp3".to_vec().into(),
                }),
                Box::new(move |m: &Mem| lookup(m, di, "alias.mp3") == Some(f)) as Check,
                Box::new(move |m: &Mem| lookup(m, di, "alias.mp3").is_none()) as Check,
            )
        })
    })
    .await;
    crash_every_step("unlink", |mem| {
        Box::pin(async move {
            let d = remote_name(ROOT_INO, "d", mem.groups, u32::MAX);
            let di = mk(&mem, ROOT_INO, &d, FileKind::Directory).await;
            let f = mk(&mem, ROOT_INO, "track.mp3", FileKind::Regular).await;
            let node = Node::new(&mem, usize::MAX);
            request(
                &node,
                group_of_ino(di),
                Op::Link(LinkOp {
                    ino: f,
                    new_parent: di,
                    new_name: b"alias.mp3".to_vec().into(),
                }),
                0,
                0,
            )
            .await
            .expect("link");
            (
                group_of_ino(di),
                Op::Remove(RemoveOp {
                    parent: di,
                    name: b"alias.mp3".to_vec().into(),
                    dir: false,
                }),
                Box::new(move |m: &Mem| lookup(m, di, "alias.mp3").is_none()) as Check,
                Box::new(move |m: &Mem| lookup(m, di, "alias.mp3").is_some()) as Check,
            )
        })
    })
    .await;
}

#[tokio::test]
async fn moving_a_directory_beneath_itself_is_refused_across_groups() {
    let mem = Mem::new(4);
    let a = remote_name(ROOT_INO, "a", 4, u32::MAX);
    let ai = mk(&mem, ROOT_INO, &a, FileKind::Directory).await;
    let b = remote_name(ai, "b", 4, group_of_ino(ai));
    let bi = mk(&mem, ai, &b, FileKind::Directory).await;
    let c = remote_name(bi, "c", 4, group_of_ino(bi));
    let ci = mk(&mem, bi, &c, FileKind::Directory).await;
    let node = Node::new(&mem, usize::MAX);
    // mv a a/b/c/a
    let r = request(
        &node,
        0,
        Op::Rename(RenameOp {
            parent: ROOT_INO,
            name: a.clone().into_bytes().into(),
            new_parent: ci,
            new_name: b"a".to_vec().into(),
            ..Default::default()
        }),
        1,
        1,
    )
    .await;
    let e = r.expect_err("a loop must be refused");
    assert_eq!(e.code(), ErrorCode::Invalid, "{e}");
    assert_eq!(lookup(&mem, ROOT_INO, &a), Some(ai));
    assert_consistent(&mem, "after the refused loop");
}

#[tokio::test]
async fn a_retried_cross_shard_request_applies_once() {
    let mem = Mem::new(4);
    let name = remote_name(ROOT_INO, "d", 4, u32::MAX);
    let node = Node::new(&mem, usize::MAX);
    let op = create(ROOT_INO, &name, FileKind::Directory);
    let first = request(&node, 0, op.clone(), 9, 5).await.expect("mkdir");
    // The reply was lost; the client sends the same request again.
    let again = request(&node, 0, op, 9, 5).await.expect("retry");
    assert_eq!(first.attr.map(|a| a.ino), again.attr.map(|a| a.ino));
    assert_consistent(&mem, "after the retry");
}

/// A retry can be answered while the first run of the same request is
/// still stalled inside its transaction (seen in the chaos tests under a
/// one-way partition): the reply the client got stands, and the stalled
/// run may not commit afterwards.
#[tokio::test]
async fn a_stalled_run_does_not_commit_after_its_retry_was_answered() {
    let mem = Mem::new(4);
    let name = remote_name(ROOT_INO, "d", 4, u32::MAX);
    // Another client's file holds the name when the retry arrives.
    let file = mk(&mem, ROOT_INO, &name, FileKind::Regular).await;
    let op = create(ROOT_INO, &name, FileKind::Directory);
    let retry = mem
        .apply(0, op.clone(), 9, 5)
        .expect_err("the name is taken");
    assert_eq!(retry.code(), ErrorCode::Exists);
    // The file goes away; then the first run goes on.
    mem.apply(
        0,
        Op::Remove(RemoveOp {
            parent: ROOT_INO,
            name: name.as_bytes().to_vec().into(),
            dir: false,
        }),
        0,
        0,
    )
    .expect("unlink");
    assert_ne!(lookup(&mem, ROOT_INO, &name), Some(file));
    let node = Node::new(&mem, usize::MAX);
    let cmd = Command {
        version: 1,
        now: None,
        client_id: 9,
        request_seq: 5,
        acked_below: 0,
        origin: 0,
        op: Some(op),
    };
    let first = coordinator::run(&node, 0, 4, &cmd).await;
    assert_eq!(
        first.error.map(|e| e.code()),
        Some(ErrorCode::Exists),
        "the first run must give the reply the retry gave"
    );
    assert_eq!(
        lookup(&mem, ROOT_INO, &name),
        None,
        "a request answered EEXIST created the directory"
    );
    // And it left no intent holding the name: it is free at once.
    mk(&mem, ROOT_INO, &name, FileKind::Directory).await;
    recover(&mem).await;
    assert_consistent(&mem, "after the stalled run");
}

/// Client 9's request 5 applied: a rename of the root's "a" to "x" in a
/// directory of another group. Returns (node, directory, file, the op).
async fn applied_cross_group_rename(mem: &Arc<Mem>) -> (Node, u64, u64, Op) {
    let node = Node::new(mem, usize::MAX);
    let dname = remote_name(ROOT_INO, "d", 4, u32::MAX);
    let dir = mk(mem, ROOT_INO, &dname, FileKind::Directory).await;
    let file = mk(mem, ROOT_INO, "a", FileKind::Regular).await;
    let rename = rename_op(ROOT_INO, "a", dir, "x");
    request(&node, 0, rename.clone(), 9, 5)
        .await
        .expect("rename");
    (node, dir, file, rename)
}

/// A run of a request can stall past the client's retry, the retry's
/// answer, and the client's next requests (which tell the group to forget
/// that answer). Seen in the chaos tests with a node killed: the stalled
/// rename then moved the file that had since taken the old name. Neither a
/// stalled cross-shard run nor a late single-group copy may apply again.
#[tokio::test]
async fn a_request_the_client_has_moved_past_never_applies_again() {
    let mem = Mem::new(4);
    // Client 9's request 5 completes (through its retry).
    let (node, dir, first, rename) = applied_cross_group_rename(&mem).await;
    assert_eq!(lookup(&mem, dir, "x"), Some(first));
    // Its next request says it has every answer below 6.
    mem.apply_acked(0, create(ROOT_INO, "b", FileKind::Regular), 9, 6, 6)
        .expect("next request");
    // Another file takes the old name.
    let second = mk(&mem, ROOT_INO, "a", FileKind::Regular).await;
    // The stalled first run of request 5 goes on now.
    let cmd = Command {
        version: 1,
        now: None,
        client_id: 9,
        request_seq: 5,
        acked_below: 5,
        origin: 0,
        op: Some(rename.clone()),
    };
    let late = coordinator::run(&node, 0, 4, &cmd).await;
    assert!(
        late.error.is_some(),
        "a stale run reported success: {late:?}"
    );
    assert_eq!(
        lookup(&mem, ROOT_INO, "a"),
        Some(second),
        "the new file was moved"
    );
    assert_eq!(
        lookup(&mem, dir, "x"),
        Some(first),
        "the renamed file was replaced"
    );
    // A late copy of a single-group request does not apply either.
    mem.apply(
        0,
        Op::Remove(RemoveOp {
            parent: ROOT_INO,
            name: b"b".to_vec().into(),
            dir: false,
        }),
        0,
        0,
    )
    .expect("unlink b");
    mem.apply_acked(0, create(ROOT_INO, "c", FileKind::Regular), 9, 7, 7)
        .expect("a later request");
    let copy = mem.apply_acked(0, create(ROOT_INO, "b", FileKind::Regular), 9, 6, 6);
    assert_eq!(copy.expect_err("late copy").code(), ErrorCode::Stale);
    assert_eq!(
        lookup(&mem, ROOT_INO, "b"),
        None,
        "a late copy created b again"
    );
    recover(&mem).await;
    assert_consistent(&mem, "after the late runs");
}

/// Groups whose request-table reads fail (the coordinator group has no
/// leader just then).
struct NoRecords(Node);

impl Groups for NoRecords {
    async fn propose(&self, group: u32, op: Op) -> Result<CommandResult, WireError> {
        self.0.propose(group, op).await
    }

    async fn query(&self, group: u32, q: Q) -> Result<QueryResult, WireError> {
        if matches!(q, Q::RequestResult(_)) {
            return Err(WireError::new(ErrorCode::Internal, "no leader"));
        }
        self.0.query(group, q).await
    }
}

/// A second run of a request another run has applied (a resend that passed
/// the single-group attempt just before the first run decided) meets the
/// namespace that run left: it answers the recorded reply, or Unavailable
/// when that cannot be read, never the error the changed namespace gives.
#[tokio::test]
async fn a_second_run_of_an_applied_request_answers_its_recorded_reply() {
    let mem = Mem::new(4);
    let (node, dir, file, rename) = applied_cross_group_rename(&mem).await;
    let cmd = Command {
        version: 1,
        now: None,
        client_id: 9,
        request_seq: 5,
        acked_below: 0,
        origin: 0,
        op: Some(rename),
    };
    let blind = coordinator::run(&NoRecords(Node::new(&mem, usize::MAX)), 0, 4, &cmd).await;
    assert_eq!(
        blind.error.map(|e| e.code()),
        Some(ErrorCode::Unavailable),
        "a run that cannot read the recorded reply must not answer"
    );
    let again = coordinator::run(&node, 0, 4, &cmd).await;
    assert!(again.error.is_none(), "the recorded reply: {again:?}");
    assert_eq!(lookup(&mem, dir, "x"), Some(file));
    assert_consistent(&mem, "after the second runs");
}

/// Groups on which another client's request lands between a run's reads
/// and its prepares.
struct Racing {
    node: Node,
    /// Taken by the run's first prepare and held while the request runs,
    /// so the run's other prepares come after it.
    before_prepare: tokio::sync::Mutex<Option<(u32, Op)>>,
}

impl Groups for Racing {
    async fn propose(&self, group: u32, op: Op) -> Result<CommandResult, WireError> {
        if matches!(op, Op::TxnPrepare(_)) {
            let mut other = self.before_prepare.lock().await;
            if let Some((g, o)) = other.take() {
                let node = Node::new(&self.node.mem, usize::MAX);
                request(&node, g, o, 0, 0)
                    .await
                    .expect("the other client's request");
            }
        }
        self.node.propose(group, op).await
    }

    async fn query(&self, group: u32, q: Q) -> Result<QueryResult, WireError> {
        self.node.query(group, q).await
    }
}

fn rename_op(parent: u64, name: &str, new_parent: u64, new_name: &str) -> Op {
    Op::Rename(RenameOp {
        parent,
        name: name.as_bytes().to_vec().into(),
        new_parent,
        new_name: new_name.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

/// Seen in the chaos tests (disk-full): a cross-group rename answered
/// ENOENT although its source name existed throughout. Between the run's
/// lookup and its prepares another client's rename replaced the source,
/// deleting the inode the run had found. The name's group refuses the
/// prepare as Busy (changed meanwhile); the inode's group, ordered first,
/// said NotFound, and that was the answer. The same for an unlink.
#[tokio::test]
async fn a_name_replaced_before_the_prepare_is_retried_not_reported_missing() {
    let mem = Mem::new(4);
    let node = Node::new(&mem, usize::MAX);
    let p = mk(
        &mem,
        ROOT_INO,
        &remote_name(ROOT_INO, "p", 4, u32::MAX),
        FileKind::Directory,
    )
    .await;
    let pg = group_of_ino(p);
    let q = mk(
        &mem,
        ROOT_INO,
        &remote_name(ROOT_INO, "q", 4, pg),
        FileKind::Directory,
    )
    .await;
    // "n" and "m" in P have their inodes in group 0 (made in the root),
    // "x" and "y" in P's group.
    for name in ["n", "m"] {
        mk(&mem, ROOT_INO, name, FileKind::Regular).await;
        request(&node, 0, rename_op(ROOT_INO, name, p, name), 0, 0)
            .await
            .expect("move into p");
    }
    let x = mk(&mem, p, "x", FileKind::Regular).await;
    let y = mk(&mem, p, "y", FileKind::Regular).await;
    let n = lookup(&mem, p, "n").expect("n");
    assert!(group_of_ino(n) < pg, "the inode's group prepares first");

    // mv p/n q/n, while another client does mv p/x p/n.
    let cmd = Command {
        version: 1,
        now: None,
        client_id: 7,
        request_seq: 1,
        acked_below: 0,
        origin: 0,
        op: Some(rename_op(p, "n", q, "n")),
    };
    let racing = Racing {
        node: Node::new(&mem, usize::MAX),
        before_prepare: tokio::sync::Mutex::new(Some((pg, rename_op(p, "x", p, "n")))),
    };
    let r = coordinator::run(&racing, pg, 4, &cmd).await;
    assert_eq!(
        r.error.map(|e| e.code()),
        Some(ErrorCode::Busy),
        "p/n existed throughout: the rename must be retried"
    );
    assert_eq!(lookup(&mem, p, "n"), Some(x));
    assert_eq!(lookup(&mem, q, "n"), None);
    // The client's retry moves the file that holds the name now.
    request(&node, pg, cmd.op.clone().expect("op"), 7, 1)
        .await
        .expect("retried rename");
    assert_eq!(lookup(&mem, q, "n"), Some(x));

    // rm p/m, while another client does mv p/y p/m.
    let remove = Op::Remove(RemoveOp {
        parent: p,
        name: b"m".to_vec().into(),
        dir: false,
    });
    let racing = Racing {
        node: Node::new(&mem, usize::MAX),
        before_prepare: tokio::sync::Mutex::new(Some((pg, rename_op(p, "y", p, "m")))),
    };
    let cmd = Command {
        request_seq: 2,
        op: Some(remove.clone()),
        ..cmd
    };
    let r = coordinator::run(&racing, pg, 4, &cmd).await;
    assert_eq!(
        r.error.map(|e| e.code()),
        Some(ErrorCode::Busy),
        "p/m existed throughout: the unlink must be retried"
    );
    assert_eq!(lookup(&mem, p, "m"), Some(y));
    request(&node, pg, remove, 7, 2)
        .await
        .expect("retried unlink");
    assert_eq!(lookup(&mem, p, "m"), None);
    recover(&mem).await;
    assert_consistent(&mem, "after the raced operations");
}

/// Chunk `i` of a test file.
fn chunk(i: u32) -> ChunkId {
    ChunkId::of(&i.to_be_bytes())
}

fn layout(ino: u64, ids: &[ChunkId], new: bool) -> Op {
    Op::CommitLayout(CommitLayoutOp {
        ino,
        extents: ids
            .iter()
            .enumerate()
            .map(|(i, id)| Extent {
                offset: i as u64 * 100,
                length: 100,
                chunk_id: id.0.to_vec().into(),
                chunk_offset: 0,
            })
            .collect(),
        size: ids.len() as u64 * 100,
        new_chunks: if new {
            ids.iter()
                .map(|id| NewChunk {
                    chunk_id: id.0.to_vec().into(),
                    size: 100,
                    locations: vec![1, 2],
                    ..Default::default()
                })
                .collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    })
}

#[tokio::test]
async fn chunk_references_cross_groups_exactly_once() {
    let mem = Mem::new(4);
    let files: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..6 {
            v.push(mk(&mem, ROOT_INO, &format!("f{i}"), FileKind::Regular).await);
        }
        v
    };
    let ids: Vec<ChunkId> = (0..24).map(chunk).collect();
    assert!(
        ids.iter().any(|id| id.group(4) != 0),
        "some chunks live elsewhere"
    );
    for (n, f) in files.iter().enumerate() {
        let mine: Vec<ChunkId> = ids.iter().skip(n).step_by(2).copied().collect();
        mem.apply(0, layout(*f, &mine, true), 0, 0).expect("commit");
    }
    // Deliver twice without acknowledging in between: a lost ack resends.
    for _ in 0..2 {
        for g in 0..4 {
            let outbox = Namespace::new(g).outbox(&mem.snapshot(), 256).unwrap();
            for o in outbox {
                mem.apply(
                    o.target,
                    Op::DeliverRefs(proto::meta::DeliverRefsOp {
                        source: g,
                        batches: o.batches,
                    }),
                    0,
                    0,
                )
                .expect("deliver");
            }
        }
    }
    recover(&mem).await;
    assert_consistent(&mem, "after delivery");
    // Rewrite, truncate and delete: references move back.
    mem.apply(0, layout(files[0], &ids[..3], true), 0, 0)
        .expect("rewrite");
    // A chunk the layout adds must be named with its size: one never
    // uploaded (and indexed by another group) is refused.
    let stranger = (0u32..)
        .map(|i| ChunkId::of(format!("never uploaded {i}").as_bytes()))
        .find(|id| id.group(4) != 0)
        .expect("a chunk of another group");
    let e = mem
        .apply(0, layout(files[2], &[stranger], false), 0, 0)
        .expect_err("unknown chunk");
    assert_eq!(e.code(), ErrorCode::UnknownChunk, "{e}");
    let node = Node::new(&mem, usize::MAX);
    request(
        &node,
        0,
        Op::Remove(RemoveOp {
            parent: ROOT_INO,
            name: b"f1".to_vec().into(),
            dir: false,
        }),
        0,
        0,
    )
    .await
    .expect("unlink");
    recover(&mem).await;
    assert_consistent(&mem, "after rewrite and unlink");
}

/// A seeded pseudo-random generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn pick(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test]
async fn concurrent_random_cross_shard_work_keeps_every_invariant() {
    let seed: u64 = std::env::var("MUSICFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    println!("seed {seed}");
    let mem = Mem::new(8);
    // A small library: artists, albums, tracks.
    let mut dirs = vec![ROOT_INO];
    for a in 0..4 {
        let ai = mk(&mem, ROOT_INO, &format!("artist{a}"), FileKind::Directory).await;
        dirs.push(ai);
        for b in 0..2 {
            let bi = mk(&mem, ai, &format!("album{b}"), FileKind::Directory).await;
            dirs.push(bi);
            for t in 0..3 {
                mk(&mem, bi, &format!("{t:02}.flac"), FileKind::Regular).await;
            }
        }
    }
    let dirs = Arc::new(dirs);
    let mut tasks = Vec::new();
    for client in 0..6u64 {
        let (mem, dirs) = (mem.clone(), dirs.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut done = 0;
            for step in 0..60u64 {
                let p = dirs[rng.pick(dirs.len())];
                let q = dirs[rng.pick(dirs.len())];
                let name = format!("n{}", rng.pick(6));
                let other = format!("n{}", rng.pick(6));
                let op = match rng.pick(6) {
                    0 => create(p, &name, FileKind::Directory),
                    1 => create(p, &name, FileKind::Regular),
                    2 | 3 => Op::Rename(RenameOp {
                        parent: p,
                        name: name.into_bytes().into(),
                        new_parent: q,
                        new_name: other.into_bytes().into(),
                        ..Default::default()
                    }),
                    4 => Op::Remove(RemoveOp {
                        parent: p,
                        name: name.into_bytes().into(),
                        dir: rng.pick(2) == 0,
                    }),
                    _ => match lookup(&mem, p, &name) {
                        Some(ino) => Op::Link(LinkOp {
                            ino,
                            new_parent: q,
                            new_name: other.into_bytes().into(),
                        }),
                        None => continue,
                    },
                };
                // One request in five runs on a node that dies after a
                // random number of steps.
                let budget = if rng.pick(5) == 0 {
                    rng.pick(6)
                } else {
                    usize::MAX
                };
                let node = Node::new(&mem, budget);
                if request(&node, group_of_ino(p), op, client + 1, step + 1)
                    .await
                    .is_ok()
                {
                    done += 1;
                }
            }
            done
        }));
    }
    // Recovery runs throughout, racing live transactions: it may abort
    // one that is merely slow, which must stay safe.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recovery = {
        let (mem, stop) = (mem.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                recover(&mem).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let crossed_before = CROSSED.load(Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client task");
    }
    stop.store(true, Ordering::Relaxed);
    recovery.await.expect("recovery task");
    let crossed = CROSSED.load(Ordering::Relaxed) - crossed_before;
    println!("{total} operations succeeded, {crossed} ran across groups");
    recover(&mem).await;
    let report = check(&mem.snapshot()).expect("check");
    assert!(report.ok(), "seed {seed}: {:#?}", report.problems);
    assert!(total > 50, "seed {seed}: only {total} operations succeeded");
    assert!(report.inodes > 20, "seed {seed}: {report:?}");
    assert!(
        crossed > 30,
        "seed {seed}: only {crossed} operations crossed groups"
    );
}

fn batch(parent: u64, dirs: &[String], files: &[&str]) -> Op {
    let mut creates = Vec::new();
    for d in dirs {
        if let Op::Create(c) = create(parent, d, FileKind::Directory) {
            creates.push(c);
        }
    }
    for f in files {
        if let Op::Create(c) = create(parent, f, FileKind::Regular) {
            creates.push(c);
        }
    }
    Op::CreateBatch(proto::meta::CreateBatchOp { creates })
}

#[tokio::test]
async fn a_batch_of_directories_in_other_groups_is_one_transaction_and_survives_crashes() {
    let names: Vec<String> = (0..10).map(|i| format!("album{i}")).collect();
    // All of them appear, or none (the files of the batch are not part of
    // the cross-shard transaction).
    crash_every_step("batch mkdir", |mem| {
        let names = names.clone();
        Box::pin(async move {
            // Directories that land in the parent's group are plain creates.
            let remote: Vec<String> = names
                .iter()
                .filter(|n| dir_group(ROOT_INO, n.as_bytes(), mem.groups) != 0)
                .cloned()
                .collect();
            assert!(remote.len() >= 5, "most of the batch crosses groups");
            let (n1, n2) = (remote.clone(), remote);
            (
                0,
                batch(ROOT_INO, &names, &["cover.jpg"]),
                Box::new(move |m: &Mem| n1.iter().all(|n| lookup(m, ROOT_INO, n).is_some()))
                    as Check,
                Box::new(move |m: &Mem| n2.iter().all(|n| lookup(m, ROOT_INO, n).is_none()))
                    as Check,
            )
        })
    })
    .await;
    // A whole batch, then its retry: the same answers, nothing twice.
    let mem = Mem::new(4);
    let node = Node::new(&mem, usize::MAX);
    let op = batch(ROOT_INO, &names, &["cover.jpg", "folder.jpg"]);
    let first = request(&node, 0, op.clone(), 3, 1).await.expect("batch");
    assert_eq!(first.results.len(), 12);
    assert!(first.results.iter().all(|r| r.error.is_none()), "{first:?}");
    let remote = first
        .results
        .iter()
        .filter(|r| r.attr.is_some_and(|a| group_of_ino(a.ino) != 0))
        .count();
    assert!(
        remote >= 5,
        "directories spread over groups ({remote} remote)"
    );
    let again = request(&node, 0, op, 3, 1).await.expect("retry");
    let inos = |r: &CommandResult| -> Vec<u64> {
        r.results
            .iter()
            .map(|x| x.attr.map(|a| a.ino).unwrap_or(0))
            .collect()
    };
    assert_eq!(
        inos(&first),
        inos(&again),
        "the retry gets the first answer"
    );
    recover(&mem).await;
    assert_consistent(&mem, "after the batch and its retry");
}

/// Drops, in every group, the tombstones older than `sec`.
fn gc_all(mem: &Mem, sec: i64) {
    for g in 0..4 {
        mem.apply(
            g,
            Op::TxnGc(proto::meta::TxnGcOp {
                before: Some(Timespec { sec, nsec: 0 }),
            }),
            0,
            0,
        )
        .expect("gc");
    }
}

#[tokio::test]
async fn tombstones_of_resolved_transactions_are_dropped_oldest_first() {
    let mem = Mem::new(4);
    for i in 0..20 {
        let name = remote_name(ROOT_INO, &format!("t{i}-"), 4, u32::MAX);
        mk(&mem, ROOT_INO, &name, FileKind::Directory).await;
    }
    let count = |mem: &Mem, tag: u8| {
        mem.snapshot()
            .0
            .keys()
            .filter(|k| k.get(4) == Some(&tag))
            .count()
    };
    let (by_id, by_age) = (count(&mem, b'K'), count(&mem, b'k'));
    assert!(
        by_id >= 20,
        "each resolved transaction left tombstones ({by_id})"
    );
    assert_eq!(by_id, by_age, "every tombstone is indexed by age");
    // Nothing is old enough yet: a collection keeps everything.
    let now = mem.clock.load(Ordering::Relaxed) / 1000;
    gc_all(&mem, now as i64 - 3600);
    assert_eq!(count(&mem, b'K'), by_id);
    // Past the keep time, all of them go.
    gc_all(&mem, now as i64 + 3600);
    assert_eq!((count(&mem, b'K'), count(&mem, b'k')), (0, 0));
    assert_consistent(&mem, "after dropping tombstones");
    // A leader whose clock runs an hour behind resolves more: their
    // tombstones sort before the last one dropped, and are dropped too.
    mem.clock.fetch_sub(3_600_000, Ordering::Relaxed);
    for i in 0..5 {
        let name = remote_name(ROOT_INO, &format!("late{i}-"), 4, u32::MAX);
        mk(&mem, ROOT_INO, &name, FileKind::Directory).await;
    }
    assert!(
        count(&mem, b'K') >= 5,
        "the late transactions left tombstones"
    );
    gc_all(&mem, now as i64 + 3600);
    assert_eq!((count(&mem, b'K'), count(&mem, b'k')), (0, 0));
    assert_consistent(&mem, "after dropping the late tombstones");
}
