//! One run: a three-node cluster in network namespaces, clients working
//! while a scenario's faults come and go, then healing, a liveness phase,
//! final reads, the offline invariant check of every node, and the
//! checkers over the recorded history.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use musicfs_client::{Cluster as Client, ClusterConfig, Fs};
use proto::group_of_ino;
use serde::Serialize;

use crate::cluster::{unmount, wait_for, Cluster, NODE_PORT};
use crate::lin::{self, Event, Verdict};
use crate::model::{DataFile, Input, Namespace, NsState, Output, Partition};
use crate::net::Peer;
use crate::proxy::DelayProxy;
use crate::scenario::{self, Fault, Scenario, Step, Who};
use crate::workload::{self, History, Record, Shape, Tree, Via};

pub struct Options {
    pub scenario: &'static Scenario,
    pub seed: u64,
    /// Seconds of faults.
    pub secs: u64,
    /// In-process clients.
    pub clients: usize,
    /// Also run a client through a FUSE mount.
    pub fuse: bool,
    pub out: PathBuf,
    pub bin: PathBuf,
}

const NODES: usize = 3;
const GROUPS: u32 = 4;
/// How long a workload client retries an operation before giving up.
const CLIENT_DEADLINE: Duration = Duration::from_secs(8);
/// After healing, the cluster must serve every operation within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);
/// Clients keep working this long after the cluster has recovered.
const AFTER_RECOVERY: Duration = Duration::from_secs(4);
const CHECK_BUDGET: Duration = Duration::from_secs(120);

#[derive(Serialize)]
pub struct StepLog {
    pub at_ms: u64,
    #[serde(flatten)]
    pub step: Step,
    /// Node indices the step acted on.
    pub nodes: Vec<usize>,
    /// How long applying the step took.
    pub took_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Default)]
pub struct Counts {
    pub total: usize,
    pub ok: usize,
    /// Definite errors the model allows (ENOENT, EEXIST, ...).
    pub definite_errors: usize,
    /// Mutations with no definite outcome (timed out, node failed).
    pub indeterminate: usize,
    /// Reads that failed (not checked: they change nothing).
    pub failed_reads: usize,
    pub by_client: BTreeMap<String, usize>,
}

#[derive(Serialize)]
pub struct CheckResult {
    pub partition: String,
    pub operations: usize,
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub ok: bool,
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub secs: u64,
    pub replay: String,
    pub broken_build: Option<String>,
    pub schedule: Vec<StepLog>,
    pub operations: Counts,
    pub linearizability: Vec<CheckResult>,
    /// Reads that returned bytes no write produced.
    pub corrupt_reads: Vec<String>,
    /// Milliseconds from healing until every group served reads and writes.
    pub recovery_ms: Option<u64>,
    /// Milliseconds from healing until no chunk was short of copies.
    pub repair_ms: Option<u64>,
    /// Operations issued after recovery that did not succeed.
    pub failed_after_recovery: usize,
    pub invariants: Vec<(u64, bool)>,
    /// Nodes that exited without being told to.
    pub crashes: Vec<String>,
    pub errors: Vec<String>,
    /// Whether the checkers found a violation.
    pub violation: bool,
    /// Whether the run proved what it set out to: no violation on a sound
    /// build, a violation found on a broken one.
    pub passed: bool,
    /// Wall time of the whole run, set-up and checks included.
    pub elapsed_ms: u64,
}

fn client_config(
    seeds: Vec<String>,
    local: Option<std::net::IpAddr>,
    deadline: Duration,
) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(seeds);
    cfg.deadline = deadline;
    cfg.rpc_timeout = Duration::from_secs(2);
    cfg.local_address = local;
    cfg
}

async fn connect(cfg: ClusterConfig) -> Result<Arc<Fs>> {
    let c = Client::connect(cfg)
        .await
        .context("connect to the cluster")?;
    // Histories say which node answered each call.
    c.trace_answers();
    Ok(Fs::new(c, 8 << 20))
}

struct Faults {
    last: Vec<usize>,
    proxies: Vec<DelayProxy>,
    crashes: Vec<String>,
}

impl Faults {
    async fn resolve(&self, c: &Cluster, who: Who, data_group: u32) -> Result<usize> {
        let leader = || async {
            wait_for(
                "a leader of the data group",
                Duration::from_secs(20),
                || async { c.leader_of(data_group).await },
            )
            .await
        };
        Ok(match who {
            Who::Node(k) => k as usize % c.nodes.len(),
            Who::Last => *self.last.first().context("no earlier step chose a node")?,
            Who::Leader => leader().await?,
            Who::Follower(k) => {
                let l = leader().await?;
                let others: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != l).collect();
                others[k as usize % others.len()]
            }
        })
    }

    /// Applies one step; returns the nodes it acted on.
    async fn apply(
        &mut self,
        c: &mut Cluster,
        f: &Fault,
        data_group: u32,
        clients: usize,
        fuse_host: Option<usize>,
    ) -> Result<Vec<usize>> {
        // Every client: the in-process ones and the FUSE client's host.
        let all_clients: Vec<Peer> = (0..clients)
            .map(Peer::Client)
            .chain(fuse_host.map(Peer::Host))
            .collect();
        let nodes = match f {
            Fault::Isolate { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                for o in (0..NODES).filter(|&o| o != n) {
                    c.net.cut(Peer::Host(n), Peer::Host(o))?;
                }
                for &p in &all_clients {
                    c.net.cut(Peer::Host(n), p)?;
                }
                vec![n]
            }
            Fault::SplitNode { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                for o in (0..NODES).filter(|&o| o != n) {
                    c.net.cut(Peer::Host(n), Peer::Host(o))?;
                }
                vec![n]
            }
            Fault::ClientWithMinority { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                for o in (0..NODES).filter(|&o| o != n) {
                    c.net.cut(Peer::Host(n), Peer::Host(o))?;
                    c.net.cut(Peer::Client(0), Peer::Host(o))?;
                }
                vec![n]
            }
            Fault::Bridge { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                let others: Vec<usize> = (0..NODES).filter(|&o| o != n).collect();
                for (k, &a) in others.iter().enumerate() {
                    for &b in &others[k + 1..] {
                        c.net.cut(Peer::Host(a), Peer::Host(b))?;
                    }
                }
                vec![n]
            }
            Fault::OneWay { from, to } => {
                let a = self.resolve(c, *from, data_group).await?;
                let b = self.resolve(c, *to, data_group).await?;
                if a != b {
                    c.net.drop_one_way(Peer::Host(a), Peer::Host(b))?;
                }
                vec![a, b]
            }
            Fault::Kill { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.kill(n);
                vec![n]
            }
            Fault::Start { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                if !c.running(n) {
                    c.spawn(n)?;
                    c.wait_up(n, Duration::from_secs(30)).await?;
                }
                vec![n]
            }
            Fault::Pause { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.pause(n);
                vec![n]
            }
            Fault::Resume { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.resume(n);
                vec![n]
            }
            Fault::Restart { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.stop(n, Duration::from_secs(10)).await;
                c.spawn(n)?;
                c.wait_up(n, Duration::from_secs(30)).await?;
                vec![n]
            }
            Fault::Loss { probability } => {
                for h in 0..NODES {
                    c.net.loss(h, *probability);
                }
                vec![]
            }
            Fault::FillDisk { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.fill_disk(n)?;
                vec![n]
            }
            Fault::FreeDisk { who } => {
                let n = self.resolve(c, *who, data_group).await?;
                c.free_disk(n);
                vec![n]
            }
            Fault::Slow { who, ms } => {
                let n = self.resolve(c, *who, data_group).await?;
                let delay = Duration::from_millis(*ms);
                for o in (0..NODES).filter(|&o| o != n) {
                    for (from, to) in [(n, o), (o, n)] {
                        let up = SocketAddr::new(c.net.host_ip(to).into(), NODE_PORT);
                        let listen = SocketAddr::new(c.net.gateway().into(), 0);
                        let p = DelayProxy::start(listen, up, delay).await?;
                        c.net
                            .redirect(from, c.net.host_ip(to), NODE_PORT, p.addr.port());
                        self.proxies.push(p);
                    }
                }
                vec![n]
            }
            Fault::Heal => {
                c.net.heal();
                self.proxies.clear();
                vec![]
            }
        };
        c.net.apply()?;
        if !nodes.is_empty() {
            self.last = nodes.clone();
        }
        Ok(nodes)
    }

    /// Notes nodes that exited by themselves and starts them again.
    async fn reap(&mut self, c: &mut Cluster, at: Duration) {
        for i in 0..c.nodes.len() {
            if let Some(st) = c.exited(i) {
                self.crashes.push(format!(
                    "node {} exited by itself ({st}) at {:.1}s",
                    c.nodes[i].id,
                    at.as_secs_f64()
                ));
            }
        }
    }
}

/// Undoes every fault: network, paused and stopped nodes, full disks.
async fn heal_all(c: &mut Cluster, faults: &mut Faults) -> Result<()> {
    c.net.heal();
    c.net.apply()?;
    faults.proxies.clear();
    for i in 0..c.nodes.len() {
        c.free_disk(i);
        if c.nodes[i].paused {
            c.resume(i);
        }
        if !c.running(i) {
            c.spawn(i)?;
        }
    }
    for i in 0..c.nodes.len() {
        c.wait_up(i, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// One probe of every group: a write and reads through a fresh client.
async fn probe(fs: &Fs, tree: &Tree) -> Result<()> {
    fs.statfs().await?;
    for &d in &tree.dirs {
        fs.readdir(d, b"", 100, false).await?;
    }
    let name = b"probe";
    fs.write_at(tree.data_dir, name, b"probe", 0o644).await?;
    fs.remove(tree.data_dir, name, false).await?;
    Ok(())
}

async fn status(addr: &str) -> Option<proto::admin::StatusResponse> {
    tokio::time::timeout(
        Duration::from_secs(2),
        musicfs_client::admin::node_status(addr),
    )
    .await
    .ok()?
    .ok()
}

/// Chunks short of copies, summed over the groups' leaders.
async fn under_replicated(addrs: &[String]) -> Option<u64> {
    let mut total = 0;
    for a in addrs {
        total += status(a)
            .await?
            .repair
            .map(|r| r.under_replicated)
            .unwrap_or(0);
    }
    Some(total)
}

/// Whether the cluster is at rest: every group led, no cross-shard
/// intent or queued reference batch left, and every replica applied as
/// far as its leader. The offline checker holds a node's copy to the
/// invariants only in this state.
async fn quiescent(addrs: &[String]) -> bool {
    let mut all = Vec::new();
    for a in addrs {
        match status(a).await {
            Some(st) => all.push(st),
            None => return false,
        }
    }
    let Some(first) = all.first() else {
        return false;
    };
    for g in 0..first.group_count {
        let views: Vec<_> = all
            .iter()
            .filter_map(|st| st.groups.iter().find(|x| x.group_id == g))
            .collect();
        let Some(leader) = views.iter().find(|v| v.state == "leader") else {
            return false;
        };
        if leader.open_intents > 0 || leader.queued_ref_batches > 0 {
            return false;
        }
        if views.len() != all.len() || views.iter().any(|v| v.last_applied != leader.last_applied) {
            return false;
        }
    }
    true
}

pub async fn run(opts: &Options) -> Result<Report> {
    let began = Instant::now();
    let sc = opts.scenario;
    let dir = opts.out.join(format!("{}-{}", sc.name, opts.seed));
    if dir.exists() {
        crate::cluster::unmount_under(&dir);
        std::fs::remove_dir_all(&dir).ok();
    }
    let env = sc
        .broken
        .map(|fp| vec![("FAILPOINTS".to_string(), fp.to_string())])
        .unwrap_or_default();
    let fuse_host = opts.fuse.then_some(NODES);
    let mut c = Cluster::create(
        &dir,
        &opts.bin,
        NODES,
        usize::from(opts.fuse),
        opts.clients,
        env,
    )?;
    c.start_all().await?;
    c.init(GROUPS).await?;
    for g in 0..GROUPS {
        wait_for(
            &format!("a leader of group {g}"),
            Duration::from_secs(30),
            || c.leader_of(g),
        )
        .await?;
    }
    let shape = Shape::default();
    let admin = connect(client_config(c.seeds(), None, Duration::from_secs(30))).await?;
    let tree = workload::setup(&admin, &shape).await?;
    let data_group = group_of_ino(tree.files[0]);

    let mut mount = None;
    let mnt = dir.join("mnt");
    if let Some(h) = fuse_host {
        mount = Some(c.mount(h, &mnt, CLIENT_DEADLINE.as_secs()).await?);
    }

    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // With a client on the minority side, that client only reads the data
    // files: a node that answers without confirming its leadership would
    // hand it old content.
    let reader = matches!(sc.name, "client-in-minority" | "broken-stale-reads");
    for k in 0..opts.clients {
        let local = Some(c.net.client_ip(k).into());
        let fs = connect(client_config(c.seeds(), local, CLIENT_DEADLINE)).await?;
        tasks.push(tokio::spawn(workload::client_loop(
            format!("c{k}"),
            Via::Core(fs, tree.clone()),
            shape,
            0..shape.dirs,
            reader && k == 0,
            opts.seed.wrapping_add(k as u64 * 7919),
            (k as u64 + 1) << 40,
            history.clone(),
            stop.clone(),
        )));
    }
    if opts.fuse {
        tasks.push(tokio::spawn(workload::client_loop(
            "fuse".into(),
            Via::Fuse(mnt.clone()),
            shape,
            shape.dirs..shape.dirs + shape.fuse_dirs,
            false,
            opts.seed.wrapping_add(104_729),
            99 << 40,
            history.clone(),
            stop.clone(),
        )));
    }

    // Fault phase.
    let steps = scenario::schedule(sc.name, opts.seed, opts.secs, NODES);
    let mut faults = Faults {
        last: Vec::new(),
        proxies: Vec::new(),
        crashes: Vec::new(),
    };
    let mut log = Vec::new();
    let mut errors = Vec::new();
    let phase = Instant::now();
    for step in &steps {
        let at = Duration::from_millis(step.at_ms);
        while phase.elapsed() < at {
            faults.reap(&mut c, phase.elapsed()).await;
            tokio::time::sleep((at - phase.elapsed()).min(Duration::from_millis(200))).await;
        }
        let started = phase.elapsed().as_millis() as u64;
        let res = faults
            .apply(&mut c, &step.fault, data_group, opts.clients, fuse_host)
            .await;
        let took_ms = phase.elapsed().as_millis() as u64 - started;
        let (nodes, error) = match res {
            Ok(n) => (n, None),
            Err(e) => (vec![], Some(format!("{e:#}"))),
        };
        eprintln!(
            "  {:>6.1}s {:?} -> nodes {:?} ({took_ms} ms){}",
            started as f64 / 1000.0,
            step.fault,
            nodes,
            error
                .as_ref()
                .map(|e| format!(" FAILED: {e}"))
                .unwrap_or_default()
        );
        if let Some(e) = &error {
            errors.push(format!("step at {started} ms: {e}"));
        }
        log.push(StepLog {
            at_ms: started,
            step: step.clone(),
            nodes,
            took_ms,
            error,
        });
    }
    while phase.elapsed() < Duration::from_secs(opts.secs) {
        faults.reap(&mut c, phase.elapsed()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    faults.reap(&mut c, phase.elapsed()).await;

    // Heal and wait for the cluster to serve everything again.
    heal_all(&mut c, &mut faults).await?;
    let healed = Instant::now();
    let prober = connect(client_config(c.seeds(), None, Duration::from_secs(5))).await?;
    let mut recovery_ms = None;
    while healed.elapsed() < RECOVERY_BOUND {
        if probe(&prober, &tree).await.is_ok() {
            recovery_ms = Some(healed.elapsed().as_millis() as u64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered_ns = history.now();
    // Repair is timed from healing, alongside the rest of the run.
    let repair = {
        let addrs = c.seeds();
        tokio::spawn(async move {
            while healed.elapsed() < RECOVERY_BOUND * 2 {
                if under_replicated(&addrs).await == Some(0) {
                    return Some(healed.elapsed().as_millis() as u64);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            None
        })
    };
    if recovery_ms.is_none() {
        errors.push(format!(
            "the cluster did not serve every group within {RECOVERY_BOUND:?} of healing"
        ));
    }
    tokio::time::sleep(AFTER_RECOVERY).await;
    stop.store(true, Ordering::Relaxed);
    let mut by_client = BTreeMap::new();
    for t in tasks {
        // Clients finish their current operation within their deadline.
        match tokio::time::timeout(CLIENT_DEADLINE * 3, t).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errors.push(format!("a client task failed: {e}")),
            Err(_) => errors.push("a client did not finish its last operation".into()),
        }
    }
    if let Err(e) = workload::final_reads(&admin, &tree, &shape, &history, shape.dirs).await {
        errors.push(format!("{e:#}"));
    }
    let repair_ms = repair.await.ok().flatten();
    if repair_ms.is_none() {
        errors.push("chunks were still short of copies two minutes after healing".into());
    }
    let addrs = c.seeds();
    if wait_for("the cluster to come to rest", RECOVERY_BOUND, || async {
        quiescent(&addrs).await.then_some(())
    })
    .await
    .is_err()
    {
        errors.push(format!(
            "the cluster did not come to rest (intents, queued reference batches or lagging replicas) within {RECOVERY_BOUND:?}"
        ));
    }
    faults.reap(&mut c, phase.elapsed()).await;
    if let (Some(mut m), Some(_)) = (mount.take(), fuse_host) {
        unmount(&mut m, &mnt);
    }
    drop(prober);
    drop(admin);

    // Offline invariant check of every node's copy.
    let mut invariants = Vec::new();
    for i in 0..c.nodes.len() {
        c.stop(i, Duration::from_secs(15)).await;
        let out = std::process::Command::new(opts.bin.join("musicfs-node"))
            .args(["check", "--data"])
            .arg(&c.nodes[i].data)
            .output()?;
        if !out.status.success() {
            errors.push(format!(
                "node {} invariant check failed: {}{}",
                c.nodes[i].id,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        invariants.push((c.nodes[i].id, out.status.success()));
    }

    // Check the history.
    let records = history.snapshot();
    let mut counts = Counts::default();
    let mut corrupt = Vec::new();
    let mut failed_after = 0;
    for r in &records {
        counts.total += 1;
        *by_client.entry(r.client.clone()).or_insert(0) += 1;
        match (&r.output, r.failed) {
            (_, true) => counts.failed_reads += 1,
            (None, false) => counts.indeterminate += 1,
            (Some(o), _) => match o {
                Output::NotFound
                | Output::Exists
                | Output::NotDir
                | Output::IsDir
                | Output::NotEmpty => counts.definite_errors += 1,
                Output::Corrupt { why } => {
                    corrupt.push(format!("op {} {:?} by {}: {why}", r.id, r.input, r.client))
                }
                _ => counts.ok += 1,
            },
        }
        if r.call >= recovered_ns && r.client != "final" && (r.failed || r.output.is_none()) {
            failed_after += 1;
        }
    }
    counts.by_client = by_client;
    let checks = check_history(&records, &shape);
    let violation = checks.iter().any(|c| !c.ok) || !corrupt.is_empty();
    let sound = !violation
        && recovery_ms.is_some()
        && repair_ms.is_some()
        && invariants.iter().all(|(_, ok)| *ok)
        && faults.crashes.is_empty()
        && errors.is_empty()
        && failed_after == 0;
    let passed = match sc.broken {
        Some(_) => violation,
        None => sound,
    };
    let report = Report {
        scenario: sc.name.into(),
        seed: opts.seed,
        secs: opts.secs,
        replay: format!(
            "chaos-tests run --scenario {} --seed {} --secs {}",
            sc.name, opts.seed, opts.secs
        ),
        broken_build: sc.broken.map(String::from),
        schedule: log,
        operations: counts,
        linearizability: checks,
        corrupt_reads: corrupt,
        recovery_ms,
        repair_ms,
        failed_after_recovery: failed_after,
        invariants,
        crashes: faults.crashes,
        errors,
        violation,
        passed,
        elapsed_ms: began.elapsed().as_millis() as u64,
    };
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(dir.join("history.json"), serde_json::to_vec(&records)?)?;
    drop(c);
    Ok(report)
}

fn events(records: &[&Record]) -> Vec<Event<Input, Output>> {
    records
        .iter()
        .filter(|r| !r.failed)
        .map(|r| Event {
            call: r.call,
            ret: r.ret,
            input: r.input.clone(),
            output: r.output.clone(),
            id: r.id,
        })
        .collect()
}

/// Splits the history into independent parts and checks each.
pub fn check_history(records: &[Record], shape: &Shape) -> Vec<CheckResult> {
    let mut parts: BTreeMap<Partition, Vec<&Record>> = BTreeMap::new();
    for r in records {
        parts
            .entry(r.input.partition(shape.dirs))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for (p, recs) in parts {
        let ev = events(&recs);
        let verdict = match p {
            Partition::Namespace | Partition::FuseNamespace => {
                lin::check(&Namespace, NsState::default(), &ev, CHECK_BUDGET)
            }
            Partition::File(_) => lin::check(&DataFile, 0, &ev, CHECK_BUDGET),
        };
        let (verdict_s, detail, ok) = match verdict {
            Verdict::Linearizable => ("linearizable".to_string(), None, true),
            Verdict::Unknown => (
                "unknown".to_string(),
                Some(format!("the search did not finish within {CHECK_BUDGET:?}")),
                false,
            ),
            Verdict::Violation { stuck_at, ordered } => {
                let r = records
                    .iter()
                    .find(|r| r.id == stuck_at)
                    .unwrap_or(&records[0]);
                (
                    "violation".to_string(),
                    Some(format!(
                        "no order of the operations explains op {} ({:?} by {} -> {:?}, called at {:.3}s, returned at {:.3}s, answered by (group, node) {:?}) after {ordered} were ordered",
                        r.id,
                        r.input,
                        r.client,
                        r.output,
                        r.call as f64 / 1e9,
                        r.ret.unwrap_or(0) as f64 / 1e9,
                        r.answers
                    )),
                    false,
                )
            }
        };
        out.push(CheckResult {
            partition: match p {
                Partition::Namespace => "namespace".into(),
                Partition::FuseNamespace => "namespace (FUSE client's directories)".into(),
                Partition::File(f) => format!("data file f{f}"),
            },
            operations: ev.len(),
            verdict: verdict_s,
            detail,
            ok,
        });
    }
    out
}

/// A human summary of one run.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "{} {} (seed {}, {} s of faults, {:.0} s in all{})",
        if r.passed { "PASS" } else { "FAIL" },
        r.scenario,
        r.seed,
        r.secs,
        r.elapsed_ms as f64 / 1000.0,
        r.broken_build
            .as_ref()
            .map(|b| format!(", broken build: {b}"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "  replay: {}", r.replay);
    let faults: Vec<String> = r
        .schedule
        .iter()
        .map(|l| {
            format!(
                "{:.1}s {} {:?}",
                l.at_ms as f64 / 1000.0,
                fault_name(&l.step.fault),
                l.nodes
            )
        })
        .collect();
    let _ = writeln!(s, "  faults: {}", faults.join(", "));
    let o = &r.operations;
    let _ = writeln!(
        s,
        "  operations: {} ({} ok, {} definite errors, {} indeterminate, {} failed reads) by {:?}",
        o.total, o.ok, o.definite_errors, o.indeterminate, o.failed_reads, o.by_client
    );
    for c in &r.linearizability {
        let _ = writeln!(
            s,
            "  {}: {} over {} operations{}",
            c.partition,
            c.verdict,
            c.operations,
            c.detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        s,
        "  integrity: {} corrupt reads; invariants: {:?}",
        r.corrupt_reads.len(),
        r.invariants
    );
    let _ = writeln!(
        s,
        "  recovery: served every group {} after healing, no chunk short of copies {}; {} operations failed after recovery",
        r.recovery_ms.map(|m| format!("{m} ms")).unwrap_or("never".into()),
        r.repair_ms.map(|m| format!("{m} ms")).unwrap_or("never".into()),
        r.failed_after_recovery
    );
    for e in r.crashes.iter().chain(&r.errors).chain(&r.corrupt_reads) {
        let _ = writeln!(s, "  ! {e}");
    }
    s
}

fn fault_name(f: &Fault) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.get("fault").and_then(|x| x.as_str()).map(String::from))
        .unwrap_or_default()
}
