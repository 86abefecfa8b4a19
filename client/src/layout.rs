//! File layouts (extent lists), write buffers and content-defined chunking:
//! pure data structures with no I/O.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proto::meta::Extent;
use proto::ChunkId;

/// FastCDC sizes (DESIGN.md: min 256 KiB / avg 1 MiB / max 4 MiB).
pub const CDC_MIN: u32 = 256 << 10;
pub const CDC_AVG: u32 = 1 << 20;
pub const CDC_MAX: u32 = 4 << 20;

pub fn extent_end(e: &Extent) -> u64 {
    e.offset + e.length
}

pub fn extent_chunk(e: &Extent) -> Option<ChunkId> {
    ChunkId::try_from(&e.chunk_id[..]).ok()
}

/// Places `new` over `extents` (sorted, non-overlapping), trimming or
/// splitting whatever it covers.
pub fn overlay(extents: &mut Vec<Extent>, new: Extent) {
    let (start, end) = (new.offset, extent_end(&new));
    let mut out = Vec::with_capacity(extents.len() + 2);
    for e in extents.drain(..) {
        let (es, ee) = (e.offset, extent_end(&e));
        if ee <= start || es >= end {
            out.push(e);
            continue;
        }
        if es < start {
            let mut left = e.clone();
            left.length = start - es;
            out.push(left);
        }
        if ee > end {
            let mut right = e.clone();
            right.offset = end;
            right.length = ee - end;
            right.chunk_offset = e.chunk_offset + (end - es);
            out.push(right);
        }
    }
    let pos = out.partition_point(|e| e.offset < start);
    out.insert(pos, new);
    *extents = out;
}

/// Cuts extents to a file of `size` bytes.
pub fn truncate(extents: &mut Vec<Extent>, size: u64) {
    extents.retain(|e| e.offset < size);
    if let Some(last) = extents.last_mut() {
        if extent_end(last) > size {
            last.length = size - last.offset;
        }
    }
}

/// Dirty byte ranges of an open file, not yet chunked: non-overlapping runs
/// keyed by file offset.
#[derive(Default, Debug)]
pub struct DirtyRuns {
    runs: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl DirtyRuns {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Adds a write, merging it with runs it overlaps or touches.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Fast path: appending right after the last run (sequential writes).
        if let Some((&o, run)) = self.runs.iter_mut().next_back() {
            if o + run.len() as u64 == offset {
                run.extend_from_slice(data);
                self.bytes += data.len();
                return;
            }
        }
        let touching = self.touching(offset, end);
        let mut start = offset;
        let mut stop = end;
        for o in &touching {
            let r = &self.runs[o];
            start = start.min(*o);
            stop = stop.max(o + r.len() as u64);
        }
        let mut merged = vec![0u8; (stop - start) as usize];
        for o in touching {
            if let Some(r) = self.runs.remove(&o) {
                self.bytes -= r.len();
                let at = (o - start) as usize;
                merged[at..at + r.len()].copy_from_slice(&r);
            }
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len();
        self.runs.insert(start, merged);
    }

    /// Adds a run whose buffer the caller hands over: kept as it is when
    /// nothing buffered touches it (no copy, and its pages stay mapped
    /// for the appends that follow), merged like a write otherwise.
    pub fn put_run(&mut self, offset: u64, run: Vec<u8>) {
        if run.is_empty() || !self.touching(offset, offset + run.len() as u64).is_empty() {
            return self.write(offset, &run);
        }
        self.bytes += run.len();
        self.runs.insert(offset, run);
    }

    /// Offsets of the runs that overlap or touch `[offset, end)`.
    fn touching(&self, offset: u64, end: u64) -> Vec<u64> {
        self.runs
            .range(..=end)
            .filter(|(&o, r)| o + r.len() as u64 >= offset)
            .map(|(&o, _)| o)
            .collect()
    }

    /// Drops everything at or beyond `size`.
    pub fn truncate(&mut self, size: u64) {
        let beyond: Vec<u64> = self.runs.range(size..).map(|(&o, _)| o).collect();
        for o in beyond {
            if let Some(r) = self.runs.remove(&o) {
                self.bytes -= r.len();
            }
        }
        if let Some((&o, run)) = self.runs.iter_mut().next_back() {
            let end = o + run.len() as u64;
            if end > size {
                let keep = (size - o) as usize;
                self.bytes -= run.len() - keep;
                run.truncate(keep);
            }
        }
    }

    /// Copies dirty bytes over `buf`, which holds the file range starting at `offset`.
    pub fn overlay_onto(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (&o, r) in self.runs.range(..end) {
            let rend = o + r.len() as u64;
            if rend <= offset {
                continue;
            }
            let s = o.max(offset);
            let e = rend.min(end);
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&r[(s - o) as usize..(e - o) as usize]);
        }
    }

    pub fn take(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.bytes = 0;
        std::mem::take(&mut self.runs).into_iter().collect()
    }
}

/// A chunk cut from a run of bytes.
pub struct CutChunk {
    pub file_offset: u64,
    pub id: ChunkId,
    pub data: Bytes,
}

/// Cuts `data` (which starts at `file_offset`) at content-defined
/// boundaries; a run at the start of a file is first cut where an audio
/// file's structure changes (tags, pictures, audio: `audio::boundaries`).
pub fn cut(file_offset: u64, data: &[u8]) -> Vec<CutChunk> {
    let mut segments = Vec::new();
    let mut start = 0;
    if file_offset == 0 {
        for b in crate::audio::boundaries(data) {
            segments.push(start..b);
            start = b;
        }
    }
    segments.push(start..data.len());
    let mut out = Vec::new();
    for seg in segments {
        let part = &data[seg.clone()];
        for c in
            fastcdc::v2020::FastCDC::new(part, CDC_MIN as usize, CDC_AVG as usize, CDC_MAX as usize)
        {
            let bytes = &part[c.offset..c.offset + c.length];
            out.push(CutChunk {
                file_offset: file_offset + (seg.start + c.offset) as u64,
                id: ChunkId::of(bytes),
                data: Bytes::copy_from_slice(bytes),
            });
        }
    }
    out
}

/// A byte-bounded least-recently-used cache of verified chunks.
pub struct ChunkCache {
    cap: usize,
    used: usize,
    tick: u64,
    map: HashMap<ChunkId, (Bytes, u64)>,
    order: BTreeMap<u64, ChunkId>,
}

impl ChunkCache {
    pub fn new(cap: usize) -> Self {
        ChunkCache {
            cap,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, id: &ChunkId) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (data, t) = self.map.get_mut(id)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, *id);
        Some(data.clone())
    }

    pub fn insert(&mut self, id: ChunkId, data: Bytes) {
        if data.len() > self.cap || self.map.contains_key(&id) {
            return;
        }
        self.tick += 1;
        self.used += data.len();
        self.map.insert(id, (data, self.tick));
        self.order.insert(self.tick, id);
        while self.used > self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&old) {
                self.used -= d.len();
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// Whether `id` is cached (without counting as a use).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, chunk: u8, chunk_offset: u64) -> Extent {
        Extent {
            offset,
            length,
            chunk_id: Bytes::from(vec![chunk; 16]),
            chunk_offset,
        }
    }

    #[test]
    fn overlay_splits_and_trims() {
        let mut v = vec![ext(0, 100, 1, 0)];
        overlay(&mut v, ext(10, 20, 2, 0));
        assert_eq!(
            v,
            vec![ext(0, 10, 1, 0), ext(10, 20, 2, 0), ext(30, 70, 1, 30)]
        );
        overlay(&mut v, ext(0, 100, 3, 5));
        assert_eq!(v, vec![ext(0, 100, 3, 5)]);
        overlay(&mut v, ext(200, 10, 4, 0));
        assert_eq!(v, vec![ext(0, 100, 3, 5), ext(200, 10, 4, 0)]);
        truncate(&mut v, 50);
        assert_eq!(v, vec![ext(0, 50, 3, 5)]);
    }

    #[test]
    fn dirty_runs_merge_and_overlay() {
        let mut d = DirtyRuns::default();
        d.write(10, b"abc");
        d.write(13, b"def");
        d.write(0, b"XY");
        d.write(11, b"Z");
        assert_eq!(d.bytes(), 8);
        let mut buf = vec![b'.'; 20];
        d.overlay_onto(0, &mut buf);
        assert_eq!(&buf, b"XY........aZcdef....");
        d.write(1, b"0123456789012");
        let mut buf = vec![b'.'; 20];
        d.overlay_onto(0, &mut buf);
        assert_eq!(&buf, b"X0123456789012ef....");
        d.truncate(5);
        let mut buf = vec![b'.'; 8];
        d.overlay_onto(0, &mut buf);
        assert_eq!(&buf, b"X0123...");
        assert_eq!(d.bytes(), 5);
    }

    #[test]
    fn a_handed_over_run_is_kept_or_merged() {
        let mut d = DirtyRuns::default();
        d.write(10, b"abc");
        // Apart from every run: kept as handed over, appends go onto it.
        let mut run = Vec::with_capacity(64);
        run.extend_from_slice(b"xy");
        let at = run.as_ptr();
        d.put_run(20, run);
        d.write(22, b"z");
        assert_eq!(d.runs[&20].as_ptr(), at);
        // Touching a run: merged with it, newer bytes over older ones.
        d.put_run(12, b"CDE".to_vec());
        assert_eq!(d.bytes(), 5 + 3);
        let mut buf = vec![b'.'; 24];
        d.overlay_onto(0, &mut buf);
        assert_eq!(&buf, b"..........abCDE.....xyz.");
    }

    #[test]
    fn cut_is_content_defined_and_covers_everything() {
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let chunks = cut(0, &data);
        assert!(chunks.len() > 1);
        let total: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(total, data.len());
        // Prepending bytes shifts the first boundary only: later chunks dedupe.
        let mut shifted = vec![7u8; 1000];
        shifted.extend_from_slice(&data);
        let again = cut(0, &shifted);
        let ids: std::collections::HashSet<_> = chunks.iter().map(|c| c.id).collect();
        let shared = again.iter().filter(|c| ids.contains(&c.id)).count();
        assert!(shared >= chunks.len() - 2, "{shared} of {}", chunks.len());
    }

    #[test]
    fn a_tag_edit_leaves_every_audio_chunk_as_it_was() {
        let flac = |comment: &[u8]| {
            let mut f = b"fLaC".to_vec();
            for (kind, body) in [
                (0u8, vec![7u8; 34]),
                (4, comment.to_vec()),
                (6, vec![9; 90_000]),
            ] {
                let n = body.len();
                f.extend([kind, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
                f.extend(body);
            }
            f.extend([0x81, 0, 0, 16]);
            f.extend([0; 16]);
            f.extend([0xFF, 0xF8]);
            f.extend((0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8));
            f
        };
        let before = cut(0, &flac(b"TITLE=Song"));
        let after = cut(0, &flac(b"TITLE=Another song, with a longer title"));
        let old: std::collections::HashSet<_> = before.iter().map(|c| c.id).collect();
        let new_bytes: usize = after
            .iter()
            .filter(|c| !old.contains(&c.id))
            .map(|c| c.data.len())
            .sum();
        // Only the comment block is new: the picture and every audio chunk
        // are the same chunks, wherever they now start.
        assert!(new_bytes < 1024, "{new_bytes} new bytes");
        let total: usize = after.iter().map(|c| c.data.len()).sum();
        assert_eq!(
            total,
            flac(b"TITLE=Another song, with a longer title").len()
        );
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let mut c = ChunkCache::new(10);
        let (a, b, x) = (ChunkId::of(b"a"), ChunkId::of(b"b"), ChunkId::of(b"x"));
        c.insert(a, Bytes::from(vec![0; 4]));
        c.insert(b, Bytes::from(vec![0; 4]));
        assert!(c.get(&a).is_some());
        c.insert(x, Bytes::from(vec![0; 4]));
        assert!(c.get(&b).is_none(), "b was least recently used");
        assert!(c.get(&a).is_some() && c.get(&x).is_some());
        assert_eq!(c.used(), 8);
    }
}
