//! Tag views: read-only directory trees a mount generates from the tags,
//! one per path template in the style of beets (`$albumartist/$album/$track
//! $title`). They live under one directory at the root of the mount
//! (`.views` unless configured), and their files are the tracks
//! themselves: reading one reads the track's own chunks.
//!
//! The first level of a view lists the distinct values of one indexed
//! field, page by page from the groups' tag indexes; a directory below it
//! reads the tracks with its first-level value (the postings of that
//! value) and groups them by the next part of the template. Inode numbers
//! of view entries have the top bit set, which no group's inodes have, and
//! stay the same for a path while the mount runs. A directory of tracks
//! also offers `cover.jpg` (or `.png`): the embedded front cover of its
//! first FLAC or MP3 track that has one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::meta::{Attr, DirEntry, FileKind, Tags, Timespec, TrackHit};

use crate::error::{ClientError, Result};
use crate::fs::Fs;

/// Inode numbers of view entries have this bit set.
pub const VIRTUAL: u64 = 1 << 63;
/// How long a directory's computed children are reused (lookups of the
/// entries of a listing ask for them again at once).
const LISTING_TTL: Duration = Duration::from_secs(2);
/// Views a mount offers when none are configured.
pub const DEFAULT_VIEWS: &[(&str, &str)] = &[
    ("artists", "$albumartist/$album/$track $title"),
    ("genres", "$genre/$albumartist/$album/$track $title"),
    ("years", "$year/$albumartist/$album/$track $title"),
];
/// Fields the first part of a template may name (they are indexed).
const INDEXED: &[&str] = &["artist", "albumartist", "album", "title", "genre", "year"];
/// Fields a template may use.
const FIELDS: &[&str] = &[
    "artist",
    "albumartist",
    "album",
    "title",
    "genre",
    "year",
    "date",
    "track",
    "tracktotal",
    "disc",
    "disctotal",
    "codec",
];

pub fn is_virtual(ino: u64) -> bool {
    ino & VIRTUAL != 0
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

/// One view: a name and a template of `/`-separated parts.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    parts: Vec<Vec<Piece>>,
}

impl Template {
    /// Parses `NAME=TEMPLATE`, e.g. `artists=$albumartist/$album/$track $title`.
    pub fn parse_spec(spec: &str) -> std::result::Result<Template, String> {
        let (name, t) = spec
            .split_once('=')
            .ok_or_else(|| format!("view {spec:?}: expected NAME=TEMPLATE"))?;
        Template::parse(name, t)
    }

    pub fn parse(name: &str, template: &str) -> std::result::Result<Template, String> {
        let err = |m: String| format!("view {name:?} ({template:?}): {m}");
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(err("the name must be a single path component".into()));
        }
        let mut parts = Vec::new();
        for part in template.split('/') {
            let pieces = parse_part(part).map_err(err)?;
            if pieces.is_empty() {
                return Err(err("empty path part".into()));
            }
            parts.push(pieces);
        }
        match parts.first().map(Vec::as_slice) {
            Some([Piece::Field(f)]) if INDEXED.contains(&f.as_str()) => {}
            _ => {
                return Err(err(format!(
                    "the first part must be one indexed field alone ({})",
                    INDEXED
                        .iter()
                        .map(|f| format!("${f}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
        if parts.len() < 2 {
            return Err(err("a view needs a directory part and a file part".into()));
        }
        Ok(Template {
            name: name.to_string(),
            parts,
        })
    }

    fn first_field(&self) -> &str {
        match self.parts[0].first() {
            Some(Piece::Field(f)) => f,
            _ => "",
        }
    }
}

fn parse_part(part: &str) -> std::result::Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = part.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            text.push(c);
            continue;
        }
        let mut name = String::new();
        if chars.peek() == Some(&'{') {
            chars.next();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                name.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if !c.is_ascii_alphanumeric() && c != '_' {
                    break;
                }
                name.push(c);
                chars.next();
            }
        }
        if name.is_empty() {
            text.push('$');
            continue;
        }
        if !FIELDS.contains(&name.as_str()) {
            return Err(format!(
                "unknown field ${name} (known: {})",
                FIELDS.join(", ")
            ));
        }
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        out.push(Piece::Field(name));
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// A field as a template shows it (track and disc numbers as beets does:
/// two digits for tracks).
fn field_text(t: &Tags, f: &str) -> String {
    let num = |n: u32, w: usize| {
        if n == 0 {
            String::new()
        } else {
            format!("{n:0w$}")
        }
    };
    match f {
        "artist" => t.artist.clone(),
        "albumartist" if t.album_artist.is_empty() => t.artist.clone(),
        "albumartist" => t.album_artist.clone(),
        "album" => t.album.clone(),
        "title" => t.title.clone(),
        "genre" => t.genre.clone(),
        "year" => num(t.year, 1),
        "date" => t.date.clone(),
        "track" => num(t.track, 2),
        "tracktotal" => num(t.track_total, 2),
        "disc" => num(t.disc, 1),
        "disctotal" => num(t.disc_total, 1),
        "codec" => t.codec.clone(),
        _ => String::new(),
    }
}

/// What a directory is called when its only field is missing.
fn unknown_label(field: &str) -> String {
    let f = match field {
        "albumartist" | "artist" => "Artist",
        "album" => "Album",
        "title" => "Title",
        "genre" => "Genre",
        "year" => "Year",
        _ => "Value",
    };
    format!("Unknown {f}")
}

/// A path component: `/` and NUL replaced, never empty, `.`/`..` avoided,
/// at most 255 bytes.
fn sanitize(s: &str, field: &str) -> String {
    let mut s: String = s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    let trimmed = s.trim();
    if trimmed.is_empty() || trimmed == "." || trimmed == ".." {
        s = unknown_label(field);
    }
    let mut end = s.len().min(proto::MAX_NAME_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn render(part: &[Piece], t: &Tags) -> String {
    let field = match part {
        [Piece::Field(f)] => f.as_str(),
        _ => "",
    };
    let mut s = String::new();
    for p in part {
        match p {
            Piece::Text(x) => s.push_str(x),
            Piece::Field(f) => s.push_str(&field_text(t, f)),
        }
    }
    sanitize(&s, field)
}

/// The file name extension a track keeps in a view.
fn extension(t: &Tags) -> &str {
    let from_path = std::path::Path::new(&t.path)
        .extension()
        .and_then(|e| e.to_str());
    if let Some(e) = from_path {
        return e;
    }
    match t.codec.as_str() {
        "flac" => "flac",
        "mp3" => "mp3",
        "vorbis" => "ogg",
        "opus" => "opus",
        "aac" | "mp4" => "m4a",
        _ => "",
    }
}

#[derive(Debug, Clone)]
enum Node {
    /// The directory holding the views.
    Top,
    View(usize),
    /// A directory of view `view`: `first` is the first-level value as
    /// tagged (what the index is asked for), `path` the names below it.
    Dir {
        view: usize,
        first: String,
        key: Vec<u8>,
        path: Vec<String>,
    },
    Track(u64),
    /// The embedded cover of a track.
    Cover(u64),
}

#[derive(Debug, Clone)]
struct Child {
    name: String,
    ino: u64,
}

struct Entry {
    node: Node,
    /// Its parent and name (`None` for the views directory).
    key: Option<(u64, String)>,
    /// References the kernel holds (lookups it got, less forgets).
    lookups: u64,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Entry>,
    by_name: HashMap<(u64, String), u64>,
    next: u64,
}

impl Table {
    /// The inode of `parent`'s child `name`, made on first sight.
    fn child(&mut self, parent: u64, name: &str, node: Node) -> u64 {
        let key = (parent, name.to_string());
        if let Some(&ino) = self.by_name.get(&key) {
            // A track may have been replaced under the same name.
            if let Some(e) = self.nodes.get_mut(&ino) {
                e.node = node;
                return ino;
            }
        }
        self.next += 1;
        let ino = VIRTUAL | self.next;
        self.nodes.insert(
            ino,
            Entry {
                node,
                key: Some(key.clone()),
                lookups: 0,
            },
        );
        self.by_name.insert(key, ino);
        ino
    }

    /// Drops `n` of the kernel's references to `ino`, and the entry when
    /// none is left (the views directory and the views stay).
    fn forget(&mut self, ino: u64, n: u64) -> bool {
        let Some(e) = self.nodes.get_mut(&ino) else {
            return false;
        };
        e.lookups = e.lookups.saturating_sub(n);
        if e.lookups > 0 || matches!(e.node, Node::Top | Node::View(_)) {
            return false;
        }
        if let Some(key) = self.nodes.remove(&ino).and_then(|e| e.key) {
            self.by_name.remove(&key);
        }
        true
    }
}

/// Covers kept in memory (each tens to hundreds of KiB).
const MAX_COVERS: usize = 64;
/// Most bytes read from a track's start to find its cover.
const MAX_COVER_READ: usize = 32 << 20;

/// Results kept for `LISTING_TTL`, with the time they were made.
struct Timed<K, V>(Mutex<HashMap<K, (Instant, Arc<V>)>>);

impl<K: std::hash::Hash + Eq, V> Timed<K, V> {
    fn new() -> Self {
        Timed(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &K) -> Option<Arc<V>> {
        lock(&self.0)
            .get(key)
            .filter(|(at, _)| at.elapsed() < LISTING_TTL)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `value` (dropping what has expired) and hands it back.
    fn put(&self, key: K, value: V) -> Arc<V> {
        let value = Arc::new(value);
        let mut map = lock(&self.0);
        map.retain(|_, (at, _)| at.elapsed() < LISTING_TTL);
        map.insert(key, (Instant::now(), value.clone()));
        value
    }

    fn remove(&self, key: &K) {
        lock(&self.0).remove(key);
    }
}

pub struct Views {
    pub dir_name: String,
    templates: Vec<Template>,
    table: Mutex<Table>,
    listings: Timed<u64, Vec<Child>>,
    /// Tracks of a first-level value, shared by the directories under it.
    tracks: Timed<(usize, String), Vec<TrackHit>>,
    /// Covers by track, with the layout version they were read from.
    covers: Mutex<HashMap<u64, (u64, bytes::Bytes)>>,
    started: Timespec,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(what: impl std::fmt::Display) -> ClientError {
    ClientError::Server(proto::meta::Error::new(
        proto::meta::ErrorCode::NotFound,
        format!("{what} not found in the view"),
    ))
}

impl Views {
    /// The default views (`DEFAULT_VIEWS`) under `dir_name`.
    pub fn defaults(dir_name: &str) -> Self {
        let templates = DEFAULT_VIEWS
            .iter()
            .map(|(n, t)| Template::parse(n, t).expect("the default templates parse"))
            .collect();
        Views::new(dir_name, templates)
    }

    pub fn new(dir_name: &str, templates: Vec<Template>) -> Self {
        let mut table = Table::default();
        table.nodes.insert(
            VIRTUAL,
            Entry {
                node: Node::Top,
                key: None,
                lookups: 0,
            },
        );
        Views {
            dir_name: dir_name.to_string(),
            templates,
            table: Mutex::new(table),
            listings: Timed::new(),
            tracks: Timed::new(),
            covers: Mutex::new(HashMap::new()),
            started: Timespec::now(),
        }
    }

    /// The inode of the directory holding the views.
    pub fn top(&self) -> u64 {
        VIRTUAL
    }

    /// The kernel got `ino` (a lookup, or an entry of a readdirplus).
    pub fn looked_up(&self, ino: u64) {
        if let Some(e) = lock(&self.table).nodes.get_mut(&ino) {
            e.lookups += 1;
        }
    }

    /// The kernel dropped `n` references to `ino`: an entry it no longer
    /// holds is forgotten here too, so browsing does not grow the mount's
    /// memory for good. Its path gets a new inode when seen again.
    pub fn forget(&self, ino: u64, n: u64) {
        if lock(&self.table).forget(ino, n) {
            self.listings.remove(&ino);
        }
    }

    /// View entries held (for tests and metrics).
    pub fn entries(&self) -> usize {
        lock(&self.table).nodes.len()
    }

    fn node(&self, ino: u64) -> Result<Node> {
        lock(&self.table)
            .nodes
            .get(&ino)
            .map(|e| e.node.clone())
            .ok_or_else(|| not_found(format!("inode {ino:#x}")))
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Directory as i32,
            perm: 0o555,
            nlink: 2,
            atime: Some(self.started),
            mtime: Some(self.started),
            ctime: Some(self.started),
            crtime: Some(self.started),
            ..Default::default()
        }
    }

    /// A track as a view shows it: its own attributes under the view's
    /// inode number, without write permission.
    fn track_attr(ino: u64, mut real: Attr) -> Attr {
        real.ino = ino;
        real.perm &= !0o222;
        real
    }

    pub async fn getattr(&self, fs: &Fs, ino: u64) -> Result<Attr> {
        match self.node(ino)? {
            Node::Track(real) => Ok(Self::track_attr(ino, fs.getattr(real).await?)),
            Node::Cover(real) => {
                let track = fs.getattr(real).await?;
                let size = match self.cover_of(fs, real).await? {
                    Some(c) => c.len() as u64,
                    None => return Err(not_found("the cover")),
                };
                Ok(Attr {
                    size,
                    perm: 0o444,
                    nlink: 1,
                    layout_version: 0,
                    ..Self::track_attr(ino, track)
                })
            }
            _ => Ok(self.dir_attr(ino)),
        }
    }

    /// The embedded cover of track `real`, read from its first bytes.
    async fn cover_of(&self, fs: &Fs, real: u64) -> Result<Option<bytes::Bytes>> {
        let version = fs.getattr(real).await?.layout_version;
        if let Some((v, c)) = lock(&self.covers).get(&real) {
            if *v == version {
                return Ok(Some(c.clone()));
            }
        }
        let fh = fs.open(real).await?;
        let read = async {
            let mut head = Vec::new();
            let mut want = 256 << 10;
            loop {
                while head.len() < want {
                    let got = fs
                        .read(
                            fh,
                            head.len() as u64,
                            (want - head.len()).min(1 << 20) as u32,
                        )
                        .await?;
                    if got.is_empty() {
                        break;
                    }
                    head.extend_from_slice(&got);
                }
                match crate::audio::cover(&head) {
                    Some(r) if r.end <= head.len() => {
                        return Ok(Some(bytes::Bytes::copy_from_slice(&head[r])))
                    }
                    Some(r) if r.end <= MAX_COVER_READ && head.len() == want => want = r.end,
                    _ => return Ok(None),
                }
            }
        }
        .await;
        fs.release(fh).await?;
        let cover = read?;
        if let Some(c) = &cover {
            let mut covers = lock(&self.covers);
            if covers.len() >= MAX_COVERS {
                covers.clear();
            }
            covers.insert(real, (version, c.clone()));
        }
        Ok(cover)
    }

    /// Bytes of an open cover (`ino` is its handle: covers never change
    /// under a handle, a new layout of the track is a new read).
    pub async fn read_cover(
        &self,
        fs: &Fs,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<bytes::Bytes> {
        let Node::Cover(real) = self.node(ino)? else {
            return Err(ClientError::BadHandle(ino));
        };
        let c = self
            .cover_of(fs, real)
            .await?
            .ok_or_else(|| not_found("the cover"))?;
        let start = (offset as usize).min(c.len());
        let end = (start + size as usize).min(c.len());
        Ok(c.slice(start..end))
    }

    /// Whether `ino` is a cover (opened by the views themselves).
    pub fn is_cover(&self, ino: u64) -> bool {
        matches!(self.node(ino), Ok(Node::Cover(_)))
    }

    /// The track a view's file stands for (`None` for a directory).
    pub fn real_ino(&self, ino: u64) -> Result<Option<u64>> {
        Ok(match self.node(ino)? {
            Node::Track(real) => Some(real),
            _ => None,
        })
    }

    async fn tracks_of(&self, fs: &Fs, view: usize, first: &str) -> Result<Arc<Vec<TrackHit>>> {
        let key = (view, first.to_string());
        if let Some(t) = self.tracks.get(&key) {
            return Ok(t);
        }
        let field = self.templates[view].first_field().to_string();
        let mut hits = fs.tag_tracks(&field, first).await?;
        hits.sort_by_key(|h| h.ino);
        Ok(self.tracks.put(key, hits))
    }

    /// The children of a directory below the first level: the tracks with
    /// its first-level value whose rendered parts match its path, grouped
    /// by the next part (or, at the last level, named as files).
    async fn children_below(
        &self,
        fs: &Fs,
        dir: u64,
        view: usize,
        first: &str,
        key: &[u8],
        path: &[String],
    ) -> Result<Vec<Child>> {
        let t = &self.templates[view];
        let depth = path.len() + 1;
        let hits = self.tracks_of(fs, view, first).await?;
        let mut names: BTreeMap<String, Node> = BTreeMap::new();
        for h in hits.iter() {
            let Some(tags) = &h.tags else { continue };
            let inside = path
                .iter()
                .enumerate()
                .all(|(i, name)| render(&t.parts[i + 1], tags) == *name);
            if !inside {
                continue;
            }
            let part = render(&t.parts[depth], tags);
            if depth + 1 < t.parts.len() {
                let mut p = path.to_vec();
                p.push(part.clone());
                names.entry(part).or_insert(Node::Dir {
                    view,
                    first: first.to_string(),
                    key: key.to_vec(),
                    path: p,
                });
            } else {
                let ext = extension(tags);
                let base = if ext.is_empty() {
                    part
                } else {
                    format!("{part}.{ext}")
                };
                // Two tracks that render alike both stay visible.
                let mut name = base.clone();
                let mut n = 2;
                while names.contains_key(&name) {
                    name = format!("{base} ({n})");
                    n += 1;
                }
                names.insert(name, Node::Track(h.ino));
            }
        }
        if depth + 1 == t.parts.len() {
            // Tracks: the album's cover beside them, if one has it.
            let candidates = names.values().filter_map(|n| match n {
                Node::Track(real) => Some(*real),
                _ => None,
            });
            for real in candidates.take(4).collect::<Vec<_>>() {
                if let Some(c) = self.cover_of(fs, real).await? {
                    let name = if c.starts_with(b"\x89PNG") {
                        "cover.png"
                    } else {
                        "cover.jpg"
                    };
                    names.entry(name.to_string()).or_insert(Node::Cover(real));
                    break;
                }
            }
        }
        let mut table = lock(&self.table);
        Ok(names
            .into_iter()
            .map(|(name, node)| Child {
                ino: table.child(dir, &name, node),
                name,
            })
            .collect())
    }

    async fn children(&self, fs: &Fs, dir: u64) -> Result<Arc<Vec<Child>>> {
        if let Some(c) = self.listings.get(&dir) {
            return Ok(c);
        }
        let children = match self.node(dir)? {
            Node::Top => {
                let mut table = lock(&self.table);
                self.templates
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Child {
                        ino: table.child(dir, &t.name, Node::View(i)),
                        name: t.name.clone(),
                    })
                    .collect()
            }
            // The first level is paged by `readdir` and checked by `lookup`
            // against the index, never listed whole.
            Node::View(_) => {
                return Err(ClientError::Invalid(
                    "a view's first level is not listed whole".into(),
                ))
            }
            Node::Dir {
                view,
                first,
                key,
                path,
            } => {
                self.children_below(fs, dir, view, &first, &key, &path)
                    .await?
            }
            Node::Track(_) | Node::Cover(_) => {
                return Err(ClientError::Server(proto::meta::Error::new(
                    proto::meta::ErrorCode::NotDir,
                    "a track of a view is not a directory",
                )))
            }
        };
        Ok(self.listings.put(dir, children))
    }

    /// First-level directories of view `v` from the tag index, after the
    /// value with normalized form `after`, at most `limit`.
    async fn first_level(
        &self,
        fs: &Fs,
        dir: u64,
        v: usize,
        mut after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<Child>, bool)> {
        let field = self.templates[v].first_field().to_string();
        let mut out = Vec::new();
        loop {
            let want = (limit - out.len()).min(1000);
            let (values, more) = fs.tag_values(&field, after.as_deref(), want).await?;
            {
                let mut table = lock(&self.table);
                for val in &values {
                    let name = sanitize(&val.value, &field);
                    let node = Node::Dir {
                        view: v,
                        first: val.value.clone(),
                        key: val.key.to_vec(),
                        path: Vec::new(),
                    };
                    out.push(Child {
                        ino: table.child(dir, &name, node),
                        name,
                    });
                }
            }
            match values.last() {
                Some(last) if more && out.len() < limit => after = Some(last.key.to_vec()),
                _ => return Ok((out, more)),
            }
        }
    }

    pub async fn lookup(&self, fs: &Fs, parent: u64, name: &[u8]) -> Result<Attr> {
        let name = std::str::from_utf8(name).map_err(|_| not_found("a name that is not UTF-8"))?;
        let known = lock(&self.table)
            .by_name
            .get(&(parent, name.to_string()))
            .copied();
        let ino = match (known, self.node(parent)?) {
            // First-level names are checked against the index, not a
            // whole listing: a view of many artists is never read whole.
            (Some(ino), Node::View(_)) if self.first_value_exists(fs, ino).await? => ino,
            (_, Node::View(v)) => {
                let field = self.templates[v].first_field().to_string();
                let value = if name == unknown_label(&field) {
                    String::new()
                } else {
                    name.to_string()
                };
                if !fs.tag_exists(&field, &value).await? {
                    return Err(not_found(name));
                }
                let key = proto::tags::index_norm(field == "year", &value)
                    .ok_or_else(|| not_found(name))?;
                let node = Node::Dir {
                    view: v,
                    key,
                    first: value,
                    path: Vec::new(),
                };
                lock(&self.table).child(parent, name, node)
            }
            _ => self
                .children(fs, parent)
                .await?
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.ino)
                .ok_or_else(|| not_found(name))?,
        };
        self.getattr(fs, ino).await
    }

    /// Whether a first-level directory seen before still has tracks.
    async fn first_value_exists(&self, fs: &Fs, ino: u64) -> Result<bool> {
        match self.node(ino)? {
            Node::Dir { view, first, .. } => {
                let field = self.templates[view].first_field().to_string();
                fs.tag_exists(&field, &first).await
            }
            _ => Ok(false),
        }
    }

    /// One page of a view directory in name order after `after`. The first
    /// level pages through the index; deeper levels are computed whole
    /// (they hold one first-level value's tracks) and paged from memory.
    pub async fn readdir(
        &self,
        fs: &Fs,
        dir: u64,
        after: &[u8],
        limit: u32,
        plus: bool,
    ) -> Result<(Vec<DirEntry>, bool)> {
        let after = String::from_utf8_lossy(after).into_owned();
        let limit = limit.max(1) as usize;
        let (page, more) = match self.node(dir)? {
            Node::View(v) => {
                // The cursor is the normalized value of the last name given.
                let cursor = if after.is_empty() {
                    None
                } else {
                    let ino = lock(&self.table)
                        .by_name
                        .get(&(dir, after.clone()))
                        .copied();
                    match ino.map(|i| self.node(i)) {
                        Some(Ok(Node::Dir { key, .. })) => Some(key),
                        _ => {
                            let field = self.templates[v].first_field();
                            proto::tags::index_norm(field == "year", &after)
                        }
                    }
                };
                self.first_level(fs, dir, v, cursor, limit).await?
            }
            _ => {
                let all = self.children(fs, dir).await?;
                let start = all.partition_point(|c| c.name.as_str() <= after.as_str());
                let end = (start + limit).min(all.len());
                (all[start..end].to_vec(), end < all.len())
            }
        };
        let mut out = Vec::with_capacity(page.len());
        for c in page {
            let attr = if plus {
                Some(self.getattr(fs, c.ino).await?)
            } else {
                None
            };
            let kind = match attr {
                Some(a) => a.kind,
                None => match self.node(c.ino)? {
                    Node::Track(_) | Node::Cover(_) => FileKind::Regular as i32,
                    _ => FileKind::Directory as i32,
                },
            };
            out.push(DirEntry {
                name: c.name.into_bytes().into(),
                ino: c.ino,
                kind,
                attr,
            });
        }
        if plus {
            // A readdirplus entry counts as a lookup for the kernel: only
            // once the page is sure to reach it.
            for e in &out {
                self.looked_up(e.ino);
            }
        }
        Ok((out, more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track() -> Tags {
        Tags {
            artist: "Massive Attack".into(),
            album: "Mezzanine".into(),
            title: "Teardrop".into(),
            track: 3,
            year: 1998,
            codec: "flac".into(),
            path: "/lib/x/03.flac".into(),
            ..Default::default()
        }
    }

    #[test]
    fn templates_render_like_beets() {
        let t = Template::parse("a", "$albumartist/$album/$track $title").unwrap();
        let tags = track();
        assert_eq!(render(&t.parts[0], &tags), "Massive Attack");
        assert_eq!(render(&t.parts[2], &tags), "03 Teardrop");
        assert_eq!(extension(&tags), "flac");
        let y = Template::parse("y", "${year}/$album ($year)/$title").unwrap();
        assert_eq!(render(&y.parts[1], &tags), "Mezzanine (1998)");
        let mut odd = tags.clone();
        odd.album = "AC/DC".into();
        odd.genre = String::new();
        assert_eq!(render(&t.parts[1], &odd), "AC_DC");
        let g = Template::parse("g", "$genre/$title").unwrap();
        assert_eq!(render(&g.parts[0], &odd), "Unknown Genre");
    }

    #[test]
    fn entries_the_kernel_forgets_are_dropped_and_made_anew() {
        let t = Template::parse("a", "$albumartist/$album/$title").unwrap();
        let v = Views::new(".views", vec![t]);
        let view = lock(&v.table).child(VIRTUAL, "a", Node::View(0));
        let dir = |first: &str| Node::Dir {
            view: 0,
            first: first.into(),
            key: first.as_bytes().to_vec(),
            path: Vec::new(),
        };
        let x = lock(&v.table).child(view, "X", dir("X"));
        assert_eq!(lock(&v.table).child(view, "X", dir("X")), x, "stable");
        v.looked_up(x);
        v.looked_up(x);
        v.forget(x, 1);
        assert!(v.node(x).is_ok(), "one reference left");
        v.forget(x, 1);
        assert!(v.node(x).is_err(), "forgotten");
        let again = lock(&v.table).child(view, "X", dir("X"));
        assert_ne!(again, x, "a new inode for the path");
        // The views directory and the views themselves stay.
        v.forget(VIRTUAL, 5);
        v.forget(view, 5);
        assert!(v.node(VIRTUAL).is_ok() && v.node(view).is_ok());
        assert_eq!(v.entries(), 3);
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let e = Template::parse("x", "$colour/$title").unwrap_err();
        assert!(e.contains("unknown field $colour"), "{e}");
        let e = Template::parse("x", "$track/$title").unwrap_err();
        assert!(e.contains("first part must be one indexed field"), "{e}");
        let e = Template::parse("x", "$album - $year/$title").unwrap_err();
        assert!(e.contains("first part"), "{e}");
        let e = Template::parse("x", "$album").unwrap_err();
        assert!(e.contains("directory part and a file part"), "{e}");
        assert!(Template::parse_spec("novalue").is_err());
        assert!(Template::parse("a/b", "$album/$title").is_err());
    }
}
