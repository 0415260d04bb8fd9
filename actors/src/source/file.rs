//! The `file` source kind: an image file or a block device.
//!
//! The point-in-time view is a full read at cycle time, so an RP is
//! crash-consistent only if the writer is quiesced while the cycle reads (other
//! source kinds take snapshots). The change set is found by comparing each
//! block's page hashes with the baseline: unchanged blocks cost a read and a
//! hash, changed blocks are handed on with their new content id.
//!
//! Reads bypass the page cache (O_DIRECT) where the filesystem allows it, which
//! costs far less CPU than buffered reads and leaves the cache to the workload;
//! hashing runs on the rayon pool, so both cores work on a scan.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::baseline::{BaseBlock, Baselines};
use super::SourceError;
use crate::content::page_hashes;
use crate::content::{ContentId, IdScheme, MerkleBuilder};

/// Blocks read per batch (then hashed in parallel).
const BATCH_BLOCKS: usize = 16;
/// Alignment O_DIRECT needs for buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;

/// An open image file or block device.
pub struct FileSource {
    path: PathBuf,
    file: File,
    direct: bool,
    volume_bytes: u64,
    block_bytes: u32,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SourceError + 'a {
    move |source| SourceError::Io { op, path: path.display().to_string(), source }
}

impl FileSource {
    /// Opens `path` for reading in blocks of `block_bytes`.
    pub fn open(path: &Path, block_bytes: u32) -> Result<Self, SourceError> {
        let direct = OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path);
        let (mut file, direct) = match direct {
            Ok(f) => (f, true),
            Err(_) => (File::open(path).map_err(io("opening", path))?, false),
        };
        // Block devices report size 0 in metadata; seeking to the end works for both.
        let volume_bytes = file.seek(SeekFrom::End(0)).map_err(io("sizing", path))?;
        Ok(FileSource { path: path.to_path_buf(), file, direct, volume_bytes, block_bytes })
    }

    /// Size of the volume in bytes.
    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }

    /// Number of blocks (the last one may be short).
    pub fn block_count(&self) -> u64 {
        self.volume_bytes.div_ceil(u64::from(self.block_bytes))
    }

    /// Length of block `index`.
    pub fn block_len(&self, index: u64) -> usize {
        let start = index * u64::from(self.block_bytes);
        (self.volume_bytes.saturating_sub(start)).min(u64::from(self.block_bytes)) as usize
    }

    /// Reads block `index` into `out` (resized to the block's length).
    pub fn read_block(&self, index: u64, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let len = self.block_len(index);
        let offset = index * u64::from(self.block_bytes);
        if self.direct {
            // O_DIRECT wants an aligned buffer and length: read into an aligned window of a larger Vec.
            let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let mut raw = vec![0u8; padded + DIRECT_ALIGN];
            let shift = (DIRECT_ALIGN - (raw.as_ptr() as usize % DIRECT_ALIGN)) % DIRECT_ALIGN;
            let window = &mut raw[shift..shift + padded];
            let mut done = 0;
            while done < len {
                let n = self.file.read_at(&mut window[done..], offset + done as u64).map_err(io("reading", &self.path))?;
                if n == 0 {
                    return Err(SourceError::Io {
                        op: "reading",
                        path: self.path.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "volume shrank during the cycle"),
                    });
                }
                done += n;
            }
            out.clear();
            out.extend_from_slice(&window[..len]);
        } else {
            out.resize(len, 0);
            self.file.read_exact_at(out, offset).map_err(io("reading", &self.path))?;
        }
        Ok(())
    }
}

/// A block that changed since the baseline (or every block, in a full offer).
#[derive(Debug)]
pub struct ScannedBlock {
    /// Block index.
    pub index: u64,
    /// Its bytes now.
    pub data: Vec<u8>,
    /// Its content id now.
    pub content: ContentId,
    /// Its page hashes now.
    pub page_hashes: Vec<u8>,
    /// Its baseline entry, if any (a delta base candidate).
    pub base: Option<BaseBlock>,
}

/// Counters of one scan.
#[derive(Debug, Clone, Default)]
pub struct ScanStats {
    /// Bytes read.
    pub scanned_bytes: u64,
    /// Blocks handed on.
    pub changed_blocks: u64,
    /// Zero blocks among them.
    pub zero_blocks: u64,
}

/// Walks a volume in index order, yielding changed blocks and building the Merkle root.
pub struct Scanner<'a> {
    source: &'a FileSource,
    baselines: &'a Baselines,
    volume: String,
    target: String,
    ids: IdScheme,
    full_offer: bool,
    next_index: u64,
    merkle: MerkleBuilder,
    ready: VecDeque<ScannedBlock>,
    prefetched: Option<(Vec<Vec<u8>>, u64)>,
    stats: ScanStats,
}

impl<'a> Scanner<'a> {
    /// A scan of `source` against the baseline of (`volume`, `target`); with
    /// `full_offer` every non-zero block is yielded, changed or not.
    pub fn new(source: &'a FileSource, baselines: &'a Baselines, volume: &str, target: &str, ids: IdScheme, full_offer: bool) -> Self {
        Scanner {
            source,
            baselines,
            volume: volume.to_string(),
            target: target.to_string(),
            ids,
            full_offer,
            next_index: 0,
            merkle: MerkleBuilder::new(),
            ready: VecDeque::new(),
            prefetched: None,
            stats: ScanStats::default(),
        }
    }

    /// The next block to offer, or `None` when the whole volume is scanned.
    pub fn next_changed(&mut self) -> Result<Option<ScannedBlock>, SourceError> {
        while self.ready.is_empty() && self.next_index < self.source.block_count() {
            self.scan_batch()?;
        }
        Ok(self.ready.pop_front())
    }

    fn read_batch(&self, start: u64) -> Result<(Vec<Vec<u8>>, u64), SourceError> {
        let count = (self.source.block_count() - start).min(BATCH_BLOCKS as u64);
        let mut datas = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut buf = Vec::new();
            self.source.read_block(start + i, &mut buf)?;
            datas.push(buf);
        }
        Ok((datas, count))
    }

    fn scan_batch(&mut self) -> Result<(), SourceError> {
        let start = self.next_index;
        let (datas, count) = match self.prefetched.take() {
            Some(batch) => batch,
            None => self.read_batch(start)?,
        };
        let bases = self.baselines.blocks(&self.volume, &self.target, start, count)?;
        let ids = &self.ids;
        let full_offer = self.full_offer;
        let next = start + count;
        // Hash this batch on the pool while this thread reads the next one.
        let (results, prefetched) = rayon::join(
            || -> Vec<(ContentId, Vec<u8>, bool)> {
                datas
                    .par_iter()
                    .zip(bases.par_iter())
                    .map(|(data, base)| {
                        let mut hashes = Vec::new();
                        page_hashes(data, &mut hashes);
                        match base {
                            Some(b) if b.page_hashes == hashes => (b.content, hashes, full_offer),
                            None if crate::content::is_all_zero(data) => (ContentId::ZERO, hashes, false),
                            _ => (ids.content_id(data), hashes, true),
                        }
                    })
                    .collect()
            },
            || if next < self.source.block_count() { Some(self.read_batch(next)) } else { None },
        );
        self.prefetched = prefetched.transpose()?;
        for (i, ((content, hashes, changed), (data, base))) in results.into_iter().zip(datas.into_iter().zip(bases)).enumerate() {
            self.stats.scanned_bytes += data.len() as u64;
            self.merkle.push(&content);
            // A block that became zero is a change (the target must record it); one that stays zero is not.
            let changed = changed || (content.is_zero() && base.is_some());
            if changed {
                self.stats.changed_blocks += 1;
                if content.is_zero() {
                    self.stats.zero_blocks += 1;
                }
                self.ready.push_back(ScannedBlock { index: start + i as u64, data, content, page_hashes: hashes, base });
            }
        }
        self.next_index = next;
        Ok(())
    }

    /// The Merkle root over every block and the counters; call after `next_changed` returned `None`.
    pub fn finish(self) -> ([u8; 32], ScanStats) {
        debug_assert_eq!(self.next_index, self.source.block_count(), "scan finished early");
        (self.merkle.finish(), self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::baseline::BaselineMeta;

    #[test]
    fn finds_exactly_the_changed_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let block = 64 * 1024u32;
        let mut data: Vec<u8> = (0..10 * block as usize + 1000).map(|i| (i % 251) as u8).collect();
        // Block 4 is zero.
        data[4 * block as usize..5 * block as usize].fill(0);
        std::fs::write(&image, &data).unwrap();
        let baselines = Baselines::open(&dir.path().join("b.redb")).unwrap();
        let ids = IdScheme::plain();

        let src = FileSource::open(&image, block).unwrap();
        assert_eq!(src.block_count(), 11);
        assert_eq!(src.block_len(10), 1000);
        let mut scan = Scanner::new(&src, &baselines, "v", "t", ids.clone(), false);
        let mut staged = Vec::new();
        while let Some(b) = scan.next_changed().unwrap() {
            assert_eq!(b.data, data[(b.index * u64::from(block)) as usize..][..b.data.len()]);
            staged.push((b.index, b.content, b.page_hashes));
        }
        let (root1, stats) = scan.finish();
        assert_eq!(stats.changed_blocks, 10, "all but the zero block");
        baselines.stage("v", "t", &staged).unwrap();
        baselines
            .promote("v", "t", &BaselineMeta { seq: 1, merkle_root: root1, block_bytes: block, block_count: 11, volume_bytes: data.len() as u64, time_unix_ms: 0 })
            .unwrap();

        // Change one byte in block 2, zero block 7, write into block 4.
        data[2 * block as usize + 5] ^= 1;
        data[7 * block as usize..8 * block as usize].fill(0);
        data[4 * block as usize + 10] = 9;
        std::fs::write(&image, &data).unwrap();
        let src = FileSource::open(&image, block).unwrap();
        let mut scan = Scanner::new(&src, &baselines, "v", "t", ids.clone(), false);
        let mut changed = Vec::new();
        while let Some(b) = scan.next_changed().unwrap() {
            changed.push((b.index, b.content.is_zero(), b.base.is_some()));
        }
        let (root2, _) = scan.finish();
        assert_eq!(changed, vec![(2, false, true), (4, false, false), (7, true, true)]);
        assert_ne!(root1, root2);

        // A full offer yields every non-zero block.
        let mut scan = Scanner::new(&src, &baselines, "v", "t", ids, true);
        let mut n = 0;
        while scan.next_changed().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(scan.finish().0, root2);
        assert_eq!(n, 11 - 1 + 1, "10 data blocks plus block 7 that became zero");
    }
}
