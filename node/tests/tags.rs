//! Music tags in a group's state machine: stored per regular file, gone
//! with the inode, searched in pages.

use musicfs_node::namespace::{keys, KvRead, MemKv, Namespace};
use proto::meta::{
    command::Op, query::Q, ChangeKind, ChangesQuery, Command, CommandResult, CommitLayoutOp,
    CreateOp, Error as WireError, ErrorCode, FileKind, GetTagsQuery, IndexTagsOp, InitOp, Query,
    QueryResult, RemoveOp, RenameOp, SearchQuery, SetTagsBatchOp, SetTagsOp, TagTerm,
    TagTracksQuery, TagValuesQuery, Tags, Timespec,
};
use proto::ROOT_INO;

struct Group(MemKv);

impl Group {
    fn new() -> Group {
        let mut g = Group(MemKv::default());
        g.apply(Op::Init(InitOp {
            cluster_id: "test".into(),
            group_id: 0,
            group_count: 1,
            ..Default::default()
        }))
        .expect("init");
        g
    }

    fn apply(&mut self, op: Op) -> Result<CommandResult, WireError> {
        let cmd = Command {
            version: 1,
            now: Some(Timespec {
                sec: 1_700_000_000,
                nsec: 0,
            }),
            op: Some(op),
            ..Default::default()
        };
        let (writes, r) = Namespace::new(0)
            .apply_request(&self.0, &cmd)
            .expect("storage");
        self.0.apply_writes(writes);
        match r.error {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    fn query(&self, q: Q) -> Result<QueryResult, String> {
        Namespace::new(0)
            .query(&self.0, &Query { q: Some(q) })
            .map_err(|e| e.to_string())
    }

    fn unlink(&mut self, name: &str) -> Result<CommandResult, WireError> {
        self.apply(Op::Remove(RemoveOp {
            parent: ROOT_INO,
            name: name.as_bytes().to_vec().into(),
            dir: false,
        }))
    }

    fn create(&mut self, name: &str, kind: FileKind) -> u64 {
        let r = self
            .apply(Op::Create(CreateOp {
                parent: ROOT_INO,
                name: name.as_bytes().to_vec().into(),
                kind: kind as i32,
                perm: 0o644,
                ..Default::default()
            }))
            .expect("create");
        r.attr.expect("attr").ino
    }
}

fn track(artist: &str, year: u32) -> Tags {
    Tags {
        artist: artist.into(),
        title: format!("a song of {year}"),
        year,
        ..Default::default()
    }
}

fn term(field: &str, value: &str) -> TagTerm {
    TagTerm {
        field: field.into(),
        value: value.into(),
    }
}

#[test]
fn tags_are_kept_per_file_searched_in_pages_and_dropped_with_the_inode() {
    let mut g = Group::new();
    let mut inos = Vec::new();
    for i in 0..5u32 {
        let ino = g.create(&format!("t{i}.flac"), FileKind::Regular);
        let artist = if i % 2 == 0 { "Björk" } else { "Portishead" };
        g.apply(Op::SetTags(SetTagsOp {
            ino,
            tags: Some(track(artist, 1993 + i)),
        }))
        .expect("set tags");
        inos.push(ino);
    }
    let got = g
        .query(Q::GetTags(GetTagsQuery { ino: inos[1] }))
        .expect("get");
    assert_eq!(got.tags, Some(track("Portishead", 1994)));

    // Only regular files have tags; a missing inode is NotFound.
    let dir = g.create("album", FileKind::Directory);
    let e = g
        .apply(Op::SetTags(SetTagsOp {
            ino: dir,
            tags: Some(track("x", 1)),
        }))
        .expect_err("a directory");
    assert_eq!(e.code(), ErrorCode::Invalid);
    let e = g
        .apply(Op::SetTags(SetTagsOp {
            ino: inos[4] + 1000,
            tags: Some(track("x", 1)),
        }))
        .expect_err("no such inode");
    assert_eq!(e.code(), ErrorCode::NotFound);

    // Search, one hit per page, following `next_ino`.
    let terms = vec![term("artist", "björk"), term("year", "1993..1996")];
    let mut found = Vec::new();
    let mut after = 0;
    for _ in 0..10 {
        let r = g
            .query(Q::Search(SearchQuery {
                terms: terms.clone(),
                after_ino: after,
                limit: 1,
            }))
            .expect("search");
        found.extend(r.tracks.iter().map(|h| h.ino));
        if !r.more {
            break;
        }
        after = r.next_ino;
    }
    assert_eq!(
        found,
        vec![inos[0], inos[2]],
        "1993 and 1995 (1997 is out of range)"
    );
    let bad = g.query(Q::Search(SearchQuery {
        terms: vec![term("year", "soon")],
        after_ino: 0,
        limit: 10,
    }));
    assert!(bad.is_err_and(|e| e.contains("not a number")));

    // Unlinking the file drops its tags with the inode; forgetting works too.
    g.unlink("t0.flac").expect("unlink");
    g.apply(Op::SetTags(SetTagsOp {
        ino: inos[1],
        tags: None,
    }))
    .expect("forget");
    let left: Vec<u64> =
        g.0.scan(&keys::tags_prefix(0), &[], 100)
            .expect("scan")
            .into_iter()
            .map(|(k, _)| u64::from_be_bytes(k[5..].try_into().expect("ino")))
            .collect();
    assert_eq!(left, vec![inos[2], inos[3], inos[4]]);
}

fn values(g: &Group, field: &str) -> Vec<(String, u64)> {
    let r = g
        .query(Q::TagValues(TagValuesQuery {
            field: field.into(),
            after: None,
            limit: 100,
        }))
        .expect("values");
    r.values.into_iter().map(|v| (v.value, v.count)).collect()
}

fn tracks_of(g: &Group, field: &str, value: &str) -> Vec<u64> {
    let r = g
        .query(Q::TagTracks(TagTracksQuery {
            field: field.into(),
            value: value.into(),
            after_ino: 0,
            limit: 100,
        }))
        .expect("tracks");
    r.tracks.into_iter().map(|h| h.ino).collect()
}

fn assert_consistent(g: &Group) {
    let report = musicfs_node::check::check(&g.0).expect("check");
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn the_tag_index_follows_every_change_and_answers_views_and_search() {
    let mut g = Group::new();
    let mut inos = Vec::new();
    for (i, artist) in ["Björk", "björk", "Portishead", ""].iter().enumerate() {
        let ino = g.create(&format!("t{i}.flac"), FileKind::Regular);
        g.apply(Op::SetTags(SetTagsOp {
            ino,
            tags: Some(track(artist, if i == 3 { 0 } else { 1993 + i as u32 })),
        }))
        .expect("set tags");
        inos.push(ino);
    }
    assert_consistent(&g);
    // Case-insensitive values, the first spelling kept, missing ones empty.
    assert_eq!(
        values(&g, "artist"),
        vec![
            (String::new(), 1),
            ("Björk".into(), 2),
            ("Portishead".into(), 1)
        ]
    );
    assert_eq!(
        values(&g, "year"),
        vec![
            (String::new(), 1),
            ("1993".into(), 1),
            ("1994".into(), 1),
            ("1995".into(), 1)
        ]
    );
    // Album artist falls back to the artist.
    assert_eq!(
        tracks_of(&g, "albumartist", "BJÖRK"),
        vec![inos[0], inos[1]]
    );
    assert_eq!(tracks_of(&g, "year", "1995"), vec![inos[2]]);
    // Paging distinct values with a cursor, the empty value included.
    let first = g
        .query(Q::TagValues(TagValuesQuery {
            field: "artist".into(),
            after: None,
            limit: 1,
        }))
        .expect("page 1");
    assert!(first.more);
    assert_eq!(first.values[0].value, "");
    let second = g
        .query(Q::TagValues(TagValuesQuery {
            field: "artist".into(),
            after: Some(first.values[0].key.clone()),
            limit: 1,
        }))
        .expect("page 2");
    assert_eq!(second.values[0].value, "Björk");

    // A re-tag moves the track; the last track of a value takes it away.
    g.apply(Op::SetTags(SetTagsOp {
        ino: inos[2],
        tags: Some(track("Björk", 1995)),
    }))
    .expect("re-tag");
    assert_eq!(
        values(&g, "artist"),
        vec![(String::new(), 1), ("Björk".into(), 3)]
    );
    // Search through the index and through the records agree.
    let hits = |terms: Vec<TagTerm>| -> Vec<u64> {
        g.query(Q::Search(SearchQuery {
            terms,
            after_ino: 0,
            limit: 100,
        }))
        .expect("search")
        .tracks
        .into_iter()
        .map(|h| h.ino)
        .collect()
    };
    assert_eq!(
        hits(vec![term("artist", "jör"), term("year", "1994..")]),
        vec![inos[1], inos[2]]
    );
    assert_eq!(hits(vec![term("any", "song of 1993")]), vec![inos[0]]);
    assert_eq!(
        hits(vec![term("codec", "")]).len(),
        4,
        "not indexed: scanned"
    );

    // Unlink drops the postings; the checker agrees at every step.
    g.unlink("t0.flac").expect("unlink");
    assert_eq!(tracks_of(&g, "artist", "björk"), vec![inos[1], inos[2]]);
    assert_consistent(&g);
    let e = g
        .query(Q::TagValues(TagValuesQuery {
            field: "codec".into(),
            after: None,
            limit: 10,
        }))
        .expect_err("not indexed");
    assert!(e.contains("not an indexed tag field"), "{e}");
}

#[test]
fn tags_stored_before_the_index_are_indexed_by_reindex() {
    let mut g = Group::new();
    let mut inos = Vec::new();
    for i in 0..5u32 {
        let ino = g.create(&format!("t{i}.flac"), FileKind::Regular);
        g.apply(Op::SetTags(SetTagsOp {
            ino,
            tags: Some(track(if i < 3 { "Low" } else { "Lush" }, 1990 + i)),
        }))
        .expect("set tags");
        inos.push(ino);
    }
    // A group as an older version left it: tags, no index, no marker.
    let old: Vec<Vec<u8>> =
        g.0 .0
            .keys()
            .filter(|k| {
                matches!(
                    k[4],
                    keys::TAG_POSTING | keys::TAG_VALUE | keys::TAG_DISTINCT
                )
            })
            .cloned()
            .collect();
    assert!(!old.is_empty());
    for k in old {
        g.0 .0.remove(&k);
    }
    assert_consistent(&g); // not built yet is not broken
    let e = g
        .query(Q::TagValues(TagValuesQuery {
            field: "artist".into(),
            after: None,
            limit: 10,
        }))
        .expect_err("no index yet");
    assert!(e.contains("musicfs tag reindex"), "{e}");
    // Search still answers, from the records.
    let r = g
        .query(Q::Search(SearchQuery {
            terms: vec![term("artist", "low")],
            after_ino: 0,
            limit: 10,
        }))
        .expect("search");
    assert_eq!(r.tracks.len(), 3);
    // A track re-tagged meanwhile is indexed once, not twice.
    g.apply(Op::SetTags(SetTagsOp {
        ino: inos[4],
        tags: Some(track("Lush", 1994)),
    }))
    .expect("re-tag");
    let mut after = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls < 20, "reindex does not finish");
        let r = g
            .apply(Op::IndexTags(IndexTagsOp {
                after_ino: after,
                limit: 2,
            }))
            .expect("index");
        if r.done {
            break;
        }
        after = r.next_ino;
    }
    assert_eq!(calls, 3, "five records, two a call");
    assert_eq!(
        values(&g, "artist"),
        vec![("Low".into(), 3), ("Lush".into(), 2)]
    );
    assert_consistent(&g);
    // Once built, another run changes nothing.
    let before = g.0.clone();
    let r = g
        .apply(Op::IndexTags(IndexTagsOp {
            after_ino: 0,
            limit: 2,
        }))
        .expect("again");
    assert!(r.done);
    assert_eq!(before.0, g.0 .0);
}

fn changes(g: &Group, after: u64) -> Vec<(ChangeKind, u64, String)> {
    g.query(Q::Changes(ChangesQuery {
        after_seq: after,
        limit: 1000,
    }))
    .expect("changes")
    .changes
    .into_iter()
    .map(|e| {
        let kind = ChangeKind::try_from(e.kind).expect("kind");
        let what = match kind {
            ChangeKind::Retagged => e.path,
            _ => String::from_utf8_lossy(&e.name).into_owned(),
        };
        (kind, e.seq, what)
    })
    .collect()
}

#[test]
fn the_change_feed_has_each_change_once_in_apply_order() {
    let mut g = Group::new();
    let start = changes(&g, 0).len() as u64;
    let ino = g.create("a.flac", FileKind::Regular);
    g.apply(Op::CommitLayout(CommitLayoutOp {
        ino,
        size: 0,
        hint_parent: ROOT_INO,
        hint_name: b"a.flac".to_vec().into(),
        ..Default::default()
    }))
    .expect("commit");
    let mut t = track("Low", 1994);
    t.path = "/a.flac".into();
    g.apply(Op::SetTags(SetTagsOp {
        ino,
        tags: Some(t.clone()),
    }))
    .expect("tags");
    // The same tags again change nothing, so they are no event.
    g.apply(Op::SetTags(SetTagsOp { ino, tags: Some(t) }))
        .expect("same tags");
    g.apply(Op::Rename(RenameOp {
        parent: ROOT_INO,
        name: b"a.flac".to_vec().into(),
        new_parent: ROOT_INO,
        new_name: b"b.flac".to_vec().into(),
        ..Default::default()
    }))
    .expect("rename");
    g.unlink("b.flac").expect("unlink");
    // A refused command is no event either.
    g.unlink("b.flac").expect_err("gone");
    let got = changes(&g, start);
    let kinds: Vec<(ChangeKind, String)> = got.iter().map(|(k, _, w)| (*k, w.clone())).collect();
    assert_eq!(
        kinds,
        vec![
            (ChangeKind::Created, "a.flac".into()),
            (ChangeKind::Modified, "a.flac".into()),
            (ChangeKind::Retagged, "/a.flac".into()),
            (ChangeKind::Deleted, "a.flac".into()),
            (ChangeKind::Created, "b.flac".into()),
            (ChangeKind::Deleted, "b.flac".into()),
        ]
    );
    let seqs: Vec<u64> = got.iter().map(|(_, s, _)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // Reading on from a cursor gives what came after it, once.
    let third = seqs[2];
    assert_eq!(changes(&g, third).len(), 3);
    let last = *seqs.last().expect("seq");
    assert!(changes(&g, last).is_empty());
    // Forgetting a file's tags is a change of its tags too.
    let c = g.create("c.flac", FileKind::Regular);
    let mut t = track("Low", 1994);
    t.path = "/c.flac".into();
    g.apply(Op::SetTags(SetTagsOp {
        ino: c,
        tags: Some(t),
    }))
    .expect("tags");
    g.apply(Op::SetTags(SetTagsOp { ino: c, tags: None }))
        .expect("forget");
    let kinds: Vec<(ChangeKind, String)> = changes(&g, last)
        .into_iter()
        .map(|(k, _, w)| (k, w))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ChangeKind::Created, "c.flac".into()),
            (ChangeKind::Retagged, "/c.flac".into()),
            (ChangeKind::Retagged, "/c.flac".into()),
        ]
    );
    assert_consistent(&g);
}

#[test]
fn a_tag_batch_applies_whole_or_not_at_all() {
    let mut g = Group::new();
    let a = g.create("a.flac", FileKind::Regular);
    let b = g.create("b.flac", FileKind::Regular);
    let dir = g.create("album", FileKind::Directory);
    let item = |ino: u64, artist: &str| SetTagsOp {
        ino,
        tags: Some(track(artist, 2000)),
    };
    let e = g
        .apply(Op::SetTagsBatch(SetTagsBatchOp {
            items: vec![item(a, "Air"), item(dir, "Air")],
        }))
        .expect_err("a directory in the batch");
    assert_eq!(e.code(), ErrorCode::Invalid);
    assert!(values(&g, "artist").is_empty(), "nothing applied");
    g.apply(Op::SetTagsBatch(SetTagsBatchOp {
        items: vec![item(a, "Air"), item(b, "Air")],
    }))
    .expect("batch");
    assert_eq!(values(&g, "artist"), vec![("Air".into(), 2)]);
    assert_consistent(&g);
}
