//! Reads a track's tags with lofty into the metadata's `Tags` record.

use std::path::Path;

use lofty::file::FileType;
use lofty::prelude::*;
use proto::meta::Tags;
use proto::tags::clip;

/// File name extensions read for tags; other files are not opened.
const AUDIO: &[&str] = &[
    "flac", "mp3", "ogg", "oga", "opus", "m4a", "mp4", "aac", "wav", "aif", "aiff", "ape", "wv",
    "mpc", "spx",
];

/// Whether `path` names a file a tag reader understands (by extension).
pub fn is_audio(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO.contains(&e.to_ascii_lowercase().as_str()))
}

fn codec(t: FileType) -> &'static str {
    match t {
        FileType::Aac => "aac",
        FileType::Aiff => "aiff",
        FileType::Ape => "ape",
        FileType::Flac => "flac",
        FileType::Mpeg => "mp3",
        FileType::Mp4 => "mp4",
        FileType::Mpc => "musepack",
        FileType::Opus => "opus",
        FileType::Vorbis => "vorbis",
        FileType::Speex => "speex",
        FileType::Wav => "wav",
        FileType::WavPack => "wavpack",
        _ => "other",
    }
}

/// The tags and audio properties of the file at `path`.
pub fn read(path: &Path) -> Result<Tags, String> {
    let f = lofty::read_from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(of(&f))
}

/// The tags and audio properties of a whole file held in memory.
pub fn read_bytes(bytes: &[u8]) -> Result<Tags, String> {
    let f = lofty::probe::Probe::new(std::io::Cursor::new(bytes))
        .guess_file_type()
        .map_err(|e| e.to_string())?
        .read()
        .map_err(|e| e.to_string())?;
    Ok(of(&f))
}

fn of(f: &lofty::file::TaggedFile) -> Tags {
    let p = f.properties();
    let mut t = Tags {
        codec: codec(f.file_type()).into(),
        duration_ms: u32::try_from(p.duration().as_millis()).unwrap_or(u32::MAX),
        bitrate_kbps: p.audio_bitrate().or(p.overall_bitrate()).unwrap_or(0),
        sample_rate: p.sample_rate().unwrap_or(0),
        channels: p.channels().map(u32::from).unwrap_or(0),
        ..Default::default()
    };
    if let Some(tag) = f.primary_tag().or_else(|| f.first_tag()) {
        let s = |v: Option<std::borrow::Cow<'_, str>>| v.map(|v| clip(&v)).unwrap_or_default();
        let item = |k: ItemKey| tag.get_string(k).map(clip).unwrap_or_default();
        t.artist = s(tag.artist());
        t.title = s(tag.title());
        t.album = s(tag.album());
        t.genre = s(tag.genre());
        t.album_artist = item(ItemKey::AlbumArtist);
        t.track = tag.track().unwrap_or(0);
        t.track_total = tag.track_total().unwrap_or(0);
        t.disc = tag.disk().unwrap_or(0);
        t.disc_total = tag.disk_total().unwrap_or(0);
        if let Some(d) = tag.date() {
            t.date = d.to_string();
            t.year = d.year.into();
        }
        t.mb_track_id = item(ItemKey::MusicBrainzRecordingId);
        t.mb_album_id = item(ItemKey::MusicBrainzReleaseId);
        t.mb_artist_id = item(ItemKey::MusicBrainzArtistId);
        t.mb_album_artist_id = item(ItemKey::MusicBrainzReleaseArtistId);
    }
    t
}

/// Fields `musicfs tag set` writes.
pub const SETTABLE: &[&str] = &[
    "artist",
    "albumartist",
    "album",
    "title",
    "genre",
    "date",
    "year",
    "track",
    "tracktotal",
    "disc",
    "disctotal",
];

/// Parses `field=value` arguments (an empty value removes the field).
pub fn parse_sets(args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|a| {
            let (f, v) = a
                .split_once('=')
                .ok_or_else(|| format!("{a:?}: expected FIELD=VALUE"))?;
            let f = f.trim().to_lowercase();
            if !SETTABLE.contains(&f.as_str()) {
                return Err(format!(
                    "{f:?} cannot be set (settable: {})",
                    SETTABLE.join(", ")
                ));
            }
            let numeric = matches!(f.as_str(), "track" | "tracktotal" | "disc" | "disctotal");
            if numeric && !v.is_empty() && v.parse::<u32>().is_err() {
                return Err(format!("{f}: {v:?} is not a number"));
            }
            if f == "year" && !v.is_empty() && v.parse::<u16>().is_err() {
                return Err(format!("year: {v:?} is not a year"));
            }
            Ok((f, v.to_string()))
        })
        .collect()
}

/// Writes `sets` into the tags of a whole file held in memory, in the
/// file's own tag format (a file without tags gets its format's primary
/// tag), and returns the file as it is now: a valid file of its format.
pub fn edit(bytes: Vec<u8>, sets: &[(String, String)]) -> Result<Vec<u8>, String> {
    use lofty::config::WriteOptions;
    use lofty::tag::Tag;
    use std::io::{Cursor, Seek};
    let mut cur = Cursor::new(bytes);
    let mut f = lofty::probe::Probe::new(&mut cur)
        .guess_file_type()
        .map_err(|e| e.to_string())?
        .read()
        .map_err(|e| format!("not a tagged audio file: {e}"))?;
    if f.primary_tag().is_none() {
        f.insert_tag(Tag::new(f.primary_tag_type()));
    }
    let tag = f
        .primary_tag_mut()
        .ok_or("the file's format has no tag to write")?;
    for (field, v) in sets {
        let num = || v.parse::<u32>().unwrap_or(0);
        let text = |tag: &mut Tag, k: ItemKey| {
            if v.is_empty() {
                tag.remove_key(k);
            } else {
                tag.insert_text(k, v.clone());
            }
        };
        match (field.as_str(), v.is_empty()) {
            ("artist", _) => text(tag, ItemKey::TrackArtist),
            ("albumartist", _) => text(tag, ItemKey::AlbumArtist),
            ("album", _) => text(tag, ItemKey::AlbumTitle),
            ("title", _) => text(tag, ItemKey::TrackTitle),
            ("genre", _) => text(tag, ItemKey::Genre),
            ("date" | "year", _) => text(tag, ItemKey::RecordingDate),
            ("track", true) => tag.remove_track(),
            ("track", false) => tag.set_track(num()),
            ("tracktotal", true) => tag.remove_track_total(),
            ("tracktotal", false) => tag.set_track_total(num()),
            ("disc", true) => tag.remove_disk(),
            ("disc", false) => tag.set_disk(num()),
            ("disctotal", true) => tag.remove_disk_total(),
            ("disctotal", false) => tag.set_disk_total(num()),
            (other, _) => return Err(format!("{other:?} cannot be set")),
        }
    }
    cur.rewind().map_err(|e| e.to_string())?;
    f.save_to(&mut cur, WriteOptions::default())
        .map_err(|e| format!("writing the tags: {e}"))?;
    Ok(cur.into_inner())
}
