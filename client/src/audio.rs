//! Where an audio file's metadata ends and its audio begins, so chunking
//! can cut there first (DESIGN.md, chunking): a tag edit then rewrites
//! only the small chunks of the tags, the audio chunks stay the same
//! whatever the new tags' size, and an embedded picture shared by an
//! album's tracks is a chunk of its own that deduplicates.
//!
//! The parsers read only the structure (block, frame, page and atom
//! headers) from the first bytes of a file and stop at the first thing
//! they do not understand: a damaged or unknown file is simply cut by
//! content alone. lofty reads tags but does not say where audio starts.
//!
//! Ogg Vorbis and Opus put a page sequence number and checksum on every
//! page: when a tag edit changes the number of header pages, every audio
//! page's bytes change and the whole file is new. That is the format, not
//! the chunker; docs/ARCHITECTURE.md says so.

/// Offsets, ascending and inside `(0, head.len())`, where the file that
/// starts with `head` should be cut: around embedded pictures and where
/// the audio starts. The other metadata (stream info, seek tables, tags,
/// padding) stays together in small chunks: a cut at every block would
/// multiply the chunk records of a library for nothing.
pub fn boundaries(head: &[u8]) -> Vec<usize> {
    let mut cuts = if head.starts_with(b"fLaC") {
        flac(head)
    } else if head.starts_with(b"ID3") {
        id3v2(head)
    } else if head.starts_with(b"OggS") {
        ogg(head)
    } else if head.len() >= 8 && &head[4..8] == b"ftyp" {
        mp4(head)
    } else {
        Vec::new()
    };
    cuts.retain(|&c| c > 0 && c < head.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// Whether a file starting with `head` (its first dozen bytes) is audio a
/// tag reader understands: FLAC, ID3v2-tagged or bare MPEG audio, Ogg, MP4.
pub fn is_audio_head(head: &[u8]) -> bool {
    head.starts_with(b"fLaC")
        || head.starts_with(b"ID3")
        || head.starts_with(b"OggS")
        || (head.len() >= 8 && &head[4..8] == b"ftyp")
        // An MPEG audio frame header: 11 sync bits and a layer.
        || (head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 && head[1] & 0x06 != 0)
}

/// Where the embedded cover of a file starting with `head` lies: the
/// front cover (picture type 3) if there is one, else the first picture,
/// of a FLAC PICTURE block or an ID3v2 APIC frame. The range may end past
/// `head`: read that far and ask again. `None` without a picture (or for
/// formats that keep it elsewhere: Ogg, MP4).
pub fn cover(head: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut pictures: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
    if head.starts_with(b"fLaC") {
        let mut at = 4;
        while at + 4 <= head.len() {
            let last = head[at] & 0x80 != 0;
            let next = at + 4 + be24(&head[at + 1..at + 4]);
            if head[at] & 0x7f == 6 {
                let data = flac_picture_data(head, at + 4, next);
                let kind = head.get(at + 7).copied().unwrap_or(0);
                if data > at + 4 {
                    pictures.push((kind, data..next));
                }
            }
            if last {
                break;
            }
            at = next;
        }
    } else if head.starts_with(b"ID3") && head.len() >= 10 && head[5] & 0xC0 == 0 {
        let major = head[3];
        let size = syncsafe(&head[6..10])?;
        let mut at = 10;
        while at + 10 <= (10 + size).min(head.len()) {
            let len = if major == 4 {
                syncsafe(&head[at + 4..at + 8])?
            } else {
                be32(&head[at + 4..at + 8])
            };
            let next = at + 10 + len;
            if &head[at..at + 4] == b"APIC" {
                let data = apic_data(head, at + 10, next);
                if data > at + 10 {
                    // The picture type is the byte before the description.
                    let mime_end = head[at + 11..].iter().position(|&b| b == 0)?;
                    let kind = head.get(at + 11 + mime_end + 1).copied().unwrap_or(0);
                    pictures.push((kind, data..next));
                }
            } else if !head[at..at + 4]
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            {
                break;
            }
            at = next;
        }
    }
    pictures
        .iter()
        .find(|(kind, _)| *kind == 3)
        .or(pictures.first())
        .map(|(_, r)| r.clone())
}

fn be24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// FLAC: `fLaC`, then metadata blocks (1 byte last-flag and type, 3 bytes
/// length), then frames. Cuts around PICTURE blocks and at the first frame.
fn flac(h: &[u8]) -> Vec<usize> {
    const PICTURE: u8 = 6;
    let mut cuts = Vec::new();
    let mut at = 4;
    while at + 4 <= h.len() {
        let last = h[at] & 0x80 != 0;
        let kind = h[at] & 0x7f;
        let next = at + 4 + be24(&h[at + 1..at + 4]);
        // The image alone: the block header carries the last-block flag,
        // and taggers rewrite the picture's description fields.
        if kind == PICTURE {
            cuts.push(flac_picture_data(h, at + 4, next));
            cuts.push(next);
        }
        at = next;
        if last {
            // Audio frames start with the 14-bit sync code 0xFFF8..
            if at + 2 <= h.len() && h[at] == 0xFF && h[at + 1] & 0xFC == 0xF8 {
                cuts.push(at);
            }
            break;
        }
    }
    cuts
}

/// Where the image data of a FLAC PICTURE block body (`body..end`)
/// starts: after type, MIME type, description, dimensions and length.
/// The body's start if the fields do not add up.
fn flac_picture_data(h: &[u8], body: usize, end: usize) -> usize {
    let field = |at: usize| h.get(at..at + 4).map(be32);
    let data = (|| {
        let mime = field(body + 4)?;
        let desc_at = body + 8 + mime;
        let desc = field(desc_at)?;
        let data = desc_at + 4 + desc + 16 + 4;
        (data <= end).then_some(data)
    })();
    data.unwrap_or(body)
}

/// Where the image data of an ID3v2 APIC frame body (`body..end`) starts:
/// after text encoding, MIME type, picture type and description. Taggers
/// rewrite those (a 2.3 tag saved as 2.4 changes the encoding byte); the
/// image stays the same. The body's start if the fields do not add up.
fn apic_data(h: &[u8], body: usize, end: usize) -> usize {
    let data = (|| {
        let end = end.min(h.len());
        let enc = *h.get(body)?;
        let mime_end = body + 1 + h.get(body + 1..end)?.iter().position(|&b| b == 0)?;
        let desc = mime_end + 2; // past the NUL and the picture type
        let bytes = h.get(desc..end)?;
        let after_desc = if enc == 1 || enc == 2 {
            // UTF-16: a NUL of two bytes, on a character boundary.
            desc + bytes.chunks_exact(2).position(|c| c == [0, 0])? * 2 + 2
        } else {
            desc + bytes.iter().position(|&b| b == 0)? + 1
        };
        (after_desc <= end).then_some(after_desc)
    })();
    data.unwrap_or(body)
}

fn syncsafe(b: &[u8]) -> Option<usize> {
    if b.iter().take(4).any(|x| x & 0x80 != 0) {
        return None;
    }
    Some(
        (usize::from(b[0]) << 21)
            | (usize::from(b[1]) << 14)
            | (usize::from(b[2]) << 7)
            | usize::from(b[3]),
    )
}

/// ID3v2 (MP3 and others): a 10-byte header with a syncsafe size, frames
/// of 10-byte headers, padding, then audio. A cut around every picture
/// frame (APIC) and at the end of the tag.
fn id3v2(h: &[u8]) -> Vec<usize> {
    if h.len() < 10 {
        return Vec::new();
    }
    let (major, flags) = (h[3], h[5]);
    let Some(size) = syncsafe(&h[6..10]) else {
        return Vec::new();
    };
    let footer = if flags & 0x10 != 0 { 10 } else { 0 };
    let end = 10 + size + footer;
    let mut cuts = vec![end];
    // Frames are parsed only without unsynchronisation or an extended
    // header, and for versions 3 and 4 (the ones taggers write).
    if flags & 0xC0 != 0 || !(major == 3 || major == 4) {
        return cuts;
    }
    let tag_end = (10 + size).min(h.len());
    let mut at = 10;
    while at + 10 <= tag_end {
        let id = &h[at..at + 4];
        if !id
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            break; // padding
        }
        let len = if major == 4 {
            match syncsafe(&h[at + 4..at + 8]) {
                Some(l) => l,
                None => break,
            }
        } else {
            be32(&h[at + 4..at + 8])
        };
        let next = at + 10 + len;
        if next > 10 + size {
            break;
        }
        if id == b"APIC" {
            cuts.push(apic_data(h, at + 10, next));
            cuts.push(next);
        }
        at = next;
    }
    cuts
}

/// Ogg (Vorbis, Opus, FLAC-in-Ogg): pages of a 27-byte header and a
/// segment table. Header packets (identification, tags, setup) sit on
/// pages whose granule position is 0; a cut at the first audio page.
fn ogg(h: &[u8]) -> Vec<usize> {
    let mut at = 0;
    while at + 27 <= h.len() && &h[at..at + 4] == b"OggS" {
        let granule = u64::from_le_bytes(h[at + 6..at + 14].try_into().unwrap_or([0; 8]));
        if granule != 0 && at > 0 {
            return vec![at];
        }
        let nsegs = usize::from(h[at + 26]);
        if at + 27 + nsegs > h.len() {
            break;
        }
        let body: usize = h[at + 27..at + 27 + nsegs]
            .iter()
            .map(|&l| usize::from(l))
            .sum();
        at += 27 + nsegs + body;
    }
    Vec::new()
}

/// MP4/M4A: top-level atoms (4-byte size, 4-byte type; size 1: a 64-bit
/// size follows). `moov` holds the tags and sample tables, `mdat` the
/// audio: a cut at the start of each (the small `ftyp` before goes with
/// the first).
fn mp4(h: &[u8]) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0;
    while at + 8 <= h.len() {
        let kind = &h[at + 4..at + 8];
        if (kind == b"mdat" || kind == b"moov") && at > 64 {
            cuts.push(at);
        }
        let size = match be32(&h[at..at + 4]) {
            1 if at + 16 <= h.len() => {
                let s = u64::from_be_bytes(h[at + 8..at + 16].try_into().unwrap_or([0; 8]));
                usize::try_from(s).unwrap_or(usize::MAX)
            }
            // 0: to the end of the file; 1 without room for the size.
            0 | 1 => break,
            s => s,
        };
        if size < 8 {
            break;
        }
        at = at.saturating_add(size);
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flac_file(comment: &[u8], picture: &[u8], audio: &[u8]) -> Vec<u8> {
        let mut f = b"fLaC".to_vec();
        let block = |f: &mut Vec<u8>, kind: u8, body: &[u8]| {
            let n = body.len();
            f.extend([kind, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            f.extend(body);
        };
        block(&mut f, 0, &[7; 34]); // STREAMINFO
        block(&mut f, 4, comment); // VORBIS_COMMENT
        block(&mut f, 6, picture); // PICTURE
        block(&mut f, 0x80 | 1, &[0; 100]); // last: PADDING
        f.extend([0xFF, 0xF8]);
        f.extend(audio);
        f
    }

    #[test]
    fn flac_is_cut_around_the_picture_and_where_frames_start() {
        let f = flac_file(b"TITLE=a", &[9; 50], &[1; 1000]);
        let audio = f.len() - 1002;
        let cuts = boundaries(&f);
        // Stream info and tags together, the picture alone, padding, audio.
        assert_eq!(cuts, vec![57, 107, audio]);
        // The picture's bytes do not include its block header, so the
        // picture is the same chunk when a tagger makes it the last block.
        let mut h = f.clone();
        h[53] |= 0x80;
        let cut_h = boundaries(&h[..107]);
        assert_eq!(h[cut_h[0]..107], f[57..107]);
        // A longer title moves the audio, which still starts a segment.
        let g = flac_file(b"TITLE=a much longer title", &[9; 50], &[1; 1000]);
        assert_eq!(*boundaries(&g).last().expect("cut"), g.len() - 1002);
    }

    #[test]
    fn pictures_are_cut_where_their_image_data_starts() {
        let image = [0xFFu8, 0xD8, 0xFF, 0xE0, 1, 2, 3];
        // FLAC PICTURE: type, MIME, description, 16 bytes of dimensions,
        // data length, data.
        let mut pic = 3u32.to_be_bytes().to_vec();
        pic.extend(10u32.to_be_bytes());
        pic.extend(b"image/jpeg");
        pic.extend(5u32.to_be_bytes());
        pic.extend(b"front");
        pic.extend([0; 16]);
        pic.extend((image.len() as u32).to_be_bytes());
        pic.extend(image);
        let f = flac_file(b"TITLE=a", &pic, &[1; 100]);
        let cuts = boundaries(&f);
        assert_eq!(f[cuts[0]..cuts[1]], image);
        // ID3v2 APIC in Latin-1 and in UTF-16 (two-byte terminator).
        for (enc, desc) in [(0u8, &b"front\0"[..]), (1, &b"\xff\xfef\0\0\0"[..])] {
            let mut body = vec![enc];
            body.extend(b"image/jpeg\0\x03");
            body.extend(desc);
            body.extend(image);
            assert_eq!(apic_data(&body, 0, body.len()), body.len() - image.len());
        }
        // The cover of each: its image bytes.
        assert_eq!(f[cover(&f).expect("a cover")], image);
        let mut frame = b"APIC".to_vec();
        let mut body = vec![0u8];
        body.extend(b"image/jpeg\0\x03front\0");
        body.extend(image);
        frame.extend((body.len() as u32).to_be_bytes());
        frame.extend([0, 0]);
        frame.extend(&body);
        let mut id3 = b"ID3\x03\x00\x00\x00\x00".to_vec();
        id3.extend([(frame.len() >> 7) as u8 & 0x7f, frame.len() as u8 & 0x7f]);
        id3.extend(&frame);
        assert_eq!(id3[cover(&id3).expect("a cover")], image);
        assert_eq!(cover(b"OggS\0\0"), None);
        // Fields that do not add up: the body's start.
        assert_eq!(apic_data(b"\0image", 0, 6), 0);
        assert_eq!(flac_picture_data(&[0xFF; 20], 0, 20), 0);
    }

    #[test]
    fn id3v2_is_cut_around_pictures_and_at_the_audio() {
        let frame = |id: &[u8; 4], body: &[u8]| {
            let mut f = id.to_vec();
            f.extend((body.len() as u32).to_be_bytes());
            f.extend([0, 0]);
            f.extend(body);
            f
        };
        let mut frames = frame(b"TIT2", b"\x03Song");
        let apic_at = 10 + frames.len();
        frames.extend(frame(b"APIC", &[5; 300]));
        let apic_end = 10 + frames.len();
        frames.extend([0; 64]); // padding
        let size = frames.len();
        let mut f = b"ID3\x03\x00\x00".to_vec();
        f.extend([
            (size >> 21) as u8 & 0x7f,
            (size >> 14) as u8 & 0x7f,
            (size >> 7) as u8 & 0x7f,
            size as u8 & 0x7f,
        ]);
        f.extend(&frames);
        let audio = f.len();
        f.extend([0xFF, 0xFB, 0x90, 0x00]);
        f.extend([3; 500]);
        assert_eq!(boundaries(&f), vec![apic_at + 10, apic_end, audio]);
    }

    #[test]
    fn ogg_is_cut_at_the_first_audio_page() {
        let page = |granule: u64, body: &[u8]| {
            let mut p = b"OggS\x00\x00".to_vec();
            p.extend(granule.to_le_bytes());
            p.extend([0; 12]); // serial, sequence, checksum
            p.push(1);
            p.push(body.len() as u8);
            p.extend(body);
            p
        };
        let mut f = page(0, &[1; 30]);
        f.extend(page(0, &[2; 200]));
        let audio = f.len();
        f.extend(page(4096, &[3; 250]));
        f.extend(page(8192, &[4; 250]));
        assert_eq!(boundaries(&f), vec![audio]);
    }

    #[test]
    fn mp4_is_cut_at_the_tags_and_at_the_audio() {
        let atom = |kind: &[u8; 4], len: usize| {
            let mut a = ((len + 8) as u32).to_be_bytes().to_vec();
            a.extend(kind);
            a.extend(vec![0; len]);
            a
        };
        let mut f = atom(b"ftyp", 16);
        f.extend(atom(b"moov", 400));
        let mdat = f.len();
        f.extend(atom(b"mdat", 2000));
        assert_eq!(boundaries(&f), vec![mdat]);
        // Tags written after the audio: cut there too.
        let mut g = atom(b"ftyp", 16);
        let mdat = g.len() + 8 + 80;
        g.extend(atom(b"free", 80));
        g.extend(atom(b"mdat", 2000));
        let moov = g.len();
        g.extend(atom(b"moov", 400));
        assert_eq!(boundaries(&g), vec![mdat, moov]);
    }

    #[test]
    fn anything_else_or_a_damaged_header_gets_no_cuts_and_no_panic() {
        assert!(boundaries(b"").is_empty());
        assert!(boundaries(b"RIFF....WAVEfmt ").is_empty());
        // Lengths pointing past the end, truncated headers.
        assert!(boundaries(b"fLaC\x00\xff\xff").is_empty());
        let _ = boundaries(b"fLaC\x80\xff\xff\xff");
        let _ = boundaries(b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f");
        let _ = boundaries(b"OggS\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        let _ = boundaries(b"\x00\x00\x00\x01ftyp\x00\x00");
        let mut rng = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut buf = vec![0u8; (rng % 64) as usize + 4];
            for b in &mut buf {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }
            let magic: &[u8] = match rng % 4 {
                0 => b"fLaC",
                1 => b"ID3\x04",
                2 => b"OggS",
                _ => b"\x00\x00\x00\x10ftyp",
            };
            let n = magic.len().min(buf.len());
            buf[..n].copy_from_slice(&magic[..n]);
            for c in boundaries(&buf) {
                assert!(c > 0 && c < buf.len());
            }
        }
    }
}
