//! chaos-tests: runs real MusicFS nodes in network namespaces, injects
//! partitions, crashes, pauses, full disks, packet loss and slow links
//! while clients work, and checks the recorded history for
//! linearizability, data integrity, invariants and recovery.

mod cluster;
mod lin;
mod model;
mod net;
mod proxy;
mod run;
mod scenario;
mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chaos-tests",
    about = "Fault injection against real MusicFS nodes, with a linearizability checker"
)]
struct Args {
    /// Directory of the musicfs-node and musicfs binaries (default: this
    /// program's own).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Where runs keep their node data, logs and reports.
    #[arg(long, global = true, default_value = "/tmp/musicfs-chaos")]
    out: PathBuf,
    /// In-process clients.
    #[arg(long, global = true, default_value_t = 4)]
    clients: usize,
    /// Leave out the client that works through a FUSE mount.
    #[arg(long, global = true)]
    no_fuse: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the scenarios.
    List,
    /// Runs one scenario (replays it exactly with the seed it printed).
    Run {
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds of faults.
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// Checks a recorded history again (a run's history.json).
    Check { history: PathBuf },
    /// Runs the short set (what CI runs): every scenario marked short.
    Short {
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 16)]
        secs: u64,
    },
    /// Runs scenarios one after another, new seeds each time, for as long
    /// as asked; stops at the first failure.
    Soak {
        /// Total seconds to keep going.
        #[arg(long)]
        duration: u64,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

fn default_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        % 1_000_000_007
}

async fn one(args: &Args, bin: &Path, name: &str, seed: u64, secs: u64) -> Result<run::Report> {
    let sc = scenario::find(name)
        .with_context(|| format!("no scenario {name:?} (see `chaos-tests list`)"))?;
    eprintln!("== {} (seed {seed}, {secs} s): {}", sc.name, sc.about);
    let opts = run::Options {
        scenario: sc,
        seed,
        secs,
        clients: args.clients,
        fuse: !args.no_fuse,
        out: args.out.clone(),
        bin: bin.to_path_buf(),
    };
    let report = run::run(&opts)
        .await
        .with_context(|| format!("scenario {name} (seed {seed})"))?;
    println!("{}", run::summary(&report));
    Ok(report)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    if !matches!(args.cmd, Cmd::List | Cmd::Check { .. }) {
        for b in ["musicfs-node", "musicfs"] {
            if !bin.join(b).exists() {
                bail!(
                    "{} not found: build the workspace or pass --bin-dir",
                    bin.join(b).display()
                );
            }
        }
        net::available()?;
    }
    match &args.cmd {
        Cmd::List => {
            for s in scenario::SCENARIOS {
                println!(
                    "{:<20} {}{}",
                    s.name,
                    if s.short { "[short] " } else { "" },
                    s.about
                );
            }
            Ok(())
        }
        Cmd::Check { history } => {
            let records: Vec<workload::Record> = serde_json::from_slice(
                &std::fs::read(history).with_context(|| format!("read {}", history.display()))?,
            )?;
            let mut ok = true;
            for c in run::check_history(&records, &workload::Shape::default()) {
                ok &= c.ok;
                println!(
                    "{}: {} over {} operations{}",
                    c.partition,
                    c.verdict,
                    c.operations,
                    c.detail.map(|d| format!(": {d}")).unwrap_or_default()
                );
            }
            if !ok {
                bail!("the history is not linearizable");
            }
            Ok(())
        }
        Cmd::Run {
            scenario,
            seed,
            secs,
        } => {
            let seed = seed.unwrap_or_else(default_seed);
            let r = one(&args, &bin, scenario, seed, *secs).await?;
            if !r.passed {
                bail!(
                    "scenario {scenario} failed (seed {seed}); report in {}",
                    args.out.display()
                );
            }
            Ok(())
        }
        Cmd::Short { seed, secs } => {
            let seed = seed.unwrap_or_else(default_seed);
            let start = Instant::now();
            eprintln!("short set, seed {seed}");
            let mut failed = Vec::new();
            let mut reports = Vec::new();
            for s in scenario::SCENARIOS.iter().filter(|s| s.short) {
                match one(&args, &bin, s.name, seed, *secs).await {
                    Ok(r) => {
                        if !r.passed {
                            failed.push(s.name.to_string());
                        }
                        reports.push(r);
                    }
                    Err(e) => {
                        eprintln!("{e:#}");
                        failed.push(format!("{} (error: {e:#})", s.name));
                    }
                }
            }
            std::fs::write(
                args.out.join("short.json"),
                serde_json::to_vec_pretty(&reports)?,
            )?;
            if !failed.is_empty() {
                bail!(
                    "short set failed after {:.0} s: {}",
                    start.elapsed().as_secs_f64(),
                    failed.join(", ")
                );
            }
            println!(
                "short set passed ({} scenarios, seed {seed}) in {:.0} s",
                reports.len(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Soak {
            duration,
            seed,
            secs,
        } => {
            let mut seed = seed.unwrap_or_else(default_seed);
            let start = Instant::now();
            let names: Vec<&str> = scenario::SCENARIOS
                .iter()
                .filter(|s| s.broken.is_none())
                .map(|s| s.name)
                .collect();
            let mut k = 0;
            while start.elapsed() < Duration::from_secs(*duration) {
                let name = names[k % names.len()];
                let r = one(&args, &bin, name, seed, *secs).await?;
                if !r.passed {
                    bail!("soak stopped: {name} failed (seed {seed})");
                }
                k += 1;
                seed = seed.wrapping_add(1);
            }
            println!("soak passed: {k} runs in {:?}", start.elapsed());
            Ok(())
        }
    }
}
