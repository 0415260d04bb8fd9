//! XFS, read for its free space: the superblock, the state of the internal
//! log, each allocation group's header (AGF) and its by-block free-space
//! B+tree (bnobt).
//!
//! The free-space trees say what is free only when nothing in the log would
//! change them: the log must end in an unmount record (a cleanly unmounted
//! filesystem), or what recovery would replay must touch nothing but the
//! superblock (a frozen filesystem covers its log with such records, so a
//! snapshot taken while frozen qualifies; a crash snapshot of a busy one does
//! not). Checksums are checked where the filesystem keeps them (version 5).
//! Every doubt is an [`XfsError`]: the caller reads the blocks whole.
//!
//! On-disk integers are big-endian, but for the contents of log items, which
//! are in the byte order of the host that wrote them (only little-endian logs
//! are read).

use std::ops::Range;

use crate::adapt::layout::ReadAt;

/// Why an XFS filesystem's free space is not used.
#[derive(Debug, thiserror::Error)]
pub enum XfsError {
    /// No XFS superblock at the start.
    #[error("its superblock is not XFS's")]
    NotXfs,
    /// Metadata that is not what the format allows (a checksum, a field out of range).
    #[error("{what} at byte {offset} is damaged: {why}")]
    Damaged {
        /// Which structure ("the superblock", "the AGF of group 2").
        what: String,
        /// Its first byte in the view.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A layout or feature this reader does not read.
    #[error("{0}")]
    Unsupported(String),
    /// The log holds changes recovery would make: the free-space trees on
    /// disk may not be the filesystem's.
    #[error("its log has changes to replay ({0}): a snapshot of a filesystem that was not frozen")]
    LogToReplay(String),
    /// A read failed.
    #[error("reading XFS metadata at byte {offset}: {source}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The cause.
        source: std::io::Error,
    },
}

const SB_MAGIC: &[u8; 4] = b"XFSB";
const AGF_MAGIC: &[u8; 4] = b"XAGF";
/// bnobt block magic numbers: version 5 (with checksums) and version 4.
const BNO_MAGIC_CRC: &[u8; 4] = b"AB3B";
const BNO_MAGIC: &[u8; 4] = b"ABTB";
const LOG_MAGIC: u32 = 0xFEED_BABE;
const NULL_AGBLOCK: u32 = u32::MAX;
/// Incompatible features whose free-space layout this reader knows
/// (ftype, sparse inodes, meta uuid, bigtime, large extent counts,
/// exchange-range, parent pointers).
const INCOMPAT_KNOWN: u32 = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
/// The deepest free-space tree the format allows.
const MAX_LEVELS: u32 = 9;
/// Log basic blocks: the unit of the log's cycle stamps.
const BB: u64 = 512;
/// Log blocks looked at on each side of the head: as much as the log's
/// in-core buffers can have in flight at once (8 of at most 256 KiB).
const HEAD_WINDOW: u64 = 4096;
/// Log records recovery would replay that are read before giving up.
const MAX_RECORDS: usize = 256;
/// Log operation flags and client ids.
const OP_START: u8 = 0x01;
const OP_COMMIT: u8 = 0x02;
const OP_CONTINUE: u8 = 0x04;
const OP_WAS_CONT: u8 = 0x08;
const OP_UNMOUNT: u8 = 0x20;
const CLIENT_TRANSACTION: u8 = 0x69;
const CLIENT_LOG: u8 = 0xAA;
const TRANS_MAGIC: u32 = 0x5452_414E;
const ITEM_BUF: u16 = 0x123C;
const ITEM_INODE: u16 = 0x123B;
/// `h_fmt` of a log written by a little-endian Linux host.
const LOG_FMT_LE: u32 = 1;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// XFS checksums: crc32c over the structure with its checksum field as zeros,
/// stored little-endian.
fn crc_ok(data: &[u8], field: usize) -> bool {
    let mut copy = data.to_vec();
    copy[field..field + 4].fill(0);
    crc32c::crc32c(&copy) == u32::from_le_bytes(data[field..field + 4].try_into().expect("4 bytes"))
}

/// One allocation group's free-space tree.
struct Ag {
    /// Blocks in the group (the last one may be shorter).
    length: u32,
    /// The bnobt's root block in the group.
    root: u32,
    /// The bnobt's height.
    levels: u32,
}

/// How the log was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogState {
    /// Its last record is an unmount record.
    Unmounted,
    /// What recovery would replay touches only the superblock (a frozen,
    /// covered log).
    Covered,
}

/// An XFS filesystem whose free space is trusted.
pub struct XfsLayout {
    /// Its first byte in the view.
    start: u64,
    block: u64,
    dblocks: u64,
    agblocks: u64,
    crc: bool,
    ags: Vec<Ag>,
    free_blocks: u64,
    log: LogState,
    /// Groups whose tree failed once: counted as used from then on, without
    /// walking their tree again (nor saying so again).
    damaged: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

/// Reads `len` bytes at `offset` of the view.
fn read(disk: &dyn ReadAt, offset: u64, len: u64) -> Result<Vec<u8>, XfsError> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, offset).map_err(|source| XfsError::Io { offset, source })?;
    Ok(buf)
}

impl XfsLayout {
    /// Reads and checks the XFS filesystem at byte `start` of the view (at
    /// most `size` bytes): superblock, log, every group's AGF.
    pub fn open(disk: &dyn ReadAt, start: u64, size: u64) -> Result<XfsLayout, XfsError> {
        let head = read(disk, start, 512)?;
        if &head[..4] != SB_MAGIC {
            return Err(XfsError::NotXfs);
        }
        let damaged = |why: String| XfsError::Damaged { what: "the superblock".into(), offset: start, why };
        let version = be16(&head, 100) & 0xF;
        let sector = u64::from(be16(&head, 102));
        if !(version == 4 || version == 5) {
            return Err(XfsError::Unsupported(format!("its superblock has version {version}, not 4 or 5")));
        }
        if !sector.is_power_of_two() || !(512..=32768).contains(&sector) {
            return Err(damaged(format!("a sector size of {sector} bytes")));
        }
        let sb = if sector > 512 { read(disk, start, sector)? } else { head };
        let crc = version == 5;
        if crc && !crc_ok(&sb, 224) {
            return Err(damaged("it fails its checksum".into()));
        }
        let block = u64::from(be32(&sb, 4));
        let dblocks = be64(&sb, 8);
        let agblocks = u64::from(be32(&sb, 84));
        let agcount = u64::from(be32(&sb, 88));
        let (blocklog, agblklog) = (u32::from(sb[120]), u32::from(sb[124]));
        if !(9..=16).contains(&blocklog) || block != 1 << blocklog {
            return Err(damaged(format!("a block size of {block} bytes")));
        }
        if agblocks == 0 || agcount == 0 || agcount > 1 << 20 || agblklog > 31 || agblocks > 1 << agblklog {
            return Err(damaged(format!("{agcount} groups of {agblocks} blocks")));
        }
        if dblocks > agblocks * agcount || dblocks <= agblocks * (agcount - 1) {
            return Err(damaged(format!("{dblocks} blocks in {agcount} groups of {agblocks}")));
        }
        if dblocks.checked_mul(block).is_none_or(|bytes| bytes > size) {
            return Err(damaged(format!("{dblocks} blocks of {block} bytes, more than the {size} bytes it is in")));
        }
        if sb[126] != 0 {
            return Err(XfsError::Unsupported("mkfs did not finish it".into()));
        }
        if crc {
            let incompat = be32(&sb, 216);
            if incompat & INCOMPAT_NEEDSREPAIR != 0 {
                return Err(XfsError::Unsupported("it is marked as needing xfs_repair".into()));
            }
            if incompat & !INCOMPAT_KNOWN != 0 {
                return Err(XfsError::Unsupported(format!("it has incompatible features {:#x} this reader does not know", incompat & !INCOMPAT_KNOWN)));
            }
        }
        let logstart = be64(&sb, 48);
        if logstart == 0 {
            return Err(XfsError::Unsupported("its log is on another device, whose state cannot be checked here".into()));
        }
        let mut layout = XfsLayout { start, block, dblocks, agblocks, crc, ags: Vec::new(), free_blocks: 0, log: LogState::Unmounted, damaged: Default::default() };
        let log_first = (logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1));
        let log_blocks = u64::from(be32(&sb, 96));
        if log_blocks == 0 || log_first + log_blocks > dblocks {
            return Err(damaged(format!("a log of {log_blocks} blocks at block {log_first}")));
        }
        let log = Log { at: start + log_first * block, bbs: log_blocks * block / BB };
        layout.log = log.state(disk)?;
        for ag in 0..agcount {
            let length = agblocks.min(dblocks - ag * agblocks);
            let (a, free) = layout.agf(disk, ag, sector, length)?;
            layout.free_blocks += free;
            layout.ags.push(a);
        }
        Ok(layout)
    }

    /// Reads and checks group `ag`'s AGF: its tree's root, and its free blocks.
    fn agf(&self, disk: &dyn ReadAt, ag: u64, sector: u64, length: u64) -> Result<(Ag, u64), XfsError> {
        let offset = self.start + ag * self.agblocks * self.block + sector;
        let agf = read(disk, offset, sector)?;
        let damaged = |why: String| XfsError::Damaged { what: format!("the AGF of group {ag}"), offset, why };
        if &agf[..4] != AGF_MAGIC || u64::from(be32(&agf, 8)) != ag {
            return Err(damaged("its magic number or group number is wrong".into()));
        }
        if self.crc && !crc_ok(&agf, 216) {
            return Err(damaged("it fails its checksum".into()));
        }
        let (len, root, levels, free) = (be32(&agf, 12), be32(&agf, 16), be32(&agf, 28), be32(&agf, 52));
        if u64::from(len) != length || root >= len || levels == 0 || levels > MAX_LEVELS || free > len {
            return Err(damaged(format!("length {len}, free-space tree root {root} at height {levels}")));
        }
        Ok((Ag { length: len, root, levels }, u64::from(free)))
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> u64 {
        self.block
    }

    /// Blocks of the filesystem.
    pub fn blocks(&self) -> u64 {
        self.dblocks
    }

    /// Free blocks as the groups' headers count them (the free lists included).
    pub fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// How the log was found.
    pub fn log_state(&self) -> LogState {
        self.log
    }

    /// Which of blocks `first .. first + count` are in use: bit `i` (byte
    /// `i / 8`, bit `i % 8`) set when block `first + i` is. Blocks the
    /// free-space trees do not list, including those past the filesystem,
    /// count as used, and so do all blocks of a group whose tree cannot be
    /// read: the first such error is returned beside the map, once per group.
    pub fn used_bits(&self, disk: &dyn ReadAt, first: u64, count: u64) -> (Vec<u8>, Option<XfsError>) {
        let mut bits = vec![0xFFu8; count.div_ceil(8) as usize];
        let mut damaged = None;
        let end = (first + count).min(self.dblocks);
        let mut at = first;
        while at < end {
            let ag = at / self.agblocks;
            let ag_first = ag * self.agblocks;
            let Some(group) = self.ags.get(ag as usize) else { break };
            let ag_end = (ag_first + u64::from(group.length)).min(end);
            if self.damaged.lock().unwrap_or_else(|p| p.into_inner()).contains(&ag) {
                at = ag_end.max(at + 1);
                continue;
            }
            let (lo, hi) = ((at - ag_first) as u32, (ag_end - ag_first) as u32);
            let mut free = Vec::new();
            match self.free_extents(disk, ag, group, lo..hi, |range| free.push(range)) {
                Ok(()) => {
                    for b in free.into_iter().flatten() {
                        let i = (ag_first + u64::from(b) - first) as usize;
                        bits[i / 8] &= !(1 << (i % 8));
                    }
                }
                Err(e) => {
                    self.damaged.lock().unwrap_or_else(|p| p.into_inner()).insert(ag);
                    damaged = damaged.or(Some(e));
                }
            }
            at = ag_end.max(at + 1);
        }
        (bits, damaged)
    }

    /// Calls `found` with the free blocks of group `ag` inside `want` (group
    /// block numbers), walking its bnobt from the root to the leaf holding
    /// `want.start` and then right along the leaves.
    fn free_extents(&self, disk: &dyn ReadAt, ag: u64, group: &Ag, want: Range<u32>, mut found: impl FnMut(Range<u32>)) -> Result<(), XfsError> {
        let header = if self.crc { 56 } else { 16 };
        let (magic, leaf_max, node_max) = (if self.crc { BNO_MAGIC_CRC } else { BNO_MAGIC }, (self.block as usize - header) / 8, (self.block as usize - header) / 12);
        let block_at = |bno: u32| self.start + (ag * self.agblocks + u64::from(bno)) * self.block;
        let load = |bno: u32, level: u32| -> Result<(Vec<u8>, usize), XfsError> {
            let offset = block_at(bno);
            let damaged = |why: String| XfsError::Damaged { what: format!("block {bno} of the free-space tree of group {ag}"), offset, why };
            if bno >= group.length {
                return Err(damaged(format!("it is past the group's {} blocks", group.length)));
            }
            let b = read(disk, offset, self.block)?;
            let records = usize::from(be16(&b, 6));
            if &b[..4] != magic || u32::from(be16(&b, 4)) != level {
                return Err(damaged(format!("its magic number or height is not that of a level-{level} block")));
            }
            if records > if level == 0 { leaf_max } else { node_max } || (level > 0 && records == 0) {
                return Err(damaged(format!("{records} records")));
            }
            if self.crc && (!crc_ok(&b, 52) || u64::from(be32(&b, 48)) != ag || be64(&b, 16) != (offset - self.start) / BB) {
                return Err(damaged("it fails its checksum, or says it is another block".into()));
            }
            Ok((b, records))
        };
        let (mut bno, mut level) = (group.root, group.levels - 1);
        let (mut b, mut records) = load(bno, level)?;
        while level > 0 {
            // The last key at or before the start of what is wanted (the
            // extent holding it may begin before it).
            let i = (0..records).take_while(|&i| i == 0 || be32(&b, header + i * 8) <= want.start).last().unwrap_or(0);
            bno = be32(&b, header + node_max * 8 + i * 4);
            level -= 1;
            (b, records) = load(bno, level)?;
        }
        let mut previous_end = 0u64;
        for _ in 0..=group.length {
            for i in 0..records {
                let (s, c) = (be32(&b, header + i * 8), be32(&b, header + i * 8 + 4));
                let end = u64::from(s) + u64::from(c);
                if c == 0 || end > u64::from(group.length) || u64::from(s) < previous_end {
                    let why = format!("its free extent {s}+{c} is out of order or out of the group");
                    return Err(XfsError::Damaged { what: format!("block {bno} of the free-space tree of group {ag}"), offset: block_at(bno), why });
                }
                previous_end = end;
                if s >= want.end {
                    return Ok(());
                }
                if end > u64::from(want.start) {
                    found(s.max(want.start)..(end as u32).min(want.end));
                }
            }
            let next = be32(&b, 12);
            if next == NULL_AGBLOCK {
                return Ok(());
            }
            bno = next;
            (b, records) = load(bno, 0)?;
        }
        Err(XfsError::Damaged { what: format!("the free-space tree of group {ag}"), offset: block_at(group.root), why: "its leaves form a loop".into() })
    }
}

/// The internal log: a ring of 512-byte basic blocks, each stamped with the
/// cycle (pass over the ring) that wrote it.
struct Log {
    /// Its first byte in the view.
    at: u64,
    /// Its length in basic blocks.
    bbs: u64,
}

/// A log record's header.
struct Record {
    /// Where it starts, in basic blocks.
    block: u64,
    cycle: u32,
    /// Header blocks (more than one for large records).
    header_bbs: u64,
    /// Data bytes after the header blocks.
    len: u64,
    tail_lsn: u64,
    ops: u32,
}

impl Record {
    fn end(&self, log_bbs: u64) -> u64 {
        (self.block + self.header_bbs + self.len.div_ceil(BB)) % log_bbs
    }
}

impl Log {
    fn damaged(&self, why: String) -> XfsError {
        XfsError::Damaged { what: "the log".into(), offset: self.at, why }
    }

    /// `count` basic blocks from block `first`, going round the ring.
    fn read(&self, disk: &dyn ReadAt, first: u64, count: u64) -> Result<Vec<u8>, XfsError> {
        let first = first % self.bbs;
        let here = count.min(self.bbs - first);
        let mut out = read(disk, self.at + first * BB, here * BB)?;
        if here < count {
            out.extend(read(disk, self.at, (count - here) * BB)?);
        }
        Ok(out)
    }

    /// The cycle that wrote a basic block: its first word, or a record
    /// header's cycle field.
    fn cycle_of(bytes: &[u8]) -> u32 {
        if be32(bytes, 0) == LOG_MAGIC {
            be32(bytes, 4)
        } else {
            be32(bytes, 0)
        }
    }

    fn cycle(&self, disk: &dyn ReadAt, bb: u64) -> Result<u32, XfsError> {
        Ok(Self::cycle_of(&self.read(disk, bb, 1)?))
    }

    /// Finds the head (the block after the last one written, in `1..=bbs`)
    /// and the cycle that wrote the last record, as recovery does, then
    /// checks the blocks around it say the same (no hole left by writes
    /// that finished out of order).
    fn head(&self, disk: &dyn ReadAt) -> Result<(u64, u32), XfsError> {
        let n = self.bbs;
        let (first, last) = (self.cycle(disk, 0)?, self.cycle(disk, n - 1)?);
        let search = |newer: &dyn Fn(u32) -> bool| -> Result<u64, XfsError> {
            // The first block not written by the newest cycle.
            let (mut lo, mut hi) = (0, n - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if newer(self.cycle(disk, mid)?) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            Ok(hi)
        };
        let (head, cycle) = if first == 0 {
            return Err(self.damaged("its first block was never written".into()));
        } else if last == 0 {
            (search(&|c| c != 0)?, first)
        } else if first == last {
            (n, first)
        } else if last.wrapping_add(1) == first {
            (search(&|c| c == first)?, first)
        } else {
            return Err(self.damaged(format!("cycle {first} at its start and {last} at its end")));
        };
        let window = HEAD_WINDOW.min(n);
        let before = self.read(disk, (head + n - window) % n, window)?;
        for k in 0..window {
            let want = if head >= window - k { cycle } else { cycle.wrapping_sub(1) };
            if Self::cycle_of(&before[(k * BB) as usize..]) != want {
                return Err(XfsError::LogToReplay("blocks before its head were not all written".into()));
            }
        }
        let after = self.read(disk, head % n, window)?;
        for k in 0..window {
            let c = Self::cycle_of(&after[(k * BB) as usize..]);
            let newer = if head + k < n { c == cycle } else { c == cycle.wrapping_add(1) };
            if newer && c != 0 {
                return Err(XfsError::LogToReplay("blocks after its head were written".into()));
            }
        }
        Ok((head, cycle))
    }

    /// The record header at basic block `block`, if one is there.
    fn record(&self, disk: &dyn ReadAt, block: u64) -> Result<Option<Record>, XfsError> {
        let h = self.read(disk, block, 1)?;
        if be32(&h, 0) != LOG_MAGIC {
            return Ok(None);
        }
        let (cycle, version, len, lsn, size) = (be32(&h, 4), be32(&h, 8), u64::from(be32(&h, 12)), be64(&h, 16), u64::from(be32(&h, 320)));
        if lsn != (u64::from(cycle) << 32 | block) || len > 1 << 20 {
            return Err(self.damaged(format!("the record at block {block} says it is at {}:{} with {len} bytes", lsn >> 32, lsn & 0xFFFF_FFFF)));
        }
        let header_bbs = if version & 2 != 0 && size > 32768 { size.div_ceil(32768).min(64) } else { 1 };
        if be32(&h, 300) != LOG_FMT_LE {
            return Err(XfsError::Unsupported("its log was not written by a little-endian Linux host".into()));
        }
        Ok(Some(Record { block, cycle, header_bbs, len, tail_lsn: be64(&h, 24), ops: be32(&h, 40) }))
    }

    /// Whether the log needs nothing replayed but the superblock.
    fn state(&self, disk: &dyn ReadAt) -> Result<LogState, XfsError> {
        if self.bbs < 2 {
            return Err(self.damaged(format!("{} blocks long", self.bbs)));
        }
        let (head, cycle) = self.head(disk)?;
        let n = self.bbs;
        // The last record: the header nearest before the head.
        let mut last = None;
        for back in 1..=n.min(2 * 1024) {
            if let Some(r) = self.record(disk, (head + n - back) % n)? {
                last = Some(r);
                break;
            }
        }
        let Some(last) = last else { return Err(self.damaged("no record header before its head".into())) };
        if last.cycle != cycle || last.end(n) != head % n {
            return Err(XfsError::LogToReplay("its last record does not end at its head".into()));
        }
        let data = self.data(disk, &last)?;
        if last.ops == 1 && data.len() >= 12 && data[8] == CLIENT_LOG && data[9] & OP_UNMOUNT != 0 {
            return Ok(LogState::Unmounted);
        }
        // Replay would start at the last record's tail: every record from
        // there to the head must touch only the superblock.
        let mut block = last.tail_lsn & 0xFFFF_FFFF;
        if block >= n {
            return Err(self.damaged(format!("its tail at block {block}")));
        }
        for _ in 0..MAX_RECORDS {
            let Some(record) = self.record(disk, block)? else {
                return Err(XfsError::LogToReplay(format!("no record where its tail is, at block {block}")));
            };
            let data = self.data(disk, &record)?;
            superblock_only(&data, record.ops).map_err(|why| XfsError::LogToReplay(format!("the record at block {block} {why}")))?;
            block = record.end(n);
            if block == head % n {
                return Ok(LogState::Covered);
            }
        }
        Err(XfsError::LogToReplay(format!("more than {MAX_RECORDS} records")))
    }

    /// A record's data with the first word of each basic block put back
    /// (the cycle stamp replaced it on disk; the headers keep the words).
    fn data(&self, disk: &dyn ReadAt, r: &Record) -> Result<Vec<u8>, XfsError> {
        let data_bbs = r.len.div_ceil(BB);
        let raw = self.read(disk, r.block, r.header_bbs + data_bbs)?;
        let (headers, data) = raw.split_at((r.header_bbs * BB) as usize);
        let mut data = data.to_vec();
        for i in 0..data_bbs as usize {
            let (j, k) = (i / 64, i % 64);
            if j as u64 >= r.header_bbs {
                return Err(self.damaged(format!("the record at block {} has too few header blocks", r.block)));
            }
            let word = if j == 0 { 44 + k * 4 } else { j * BB as usize + 4 + k * 4 };
            data[i * BB as usize..i * BB as usize + 4].copy_from_slice(&headers[word..word + 4]);
        }
        data.truncate(r.len as usize);
        Ok(data)
    }
}

/// Checks that the operations of one log record change nothing but the
/// superblock (buffer items at disk address 0) or are unmount records; the
/// reason otherwise.
fn superblock_only(data: &[u8], ops: u32) -> Result<(), String> {
    enum State {
        Outside,
        Header,
        Items { regions_left: u16 },
    }
    let mut state = State::Outside;
    let mut at = 0usize;
    for _ in 0..ops {
        let Some(op) = data.get(at..at + 12) else { return Err("ends inside its operations".into()) };
        let (len, client, flags) = (be32(op, 4) as usize, op[8], op[9]);
        let Some(body) = data.get(at + 12..(at + 12).saturating_add(len)) else { return Err("has an operation longer than itself".into()) };
        at += 12 + len;
        if flags & (OP_CONTINUE | OP_WAS_CONT) != 0 {
            return Err("holds a transaction that spans records".into());
        }
        if client == CLIENT_LOG && flags & OP_UNMOUNT != 0 {
            continue;
        }
        if client != CLIENT_TRANSACTION {
            return Err(format!("holds an operation of client {client:#x}"));
        }
        if flags & OP_START != 0 {
            state = State::Header;
            continue;
        }
        if flags & OP_COMMIT != 0 {
            state = State::Outside;
            continue;
        }
        state = match state {
            State::Outside => return Err("holds an operation outside a transaction".into()),
            State::Header if body.len() >= 16 && u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) == TRANS_MAGIC => State::Items { regions_left: 0 },
            State::Header => return Err("holds a transaction without its header".into()),
            State::Items { regions_left } if regions_left > 0 => State::Items { regions_left: regions_left - 1 },
            State::Items { .. } => {
                if body.len() < 16 {
                    return Err("holds a log item too short to read".into());
                }
                let (kind, regions) = (u16::from_le_bytes([body[0], body[1]]), u16::from_le_bytes([body[2], body[3]]));
                let daddr = i64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
                if kind == ITEM_INODE {
                    return Err("logs changes to inodes".into());
                }
                if kind != ITEM_BUF {
                    return Err(format!("logs an item of type {kind:#x}"));
                }
                if daddr != 0 {
                    return Err(format!("logs the metadata block at sector {daddr}"));
                }
                State::Items { regions_left: regions.saturating_sub(1) }
            }
        };
    }
    Ok(())
}
