//! `musicfs-node`: a MusicFS metadata + storage node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use musicfs_node::server::{run, NodeConfig};

#[derive(Parser)]
#[command(
    name = "musicfs-node",
    version,
    about = "A MusicFS cluster node (metadata and storage)"
)]
struct Args {
    /// TOML configuration file (see docs/OPERATIONS.md); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node id, a positive integer unique in the cluster.
    #[arg(long)]
    id: Option<u64>,
    /// Listen address, e.g. 0.0.0.0:7400.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Raft snapshot after this many log entries.
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    keep_logs: Option<u64>,
    /// Disk space (MiB) the chunk store leaves free.
    #[arg(long)]
    reserve_mib: Option<u64>,
    /// Seconds a storage node may stay silent before its chunks are
    /// re-replicated elsewhere (default 600).
    #[arg(long)]
    repair_after_secs: Option<u64>,
    /// MiB per second repair may copy (default 100; 0: unlimited).
    #[arg(long)]
    repair_mib_per_sec: Option<u64>,
    /// MiB per second a scrub may read (default 50; 0: unlimited).
    #[arg(long)]
    scrub_mib_per_sec: Option<u64>,
    /// Hours between automatic scrubs (default 720; 0: only when asked).
    #[arg(long)]
    scrub_every_hours: Option<u64>,
    /// Seconds between garbage-collection passes (default 60).
    #[arg(long)]
    gc_every_secs: Option<u64>,
    /// Seconds between sweeps of this node's chunk files (default 21600; 0: never).
    #[arg(long)]
    gc_sweep_every_secs: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9400).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TLS credentials directory (ca.pem, cert.pem, key.pem); plain TCP
    /// without it.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// File with the admin token commands that change the cluster must carry.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File with the cluster secret (the same on every node; `musicfs certs
    /// secret` makes one): signs the calls only nodes may make (on plain
    /// TCP) and the receipts of stored chunks. Required.
    #[arg(long, env = "MUSICFS_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// File of revoked certificate serials, one per line.
    #[arg(long)]
    revoked_certs_file: Option<PathBuf>,
    /// Connections kept open at most (default 8192).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections kept open at most from one address (default 512).
    #[arg(long)]
    max_connections_per_address: Option<usize>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a stopped node's metadata: every invariant of the namespace
    /// and the chunk index, over all groups (exit 1 when one is broken).
    Check {
        /// The node's data directory.
        #[arg(long)]
        data: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn check(data: &std::path::Path, json: bool) -> Result<()> {
    let _lock = musicfs_node::server::lock_dir(data)?;
    let meta = data.join("meta");
    if !meta.exists() {
        bail!("{} holds no MusicFS metadata", data.display());
    }
    let store = raft::Store::open(&meta)?;
    let view = raft::KvView::new(&store);
    let report = musicfs_node::check::check(&musicfs_node::app::ViewKv(&view))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} groups, {} inodes, {} entries, {} chunks ({} references), {} open intents, {} queued batches",
            report.groups,
            report.inodes,
            report.entries,
            report.chunks,
            report.chunk_refs,
            report.open_intents,
            report.queued_ref_batches
        );
        for p in &report.problems {
            println!("PROBLEM: {p}");
        }
        println!("{}", if report.ok() { "OK" } else { "BROKEN" });
    }
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

fn config(a: Args) -> Result<NodeConfig> {
    let mut table = match &a.config {
        Some(p) => {
            let s =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            s.parse::<toml::Table>()
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => toml::Table::new(),
    };
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_string(), v);
    };
    if let Some(v) = a.id {
        set("id", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.listen {
        set("listen", toml::Value::String(v.to_string()));
    }
    if let Some(v) = &a.data {
        set("data", toml::Value::String(v.display().to_string()));
    }
    if let Some(v) = a.snapshot_every {
        set("snapshot_every", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.keep_logs {
        set("keep_logs", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.reserve_mib {
        set("reserve_mib", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.repair_after_secs {
        set("repair_after_secs", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.repair_mib_per_sec {
        set("repair_mib_per_sec", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.scrub_mib_per_sec {
        set("scrub_mib_per_sec", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.scrub_every_hours {
        set("scrub_every_hours", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.gc_every_secs {
        set("gc_every_secs", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.gc_sweep_every_secs {
        set("gc_sweep_every_secs", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.metrics_listen {
        set("metrics_listen", toml::Value::String(v.to_string()));
    }
    if let Some(v) = &a.tls_dir {
        set("tls_dir", toml::Value::String(v.display().to_string()));
    }
    if let Some(v) = &a.admin_token_file {
        set(
            "admin_token_file",
            toml::Value::String(v.display().to_string()),
        );
    }
    if let Some(v) = &a.revoked_certs_file {
        set(
            "revoked_certs_file",
            toml::Value::String(v.display().to_string()),
        );
    }
    if let Some(v) = a.max_connections {
        set("max_connections", toml::Value::Integer(v as i64));
    }
    if let Some(v) = a.max_connections_per_address {
        set(
            "max_connections_per_address",
            toml::Value::Integer(v as i64),
        );
    }
    if let Some(v) = &a.cluster_secret_file {
        set(
            "cluster_secret_file",
            toml::Value::String(v.display().to_string()),
        );
    }
    let cfg: NodeConfig = toml::Value::Table(table)
        .try_into()
        .context("invalid configuration (id, listen and data are required)")?;
    Ok(cfg)
}

/// Without `MUSICFS_LOG`. openraft warns on every failed heartbeat and
/// append of every group (dozens a second while a node is down); the
/// transport logs a peer once when it goes and once when it returns.
const DEFAULT_LOG: &str =
    "info,openraft=warn,openraft::core::heartbeat=error,openraft::replication=error,openraft::engine::handler::replication_handler=error";

fn main() {
    // glibc gives each thread that allocates its own malloc arena; RocksDB's
    // background threads then hold hundreds of MiB of freed memory in
    // arenas of their own. Two arenas keep the resident set close to what
    // is in use (set before any thread starts).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tunables; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSICFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match real_main() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("musicfs-node: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(Cmd::Check { data, json }) = args.command.take() {
        return check(&data, json);
    }
    let cfg = config(args)?;
    // Failure injection from $FAILPOINTS, in builds with the `failpoints`
    // feature only (tests); otherwise this does nothing.
    let _failpoints = fail::FailScenario::setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        run(cfg, shutdown).await
    })?;
    Ok(())
}
