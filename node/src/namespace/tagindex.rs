//! The tag index of one group, kept in the same commands as the tags: for
//! each indexed field a posting per track (`S`: field, normalized value,
//! inode), a record per distinct value (`s`: its track count and the value
//! as first tagged) and the number of distinct values per field (`c`).
//!
//! Search reads the distinct values of its most selective term and the
//! postings of the values that match, instead of every tag record; tag
//! views list a field's distinct values and a value's tracks in pages.

use std::collections::BTreeSet;

use proto::meta::{
    CommandResult, IndexTagsOp, QueryResult, SearchQuery, TagTerm, TagTracksQuery, TagValue,
    TagValuesQuery, Tags, TrackHit,
};

use super::txn::u64_at;
use super::{decode, keys, KvRead, Namespace, NsError, Txn, MAX_SEARCH};

/// Indexed fields: (id in keys, query name).
pub const FIELDS: [(u8, &str); 6] = [
    (1, "artist"),
    (2, "albumartist"),
    (3, "album"),
    (4, "title"),
    (5, "genre"),
    (6, "year"),
];
const YEAR: u8 = 6;
/// What a bare word (`any`) matches: the text fields.
const ANY: [u8; 5] = [1, 2, 3, 4, 5];

/// An indexed field and a normalized value of it.
type FieldValue = (u8, Vec<u8>);

/// How many distinct values one candidate track costs as much as to read.
const VALUES_PER_CANDIDATE: u64 = 16;

/// Distinct values or postings read per page.
const PAGE: usize = 1000;
/// A search whose best term still names more tracks than this, or whose
/// terms have more distinct values than this to look through, reads the
/// tag records instead (bounded per call, as before the index).
const MAX_CANDIDATES: u64 = 100_000;

pub fn field_id(name: &str) -> Option<u8> {
    let name = if name == "album_artist" {
        "albumartist"
    } else {
        name
    };
    FIELDS.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
}

/// A value as the index orders and compares it (`proto::tags::index_norm`).
pub fn normalize(field: u8, value: &str) -> Option<Vec<u8>> {
    proto::tags::index_norm(field == YEAR, value)
}

/// The value of `field` in `t` as shown (album artist falls back to the
/// artist, as in beets' `$albumartist`; a missing year is empty).
pub fn value_of(t: &Tags, field: u8) -> String {
    match field {
        1 => t.artist.clone(),
        2 if t.album_artist.is_empty() => t.artist.clone(),
        2 => t.album_artist.clone(),
        3 => t.album.clone(),
        4 => t.title.clone(),
        5 => t.genre.clone(),
        _ if t.year == 0 => String::new(),
        _ => t.year.to_string(),
    }
}

/// The key (field 0 of the distinct counts) whose presence says the index
/// holds every tag record of the group: groups made before the index
/// existed lack it until `IndexTags` has gone through their records.
fn built_key(group: u32) -> Vec<u8> {
    keys::tag_distinct(group, 0)
}

pub fn is_built<R: KvRead + ?Sized>(kv: &R, group: u32) -> Result<bool, NsError> {
    Ok(kv.get(&built_key(group))?.is_some())
}

pub fn mark_built<R: KvRead + ?Sized>(txn: &mut Txn<'_, R>, group: u32) {
    txn.put_raw(built_key(group), 1u64.to_be_bytes().to_vec());
}

/// Whether `key` is the built marker (not an index entry).
pub fn is_marker(key: &[u8]) -> bool {
    key.len() == 6 && key[4] == keys::TAG_DISTINCT && key[5] == 0
}

/// The track count at the front of a value record.
fn count_of(v: &[u8]) -> u64 {
    u64_at(v, 0)
}

fn value_record(count: u64, display: &str) -> Vec<u8> {
    let mut v = count.to_be_bytes().to_vec();
    v.extend_from_slice(display.as_bytes());
    v
}

fn bump_distinct<R: KvRead + ?Sized>(
    txn: &mut Txn<'_, R>,
    group: u32,
    field: u8,
    up: bool,
) -> Result<(), NsError> {
    let key = keys::tag_distinct(group, field);
    let n = txn.get(&key)?.map(|v| count_of(&v)).unwrap_or(0);
    let n = if up { n + 1 } else { n.saturating_sub(1) };
    if n == 0 {
        txn.unput(key)?;
    } else {
        txn.put_raw(key, n.to_be_bytes().to_vec());
    }
    Ok(())
}

/// Adds (or with `add` false, removes) the postings of one track.
pub fn index<R: KvRead + ?Sized>(
    txn: &mut Txn<'_, R>,
    group: u32,
    ino: u64,
    tags: &Tags,
    add: bool,
) -> Result<(), NsError> {
    for (field, _) in FIELDS {
        let display = value_of(tags, field);
        let norm = normalize(field, &display).unwrap_or_default();
        let pkey = keys::posting(group, field, &norm, ino);
        // Adding what is there or removing what is not changes nothing, so
        // building the index over records indexed since is safe.
        if txn.get(&pkey)?.is_some() == add {
            continue;
        }
        let vkey = keys::tag_value(group, field, &norm);
        let old = txn.get(&vkey)?;
        let count = old.as_deref().map(count_of).unwrap_or(0);
        if add {
            txn.put_raw(pkey, Vec::new());
            match old {
                // Keeps the spelling the value was first tagged with.
                Some(mut v) => {
                    v[..8].copy_from_slice(&(count + 1).to_be_bytes());
                    txn.put_raw(vkey, v);
                }
                None => {
                    txn.put_raw(vkey, value_record(1, &display));
                    bump_distinct(txn, group, field, true)?;
                }
            }
        } else {
            txn.unput(pkey)?;
            match old {
                Some(mut v) if count > 1 => {
                    v[..8].copy_from_slice(&(count - 1).to_be_bytes());
                    txn.put_raw(vkey, v);
                }
                Some(_) => {
                    txn.unput(vkey)?;
                    bump_distinct(txn, group, field, false)?;
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Distinct values of one field in normalized order, after `after`
/// (`Some(empty)` starts after the empty value, `None` at the start).
fn values_page<R: KvRead + ?Sized>(
    kv: &R,
    group: u32,
    field: u8,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<TagValue>, NsError> {
    let prefix = keys::tag_values(group, field);
    let mut rows = kv.scan(&prefix, after.unwrap_or(&[]), limit + 1)?;
    // An empty cursor still has to skip the empty value itself.
    if after.is_some_and(|a| a.is_empty()) {
        rows.retain(|(k, _)| k.len() > prefix.len());
    }
    rows.truncate(limit);
    Ok(rows
        .into_iter()
        .map(|(k, v)| TagValue {
            key: k[prefix.len()..].to_vec().into(),
            count: count_of(&v),
            value: String::from_utf8_lossy(v.get(8..).unwrap_or_default()).into_owned(),
        })
        .collect())
}

/// Inodes with value `norm` of `field`, after `after_ino`.
fn postings_page<R: KvRead + ?Sized>(
    kv: &R,
    group: u32,
    field: u8,
    norm: &[u8],
    after_ino: u64,
    limit: usize,
) -> Result<Vec<u64>, NsError> {
    let prefix = keys::postings(group, field, norm);
    let after = if after_ino == 0 {
        Vec::new()
    } else {
        after_ino.to_be_bytes().to_vec()
    };
    let rows = kv.scan(&prefix, &after, limit)?;
    // A longer value that starts with `norm` and a zero byte shares the
    // prefix; only an inode (eight bytes) follows the value itself.
    Ok(rows
        .iter()
        .filter_map(|(k, _)| <[u8; 8]>::try_from(&k[prefix.len()..]).ok())
        .map(u64::from_be_bytes)
        .collect())
}

fn unknown(field: &str) -> NsError {
    let known: Vec<&str> = FIELDS.iter().map(|(_, n)| *n).collect();
    NsError::Invalid(format!(
        "{field:?} is not an indexed tag field (indexed: {})",
        known.join(", ")
    ))
}

/// Whether a normalized value matches a term on that field.
fn term_matches(field: u8, norm: &[u8], term: &TagTerm) -> bool {
    if field == YEAR {
        let y = std::str::from_utf8(norm)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        return proto::tags::range_of(&term.field, &term.value)
            .is_ok_and(|(lo, hi)| lo <= y && y <= hi);
    }
    let needle = term.value.to_lowercase();
    std::str::from_utf8(norm).is_ok_and(|s| s.contains(&needle))
}

/// The indexed fields a term can be answered from, if any.
fn term_fields(term: &TagTerm) -> Option<Vec<u8>> {
    match term.field.as_str() {
        "any" => Some(ANY.to_vec()),
        f => field_id(f).map(|id| vec![id]),
    }
}

impl Namespace {
    pub(super) fn index_tags<R: KvRead + ?Sized>(
        &self,
        txn: &mut Txn<'_, R>,
        op: &IndexTagsOp,
    ) -> Result<CommandResult, NsError> {
        if is_built(txn, self.group)? {
            return Ok(CommandResult {
                done: true,
                ..Default::default()
            });
        }
        let limit = (op.limit as usize).clamp(1, PAGE);
        let prefix = keys::tags_prefix(self.group);
        let after = if op.after_ino == 0 {
            Vec::new()
        } else {
            op.after_ino.to_be_bytes().to_vec()
        };
        let rows = txn.scan(&prefix, &after, limit)?;
        let mut next = op.after_ino;
        for (k, v) in &rows {
            let ino = <[u8; 8]>::try_from(&k[prefix.len()..])
                .map(u64::from_be_bytes)
                .map_err(|_| NsError::Invalid("malformed tags key".into()))?;
            let t: Tags = decode(k, v)?;
            index(txn, self.group, ino, &t, true)?;
            next = ino;
        }
        let done = rows.len() < limit;
        if done {
            mark_built(txn, self.group);
        }
        Ok(CommandResult {
            next_ino: next,
            done,
            ..Default::default()
        })
    }

    fn require_built<R: KvRead + ?Sized>(&self, kv: &R) -> Result<(), NsError> {
        if is_built(kv, self.group)? {
            return Ok(());
        }
        Err(NsError::Invalid(format!(
            "the tag index of group {} is not built yet (tags stored before \
             this version): run `musicfs tag reindex`",
            self.group
        )))
    }

    pub(super) fn tag_values<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &TagValuesQuery,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        let field = field_id(&q.field).ok_or_else(|| unknown(&q.field))?;
        self.require_built(kv)?;
        let limit = (q.limit as usize).clamp(1, PAGE);
        let mut page = values_page(kv, self.group, field, q.after.as_deref(), limit + 1)?;
        out.more = page.len() > limit;
        page.truncate(limit);
        out.values = page;
        Ok(())
    }

    pub(super) fn tag_tracks<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &TagTracksQuery,
        out: &mut QueryResult,
    ) -> Result<(), NsError> {
        let field = field_id(&q.field).ok_or_else(|| unknown(&q.field))?;
        self.require_built(kv)?;
        let norm = normalize(field, &q.value)
            .ok_or_else(|| NsError::Invalid(format!("year {:?} is not a number", q.value)))?;
        let limit = (q.limit as usize).clamp(1, MAX_SEARCH);
        let inos = postings_page(kv, self.group, field, &norm, q.after_ino, limit + 1)?;
        out.more = inos.len() > limit;
        for ino in inos.into_iter().take(limit) {
            let key = keys::tags(self.group, ino);
            if let Some(b) = kv.get(&key)? {
                out.tracks.push(TrackHit {
                    ino,
                    tags: Some(decode(&key, &b)?),
                });
            }
            out.next_ino = ino;
        }
        Ok(())
    }

    /// The tracks a search has to look at, from the index: the postings
    /// of the values that match its most selective indexed term. `None`
    /// when no term is indexed or the best one names too many tracks.
    fn search_candidates<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        terms: &[TagTerm],
    ) -> Result<Option<BTreeSet<u64>>, NsError> {
        // Cheapest terms first: the cost of looking at a term is the
        // number of distinct values of its fields.
        let mut planned = Vec::new();
        for term in terms {
            let Some(fields) = term_fields(term) else {
                continue;
            };
            let mut distinct = 0;
            for &f in &fields {
                let key = keys::tag_distinct(self.group, f);
                distinct += kv.get(&key)?.map(|v| count_of(&v)).unwrap_or(0);
            }
            planned.push((distinct, term, fields));
        }
        planned.sort_by_key(|(d, _, _)| *d);
        // The fewest tracks named so far, and the (field, value) pairs.
        let mut best: Option<(u64, Vec<FieldValue>)> = None;
        for (distinct, term, fields) in planned {
            let bound = best.as_ref().map_or(MAX_CANDIDATES, |(n, _)| *n);
            // Distinct values are read in sequence, a candidate costs a
            // posting and a tag record read at random: looking at a term
            // pays while its values are fewer than the best term's tracks
            // times that ratio (measured: a genre's 940 candidates took
            // 20 ms a query, an artist list of 1,560 values 2 ms).
            if distinct > bound.saturating_mul(VALUES_PER_CANDIDATE) {
                break;
            }
            let mut tracks = 0;
            let mut values = Vec::new();
            for f in fields {
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = values_page(kv, self.group, f, after.as_deref(), PAGE)?;
                    for v in &page {
                        if term_matches(f, &v.key, term) {
                            tracks += v.count;
                            values.push((f, v.key.to_vec()));
                        }
                    }
                    match page.last() {
                        Some(last) if page.len() == PAGE => after = Some(last.key.to_vec()),
                        _ => break,
                    }
                }
            }
            if tracks <= bound && best.as_ref().is_none_or(|(n, _)| tracks < *n) {
                best = Some((tracks, values));
            }
        }
        let Some((_, values)) = best else {
            return Ok(None);
        };
        let mut inos = BTreeSet::new();
        for (f, norm) in values {
            let mut after = 0;
            loop {
                let page = postings_page(kv, self.group, f, &norm, after, PAGE)?;
                inos.extend(&page);
                match page.last() {
                    Some(&last) if page.len() == PAGE => after = last,
                    _ => break,
                }
            }
        }
        Ok(Some(inos))
    }

    /// A search answered from the index; `false` when the index cannot
    /// narrow it down and the caller reads the tag records instead.
    pub(super) fn search_indexed<R: KvRead + ?Sized>(
        &self,
        kv: &R,
        q: &SearchQuery,
        limit: usize,
        out: &mut QueryResult,
    ) -> Result<bool, NsError> {
        if !is_built(kv, self.group)? {
            return Ok(false);
        }
        let Some(inos) = self.search_candidates(kv, &q.terms)? else {
            return Ok(false);
        };
        for ino in inos.range(q.after_ino.saturating_add(1)..) {
            let key = keys::tags(self.group, *ino);
            let Some(b) = kv.get(&key)? else { continue };
            let tags: Tags = decode(&key, &b)?;
            if proto::tags::matches(&tags, &q.terms) {
                if out.tracks.len() == limit {
                    out.more = true;
                    return Ok(true);
                }
                out.tracks.push(TrackHit {
                    ino: *ino,
                    tags: Some(tags),
                });
            }
            out.next_ino = *ino;
        }
        Ok(true)
    }
}

/// The index entries the tag records of a group call for, with the value
/// records cut to their counts (the spelling they keep depends on
/// history). The checker compares them with what the group holds.
pub fn expected<'a>(
    group: u32,
    tracks: impl IntoIterator<Item = (u64, &'a Tags)>,
) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, NsError> {
    let base = super::MemKv::default();
    let mut txn = Txn::new(&base);
    for (ino, t) in tracks {
        index(&mut txn, group, ino, t, true)?;
    }
    Ok(txn
        .into_writes()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .map(|(k, v)| (k.clone(), comparable(&k, v)))
        .collect())
}

/// An index entry as the checker compares it: a value record by its count.
pub fn comparable(key: &[u8], mut v: Vec<u8>) -> Vec<u8> {
    if key.get(4) == Some(&keys::TAG_VALUE) {
        v.truncate(8);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn years_sort_as_numbers_and_text_ignores_case() {
        assert_eq!(normalize(YEAR, "997"), Some(b"0000000997".to_vec()));
        assert!(normalize(YEAR, "997") < normalize(YEAR, "1997"));
        assert_eq!(normalize(YEAR, ""), Some(Vec::new()));
        assert_eq!(normalize(YEAR, "late"), None);
        assert_eq!(normalize(1, "Ärzte"), Some("ärzte".as_bytes().to_vec()));
        let t = Tags {
            artist: "A".into(),
            ..Default::default()
        };
        assert_eq!(value_of(&t, 2), "A", "album artist falls back to artist");
        assert_eq!(value_of(&t, YEAR), "");
    }
}
