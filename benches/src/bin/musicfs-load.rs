//! Metadata load generator for big-library benchmarks (docs/BENCHMARKS.md):
//! creates a library shaped like a music collection (artist/album/track)
//! through the client core's bulk path, and measures lookup latency in it.
//!
//! `musicfs-load create --cluster ADDRS --files N` creates N empty tracks in
//! albums of `--tracks` tracks, artists of `--albums` albums, with
//! `--parallel` chunks of 64 artists in flight; prints progress and a JSON
//! summary.
//! `musicfs-load stat --cluster ADDRS --files N --samples K` looks up K
//! random tracks of that library (one linearizable lookup each, the album
//! directory known) and prints latency percentiles.
//! With `create --tags`, every track also gets tags (artist, album,
//! title, genre, year, track number) through the bulk tag path;
//! `musicfs-load search` then times beets-style searches over them and
//! `musicfs-load views` times listings of the tag views (the client core's
//! view code, as a mount runs it, without FUSE).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt};
use musicfs_client::fs::NewEntry;
use musicfs_client::{parse_seeds, Cluster, ClusterConfig, Fs};
use proto::meta::{ErrorCode, FileKind, Tags};
use proto::ROOT_INO;

#[derive(Parser)]
#[command(name = "musicfs-load", about = "MusicFS metadata load generator")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// Cluster addresses, HOST:PORT[,HOST:PORT...].
    #[arg(long)]
    cluster: String,
    /// Total tracks in the library.
    #[arg(long)]
    files: u64,
    /// Tracks per album.
    #[arg(long, default_value_t = 12)]
    tracks: u64,
    /// Albums per artist.
    #[arg(long, default_value_t = 8)]
    albums: u64,
    /// Top directory of the library.
    #[arg(long, default_value = "library")]
    top: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the library.
    Create {
        #[command(flatten)]
        shape: Shape,
        /// Chunks of 64 artists in flight at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// Also store tags for every track.
        #[arg(long)]
        tags: bool,
    },
    /// Time searches over the tags (`create --tags` first).
    Search {
        #[command(flatten)]
        shape: Shape,
        /// Runs of each query (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Time listings of the default tag views (`create --tags` first).
    Views {
        #[command(flatten)]
        shape: Shape,
    },
    /// Measure lookup latency of random tracks.
    Stat {
        #[command(flatten)]
        shape: Shape,
        #[arg(long, default_value_t = 10_000)]
        samples: u64,
    },
}

fn names(shape: &Shape, album: u64) -> (String, String) {
    let artist = album / shape.albums;
    (
        format!("Artist {artist:06}"),
        format!("Album {:03}", album % shape.albums),
    )
}

const GENRES: [&str; 20] = [
    "Rock",
    "Pop",
    "Jazz",
    "Classical",
    "Electronic",
    "Hip-Hop",
    "Folk",
    "Blues",
    "Metal",
    "Soul",
    "Reggae",
    "Country",
    "Punk",
    "Ambient",
    "Funk",
    "Latin",
    "World",
    "Gospel",
    "Indie",
    "Soundtrack",
];

/// The genre of an artist (each has one).
fn genre_of(artist: u64) -> &'static str {
    GENRES[(artist as usize * 7) % GENRES.len()]
}

/// The tags of track `t` (of album `album`): every artist has one genre,
/// every album one year.
fn track_tags(shape: &Shape, album: u64, t: u64, path: String) -> Tags {
    let artist = album / shape.albums;
    let first = album * shape.tracks;
    Tags {
        artist: format!("Artist {artist:06}"),
        album_artist: format!("Artist {artist:06}"),
        album: format!("Album {artist:06}-{:03}", album % shape.albums),
        title: format!("Track {t}"),
        track: (t - first + 1) as u32,
        track_total: shape.tracks as u32,
        genre: genre_of(artist).into(),
        year: 1960 + (album % 60) as u32,
        codec: "flac".into(),
        path,
        ..Default::default()
    }
}

async fn connect(addrs: &str) -> Result<Arc<Fs>> {
    let mut cfg = ClusterConfig::new(parse_seeds(addrs)?);
    cfg.deadline = Duration::from_secs(120);
    Ok(Fs::new(Cluster::connect(cfg).await?, 16 << 20))
}

/// `name` in `parent`, created if missing.
async fn dir(fs: &Fs, parent: u64, name: &str) -> Result<u64> {
    match fs
        .create(
            parent,
            name.as_bytes(),
            FileKind::Directory,
            0o755,
            0,
            0,
            0,
            b"",
        )
        .await
    {
        Ok(a) => Ok(a.ino),
        Err(e) if e.code() == Some(ErrorCode::Exists) => {
            Ok(fs.lookup(parent, name.as_bytes()).await?.ino)
        }
        Err(e) => Err(e.into()),
    }
}

/// Artists whose albums and tracks are created together.
const ARTISTS_PER_CHUNK: u64 = 64;

async fn create(shape: Shape, parallel: usize, with_tags: bool) -> Result<()> {
    let fs = connect(&shape.cluster).await?;
    let top = dir(&fs, ROOT_INO, &shape.top).await?;
    let albums = shape.files.div_ceil(shape.tracks);
    let artists = albums.div_ceil(shape.albums);
    let start = Instant::now();
    // Artist directories first (a bulk create in the top directory).
    let mut artist_ino = Vec::with_capacity(artists as usize);
    for first in (0..artists).step_by(1024) {
        let batch: Vec<NewEntry> = (first..(first + 1024).min(artists))
            .map(|a| NewEntry::new(format!("Artist {a:06}"), FileKind::Directory, 0o755))
            .collect();
        for (i, r) in fs.create_many(top, &batch).await?.into_iter().enumerate() {
            artist_ino.push(match r {
                Ok(a) => a.ino,
                Err(e) if e.code() == Some(ErrorCode::Exists) => {
                    fs.lookup(top, &batch[i].name).await?.ino
                }
                Err(e) => return Err(e.into()),
            });
        }
    }
    let artist_ino = Arc::new(artist_ino);
    let done = Arc::new(AtomicU64::new(0));
    let reporter = {
        let done = done.clone();
        let total = shape.files;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            every.tick().await;
            loop {
                every.tick().await;
                let n = done.load(Ordering::Relaxed);
                let s = start.elapsed().as_secs_f64();
                eprintln!(
                    "[{s:>7.0}s] {n} / {total} tracks, {:.0} creates/s",
                    n as f64 / s
                );
            }
        })
    };
    // Artists in chunks: all album directories of a chunk in one bulk call
    // (one batch, and one cross-shard transaction, per group of the
    // artists), then all its tracks (one batch per group of the albums).
    let results: Vec<Result<()>> = stream::iter((0..artists).step_by(ARTISTS_PER_CHUNK as usize))
        .map(|first_artist| {
            let (fs, shape, artist_ino, done) =
                (fs.clone(), shape.clone(), artist_ino.clone(), done.clone());
            async move {
                let first_album = first_artist * shape.albums;
                let last_album = ((first_artist + ARTISTS_PER_CHUNK) * shape.albums).min(albums);
                let dirs: Vec<(u64, NewEntry)> = (first_album..last_album)
                    .map(|album| {
                        (
                            artist_ino[(album / shape.albums) as usize],
                            NewEntry::new(names(&shape, album).1, FileKind::Directory, 0o755),
                        )
                    })
                    .collect();
                let refs: Vec<(u64, &NewEntry)> = dirs.iter().map(|(p, e)| (*p, e)).collect();
                let mut album_ino = Vec::with_capacity(dirs.len());
                for (i, r) in fs.create_entries(&refs).await?.into_iter().enumerate() {
                    album_ino.push(match r {
                        Ok(a) => a.ino,
                        Err(e) if e.code() == Some(ErrorCode::Exists) => {
                            fs.lookup(dirs[i].0, &dirs[i].1.name).await?.ino
                        }
                        Err(e) => return Err(e.into()),
                    });
                }
                let mut tracks: Vec<(u64, NewEntry)> = Vec::new();
                let mut track_of = Vec::new();
                for (album, ino) in (first_album..last_album).zip(album_ino) {
                    let first = album * shape.tracks;
                    let last = (first + shape.tracks).min(shape.files);
                    track_of.extend((first..last).map(|t| (album, t)));
                    tracks.extend((first..last).map(|t| {
                        (
                            ino,
                            NewEntry::new(
                                format!("{:02} Track {t}.flac", t - first + 1),
                                FileKind::Regular,
                                0o644,
                            ),
                        )
                    }));
                }
                let refs: Vec<(u64, &NewEntry)> = tracks.iter().map(|(p, e)| (*p, e)).collect();
                let mut tagged = Vec::new();
                for (i, r) in fs.create_entries(&refs).await?.into_iter().enumerate() {
                    let ino = match r {
                        Ok(a) => a.ino,
                        // A re-run: the inode is needed only for its tags.
                        Err(e) if e.code() == Some(ErrorCode::Exists) && !with_tags => continue,
                        Err(e) if e.code() == Some(ErrorCode::Exists) => {
                            fs.lookup(tracks[i].0, &tracks[i].1.name).await?.ino
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if with_tags {
                        let (album, t) = track_of[i];
                        let (artist, album_dir) = names(&shape, album);
                        let path = format!(
                            "/{}/{artist}/{album_dir}/{}",
                            shape.top,
                            String::from_utf8_lossy(&tracks[i].1.name)
                        );
                        tagged.push((ino, track_tags(&shape, album, t, path)));
                    }
                }
                if !tagged.is_empty() {
                    fs.set_tags_many(tagged).await?;
                }
                done.fetch_add(tracks.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    reporter.abort();
    for r in results {
        r?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "files": shape.files,
            "albums": albums,
            "artists": artists,
            "seconds": secs,
            "creates_per_sec": shape.files as f64 / secs,
        })
    );
    Ok(())
}

async fn stat(shape: Shape, samples: u64) -> Result<()> {
    let fs = connect(&shape.cluster).await?;
    let top = fs.lookup(ROOT_INO, shape.top.as_bytes()).await?.ino;
    let albums = shape.files.div_ceil(shape.tracks);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let album = x % albums;
        let (artist, album_name) = names(&shape, album);
        let a = fs.lookup(top, artist.as_bytes()).await?.ino;
        let b = fs.lookup(a, album_name.as_bytes()).await?.ino;
        let first = album * shape.tracks;
        let t = first + (x >> 32) % shape.tracks.min(shape.files - first);
        let name = format!("{:02} Track {t}.flac", t - first + 1);
        let start = Instant::now();
        fs.lookup(b, name.as_bytes())
            .await
            .with_context(|| format!("{artist}/{album_name}/{name}"))?;
        lat.push(start.elapsed());
    }
    if lat.is_empty() {
        bail!("no samples");
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "samples": lat.len(),
            "p50_ms": p(0.50),
            "p99_ms": p(0.99),
            "max_ms": p(1.0),
        })
    );
    Ok(())
}

/// Median of `runs` timings of `f`, in milliseconds, with its last result.
async fn timed<T, F, Fut>(runs: usize, mut f: F) -> Result<(f64, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut ms = Vec::new();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        last = Some(f().await?);
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let out = last.context("no run")?;
    Ok((ms[ms.len() / 2], out))
}

async fn search(shape: Shape, runs: usize) -> Result<()> {
    let fs = connect(&shape.cluster).await?;
    let artists = shape.files.div_ceil(shape.tracks).div_ceil(shape.albums);
    let a = artists / 2;
    let queries = [
        format!("artist:\"Artist {a:06}\""),
        format!(
            "artist:\"Artist {a:06}\" year:1960..2020 genre:{}",
            genre_of(a)
        ),
        format!("artist:\"Artist {a:06}\" genre:{}", genre_of(a)),
        format!("artist:\"Artist {a:06}\" year:1960..2020"),
        format!("album:\"Album {a:06}-003\""),
        "genre:jazz year:1999".to_string(),
        format!("title:\"Track {}\"", shape.files / 2),
        format!("\"Artist {a:06}\""),
        "codec:flac year:1999 track:1".to_string(),
    ];
    for q in queries {
        let terms = proto::tags::parse_query(&q)?;
        let (ms, hits) = timed(runs, || async { Ok(fs.search(&terms, 1000).await?) }).await?;
        println!(
            "{}",
            serde_json::json!({ "query": q, "hits": hits.len(), "median_ms": ms })
        );
    }
    Ok(())
}

async fn views(shape: Shape) -> Result<()> {
    let fs = connect(&shape.cluster).await?;
    fs.enable_views(musicfs_client::views::Views::defaults(".views"));
    let artists = shape.files.div_ceil(shape.tracks).div_ceil(shape.albums);
    let a = artists / 2;
    let genre = genre_of(a);
    let paths = [
        ".views/artists".to_string(),
        format!(".views/artists/Artist {a:06}"),
        format!(".views/artists/Artist {a:06}/Album {a:06}-003"),
        ".views/years".to_string(),
        ".views/years/1999".to_string(),
        format!(".views/genres/{genre}"),
    ];
    for p in paths {
        let start = Instant::now();
        let dir = fs.resolve(&p).await?.ino;
        let (mut entries, mut first_page_ms) = (0u64, None);
        let mut after = Vec::new();
        loop {
            let (page, more) = fs.readdir(dir, &after, 1024, false).await?;
            first_page_ms.get_or_insert(start.elapsed().as_secs_f64() * 1e3);
            entries += page.len() as u64;
            match page.last() {
                Some(l) if more => after = l.name.to_vec(),
                _ => break,
            }
        }
        println!(
            "{}",
            serde_json::json!({
                "path": p,
                "entries": entries,
                "first_page_ms": first_page_ms,
                "all_ms": start.elapsed().as_secs_f64() * 1e3,
            })
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Create {
            shape,
            parallel,
            tags,
        } => create(shape, parallel, tags).await,
        Cmd::Search { shape, runs } => search(shape, runs).await,
        Cmd::Views { shape } => views(shape).await,
        Cmd::Stat { shape, samples } => stat(shape, samples).await,
    }
}
