//! Runs operations that span metadata groups as two-phase transactions, and
//! the recovery loop that finishes what a crash interrupted.
//!
//! The node that receives a cross-shard request (the leader of the group
//! the client addressed, the coordinator) reads what it needs, prepares
//! every participant group once with the sub-ops that concern it, records
//! the decision in the coordinator group (together with the reply to the
//! client's request, so a retried request is answered, not re-run), and
//! resolves the participants. Each step is a Raft command, idempotent, so
//! it can be retried; a crash between steps leaves intents or a decision
//! that the recovery loop of the groups' leaders resolves.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime};

use proto::meta::{
    command::Op, query::Q, sub_op::S, AckRefsOp, Attr, Command, CommandResult, CreateOp,
    DeliverRefsOp, Error as WireError, ErrorCode, FileKind, GetAttrQuery, LinkOp, LookupQuery,
    MovedSub, NewInodeSub, QueryResult, RemoveOp, RenameLockSub, RenameOp, RequestResultQuery,
    SubOp, Timespec, TxnDecideOp, TxnForgetOp, TxnPrepareOp, TxnResolveOp, TxnState,
    TxnStatusQuery,
};
use proto::{dir_group, group_of_ino, validate_name, ROOT_INO};

use crate::namespace::txn::{add_entry, link, remove_entry};
use crate::namespace::{crossed, inherit};

/// A failure injection point between two steps of a transaction (only in
/// builds with the `failpoints` feature). `FAILPOINTS=NAME=return` stops the
/// operation there, as if its node had vanished; `NAME=return(crash)`
/// aborts the process there.
macro_rules! step {
    ($name:literal) => {
        fail::fail_point!($name, |arg: Option<String>| {
            if arg.as_deref() == Some("crash") {
                tracing::error!("failpoint {}: crashing", $name);
                std::process::abort();
            }
            Err(err(ErrorCode::Unavailable, concat!("failpoint ", $name)))
        })
    };
}

/// An intent or decision older than this is taken over by recovery.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(3);

/// Access to every group's leader: replicated commands and linearizable
/// queries. Errors carry the wire error of the group or the transport.
pub trait Groups: Send + Sync {
    fn propose(
        &self,
        group: u32,
        op: Op,
    ) -> impl Future<Output = Result<CommandResult, WireError>> + Send;
    fn query(
        &self,
        group: u32,
        q: Q,
    ) -> impl Future<Output = Result<QueryResult, WireError>> + Send;
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn is_dir(kind: i32) -> bool {
    kind == FileKind::Directory as i32
}

/// Sub-ops per participant group.
type Parts = BTreeMap<u32, Vec<SubOp>>;

fn add(parts: &mut Parts, group: u32, sub: SubOp) {
    parts.entry(group).or_default().push(sub);
}

/// One transaction in progress.
struct Tx<'a, G: Groups> {
    groups: &'a G,
    txid: u64,
    coord: u32,
    started_at: Timespec,
    /// Groups a prepare was sent to, whatever its outcome.
    touched: BTreeSet<u32>,
}

impl<'a, G: Groups> Tx<'a, G> {
    fn new(groups: &'a G, coord: u32) -> Self {
        Tx {
            groups,
            txid: rand::random::<u64>().max(1),
            coord,
            started_at: Timespec::now(),
            touched: BTreeSet::new(),
        }
    }

    /// Prepares every group of `parts` in parallel; returns each group's
    /// prepared attributes, or an error (after aborting): `Busy` if any
    /// group said so, else the first.
    async fn prepare(&mut self, parts: Parts) -> Result<BTreeMap<u32, Vec<Attr>>, WireError> {
        for g in parts.keys() {
            if !self.touched.insert(*g) {
                return Err(err(
                    ErrorCode::Internal,
                    format!("group {g} prepared twice in one transaction"),
                ));
            }
        }
        let (txid, coord, groups, started_at) =
            (self.txid, self.coord, self.groups, self.started_at);
        let replies = futures::future::join_all(parts.into_iter().map(|(g, subs)| async move {
            let r = groups
                .propose(
                    g,
                    Op::TxnPrepare(TxnPrepareOp {
                        txid,
                        coordinator: coord,
                        subs,
                        started_at: Some(started_at),
                    }),
                )
                .await;
            (g, r)
        }))
        .await;
        let mut out = BTreeMap::new();
        let mut first_err: Option<WireError> = None;
        for (g, r) in replies {
            match r {
                Ok(r) => {
                    out.insert(g, r.prepared);
                }
                // A group that says Busy saw the namespace change since this
                // run read it (or a lock): another group's refusal may be
                // that same change, not an answer (a rename's source name
                // replaced meanwhile leaves its inode gone: NotFound, though
                // the name never was). The client retries and reads again.
                Err(e) => {
                    if first_err
                        .as_ref()
                        .is_none_or(|f| f.code() != ErrorCode::Busy && e.code() == ErrorCode::Busy)
                    {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => {
                self.abort().await;
                Err(e)
            }
            None => Ok(out),
        }
    }

    async fn resolve_all(&self, commit: bool) -> bool {
        let txid = self.txid;
        let rs = futures::future::join_all(self.touched.iter().map(|g| {
            self.groups
                .propose(*g, Op::TxnResolve(TxnResolveOp { txid, commit }))
        }))
        .await;
        let mut ok = true;
        for r in rs {
            if let Err(e) = r {
                tracing::warn!(txid, error = %e, "resolve failed; recovery will finish it");
                ok = false;
            }
        }
        ok
    }

    /// Drops the prepared intents (no decision is recorded: a participant
    /// that missed this asks the coordinator, which then records abort).
    async fn abort(&self) {
        self.resolve_all(false).await;
    }

    /// Records commit and resolves. `result` is the client's reply.
    async fn commit(
        self,
        cmd: &Command,
        result: CommandResult,
    ) -> Result<CommandResult, WireError> {
        step!("txn_before_decide");
        let d = self
            .groups
            .propose(
                self.coord,
                Op::TxnDecide(TxnDecideOp {
                    txid: self.txid,
                    commit: true,
                    participants: self.touched.iter().copied().collect(),
                    result: Some(result.clone()),
                    client_id: cmd.client_id,
                    request_seq: cmd.request_seq,
                    started_at: Some(self.started_at),
                    acked_below: cmd.acked_below,
                }),
            )
            .await?;
        step!("txn_after_decide");
        let state = TxnState::try_from(d.txn_state).unwrap_or(TxnState::TxnUnknown);
        let commit = state == TxnState::TxnCommitted;
        let resolved = self.resolve_all(commit).await;
        step!("txn_after_resolve");
        if resolved && commit {
            let _ = self
                .groups
                .propose(self.coord, Op::TxnForget(TxnForgetOp { txid: self.txid }))
                .await;
        }
        match state {
            TxnState::TxnCommitted => Ok(result),
            TxnState::TxnDuplicate => match d.reply {
                Some(r) => Ok(*r),
                None => {
                    let mut r = d;
                    r.txn_state = 0;
                    Ok(r)
                }
            },
            _ => Err(err(
                ErrorCode::Busy,
                "the operation was aborted by recovery; retry",
            )),
        }
    }
}

/// Runs a client command that spans groups. `coord` is the group the
/// client addressed.
pub async fn run<G: Groups>(
    groups: &G,
    coord: u32,
    group_count: u32,
    cmd: &Command,
) -> CommandResult {
    let res = match &cmd.op {
        Some(Op::Create(c)) => mkdir(groups, coord, group_count, cmd, c).await,
        Some(Op::Remove(r)) => remove(groups, coord, cmd, r).await,
        Some(Op::Link(l)) => link_op(groups, coord, cmd, l).await,
        Some(Op::Rename(r)) => rename(groups, coord, cmd, r).await,
        _ => Err(err(ErrorCode::Invalid, "not a cross-shard operation")),
    };
    match res {
        Ok(r) => r,
        Err(e) => {
            // Another run of this same request (a client retry racing this
            // one) may have completed it: its recorded reply is the answer,
            // not the error this run met on the changed namespace.
            if cmd.client_id != 0 && !matches!(e.code(), ErrorCode::Busy | ErrorCode::Unavailable) {
                let q = Q::RequestResult(RequestResultQuery {
                    client_id: cmd.client_id,
                    request_seq: cmd.request_seq,
                });
                match groups.query(coord, q).await {
                    Ok(QueryResult {
                        request_result: Some(r),
                        ..
                    }) if r.error.is_none() => return r,
                    Ok(_) => {}
                    // Whether another run applied it is unknown: this
                    // run's error may be the namespace that run left, so
                    // the client must ask again, not take it.
                    Err(q) => {
                        return CommandResult {
                            error: Some(err(
                                ErrorCode::Unavailable,
                                format!("{e}; and the request's recorded reply is unreadable: {q}"),
                            )),
                            ..Default::default()
                        }
                    }
                }
            }
            CommandResult {
                error: Some(e),
                ..Default::default()
            }
        }
    }
}

async fn get_attr<G: Groups>(groups: &G, ino: u64) -> Result<(Attr, u64), WireError> {
    let r = groups
        .query(group_of_ino(ino), Q::GetAttr(GetAttrQuery { ino }))
        .await?;
    let a = r
        .attr
        .ok_or_else(|| err(ErrorCode::Internal, "reply without attributes"))?;
    Ok((a, r.parent))
}

/// The entry `name` in `parent`: (inode, kind), or None.
async fn lookup<G: Groups>(
    groups: &G,
    parent: u64,
    name: &[u8],
) -> Result<Option<(u64, i32)>, WireError> {
    match groups
        .query(
            group_of_ino(parent),
            Q::Lookup(LookupQuery {
                parent,
                name: name.to_vec().into(),
            }),
        )
        .await
    {
        Ok(r) => {
            let e = r
                .entry
                .ok_or_else(|| err(ErrorCode::Internal, "lookup reply without an entry"))?;
            Ok(Some((e.ino, e.kind)))
        }
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The new inode of directory `c` (its number is allocated at prepare).
fn new_dir(c: &CreateOp, perm: u32, gid: u32) -> SubOp {
    SubOp {
        s: Some(S::NewInode(NewInodeSub {
            kind: FileKind::Directory as i32,
            perm,
            uid: c.uid,
            gid,
            rdev: 0,
            symlink_target: Default::default(),
            parent: c.parent,
            ino: 0,
        })),
    }
}

fn name_error(name: &[u8]) -> Result<(), WireError> {
    validate_name(name).map_err(WireError::from)
}

async fn mkdir<G: Groups>(
    groups: &G,
    coord: u32,
    group_count: u32,
    cmd: &Command,
    c: &CreateOp,
) -> Result<CommandResult, WireError> {
    name_error(&c.name)?;
    if !is_dir(c.kind) {
        return Err(err(
            ErrorCode::Invalid,
            "only directories are created in another group",
        ));
    }
    let child = dir_group(c.parent, &c.name, group_count);
    if child == coord || group_of_ino(c.parent) != coord {
        return Err(err(ErrorCode::Internal, "mkdir routed to the wrong group"));
    }
    let (pattr, _) = get_attr(groups, c.parent).await?;
    if !is_dir(pattr.kind) {
        return Err(err(ErrorCode::NotDir, format!("inode {}", c.parent)));
    }
    if lookup(groups, c.parent, &c.name).await?.is_some() {
        return Err(err(
            ErrorCode::Exists,
            format!("{} already exists", String::from_utf8_lossy(&c.name)),
        ));
    }
    let (perm, gid) = inherit(&pattr, FileKind::Directory, c.perm, c.gid);
    let mut tx = Tx::new(groups, coord);
    let mut parts = Parts::new();
    add(&mut parts, child, new_dir(c, perm, gid));
    let prepared = tx.prepare(parts).await?;
    let attr = prepared
        .get(&child)
        .and_then(|v| v.first().copied())
        .filter(|a| a.ino != 0)
        .ok_or_else(|| err(ErrorCode::Internal, "prepare did not allocate an inode"))?;
    step!("txn_mkdir_between_prepares");
    let mut parts = Parts::new();
    add(
        &mut parts,
        coord,
        add_entry(c.parent, &c.name, attr.ino, c.kind, None, false),
    );
    tx.prepare(parts).await?;
    tx.commit(
        cmd,
        CommandResult {
            attr: Some(attr),
            ..Default::default()
        },
    )
    .await
}

/// Finishes a create batch whose directories belong in other groups: all of
/// them in one transaction (each target group prepares its new inodes
/// together, the parents' group all the entries), instead of one
/// transaction per directory. `batch` is the reply of the single-group
/// part; the returned reply has every position filled in and is recorded
/// as the reply to the client's request.
pub async fn mkdir_batch<G: Groups>(
    groups: &G,
    coord: u32,
    group_count: u32,
    cmd: &Command,
    mut batch: CommandResult,
) -> CommandResult {
    let Some(Op::CreateBatch(op)) = &cmd.op else {
        return batch;
    };
    let items: Vec<(usize, &CreateOp)> = batch
        .results
        .iter()
        .enumerate()
        .filter(|(_, r)| crossed(r))
        .filter_map(|(i, _)| op.creates.get(i).map(|c| (i, c)))
        .collect();
    if items.is_empty() {
        return batch;
    }
    match mkdirs_in_one_transaction(groups, coord, group_count, cmd, &items, &batch).await {
        Ok(done) => return done,
        Err(e) => {
            tracing::debug!(error = %e, "batched mkdir fell back to one transaction each");
        }
    }
    // One transaction per directory, then the whole reply recorded.
    for (i, c) in &items {
        let single = Command {
            client_id: 0,
            request_seq: 0,
            op: Some(Op::Create((*c).clone())),
            ..cmd.clone()
        };
        batch.results[*i] = match mkdir(groups, coord, group_count, &single, c).await {
            Ok(r) => r,
            Err(e) => CommandResult {
                error: Some(e),
                ..Default::default()
            },
        };
    }
    let tx = Tx::new(groups, coord);
    match tx.commit(cmd, batch.clone()).await {
        Ok(r) => r,
        Err(_) => batch,
    }
}

async fn mkdirs_in_one_transaction<G: Groups>(
    groups: &G,
    coord: u32,
    group_count: u32,
    cmd: &Command,
    items: &[(usize, &CreateOp)],
    batch: &CommandResult,
) -> Result<CommandResult, WireError> {
    let mut parents: BTreeMap<u64, Attr> = BTreeMap::new();
    for (_, c) in items {
        name_error(&c.name)?;
        if !is_dir(c.kind) || group_of_ino(c.parent) != coord {
            return Err(err(
                ErrorCode::Internal,
                "batched mkdir routed to the wrong group",
            ));
        }
        if let std::collections::btree_map::Entry::Vacant(v) = parents.entry(c.parent) {
            v.insert(get_attr(groups, c.parent).await?.0);
        }
    }
    // New inodes, grouped by the group each directory lands in.
    let mut parts = Parts::new();
    let mut slots: Vec<(u32, usize)> = Vec::with_capacity(items.len());
    for (_, c) in items {
        let child = dir_group(c.parent, &c.name, group_count);
        let (perm, gid) = inherit(&parents[&c.parent], FileKind::Directory, c.perm, c.gid);
        let subs = parts.entry(child).or_default();
        slots.push((child, subs.len()));
        subs.push(new_dir(c, perm, gid));
    }
    let mut tx = Tx::new(groups, coord);
    let prepared = tx.prepare(parts).await?;
    let mut attrs = Vec::with_capacity(items.len());
    let mut entries = Parts::new();
    for ((_, c), (g, k)) in items.iter().zip(&slots) {
        let a = prepared
            .get(g)
            .and_then(|v| v.get(*k).copied())
            .filter(|a| a.ino != 0)
            .ok_or_else(|| err(ErrorCode::Internal, "prepare did not allocate an inode"))?;
        add(
            &mut entries,
            coord,
            add_entry(c.parent, &c.name, a.ino, c.kind, None, false),
        );
        attrs.push(a);
    }
    tx.prepare(entries).await?;
    let mut done = batch.clone();
    for ((i, _), a) in items.iter().zip(attrs) {
        done.results[*i] = CommandResult {
            attr: Some(a),
            ..Default::default()
        };
    }
    tx.commit(cmd, done).await
}

async fn remove<G: Groups>(
    groups: &G,
    coord: u32,
    cmd: &Command,
    r: &RemoveOp,
) -> Result<CommandResult, WireError> {
    name_error(&r.name)?;
    let name = String::from_utf8_lossy(&r.name).into_owned();
    let (ino, kind) = lookup(groups, r.parent, &r.name)
        .await?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("{name} not found")))?;
    if r.dir && !is_dir(kind) {
        return Err(err(ErrorCode::NotDir, format!("{name} is not a directory")));
    }
    if !r.dir && is_dir(kind) {
        return Err(err(ErrorCode::IsDir, format!("{name} is a directory")));
    }
    let mut parts = Parts::new();
    add(
        &mut parts,
        coord,
        remove_entry(r.parent, &r.name, ino, kind),
    );
    let ig = group_of_ino(ino);
    add(&mut parts, ig, link(ino, -1, kind));
    let mut tx = Tx::new(groups, coord);
    let prepared = tx.prepare(parts).await?;
    let removed = prepared.get(&ig).and_then(|v| v.last().copied());
    tx.commit(
        cmd,
        CommandResult {
            removed,
            ..Default::default()
        },
    )
    .await
}

async fn link_op<G: Groups>(
    groups: &G,
    coord: u32,
    cmd: &Command,
    l: &LinkOp,
) -> Result<CommandResult, WireError> {
    name_error(&l.new_name)?;
    let (a, _) = get_attr(groups, l.ino).await?;
    if is_dir(a.kind) {
        return Err(err(
            ErrorCode::Permission,
            "hard links to directories are not allowed",
        ));
    }
    let mut parts = Parts::new();
    add(
        &mut parts,
        coord,
        add_entry(l.new_parent, &l.new_name, l.ino, a.kind, None, false),
    );
    let ig = group_of_ino(l.ino);
    add(&mut parts, ig, link(l.ino, 1, a.kind));
    let mut tx = Tx::new(groups, coord);
    let prepared = tx.prepare(parts).await?;
    let attr = prepared.get(&ig).and_then(|v| v.last().copied());
    tx.commit(
        cmd,
        CommandResult {
            attr,
            ..Default::default()
        },
    )
    .await
}

/// True when `ancestor` is `dir` or one of its ancestors.
async fn within<G: Groups>(groups: &G, mut dir: u64, ancestor: u64) -> Result<bool, WireError> {
    for _ in 0..100_000 {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_INO {
            return Ok(false);
        }
        dir = get_attr(groups, dir).await?.1;
    }
    Err(err(
        ErrorCode::Corrupt,
        "directory parent chain does not reach the root",
    ))
}

fn moved(ino: u64, new_parent: u64) -> SubOp {
    SubOp {
        s: Some(S::Moved(MovedSub { ino, new_parent })),
    }
}

async fn rename<G: Groups>(
    groups: &G,
    coord: u32,
    cmd: &Command,
    op: &RenameOp,
) -> Result<CommandResult, WireError> {
    name_error(&op.name)?;
    name_error(&op.new_name)?;
    if op.noreplace && op.exchange {
        return Err(err(
            ErrorCode::Invalid,
            "RENAME_NOREPLACE and RENAME_EXCHANGE together",
        ));
    }
    let (sname, dname) = (
        String::from_utf8_lossy(&op.name).into_owned(),
        String::from_utf8_lossy(&op.new_name).into_owned(),
    );
    let (dattr, _) = get_attr(groups, op.new_parent).await?;
    if !is_dir(dattr.kind) {
        return Err(err(ErrorCode::NotDir, format!("inode {}", op.new_parent)));
    }
    let (src, skind) = lookup(groups, op.parent, &op.name)
        .await?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("{sname} not found")))?;
    let dst = lookup(groups, op.new_parent, &op.new_name).await?;
    if op.noreplace && dst.is_some() {
        return Err(err(ErrorCode::Exists, format!("{dname} already exists")));
    }
    if op.exchange && dst.is_none() {
        return Err(err(ErrorCode::NotFound, format!("{dname} not found")));
    }
    if dst.is_some_and(|(d, _)| d == src) {
        // Two links to one inode: POSIX says do nothing.
        return Ok(CommandResult::default());
    }
    let dst_dir = dst.is_some_and(|(_, k)| is_dir(k));
    if !op.exchange {
        if is_dir(skind) && dst.is_some() && !dst_dir {
            return Err(err(
                ErrorCode::NotDir,
                format!("{dname} is not a directory"),
            ));
        }
        if !is_dir(skind) && dst_dir {
            return Err(err(ErrorCode::IsDir, format!("{dname} is a directory")));
        }
    }
    let moving_dir = op.parent != op.new_parent && (is_dir(skind) || (op.exchange && dst_dir));
    let mut parts = Parts::new();
    if moving_dir {
        add(
            &mut parts,
            0,
            SubOp {
                s: Some(S::RenameLock(RenameLockSub {})),
            },
        );
    }
    let (pg, ng) = (group_of_ino(op.parent), group_of_ino(op.new_parent));
    if op.exchange {
        let (d, dkind) = dst.unwrap_or_default();
        add(
            &mut parts,
            pg,
            add_entry(op.parent, &op.name, d, dkind, Some((src, skind)), true),
        );
        add(
            &mut parts,
            ng,
            add_entry(
                op.new_parent,
                &op.new_name,
                src,
                skind,
                Some((d, dkind)),
                true,
            ),
        );
        add(&mut parts, group_of_ino(src), moved(src, op.new_parent));
        add(&mut parts, group_of_ino(d), moved(d, op.parent));
    } else {
        add(
            &mut parts,
            pg,
            remove_entry(op.parent, &op.name, src, skind),
        );
        add(
            &mut parts,
            ng,
            add_entry(op.new_parent, &op.new_name, src, skind, dst, true),
        );
        add(&mut parts, group_of_ino(src), moved(src, op.new_parent));
        if let Some((d, dkind)) = dst {
            add(&mut parts, group_of_ino(d), link(d, -1, dkind));
        }
    }
    let mut tx = Tx::new(groups, coord);
    if let Err(e) = tx.prepare(parts).await {
        // Moving a directory beneath itself is EINVAL before anything else
        // (as Linux checks it first), whatever else refused the move.
        if moving_dir
            && is_dir(skind)
            && e.code() != ErrorCode::Busy
            && within(groups, op.new_parent, src).await.unwrap_or(false)
        {
            return Err(err(
                ErrorCode::Invalid,
                "cannot move a directory beneath itself",
            ));
        }
        return Err(e);
    }
    if moving_dir {
        // Holding the rename lock, no other directory moves: the chains of
        // parents read now stay true until this transaction resolves.
        let check = async {
            if is_dir(skind) && within(groups, op.new_parent, src).await? {
                return Err(err(
                    ErrorCode::Invalid,
                    "cannot move a directory beneath itself",
                ));
            }
            if let Some((d, dkind)) = dst {
                if is_dir(dkind) && within(groups, op.parent, d).await? {
                    return Err(err(
                        if op.exchange {
                            ErrorCode::Invalid
                        } else {
                            ErrorCode::NotEmpty
                        },
                        format!("{dname} is an ancestor of {sname}"),
                    ));
                }
            }
            Ok(())
        };
        if let Err(e) = check.await {
            tx.abort().await;
            return Err(e);
        }
    }
    tx.commit(cmd, CommandResult::default()).await
}

// ---- recovery ---------------------------------------------------------------

fn age(t: &Timespec) -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::from(*t))
        .unwrap_or_default()
}

/// Resolves an intent of `group` whose runner is gone: asks the coordinator
/// for the outcome, recording abort there when none was decided.
pub async fn resolve_orphan<G: Groups>(
    groups: &G,
    group: u32,
    txid: u64,
    coordinator: u32,
) -> Result<bool, WireError> {
    let st = groups
        .query(coordinator, Q::TxnStatus(TxnStatusQuery { txid }))
        .await?;
    let state = match TxnState::try_from(st.txn_state).unwrap_or(TxnState::TxnUnknown) {
        TxnState::TxnUnknown => {
            let d = groups
                .propose(
                    coordinator,
                    Op::TxnDecide(TxnDecideOp {
                        txid,
                        commit: false,
                        participants: vec![group],
                        ..Default::default()
                    }),
                )
                .await?;
            TxnState::try_from(d.txn_state).unwrap_or(TxnState::TxnAborted)
        }
        s => s,
    };
    let commit = state == TxnState::TxnCommitted;
    groups
        .propose(group, Op::TxnResolve(TxnResolveOp { txid, commit }))
        .await?;
    tracing::info!(
        group,
        txid,
        commit,
        "resolved an interrupted cross-shard intent"
    );
    Ok(commit)
}

/// Sends a recorded decision to every participant, then forgets it.
/// `forget` drops the decision afterwards: right away for a commit (every
/// participant has resolved it and keeps a tombstone), only after
/// `TXN_KEEP_SECS` for an abort (a slow runner must keep finding it).
pub async fn finish_decision<G: Groups>(
    groups: &G,
    group: u32,
    txid: u64,
    commit: bool,
    participants: &[u32],
    forget: bool,
) -> Result<(), WireError> {
    for p in participants {
        groups
            .propose(*p, Op::TxnResolve(TxnResolveOp { txid, commit }))
            .await?;
    }
    if forget {
        groups
            .propose(group, Op::TxnForget(TxnForgetOp { txid }))
            .await?;
    }
    Ok(())
}

/// Delivers one group's queued reference batches to their targets and drops
/// what was applied. Returns the number of batches delivered.
pub async fn deliver_outbox<G: Groups>(
    groups: &G,
    group: u32,
    outbox: Vec<crate::namespace::OutboxInfo>,
) -> Result<usize, WireError> {
    let mut n = 0;
    for mut o in outbox {
        // Bound one delivery's size: whole batches up to about 20,000
        // reference changes (always at least one batch).
        let mut deltas = 0;
        let keep = o
            .batches
            .iter()
            .take_while(|b| {
                let first = deltas == 0;
                deltas += b.deltas.len();
                first || deltas <= 20_000
            })
            .count();
        o.batches.truncate(keep);
        let count = o.batches.len();
        let r = groups
            .propose(
                o.target,
                Op::DeliverRefs(DeliverRefsOp {
                    source: group,
                    batches: o.batches,
                }),
            )
            .await?;
        groups
            .propose(
                group,
                Op::AckRefs(AckRefsOp {
                    target: o.target,
                    upto: r.watermark,
                }),
            )
            .await?;
        n += count;
    }
    Ok(n)
}

/// Whether an intent or decision stamped `t` is old enough for recovery.
pub fn orphaned(t: &Timespec) -> bool {
    age(t) >= ORPHAN_AFTER
}
