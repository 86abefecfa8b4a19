//! Music tags in a group's state machine: stored per regular file, gone
//! with the inode, searched in pages.

use musicfs_node::namespace::{keys, KvRead, MemKv, Namespace};
use proto::meta::{
    command::Op, query::Q, Command, CommandResult, CreateOp, Error as WireError, ErrorCode,
    FileKind, GetTagsQuery, InitOp, Query, QueryResult, RemoveOp, SearchQuery, SetTagsOp, TagTerm,
    Tags, Timespec,
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
    g.apply(Op::Remove(RemoveOp {
        parent: ROOT_INO,
        name: b"t0.flac".to_vec().into(),
        dir: false,
    }))
    .expect("unlink");
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
