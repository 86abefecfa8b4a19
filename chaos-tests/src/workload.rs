//! The workload: clients that create, write, read, rename, unlink, mkdir
//! and list, one operation at a time each, recording every operation's
//! call time, return time and outcome. In-process clients use the client
//! core; one client works through a FUSE mount.

use std::collections::HashMap;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use musicfs_client::{ClientError, Fs};
use proto::meta::query::Q;
use proto::meta::{ErrorCode, FileKind, LookupQuery, ReadDirQuery};
use proto::{group_of_ino, ROOT_INO};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{content, identify, Input, Output};

/// The shape of the workload's file tree.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    /// Directories the in-process clients share.
    pub dirs: u8,
    /// Directories only the FUSE client uses (after the shared ones).
    pub fuse_dirs: u8,
    /// Entry names per directory.
    pub names: u8,
    /// Data files, each rewritten whole.
    pub files: u8,
    /// Bytes of every data file.
    pub file_len: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            dirs: 3,
            fuse_dirs: 2,
            names: 4,
            files: 3,
            file_len: 24 * 1024,
        }
    }
}

pub fn dir_name(d: u8) -> String {
    format!("ns{d}")
}

pub fn entry_name(n: u8) -> String {
    format!("e{n}")
}

pub fn file_name(f: u8) -> String {
    format!("f{f}")
}

/// One operation of the history.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Record {
    pub id: usize,
    pub client: String,
    /// Nanoseconds since the run began.
    pub call: u64,
    /// `None`: no definite outcome (timed out, or the node failed).
    pub ret: Option<u64>,
    #[serde(flatten)]
    pub input: Input,
    pub output: Option<Output>,
    /// Why the outcome is unknown, or why a read failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A read that failed: it changed nothing and is not checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    /// Which node answered each metadata call of the operation, as
    /// (group, node) (client-core clients only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<(u32, u64)>,
}

/// The shared history and the run's clock.
pub struct History {
    pub start: Instant,
    pub records: Mutex<Vec<Record>>,
}

impl History {
    pub fn new() -> Arc<History> {
        Arc::new(History {
            start: Instant::now(),
            records: Mutex::new(Vec::new()),
        })
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn push(
        &self,
        client: &str,
        call: u64,
        input: Input,
        outcome: Outcome,
        answers: Vec<(u32, u64)>,
    ) {
        let ret = self.now();
        let mut v = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let id = v.len();
        let (ret, output, error, failed) = match outcome {
            Outcome::Done(o) => (Some(ret), Some(o), None, false),
            Outcome::Unknown(e) => (None, None, Some(e), false),
            Outcome::Failed(e) => (Some(ret), None, Some(e), true),
        };
        v.push(Record {
            id,
            client: client.to_string(),
            call,
            ret,
            input,
            output,
            error,
            failed,
            answers,
        });
    }

    pub fn snapshot(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub enum Outcome {
    Done(Output),
    /// May or may not have taken effect.
    Unknown(String),
    /// Certainly took no effect (a read, or a write that never started).
    Failed(String),
}

/// Inodes of the workload's fixed directories and data files.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub dirs: Vec<u64>,
    pub data_dir: u64,
    pub files: Vec<u64>,
}

/// Creates the fixed tree: the directories and the data files, each
/// holding the content of tag 0.
pub async fn setup(fs: &Fs, shape: &Shape) -> Result<Tree> {
    let mut tree = Tree::default();
    for d in 0..shape.dirs + shape.fuse_dirs {
        let a = fs
            .create(
                ROOT_INO,
                dir_name(d).as_bytes(),
                FileKind::Directory,
                0o755,
                0,
                0,
                0,
                b"",
            )
            .await
            .with_context(|| format!("mkdir /{}", dir_name(d)))?;
        tree.dirs.push(a.ino);
    }
    let data = fs
        .create(ROOT_INO, b"data", FileKind::Directory, 0o755, 0, 0, 0, b"")
        .await
        .context("mkdir /data")?;
    tree.data_dir = data.ino;
    for f in 0..shape.files {
        let a = fs
            .write_at(
                data.ino,
                file_name(f).as_bytes(),
                &content(f, 0, shape.file_len),
                0o644,
            )
            .await
            .with_context(|| format!("write /data/{}", file_name(f)))?;
        tree.files.push(a.ino);
    }
    Ok(tree)
}

/// Picks the next operation of a client.
pub fn pick(
    rng: &mut StdRng,
    shape: &Shape,
    dirs: std::ops::Range<u8>,
    reads_only: bool,
    tag: &mut u64,
) -> Input {
    let d = rng.random_range(dirs.clone());
    let n = rng.random_range(0..shape.names);
    let f = rng.random_range(0..shape.files);
    if reads_only {
        return Input::Read { f };
    }
    match rng.random_range(0..100) {
        0..=17 => Input::Create { d, n },
        18..=25 => Input::Mkdir { d, n },
        26..=33 => Input::Unlink { d, n },
        34..=38 => Input::Rmdir { d, n },
        39..=50 => Input::Rename {
            d,
            n,
            d2: rng.random_range(dirs),
            n2: rng.random_range(0..shape.names),
        },
        51..=60 => Input::Lookup { d, n },
        61..=66 => Input::Readdir { d },
        67..=82 => {
            *tag += 1;
            Input::Write { f, tag: *tag }
        }
        _ => Input::Read { f },
    }
}

/// The outcome of a failed operation: the errors the model knows are
/// definite answers; any other leaves a mutation's effect unknown, and a
/// read simply failed.
fn outcome_of(errno: Option<i32>, why: String, mutates: bool) -> Outcome {
    let definite = match errno {
        Some(libc::ENOENT) => Some(Output::NotFound),
        Some(libc::EEXIST) => Some(Output::Exists),
        Some(libc::ENOTDIR) => Some(Output::NotDir),
        Some(libc::EISDIR) => Some(Output::IsDir),
        Some(libc::ENOTEMPTY) => Some(Output::NotEmpty),
        _ => None,
    };
    match definite {
        Some(o) => Outcome::Done(o),
        None if mutates => Outcome::Unknown(why),
        None => Outcome::Failed(why),
    }
}

fn classify(e: &ClientError, mutates: bool) -> Outcome {
    // Only the cluster's own answers are definite; the client's transient
    // errors map to EIO, never to one of the above.
    outcome_of(e.code().map(|_| e.errno()), e.to_string(), mutates)
}

/// Runs `input` through the client core.
pub async fn exec_core(fs: &Fs, tree: &Tree, shape: &Shape, input: &Input) -> Outcome {
    let name = |n: u8| entry_name(n).into_bytes();
    let m = input.mutates();
    if let Input::Write { f, tag } = *input {
        return write_core(fs, tree.files[f as usize], &content(f, tag, shape.file_len)).await;
    }
    let res: Result<Output, ClientError> = async {
        Ok(match *input {
            Input::Create { d, n } | Input::Mkdir { d, n } => {
                let kind = if matches!(input, Input::Mkdir { .. }) {
                    FileKind::Directory
                } else {
                    FileKind::Regular
                };
                let a = fs
                    .create(tree.dirs[d as usize], &name(n), kind, 0o755, 0, 0, 0, b"")
                    .await?;
                Output::Created { ino: a.ino }
            }
            Input::Unlink { d, n } | Input::Rmdir { d, n } => {
                let dir = matches!(input, Input::Rmdir { .. });
                fs.remove(tree.dirs[d as usize], &name(n), dir).await?;
                Output::Done
            }
            Input::Rename { d, n, d2, n2 } => {
                fs.rename(
                    tree.dirs[d as usize],
                    &name(n),
                    tree.dirs[d2 as usize],
                    &name(n2),
                    Default::default(),
                )
                .await?;
                Output::Done
            }
            Input::Lookup { d, n } => {
                // One query, so the answer is one moment's.
                let parent = tree.dirs[d as usize];
                let r = fs
                    .cluster()
                    .query(
                        group_of_ino(parent),
                        Q::Lookup(LookupQuery {
                            parent,
                            name: Bytes::from(name(n)),
                        }),
                    )
                    .await?;
                match (r.attr, r.entry) {
                    (Some(a), _) => Output::Found {
                        dir: a.kind == FileKind::Directory as i32,
                        ino: a.ino,
                    },
                    (None, Some(e)) => Output::Found {
                        dir: e.kind == FileKind::Directory as i32,
                        ino: e.ino,
                    },
                    (None, None) => {
                        return Err(ClientError::server(ErrorCode::Internal, "empty lookup"))
                    }
                }
            }
            Input::Readdir { d } => {
                let ino = tree.dirs[d as usize];
                let r = fs
                    .cluster()
                    .query(
                        group_of_ino(ino),
                        Q::ReadDir(ReadDirQuery {
                            ino,
                            after: Bytes::new(),
                            limit: 1000,
                            plus: false,
                        }),
                    )
                    .await?;
                listing(r.entries.iter().map(|e| {
                    (
                        String::from_utf8_lossy(&e.name).into_owned(),
                        e.kind == FileKind::Directory as i32,
                        e.ino,
                    )
                }))
            }
            Input::Write { .. } => unreachable!("handled above"),
            Input::Read { f } => {
                let fh = fs.open(tree.files[f as usize]).await?;
                let mut out = Vec::new();
                let res = async {
                    loop {
                        let b = fs.read(fh, out.len() as u64, 1 << 20).await?;
                        if b.is_empty() {
                            return Ok::<(), ClientError>(());
                        }
                        out.extend_from_slice(&b);
                    }
                }
                .await;
                let _ = fs.release(fh).await;
                res?;
                identify(f, &out, shape.file_len)
            }
        })
    }
    .await;
    match res {
        Ok(o) => Outcome::Done(o),
        Err(e) => classify(&e, m),
    }
}

/// Overwrites a data file whole: open, write, flush (the layout commit).
async fn write_core(fs: &Fs, ino: u64, data: &[u8]) -> Outcome {
    let fh = match fs.open(ino).await {
        Ok(fh) => fh,
        // Nothing was written: no effect.
        Err(e) => return Outcome::Failed(format!("open: {e}")),
    };
    let res = async {
        fs.write(fh, 0, data).await?;
        fs.flush(fh).await
    }
    .await;
    let rel = fs.release(fh).await;
    match res.and(rel) {
        Ok(()) => Outcome::Done(Output::Done),
        Err(e) => Outcome::Unknown(e.to_string()),
    }
}

/// Sorted `(name index, is dir, ino)` of entries named like the
/// workload's; anything else listed is reported as corrupt.
fn listing(entries: impl Iterator<Item = (String, bool, u64)>) -> Output {
    let mut out = Vec::new();
    for (name, dir, ino) in entries {
        if name == "." || name == ".." {
            continue;
        }
        match name.strip_prefix('e').and_then(|n| n.parse::<u8>().ok()) {
            Some(n) => out.push((n, dir, ino)),
            None => {
                return Output::Corrupt {
                    why: format!("unexpected entry {name:?}"),
                }
            }
        }
    }
    out.sort();
    Output::Listing { entries: out }
}

/// Runs `input` through the FUSE mount at `root` (blocking).
pub fn exec_fuse(root: &Path, shape: &Shape, input: &Input) -> Outcome {
    let p = |d: u8, n: u8| root.join(dir_name(d)).join(entry_name(n));
    let data = |f: u8| root.join("data").join(file_name(f));
    let m = input.mutates();
    let res: std::io::Result<Output> = (|| {
        Ok(match *input {
            Input::Create { d, n } => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p(d, n))?;
                Output::Created {
                    ino: f.metadata().map(|m| m.ino()).unwrap_or(0),
                }
            }
            Input::Mkdir { d, n } => {
                std::fs::create_dir(p(d, n))?;
                Output::Created {
                    ino: std::fs::symlink_metadata(p(d, n))
                        .map(|m| m.ino())
                        .unwrap_or(0),
                }
            }
            Input::Unlink { d, n } => {
                std::fs::remove_file(p(d, n))?;
                Output::Done
            }
            Input::Rmdir { d, n } => {
                std::fs::remove_dir(p(d, n))?;
                Output::Done
            }
            Input::Rename { d, n, d2, n2 } => {
                std::fs::rename(p(d, n), p(d2, n2))?;
                Output::Done
            }
            Input::Lookup { d, n } => {
                let md = std::fs::symlink_metadata(p(d, n))?;
                Output::Found {
                    dir: md.is_dir(),
                    ino: md.ino(),
                }
            }
            Input::Readdir { d } => {
                let mut v = Vec::new();
                for e in std::fs::read_dir(root.join(dir_name(d)))? {
                    let e = e?;
                    v.push((
                        e.file_name().to_string_lossy().into_owned(),
                        e.file_type()?.is_dir(),
                        e.ino(),
                    ));
                }
                listing(v.into_iter())
            }
            Input::Write { f, tag } => {
                let file = match std::fs::OpenOptions::new().write(true).open(data(f)) {
                    Ok(file) => file,
                    Err(e) => return Err(std::io::Error::other(format!("open: {e}"))),
                };
                file.write_all_at(&content(f, tag, shape.file_len), 0)?;
                // fsync commits the layout and reports whether it did.
                file.sync_all()?;
                Output::Done
            }
            Input::Read { f } => {
                let bytes = std::fs::read(data(f))?;
                identify(f, &bytes, shape.file_len)
            }
        })
    })();
    match res {
        Ok(o) => Outcome::Done(o),
        Err(e) if matches!(input, Input::Write { .. }) && e.to_string().starts_with("open:") => {
            Outcome::Failed(e.to_string())
        }
        Err(e) => outcome_of(e.raw_os_error(), e.to_string(), m),
    }
}

/// Where a client sends its operations.
#[derive(Clone)]
pub enum Via {
    Core(Arc<Fs>, Tree),
    Fuse(PathBuf),
}

/// Runs one client until `stop`; returns the number of operations issued.
/// A `reads_only` client reads the data files and nothing else.
#[allow(clippy::too_many_arguments)]
pub async fn client_loop(
    name: String,
    via: Via,
    shape: Shape,
    dirs: std::ops::Range<u8>,
    reads_only: bool,
    seed: u64,
    tag_base: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tag = tag_base;
    let mut count = 0;
    while !stop.load(Ordering::Relaxed) {
        let input = pick(&mut rng, &shape, dirs.clone(), reads_only, &mut tag);
        let call = history.now();
        let (outcome, answers) = match &via {
            Via::Core(fs, tree) => {
                let o = exec_core(fs, tree, &shape, &input).await;
                (o, fs.cluster().take_answers())
            }
            Via::Fuse(root) => {
                let (root, i) = (root.clone(), input.clone());
                let o = tokio::task::spawn_blocking(move || exec_fuse(&root, &shape, &i))
                    .await
                    .unwrap_or_else(|e| Outcome::Unknown(format!("worker panicked: {e}")));
                (o, Vec::new())
            }
        };
        history.push(&name, call, input, outcome, answers);
        count += 1;
        // A little think time keeps the two cores from saturating, so
        // timings stay those of the faults, not of the machine.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
    }
    count
}

/// Reads the whole state once (every directory and data file) and
/// records the reads, so lost acknowledged writes show up as violations.
pub async fn final_reads(
    fs: &Fs,
    tree: &Tree,
    shape: &Shape,
    history: &History,
    dirs: u8,
) -> Result<()> {
    let mut inputs: Vec<Input> = (0..dirs).map(|d| Input::Readdir { d }).collect();
    inputs.extend((0..shape.files).map(|f| Input::Read { f }));
    let mut failures = HashMap::new();
    for input in inputs {
        let call = history.now();
        let outcome = exec_core(fs, tree, shape, &input).await;
        if let Outcome::Failed(e) = &outcome {
            failures.insert(format!("{input:?}"), e.clone());
        }
        let answers = fs.cluster().take_answers();
        history.push("final", call, input, outcome, answers);
    }
    if !failures.is_empty() {
        anyhow::bail!("final reads failed after the cluster healed: {failures:?}");
    }
    Ok(())
}
