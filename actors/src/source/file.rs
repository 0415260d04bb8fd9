//! The `file` source kind: an image file or a block device.
//!
//! The point-in-time view is a full read at cycle time, so an RP is
//! crash-consistent only if the writer is quiesced while the cycle reads (other
//! source kinds take snapshots). The change set is found by comparing each
//! block's page hashes with the baseline: unchanged blocks cost a read and a
//! hash, changed blocks are handed on with their new content id.
//!
//! Blocks are read from the view's [`BlockDevice`] (an image or device of this
//! machine reads bypass the page cache where the filesystem allows it, which
//! costs far less CPU than buffered reads and leaves the cache to the workload);
//! hashing runs on [`crate::cpu_pool::hash_pool`], which spans both cores.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use super::baseline::{BaseBlock, Baselines};
use super::device::{BlockDevice, LocalDevice, DIRECT_ALIGN};
use super::free_space::FreeSpace;
use super::{BlockMask, SourceError};
use crate::content::{ContentId, IdScheme, MerkleBuilder, MerkleRoot};

/// Bytes read per batch (then hashed in parallel); at least one block.
const BATCH_BYTES: u64 = 16 << 20;
/// A volume read in blocks, from any [`BlockDevice`].
#[derive(Clone)]
pub struct FileSource {
    device: Arc<dyn BlockDevice>,
    volume_bytes: u64,
    block_bytes: u32,
    /// The filesystem's free blocks, not read (zeros), when trusted.
    free: Option<Arc<FreeSpace>>,
    /// Bytes of free space not read or zeroed so far.
    free_skipped: Arc<std::sync::atomic::AtomicU64>,
    /// Of those, the bytes of blocks wholly free, not read at all.
    free_unread: Arc<std::sync::atomic::AtomicU64>,
}

fn io<'a>(op: &'static str, device: &'a dyn BlockDevice) -> impl FnOnce(std::io::Error) -> SourceError + 'a {
    move |source| SourceError::Io { op, path: device.describe().to_string(), source }
}

impl FileSource {
    /// Opens the image or device at `path` for reading in blocks of `block_bytes`.
    pub fn open(path: &Path, block_bytes: u32) -> Result<Self, SourceError> {
        Ok(FileSource::on(Arc::new(LocalDevice::open(path)?), block_bytes))
    }

    /// Reads `device` in blocks of `block_bytes`.
    pub fn on(device: Arc<dyn BlockDevice>, block_bytes: u32) -> FileSource {
        FileSource { volume_bytes: device.size(), device, block_bytes, free: None, free_skipped: Default::default(), free_unread: Default::default() }
    }

    /// Reads the free blocks of `free` (the filesystem on this view) as
    /// zeros: a block wholly free is not read, the free parts of one partly
    /// used are zeroed.
    pub fn with_free_space(mut self, free: Arc<FreeSpace>) -> FileSource {
        self.free = Some(free);
        self
    }

    /// Bytes of free filesystem space this source did not read or zeroed.
    pub fn free_skipped(&self) -> u64 {
        self.free_skipped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of volume blocks wholly free, which this source did not read
    /// (part of [`FileSource::free_skipped`]).
    pub fn free_unread(&self) -> u64 {
        self.free_unread.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Reads block `index` into a pooled buffer (aligned for O_DIRECT, so the
    /// kernel writes straight into it and no copy follows).
    pub fn read_block(&self, index: u64) -> Result<BlockData, SourceError> {
        let len = self.block_len(index);
        let offset = index * u64::from(self.block_bytes);
        let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut data = BlockData::with_capacity(padded);
        let shift = data.shift;
        // An aligned device reads whole pages; any other exactly the block.
        let span = if self.device.aligned() { padded } else { len };
        let window = &mut data.raw[shift..shift + span];
        let mut done = 0;
        while done < len {
            let n = self.device.read_at(&mut window[done..], offset + done as u64).map_err(io("reading", self.device.as_ref()))?;
            if n == 0 {
                return Err(SourceError::Io {
                    op: "reading",
                    path: self.device.describe().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "volume shrank during the cycle"),
                });
            }
            done += n;
        }
        data.len = len;
        Ok(data)
    }
}

/// Blocks read by one vectored read at most (well under `IOV_MAX`).
const RUN_BLOCKS: usize = 64;

impl FileSource {
    /// Reads the `count` blocks from `first` with vectored reads of up to
    /// [`RUN_BLOCKS`] blocks each, into pooled buffers: the disk sees a few
    /// large requests instead of one per block, which is what lets long empty
    /// regions be read at the disk's speed. A short or refused vectored read
    /// falls back to [`FileSource::read_block`] for that run, whose error says
    /// which read failed.
    pub fn read_run(&self, first: u64, count: usize) -> Result<Vec<BlockData>, SourceError> {
        let (out, free) = self.read_run_untallied(first, count)?;
        self.tally(free);
        Ok(out)
    }

    /// Counts free space a read kept: `(not read or zeroed, not read)`.
    fn tally(&self, (skipped, unread): (u64, u64)) {
        self.free_skipped.fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
        self.free_unread.fetch_add(unread, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`FileSource::read_run`], returning the bytes of free space it did
    /// not read or zeroed, and of those the bytes not read, instead of
    /// counting them.
    fn read_run_untallied(&self, first: u64, count: usize) -> Result<(Vec<BlockData>, (u64, u64)), SourceError> {
        let mut out = Vec::with_capacity(count);
        let end = first + count as u64;
        let bs = u64::from(self.block_bytes);
        let free: Vec<Vec<std::ops::Range<usize>>> = match &self.free {
            Some(f) => (first..end).map(|b| f.free_in(b * bs, self.block_len(b))).collect(),
            None => Vec::new(),
        };
        let wholly_free = |b: u64| free.get((b - first) as usize).is_some_and(|r| r.len() == 1 && r[0] == (0..self.block_len(b)));
        let (mut skipped, mut unread) = (0u64, 0u64);
        let mut at = first;
        while at < end {
            if wholly_free(at) {
                out.push(BlockData::zeros(self.block_len(at)));
                skipped += self.block_len(at) as u64;
                unread += self.block_len(at) as u64;
                at += 1;
                continue;
            }
            let n = (at..end).take(RUN_BLOCKS).take_while(|&b| !wholly_free(b)).count();
            out.extend(self.read_vectored(at, n)?);
            at += n as u64;
        }
        for (data, ranges) in out.iter_mut().zip(&free) {
            if data.is_zeros() {
                continue;
            }
            for r in ranges {
                skipped += r.len() as u64;
                data.zero(r.clone());
            }
        }
        Ok((out, (skipped, unread)))
    }

    fn read_vectored(&self, first: u64, count: usize) -> Result<Vec<BlockData>, SourceError> {
        let mut datas: Vec<BlockData> = (0..count as u64)
            .map(|i| {
                let len = self.block_len(first + i);
                let mut data = BlockData::with_capacity(len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN);
                data.len = len;
                data
            })
            .collect();
        let want: usize = datas.iter().map(|d| d.len).sum();
        let direct = self.device.aligned();
        let got = {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = datas
                .iter_mut()
                .map(|d| {
                    // O_DIRECT wants whole aligned pages; the tail past `len` is never read back.
                    let span = if direct { d.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN } else { d.len };
                    std::io::IoSliceMut::new(&mut d.raw[d.shift..d.shift + span])
                })
                .collect();
            self.device.read_vectored_at(&mut slices, first * u64::from(self.block_bytes))
        };
        match got {
            Ok(n) if n >= want => Ok(datas),
            _ => (first..first + count as u64).map(|i| self.read_block(i)).collect(),
        }
    }
}

/// Recycled read buffers: allocating (and faulting in) a fresh megabyte per
/// block costs more CPU than hashing it.
static BUFFER_POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept for reuse at most.
const POOL_BUFFERS: usize = 112;

/// Frees the recycled read buffers (up to [`POOL_BUFFERS`] blocks' worth):
/// the node calls it when no cycle runs, so an idle node does not keep the
/// buffers of its last busy moment.
pub fn release_pooled_buffers() {
    let freed = std::mem::take(&mut *BUFFER_POOL.lock().unwrap_or_else(|p| p.into_inner()));
    drop(freed);
}

/// The bytes of one block, in a pooled buffer aligned for O_DIRECT.
pub struct BlockData {
    raw: Vec<u8>,
    shift: usize,
    len: usize,
}

impl BlockData {
    fn with_capacity(padded: usize) -> BlockData {
        let need = padded + DIRECT_ALIGN;
        let pooled = BUFFER_POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut raw = match pooled {
            Some(v) if v.len() >= need => v,
            _ => vec![0u8; need],
        };
        if raw.len() < need {
            raw.resize(need, 0);
        }
        let shift = (DIRECT_ALIGN - (raw.as_ptr() as usize % DIRECT_ALIGN)) % DIRECT_ALIGN;
        BlockData { raw, shift, len: 0 }
    }

    /// A block of `len` zero bytes that holds no buffer: zero blocks are never
    /// encoded, so the scan frees their memory at once.
    pub fn zeros(len: usize) -> BlockData {
        BlockData { raw: Vec::new(), shift: 0, len }
    }

    /// Sets `range` of the block's bytes to zero.
    fn zero(&mut self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.len);
        if range.start < end {
            self.raw[self.shift + range.start..self.shift + end].fill(0);
        }
    }

    /// Whether this is a [`BlockData::zeros`] block.
    pub fn is_zeros(&self) -> bool {
        self.raw.is_empty()
    }

    /// A block holding a copy of `bytes` (tests, and sources that are not files).
    pub fn from_slice(bytes: &[u8]) -> BlockData {
        let mut data = BlockData::with_capacity(bytes.len().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN);
        let shift = data.shift;
        data.raw[shift..shift + bytes.len()].copy_from_slice(bytes);
        data.len = bytes.len();
        data
    }
}

impl std::ops::Deref for BlockData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.raw.is_empty() {
            return &zero_bytes()[..self.len];
        }
        &self.raw[self.shift..self.shift + self.len]
    }
}

impl std::fmt::Debug for BlockData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockData({} bytes)", self.len)
    }
}

/// Zeros behind every [`BlockData::zeros`]: one allocation of the largest block
/// size, never written, so its pages stay the kernel's shared zero page.
fn zero_bytes() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; MAX_BLOCK_BYTES])
}

/// The largest block size a policy may choose.
const MAX_BLOCK_BYTES: usize = 16 << 20;

impl Drop for BlockData {
    fn drop(&mut self) {
        if self.raw.is_empty() {
            return;
        }
        let mut pool = BUFFER_POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_BUFFERS {
            pool.push(std::mem::take(&mut self.raw));
        }
    }
}

/// A block that changed since the baseline (or every block, in a full offer).
#[derive(Debug)]
pub struct ScannedBlock {
    /// Block index.
    pub index: u64,
    /// Its bytes now.
    pub data: BlockData,
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
    /// Blocks not read because the change source says they did not change.
    pub skipped_blocks: u64,
}

/// Bytes the tail prober reads at a time (at least one block).
const PROBE_BYTES: u64 = 4 << 20;

/// Batches the read-ahead thread may run ahead of the hashing. Batches of zero
/// blocks hold no memory, so through empty regions it runs far ahead.
const READ_AHEAD_BATCHES: usize = 64;
/// Bytes of non-zero blocks the read-ahead thread may hold that the scan has not taken yet.
const READ_AHEAD_DATA_BYTES: u64 = BATCH_BYTES;

/// A batch of blocks from `start`; `None` for a block outside the read set (not read).
type ReadBatch = Result<(u64, Vec<Option<BlockData>>), SourceError>;

/// Credit of the read-ahead thread, in bytes of non-zero blocks handed over and not yet taken.
struct ReadCredit {
    held: std::sync::Mutex<u64>,
    /// Blocks read so far (the read-ahead's position; tests watch it).
    read_to: std::sync::atomic::AtomicU64,
    /// Every block from here to the end is known to be zero (the tail prober's
    /// finding; the block count while nothing is known).
    zero_from: std::sync::atomic::AtomicU64,
    freed: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

/// A thread that reads the volume in batches ahead of the scan and replaces
/// all-zero blocks by [`BlockData::zeros`]. The scan's reading and hashing
/// overlap, and a long empty tail of a volume is read while the encoders are
/// still busy with the last data, not after.
struct ReadAhead {
    batches: std::sync::mpsc::Receiver<ReadBatch>,
    credit: std::sync::Arc<ReadCredit>,
}

impl ReadAhead {
    fn start(source: &FileSource, from: u64, only: Option<Arc<BlockMask>>) -> Result<ReadAhead, SourceError> {
        let source = source.clone();
        let device = source.device.clone();
        let (tx, batches) = std::sync::mpsc::sync_channel::<ReadBatch>(READ_AHEAD_BATCHES);
        let credit = std::sync::Arc::new(ReadCredit {
            held: std::sync::Mutex::new(0),
            read_to: std::sync::atomic::AtomicU64::new(from),
            zero_from: std::sync::atomic::AtomicU64::new(source.block_count()),
            freed: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        // A read set comes from a change source that knows what changed: no tail to find.
        if only.is_none() {
            let (prober, probe_credit) = (source.clone(), credit.clone());
            std::thread::Builder::new()
                .name("drmesh-probe".into())
                .spawn(move || Self::probe_tail(&prober, &probe_credit))
                .map_err(io("starting a reader thread for", device.as_ref()))?;
        }
        let thread_credit = credit.clone();
        std::thread::Builder::new()
            .name("drmesh-read".into())
            .spawn(move || Self::run(&source, from, only.as_deref(), &tx, &thread_credit))
            .map_err(io("starting a reader thread for", device.as_ref()))?;
        Ok(ReadAhead { batches, credit })
    }

    /// Reads the volume backwards from its end, [`PROBE_BYTES`] at a time,
    /// while the read-ahead works forwards, for as long as every block is
    /// zero, and records where that empty tail begins: the read-ahead then
    /// hands those blocks over as zero without reading them. The free tail of
    /// a disk is so read while the encoders work on the data before it, not
    /// after. Stops at the first batch with data (on a full disk it reads one
    /// small batch the scan reads again), on a read error (the scan reports
    /// its own), when it meets the read-ahead, or when the scan ends.
    fn probe_tail(source: &FileSource, credit: &ReadCredit) {
        use std::sync::atomic::Ordering;
        let step = (PROBE_BYTES / u64::from(source.block_bytes.max(1))).max(1);
        let mut end = source.block_count();
        while end > 0 && !credit.stop.load(Ordering::Relaxed) {
            let start = end.saturating_sub(step);
            if start < credit.read_to.load(Ordering::Relaxed) {
                return;
            }
            // Free space is counted only where the scan will not read it again.
            match source.read_run_untallied(start, (end - start) as usize) {
                Ok((datas, free)) if datas.iter().all(|d| crate::content::is_all_zero(d)) => {
                    source.tally(free);
                    credit.zero_from.store(start, Ordering::Relaxed);
                    end = start;
                }
                _ => return,
            }
        }
    }

    /// Reads batches in order and hands each over once its non-zero bytes fit
    /// the credit (zero blocks take none); blocks of the known-empty tail
    /// ([`ReadAhead::probe_tail`]) are handed over as zero without a read.
    fn run(source: &FileSource, from: u64, only: Option<&BlockMask>, tx: &std::sync::mpsc::SyncSender<ReadBatch>, credit: &ReadCredit) {
        use std::sync::atomic::Ordering;
        let batch_blocks = (BATCH_BYTES / u64::from(source.block_bytes.max(1))).max(1);
        let mut start = from;
        while start < source.block_count() && !credit.stop.load(Ordering::Relaxed) {
            let count = (source.block_count() - start).min(batch_blocks);
            let (batch, bytes) = Self::read_batch(source, start, count, only, credit.zero_from.load(Ordering::Relaxed));
            start += count;
            credit.read_to.store(start, Ordering::Relaxed);
            {
                let mut held = credit.held.lock().unwrap_or_else(|p| p.into_inner());
                while *held > 0 && *held + bytes > READ_AHEAD_DATA_BYTES && !credit.stop.load(Ordering::Relaxed) {
                    held = credit.freed.wait(held).unwrap_or_else(|p| p.into_inner());
                }
                *held += bytes;
            }
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    }

    /// Reads the batch of `count` blocks from `start` (the read set's blocks
    /// only); all-zero blocks become [`BlockData::zeros`] at once. Returns the
    /// batch and its bytes of non-zero data.
    fn read_batch(source: &FileSource, start: u64, count: u64, only: Option<&BlockMask>, zero_from: u64) -> (ReadBatch, u64) {
        match Self::read_blocks(source, start, count, only, zero_from) {
            Ok((datas, bytes)) => (Ok((start, datas)), bytes),
            Err(e) => (Err(e), 0),
        }
    }

    fn read_blocks(source: &FileSource, start: u64, count: u64, only: Option<&BlockMask>, zero_from: u64) -> Result<(Vec<Option<BlockData>>, u64), SourceError> {
        let mut datas = Vec::with_capacity(count as usize);
        let mut data_bytes = 0u64;
        let mut i = 0;
        while i < count {
            if only.is_some_and(|m| !m.contains(start + i)) {
                datas.push(None);
                i += 1;
                continue;
            }
            // The run of blocks in the read set from here, read at once; the
            // part of it in the known-empty tail is not read at all.
            let run = (i..count).take_while(|&j| only.is_none_or(|m| m.contains(start + j))).count();
            let unknown = zero_from.saturating_sub(start + i).min(run as u64) as usize;
            let known_zero = (start + i + unknown as u64..start + i + run as u64).map(|b| BlockData::zeros(source.block_len(b)));
            for data in source.read_run(start + i, unknown)?.into_iter().chain(known_zero) {
                if crate::content::is_all_zero(&data) {
                    datas.push(Some(BlockData::zeros(data.len())));
                } else {
                    data_bytes += data.len() as u64;
                    datas.push(Some(data));
                }
            }
            i += run as u64;
        }
        Ok((datas, data_bytes))
    }

    /// The next batch, or `None` if the thread is gone.
    fn next(&self) -> Option<ReadBatch> {
        let batch = self.batches.recv().ok()?;
        if let Ok((_, datas)) = &batch {
            let taken: u64 = datas.iter().flatten().filter(|d| !d.is_zeros()).map(|d| d.len() as u64).sum();
            let mut held = self.credit.held.lock().unwrap_or_else(|p| p.into_inner());
            *held = held.saturating_sub(taken);
            self.credit.freed.notify_all();
        }
        Some(batch)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.credit.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _held = self.credit.held.lock().unwrap_or_else(|p| p.into_inner());
        self.credit.freed.notify_all();
    }
}

fn read_ahead_gone(source: &FileSource) -> SourceError {
    SourceError::Io { op: "reading", path: source.device.describe().to_string(), source: std::io::Error::other("the read-ahead thread stopped") }
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
    read_ahead: Option<ReadAhead>,
    only: Option<Arc<BlockMask>>,
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
            read_ahead: None,
            only: None,
            stats: ScanStats::default(),
        }
    }

    /// Reads only the blocks in `only` (`None`: every block). Blocks outside
    /// the set are not read: the change source vouches that they equal the
    /// baseline, whose content ids go into the Merkle root. Not with a full offer.
    pub fn with_read_set(mut self, only: Option<Arc<BlockMask>>) -> Self {
        debug_assert!(only.is_none() || !self.full_offer, "a full offer reads every block");
        self.only = only;
        self
    }

    /// How many blocks of the volume the scan has gone past.
    pub fn position(&self) -> u64 {
        self.next_index
    }

    /// The next block to offer, or `None` when the whole volume is scanned.
    pub fn next_changed(&mut self) -> Result<Option<ScannedBlock>, SourceError> {
        while self.ready.is_empty() && self.next_index < self.source.block_count() {
            self.scan_batch()?;
        }
        Ok(self.ready.pop_front())
    }

    fn scan_batch(&mut self) -> Result<(), SourceError> {
        let start = self.next_index;
        if self.read_ahead.is_none() {
            self.read_ahead = Some(ReadAhead::start(self.source, start, self.only.clone())?);
        }
        let (batch_start, datas) = match self.read_ahead.as_ref().map(ReadAhead::next) {
            Some(Some(batch)) => batch?,
            _ => return Err(read_ahead_gone(self.source)),
        };
        debug_assert_eq!(batch_start, start, "read-ahead out of step");
        let count = datas.len() as u64;
        let bases = self.baselines.blocks(&self.volume, &self.target, start, count)?;
        let ids = &self.ids;
        let full_offer = self.full_offer;
        let next = start + count;
        // Hash this batch on the pool (both cores) while the read-ahead thread reads on.
        let results: Vec<(ContentId, Vec<u8>, bool)> = crate::cpu_pool::hash_pool().install(|| {
            datas
                .par_iter()
                .zip(bases.par_iter())
                .map(|(data, base)| {
                    let Some(data) = data else {
                        // Not read: unchanged since the baseline (zero if the baseline has no entry).
                        return (base.as_ref().map_or(ContentId::ZERO, |b| b.content), Vec::new(), false);
                    };
                    // Zero blocks need no page hashes: they are never a delta base.
                    if data.is_zeros() {
                        return (ContentId::ZERO, Vec::new(), false);
                    }
                    // One pass gives the page hashes and the content id (blake3 subtrees).
                    let mut hashes = Vec::new();
                    let id = ids.hash_block(data, &mut hashes);
                    match base {
                        Some(b) if b.page_hashes == hashes => (b.content, hashes, full_offer),
                        _ => (id, hashes, true),
                    }
                })
                .collect()
        });
        for (i, ((content, hashes, changed), (data, base))) in results.into_iter().zip(datas.into_iter().zip(bases)).enumerate() {
            self.merkle.push(&content);
            let Some(data) = data else {
                self.stats.skipped_blocks += 1;
                continue;
            };
            self.stats.scanned_bytes += data.len() as u64;
            // A block that became zero is a change (the target must record it); one that
            // stays zero is not, except in a full offer, where every block is recorded
            // because the target's newest RP is not this baseline.
            let changed = changed || (content.is_zero() && (base.is_some() || self.full_offer));
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
    pub fn finish(self) -> (MerkleRoot, ScanStats) {
        debug_assert_eq!(self.next_index, self.source.block_count(), "scan finished early");
        (self.merkle.finish(), self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::baseline::BaselineMeta;
    use crate::store::RpSeq;

    /// Vectored runs read exactly what block-by-block reads do, across run
    /// boundaries and up to a short last block.
    #[test]
    fn runs_read_the_same_bytes_as_single_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let block = 64 * 1024u32;
        // 150 blocks and a half: more than two runs, and a short last block.
        let len = 150 * block as usize + block as usize / 2 + 512;
        let bytes: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(2654435761).to_le_bytes()[3]).collect();
        std::fs::write(&path, &bytes).unwrap();
        let source = FileSource::open(&path, block).unwrap();
        assert_eq!(source.block_count(), 151);
        let run = source.read_run(0, 151).unwrap();
        assert_eq!(run.len(), 151);
        for (i, data) in run.iter().enumerate() {
            let single = source.read_block(i as u64).unwrap();
            assert_eq!(&data[..], &single[..], "block {i}");
            assert_eq!(&data[..], &bytes[i * block as usize..((i + 1) * block as usize).min(len)], "block {i}");
        }
        // A run from the middle that ends at the short block.
        let tail = source.read_run(140, 11).unwrap();
        assert_eq!(tail.last().unwrap().len(), block as usize / 2 + 512);
        assert_eq!(&tail[0][..], &bytes[140 * block as usize..141 * block as usize]);
    }

    /// The tail prober finds where the empty tail begins, reading backwards
    /// only through zeros, and leaves a tail with data alone.
    #[test]
    fn the_tail_prober_finds_the_empty_tail_and_stops_at_data() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let block = 1u32 << 20;
        let credit = |source: &FileSource| ReadCredit {
            held: std::sync::Mutex::new(0),
            read_to: std::sync::atomic::AtomicU64::new(0),
            zero_from: std::sync::atomic::AtomicU64::new(source.block_count()),
            freed: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        };
        // 21 blocks of data (one byte in block 20), then 27 zero blocks.
        let path = dir.path().join("tail.img");
        let mut bytes = vec![0u8; 48 << 20];
        bytes[20 * (1 << 20) + 5] = 1;
        bytes[3] = 7;
        std::fs::write(&path, &bytes).unwrap();
        let source = FileSource::open(&path, block).unwrap();
        let found = credit(&source);
        ReadAhead::probe_tail(&source, &found);
        // Probed 4 blocks at a time from the end: 48..44, .., 24..28 are zero, 20..24 is not.
        assert_eq!(found.zero_from.load(Ordering::Relaxed), 24);
        // The scan hands over the same blocks with or without the finding.
        let ahead = ReadAhead::start(&source, 0, None).unwrap();
        let mut nonzero = Vec::new();
        while let Some(batch) = ahead.next() {
            let (start, datas) = batch.unwrap();
            for (i, d) in datas.iter().enumerate() {
                let d = d.as_ref().unwrap();
                assert_eq!(&d[..], &bytes[(start as usize + i) << 20..(start as usize + i + 1) << 20]);
                if !d.is_zeros() {
                    nonzero.push(start + i as u64);
                }
            }
        }
        assert_eq!(nonzero, [0, 20]);

        // Data in the last block: nothing is known, only one probe was read.
        let path = dir.path().join("full.img");
        let mut bytes = vec![0u8; 8 << 20];
        bytes[(8 << 20) - 1] = 1;
        std::fs::write(&path, &bytes).unwrap();
        let source = FileSource::open(&path, block).unwrap();
        let found = credit(&source);
        ReadAhead::probe_tail(&source, &found);
        assert_eq!(found.zero_from.load(Ordering::Relaxed), 8);
        // It stops where the read-ahead already is.
        let path = dir.path().join("empty.img");
        std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
        let source = FileSource::open(&path, block).unwrap();
        let found = credit(&source);
        found.read_to.store(6, Ordering::Relaxed);
        ReadAhead::probe_tail(&source, &found);
        assert_eq!(found.zero_from.load(Ordering::Relaxed), 8, "the probe 4..8 starts before block 6");
    }

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
            assert_eq!(&b.data[..], &data[(b.index * u64::from(block)) as usize..][..b.data.len()]);
            staged.push((b.index, b.content, b.page_hashes));
        }
        let (root1, stats) = scan.finish();
        assert_eq!(stats.changed_blocks, 10, "all but the zero block");
        baselines.stage("v", "t", &staged).unwrap();
        baselines
            .promote("v", "t", &BaselineMeta { seq: RpSeq(1), merkle_root: root1, block_bytes: block, block_count: 11, volume_bytes: data.len() as u64, time_unix_ms: 0 })
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
        assert_eq!(n, 11, "every block, zero ones included");
    }

    #[test]
    fn a_read_set_reads_only_its_blocks_and_keeps_the_merkle_root() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let block = 4096u32;
        let mut data: Vec<u8> = (0..64 * block as usize).map(|i| (i % 253) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let baselines = Baselines::open(&dir.path().join("b.redb")).unwrap();
        let ids = IdScheme::plain();
        let src = FileSource::open(&image, block).unwrap();
        let mut scan = Scanner::new(&src, &baselines, "v", "t", ids.clone(), false);
        let mut staged = Vec::new();
        while let Some(b) = scan.next_changed().unwrap() {
            staged.push((b.index, b.content, b.page_hashes));
        }
        let (root1, _) = scan.finish();
        baselines.stage("v", "t", &staged).unwrap();
        baselines
            .promote("v", "t", &BaselineMeta { seq: RpSeq(1), merkle_root: root1, block_bytes: block, block_count: 64, volume_bytes: data.len() as u64, time_unix_ms: 0 })
            .unwrap();

        // Blocks 3 and 40 change, block 50 becomes zero; the read set names them and block 7 (rewritten, same bytes).
        data[3 * 4096] ^= 0xff;
        data[40 * 4096 + 100] ^= 0xff;
        data[50 * 4096..51 * 4096].fill(0);
        std::fs::write(&image, &data).unwrap();
        let mut only = BlockMask::new(64);
        for i in [3, 7, 40, 50] {
            only.insert(i);
        }
        let src = FileSource::open(&image, block).unwrap();
        let mut scan = Scanner::new(&src, &baselines, "v", "t", ids.clone(), false).with_read_set(Some(Arc::new(only)));
        let mut changed = Vec::new();
        while let Some(b) = scan.next_changed().unwrap() {
            changed.push(b.index);
        }
        let (root_partial, stats) = scan.finish();
        assert_eq!(changed, vec![3, 40, 50]);
        assert_eq!(stats.scanned_bytes, 4 * 4096, "only the four blocks of the set are read");
        assert_eq!(stats.skipped_blocks, 60);
        // The same root as a full scan of the new content.
        let mut full = Scanner::new(&src, &baselines, "v", "t", ids, false);
        while full.next_changed().unwrap().is_some() {}
        let (root_full, full_stats) = full.finish();
        assert_eq!(root_partial, root_full);
        assert_eq!(full_stats.scanned_bytes, 64 * 4096);
    }

    /// A device of no file: bytes in memory, read at most `chunk` bytes a call
    /// (as an API that answers in pieces would).
    struct MemoryDevice {
        bytes: Vec<u8>,
        chunk: usize,
        reads: std::sync::atomic::AtomicU64,
    }

    impl BlockDevice for MemoryDevice {
        fn describe(&self) -> &str {
            "memory"
        }
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn aligned(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let from = usize::try_from(offset).unwrap().min(self.bytes.len());
            let n = buf.len().min(self.chunk).min(self.bytes.len() - from);
            buf[..n].copy_from_slice(&self.bytes[from..from + n]);
            Ok(n)
        }
    }

    /// The cycle's reader reads any block device, not only files: a scan of a
    /// device that answers in short pieces finds the same blocks and the same
    /// root as a scan of the same bytes in an image file, and a device that
    /// shrinks mid-read fails with an error that names it.
    #[test]
    fn any_block_device_scans_like_an_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let block = 16 * 1024u32;
        let mut data: Vec<u8> = (0..100 * block as usize + 3000).map(|i| (i as u64).wrapping_mul(2654435761).to_le_bytes()[2]).collect();
        data[10 * block as usize..60 * block as usize].fill(0);
        let image = dir.path().join("disk.img");
        std::fs::write(&image, &data).unwrap();
        let ids = IdScheme::plain();
        let scan_all = |src: &FileSource, baselines: &Baselines| {
            let mut scan = Scanner::new(src, baselines, "v", "t", ids.clone(), false);
            let mut changed = Vec::new();
            while let Some(b) = scan.next_changed().unwrap() {
                assert_eq!(&b.data[..], &data[(b.index * u64::from(block)) as usize..][..b.data.len()], "block {}", b.index);
                changed.push((b.index, b.content));
            }
            (changed, scan.finish().0)
        };
        let from_file = scan_all(&FileSource::open(&image, block).unwrap(), &Baselines::open(&dir.path().join("f.redb")).unwrap());
        let device = Arc::new(MemoryDevice { bytes: data.clone(), chunk: 5000, reads: 0.into() });
        let src = FileSource::on(device.clone(), block);
        assert_eq!((src.volume_bytes(), src.block_count(), src.block_len(100)), (data.len() as u64, 101, 3000));
        let from_device = scan_all(&src, &Baselines::open(&dir.path().join("d.redb")).unwrap());
        assert_eq!(from_device, from_file);
        assert_eq!(from_device.0.len(), 51, "the 50 zero blocks are not changes");
        assert!(device.reads.load(std::sync::atomic::Ordering::Relaxed) > 101, "short reads were read again");

        let shrunk = FileSource::on(Arc::new(MemoryDevice { bytes: data[..data.len() - 4000].to_vec(), chunk: 1 << 20, reads: 0.into() }), block);
        let honest = FileSource { volume_bytes: data.len() as u64, ..shrunk };
        let e = honest.read_block(100).unwrap_err().to_string();
        assert!(e.contains("memory") && e.contains("volume shrank during the cycle"), "{e}");
    }
}
