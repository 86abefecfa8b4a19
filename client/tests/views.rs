//! Tag views through the client core, on a library big enough that the
//! first level of a view takes several pages: every artist once, in
//! order, across page boundaries and groups; names that need cleaning
//! (a `/` in a value, a missing value) found again by lookup.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestCluster;
use musicfs_client::fs::NewEntry;
use musicfs_client::views::Views;
use proto::meta::{FileKind, Tags};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_pages_through_thousands_of_artists_once_each() {
    let c = TestCluster::start(3, &[]).await;
    c.init_groups(4).await;
    let fs = c.client(Duration::from_secs(30)).await;
    // 2,500 artists of one track each, in four album directories (four
    // groups), plus one "AC/DC" and one track without an artist.
    let mut tracks = Vec::new();
    for d in 0..4u32 {
        let dir = fs
            .create(
                proto::ROOT_INO,
                format!("d{d}").as_bytes(),
                FileKind::Directory,
                0o755,
                0,
                0,
                0,
                b"",
            )
            .await
            .expect("mkdir");
        let entries: Vec<NewEntry> = (0..627u32)
            .map(|i| NewEntry::new(format!("t{i}.flac"), FileKind::Regular, 0o644))
            .collect();
        for (i, r) in fs
            .create_many(dir.ino, &entries)
            .await
            .expect("create")
            .into_iter()
            .enumerate()
        {
            let n = d * 627 + i as u32;
            let artist = match n {
                2500 => "AC/DC".to_string(),
                2501 => String::new(),
                n if n > 2501 => continue,
                n => format!("Artist {n:05}"),
            };
            let t = Tags {
                artist,
                album: format!("Album {n}"),
                title: format!("Song {n}"),
                track: 1,
                codec: "flac".into(),
                ..Default::default()
            };
            tracks.push((r.expect("created").ino, t));
        }
    }
    fs.set_tags_many(tracks).await.expect("tags");
    fs.enable_views(Views::defaults(".views"));
    let artists = fs
        .resolve(".views/artists")
        .await
        .expect("the artists view");

    let mut seen = Vec::new();
    let mut after = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100, "the listing does not end");
        let (page, more) = fs
            .readdir(artists.ino, &after, 1000, true)
            .await
            .expect("readdir");
        for e in &page {
            seen.push(String::from_utf8_lossy(&e.name).into_owned());
            assert_eq!(e.attr.expect("attributes").kind, FileKind::Directory as i32);
        }
        match page.last() {
            Some(l) if more => after = l.name.to_vec(),
            _ => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an artist listed twice");
    assert_eq!(seen.len(), 2502, "2,500 artists, AC_DC and the unknown");
    // In the index's order (normalized values): the missing artist (empty)
    // first, "ac/dc" before "artist ...", the rest in order.
    assert_eq!(seen[..2], ["Unknown Artist", "AC_DC"]);
    assert!(
        seen[2..].windows(2).all(|w| w[0] < w[1]),
        "artists out of order"
    );

    // Each kind of name leads to its track.
    for (artist, album, file) in [
        ("Artist 01234", "Album 1234", "01 Song 1234.flac"),
        ("AC_DC", "Album 2500", "01 Song 2500.flac"),
        ("Unknown Artist", "Album 2501", "01 Song 2501.flac"),
    ] {
        let path = format!(".views/artists/{artist}/{album}/{file}");
        let a = fs
            .resolve(&path)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(a.kind, FileKind::Regular as i32, "{path}");
        assert_eq!(a.perm & 0o222, 0, "{path} is read-only");
    }
    let e = fs
        .resolve(".views/artists/Artist 99999")
        .await
        .expect_err("no such artist");
    assert_eq!(e.code(), Some(proto::meta::ErrorCode::NotFound), "{e}");
}
