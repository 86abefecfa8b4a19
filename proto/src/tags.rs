//! Music tags as the metadata keeps them, and the search over them: a
//! beets-style query (`artist:Radiohead year:1995..2000 genre:rock`) is
//! parsed by the client into terms and matched by each group's leader.

use crate::meta::{TagTerm, Tags};

/// Longest tag value kept (longer ones are cut at a character boundary).
pub const MAX_VALUE: usize = 1024;
/// Most terms in one search.
pub const MAX_TERMS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TagError {
    #[error("unknown tag field {0:?} (known: {known})", known = FIELDS.join(", "))]
    UnknownField(String),
    #[error("{field}: {value:?} is not a number or a range LO..HI")]
    BadNumber { field: String, value: String },
    #[error("a search takes at most {MAX_TERMS} terms")]
    TooManyTerms,
    #[error("tag {0} is longer than {MAX_VALUE} bytes")]
    TooLong(&'static str),
}

/// Field names a query may use; `any` matches every text field.
pub const FIELDS: &[&str] = &[
    "artist",
    "albumartist",
    "album",
    "title",
    "track",
    "disc",
    "year",
    "date",
    "genre",
    "codec",
    "duration",
    "bitrate",
    "samplerate",
    "channels",
    "mb_trackid",
    "mb_albumid",
    "mb_artistid",
    "mb_albumartistid",
    "any",
];

enum Field<'a> {
    Text(&'a str),
    Number(u64),
    AnyText,
}

fn field<'a>(t: &'a Tags, name: &str) -> Option<Field<'a>> {
    Some(match name {
        "artist" => Field::Text(&t.artist),
        "albumartist" | "album_artist" => Field::Text(&t.album_artist),
        "album" => Field::Text(&t.album),
        "title" => Field::Text(&t.title),
        "date" => Field::Text(&t.date),
        "genre" => Field::Text(&t.genre),
        "codec" => Field::Text(&t.codec),
        "mb_trackid" => Field::Text(&t.mb_track_id),
        "mb_albumid" => Field::Text(&t.mb_album_id),
        "mb_artistid" => Field::Text(&t.mb_artist_id),
        "mb_albumartistid" => Field::Text(&t.mb_album_artist_id),
        "track" => Field::Number(t.track.into()),
        "disc" => Field::Number(t.disc.into()),
        "year" => Field::Number(t.year.into()),
        // Seconds, as people say it.
        "duration" => Field::Number((t.duration_ms / 1000).into()),
        "bitrate" => Field::Number(t.bitrate_kbps.into()),
        "samplerate" => Field::Number(t.sample_rate.into()),
        "channels" => Field::Number(t.channels.into()),
        "any" => Field::AnyText,
        _ => return None,
    })
}

/// A value as the tag index orders and compares it: text in lowercase, a
/// year as ten digits (so years sort as numbers; a missing year is empty);
/// `None` for a year that is not a number.
pub fn index_norm(is_year: bool, value: &str) -> Option<Vec<u8>> {
    if !is_year {
        return Some(value.to_lowercase().into_bytes());
    }
    match value.trim() {
        "" => Some(Vec::new()),
        v => v.parse::<u32>().ok().map(|y| {
            if y == 0 {
                Vec::new()
            } else {
                format!("{y:010}").into_bytes()
            }
        }),
    }
}

/// `N`, `LO..HI`, `LO..` or `..HI`, inclusive.
pub fn range_of(field: &str, v: &str) -> Result<(u64, u64), TagError> {
    let bad = || TagError::BadNumber {
        field: field.into(),
        value: v.into(),
    };
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    match v.split_once("..") {
        Some((lo, hi)) => {
            let lo = if lo.trim().is_empty() { 0 } else { num(lo)? };
            let hi = if hi.trim().is_empty() {
                u64::MAX
            } else {
                num(hi)?
            };
            Ok((lo, hi))
        }
        None => {
            let n = num(v)?;
            Ok((n, n))
        }
    }
}

fn contains_ci(hay: &str, needle_lower: &str) -> bool {
    hay.to_lowercase().contains(needle_lower)
}

/// Checks terms before a search runs: known fields, numbers where needed.
pub fn check_terms(terms: &[TagTerm]) -> Result<(), TagError> {
    if terms.len() > MAX_TERMS {
        return Err(TagError::TooManyTerms);
    }
    let probe = Tags::default();
    for t in terms {
        match field(&probe, &t.field) {
            None => return Err(TagError::UnknownField(t.field.clone())),
            Some(Field::Number(_)) => {
                range_of(&t.field, &t.value)?;
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether `tags` match every term (checked terms; an unknown field or a
/// bad number matches nothing).
pub fn matches(tags: &Tags, terms: &[TagTerm]) -> bool {
    terms.iter().all(|term| {
        let needle = term.value.to_lowercase();
        match field(tags, &term.field) {
            Some(Field::Text(s)) => contains_ci(s, &needle),
            Some(Field::Number(n)) => {
                range_of(&term.field, &term.value).is_ok_and(|(lo, hi)| lo <= n && n <= hi)
            }
            Some(Field::AnyText) => [
                &tags.artist,
                &tags.album_artist,
                &tags.album,
                &tags.title,
                &tags.genre,
            ]
            .iter()
            .any(|s| contains_ci(s, &needle)),
            None => false,
        }
    })
}

/// Parses a query: words `field:value` (values with spaces in quotes:
/// `artist:"Massive Attack"`), and bare words, which match any text field.
pub fn parse_query(q: &str) -> Result<Vec<TagTerm>, TagError> {
    let mut terms = Vec::new();
    for word in split_words(q) {
        let (f, v) = match word.split_once(':') {
            Some((f, v)) if !f.is_empty() => (f.to_lowercase(), v.to_string()),
            _ => ("any".to_string(), word.clone()),
        };
        terms.push(TagTerm { field: f, value: v });
    }
    check_terms(&terms)?;
    Ok(terms)
}

/// Splits on spaces outside double quotes, dropping the quotes.
fn split_words(q: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in q.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Checks a record to store: every text field within `MAX_VALUE`.
pub fn check_tags(t: &Tags) -> Result<(), TagError> {
    let text: [(&'static str, &str); 11] = [
        ("artist", &t.artist),
        ("albumartist", &t.album_artist),
        ("album", &t.album),
        ("title", &t.title),
        ("date", &t.date),
        ("genre", &t.genre),
        ("codec", &t.codec),
        ("mb_trackid", &t.mb_track_id),
        ("mb_albumid", &t.mb_album_id),
        ("mb_artistid", &t.mb_artist_id),
        ("mb_albumartistid", &t.mb_album_artist_id),
    ];
    for (name, v) in text {
        if v.len() > MAX_VALUE {
            return Err(TagError::TooLong(name));
        }
    }
    Ok(())
}

/// Cuts `s` to at most `MAX_VALUE` bytes at a character boundary.
pub fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_VALUE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track() -> Tags {
        Tags {
            artist: "Radiohead".into(),
            album: "OK Computer".into(),
            title: "Paranoid Android".into(),
            genre: "Rock".into(),
            year: 1997,
            track: 2,
            duration_ms: 383_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_beets_style_query_matches_fields_ranges_and_bare_words() {
        let t = track();
        let m = |q: &str| matches(&t, &parse_query(q).expect(q));
        assert!(m("artist:radiohead year:1995..2000 genre:rock"));
        assert!(m("album:\"ok comp\""));
        assert!(m("paranoid"), "a bare word matches any text field");
        assert!(m("year:1997 track:2 duration:300.."));
        assert!(m("year:..1997"));
        assert!(!m("year:1998.."));
        assert!(!m("artist:radiohead genre:jazz"), "every term must match");
        assert!(!m("title:creep"));
        assert!(m(""), "no terms: everything");
    }

    #[test]
    fn bad_queries_are_refused_with_the_reason() {
        assert_eq!(
            parse_query("year:late"),
            Err(TagError::BadNumber {
                field: "year".into(),
                value: "late".into()
            })
        );
        assert!(matches!(
            parse_query("colour:blue"),
            Err(TagError::UnknownField(f)) if f == "colour"
        ));
        let many = "a ".repeat(MAX_TERMS + 1);
        assert_eq!(parse_query(&many), Err(TagError::TooManyTerms));
    }

    #[test]
    fn long_values_are_clipped_at_a_character_boundary() {
        let s = "é".repeat(MAX_VALUE);
        let c = clip(&s);
        assert!(c.len() <= MAX_VALUE && s.starts_with(&c));
        let mut t = track();
        t.title = s;
        assert_eq!(check_tags(&t), Err(TagError::TooLong("title")));
    }
}
