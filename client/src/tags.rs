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
