//! What the workload does and what each operation may return: the
//! operations, their outcomes, and the sequential specifications the
//! checker holds the history to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lin::Model;

/// An operation as the client issued it. Namespace operations name
/// entries `(directory, name)` by small indices; data operations name one
/// of the fixed data files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Input {
    Create {
        d: u8,
        n: u8,
    },
    Mkdir {
        d: u8,
        n: u8,
    },
    Unlink {
        d: u8,
        n: u8,
    },
    Rmdir {
        d: u8,
        n: u8,
    },
    Rename {
        d: u8,
        n: u8,
        d2: u8,
        n2: u8,
    },
    Lookup {
        d: u8,
        n: u8,
    },
    Readdir {
        d: u8,
    },
    /// Overwrites a data file whole with the content of `tag`.
    Write {
        f: u8,
        tag: u64,
    },
    Read {
        f: u8,
    },
}

impl Input {
    /// Whether the operation can change state (an unknown outcome of one
    /// that cannot is simply dropped).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Input::Lookup { .. } | Input::Readdir { .. } | Input::Read { .. }
        )
    }

    /// Which independent part of the state it touches: the namespace of
    /// one set of directories, or one data file.
    pub fn partition(&self, fuse_dirs: u8) -> Partition {
        match self {
            Input::Write { f, .. } | Input::Read { f } => Partition::File(*f),
            Input::Create { d, .. }
            | Input::Mkdir { d, .. }
            | Input::Unlink { d, .. }
            | Input::Rmdir { d, .. }
            | Input::Rename { d, .. }
            | Input::Lookup { d, .. }
            | Input::Readdir { d } => {
                if *d >= fuse_dirs {
                    Partition::FuseNamespace
                } else {
                    Partition::Namespace
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Partition {
    Namespace,
    /// The directories only the FUSE client uses.
    FuseNamespace,
    File(u8),
}

/// A definite outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "is", rename_all = "snake_case")]
pub enum Output {
    Done,
    /// A new entry's inode.
    Created {
        ino: u64,
    },
    Found {
        dir: bool,
        ino: u64,
    },
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Listing {
        entries: Vec<(u8, bool, u64)>,
    },
    /// The tag whose content a read returned, intact.
    Value {
        tag: u64,
    },
    /// A read returned bytes no write produced.
    Corrupt {
        why: String,
    },
}

/// One entry of the modelled namespace: a file or an (always empty)
/// directory, and its inode (0: created by an operation whose outcome is
/// unknown, so any inode matches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub dir: bool,
    pub ino: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsState {
    pub entries: BTreeMap<(u8, u8), Entry>,
}

/// The namespace: directories never removed, each holding entries by
/// small name index; entries are files or empty directories.
pub struct Namespace;

fn same_ino(model: u64, seen: u64) -> bool {
    model == 0 || model == seen
}

impl Model for Namespace {
    type State = NsState;
    type Input = Input;
    type Output = Output;

    fn step(&self, s: &NsState, i: &Input, o: Option<&Output>) -> Vec<NsState> {
        let outcome = |o: &Output| step_ns(s, i, Some(o));
        match o {
            Some(o) => outcome(o).into_iter().collect(),
            // Unknown: it did not happen, or it did with whatever outcome
            // the state allows.
            None => {
                let mut v = vec![s.clone()];
                if let Some(after) = step_ns(s, i, None) {
                    if after != *s {
                        v.push(after);
                    }
                }
                v
            }
        }
    }
}

/// The state after `i` returned `o` (`None`: the outcome the state
/// dictates, inode unknown), or `None` when `o` is impossible.
fn step_ns(s: &NsState, i: &Input, o: Option<&Output>) -> Option<NsState> {
    use Output as O;
    let mut next = s.clone();
    let get = |d: u8, n: u8| s.entries.get(&(d, n)).copied();
    match *i {
        Input::Create { d, n } | Input::Mkdir { d, n } => {
            let dir = matches!(i, Input::Mkdir { .. });
            match (get(d, n), o) {
                (None, Some(O::Created { ino })) => {
                    next.entries.insert((d, n), Entry { dir, ino: *ino });
                }
                (None, None) => {
                    next.entries.insert((d, n), Entry { dir, ino: 0 });
                }
                (Some(_), Some(O::Exists)) | (Some(_), None) => {}
                _ => return None,
            }
        }
        Input::Unlink { d, n } | Input::Rmdir { d, n } => {
            let want_dir = matches!(i, Input::Rmdir { .. });
            match (get(d, n), o) {
                (None, Some(O::NotFound)) | (None, None) => {}
                (Some(e), Some(O::Done)) | (Some(e), None) if e.dir == want_dir => {
                    next.entries.remove(&(d, n));
                }
                (Some(e), Some(O::IsDir)) | (Some(e), None) if e.dir && !want_dir => {}
                (Some(e), Some(O::NotDir)) | (Some(e), None) if !e.dir && want_dir => {}
                _ => return None,
            }
        }
        Input::Rename { d, n, d2, n2 } => {
            let (src, dst) = (get(d, n), get(d2, n2));
            let Some(src) = src else {
                return matches!(o, Some(O::NotFound) | None).then_some(next);
            };
            if (d, n) == (d2, n2) {
                return matches!(o, Some(O::Done) | None).then_some(next);
            }
            let expect = match dst {
                Some(t) if src.dir && !t.dir => O::NotDir,
                Some(t) if !src.dir && t.dir => O::IsDir,
                // Directories here are always empty, so one may replace another.
                _ => O::Done,
            };
            if let Some(o) = o {
                if *o != expect {
                    return None;
                }
            }
            if expect == O::Done {
                next.entries.remove(&(d, n));
                next.entries.insert((d2, n2), src);
            }
        }
        Input::Lookup { d, n } => match (get(d, n), o) {
            (None, Some(O::NotFound)) => {}
            (Some(e), Some(O::Found { dir, ino })) if e.dir == *dir && same_ino(e.ino, *ino) => {}
            _ => return None,
        },
        Input::Readdir { d } => {
            let Some(O::Listing { entries }) = o else {
                return None;
            };
            let want: Vec<(u8, bool)> = s
                .entries
                .range((d, 0)..=(d, u8::MAX))
                .map(|(&(_, n), e)| (n, e.dir))
                .collect();
            let got: Vec<(u8, bool)> = entries.iter().map(|&(n, dir, _)| (n, dir)).collect();
            if want != got {
                return None;
            }
            for &(n, _, ino) in entries {
                if !same_ino(s.entries[&(d, n)].ino, ino) {
                    return None;
                }
            }
        }
        Input::Write { .. } | Input::Read { .. } => return None,
    }
    Some(next)
}

/// One data file: a register holding the tag of its last whole write.
pub struct DataFile;

impl Model for DataFile {
    type State = u64;
    type Input = Input;
    type Output = Output;

    fn step(&self, s: &u64, i: &Input, o: Option<&Output>) -> Vec<u64> {
        match (i, o) {
            (Input::Write { tag, .. }, Some(Output::Done)) => vec![*tag],
            (Input::Write { tag, .. }, None) => vec![*s, *tag],
            (Input::Read { .. }, Some(Output::Value { tag })) if tag == s => vec![*s],
            _ => vec![],
        }
    }
}

/// The bytes a write of `tag` puts in data file `f`: a header naming both
/// and a body derived from them, so any read can tell which write it saw
/// and whether every byte is that write's.
pub fn content(f: u8, tag: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"MUSICFS-CHAOS");
    out.push(f);
    out.extend_from_slice(&tag.to_le_bytes());
    musicfs_client::pattern::fill(&mut out, tag ^ ((f as u64) << 56), len);
    out
}

/// Which write's content `data` is, or why it is none.
pub fn identify(f: u8, data: &[u8], len: usize) -> Output {
    const HDR: usize = 13 + 1 + 8;
    if data.len() != len {
        return Output::Corrupt {
            why: format!("{} bytes, every write has {len}", data.len()),
        };
    }
    if &data[..13] != b"MUSICFS-CHAOS" || data[13] != f {
        return Output::Corrupt {
            why: "no header of a write to this file".into(),
        };
    }
    let tag = u64::from_le_bytes(data[14..HDR].try_into().expect("8 bytes"));
    if data != content(f, tag, len).as_slice() {
        return Output::Corrupt {
            why: format!("header of write {tag}, but other bytes"),
        };
    }
    Output::Value { tag }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lin::{check, Event, Verdict};
    use std::time::Duration;

    fn ev(
        id: usize,
        call: u64,
        ret: Option<u64>,
        input: Input,
        out: Option<Output>,
    ) -> Event<Input, Output> {
        Event {
            call,
            ret,
            input,
            output: out,
            id,
        }
    }

    #[test]
    fn content_round_trips_and_damage_is_named() {
        let c = content(2, 77, 3000);
        assert_eq!(identify(2, &c, 3000), Output::Value { tag: 77 });
        let mut bad = c.clone();
        bad[2000] ^= 1;
        assert!(matches!(identify(2, &bad, 3000), Output::Corrupt { .. }));
        assert!(matches!(identify(3, &c, 3000), Output::Corrupt { .. }));
        assert!(matches!(
            identify(2, &c[..100], 3000),
            Output::Corrupt { .. }
        ));
    }

    #[test]
    fn rename_moves_the_inode_and_lookups_follow_it() {
        use Input::*;
        let h = vec![
            ev(
                0,
                0,
                Some(1),
                Create { d: 0, n: 0 },
                Some(Output::Created { ino: 5 }),
            ),
            ev(
                1,
                2,
                Some(3),
                Rename {
                    d: 0,
                    n: 0,
                    d2: 1,
                    n2: 4,
                },
                Some(Output::Done),
            ),
            ev(
                2,
                4,
                Some(5),
                Lookup { d: 1, n: 4 },
                Some(Output::Found { dir: false, ino: 5 }),
            ),
            ev(3, 6, Some(7), Lookup { d: 0, n: 0 }, Some(Output::NotFound)),
            ev(
                4,
                8,
                Some(9),
                Readdir { d: 1 },
                Some(Output::Listing {
                    entries: vec![(4, false, 5)],
                }),
            ),
        ];
        assert_eq!(
            check(&Namespace, NsState::default(), &h, Duration::from_secs(5)),
            Verdict::Linearizable
        );
    }

    #[test]
    fn a_lost_create_is_caught() {
        use Input::*;
        // Acknowledged, then gone without an unlink.
        let h = vec![
            ev(
                0,
                0,
                Some(1),
                Create { d: 0, n: 0 },
                Some(Output::Created { ino: 5 }),
            ),
            ev(1, 2, Some(3), Lookup { d: 0, n: 0 }, Some(Output::NotFound)),
        ];
        assert!(matches!(
            check(&Namespace, NsState::default(), &h, Duration::from_secs(5)),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn directories_and_files_do_not_replace_each_other() {
        use Input::*;
        let h = vec![
            ev(
                0,
                0,
                Some(1),
                Mkdir { d: 0, n: 1 },
                Some(Output::Created { ino: 9 }),
            ),
            ev(
                1,
                2,
                Some(3),
                Create { d: 0, n: 2 },
                Some(Output::Created { ino: 10 }),
            ),
            ev(
                2,
                4,
                Some(5),
                Rename {
                    d: 0,
                    n: 2,
                    d2: 0,
                    n2: 1,
                },
                Some(Output::IsDir),
            ),
            ev(
                3,
                6,
                Some(7),
                Rename {
                    d: 0,
                    n: 1,
                    d2: 0,
                    n2: 2,
                },
                Some(Output::NotDir),
            ),
            ev(4, 8, Some(9), Unlink { d: 0, n: 1 }, Some(Output::IsDir)),
            ev(5, 10, Some(11), Rmdir { d: 0, n: 2 }, Some(Output::NotDir)),
            ev(6, 12, None, Rmdir { d: 0, n: 1 }, None),
            ev(
                7,
                14,
                Some(15),
                Mkdir { d: 0, n: 1 },
                Some(Output::Created { ino: 11 }),
            ),
        ];
        assert_eq!(
            check(&Namespace, NsState::default(), &h, Duration::from_secs(5)),
            Verdict::Linearizable
        );
    }

    #[test]
    fn data_file_register() {
        use Input::*;
        let ok = vec![
            ev(0, 0, Some(4), Write { f: 0, tag: 3 }, Some(Output::Done)),
            ev(1, 1, Some(2), Read { f: 0 }, Some(Output::Value { tag: 0 })),
            ev(2, 5, Some(6), Read { f: 0 }, Some(Output::Value { tag: 3 })),
        ];
        assert_eq!(
            check(&DataFile, 0, &ok, Duration::from_secs(5)),
            Verdict::Linearizable
        );
        let lost = vec![
            ev(0, 0, Some(4), Write { f: 0, tag: 3 }, Some(Output::Done)),
            ev(1, 5, Some(6), Read { f: 0 }, Some(Output::Value { tag: 0 })),
        ];
        assert!(matches!(
            check(&DataFile, 0, &lost, Duration::from_secs(5)),
            Verdict::Violation { .. }
        ));
    }
}
