//! A real music library (FLAC, MP3, Ogg Vorbis, Opus with cover art, made
//! by `../shared/tools/mklib.sh` from Debian's encoders) imported into a
//! three-node cluster with `musicfs import`, then kept in step with
//! `musicfs sync` after re-tags, deletions and new tracks.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{musicfs, TestCluster};

/// Makes a library of `albums` albums of `tracks` tracks of `secs` seconds
/// in every format under `dir`.
fn mklib(dir: &Path, albums: u32, tracks: u32, secs: u32) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/mklib.sh");
    assert!(
        script.exists(),
        "{} is needed to make the test library (the project's shared tools beside the checkout)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .args([albums.to_string(), tracks.to_string(), secs.to_string()])
        .output()
        .expect("run mklib.sh");
    assert!(
        out.status.success(),
        "mklib.sh failed (needs sox flac lame vorbis-tools opus-tools imagemagick: make test-deps): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every regular file under `root`, as paths relative to it.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn report(c: &TestCluster, args: &[&str]) -> serde_json::Value {
    let out = musicfs(c, args);
    assert!(
        out.status.success(),
        "musicfs {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("report JSON")
}

fn tags(c: &TestCluster, path: &str) -> serde_json::Value {
    report(c, &["tags", "--json", path])
}

/// The tags of `path`, or `None` while it has none.
fn try_tags(c: &TestCluster, path: &str) -> Option<serde_json::Value> {
    let out = musicfs(c, &["tags", "--json", path]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("tags JSON"))
}

/// `musicfs search --json`: one object per matching track.
fn search(c: &TestCluster, terms: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["search", "--json"];
    args.extend_from_slice(terms);
    json_lines(c, &args, |code| code <= 1)
}

/// The JSON Lines a command prints, if its exit code is acceptable.
fn json_lines(c: &TestCluster, args: &[&str], ok: impl Fn(i32) -> bool) -> Vec<serde_json::Value> {
    let out = musicfs(c, args);
    assert!(
        out.status.code().is_some_and(ok),
        "musicfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect(cmd);
    assert!(st.success(), "{cmd} {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_imports_and_syncs_sending_only_what_changed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lib = tmp.path().join("lib");
    mklib(&lib, 2, 2, 6);
    let local = files(&lib);
    let total: u64 = local
        .iter()
        .map(|p| std::fs::metadata(lib.join(p)).expect("stat").len())
        .sum();
    assert!(local.len() >= 18, "{local:?}");

    let c = TestCluster::start(3, &[]).await;
    c.init_groups(4).await;
    let src = lib.to_str().expect("utf-8 path");

    // First import: everything is copied, and reads back byte for byte
    // with the source's modification time.
    let r = report(&c, &["import", "--json", src, "/music"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["files"], local.len() as u64, "{r}");
    assert_eq!(r["files_copied"], local.len() as u64, "{r}");
    assert_eq!(r["bytes"], total, "{r}");
    let sent = r["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent > 0 && sent <= total, "{r}");
    let fs = c.client(std::time::Duration::from_secs(30)).await;
    for p in &local {
        let path = format!("/music/{}", p.display());
        let want = std::fs::read(lib.join(p)).expect("read local");
        let got = fs.read_file(&path).await.expect("read imported");
        assert!(got == want, "{path} differs");
        let md = std::fs::metadata(lib.join(p)).expect("stat");
        let a = fs.resolve(&path).await.expect("resolve");
        let mtime = a.mtime.expect("mtime");
        assert_eq!(
            (mtime.sec, mtime.nsec as i64),
            (md.mtime(), md.mtime_nsec())
        );
    }

    // Tags were read as the files went up, in every format.
    for fmt in ["flac", "mp3", "ogg", "opus"] {
        let path = format!("/music/{fmt}/Artist 2/Album 2/01 Song 2-1.{fmt}");
        let t = tags(&c, &path);
        assert_eq!(t["artist"], "Artist 2", "{fmt}: {t}");
        assert_eq!(t["album"], "Album 2", "{fmt}: {t}");
        assert_eq!(t["title"], "Song 2-1", "{fmt}: {t}");
        assert_eq!(t["track"], 1, "{fmt}: {t}");
        assert_eq!(t["year"], 1992, "{fmt}: {t}");
        assert_eq!(t["genre"], "Rock", "{fmt}: {t}");
        assert_eq!(t["path"], path, "{fmt}: {t}");
        let ms = t["duration_ms"].as_u64().expect("duration");
        assert!((5_500..=6_500).contains(&ms), "{fmt}: {t}");
    }
    assert_eq!(
        tags(&c, "/music/flac/Artist 2/Album 2/01 Song 2-1.flac")["codec"],
        "flac"
    );
    assert_eq!(
        tags(&c, "/music/opus/Artist 2/Album 2/01 Song 2-1.opus")["codec"],
        "opus"
    );

    // Search: exactly the expected tracks, from every group.
    assert_eq!(
        search(&c, &["artist:\"Artist 2\"", "year:1990..1995"]).len(),
        8,
        "2 tracks in 4 formats"
    );
    let hits = search(&c, &["title:\"Song 1-2\"", "codec:mp3"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(
        hits[0]["path"],
        "/music/mp3/Artist 1/Album 1/02 Song 1-2.mp3"
    );
    assert_eq!(search(&c, &["song", "year:1991"]).len(), 8, "bare words");
    let out = musicfs(&c, &["search", "genre:jazz"]);
    assert_eq!(out.status.code(), Some(1), "nothing matches");
    let out = musicfs(&c, &["search", "colour:blue"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown tag field \"colour\""), "{err}");

    // Nothing changed: nothing is copied or sent.
    let r = report(&c, &["sync", "--json", src, "/music"]);
    assert_eq!(r["files_copied"], 0, "{r}");
    assert_eq!(r["files_unchanged"], local.len() as u64, "{r}");
    assert_eq!(r["bytes_sent"], 0, "{r}");

    // A FLAC re-tag: the file is copied again, but only its changed
    // header chunk is new to the cluster.
    let flac = local
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "flac"))
        .expect("a FLAC file");
    let flac_local = lib.join(flac);
    run(
        "metaflac",
        &[
            "--remove-tag=TITLE",
            "--set-tag=TITLE=A new title",
            flac_local.to_str().expect("utf-8"),
        ],
    );
    // A removed track and a new one.
    let gone = local
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "mp3"))
        .expect("an MP3 file");
    std::fs::remove_file(lib.join(gone)).expect("remove");
    std::fs::write(lib.join("notes.txt"), b"liner notes").expect("write");

    // `import` copies what is new or changed but removes nothing.
    let r = report(&c, &["import", "--json", src, "/music"]);
    assert_eq!(r["files_copied"], 2, "{r}");
    assert_eq!(r["removed"], 0, "{r}");
    let header = r["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(
        header <= 16 * 1024 + "liner notes".len() as u64,
        "a FLAC title edit sent {header} bytes: {r}"
    );
    fs.resolve(&format!("/music/{}", gone.display()))
        .await
        .expect("import keeps what the source lost");
    let want = std::fs::read(&flac_local).expect("read");
    let got = fs
        .read_file(&format!("/music/{}", flac.display()))
        .await
        .expect("read re-tagged");
    assert!(got == want, "re-tagged FLAC differs");
    assert_eq!(
        tags(&c, &format!("/music/{}", flac.display()))["title"],
        "A new title",
        "tags follow the copy"
    );
    assert_eq!(search(&c, &["title:\"a new title\""]).len(), 1);

    // `sync` removes it.
    let r = report(&c, &["sync", "--json", src, "/music"]);
    assert_eq!(r["removed"], 1, "{r}");
    assert_eq!(r["files_copied"], 0, "{r}");
    let e = fs
        .resolve(&format!("/music/{}", gone.display()))
        .await
        .expect_err("sync removes what the source lost");
    assert_eq!(e.code(), Some(proto::meta::ErrorCode::NotFound), "{e}");
    // Its tags went with it.
    let gone_title = gone
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.split_once(' '))
        .map(|(_, t)| t.to_string())
        .expect("title from the file name");
    assert_eq!(
        search(&c, &[&format!("title:\"{gone_title}\""), "codec:mp3"]).len(),
        0
    );

    // A tag editor working through the mount: the file stays valid (it
    // decodes, audio checksum included) and its new tags reach the
    // metadata once it is closed.
    let mnt = tmp.path().join("mnt");
    let m = common::Mount::new(&c.seeds(), &mnt, 30).await;
    let edits = [
        ("flac", "metaflac", vec!["--remove-tag=ALBUM", "--set-tag=ALBUM=Another album"]),
        // vorbiscomment -w replaces every comment: give it all of them.
        (
            "ogg",
            "sh",
            vec![
                "-c",
                "vorbiscomment -l \"$1\" | sed 's/^album=.*/ALBUM=Another album/I' | vorbiscomment -w \"$1\"",
                "sh",
            ],
        ),
    ];
    for (fmt, tool, args) in edits {
        let rel = local
            .iter()
            .find(|p| {
                p.extension().is_some_and(|e| e == fmt) && p.to_string_lossy().contains("Song 2-2")
            })
            .expect("a track");
        let on_mount = m.path.join("music").join(rel);
        let mut args = args.clone();
        let p = on_mount.to_str().expect("utf-8");
        args.push(p);
        run(tool, &args);
        if fmt == "flac" {
            run("flac", &["-t", "-s", p]);
        } else {
            run("ogginfo", &["-q", p]);
        }
        let path = format!("/music/{}", rel.display());
        common::wait_for(
            &format!("the {fmt} edit through the mount in the tags"),
            std::time::Duration::from_secs(30),
            || {
                let t = try_tags(&c, &path);
                async move { t.filter(|t| t["album"] == "Another album").map(|_| ()) }
            },
        )
        .await;
        assert_eq!(tags(&c, &path)["title"], "Song 2-2");
    }
    drop(m);

    // A source that is not a directory is refused with a clear message,
    // and the cluster is left as it was.
    let out = musicfs(&c, &["sync", "/nonexistent-library", "/music"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent-library"), "{err}");
    fs.resolve("/music/notes.txt").await.expect("still there");
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Where a FLAC file's audio frames start: after its metadata blocks.
fn flac_audio_start(b: &[u8]) -> usize {
    assert_eq!(&b[..4], b"fLaC", "a FLAC file");
    let mut at = 4;
    loop {
        let last = b[at] & 0x80 != 0;
        let len = u32::from_be_bytes([0, b[at + 1], b[at + 2], b[at + 3]]) as usize;
        at += 4 + len;
        if last {
            return at;
        }
    }
}

/// Where an MP3 file's frames start: after its ID3v2 tag, if any.
fn mp3_audio_start(b: &[u8]) -> usize {
    if &b[..3] != b"ID3" {
        return 0;
    }
    let size = b[6..10]
        .iter()
        .fold(0usize, |n, x| (n << 7) | usize::from(x & 0x7f));
    let footer = if b[5] & 0x10 != 0 { 10 } else { 0 };
    10 + size + footer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_views_list_every_track_and_tag_set_moves_kilobytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lib = tmp.path().join("lib");
    mklib(&lib, 2, 2, 4);
    let c = TestCluster::start(3, &[]).await;
    c.init_groups(4).await;
    let r = report(
        &c,
        &["import", "--json", lib.to_str().expect("utf-8"), "/music"],
    );
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let fs = c.client(std::time::Duration::from_secs(30)).await;
    let track =
        |fmt: &str, a: u32, t: u32| format!("{fmt}/Artist {a}/Album {a}/0{t} Song {a}-{t}.{fmt}");
    // The change feed from the start: every imported file, created once.
    let cursor = tmp.path().join("watch-cursor.json");
    let first = watch(&c, &cursor);
    for p in files(&lib) {
        let path = format!("/music/{}", p.display());
        let created = first
            .iter()
            .filter(|e| e["kind"] == "created" && e["path"] == path.as_str())
            .count();
        assert_eq!(created, 1, "{path} in {first:?}");
    }
    assert!(
        watch(&c, &cursor).is_empty(),
        "nothing new: nothing reported"
    );

    let mnt = tmp.path().join("mnt");
    let m = common::Mount::new(&c.seeds(), &mnt, 30).await;
    let views = m.path.join(".views");
    assert!(
        names(&m.path).contains(&".views".to_string()),
        "the root lists the views: {:?}",
        names(&m.path)
    );
    assert_eq!(names(&views), ["artists", "genres", "years"]);
    assert_eq!(names(&views.join("artists")), ["Artist 1", "Artist 2"]);
    assert_eq!(names(&views.join("artists/Artist 1")), ["Album 1"]);
    let album = views.join("artists/Artist 2/Album 2");
    let mut want = Vec::new();
    for t in 1..=2 {
        for ext in ["flac", "mp3", "ogg", "opus"] {
            want.push(format!("0{t} Song 2-{t}.{ext}"));
        }
    }
    // The album's embedded cover, as a file beside its tracks.
    want.push("cover.jpg".to_string());
    want.sort();
    assert_eq!(names(&album), want);
    let cover = std::fs::read(album.join("cover.jpg")).expect("read the cover");
    assert!(
        cover == std::fs::read(lib.join("cover2.jpg")).expect("source cover"),
        "cover.jpg is the picture embedded in the album's tracks"
    );
    // A view's files are the tracks: the same bytes as the source.
    for a in 1..=2u32 {
        for t in 1..=2u32 {
            for fmt in ["flac", "mp3", "ogg", "opus"] {
                let in_view = views.join(format!(
                    "artists/Artist {a}/Album {a}/0{t} Song {a}-{t}.{fmt}"
                ));
                let got = std::fs::read(&in_view)
                    .unwrap_or_else(|e| panic!("read {}: {e}", in_view.display()));
                let src = std::fs::read(lib.join(track(fmt, a, t))).expect("source");
                assert!(got == src, "{} differs from its track", in_view.display());
            }
        }
    }
    // Genre and year views, and paths looked up without a listing first.
    let genres = names(&views.join("genres"));
    assert!(
        !genres.is_empty() && !genres.iter().any(|g| g.is_empty()),
        "{genres:?}"
    );
    let year = tags(&c, &format!("/music/{}", track("flac", 1, 1)))["year"]
        .as_u64()
        .expect("year");
    assert!(views
        .join(format!("years/{year}/Artist 1/Album 1/01 Song 1-1.flac"))
        .is_file());
    assert!(!views.join("artists/Nobody").exists());

    // Read-only: no writes, creates, removes or renames inside a view.
    let some = album.join("01 Song 2-1.flac");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&some)
        .expect_err("a view is read-only");
    assert!(
        e.raw_os_error() == Some(libc::EROFS) || e.raw_os_error() == Some(libc::EACCES),
        "{e}"
    );
    let e = std::fs::create_dir(album.join("new")).expect_err("no mkdir in a view");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::remove_file(&some).expect_err("no unlink in a view");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // The kernel forgets what it no longer caches (dropping its dentries
    // and inodes sends FUSE forgets); the views find their paths again.
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop the kernel's caches (root)");
    assert_eq!(names(&album).len(), want.len(), "the album after forgets");
    assert!(std::fs::read(album.join("cover.jpg")).expect("cover again") == cover);

    // `tag set` on a FLAC and an MP3 track: a valid file with the new tags
    // in front of the same audio bytes, and only kilobytes sent.
    for (fmt, start) in [
        ("flac", flac_audio_start as fn(&[u8]) -> usize),
        ("mp3", mp3_audio_start),
    ] {
        let path = format!("/music/{}", track(fmt, 1, 1));
        let before = fs.read_file(&path).await.expect("read");
        let r = report(
            &c,
            &[
                "tag",
                "set",
                "--json",
                &path,
                "title=A retitled song",
                "year=2001",
            ],
        );
        let sent = r["bytes_sent"].as_u64().expect("bytes_sent");
        eprintln!("tag set on {fmt}: {sent} bytes of new chunk data sent");
        assert!(sent < 16 << 10, "{fmt}: {sent} bytes sent for a title edit");
        assert_eq!(r["title"], "A retitled song", "{r}");
        let after = fs.read_file(&path).await.expect("read");
        assert!(
            before[start(&before)..] == after[start(&after)..],
            "{fmt}: the audio bytes changed"
        );
        let local = tmp.path().join(format!("edited.{fmt}"));
        std::fs::write(&local, &after).expect("write local copy");
        let t = musicfs_client::tags::read(&local).expect("lofty reads the edited file");
        assert_eq!((t.title.as_str(), t.year), ("A retitled song", 2001));
        assert_eq!(t.artist, "Artist 1", "{fmt}: other tags kept");
        if fmt == "flac" {
            run("flac", &["-t", "-s", local.to_str().expect("utf-8")]);
        }
        assert_eq!(tags(&c, &path)["title"], "A retitled song");
    }
    // Ogg re-paginates on a re-tag: still a valid stream.
    let ogg = format!("/music/{}", track("ogg", 1, 1));
    report(&c, &["tag", "set", "--json", &ogg, "title=A retitled song"]);
    let local = tmp.path().join("edited.ogg");
    std::fs::write(&local, fs.read_file(&ogg).await.expect("read")).expect("write");
    run("ogginfo", &["-q", local.to_str().expect("utf-8")]);
    assert_eq!(
        search(&c, &["title:retitled"]).len(),
        3,
        "search sees the new titles"
    );
    // The feed reports the three edits (content and tags), and only them.
    let edits = watch(&c, &cursor);
    for fmt in ["flac", "mp3", "ogg"] {
        let path = format!("/music/{}", track(fmt, 1, 1));
        let n = |kind: &str| {
            edits
                .iter()
                .filter(|e| e["kind"] == kind && e["path"] == path.as_str())
                .count()
        };
        assert!(n("modified") >= 1, "{path} modified: {edits:?}");
        assert_eq!(n("retagged"), 1, "{path} retagged once: {edits:?}");
    }
    assert!(
        edits.iter().all(|e| e["path"]
            .as_str()
            .is_some_and(|p| p.contains("/Artist 1/Album 1/01 Song 1-1."))),
        "{edits:?}"
    );
    report_ok(&c, &["rm", &format!("/music/{}", track("opus", 2, 2))]);
    let gone = watch(&c, &cursor);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0]["kind"], "deleted");
    assert_eq!(gone[0]["path"], format!("/music/{}", track("opus", 2, 2)));
    // The view follows: the renamed tracks appear under their new names.
    let renamed = views.join("artists/Artist 1/Album 1/01 A retitled song.flac");
    common::wait_for(
        "the re-tagged track under its new name in the view",
        std::time::Duration::from_secs(20),
        || {
            let ok = renamed.is_file();
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert!(views.join("years/2001/Artist 1/Album 1").is_dir());

    // Bad input is refused and changes nothing.
    let out = musicfs(&c, &["tag", "set", &ogg, "colour=blue"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be set"));
    let cover = fs.read_file("/music/cover1.jpg").await.expect("cover");
    let out = musicfs(&c, &["tag", "set", "/music/cover1.jpg", "title=x"]);
    assert!(!out.status.success(), "a picture has no tags to set");
    assert!(fs.read_file("/music/cover1.jpg").await.expect("cover") == cover);
    // Building the index again is harmless: every group already has it.
    report_ok(&c, &["tag", "reindex"]);
    drop(m);
}

/// `musicfs watch --json` from the cursor file: the changes it reports.
fn watch(c: &TestCluster, cursor: &Path) -> Vec<serde_json::Value> {
    let cursor = cursor.to_str().expect("utf-8");
    json_lines(c, &["watch", "--json", "--cursor", cursor], |code| {
        code == 0
    })
}

fn report_ok(c: &TestCluster, args: &[&str]) {
    let out = musicfs(c, args);
    assert!(
        out.status.success(),
        "musicfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
