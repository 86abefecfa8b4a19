//! `musicfs`: mount a MusicFS cluster and administer it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use musicfs_client::{admin, outln, parse_seeds, Cluster, ClusterConfig, Fs};

#[derive(Parser)]
#[command(
    name = "musicfs",
    version,
    about = "MusicFS: a replicated file system for music libraries"
)]
struct Cli {
    /// Directory with the TLS credentials (ca.pem, cert.pem, key.pem) of a
    /// cluster that runs TLS (`musicfs certs init` makes one: OUT/client).
    #[arg(long, global = true, env = "MUSICFS_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// File holding the cluster's admin token, needed by commands that
    /// change the cluster (node add/drain/remove, gc, scrub, snapshot,
    /// group transfer-leader, cluster init).
    #[arg(long, global = true, env = "MUSICFS_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Progress bars on stderr for long commands; they draw only on a
/// terminal, so scripts and logs see the final line alone.
mod progress {
    use indicatif::{ProgressBar, ProgressStyle};

    pub fn bytes(len: u64) -> ProgressBar {
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
        {
            bar.set_style(style);
        }
        bar
    }

    pub fn import() -> ProgressBar {
        let bar = ProgressBar::new(1);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}\n{msg}",
        ) {
            bar.set_style(style);
        }
        bar
    }

    pub fn count(len: u64, what: &str) -> ProgressBar {
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {what} ETA {{eta}}"))
        {
            bar.set_style(style);
        }
        bar
    }
}

/// Exit code of a command the cluster refused (no or a wrong admin token,
/// a certificate that may not make the call).
const EXIT_DENIED: i32 = 4;

#[derive(Subcommand)]
enum TagCmd {
    /// Write tags into a track, e.g. `musicfs tag set PATH title="Teardrop"
    /// year=1998`: the file stays a valid file of its format, only its new
    /// header is sent (the audio's chunks are already stored), and search
    /// and the tag views see the change. An empty value removes a field.
    Set {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        path: String,
        /// FIELD=VALUE: artist, albumartist, album, title, genre, date,
        /// year, track, tracktotal, disc, disctotal.
        #[arg(required = true)]
        sets: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Index the tags of every group that stored tags before the tag
    /// index existed (search and the views need it); groups already
    /// indexed are left as they are.
    Reindex {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
    },
}

/// Tag views of a mount.
#[derive(clap::Args, Debug)]
struct ViewArgs {
    /// A tag view, `NAME=TEMPLATE` with beets-style fields, e.g.
    /// `artists='$albumartist/$album/$track $title'`; repeat for more. The
    /// first part must be one of $albumartist, $artist, $album, $title,
    /// $genre, $year. Without any: artists, genres and years.
    #[arg(long = "view", value_name = "NAME=TEMPLATE")]
    views: Vec<String>,
    /// Directory at the root of the mount that holds the views.
    #[arg(long, default_value = ".views")]
    views_dir: String,
    /// Offer no tag views.
    #[arg(long, conflicts_with = "views")]
    no_views: bool,
}

impl ViewArgs {
    fn build(&self) -> Result<Option<musicfs_client::views::Views>> {
        use musicfs_client::views::{Template, Views};
        if self.no_views {
            return Ok(None);
        }
        if self.views_dir.is_empty() || self.views_dir.contains('/') {
            anyhow::bail!("--views-dir must be a single path component");
        }
        if self.views.is_empty() {
            return Ok(Some(Views::defaults(&self.views_dir)));
        }
        let templates = self
            .views
            .iter()
            .map(|s| Template::parse_spec(s))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        Ok(Some(Views::new(&self.views_dir, templates)))
    }
}

/// What `import` and `sync` take.
#[derive(clap::Args)]
struct CopyArgs {
    #[arg(long, env = "MUSICFS_CLUSTER")]
    cluster: String,
    /// Local directory.
    src: PathBuf,
    /// Directory in the cluster (created if missing).
    dest: String,
    /// Files uploaded at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster lifecycle.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Health, nodes and Raft groups of a cluster.
    Status {
        /// Address(es) of any node: HOST:PORT[,HOST:PORT...]
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Mount the cluster (foreground; unmounts on SIGINT/SIGTERM).
    Mount {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        mountpoint: PathBuf,
        /// In-memory chunk cache size in MiB.
        #[arg(long, default_value_t = 256)]
        cache_mib: usize,
        /// Let other users access the mount (needs user_allow_other for non-root).
        #[arg(long)]
        allow_other: bool,
        /// Seconds an operation retries before it fails with EIO.
        #[arg(long, default_value_t = 30)]
        deadline_secs: u64,
        /// Milliseconds a metadata query (lookup, stat, readdir, open) may
        /// go unanswered before the next node is tried.
        #[arg(long, default_value_t = 3000)]
        attempt_timeout_ms: u64,
        /// Milliseconds the kernel caches attributes and names. Longer
        /// makes repeated stats cheaper; other clients' changes to
        /// attributes show after at most this long (an open always sees
        /// the newest content).
        #[arg(long, default_value_t = 1000)]
        attr_timeout_ms: u64,
        /// Keep read chunks in this directory too (survives remounts).
        #[arg(long)]
        disk_cache_dir: Option<PathBuf>,
        /// Size limit of the on-disk cache in MiB.
        #[arg(long, default_value_t = 10240, requires = "disk_cache_dir")]
        disk_cache_mib: u64,
        /// The kernel's read-ahead for the mount in KiB (0: the kernel's default).
        #[arg(long, default_value_t = musicfs_client::admin::DEFAULT_READ_AHEAD_KIB)]
        read_ahead_kib: u32,
        /// Bypass the kernel's page cache: every read goes to the client
        /// (slower for re-reads; see docs/BENCHMARKS.md).
        #[arg(long)]
        direct_io: bool,
        /// Read and upload chunks over gRPC only, not over the direct chunk
        /// protocol (which a cluster without TLS serves on the same port).
        #[arg(long, alias = "grpc-reads")]
        grpc_chunks: bool,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        views: ViewArgs,
    },
    /// Start a local three-node cluster and mount it (for trying MusicFS out).
    Dev {
        /// Where node data, logs and the mount point live.
        #[arg(long, default_value = "musicfs-dev")]
        dir: PathBuf,
        /// First of three consecutive ports; 0 picks free ones.
        #[arg(long, default_value_t = 0)]
        base_port: u16,
    },
    /// List a directory without a mount.
    Ls {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(default_value = "/")]
        path: String,
        /// One JSON object per entry and line (JSON Lines: a directory of
        /// a million entries streams instead of building one document).
        #[arg(long)]
        json: bool,
    },
    /// Copy a local file into the cluster without a mount.
    Put {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        local: PathBuf,
        path: String,
    },
    /// Copy a local library into the cluster, without a mount: new and
    /// changed files only (size and modification time, like rsync), only
    /// the chunks the cluster lacks, several files at once. Run it again to
    /// resume an interrupted import.
    Import(CopyArgs),
    /// Make a directory of the cluster match a local one, like
    /// `rsync -a --delete`: as `import`, and entries the source lacks are
    /// removed.
    Sync(CopyArgs),
    /// Show the tags the metadata keeps for a file (read by import/sync).
    Tags {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Change tags (`musicfs tag set`), or build the tag index of a
    /// cluster whose tags predate it (`musicfs tag reindex`).
    #[command(subcommand)]
    Tag(TagCmd),
    /// Print what changed in the cluster (created, deleted, modified,
    /// retagged paths), one line or JSON object per change, from a cursor
    /// kept in a file: run it again (or with --follow) and it goes on from
    /// where it stopped, so each change is reported once. A media server
    /// rescans just those paths (docs/OPERATIONS.md, "Change feed").
    Watch {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        /// The cursor file (made on first use).
        #[arg(long)]
        cursor: PathBuf,
        /// Keep watching; without it, print what is pending and exit.
        #[arg(long)]
        follow: bool,
        /// With --follow: how often the feed is read.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// A new cursor starts at the end (changes from now on) instead
        /// of the oldest change the cluster keeps.
        #[arg(long)]
        from_now: bool,
        /// One JSON object per change and line (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Find tracks by their tags, beets-style: `artist:Radiohead
    /// year:1995..2000 genre:rock`; bare words match artist, album artist,
    /// album, title or genre; quotes keep spaces (`album:"OK Computer"`).
    /// Exit code 1 when nothing matches.
    Search {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(required = true)]
        query: Vec<String>,
        /// Most tracks to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per track and line (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Print a file of the cluster to stdout without a mount.
    Cat {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        path: String,
    },
    /// Remove a file or empty directory without a mount.
    Rm {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        path: String,
    },
    /// Storage nodes: add, drain, remove (see `musicfs status` for the list).
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Free chunks no file uses any more (a pass runs by itself every
    /// minute; this runs one now and reports).
    Gc {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        /// Only report what would be freed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-read every stored chunk, verify it, and repair bad or missing
    /// replicas from good ones.
    Scrub {
        #[command(subcommand)]
        cmd: ScrubCmd,
    },
    /// Metadata Raft groups: list them, move a leader.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Snapshot every Raft group on every metadata node now, which
    /// compacts their logs (each also does so by itself every few
    /// thousand entries).
    Snapshot {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
    },
    /// Disk capacity and use of every node.
    Df {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
    /// Copies made after a node was lost, drained or removed.
    Repair {
        #[command(subcommand)]
        cmd: RepairCmd,
    },
    /// Copy a file of the cluster to a local file without a mount.
    Get {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        path: String,
        local: PathBuf,
    },
    /// A quick self-test of the running cluster: creates small files and
    /// one large file in a scratch directory, stats and reads them back,
    /// verifies every byte, removes them, and reports the rates. Exit code
    /// 1 if anything fails or differs.
    Bench {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        /// Small files (4 KiB each) to create, stat and read.
        #[arg(long, default_value_t = 200)]
        files: usize,
        /// Size of the large file, in MiB.
        #[arg(long, default_value_t = 64)]
        big_mib: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish,
    /// elvish, powershell); e.g. `musicfs completions bash >
    /// /etc/bash_completion.d/musicfs`.
    Completions { shell: clap_complete::Shell },
    /// TLS certificates and the admin token of a cluster.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A new certificate authority, a certificate per node (OUT/node-N),
    /// one for mounts and admin commands (OUT/client) and an admin token
    /// (OUT/admin-token). Keep OUT/ca/ca.key off the nodes.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Node certificates to make, for node ids 1..=N.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Extra host names or IP addresses to name in node certificates
        /// (nodes are checked by the name `musicfs-node`; these are for
        /// other tools).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity of the CA and node certificates, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Validity of the client (admin) certificate, in days: short, so
        /// a lost one stops working by itself; issue another with `certs
        /// issue --client`.
        #[arg(long, default_value_t = 90)]
        client_days: u32,
    },
    /// A new cluster secret (for a cluster on plain TCP, or one whose
    /// `certs init` predates it): copy the file to every node and name it
    /// in `cluster_secret_file`. Never give it to a client.
    Secret {
        #[arg(long)]
        out: PathBuf,
    },
    /// One more certificate from an existing CA: a node added later, or
    /// another client.
    Issue {
        /// The CA's directory (OUT/ca of `certs init`).
        #[arg(long)]
        ca: PathBuf,
        /// A new directory for the credentials.
        #[arg(long)]
        out: PathBuf,
        /// Make a node certificate for this node id.
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        node: Option<u64>,
        /// Make a client certificate with this name.
        #[arg(long)]
        client: Option<String>,
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity in days (default: 3650 for a node, 90 for a client).
        #[arg(long)]
        days: Option<u32>,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Every group: leader, term, members, applied index, size.
    List {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
    /// Hand a group's leadership to another of its voters and wait until
    /// it has taken over. Automatic balancing (each group led by its
    /// preferred voter, group number mod voters) leaves it there for ten
    /// minutes, or until that node restarts.
    TransferLeader {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        group: u32,
        /// The node to lead it.
        to: u64,
    },
}

#[derive(Subcommand)]
enum RepairCmd {
    /// Chunks short of copies and the progress of repair (exit code 3
    /// while any chunk is short of copies or a full pass runs).
    Status {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ScrubCmd {
    /// Start a scrub on every node (throttled: `scrub_mib_per_sec`).
    Start {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
    },
    /// Progress of the scrub on every node (exit code 3 while one runs).
    Status {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Initialise a new cluster from freshly started nodes.
    Init {
        /// ID=HOST:PORT for every node, comma separated.
        #[arg(long)]
        peers: String,
        /// Number of metadata Raft groups (shards); every node hosts a
        /// replica of each, and leaders spread evenly over the nodes.
        #[arg(long, default_value_t = admin::DEFAULT_GROUPS)]
        groups: u32,
        /// Copies kept of every chunk (at most the number of nodes).
        #[arg(long, default_value_t = 3)]
        replication: u32,
        /// Seconds a file's new layout may rely on what the chunk index said
        /// about its chunks; unreferenced chunks are freed about twice this
        /// after their last use (default 3600).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        commit_window_secs: u32,
        /// Initialise nodes that speak plain TCP: nothing is encrypted and
        /// clients are not authenticated (the cluster secret still keeps
        /// anyone but a node from acting as one). Without this flag `init`
        /// needs TLS (`--tls-dir`, from `musicfs certs init`).
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Every node: metadata or storage only, state, whether it answers,
    /// chunks, disk, version (exit code 2 if one does not answer).
    List {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a storage node: start `musicfs-node` with a new id first.
    Add {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        /// The new node's id.
        id: u64,
        /// The address it listens on (HOST:PORT).
        addr: String,
    },
    /// Stop placing chunks on a storage node and copy its chunks to the
    /// others; prints how many chunk records still list it. Run again to
    /// follow progress, or give --wait; when it reports 0 the node can be
    /// removed.
    Drain {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        id: u64,
        /// Wait until no chunk record lists the node, with a progress bar
        /// (at most this many seconds; exit code 3 if it is not done then).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Remove a drained storage node for good (refused while chunks still
    /// depend on it). Its id is never reused.
    Remove {
        #[arg(long, env = "MUSICFS_CLUSTER")]
        cluster: String,
        id: u64,
    },
}

fn main() {
    // Chunk buffers (1–4 MiB) are allocated and freed all the time. By
    // default glibc serves blocks that large with a fresh mmap, or trims
    // the freed ones from its heap, so the kernel faults in and clears
    // every page again: a tenth of the mount's CPU while it streams.
    // Serve them from the heap and keep freed memory for reuse (set
    // before any thread starts).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tunables; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSICFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match proto::transport::Transport::from_files(cli.tls_dir.as_deref(), cli.token_file.as_deref())
    {
        Ok(t) => {
            musicfs_client::set_transport(t);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        let denied = e.chain().any(|c| {
            matches!(
                c.downcast_ref(),
                Some(musicfs_client::ClientError::Denied(_))
            )
        });
        std::process::exit(if denied { EXIT_DENIED } else { 1 });
    }
}

/// Raw bytes to stdout (`musicfs cat ... | head` ends quietly).
fn write_out(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(data).and_then(|()| out.flush()) {
        musicfs_client::stdout_failed(&e);
    }
}

async fn scrub_cmd(cmd: ScrubCmd) -> Result<()> {
    match cmd {
        ScrubCmd::Start { cluster } => {
            let failed = admin::scrub_start(&parse_seeds(&cluster)?).await?;
            if failed.is_empty() {
                outln!("scrub started on every node; `musicfs scrub status` shows progress");
            } else {
                outln!("scrub started, but these nodes could not be asked:");
                for f in &failed {
                    outln!("  {f}");
                }
                std::process::exit(2);
            }
        }
        ScrubCmd::Status { cluster, json } => {
            let v = admin::scrub_status(&parse_seeds(&cluster)?).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "{:>4}  {:<22} {:<6} {:>7} {:>10} {:>10} {:>8} {:>10} {:>8}",
                    "NODE",
                    "ADDRESS",
                    "PHASE",
                    "LOCAL",
                    "VERIFIED",
                    "BYTES",
                    "CORRUPT",
                    "CHECKED",
                    "MISSING"
                );
                for n in &v {
                    match &n.status {
                        Some(s) => outln!(
                            "{:>4}  {:<22} {:<6} {:>6.1}% {:>10} {:>10} {:>8} {:>10} {:>8}",
                            n.node,
                            n.address,
                            s.phase,
                            s.local_progress_pct,
                            s.verified_chunks,
                            admin::human(s.verified_bytes),
                            s.corrupt,
                            s.records_checked,
                            s.missing
                        ),
                        None => outln!("{:>4}  {:<22} does not answer", n.node, n.address),
                    }
                }
            }
            if v.iter().any(|n| n.status.as_ref().is_some_and(|s| !s.done)) {
                std::process::exit(3);
            }
        }
    }
    Ok(())
}

async fn group_cmd(cmd: GroupCmd) -> Result<()> {
    match cmd {
        GroupCmd::List { cluster, json } => {
            let v = admin::cluster_status(&parse_seeds(&cluster)?).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v.groups)?);
            } else {
                admin::print_groups(&v.groups);
            }
            if v.groups.iter().any(|g| g.leader.is_none()) {
                std::process::exit(2);
            }
        }
        GroupCmd::TransferLeader { cluster, group, to } => {
            admin::transfer_leader(&parse_seeds(&cluster)?, group, to).await?;
            outln!("node {to} leads group {group}");
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct BenchReport {
    files: usize,
    creates_per_sec: f64,
    stat_p50_ms: f64,
    stat_p99_ms: f64,
    small_reads_per_sec: f64,
    big_mib: usize,
    write_mib_per_sec: f64,
    read_mib_per_sec: f64,
}

/// Bytes that differ per `seed`, so a mixed-up file shows.
fn bench_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    musicfs_client::pattern::fill(&mut out, seed, len);
    out
}

async fn bench(fs: &Fs, files: usize, big_mib: usize) -> Result<BenchReport> {
    use proto::meta::FileKind;
    let name = format!(".musicfs-bench-{:08x}", rand::random::<u32>());
    let dir = fs
        .create(
            proto::ROOT_INO,
            name.as_bytes(),
            FileKind::Directory,
            0o755,
            0,
            0,
            0,
            b"",
        )
        .await
        .context("creating the scratch directory")?;
    let res = bench_in(fs, dir.ino, files, big_mib).await;
    // Clean up whatever was made, also after a failure.
    for i in 0..files {
        let _ = fs.remove(dir.ino, format!("f{i}").as_bytes(), false).await;
    }
    let _ = fs.remove(dir.ino, b"big", false).await;
    fs.remove(proto::ROOT_INO, name.as_bytes(), true)
        .await
        .with_context(|| format!("removing /{name}"))?;
    res
}

async fn bench_in(fs: &Fs, dir: u64, files: usize, big_mib: usize) -> Result<BenchReport> {
    let secs = |t: Instant| t.elapsed().as_secs_f64().max(1e-9);
    let t = Instant::now();
    for i in 0..files {
        fs.write_at(
            dir,
            format!("f{i}").as_bytes(),
            &bench_bytes(i as u64, 4096),
            0o644,
        )
        .await
        .with_context(|| format!("writing small file {i}"))?;
    }
    let creates_per_sec = files as f64 / secs(t);
    let mut stats = Vec::with_capacity(files);
    for i in 0..files {
        let t = Instant::now();
        fs.lookup(dir, format!("f{i}").as_bytes()).await?;
        stats.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stats.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        stats
            .get(((stats.len() as f64 * p) as usize).min(stats.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let t = Instant::now();
    for i in 0..files {
        let a = fs.lookup(dir, format!("f{i}").as_bytes()).await?;
        let fh = fs.open(a.ino).await?;
        let data = fs.read(fh, 0, 8192).await;
        fs.release(fh).await?;
        if data?[..] != bench_bytes(i as u64, 4096)[..] {
            bail!("small file {i} reads back different bytes");
        }
    }
    let small_reads_per_sec = files as f64 / secs(t);
    let big = bench_bytes(u64::MAX, big_mib << 20);
    let t = Instant::now();
    let a = fs
        .write_at(dir, b"big", &big, 0o644)
        .await
        .context("writing the large file")?;
    let write_mib_per_sec = big_mib as f64 / secs(t);
    let t = Instant::now();
    let fh = fs.open(a.ino).await?;
    let mut got = Vec::with_capacity(big.len());
    let read = async {
        while got.len() < big.len() {
            let b = fs.read(fh, got.len() as u64, 4 << 20).await?;
            if b.is_empty() {
                break;
            }
            got.extend_from_slice(&b);
        }
        Ok::<_, musicfs_client::ClientError>(())
    }
    .await;
    fs.release(fh).await?;
    read?;
    let read_mib_per_sec = big_mib as f64 / secs(t);
    if got != big {
        bail!(
            "the large file reads back different bytes ({} of {} bytes)",
            got.len(),
            big.len()
        );
    }
    Ok(BenchReport {
        files,
        creates_per_sec,
        stat_p50_ms: pct(0.5),
        stat_p99_ms: pct(0.99),
        small_reads_per_sec,
        big_mib,
        write_mib_per_sec,
        read_mib_per_sec,
    })
}

fn print_df(v: &[admin::DfView]) {
    outln!(
        "{:>4}  {:<22} {:>10} {:>10} {:>10} {:>5} {:>10} {:>9}",
        "NODE",
        "ADDRESS",
        "SIZE",
        "USED",
        "FREE",
        "USE%",
        "CHUNKS",
        "IN CHUNKS"
    );
    let (mut total, mut free) = (0u64, 0u64);
    for n in v {
        if let Some(e) = &n.error {
            outln!("{:>4}  {:<22} does not answer: {e}", n.node, n.address);
            continue;
        }
        let used = n.disk_total_bytes.saturating_sub(n.disk_free_bytes);
        total += n.disk_total_bytes;
        free += n.disk_free_bytes;
        outln!(
            "{:>4}  {:<22} {:>10} {:>10} {:>10} {:>4}% {:>10} {:>9}",
            n.node,
            n.address,
            admin::human(n.disk_total_bytes),
            admin::human(used),
            admin::human(n.disk_free_bytes),
            (used * 100).checked_div(n.disk_total_bytes).unwrap_or(0),
            n.chunks,
            admin::human(n.chunk_bytes)
        );
    }
    outln!(
        "total: {} of {} free",
        admin::human(free),
        admin::human(total)
    );
}

async fn node_cmd(cmd: NodeCmd) -> Result<()> {
    use proto::meta::StorageState;
    match cmd {
        NodeCmd::List { cluster, json } => {
            let v = admin::cluster_status(&parse_seeds(&cluster)?).await?;
            let list = admin::node_list(&v);
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                admin::print_node_list(&list);
            }
            if list.iter().any(|n| !n.up && n.state != "removed") {
                std::process::exit(2);
            }
        }
        NodeCmd::Add { cluster, id, addr } => {
            parse_seeds(&addr)?;
            admin::set_storage_node(
                &parse_seeds(&cluster)?,
                id,
                &addr,
                StorageState::StorageActive,
            )
            .await?;
            outln!(
                "storage node {id} at {addr} added; new chunks are placed on it and repair uses it"
            );
        }
        NodeCmd::Drain { cluster, id, wait } => {
            let seeds = parse_seeds(&cluster)?;
            let mut left =
                admin::set_storage_node(&seeds, id, "", StorageState::StorageDraining).await?;
            if let Some(secs) = wait {
                let bar = progress::count(left, "chunk records moved");
                let start = Instant::now();
                let mut most = left;
                while left > 0 && start.elapsed() < Duration::from_secs(secs) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    // Asking again is harmless (the node is draining
                    // already) and answers with what is left.
                    left = admin::set_storage_node(&seeds, id, "", StorageState::StorageDraining)
                        .await?;
                    most = most.max(left);
                    bar.set_length(most);
                    bar.set_position(most - left);
                }
                bar.finish_and_clear();
            }
            if left == 0 {
                outln!("storage node {id} is drained: no chunk depends on it; `musicfs node remove {id}` is safe");
            } else {
                outln!("storage node {id} is draining: {left} chunk record(s) still list it");
                if wait.is_some() {
                    std::process::exit(3);
                }
            }
        }
        NodeCmd::Remove { cluster, id } => {
            admin::set_storage_node(
                &parse_seeds(&cluster)?,
                id,
                "",
                StorageState::StorageRemoved,
            )
            .await?;
            outln!("storage node {id} removed");
        }
    }
    Ok(())
}

async fn connect(cluster: &str, deadline: Duration) -> Result<std::sync::Arc<Cluster>> {
    let mut cfg = ClusterConfig::new(parse_seeds(cluster)?);
    cfg.deadline = deadline;
    Ok(Cluster::connect(cfg).await?)
}

fn certs_cmd(cmd: CertsCmd) -> Result<()> {
    use musicfs_client::certs;
    match cmd {
        CertsCmd::Init {
            out,
            nodes,
            hosts,
            days,
            client_days,
        } => {
            let made = certs::init_with(&out, nodes, &hosts, days, client_days)?;
            outln!(
                "CA            : {} (keep ca.key offline)",
                made.ca.display()
            );
            for (i, n) in made.nodes.iter().enumerate() {
                outln!(
                    "node {:<9}: {}  (tls_dir of node {})",
                    i + 1,
                    n.display(),
                    i + 1
                );
            }
            outln!(
                "client        : {}  (--tls-dir / MUSICFS_TLS_DIR; serial {}, {client_days} days)",
                made.client.display(),
                made.client_serial
            );
            outln!(
                "admin token   : {}  (admin_token_file on every node; --token-file for admin commands)",
                made.token.display()
            );
            outln!(
                "cluster secret: {}  (cluster_secret_file on every node; never on clients)",
                made.secret.display()
            );
        }
        CertsCmd::Secret { out } => {
            certs::new_secret(&out)?;
            outln!(
                "cluster secret written to {} (cluster_secret_file on every node)",
                out.display()
            );
        }
        CertsCmd::Issue {
            ca,
            out,
            node,
            client,
            hosts,
            days,
        } => {
            let (subject, default_days) = match (node, client) {
                (Some(id), _) => (certs::Subject::Node { id, hosts }, 3650),
                (None, Some(name)) => (certs::Subject::Client { name }, 90),
                (None, None) => bail!("give --node ID or --client NAME"),
            };
            let days = days.unwrap_or(default_days);
            let serial = certs::issue(&ca, &subject, &out, days)?;
            outln!(
                "credentials written to {} (serial {serial}, valid {days} days; to revoke, add the \
                 serial to every node's revoked_certs_file)",
                out.display()
            );
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Cluster {
            cmd:
                ClusterCmd::Init {
                    peers,
                    groups,
                    replication,
                    commit_window_secs,
                    insecure,
                },
        } => {
            if !musicfs_client::transport().is_tls() && !insecure {
                bail!(
                    "refusing to initialise a cluster on plain TCP: nothing would be encrypted \
                     and any client that reaches a node could read and change every file. Set \
                     up TLS (`musicfs certs init`, tls_dir on the nodes, --tls-dir here), or pass \
                     --insecure on a network only the cluster's machines and trusted clients reach"
                );
            }
            let peers = admin::parse_peers(&peers)?;
            let id = admin::init_cluster(
                &peers,
                admin::InitOptions {
                    groups,
                    replication,
                    commit_window_secs,
                },
            )
            .await?;
            outln!(
                "initialised cluster {id} with {} nodes, {groups} metadata group(s), {replication} copies of every chunk",
                peers.len()
            );
        }
        Cmd::Node { cmd } => node_cmd(cmd).await?,
        Cmd::Group { cmd } => group_cmd(cmd).await?,
        Cmd::Repair {
            cmd: RepairCmd::Status { cluster, json },
        } => {
            let v = admin::cluster_status(&parse_seeds(&cluster)?).await?;
            let r = &v.repair;
            if json {
                outln!("{}", serde_json::to_string_pretty(r)?);
            } else {
                admin::print_repair(r);
            }
            if r.under_replicated > 0 || r.scanned < r.total {
                std::process::exit(3);
            }
        }
        Cmd::Snapshot { cluster } => {
            let mut failed = false;
            for (id, addr, err) in admin::snapshot_all(&parse_seeds(&cluster)?).await? {
                match err {
                    None => outln!("node {id} ({addr}): every group snapshotted"),
                    Some(e) => {
                        failed = true;
                        outln!("node {id} ({addr}): FAILED: {e}");
                    }
                }
            }
            if failed {
                std::process::exit(2);
            }
        }
        Cmd::Df { cluster, json } => {
            let v = admin::df(&parse_seeds(&cluster)?).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_df(&v);
            }
            if v.iter().any(|n| n.error.is_some()) {
                std::process::exit(2);
            }
        }
        Cmd::Get {
            cluster,
            path,
            local,
        } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            // Written next to the target and renamed, so a failed copy never
            // leaves a truncated file under the final name.
            let tmp = local.with_extension("musicfs-partial");
            // A partial file left by an earlier run is ours to replace; a
            // symlink planted there is never followed (O_NOFOLLOW after
            // the unlink, O_EXCL for a new file).
            match std::fs::symlink_metadata(&tmp) {
                Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => {
                    std::fs::remove_file(&tmp)
                        .with_context(|| format!("removing {}", tmp.display()))?
                }
                Ok(_) => bail!("{} exists and is not a file", tmp.display()),
                Err(_) => {}
            }
            let mut out = std::io::BufWriter::new({
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o644)
                    .open(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?
            });
            let bar = progress::bytes(0);
            let copied = fs
                .read_file_to(&path, &mut out, |done, size| {
                    bar.set_length(size);
                    bar.set_position(done);
                })
                .await;
            bar.finish_and_clear();
            let done = copied.map_err(anyhow::Error::from).and_then(|n| {
                let f = out.into_inner().map_err(|e| e.into_error())?;
                f.sync_all()?;
                Ok(n)
            });
            let n = match done {
                Ok(n) => n,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.context(format!("copying {path} to {}", local.display())));
                }
            };
            std::fs::rename(&tmp, &local)
                .with_context(|| format!("renaming {} to {}", tmp.display(), local.display()))?;
            // The rename is durable once its directory is.
            let dir = match local.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
            outln!("{path} -> {}: {n} bytes", local.display());
        }
        Cmd::Bench {
            cluster,
            files,
            big_mib,
            json,
        } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            let r = bench(&fs, files, big_mib).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "{} small files: {:.0} creates/s, stat p50 {:.2} ms p99 {:.2} ms, {:.0} reads/s",
                    r.files, r.creates_per_sec, r.stat_p50_ms, r.stat_p99_ms, r.small_reads_per_sec
                );
                outln!(
                    "{} MiB file: write {:.1} MiB/s, read {:.1} MiB/s; every byte verified, all removed",
                    r.big_mib, r.write_mib_per_sec, r.read_mib_per_sec
                );
            }
        }
        Cmd::Certs { cmd } => certs_cmd(cmd)?,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            // Generated whole, then written: clap_complete panics on a
            // failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "musicfs", &mut script);
            write_out(&script);
        }
        Cmd::Scrub { cmd } => scrub_cmd(cmd).await?,
        Cmd::Gc {
            cluster,
            dry_run,
            json,
        } => {
            let r = admin::gc(&parse_seeds(&cluster)?, dry_run).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "reclaimable_chunks": r.reclaimable_chunks,
                        "reclaimable_bytes": r.reclaimable_bytes,
                        "waiting_chunks": r.waiting_chunks,
                        "waiting_bytes": r.waiting_bytes,
                        "reaped_chunks": r.reaped_chunks,
                        "deleted_files": r.deleted_files,
                        "deleted_bytes": r.deleted_bytes,
                        "settled_groups": r.settled_groups,
                        "led_groups": r.led_groups,
                        "errors": r.last_error,
                    })
                );
            } else {
                outln!(
                    "{} {} unreferenced chunk(s), {}, past the grace period{}",
                    if dry_run { "would free" } else { "freeing" },
                    r.reclaimable_chunks,
                    admin::human(r.reclaimable_bytes),
                    if dry_run { "" } else { " (now)" }
                );
                outln!(
                    "{} more unreferenced chunk(s), {}, still within it",
                    r.waiting_chunks,
                    admin::human(r.waiting_bytes)
                );
                outln!(
                    "freed so far (since the nodes started): {} record(s), {} file(s), {}",
                    r.reaped_chunks,
                    r.deleted_files,
                    admin::human(r.deleted_bytes)
                );
                if r.settled_groups < r.led_groups {
                    outln!(
                        "{} of {} group(s) have not settled yet: nothing is freed in them until every reference queued for them is applied",
                        r.led_groups - r.settled_groups,
                        r.led_groups
                    );
                }
                if !r.last_error.is_empty() {
                    outln!("errors: {}", r.last_error);
                }
            }
        }
        Cmd::Status { cluster, json } => {
            let view = admin::cluster_status(&parse_seeds(&cluster)?).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                admin::print_status(&view);
            }
            if !view.healthy {
                std::process::exit(2);
            }
        }
        Cmd::Mount {
            cluster,
            mountpoint,
            cache_mib,
            allow_other,
            deadline_secs,
            attempt_timeout_ms,
            attr_timeout_ms,
            disk_cache_dir,
            disk_cache_mib,
            read_ahead_kib,
            direct_io,
            grpc_chunks,
            metrics_listen,
            views,
        } => {
            check_mountpoint(&mountpoint)?;
            let views = views.build()?;
            if let Some(addr) = metrics_listen {
                musicfs_client::metrics::serve(addr).map_err(anyhow::Error::msg)?;
            }
            if attempt_timeout_ms == 0 {
                bail!("--attempt-timeout-ms must be above 0");
            }
            let mut cfg = ClusterConfig::new(parse_seeds(&cluster)?);
            cfg.deadline = Duration::from_secs(deadline_secs);
            cfg.attempt_timeout = Duration::from_millis(attempt_timeout_ms);
            cfg.direct_chunks = !grpc_chunks;
            let c = Cluster::connect(cfg)
                .await
                .with_context(|| format!("cannot reach the cluster at {cluster}"))?;
            let opts = admin::MountOptions {
                cache_bytes: cache_mib << 20,
                allow_other,
                views,
                attr_timeout: Duration::from_millis(attr_timeout_ms),
                disk_cache: disk_cache_dir.map(|d| (d, disk_cache_mib << 20)),
                read_ahead_kib,
                direct_io,
            };
            eprintln!(
                "mounted MusicFS at {} (Ctrl-C to unmount)",
                mountpoint.display()
            );
            admin::mount_until_signal(c, &mountpoint, opts).await?;
        }
        Cmd::Dev { dir, base_port } => dev(&dir, base_port).await?,
        Cmd::Ls {
            cluster,
            path,
            json,
        } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            let dir = fs.resolve(&path).await?;
            let mut after = Vec::new();
            loop {
                let (entries, more) = fs.readdir(dir.ino, &after, 1024, true).await?;
                for e in &entries {
                    let a = e.attr.unwrap_or_default();
                    if json {
                        outln!(
                            "{}",
                            serde_json::json!({
                                "name": String::from_utf8_lossy(&e.name),
                                "ino": a.ino,
                                "kind": proto::meta::FileKind::try_from(a.kind)
                                    .map(|k| k.as_str_name())
                                    .unwrap_or("UNKNOWN"),
                                "perm": a.perm,
                                "uid": a.uid,
                                "gid": a.gid,
                                "size": a.size,
                                "nlink": a.nlink,
                                "mtime_ms": a.mtime.map(|t| t.as_millis()).unwrap_or(0),
                            })
                        );
                        continue;
                    }
                    outln!(
                        "{:o} {:>5} {:>5} {:>12} {}",
                        a.perm,
                        a.uid,
                        a.gid,
                        a.size,
                        String::from_utf8_lossy(&e.name)
                    );
                }
                match entries.last() {
                    Some(l) if more => after = l.name.to_vec(),
                    _ => break,
                }
            }
        }
        Cmd::Put {
            cluster,
            local,
            path,
        } => {
            let mut f = std::fs::File::open(&local)
                .with_context(|| format!("opening {}", local.display()))?;
            let size = f.metadata()?.len();
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            let bar = progress::bytes(size);
            let a = fs
                .write_file_from(&path, &mut f, 0o644, |done| bar.set_position(done))
                .await;
            bar.finish_and_clear();
            let a = a?;
            outln!("{path}: {} bytes (inode {})", a.size, a.ino);
        }
        Cmd::Import(a) => return import(a, false).await,
        Cmd::Sync(a) => return import(a, true).await,
        Cmd::Tags {
            cluster,
            path,
            json,
        } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 1 << 20);
            let a = fs.resolve(&path).await?;
            let Some(t) = fs.get_tags(a.ino).await? else {
                eprintln!("{path}: no tags stored (import or sync it from a local library)");
                std::process::exit(1);
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&tags_json(a.ino, &t))?);
            } else {
                for (k, v) in tags_json(a.ino, &t).as_object().into_iter().flatten() {
                    if !(v.is_null() || v == "" || v == 0) {
                        outln!(
                            "{k:<18} {}",
                            v.as_str().map(str::to_string).unwrap_or(v.to_string())
                        );
                    }
                }
            }
        }
        Cmd::Tag(TagCmd::Set {
            cluster,
            path,
            sets,
            json,
        }) => {
            let sets = musicfs_client::tags::parse_sets(&sets).map_err(anyhow::Error::msg)?;
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            let (tags, sent) = fs.tag_set(&path, &sets).await?;
            let mut out = tags_json(fs.resolve(&path).await?.ino, &tags);
            out["bytes_sent"] = sent.into();
            if json {
                outln!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                outln!(
                    "{path}: tags written; {} of new chunk data sent",
                    indicatif::HumanBytes(sent)
                );
            }
        }
        Cmd::Watch {
            cluster,
            cursor,
            follow,
            interval_ms,
            from_now,
            json,
        } => watch(&cluster, &cursor, follow, interval_ms, from_now, json).await?,
        Cmd::Tag(TagCmd::Reindex { cluster }) => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 1 << 20);
            fs.reindex_tags().await?;
            outln!("the tag index of every group is complete");
        }
        Cmd::Search {
            cluster,
            query,
            limit,
            json,
        } => {
            let terms = proto::tags::parse_query(&query.join(" "))?;
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 1 << 20);
            let hits = fs.search(&terms, limit).await?;
            for h in &hits {
                let t = h.tags.clone().unwrap_or_default();
                if json {
                    outln!("{}", serde_json::to_string(&tags_json(h.ino, &t))?);
                } else {
                    outln!(
                        "{} | {} | {} | {} {} | {}",
                        t.path,
                        if t.album_artist.is_empty() {
                            &t.artist
                        } else {
                            &t.album_artist
                        },
                        t.album,
                        t.track,
                        t.title,
                        t.year
                    );
                }
            }
            if hits.is_empty() {
                std::process::exit(1);
            }
        }
        Cmd::Cat { cluster, path } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            let data = fs.read_file(&path).await?;
            write_out(&data);
        }
        Cmd::Rm { cluster, path } => {
            let fs = Fs::new(connect(&cluster, Duration::from_secs(30)).await?, 64 << 20);
            fs.remove_path(&path).await?;
        }
    }
    Ok(())
}

/// `musicfs watch`: prints changes past the cursor, saving the cursor
/// after each batch is written out.
async fn watch(
    cluster: &str,
    path: &std::path::Path,
    follow: bool,
    interval_ms: u64,
    from_now: bool,
    json: bool,
) -> Result<()> {
    use musicfs_client::watch::{Cursor, Watcher};
    let fs = Fs::new(connect(cluster, Duration::from_secs(30)).await?, 1 << 20);
    let mut w = Watcher::new(&fs);
    let mut cursor = match Cursor::load(path)? {
        Some(c) => c,
        None if from_now => w.cursor_now().await?,
        None => Cursor::default(),
    };
    cursor.save(path)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut every = tokio::time::interval(Duration::from_millis(interval_ms.max(50)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: the feed is read at once, then every interval.
    every.tick().await;
    loop {
        let mut lines = Vec::new();
        w.poll(&mut cursor, &mut |c| {
            lines.push(if json {
                serde_json::to_string(&c).unwrap_or_default()
            } else {
                format!("{:<9} {}", c.kind, c.path)
            })
        })
        .await?;
        if !lines.is_empty() {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            write_out(text.as_bytes());
            // Only what reached stdout counts as reported.
            cursor.save(path)?;
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = every.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

/// `import` and `sync`: exit 0 when everything was copied, 1 when some
/// paths failed (listed), after copying the rest.
async fn import(a: CopyArgs, delete: bool) -> Result<()> {
    use musicfs_client::sync::{sync, SyncOptions};
    let fs = Fs::new(
        connect(&a.cluster, Duration::from_secs(60)).await?,
        256 << 20,
    );
    let bar = progress::import();
    let opts = SyncOptions {
        delete,
        jobs: a.jobs,
    };
    let report = sync(&fs, &a.src, &a.dest, &opts, &|r| {
        bar.set_length(r.bytes.max(1));
        bar.set_position(r.bytes_copied + r.bytes_unchanged);
        bar.set_message(format!(
            "{} files ({} copied, {} unchanged), {} sent",
            r.files,
            r.files_copied,
            r.files_unchanged,
            indicatif::HumanBytes(r.bytes_sent)
        ));
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    // Failures first, on stderr: a closed stdout ends the command at the
    // summary.
    if !a.json {
        for e in &report.errors {
            eprintln!("failed: {e}");
        }
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "{} files, {}: {} copied ({}), {} unchanged; {} of new chunk data sent; \
             {} directories and {} symlinks created, {} entries removed",
            report.files,
            indicatif::HumanBytes(report.bytes),
            report.files_copied,
            indicatif::HumanBytes(report.bytes_copied),
            report.files_unchanged,
            indicatif::HumanBytes(report.bytes_sent),
            report.dirs_created,
            report.symlinks_created,
            report.removed
        );
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// A track's tags as JSON, with its inode.
fn tags_json(ino: u64, t: &proto::meta::Tags) -> serde_json::Value {
    serde_json::json!({
        "ino": ino,
        "path": t.path,
        "artist": t.artist,
        "albumartist": t.album_artist,
        "album": t.album,
        "title": t.title,
        "track": t.track,
        "tracktotal": t.track_total,
        "disc": t.disc,
        "disctotal": t.disc_total,
        "date": t.date,
        "year": t.year,
        "genre": t.genre,
        "duration_ms": t.duration_ms,
        "codec": t.codec,
        "bitrate_kbps": t.bitrate_kbps,
        "samplerate": t.sample_rate,
        "channels": t.channels,
        "mb_trackid": t.mb_track_id,
        "mb_albumid": t.mb_album_id,
        "mb_artistid": t.mb_artist_id,
        "mb_albumartistid": t.mb_album_artist_id,
    })
}

fn check_mountpoint(p: &Path) -> Result<()> {
    let md = std::fs::metadata(p).with_context(|| format!("mount point {}", p.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", p.display());
    }
    Ok(())
}

/// `n` distinct free ports: the listeners stay open until all are chosen,
/// so the kernel cannot hand the same port out twice.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Stops the dev nodes when dropped, whatever way `dev` returns.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM first so nodes shut down cleanly; then reap.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn dev(dir: &Path, base_port: u16) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let node_bin = std::env::current_exe()?
        .parent()
        .map(|p| p.join("musicfs-node"))
        .filter(|p| p.exists())
        .context("musicfs-node must be installed next to musicfs")?;
    // Reuse the ports of an earlier run so its data directories still match.
    let ports_file = dir.join("ports");
    let ports: Vec<u16> = match std::fs::read_to_string(&ports_file) {
        Ok(s) => s
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    let ports = if ports.len() == 3 {
        ports
    } else if base_port != 0 {
        vec![base_port, base_port + 1, base_port + 2]
    } else {
        free_ports(3)?
    };
    std::fs::write(
        &ports_file,
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    )?;
    // The nodes' shared secret, made once and kept with their data.
    let secret = dir.join("cluster-secret");
    if !secret.exists() {
        musicfs_client::certs::new_secret(&secret)?;
    }
    let mut nodes = Nodes(Vec::new());
    let mut peers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let addr = format!("127.0.0.1:{port}");
        let data = dir.join(format!("node{id}"));
        let log = std::fs::File::create(dir.join(format!("node{id}.log")))?;
        let child = Command::new(&node_bin)
            .args(["--id", &id.to_string(), "--listen", &addr, "--data"])
            .arg(&data)
            .arg("--cluster-secret-file")
            .arg(&secret)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", node_bin.display()))?;
        nodes.0.push(child);
        peers.push(format!("{id}={addr}"));
    }
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // Wait for the nodes to listen.
    let start = Instant::now();
    let mut statuses = Vec::new();
    for s in &seeds {
        loop {
            match admin::node_status(s).await {
                Ok(st) => {
                    statuses.push(st);
                    break;
                }
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    bail!(
                        "node at {s} did not start: {e} (see {}/node*.log)",
                        dir.display()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    if statuses.iter().all(|s| s.cluster_id.is_empty()) {
        let peers = admin::parse_peers(&peers.join(","))?;
        let id = admin::init_cluster(&peers, admin::InitOptions::default()).await?;
        eprintln!("initialised cluster {id}");
    }
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let cluster = connect(&seeds.join(","), Duration::from_secs(30)).await?;
    // Unlike other commands, a closed stdout does not end this one: the
    // cluster and the mount are what it is for, and ending it here would
    // leave the nodes it started running.
    let _ = write!(
        std::io::stdout(),
        "MusicFS dev cluster is up.\n  mount point : {mnt}\n  nodes       : {nodes}\n  \
         logs        : {dir}/node{{1,2,3}}.log\nTry:  cp -r ~/Music/* {mnt}/   or   ls -l {mnt}\n      \
         musicfs status --cluster {seeds}\nPress Ctrl-C to unmount and stop the nodes.\n",
        mnt = mnt.display(),
        nodes = seeds.join(", "),
        dir = dir.display(),
        seeds = seeds.join(","),
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let views = Some(musicfs_client::views::Views::defaults(".views"));
    let opts = admin::MountOptions {
        allow_other: root,
        views,
        ..Default::default()
    };
    let res = admin::mount_until_signal(cluster, &mnt, opts).await;
    drop(nodes);
    res?;
    Ok(())
}
