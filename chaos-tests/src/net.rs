//! The test network: one Linux network namespace per host (node or FUSE
//! client), each joined by a veth pair to a bridge the harness creates, and
//! in-process clients on extra addresses of the bridge itself. Faults are
//! iptables rules inside the namespaces, so the machine's own tables are
//! touched only to let the bridge forward. Everything is removed on drop.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// One end of a link that can be cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Peer {
    /// A host with its own namespace (a node, or a FUSE client).
    Host(usize),
    /// An in-process client, on an address of the bridge.
    Client(usize),
}

pub struct Net {
    /// Short unique tag in every name this run creates.
    tag: String,
    prefix: [u8; 3],
    bridge: String,
    hosts: Vec<String>,
    clients: usize,
    forward_rules: bool,
    rules: Mutex<Vec<Rules>>,
}

/// The fault rules of one host's namespace.
#[derive(Default)]
struct Rules {
    filter: Vec<String>,
    nat: Vec<String>,
    used_nat: bool,
    /// Changed since last installed.
    dirty: bool,
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("run {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process can build the test network (root, iproute2,
/// iptables, nsenter).
pub fn available() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the chaos harness needs root (network namespaces and iptables)");
    }
    for prog in ["ip", "iptables", "iptables-restore", "nsenter"] {
        sh("sh", &["-c", &format!("command -v {prog}")])
            .with_context(|| format!("{prog} is not installed"))?;
    }
    Ok(())
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Removes what runs that died without cleaning up left behind: their
/// names carry their PID, so anything whose process is gone is stale.
fn cleanup_stale() {
    let Ok(list) = sh("ip", &["-o", "link", "show"]) else {
        return;
    };
    let netns = sh("ip", &["netns", "list"]).unwrap_or_default();
    let mut tags: Vec<String> = Vec::new();
    for word in list.split_whitespace().chain(netns.split_whitespace()) {
        let word = word.trim_end_matches(':').split('@').next().unwrap_or("");
        let Some(rest) = word.strip_prefix("mfc") else {
            continue;
        };
        let tag = rest.split('-').next().unwrap_or("").to_string();
        if !tag.is_empty() && !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    for tag in tags {
        let Ok(pid) = u32::from_str_radix(&tag, 36) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for word in netns.split_whitespace() {
            if word.starts_with(&format!("mfc{tag}-h")) {
                let _ = sh("ip", &["netns", "del", word]);
            }
        }
        let br = format!("mfc{tag}-br");
        let _ = sh(
            "iptables",
            &["-w", "-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"],
        );
        let _ = sh("ip", &["link", "del", &br]);
    }
}

impl Net {
    /// Creates the bridge, `hosts` namespaces and `clients` bridge
    /// addresses, on a /24 no route of this machine uses yet.
    pub fn create(hosts: usize, clients: usize) -> Result<Net> {
        available()?;
        cleanup_stale();
        let pid = std::process::id();
        let tag = base36(pid);
        let routes = sh("ip", &["-4", "route", "show"])?;
        let third = (0..250u32)
            .map(|k| ((pid + k) % 250 + 1) as u8)
            .find(|t| !routes.contains(&format!("10.213.{t}.")))
            .context("no free 10.213.x.0/24 subnet")?;
        let mut net = Net {
            bridge: format!("mfc{tag}-br"),
            tag,
            prefix: [10, 213, third],
            hosts: Vec::new(),
            clients,
            forward_rules: false,
            rules: Mutex::new(Vec::new()),
        };
        net.build(hosts)?;
        Ok(net)
    }

    fn build(&mut self, hosts: usize) -> Result<()> {
        let br = self.bridge.clone();
        sh("ip", &["link", "add", &br, "type", "bridge"])?;
        sh(
            "ip",
            &["addr", "add", &format!("{}/24", self.gateway()), "dev", &br],
        )?;
        for c in 0..self.clients {
            sh(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", self.client_ip(c)),
                    "dev",
                    &br,
                ],
            )?;
        }
        sh("ip", &["link", "set", &br, "up"])?;
        // Docker sets the FORWARD policy to DROP and makes bridged frames
        // pass through it: let this bridge's own traffic through.
        sh(
            "iptables",
            &["-w", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"],
        )?;
        self.forward_rules = true;
        for h in 0..hosts {
            let ns = format!("mfc{}-h{h}", self.tag);
            sh("ip", &["netns", "add", &ns])?;
            self.hosts.push(ns.clone());
            let veth = format!("mfc{}-v{h}", self.tag);
            sh(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            sh("ip", &["link", "set", &veth, "master", &br, "up"])?;
            sh(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", self.host_ip(h)),
                    "dev",
                    "eth0",
                ],
            )?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // Empty tables now, while the namespaces are idle: registering the
        // nat table in a busy namespace later has been seen to take seconds.
        *self.rules.lock().unwrap_or_else(|e| e.into_inner()) = (0..hosts)
            .map(|_| Rules {
                used_nat: true,
                dirty: true,
                ..Default::default()
            })
            .collect();
        self.apply()?;
        Ok(())
    }

    fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last)
    }

    /// The harness's own address (admin calls, the delay proxy).
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }

    pub fn host_ip(&self, h: usize) -> Ipv4Addr {
        self.ip(10 + h as u8)
    }

    pub fn client_ip(&self, c: usize) -> Ipv4Addr {
        self.ip(100 + c as u8)
    }

    pub fn ip_of(&self, p: Peer) -> Ipv4Addr {
        match p {
            Peer::Host(h) => self.host_ip(h),
            Peer::Client(c) => self.client_ip(c),
        }
    }

    /// The namespace's path, for `nsenter --net=`.
    pub fn ns_path(&self, h: usize) -> String {
        format!("/run/netns/{}", self.hosts[h])
    }

    /// Adds a rule to host `h`'s `table` (applied by `apply`).
    fn rule(&self, h: usize, nat: bool, rule: String) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let r = &mut rules[h];
        if nat {
            r.nat.push(rule);
            r.used_nat = true;
        } else {
            r.filter.push(rule);
        }
        r.dirty = true;
    }

    /// Drops every packet from `from` to `to` (one way). One of them must
    /// be a host: the rule lives in its namespace.
    pub fn drop_one_way(&self, from: Peer, to: Peer) -> Result<()> {
        let (from_ip, to_ip) = (self.ip_of(from), self.ip_of(to));
        match (from, to) {
            (_, Peer::Host(h)) => self.rule(h, false, format!("-A INPUT -s {from_ip} -j DROP")),
            (Peer::Host(h), _) => self.rule(h, false, format!("-A OUTPUT -d {to_ip} -j DROP")),
            _ => bail!("cannot cut two in-process clients from each other"),
        }
        Ok(())
    }

    /// Cuts `a` and `b` off from each other both ways.
    pub fn cut(&self, a: Peer, b: Peer) -> Result<()> {
        self.drop_one_way(a, b)?;
        self.drop_one_way(b, a)
    }

    /// Drops a random share of the packets host `h` receives from the
    /// test network.
    pub fn loss(&self, h: usize, probability: f64) {
        self.rule(
            h,
            false,
            format!(
                "-A INPUT -s {}/24 -m statistic --mode random --probability {probability:.3} -j DROP",
                self.ip(0)
            ),
        );
    }

    /// Sends host `h`'s new connections to `to:port` through `via_port` on
    /// the gateway (the delay proxy), and drops the direct ones already
    /// open so they reconnect through it.
    pub fn redirect(&self, h: usize, to: Ipv4Addr, port: u16, via_port: u16) {
        let via = format!("{}:{via_port}", self.gateway());
        self.rule(
            h,
            true,
            format!("-A OUTPUT -p tcp -d {to} --dport {port} -j DNAT --to-destination {via}"),
        );
        self.rule(
            h,
            false,
            format!("-A OUTPUT -p tcp -d {to} --dport {port} -j DROP"),
        );
    }

    /// Removes every fault rule (applied by `apply`).
    pub fn heal(&self) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for r in rules.iter_mut() {
            if !r.filter.is_empty() || !r.nat.is_empty() {
                r.filter.clear();
                r.nat.clear();
                r.dirty = true;
            }
        }
    }

    /// Installs the rules of every host whose rules changed: one
    /// `iptables-restore` per host, replacing its tables whole.
    pub fn apply(&self) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for (h, r) in rules.iter_mut().enumerate() {
            if !r.dirty {
                continue;
            }
            let mut text = String::from(
                "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
            );
            for l in &r.filter {
                text.push_str(l);
                text.push('\n');
            }
            text.push_str("COMMIT\n");
            if r.used_nat {
                text.push_str(
                    "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
                );
                for l in &r.nat {
                    text.push_str(l);
                    text.push('\n');
                }
                text.push_str("COMMIT\n");
            }
            let mut child = Command::new("nsenter")
                .arg(format!("--net={}", self.ns_path(h)))
                .args(["--", "iptables-restore", "-w"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("run iptables-restore")?;
            child
                .stdin
                .take()
                .context("iptables-restore stdin")?
                .write_all(text.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "iptables-restore in {}: {}\n{text}",
                    self.hosts[h],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            r.dirty = false;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (h, ns) in self.hosts.iter().enumerate() {
            let _ = sh("ip", &["link", "del", &format!("mfc{}-v{h}", self.tag)]);
            let _ = sh("ip", &["netns", "del", ns]);
        }
        if self.forward_rules {
            let br = self.bridge.as_str();
            let _ = sh(
                "iptables",
                &["-w", "-D", "FORWARD", "-i", br, "-o", br, "-j", "ACCEPT"],
            );
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
    }
}
