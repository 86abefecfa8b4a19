//! Background work of the groups this node leads: delivering queued chunk
//! reference batches, finishing cross-shard transactions whose runner
//! vanished, and spreading group leadership evenly over the nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::meta::{command::Op, Timespec, TxnGcOp};
use raft::KvView;

use crate::app::ViewKv;
use crate::coordinator::{self, orphaned, Groups};
use crate::namespace::txn::{secs_between, TXN_KEEP_SECS};
use crate::namespace::{DecisionInfo, IntentInfo, Namespace, OutboxInfo};
use crate::router::Router;

/// How often queued reference batches are delivered.
const DELIVER_EVERY: Duration = Duration::from_millis(100);
/// How often interrupted transactions are looked for.
const RECOVER_EVERY: Duration = Duration::from_secs(1);
/// How often each group's Raft state is published as metrics.
const OBSERVE_EVERY: Duration = Duration::from_millis(500);
/// Leadership balance is checked every this many recovery ticks.
const BALANCE_TICKS: u32 = 3;
/// A preferred node must have answered this recently to receive leadership.
const ALIVE_WITHIN: Duration = Duration::from_secs(1);
/// Time before leadership of a group is handed to its preferred node again
/// after an attempt.
const RETRY_TRANSFER_AFTER: Duration = Duration::from_secs(10);
/// Records read per scan.
const SCAN_LIMIT: usize = 10_000;

/// Intents, decisions, queued batches, and whether old tombstones exist.
type Pending = (Vec<IntentInfo>, Vec<DecisionInfo>, Vec<OutboxInfo>, bool);

fn pending(router: &Router, group: u32, recover: bool) -> Option<Pending> {
    let view = KvView::new(router.registry().store());
    let kv = ViewKv(&view);
    let ns = Namespace::new(group);
    let read = || -> Result<Pending, crate::namespace::NsError> {
        if !recover {
            let outbox = ns.outbox(&kv, crate::namespace::txn::MAX_DELIVERY_BATCHES)?;
            return Ok((Vec::new(), Vec::new(), outbox, false));
        }
        let before = keep_horizon();
        Ok((
            ns.intents(&kv, SCAN_LIMIT)?,
            ns.decisions(&kv, SCAN_LIMIT)?,
            Vec::new(),
            ns.has_old_tombstones(&kv, &before)?,
        ))
    };
    match read() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(group, error = %e, "reading pending work");
            None
        }
    }
}

/// Tombstones and abort decisions older than this are dropped.
fn keep_horizon() -> Timespec {
    let mut t = Timespec::now();
    t.sec -= TXN_KEEP_SECS;
    t
}

/// One pass over the groups this node leads: deliver queued reference
/// batches (`recover` false), or finish interrupted transactions and drop
/// old tombstones (`recover` true).
async fn pass(router: &Arc<Router>, recover: bool) {
    for g in router.registry().groups() {
        if !g.is_leader() {
            continue;
        }
        let (r, id) = (router.clone(), g.id);
        let Ok(Some((intents, decisions, outbox, old_tombstones))) =
            tokio::task::spawn_blocking(move || pending(&r, id, recover)).await
        else {
            continue;
        };
        if !outbox.is_empty() {
            if let Err(e) = coordinator::deliver_outbox(&**router, id, outbox).await {
                tracing::warn!(group = id, error = %e, "delivering chunk references");
            }
        }
        for i in intents.iter().filter(|i| orphaned(&i.prepared_at)) {
            if let Err(e) = coordinator::resolve_orphan(&**router, id, i.txid, i.coordinator).await
            {
                tracing::warn!(group = id, txid = i.txid, error = %e, "resolving an intent");
            }
        }
        let horizon = keep_horizon();
        for d in decisions.iter().filter(|d| orphaned(&d.decided_at)) {
            let forget = d.commit || secs_between(&d.decided_at, &horizon) > 0;
            if let Err(e) = coordinator::finish_decision(
                &**router,
                id,
                d.txid,
                d.commit,
                &d.participants,
                forget,
            )
            .await
            {
                tracing::warn!(group = id, txid = d.txid, error = %e, "finishing a decision");
            }
        }
        if old_tombstones {
            let op = Op::TxnGc(TxnGcOp {
                before: Some(horizon),
            });
            if let Err(e) = router.propose(id, op).await {
                tracing::warn!(group = id, error = %e, "dropping old tombstones");
            }
        }
    }
}

/// Moves leadership of groups this node leads to their preferred node
/// (group `g` prefers the `g mod n`-th voter) when that node is up to date,
/// so leaders spread evenly and return to a node that comes back.
async fn balance(router: &Router, tried: &mut HashMap<u32, std::time::Instant>) {
    crate::metrics::raft_balance_pass();
    let me = router.registry().node_id();
    for g in router.registry().groups() {
        if !g.is_leader() {
            continue;
        }
        let st = g.status();
        let mut voters = st.voters.clone();
        voters.sort_unstable();
        if voters.is_empty() {
            continue;
        }
        let preferred = voters[g.id as usize % voters.len()];
        if preferred == me || router.holds_leadership(g.id) {
            continue;
        }
        // Up to date and answering now: a node that died keeps the match
        // index it had, and handing leadership to it would stall the group
        // (a leader in transfer turns every request away) until the
        // transfer timed out, again every few seconds.
        let caught_up = g
            .replication_matched(preferred)
            .is_some_and(|m| m + 16 >= st.last_log_index);
        // A transfer that did not take leaves this leader refusing writes
        // until an election; do not repeat it every few seconds.
        let recently = tried
            .get(&g.id)
            .is_some_and(|t| t.elapsed() < RETRY_TRANSFER_AFTER);
        if caught_up && !recently && g.heard_from(preferred, ALIVE_WITHIN) {
            tried.insert(g.id, std::time::Instant::now());
            tracing::info!(
                group = g.id,
                to = preferred,
                "moving leadership to its preferred node"
            );
            if let Err(e) = g.transfer_leader(preferred).await {
                tracing::warn!(group = g.id, error = %e, "leader transfer");
            }
        }
    }
}

/// Runs until the process stops: delivery and recovery in separate loops,
/// so a slow recovery never holds up chunk reference delivery.
pub async fn run(router: Arc<Router>) {
    let deliver = {
        let router = router.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(DELIVER_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                pass(&router, false).await;
            }
        })
    };
    let mut tick: u32 = 0;
    let mut tried = HashMap::new();
    let mut interval = tokio::time::interval(RECOVER_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let _stop_delivery = AbortOnDrop(deliver);
    // Sampled on its own, so a slow recovery pass does not stall it.
    let _stop_observing = AbortOnDrop({
        let router = router.clone();
        tokio::spawn(async move {
            let mut leaders: HashMap<u32, Option<u64>> = HashMap::new();
            let mut interval = tokio::time::interval(OBSERVE_EVERY);
            loop {
                interval.tick().await;
                observe(&router, &mut leaders);
            }
        })
    });
    loop {
        interval.tick().await;
        tick = tick.wrapping_add(1);
        pass(&router, true).await;
        if tick.is_multiple_of(BALANCE_TICKS) {
            balance(&router, &mut tried).await;
        }
    }
}

/// Publishes each group's Raft state as metrics, counting the leader
/// changes seen since the last look.
fn observe(router: &Router, leaders: &mut HashMap<u32, Option<u64>>) {
    for g in router.registry().groups() {
        let st = g.status();
        crate::metrics::raft_group(
            st.group,
            st.term,
            st.last_log_index,
            st.last_applied,
            g.is_leader(),
        );
        if let Some(before) = leaders.insert(st.group, st.leader) {
            if before != st.leader && st.leader.is_some() {
                crate::metrics::raft_leader_change(st.group);
            }
        }
    }
}

/// Stops a task when its owner is dropped (the node shuts down).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
