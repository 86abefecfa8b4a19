//! Test harness: real `musicfs-node` processes on 127.0.0.1 with free
//! ports and temporary data directories, and real FUSE mounts. Everything
//! started here is stopped on drop, by PID.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use musicfs_client::admin;
use proto::admin::StatusResponse;

pub fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_musicfs"))
        .parent()
        .expect("binary directory")
        .to_path_buf()
}

/// A free port never handed out before in this test process: the kernel may
/// return a just-released port again, and two nodes of one test (or of two
/// tests running side by side) must not be given the same address.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("port list");
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh free port after 1000 tries");
}

/// Runs the `musicfs` CLI against `c` (its seeds in MUSICFS_CLUSTER).
pub fn musicfs(c: &TestCluster, args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("musicfs"))
        .args(args)
        .env("MUSICFS_CLUSTER", c.seeds())
        .output()
        .expect("run musicfs")
}

/// Polls `f` until it returns `Some`, or panics naming `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub data: PathBuf,
    pub child: Option<Child>,
    pub args: Vec<String>,
    /// Extra environment for the next start (e.g. FAILPOINTS).
    pub env: Vec<(String, String)>,
    /// A cgroup (v2) the node runs in, so iptables can drop every packet
    /// it sends (see [`TestCluster::partition`]).
    pub cgroup: Option<PathBuf>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl TestCluster {
    /// Starts `n` nodes; `extra` flags go to every node.
    pub async fn start(n: usize, extra: &[&str]) -> TestCluster {
        Self::layout(n, extra).launch().await
    }

    /// Starts `n` nodes that speak TLS with certificates of a new CA and ask
    /// for an admin token; this test process uses the client certificate and
    /// the token (one identity per process: call once per test binary).
    /// The credentials are in `certs_dir()`, with one spare node's (n + 1).
    pub async fn start_secure(n: usize) -> TestCluster {
        let mut c = Self::layout(n, &[]);
        let certs = c.certs_dir();
        musicfs_client::certs::init(&certs, n as u64 + 1, &[], 30).expect("certs init");
        std::fs::write(certs.join("revoked"), "# none yet\n").expect("revoked list");
        for node in &mut c.nodes {
            node.args = vec![
                "--tls-dir".into(),
                certs
                    .join(format!("node-{}", node.id))
                    .display()
                    .to_string(),
                "--admin-token-file".into(),
                certs.join("admin-token").display().to_string(),
                "--revoked-certs-file".into(),
                certs.join("revoked").display().to_string(),
            ];
        }
        let t = proto::transport::Transport::tls_from_dir(&certs.join("client"))
            .and_then(|t| t.with_token_file(&certs.join("admin-token")))
            .expect("client credentials");
        assert!(
            musicfs_client::set_transport(t),
            "credentials were set already in this test process"
        );
        c.launch().await
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The cluster secret every node of this cluster is started with.
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("cluster-secret")
    }

    fn layout(n: usize, extra: &[&str]) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("musicfs-test")
            .tempdir()
            .expect("tempdir");
        let mut nodes = Vec::new();
        for i in 1..=n as u64 {
            let addr = format!("127.0.0.1:{}", free_port());
            nodes.push(Node {
                id: i,
                addr,
                data: dir.path().join(format!("node{i}")),
                child: None,
                args: extra.iter().map(|s| s.to_string()).collect(),
                env: Vec::new(),
                cgroup: None,
            });
        }
        proto::auth::ClusterSecret::write_new(&dir.path().join("cluster-secret"))
            .expect("cluster secret");
        TestCluster { dir, nodes }
    }

    async fn launch(mut self) -> TestCluster {
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
        for i in 0..self.nodes.len() {
            self.wait_up(i).await;
        }
        self
    }

    /// Starts one more node (not a cluster member until `musicfs node
    /// add`); returns its index.
    pub async fn add_node(&mut self, extra: &[&str]) -> usize {
        let i = self.spawn_new_node(extra);
        self.wait_up(i).await;
        i
    }

    /// Starts one more node without waiting for it to answer; returns its
    /// index.
    pub fn spawn_new_node(&mut self, extra: &[&str]) -> usize {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        self.nodes.push(Node {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            data: self.dir.path().join(format!("node{id}")),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cgroup: None,
        });
        let i = self.nodes.len() - 1;
        self.spawn(i);
        i
    }

    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn peers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn spawn(&mut self, i: usize) {
        let secret = self.secret_file();
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} already running", n.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{}.log", n.id)))
            .expect("log file");
        let node_bin = bin_dir().join("musicfs-node");
        let mut cmd = match &n.cgroup {
            // The node joins its cgroup before it opens any socket (a
            // socket belongs to the cgroup it was made in).
            Some(cg) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(cg.join("cgroup.procs"))
                    .arg(&node_bin);
                c
            }
            None => Command::new(&node_bin),
        };
        let child = cmd
            .args(["--id", &n.id.to_string(), "--listen", &n.addr, "--data"])
            .arg(&n.data)
            .args(&n.args)
            .env(
                "MUSICFS_LOG",
                std::env::var("MUSICFS_TEST_LOG").unwrap_or_else(|_| {
                    "info,openraft=warn,openraft::core::heartbeat=error,openraft::replication=error,openraft::engine::handler::replication_handler=error".into()
                }),
            )
            .env("MUSICFS_CLUSTER_SECRET_FILE", &secret)
            .envs(n.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn musicfs-node");
        n.child = Some(child);
    }

    /// Waits until node `i` answers on its address as itself; panics with
    /// its log if it exits first (e.g. its port was taken).
    pub async fn wait_up(&mut self, i: usize) {
        let addr = self.nodes[i].addr.clone();
        let id = self.nodes[i].id;
        let log = self.dir.path().join(format!("node{id}.log"));
        let child = &mut self.nodes[i].child;
        let st = wait_for(
            &format!("node {id} to listen"),
            Duration::from_secs(30),
            || {
                if let Some(Ok(Some(_))) = child.as_mut().map(|c| c.try_wait()) {
                    panic!(
                        "node {id} exited at start:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let addr = addr.clone();
                async move { admin::node_status(&addr).await.ok() }
            },
        )
        .await;
        assert_eq!(st.node_id, id, "another node answers on {addr}");
    }

    /// Initialises the cluster with four metadata groups, so tests cross
    /// shards.
    pub async fn init(&self) -> String {
        self.init_groups(4).await
    }

    pub async fn init_groups(&self, groups: u32) -> String {
        self.init_with(admin::InitOptions {
            groups,
            replication: 3.min(self.nodes.len() as u32),
            commit_window_secs: 0,
        })
        .await
    }

    pub async fn init_with(&self, opts: admin::InitOptions) -> String {
        let peers = admin::parse_peers(&self.peers()).expect("peers");
        admin::init_cluster(&peers, opts)
            .await
            .expect("cluster init")
    }

    /// Runs the offline invariant checker on node `i`'s data directory (the
    /// node must be stopped); returns its JSON report and whether it passed.
    pub fn check(&self, i: usize) -> (serde_json::Value, bool) {
        let out = Command::new(bin_dir().join("musicfs-node"))
            .args(["check", "--json", "--data"])
            .arg(&self.nodes[i].data)
            .output()
            .expect("run musicfs-node check");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check output is not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (report, out.status.success())
    }

    /// Restarts node `i` serving its status page and metrics on a fresh
    /// address, which it returns.
    pub async fn restart_with_metrics(&mut self, i: usize) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        self.kill(i);
        self.nodes[i]
            .args
            .extend(["--metrics-listen".to_string(), addr.clone()]);
        self.spawn(i);
        self.wait_up(i).await;
        addr
    }

    /// Whether node `i`'s process has exited by itself.
    pub fn exited(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.nodes[i].child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Stops node `i` the way an init system does (SIGTERM) and waits up
    /// to 30 s for it to exit; panics if it does not.
    pub async fn stop(&mut self, i: usize) {
        let Some(mut c) = self.nodes[i].child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child this test started and has
        // not reaped yet.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let id = self.nodes[i].id;
        wait_for(
            &format!("node {id} to exit on SIGTERM"),
            Duration::from_secs(30),
            || {
                let done = matches!(c.try_wait(), Ok(Some(_)));
                async move { done.then_some(()) }
            },
        )
        .await;
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        admin::node_status(&self.nodes[i].addr).await.ok()
    }

    /// Index of the node that leads group 0, as the nodes report it.
    pub async fn leader(&self) -> usize {
        wait_for("a leader of group 0", Duration::from_secs(30), || async {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.child.is_none() {
                    continue;
                }
                if let Some(st) = self.status(i).await {
                    if let Some(g) = st.groups.iter().find(|g| g.group_id == 0) {
                        if g.state == "leader" {
                            return Some(i);
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// A client core connected to this cluster, failing after `deadline`.
    pub async fn client(&self, deadline: Duration) -> std::sync::Arc<musicfs_client::Fs> {
        let seeds = musicfs_client::parse_seeds(&self.seeds()).expect("seeds");
        let mut cfg = musicfs_client::ClusterConfig::new(seeds);
        cfg.deadline = deadline;
        let cluster = musicfs_client::Cluster::connect(cfg)
            .await
            .expect("connect");
        musicfs_client::Fs::new(cluster, 16 << 20)
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("node{}.log", self.nodes[i].id)),
        )
        .unwrap_or_default()
    }
}

/// Where the cgroup v2 hierarchy is mounted.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 hierarchy (partition tests drop a node's packets by its cgroup)")
}

fn iptables(args: &[String]) -> Result<(), String> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A node cut off from everyone: iptables drops every packet to its port
/// and every packet its process sends (matched by its cgroup). Dropping
/// the guard heals the partition.
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    pub fn heal(&mut self) {
        for r in self.rules.drain(..) {
            let mut del = r.clone();
            del[0] = "-D".into();
            if let Err(e) = iptables(&del) {
                eprintln!("healing a partition: {e}");
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

impl TestCluster {
    /// Starts `n` nodes, each in a cgroup of its own, so that
    /// [`Self::partition`] can cut any of them off (needs root and
    /// iptables).
    pub async fn start_partitionable(n: usize, extra: &[&str]) -> TestCluster {
        let mut c = Self::layout(n, extra);
        let root = cgroup2_root();
        for node in &mut c.nodes {
            let cg = root.join(format!(
                "musicfs-test-{}-{}-node{}",
                std::process::id(),
                c.dir
                    .path()
                    .file_name()
                    .and_then(|f| f.to_str())
                    .unwrap_or("x"),
                node.id
            ));
            std::fs::create_dir_all(&cg)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", cg.display()));
            node.cgroup = Some(cg);
        }
        c.launch().await
    }

    /// Cuts node `i` off from clients and the other nodes.
    pub fn partition(&self, i: usize) -> Partition {
        let n = &self.nodes[i];
        let cg = n
            .cgroup
            .as_ref()
            .expect("a node started by start_partitionable");
        let root = cgroup2_root();
        let rel = cg.strip_prefix(&root).expect("cgroup under the root");
        let port = n.addr.rsplit_once(':').expect("HOST:PORT").1.to_string();
        let rules: Vec<Vec<String>> = vec![
            ["-I", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"]
                .map(String::from)
                .to_vec(),
            vec![
                "-I".into(),
                "OUTPUT".into(),
                "-m".into(),
                "cgroup".into(),
                "--path".into(),
                rel.display().to_string(),
                "-j".into(),
                "DROP".into(),
            ],
        ];
        let mut p = Partition { rules: Vec::new() };
        for r in rules {
            iptables(&r).unwrap_or_else(|e| panic!("partition node {}: {e}", n.id));
            p.rules.push(r);
        }
        p
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for n in &self.nodes {
            if let Some(cg) = &n.cgroup {
                let _ = std::fs::remove_dir(cg);
            }
        }
        // For a failure to study after the run: MUSICFS_TEST_LOGS=DIR keeps
        // every node's log (with MUSICFS_TEST_LOG setting their filter).
        if let Some(keep) = std::env::var_os("MUSICFS_TEST_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for n in &self.nodes {
                let name = format!("node{}.log", n.id);
                let _ = std::fs::copy(self.dir.path().join(&name), keep.join(&name));
            }
        }
    }
}

/// A `musicfs mount` process and its mount point.
pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
}

fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(p.as_str())))
        .unwrap_or(false)
}

impl Mount {
    pub async fn new(seeds: &str, path: &Path, deadline_secs: u64) -> Mount {
        Self::with_args(seeds, path, deadline_secs, &[]).await
    }

    /// A mount with `extra` flags for `musicfs mount`.
    pub async fn with_args(seeds: &str, path: &Path, deadline_secs: u64, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(path).expect("mount point");
        let child = Command::new(bin_dir().join("musicfs"))
            .args([
                "mount",
                "--cluster",
                seeds,
                "--deadline-secs",
                &deadline_secs.to_string(),
            ])
            .args(extra)
            .arg(path)
            .env("MUSICFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn musicfs mount");
        let m = Mount {
            path: path.to_path_buf(),
            child: Some(child),
        };
        let p = path.to_path_buf();
        wait_for("the FUSE mount", Duration::from_secs(30), || {
            let p = p.clone();
            async move { is_mounted(&p).then_some(()) }
        })
        .await;
        m
    }

    /// Unmounts (SIGTERM to the mount process) and waits for it to exit.
    pub fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: signalling a child we started, by PID.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        c.wait().ok()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no fixtures.
pub struct Gen(pub u64);

impl Gen {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// A number below `n`.
    pub fn pick(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// The Prometheus text a node serves.
pub fn scrape(addr: &str) -> String {
    http(addr, "GET", "/metrics")
}

/// The whole HTTP/1.0 response (status line, headers, body) to `METHOD PATH`.
pub fn http(addr: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the node's HTTP listener");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}
