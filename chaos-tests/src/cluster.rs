//! Real `musicfs-node` processes, each in its own network namespace with
//! its data directory on its own size-limited tmpfs (so a disk can be
//! filled), and a FUSE mount in a namespace of its own. Every process is
//! stopped by PID and every mount removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use musicfs_client::admin;
use proto::admin::StatusResponse;

use crate::net::{sh, Net};

pub const NODE_PORT: u16 = 7400;

/// Size of each node's data file system.
const DISK_MIB: u64 = 768;

pub struct Node {
    pub id: u64,
    pub host: usize,
    pub addr: String,
    pub data: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
}

pub struct Cluster {
    pub net: Net,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    bin: PathBuf,
    /// Extra environment for every node (failure injection).
    env: Vec<(String, String)>,
    mounts: Vec<PathBuf>,
}

fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(p.as_str())))
        .unwrap_or(false)
}

/// Unmounts whatever a run that died left mounted under `dir`.
pub fn unmount_under(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
        if m.starts_with(&prefix) {
            let _ = sh("umount", &["-l", m]);
        }
    }
}

/// Polls `f` until it yields `Some`, or fails naming `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// Creates the network (`nodes` node hosts plus `extra_hosts`) and the
    /// nodes' data file systems; starts nothing.
    pub fn create(
        dir: &Path,
        bin: &Path,
        nodes: usize,
        extra_hosts: usize,
        clients: usize,
        env: Vec<(String, String)>,
    ) -> Result<Cluster> {
        let net = Net::create(nodes + extra_hosts, clients)?;
        std::fs::create_dir_all(dir)?;
        // The nodes' shared secret (a run's directory is new each time).
        let secret = dir.join("cluster-secret");
        if !secret.exists() {
            proto::auth::ClusterSecret::write_new(&secret)?;
        }
        let mut c = Cluster {
            net,
            dir: dir.to_path_buf(),
            nodes: Vec::new(),
            bin: bin.to_path_buf(),
            env,
            mounts: Vec::new(),
        };
        for h in 0..nodes {
            let data = dir.join(format!("node{}", h + 1));
            std::fs::create_dir_all(&data)?;
            sh(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={DISK_MIB}m"),
                    "tmpfs",
                    &data.display().to_string(),
                ],
            )?;
            c.mounts.push(data.clone());
            c.nodes.push(Node {
                id: h as u64 + 1,
                host: h,
                addr: format!("{}:{NODE_PORT}", c.net.host_ip(h)),
                data,
                child: None,
                paused: false,
            });
        }
        Ok(c)
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}.log", self.nodes[i].id))
    }

    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let n = &mut self.nodes[i];
        if n.child.is_some() {
            bail!("node {} already running", n.id);
        }
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.net.ns_path(n.host)))
            .arg("--")
            .arg(self.bin.join("musicfs-node"))
            .args(["--id", &n.id.to_string(), "--listen", &n.addr, "--data"])
            .arg(&n.data)
            .arg("--cluster-secret-file")
            .arg(self.dir.join("cluster-secret"))
            // Lost nodes are repaired around quickly, so runs see repair.
            .args(["--repair-after-secs", "20", "--reserve-mib", "16"])
            .env(
                "MUSICFS_LOG",
                "info,openraft=warn,openraft::core::heartbeat=error,openraft::replication=error,openraft::engine::handler::replication_handler=error",
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn musicfs-node")?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    /// Waits until node `i` answers as itself.
    pub async fn wait_up(&mut self, i: usize, limit: Duration) -> Result<()> {
        let addr = self.nodes[i].addr.clone();
        let id = self.nodes[i].id;
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(st))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                self.nodes[i].child = None;
                bail!("node {id} exited at start ({st})");
            }
            if let Ok(st) = admin::node_status(&addr).await {
                if st.node_id != id {
                    bail!("another node answers on {addr}");
                }
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("node {id} did not answer on {addr} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn start_all(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_up(i, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    pub async fn init(&self, groups: u32) -> Result<()> {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect();
        let peers = admin::parse_peers(&peers.join(","))?;
        admin::init_cluster(
            &peers,
            admin::InitOptions {
                groups,
                replication: 3.min(self.nodes.len() as u32),
                commit_window_secs: 0,
            },
        )
        .await?;
        Ok(())
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i].child {
            // SAFETY: signalling a child this harness started, by PID.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    /// SIGTERM, then SIGKILL if it does not exit within `limit`.
    pub async fn stop(&mut self, i: usize, limit: Duration) {
        self.signal(i, libc::SIGCONT);
        self.signal(i, libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < limit {
            match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => break,
            }
        }
        self.kill(i);
    }

    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.nodes[i].paused = true;
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.nodes[i].paused = false;
    }

    /// Whether node `i` exited by itself; forgets its process if so.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => {
                self.nodes[i].child = None;
                Some(st)
            }
            _ => None,
        }
    }

    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        let addr = self.nodes[i].addr.clone();
        tokio::time::timeout(Duration::from_secs(2), admin::node_status(&addr))
            .await
            .ok()?
            .ok()
    }

    /// The node (index) that leads `group`, as a running node reports it.
    pub async fn leader_of(&self, group: u32) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.running(i) || self.nodes[i].paused {
                continue;
            }
            if let Some(st) = self.status(i).await {
                if st
                    .groups
                    .iter()
                    .any(|g| g.group_id == group && g.state == "leader")
                {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Fills node `i`'s data file system to the last byte.
    pub fn fill_disk(&self, i: usize) -> Result<()> {
        let path = self.nodes[i].data.join("FILLER");
        let mut f = std::fs::File::create(&path)?;
        let buf = vec![0xA5u8; 1 << 20];
        use std::io::Write;
        loop {
            match f.write(&buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn free_disk(&self, i: usize) {
        let _ = std::fs::remove_file(self.nodes[i].data.join("FILLER"));
    }

    /// Mounts the cluster with `musicfs mount` in host `host`'s namespace.
    pub async fn mount(&mut self, host: usize, path: &Path, deadline_secs: u64) -> Result<Child> {
        std::fs::create_dir_all(path)?;
        let log = std::fs::File::create(self.dir.join("mount.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.net.ns_path(host)))
            .arg("--")
            .arg(self.bin.join("musicfs"))
            .args([
                "mount",
                "--cluster",
                &self.seeds().join(","),
                "--deadline-secs",
                &deadline_secs.to_string(),
            ])
            .arg(path)
            .env("MUSICFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn musicfs mount")?;
        self.mounts.insert(0, path.to_path_buf());
        let p = path.to_path_buf();
        wait_for("the FUSE mount", Duration::from_secs(30), || {
            let p = p.clone();
            async move { is_mounted(&p).then_some(()) }
        })
        .await?;
        Ok(child)
    }
}

/// Unmounts a FUSE mount: SIGTERM to its process, then a lazy unmount if
/// it is still there.
pub fn unmount(child: &mut Child, path: &Path) {
    // SAFETY: signalling a child this harness started, by PID.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    if is_mounted(path) {
        let _ = sh("umount", &["-l", &path.display().to_string()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for m in &self.mounts {
            if is_mounted(m) {
                let _ = sh("umount", &["-l", &m.display().to_string()]);
            }
        }
    }
}
