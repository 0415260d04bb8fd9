//! Free space of the filesystem in a volume: the blocks a full read may skip.
//!
//! A filesystem's free blocks hold whatever deleted files left there; reading
//! and sending them costs bytes and restores nothing anyone needs. When a
//! cycle's point-in-time view holds a filesystem this module reads, the reader
//! skips the blocks its allocation bitmaps say are free (a volume block wholly
//! free is not read; the free parts of one partly used are zeroed), and the
//! RP holds zeros there: a restore writes zeros to free space.
//!
//! Trust comes first: a skipped block that was in use would be data lost from
//! every RP after it. The bitmaps are used only when the filesystem on the
//! view says they are complete: ext4 without a journal to replay (a snapshot
//! of a frozen or unmounted filesystem; a crash-consistent snapshot of a
//! mounted one still needs its journal, so it is read whole), no error
//! recorded, checksums right where the filesystem keeps them, a layout this
//! reader knows; NTFS not marked dirty, its `$LogFile` empty or clean
//! (`drmesh_winagent::ntfs`). Anything else is read whole, with the reason
//! given. A group whose bitmap cannot be read or fails its checksum is read
//! whole.
//!
//! XFS is trusted when its log needs nothing replayed but the superblock (a
//! cleanly unmounted filesystem, or one frozen when the view was taken), its
//! free blocks read from each group's free-space tree ([`xfs`]).
//!
//! Filesystems read today: ext2/3/4, XFS and NTFS, on the whole volume, in an
//! MBR or GPT partition of it, or in a linear LVM logical volume (one
//! segment) on it; besides them, the extents of an LVM physical volume no
//! logical volume holds, and swap areas past their header. btrfs and logical
//! volumes of several segments are read whole (their readers are to come).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::device::{BlockDevice, DIRECT_ALIGN};
use crate::proto::gossip::catalog::Consistency;
use crate::adapt::layout::{list_volumes, ReadAt};
use crate::adapt::lvm;
use crate::adapt::superblock::FsKind;
use drmesh_winagent::ntfs::{Disk, NtfsError, NtfsVolume};
use xfs::{LogState, XfsError, XfsLayout};

pub mod xfs;

/// Why the free space of a volume's filesystem is not used. The volume is
/// read whole; nothing else changes.
#[derive(Debug, thiserror::Error)]
pub enum FreeSpaceError {
    /// An ext4 filesystem whose bitmaps may not say what is in use.
    #[error("ext4 filesystem on {device}: {reason}; its free blocks are read")]
    Ext4Untrusted {
        /// The view's device.
        device: String,
        /// What the superblock or the group descriptors say.
        reason: String,
    },
    /// An XFS filesystem whose free-space trees may not say what is in use.
    #[error("XFS filesystem on {device}: {source}; its free blocks are read")]
    XfsUntrusted {
        /// The view's device.
        device: String,
        /// What was found.
        source: XfsError,
    },
    /// The filesystem's metadata could not be read.
    #[error("reading the filesystem metadata of {device} at byte {offset}: {source}; its free blocks are read")]
    Io {
        /// The view's device.
        device: String,
        /// Where the read started.
        offset: u64,
        /// The cause.
        source: std::io::Error,
    },
}

/// The free space of the filesystems in one view, read group by group as
/// the scan goes (a few bitmaps in memory, not the whole volume's).
pub struct FreeSpace {
    device: Arc<dyn BlockDevice>,
    /// The filesystems whose bitmaps are used, in disk order.
    parts: Vec<Part>,
    /// Groups read whole because their bitmap failed (read error, checksum).
    unusable_groups: std::sync::atomic::AtomicU64,
}

/// What a probe of a view found.
pub struct Probe {
    /// The free space to skip, when at least one filesystem's is trusted.
    pub free: Option<FreeSpace>,
    /// Filesystems found whose free space is read, and why (for people).
    pub not_used: Vec<String>,
}

/// One allocation map of the view that is used: where it is and its layout.
struct Part {
    /// Its first byte in the view.
    start: u64,
    /// Where it is, for people: "the whole disk", "partition 1 (GPT type ...)".
    place: String,
    fs: Fs,
    /// Recently used groups' bitmaps, newest last.
    cache: Mutex<Vec<(u64, Arc<GroupBits>)>>,
}

/// An allocation map the reader knows, checked: a filesystem's, or the
/// extents of an LVM physical volume no logical volume holds.
enum Fs {
    /// ext2/3/4: block groups, each with its block bitmap.
    Ext4(Ext4Layout),
    /// NTFS: one `$Bitmap`, read [`NTFS_GROUP_BYTES`] at a time.
    Ntfs(NtfsVolume),
    /// XFS: allocation groups with free-space trees, read [`XFS_GROUP_BLOCKS`] blocks at a time.
    Xfs(XfsLayout),
    /// An LVM physical volume's data area: its extents no logical volume holds.
    LvmPv(PvExtents),
    /// A swap area past its header page: every page, as a booting system
    /// never reads what a swap area held before (a hibernation image changes
    /// the signature, and such an area is not this).
    Swap {
        /// Pages of 4 KiB after the header.
        pages: u64,
    },
}

/// The extents of an LVM physical volume, in units small enough for any
/// volume block (a whole 4 MiB extent would not fit in a 1 MiB block).
struct PvExtents {
    /// Bytes per unit (4096, or 512 when extents or their start are not 4 KiB-aligned).
    unit: u64,
    /// Bytes per extent.
    extent_bytes: u64,
    /// Entry `i`: extent `i` is held by a logical volume.
    allocated: Vec<bool>,
}

impl PvExtents {
    /// Units per group of the reader's cache.
    const GROUP_UNITS: u64 = 32768;

    fn bits(&self, group: u64) -> Vec<u8> {
        let mut bits = vec![0u8; (Self::GROUP_UNITS / 8) as usize];
        for i in 0..Self::GROUP_UNITS {
            let extent = ((group * Self::GROUP_UNITS + i) * self.unit / self.extent_bytes) as usize;
            if self.allocated.get(extent).copied().unwrap_or(true) {
                bits[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        bits
    }
}

/// Blocks of an XFS filesystem whose allocation is looked up at a time (a
/// 4 KiB map; 128 MiB at 4 KiB blocks).
const XFS_GROUP_BLOCKS: u64 = 32768;

/// Pages of a swap area per group of the reader's cache (all free).
const SWAP_GROUP_PAGES: u64 = 32768;

/// Bytes of NTFS's `$Bitmap` read at a time (32,768 clusters: 128 MiB at 4 KiB).
const NTFS_GROUP_BYTES: u64 = 4096;

/// Allocation units of a filesystem, as the reader walks them.
struct Geometry {
    /// Bytes per unit (block, cluster).
    unit: u64,
    /// The first unit the bitmaps cover.
    first: u64,
    /// Units of the filesystem.
    units: u64,
    /// Units per group (per bitmap piece).
    per_group: u64,
}

impl Fs {
    fn geometry(&self) -> Geometry {
        match self {
            Fs::Ext4(l) => Geometry { unit: l.sb.block_bytes, first: u64::from(l.sb.first_data_block), units: l.sb.blocks, per_group: u64::from(l.sb.blocks_per_group) },
            Fs::Ntfs(v) => Geometry { unit: v.cluster_bytes(), first: 0, units: v.clusters(), per_group: NTFS_GROUP_BYTES * 8 },
            Fs::Xfs(x) => Geometry { unit: x.block_bytes(), first: 0, units: x.blocks(), per_group: XFS_GROUP_BLOCKS },
            Fs::LvmPv(p) => Geometry { unit: p.unit, first: 0, units: p.allocated.len() as u64 * p.extent_bytes / p.unit, per_group: PvExtents::GROUP_UNITS },
            Fs::Swap { pages } => Geometry { unit: 4096, first: 0, units: *pages, per_group: SWAP_GROUP_PAGES },
        }
    }
}

/// The view as a disk for the NTFS reader.
impl Disk for ViewDisk<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        ReadAt::read_at(self, buf, offset)
    }
}

/// Groups' bitmaps kept at once per filesystem (the scan and the tail prober each use one).
const CACHED_GROUPS: usize = 4;

/// One group's allocation.
enum GroupBits {
    /// Every block counts as used (uninitialized or unusable bitmap).
    AllUsed,
    /// Bit `i` set: the group's block `i` is in use.
    Bits(Vec<u8>),
}

/// The view as a disk for the partition-table reader.
struct ViewDisk<'a>(&'a dyn BlockDevice);

impl ReadAt for ViewDisk<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let bytes = read_span(self.0, offset, buf.len() as u64)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.0.size()
    }
}

impl FreeSpace {
    /// Looks for what this module reads in `device`: filesystems on the
    /// whole device, in its MBR/GPT partitions or in linear LVM logical
    /// volumes, LVM physical volumes' unallocated extents, swap areas. An
    /// I/O error reading the partition table or a superblock leaves that
    /// part read whole.
    pub fn probe(device: Arc<dyn BlockDevice>) -> Probe {
        let mut not_used = Vec::new();
        let layout = match list_volumes(&ViewDisk(device.as_ref())) {
            Ok(layout) => layout,
            Err(e) => return Probe { free: None, not_used: vec![format!("the partition table of {} could not be read: {e}", device.describe())] },
        };
        let mut parts = Vec::new();
        let disk = ViewDisk(device.as_ref());
        let part = |start: u64, place: String, fs: Fs| Part { start, place, fs, cache: Mutex::new(Vec::new()) };
        // Logical volumes the layout reader could not place (more than one
        // segment, on another disk): read whole, with the reason.
        for s in layout.skipped.iter().filter(|s| s.what.starts_with("logical volume")) {
            not_used.push(format!("{}: {}; its free space is read", s.what, s.reason));
        }
        // An NTFS boot sector at the start also looks like an MBR: it is the whole disk.
        let volumes = match NtfsVolume::open(&disk, 0, device.size()) {
            Err(NtfsError::NotNtfs) => layout.volumes,
            whole => {
                match whole {
                    Ok(v) => parts.push(part(0, "the whole disk".into(), Fs::Ntfs(v))),
                    Err(e) => not_used.push(format!("the whole disk: NTFS filesystem on {}: {e}; its free clusters are read", device.describe())),
                }
                Vec::new()
            }
        };
        for v in &volumes {
            match v.filesystem.as_ref().map(|f| f.kind) {
                Some(FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4) => match Part::probe_ext4(device.as_ref(), v.start_bytes, v.size_bytes) {
                    Ok(layout) => parts.push(part(v.start_bytes, v.place_text(), Fs::Ext4(layout))),
                    Err(e) => not_used.push(format!("{}: {e}", v.place_text())),
                },
                None => match NtfsVolume::open(&disk, v.start_bytes, v.size_bytes) {
                    Ok(ntfs) => parts.push(part(v.start_bytes, v.place_text(), Fs::Ntfs(ntfs))),
                    Err(NtfsError::NotNtfs) => {}
                    Err(e) => not_used.push(format!("{}: NTFS filesystem on {}: {e}; its free clusters are read", v.place_text(), device.describe())),
                },
                Some(FsKind::Xfs) => match XfsLayout::open(&disk, v.start_bytes, v.size_bytes) {
                    Ok(layout) => parts.push(part(v.start_bytes, v.place_text(), Fs::Xfs(layout))),
                    Err(source) => not_used.push(format!("{}: {}", v.place_text(), FreeSpaceError::XfsUntrusted { device: device.describe().to_string(), source })),
                },
                Some(FsKind::LvmPv) => match lvm::read_pv(&disk, v.start_bytes, v.size_bytes).and_then(|pv| Ok((lvm::allocated_extents(&pv)?, pv.vg.extent_sectors * 512))) {
                    Ok(((entry, allocated), extent_bytes)) if allocated.contains(&false) => {
                        let start = v.start_bytes + entry.pe_start * 512;
                        let unit = if extent_bytes % 4096 == 0 && start % 4096 == 0 { 4096 } else { 512 };
                        let inside = allocated.len() as u64 * extent_bytes <= v.size_bytes.saturating_sub(entry.pe_start * 512);
                        if inside && extent_bytes % unit == 0 {
                            parts.push(part(start, format!("LVM physical volume on {}", v.place_text()), Fs::LvmPv(PvExtents { unit, extent_bytes, allocated })));
                        } else {
                            not_used.push(format!("{}: LVM physical volume whose extents do not fit it; its unallocated extents are read", v.place_text()));
                        }
                    }
                    Ok(_) => {}
                    Err(reason) => not_used.push(format!("{}: LVM physical volume: {reason}; its unallocated extents are read", v.place_text())),
                },
                Some(FsKind::Swap) => match swap_header(device.as_ref(), v.start_bytes, v.size_bytes) {
                    Ok(header) => parts.push(part(v.start_bytes + header, v.place_text(), Fs::Swap { pages: (v.size_bytes - header) / 4096 })),
                    Err(reason) => not_used.push(format!("{}: swap area: {reason}; it is read", v.place_text())),
                },
                Some(other) => not_used.push(format!("{}: drmesh does not read the free space of {} yet", v.place_text(), other.name())),
            }
        }
        let free = (!parts.is_empty()).then(|| FreeSpace { device, parts, unusable_groups: Default::default() });
        Probe { free, not_used }
    }

    /// For people: what was found and how much of it is free.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| match &p.fs {
                Fs::Ext4(l) => format!("ext4 on {} ({} of {} MiB free)", p.place, l.sb.free_blocks.saturating_mul(l.sb.block_bytes) >> 20, l.sb.fs_bytes() >> 20),
                Fs::Ntfs(v) => format!("NTFS on {} ({} MiB, {}-byte clusters)", p.place, v.clusters().saturating_mul(v.cluster_bytes()) >> 20, v.cluster_bytes()),
                Fs::Xfs(x) => {
                    let log = match x.log_state() {
                        LogState::Unmounted => "unmounted cleanly",
                        LogState::Covered => "frozen",
                    };
                    format!("XFS on {} ({} of {} MiB free, {log})", p.place, x.free_blocks().saturating_mul(x.block_bytes()) >> 20, x.blocks().saturating_mul(x.block_bytes()) >> 20)
                }
                Fs::Swap { pages } => format!("swap on {} ({} MiB)", p.place, pages.saturating_mul(4096) >> 20),
                Fs::LvmPv(e) => {
                    let free = e.allocated.iter().filter(|a| !**a).count() as u64;
                    format!("unallocated extents of the {} ({} of {} MiB)", p.place, free.saturating_mul(e.extent_bytes) >> 20, (e.allocated.len() as u64).saturating_mul(e.extent_bytes) >> 20)
                }
            })
            .collect();
        parts.join(", ")
    }

    /// Groups read whole so far because their bitmap could not be read or
    /// failed its checksum.
    pub fn unusable_groups(&self) -> u64 {
        self.unusable_groups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The free byte ranges inside `[start, start + len)` of the view, in
    /// order, relative to `start`: whole filesystem blocks the bitmaps say
    /// are free. Anything this module cannot vouch for is not in them.
    pub fn free_in(&self, start: u64, len: usize) -> Vec<Range<usize>> {
        let end = start + len as u64;
        let mut out: Vec<Range<usize>> = Vec::new();
        for part in &self.parts {
            let g = part.fs.geometry();
            let bs = g.unit;
            let (from, to) = (start.max(part.start), end.min(part.start + g.units * g.unit));
            if from >= to {
                continue;
            }
            let mut block = (from - part.start).div_ceil(bs);
            while part.start + (block + 1) * bs <= to {
                if part.is_free(block, &g, self) {
                    let at = (part.start + block * bs - start) as usize;
                    match out.last_mut() {
                        Some(last) if last.end == at => last.end = at + bs as usize,
                        _ => out.push(at..at + bs as usize),
                    }
                }
                block += 1;
            }
        }
        // Parts are in disk order but may interleave (a physical volume's
        // unallocated extents around its logical volumes): sort and merge.
        out.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }
}

impl Part {
    /// Reads and checks the superblock and group descriptors of the ext4
    /// filesystem at `start` (at most `size` bytes).
    fn probe_ext4(device: &dyn BlockDevice, start: u64, size: u64) -> Result<Ext4Layout, FreeSpaceError> {
        let shown = device.describe().to_string();
        let untrusted = |reason: String| FreeSpaceError::Ext4Untrusted { device: shown.clone(), reason };
        let head = read_exact(device, start + 1024, 1024)?;
        let sb = match Ext4Superblock::parse(&head) {
            Ok(Some(sb)) => sb,
            Ok(None) => return Err(untrusted("its superblock is not ext2/3/4's".into())),
            Err(reason) => return Err(untrusted(reason)),
        };
        if sb.fs_bytes() > size {
            return Err(untrusted(format!("the filesystem says {} bytes, its place holds {size}", sb.fs_bytes())));
        }
        let table_at = start + (u64::from(sb.first_data_block) + 1) * sb.block_bytes;
        let table = read_exact(device, table_at, sb.groups() * u64::from(sb.desc_bytes))?;
        Ext4Layout::new(sb, &table).map_err(untrusted)
    }

    /// Whether unit `block` of this filesystem is free.
    fn is_free(&self, block: u64, g: &Geometry, owner: &FreeSpace) -> bool {
        if block < g.first || block >= g.units {
            return false;
        }
        let rel = block - g.first;
        let (group, bit) = (rel / g.per_group, rel % g.per_group);
        match &*self.group(group, owner) {
            GroupBits::AllUsed => false,
            GroupBits::Bits(bits) => bits.get((bit / 8) as usize).is_some_and(|b| b & (1 << (bit % 8)) == 0),
        }
    }

    fn group(&self, group: u64, owner: &FreeSpace) -> Arc<GroupBits> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cache.iter().position(|(g, _)| *g == group) {
            let hit = cache.remove(i);
            let bits = hit.1.clone();
            cache.push(hit);
            return bits;
        }
        let bits = Arc::new(self.load(group, owner));
        if cache.len() >= CACHED_GROUPS {
            cache.remove(0);
        }
        cache.push((group, bits.clone()));
        bits
    }

    fn load(&self, group: u64, owner: &FreeSpace) -> GroupBits {
        let loaded = match &self.fs {
            Fs::Ext4(layout) => {
                let Some(desc) = layout.groups.get(group as usize) else { return GroupBits::AllUsed };
                if desc.block_uninit {
                    return layout.uninit_bits(group).map_or(GroupBits::AllUsed, GroupBits::Bits);
                }
                let sb = &layout.sb;
                read_exact(owner.device.as_ref(), self.start + desc.bitmap_block * sb.block_bytes, sb.block_bytes).map_err(|e| e.to_string()).and_then(|block| {
                    let bits = block[..sb.bitmap_bytes()].to_vec();
                    match desc.bitmap_csum {
                        Some((want, wide)) if !sb.bitmap_csum_ok(&bits, want, wide) => Err(format!("the block bitmap of group {group} of the ext4 filesystem on {} fails its checksum", self.place)),
                        _ => Ok(bits),
                    }
                })
            }
            Fs::Ntfs(v) => v.bitmap(&ViewDisk(owner.device.as_ref()), group * NTFS_GROUP_BYTES, NTFS_GROUP_BYTES as usize).map_err(|e| format!("$Bitmap of the NTFS filesystem on {}: {e}", self.place)),
            Fs::Xfs(x) => match x.used_bits(&ViewDisk(owner.device.as_ref()), group * XFS_GROUP_BLOCKS, XFS_GROUP_BLOCKS) {
                // The groups whose tree failed are marked used; the others' free blocks stay.
                (bits, Some(e)) => {
                    owner.unusable_groups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(device = owner.device.describe(), reason = %format!("the XFS filesystem on {}: {e}", self.place), "this group's blocks are read whole");
                    Ok(bits)
                }
                (bits, None) => Ok(bits),
            },
            Fs::LvmPv(e) => Ok(e.bits(group)),
            Fs::Swap { .. } => Ok(vec![0u8; (SWAP_GROUP_PAGES / 8) as usize]),
        };
        match loaded {
            Ok(bits) => GroupBits::Bits(bits),
            Err(reason) => {
                owner.unusable_groups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(device = owner.device.describe(), %reason, "this group's blocks are read whole");
                GroupBits::AllUsed
            }
        }
    }
}

/// The bytes of the header of the swap area at `start` (its first page,
/// where the signature, the UUID and the bad-page list are), when the area
/// is a Linux swap area of version 1 with its signature intact.
fn swap_header(device: &dyn BlockDevice, start: u64, size: u64) -> Result<u64, String> {
    let head = read_exact(device, start, (64 << 10).min(size)).map_err(|e| e.to_string())?;
    let page = [4096usize, 8192, 16384, 65536].into_iter().find(|&p| head.get(p - 10..p) == Some(b"SWAPSPACE2".as_slice())).ok_or("no SWAPSPACE2 signature")?;
    if u32_at(&head, 1024) != 1 {
        return Err(format!("its header has version {}, not 1", u32_at(&head, 1024)));
    }
    Ok(page as u64)
}

/// What a cycle does with free space: the map to skip by, if any, and why.
pub struct FreeSpacePlan {
    /// The free space the reader skips; `None`: every block is read.
    pub free: Option<Arc<FreeSpace>>,
    /// For people, in the cycle report: "skipped: ext4 on ...", "read: why".
    pub how: String,
}

/// Decides, for one cycle, whether its reader skips free space: the volume's
/// setting says it may, the view is a point in time (a live read's bitmaps
/// could change under the reader), and a filesystem on it is trusted.
/// Blocking (reads the partition table and filesystem metadata).
pub fn plan(setting: drmesh_topology::FreeSpace, consistency: Consistency, device: &Arc<dyn BlockDevice>) -> FreeSpacePlan {
    let read = |how: String| FreeSpacePlan { free: None, how: format!("read: {how}") };
    if setting == drmesh_topology::FreeSpace::Read {
        return read("the volume has free_space = \"read\"".into());
    }
    if consistency == Consistency::Inconsistent {
        return read("a live read has no point in time at which the filesystem's bitmaps hold".into());
    }
    let probe = FreeSpace::probe(device.clone());
    match probe.free {
        Some(free) => {
            let mut how = format!("skipped: {}", free.describe());
            if !probe.not_used.is_empty() {
                how.push_str(&format!("; read: {}", probe.not_used.join("; ")));
            }
            FreeSpacePlan { free: Some(Arc::new(free)), how }
        }
        None if probe.not_used.is_empty() => read("nothing found whose free space drmesh reads (ext2, ext3, ext4, XFS, NTFS, swap, LVM)".into()),
        None => read(probe.not_used.join("; ")),
    }
}

/// Reads `len` bytes at `offset` through an aligned window (a device read
/// with O_DIRECT takes only aligned buffers, offsets and lengths).
fn read_exact(device: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<u8>, FreeSpaceError> {
    read_span(device, offset, len).map_err(|source| FreeSpaceError::Io { device: device.describe().to_string(), offset, source })
}

fn read_span(device: &dyn BlockDevice, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    if len > 64 << 20 {
        return Err(std::io::Error::other("more than 64 MiB of filesystem metadata at once"));
    }
    let align = DIRECT_ALIGN as u64;
    let end = offset.checked_add(len).ok_or_else(|| std::io::Error::other("offset out of range"))?;
    let (from, to) = (offset / align * align, end.div_ceil(align) * align);
    let span = (to - from) as usize;
    let mut raw = vec![0u8; span + DIRECT_ALIGN];
    let shift = (DIRECT_ALIGN - raw.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    let window = &mut raw[shift..shift + span];
    let mut done = 0;
    while done < span {
        match device.read_at(&mut window[done..], from + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => return Err(e),
        }
    }
    let (skip, want) = ((offset - from) as usize, len as usize);
    if done < skip + want {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end of the volume"));
    }
    Ok(window[skip..skip + want].to_vec())
}

// ---- ext4 on-disk format (superblock at byte 1024, little-endian) ----

const EXT4_MAGIC: u16 = 0xEF53;
const STATE_ERRORS: u16 = 0x0002;
const INCOMPAT_RECOVER: u32 = 0x0004;
const INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
const INCOMPAT_META_BG: u32 = 0x0010;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_BIGALLOC: u32 = 0x0200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;
const BG_BLOCK_UNINIT: u16 = 0x0002;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
/// Descriptor size from which the bitmap checksum has its high 16 bits.
const DESC_CSUM_HI_END: u16 = 0x3A;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// ext4's crc32c: the Castagnoli polynomial without the final inversion,
/// continued from `seed` as the kernel's `ext4_chksum` does.
fn ext4_crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// What the reader needs of an ext4 superblock, checked.
#[derive(Debug, Clone)]
struct Ext4Superblock {
    block_bytes: u64,
    first_data_block: u32,
    blocks_per_group: u32,
    blocks: u64,
    free_blocks: u64,
    desc_bytes: u16,
    /// Seed of metadata checksums; `None` without `metadata_csum`.
    csum_seed: Option<u32>,
    /// Superblock backups only in groups 0, 1 and powers of 3, 5 and 7.
    sparse_super: bool,
    /// Backups in the two groups the superblock names (`sparse_super2`).
    sparse_super2: bool,
    /// Blocks reserved after the group descriptors for growing the filesystem.
    reserved_gdt: u64,
    /// Blocks of one group's inode table.
    inode_table_blocks: u64,
}

impl Ext4Superblock {
    /// Parses the 1024 bytes at byte 1024. `Ok(None)`: not ext2/3/4;
    /// `Err`: ext4 whose bitmaps may not be trusted, and why.
    fn parse(b: &[u8]) -> Result<Option<Ext4Superblock>, String> {
        if b.len() < 1024 || u16_at(b, 0x38) != EXT4_MAGIC {
            return Ok(None);
        }
        let (incompat, ro_compat) = (u32_at(b, 0x60), u32_at(b, 0x64));
        let csum_seed = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let stored = u32_at(b, 0x3FC);
            if ext4_crc(!0, &b[..0x3FC]) != stored {
                return Err("the superblock fails its checksum".into());
            }
            Some(if incompat & INCOMPAT_CSUM_SEED != 0 { u32_at(b, 0x270) } else { ext4_crc(!0, &b[0x68..0x78]) })
        } else {
            None
        };
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err("its journal has not been replayed (mounted, or not unmounted cleanly, and not frozen)".into());
        }
        if u16_at(b, 0x3A) & STATE_ERRORS != 0 {
            return Err("it has errors recorded (run e2fsck)".into());
        }
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err("it is an external journal device".into());
        }
        if incompat & INCOMPAT_META_BG != 0 {
            return Err("its group descriptors are in meta block groups (meta_bg), which this reader does not follow".into());
        }
        if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            return Err("it allocates in clusters (bigalloc), which this reader does not follow".into());
        }
        let log = u32_at(b, 0x18);
        if log > 6 {
            return Err(format!("its block size 1024 << {log} is out of range"));
        }
        let block_bytes = 1024u64 << log;
        let first_data_block = u32_at(b, 0x14);
        let blocks_per_group = u32_at(b, 0x20);
        if blocks_per_group == 0 || u64::from(blocks_per_group) > block_bytes * 8 || !blocks_per_group.is_multiple_of(8) {
            return Err(format!("{blocks_per_group} blocks per group does not fit its {block_bytes}-byte bitmaps"));
        }
        if first_data_block != u32::from(block_bytes == 1024) {
            return Err(format!("its first data block {first_data_block} does not match its block size"));
        }
        let wide = incompat & INCOMPAT_64BIT != 0;
        let blocks = u64::from(u32_at(b, 0x04)) | if wide { u64::from(u32_at(b, 0x150)) << 32 } else { 0 };
        let free_blocks = u64::from(u32_at(b, 0x0C)) | if wide { u64::from(u32_at(b, 0x158)) << 32 } else { 0 };
        let desc_bytes = if wide { u16_at(b, 0xFE) } else { 32 };
        if !(32..=1024).contains(&desc_bytes) || !desc_bytes.is_power_of_two() {
            return Err(format!("its group descriptor size {desc_bytes} is out of range"));
        }
        if blocks <= u64::from(first_data_block) || blocks.checked_mul(block_bytes).is_none() {
            return Err(format!("its block count {blocks} is out of range"));
        }
        let inode_bytes = if u32_at(b, 0x4C) == 0 { 128 } else { u64::from(u16_at(b, 0x58)) };
        let inode_table_blocks = (u64::from(u32_at(b, 0x28)) * inode_bytes).div_ceil(block_bytes);
        let sparse_super = ro_compat & RO_COMPAT_SPARSE_SUPER != 0;
        let sparse_super2 = u32_at(b, 0x5C) & COMPAT_SPARSE_SUPER2 != 0;
        let reserved_gdt = u64::from(u16_at(b, 0xCE));
        Ok(Some(Ext4Superblock {
            block_bytes,
            first_data_block,
            blocks_per_group,
            blocks,
            free_blocks,
            desc_bytes,
            csum_seed,
            sparse_super,
            sparse_super2,
            reserved_gdt,
            inode_table_blocks,
        }))
    }

    fn fs_bytes(&self) -> u64 {
        self.blocks * self.block_bytes
    }

    fn groups(&self) -> u64 {
        (self.blocks - u64::from(self.first_data_block)).div_ceil(u64::from(self.blocks_per_group))
    }

    /// Bytes of a group's bitmap the checksum covers (and the reader uses).
    fn bitmap_bytes(&self) -> usize {
        self.blocks_per_group as usize / 8
    }

    fn bitmap_csum_ok(&self, bits: &[u8], want: u32, wide: bool) -> bool {
        let Some(seed) = self.csum_seed else { return true };
        let got = ext4_crc(seed, bits);
        if wide {
            got == want
        } else {
            got & 0xFFFF == want
        }
    }
}

/// One group's descriptor, as far as the reader needs it.
#[derive(Debug, Clone)]
struct GroupDesc {
    bitmap_block: u64,
    inode_bitmap: u64,
    inode_table: u64,
    block_uninit: bool,
    /// The stored bitmap checksum and whether it has all 32 bits.
    bitmap_csum: Option<(u32, bool)>,
}

/// A checked ext4 layout: superblock and every group's descriptor.
struct Ext4Layout {
    sb: Ext4Superblock,
    groups: Vec<GroupDesc>,
    /// Every group's bitmaps and inode table, as (first block, blocks),
    /// sorted: what an uninitialized group holds of others' metadata.
    metadata: Vec<(u64, u64)>,
}

impl Ext4Layout {
    fn new(sb: Ext4Superblock, table: &[u8]) -> Result<Ext4Layout, String> {
        let size = usize::from(sb.desc_bytes);
        let wide = sb.desc_bytes >= 64;
        let mut groups = Vec::with_capacity(table.len() / size);
        for (g, d) in table.chunks_exact(size).enumerate() {
            let bitmap_block = u64::from(u32_at(d, 0x00)) | if wide { u64::from(u32_at(d, 0x20)) << 32 } else { 0 };
            let inode_bitmap = u64::from(u32_at(d, 0x04)) | if wide { u64::from(u32_at(d, 0x24)) << 32 } else { 0 };
            let inode_table = u64::from(u32_at(d, 0x08)) | if wide { u64::from(u32_at(d, 0x28)) << 32 } else { 0 };
            let block_uninit = u16_at(d, 0x12) & BG_BLOCK_UNINIT != 0;
            if !block_uninit && (bitmap_block < u64::from(sb.first_data_block) || bitmap_block >= sb.blocks) {
                return Err(format!("group {g}'s block bitmap is at block {bitmap_block}, outside the filesystem"));
            }
            let bitmap_csum = sb.csum_seed.map(|_| {
                let full = sb.desc_bytes >= DESC_CSUM_HI_END;
                let lo = u32::from(u16_at(d, 0x18));
                (if full { lo | u32::from(u16_at(d, 0x38)) << 16 } else { lo }, full)
            });
            groups.push(GroupDesc { bitmap_block, inode_bitmap, inode_table, block_uninit, bitmap_csum });
        }
        if (groups.len() as u64) < sb.groups() {
            return Err("its group descriptor table is cut short".into());
        }
        let mut metadata: Vec<(u64, u64)> = groups.iter().flat_map(|g| [(g.bitmap_block, 1), (g.inode_bitmap, 1), (g.inode_table, sb.inode_table_blocks)]).collect();
        metadata.sort_unstable();
        Ok(Ext4Layout { sb, groups, metadata })
    }

    /// Whether group `g` holds a backup of the superblock and descriptors.
    fn has_super(&self, g: u64) -> bool {
        let power_of = |mut n: u64, base: u64| {
            while n > 1 && n.is_multiple_of(base) {
                n /= base;
            }
            n == 1
        };
        g <= 1 || !self.sb.sparse_super || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
    }

    /// The bitmap an uninitialized group (`BLOCK_UNINIT`) stands for, as
    /// the kernel makes it when it first allocates there: its superblock and
    /// descriptor backup, and any group's bitmaps and inode table placed in
    /// it, in use; everything else free. `None` when the layout keeps
    /// backups where this reader does not look (`sparse_super2`).
    fn uninit_bits(&self, g: u64) -> Option<Vec<u8>> {
        let sb = &self.sb;
        if sb.sparse_super2 {
            return None;
        }
        let first = u64::from(sb.first_data_block) + g * u64::from(sb.blocks_per_group);
        let end = first + u64::from(sb.blocks_per_group);
        let mut bits = vec![0u8; sb.bitmap_bytes()];
        let mut mark = |from: u64, len: u64| {
            for b in from.max(first)..from.saturating_add(len).min(end) {
                let i = b - first;
                bits[(i / 8) as usize] |= 1 << (i % 8);
            }
        };
        if self.has_super(g) {
            let gdt = (sb.groups() * u64::from(sb.desc_bytes)).div_ceil(sb.block_bytes);
            mark(first, 1 + gdt + sb.reserved_gdt);
        }
        let from = self.metadata.partition_point(|&(start, len)| start.saturating_add(len) <= first);
        for &(start, len) in self.metadata[from..].iter().take_while(|&&(start, _)| start < end) {
            mark(start, len);
        }
        Some(bits)
    }
}

/// For fuzzing: probes `image` as a volume and asks for the free ranges of
/// every `step` bytes; never panics, whatever the bytes.
pub fn probe_bytes(image: Vec<u8>, step: usize) -> usize {
    struct Mem(Vec<u8>);
    impl BlockDevice for Mem {
        fn describe(&self) -> &str {
            "memory"
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn aligned(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let at = usize::try_from(offset).unwrap_or(usize::MAX).min(self.0.len());
            let n = buf.len().min(self.0.len() - at);
            buf[..n].copy_from_slice(&self.0[at..at + n]);
            Ok(n)
        }
    }
    let len = image.len() as u64;
    let Some(free) = FreeSpace::probe(Arc::new(Mem(image))).free else { return 0 };
    let step = step.clamp(1024, 1 << 20);
    let mut ranges = 0;
    let mut at = 0;
    while at < len {
        ranges += free.free_in(at, step.min((len - at) as usize)).len();
        at += step as u64;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::source::device::LocalDevice;
    use crate::source::file::FileSource;
    use crate::test_util::run;

    /// An image of `mib` MiB full of a nonzero pattern (what deleted files leave).
    fn garbage_image(path: &Path, mib: u64) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..mib << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state as u8) | 1
            })
            .collect();
        std::fs::write(path, data).unwrap();
    }

    /// A 64 MiB image of old data with a GPT whose partition 1 (type `kind`)
    /// spans bytes 1 MiB to 33 MiB.
    fn gpt_disk(path: &Path, kind: &str) {
        garbage_image(path, 64);
        let mut sfdisk = Command::new("sfdisk");
        sfdisk.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(path).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
        let mut child = sfdisk.spawn().expect("sfdisk (scripts/install-deps installs it)");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), format!("label: gpt\nstart=2048, size=65536, type={kind}\n").as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "sfdisk failed");
    }

    /// A folder of files for `mkfs.ext4 -d`: 3 MiB in a few files.
    fn some_files(dir: &Path) {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hostname"), b"web1\n").unwrap();
        std::fs::write(dir.join("big.bin"), vec![0x5a; 2 << 20]).unwrap();
        std::fs::write(dir.join("etc/config"), vec![0xa5; 1 << 20]).unwrap();
    }

    /// Free blocks as `dumpe2fs` lists them ("Free blocks: a-b, c").
    fn dumpe2fs_free(image: &Path, offset: Option<u64>) -> BTreeSet<u64> {
        let mut cmd = Command::new("dumpe2fs");
        match offset {
            Some(o) => cmd.arg(format!("{}?offset={o}", image.display())),
            None => cmd.arg(image),
        };
        let text = run(&mut cmd);
        let mut free = BTreeSet::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("  Free blocks: ")) {
            for r in line.split(", ").filter(|r| !r.is_empty()) {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                free.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap());
            }
        }
        free
    }

    fn device(path: &Path) -> Arc<dyn BlockDevice> {
        Arc::new(LocalDevice::open(path).unwrap())
    }

    /// Every filesystem block the reader calls free, against dumpe2fs.
    fn check_against_dumpe2fs(image: &Path, offset: u64, block: u64, fs_bytes: u64) -> u64 {
        let probe = FreeSpace::probe(device(image));
        let free = probe.free.unwrap_or_else(|| panic!("no free space found: {:?}", probe.not_used));
        let want = dumpe2fs_free(image, (offset > 0).then_some(offset));
        assert!(want.len() > 100, "the filesystem should be mostly free");
        let mut ours = BTreeSet::new();
        for b in 0..fs_bytes / block {
            let ranges = free.free_in(offset + b * block, block as usize);
            if !ranges.is_empty() {
                assert_eq!(ranges, vec![0..block as usize]);
                ours.insert(b);
            }
        }
        // Never a used block called free (data loss), and every free block found.
        let extra: Vec<_> = ours.difference(&want).take(10).collect();
        assert!(extra.is_empty(), "blocks dumpe2fs says are used are called free: {extra:?}");
        let missing: Vec<_> = want.difference(&ours).take(10).collect();
        assert!(missing.is_empty(), "free blocks dumpe2fs lists are read: {missing:?}");
        let Some(Fs::Ext4(layout)) = free.parts.iter().map(|p| &p.fs).find(|fs| matches!(fs, Fs::Ext4(_))) else { panic!("no ext4") };
        let uninit = layout.groups.iter().filter(|g| g.block_uninit).count();
        eprintln!("{uninit} of {} groups uninitialized", layout.groups.len());
        assert_eq!(free.unusable_groups(), 0);
        ours.len() as u64
    }

    #[test]
    fn free_blocks_match_dumpe2fs_for_ext4_ext2_and_small_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        some_files(&files);
        for (name, mkfs, block) in [
            ("default", vec!["mkfs.ext4", "-b", "4096"], 4096),
            ("1k-blocks", vec!["mkfs.ext4", "-b", "1024"], 1024),
            // Every group's bitmaps and table in the group itself (uninitialized groups hold them).
            ("1k-no-flex_bg", vec!["mkfs.ext4", "-b", "1024", "-O", "^flex_bg"], 1024),
            // A superblock backup in every group.
            ("1k-no-sparse_super", vec!["mkfs.ext4", "-b", "1024", "-O", "^sparse_super,^resize_inode"], 1024),
            ("no-csum-32bit", vec!["mkfs.ext4", "-b", "4096", "-O", "^metadata_csum,^64bit"], 4096),
            ("ext2", vec!["mkfs.ext2", "-b", "4096"], 4096),
        ] {
            let image = dir.path().join(format!("{name}.img"));
            garbage_image(&image, 48);
            run(Command::new(mkfs[0]).args(&mkfs[1..]).args(["-q", "-F", "-E", "nodiscard", "-d"]).arg(&files).arg(&image));
            let free = check_against_dumpe2fs(&image, 0, block, 48 << 20);
            eprintln!("{name}: {free} free blocks of {block} bytes, as dumpe2fs says");
        }
    }

    #[test]
    fn a_partitioned_disk_skips_the_free_space_of_its_ext4_partition() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        gpt_disk(&image, "L");
        let files = dir.path().join("files");
        some_files(&files);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard,offset=1048576", "-d"]).arg(&files).arg(&image).arg("32M"));
        check_against_dumpe2fs(&image, 1 << 20, 4096, 32 << 20);
        let free = FreeSpace::probe(device(&image)).free.unwrap();
        assert!(free.describe().starts_with("ext4 on partition 1 (GPT"), "{}", free.describe());
        // Nothing outside the partition is free: the partition table, the disk's tail.
        assert!(free.free_in(0, 1 << 20).is_empty());
        assert!(free.free_in(33 << 20, 31 << 20).is_empty());
    }

    #[test]
    fn a_scan_reads_free_blocks_as_zeros_and_used_blocks_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        garbage_image(&image, 32);
        let files = dir.path().join("files");
        some_files(&files);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"]).arg(&files).arg(&image));
        let raw = std::fs::read(&image).unwrap();
        let free_blocks = dumpe2fs_free(&image, None);
        let probe = FreeSpace::probe(device(&image));
        let source = FileSource::on(device(&image), 1 << 20).with_free_space(Arc::new(probe.free.unwrap()));
        let blocks = source.read_run(0, source.block_count() as usize).unwrap();
        let read: Vec<u8> = blocks.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(read.len(), raw.len());
        for (i, (got, was)) in read.chunks(4096).zip(raw.chunks(4096)).enumerate() {
            if free_blocks.contains(&(i as u64)) {
                assert!(got.iter().all(|&b| b == 0), "free block {i} not zero");
            } else {
                assert_eq!(got, was, "used block {i} changed");
            }
        }
        assert_eq!(source.free_skipped(), free_blocks.len() as u64 * 4096);
        assert!(blocks.iter().filter(|b| b.is_zeros()).count() > 20, "wholly free volume blocks are not read");
        // The filesystem in what was read is whole: e2fsck finds nothing to fix.
        let copy = dir.path().join("read.img");
        std::fs::write(&copy, &read).unwrap();
        run(Command::new("e2fsck").arg("-fn").arg(&copy));
        let dumped = Command::new("debugfs").args(["-R", "cat /etc/config"]).arg(&copy).output().unwrap();
        assert!(dumped.stdout == vec![0xa5u8; 1 << 20], "the file read back differs");
    }

    #[test]
    fn untrusted_filesystems_are_read_whole_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        some_files(&files);
        let fresh = |name: &str| {
            let image = dir.path().join(name);
            garbage_image(&image, 16);
            run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"]).arg(&files).arg(&image));
            image
        };
        // A journal to replay: a crash-consistent snapshot of a mounted filesystem.
        let image = fresh("recover.img");
        run(Command::new("debugfs").args(["-w", "-R", "feature needs_recovery"]).arg(&image));
        let probe = FreeSpace::probe(device(&image));
        assert!(probe.free.is_none());
        assert!(probe.not_used.iter().any(|r| r.contains("journal has not been replayed")), "{:?}", probe.not_used);
        // Errors recorded.
        let image = fresh("errors.img");
        run(Command::new("debugfs").args(["-w", "-R", "ssv state 3"]).arg(&image));
        assert!(FreeSpace::probe(device(&image)).not_used.iter().any(|r| r.contains("errors recorded")));
        // A superblock changed behind its checksum.
        let image = fresh("sb.img");
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[1024 + 0x0C] ^= 0x40;
        std::fs::write(&image, &bytes).unwrap();
        assert!(FreeSpace::probe(device(&image)).not_used.iter().any(|r| r.contains("fails its checksum")));
        // A block bitmap changed behind its checksum: that group is read whole, the others are not.
        let image = fresh("bitmap.img");
        let free = FreeSpace::probe(device(&image)).free.unwrap();
        let Fs::Ext4(layout) = &free.parts[0].fs else { panic!("not ext4") };
        let bitmap = layout.groups[0].bitmap_block * 4096;
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[bitmap as usize + 1000] ^= 0xff;
        std::fs::write(&image, &bytes).unwrap();
        let free = FreeSpace::probe(device(&image)).free.unwrap();
        assert!(free.free_in(0, 16 << 20).is_empty(), "group 0 holds the whole 16 MiB filesystem and is read whole");
        assert_eq!(free.unusable_groups(), 1);
        // Not a filesystem at all.
        let image = dir.path().join("raw.img");
        garbage_image(&image, 4);
        let probe = FreeSpace::probe(device(&image));
        assert!(probe.free.is_none() && probe.not_used.is_empty(), "{:?}", probe.not_used);
    }

    #[test]
    fn any_bytes_are_probed_without_panic() {
        // A real small ext4 without checksums (so corruptions reach past the
        // superblock), its metadata overwritten at seeded random places.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("small.img");
        std::fs::write(&image, vec![0u8; 2 << 20]).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "1024", "-O", "^metadata_csum,^64bit"]).arg(&image));
        let pristine = std::fs::read(&image).unwrap();
        assert!(probe_bytes(pristine.clone(), 4096) > 0, "the pristine image has free ranges");
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut bytes = pristine.clone();
            for _ in 0..1 + next() % 8 {
                let at = 1024 + (next() % 8192) as usize;
                bytes[at] = next() as u8;
            }
            let _ = probe_bytes(bytes, 4096);
        }
    }

    #[test]
    fn ntfs_free_clusters_are_read_as_zeros_on_the_whole_disk_and_in_a_partition() {
        let dir = tempfile::tempdir().unwrap();
        let ntfs = dir.path().join("ntfs.img");
        garbage_image(&ntfs, 32);
        run(Command::new("mkntfs").args(["-F", "-Q", "-q", "-c", "4096"]).arg(&ntfs));
        let file = dir.path().join("report.bin");
        std::fs::write(&file, (0..3u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
        run(Command::new("ntfscp").arg(&ntfs).arg(&file).arg("/report.bin"));
        let volume = std::fs::read(&ntfs).unwrap();

        // The whole disk.
        let free = FreeSpace::probe(device(&ntfs)).free.expect("NTFS found");
        assert!(free.describe().starts_with("NTFS on the whole disk (31 MiB, 4096-byte clusters)"), "{}", free.describe());

        // Partition 1 of a GPT disk.
        let disk = dir.path().join("disk.img");
        gpt_disk(&disk, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[1 << 20..(1 << 20) + volume.len()].copy_from_slice(&volume);
        std::fs::write(&disk, &bytes).unwrap();
        let probe = FreeSpace::probe(device(&disk));
        let free = Arc::new(probe.free.unwrap_or_else(|| panic!("no NTFS found: {:?}", probe.not_used)));
        assert!(free.describe().starts_with("NTFS on partition 1 (GPT"), "{}", free.describe());
        let source = FileSource::on(device(&disk), 1 << 20).with_free_space(free.clone());
        let read: Vec<u8> = source.read_run(0, source.block_count() as usize).unwrap().iter().flat_map(|b| b.to_vec()).collect();
        assert!(source.free_skipped() > 20 << 20, "most of the volume is free: {}", source.free_skipped());
        assert_eq!(&read[..1 << 20], &bytes[..1 << 20], "the partition table is read as it is");
        assert_eq!(&read[33 << 20..], &bytes[33 << 20..], "past the partition nothing is skipped");
        // The volume as read: ntfs-3g reads the file back whole, and free clusters are zero.
        let back = dir.path().join("back.img");
        std::fs::write(&back, &read[1 << 20..(1 << 20) + volume.len()]).unwrap();
        let out = Command::new("ntfscat").arg(&back).arg("/report.bin").output().unwrap();
        assert!(out.status.success() && out.stdout == std::fs::read(&file).unwrap(), "the file read back differs");
        let zeroed = read[1 << 20..(1 << 20) + volume.len()].chunks(4096).filter(|c| c.iter().all(|&b| b == 0)).count() as u64;
        assert!(zeroed * 4096 >= source.free_skipped(), "every free cluster reads as zeros");
        run(Command::new("ntfsinfo").arg("-m").arg(&back));
    }

    /// An XFS image of `mib` MiB (at least 320, the smallest mkfs.xfs
    /// makes; old data in its first 48 MiB), formatted with `args`.
    fn xfs_image(path: &Path, mib: u64, args: &[&str]) {
        garbage_image(path, 48);
        std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(mib << 20).unwrap();
        run(Command::new("mkfs.xfs").args(["-q", "-f", "-K"]).args(args).arg(path));
    }

    /// `image` mounted on a loop device for `f`, unmounted after it (also when `f` panics).
    fn with_mounted(image: &Path, f: impl FnOnce(&Path)) {
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(image).arg(dir.path()));
        let guard = Unmount(dir.path().to_path_buf());
        f(dir.path());
        drop(guard);
    }

    /// Files written, some deleted: free space between used blocks.
    fn busy_files(root: &Path) {
        some_files(root);
        for i in 0..200u32 {
            std::fs::write(root.join(format!("f{i}")), vec![i as u8 | 1; 4096 * (1 + i as usize % 13)]).unwrap();
        }
        for i in (0..200u32).step_by(3) {
            std::fs::remove_file(root.join(format!("f{i}"))).unwrap();
        }
    }

    /// Blocks (counted from the start of the filesystem) the by-block
    /// free-space trees list, as `xfs_db` says: its free extents less the
    /// groups' free lists, which it counts as free and the trees do not.
    fn xfs_db_free(image: &Path) -> BTreeSet<u64> {
        let db = |cmds: &[&str]| {
            let mut cmd = Command::new("xfs_db");
            cmd.arg("-r");
            for c in cmds {
                cmd.args(["-c", c]);
            }
            run(cmd.arg(image))
        };
        let geometry = db(&["sb 0", "p agblocks agcount"]);
        let field = |name: &str| geometry.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(" = ")?.trim().parse::<u64>().ok()).unwrap();
        let (agblocks, agcount) = (field("agblocks"), field("agcount"));
        let mut free = BTreeSet::new();
        for line in db(&["freesp -d"]).lines() {
            let n: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if n.len() == 3 && line.split_whitespace().count() == 3 {
                free.extend((0..n[2]).map(|i| n[0] * agblocks + n[1] + i));
            }
        }
        for ag in 0..agcount {
            for token in db(&[&format!("agfl {ag}"), "p bno"]).split_whitespace() {
                if let Some(b) = token.split_once(':').and_then(|(_, b)| b.parse::<u64>().ok()) {
                    free.remove(&(ag * agblocks + b));
                }
            }
        }
        free
    }

    /// Every block the reader calls free, against `xfs_db`; the number of free blocks.
    fn check_against_xfs_db(image: &Path) -> u64 {
        let probe = FreeSpace::probe(device(image));
        let free = probe.free.unwrap_or_else(|| panic!("no free space found: {:?}", probe.not_used));
        let Fs::Xfs(layout) = &free.parts[0].fs else { panic!("not XFS") };
        let block = layout.block_bytes();
        let want = xfs_db_free(image);
        assert!(want.len() > 1000, "the filesystem should be mostly free");
        let mut ours = BTreeSet::new();
        for b in 0..layout.blocks() {
            let ranges = free.free_in(b * block, block as usize);
            if !ranges.is_empty() {
                assert_eq!(ranges, vec![0..block as usize]);
                ours.insert(b);
            }
        }
        let extra: Vec<_> = ours.difference(&want).take(10).collect();
        assert!(extra.is_empty(), "blocks xfs_db says are used are called free: {extra:?}");
        let missing: Vec<_> = want.difference(&ours).take(10).collect();
        assert!(missing.is_empty(), "free blocks xfs_db lists are read: {missing:?}");
        assert_eq!(free.unusable_groups(), 0);
        ours.len() as u64
    }

    #[test]
    fn xfs_free_blocks_match_xfs_db() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mib, args, mount) in [
            ("v5-4k", 320, vec!["-b", "size=4096"], true),
            ("v5-1k-reflink-rmap", 320, vec!["-b", "size=1024", "-m", "reflink=1,rmapbt=1"], true),
            ("many-groups", 1280, vec!["-d", "agcount=16"], true),
            // Version 4 (no checksums): kernels may not mount it; mkfs's own metadata.
            ("v4", 320, vec!["-m", "crc=0"], false),
        ] {
            let image = dir.path().join(format!("{name}.img"));
            xfs_image(&image, mib, &args);
            if mount {
                with_mounted(&image, busy_files);
            }
            let free = FreeSpace::probe(device(&image)).free.unwrap();
            assert!(free.describe().starts_with("XFS on the whole disk (") && free.describe().ends_with("unmounted cleanly)"), "{}", free.describe());
            let n = check_against_xfs_db(&image);
            eprintln!("{name}: {n} free blocks, as xfs_db says");
        }
    }

    #[test]
    fn a_frozen_xfs_is_trusted_and_what_is_read_of_it_mounts_with_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let (image, copy) = (dir.path().join("live.img"), dir.path().join("frozen.img"));
        xfs_image(&image, 320, &[]);
        with_mounted(&image, |root| {
            busy_files(root);
            std::fs::write(root.join("report.bin"), (0..3u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
            run(Command::new("xfs_freeze").arg("-f").arg(root));
            let copied = std::fs::copy(&image, &copy);
            run(Command::new("xfs_freeze").arg("-u").arg(root));
            copied.unwrap();
        });
        let free = Arc::new(FreeSpace::probe(device(&copy)).free.expect("a frozen XFS is trusted"));
        assert!(free.describe().ends_with("frozen)"), "{}", free.describe());
        let n = check_against_xfs_db(&copy);
        let source = FileSource::on(device(&copy), 1 << 20).with_free_space(free);
        let read: Vec<u8> = source.read_run(0, source.block_count() as usize).unwrap().iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(source.free_skipped(), n * 4096);
        let back = dir.path().join("read.img");
        std::fs::write(&back, &read).unwrap();
        // Mounting replays the log (the superblock only); every file is there.
        with_mounted(&back, |root| {
            assert_eq!(std::fs::read(root.join("report.bin")).unwrap(), (0..3u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            assert_eq!(std::fs::read(root.join("etc/config")).unwrap(), vec![0xa5; 1 << 20]);
            for i in (0..200u32).filter(|i| i % 3 != 0) {
                assert_eq!(std::fs::read(root.join(format!("f{i}"))).unwrap(), vec![i as u8 | 1; 4096 * (1 + i as usize % 13)]);
            }
        });
        run(Command::new("xfs_repair").arg("-n").arg(&back));
    }

    #[test]
    fn an_xfs_with_a_log_to_replay_or_damaged_metadata_is_read_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        // A filesystem shut down with its log written but not checkpointed:
        // what a crash snapshot of a busy filesystem holds.
        let image = dir.path().join("crash.img");
        xfs_image(&image, 320, &[]);
        with_mounted(&image, |root| {
            busy_files(root);
            run(Command::new("xfs_io").args(["-x", "-c", "shutdown -f"]).arg(root));
        });
        let probe = FreeSpace::probe(device(&image));
        eprintln!("{}", probe.not_used.join("\n"));
        assert!(probe.free.is_none(), "a log to replay is not trusted");
        assert!(probe.not_used.iter().any(|r| r.contains("log has changes to replay") && r.contains("its free blocks are read")), "{:?}", probe.not_used);

        let clean = dir.path().join("clean.img");
        xfs_image(&clean, 320, &["-d", "agcount=4"]);
        with_mounted(&clean, busy_files);
        let pristine = std::fs::read(&clean).unwrap();
        let agblocks = u32::from_be_bytes(pristine[84..88].try_into().unwrap()) as usize;
        // The AGF of group 1 changed behind its checksum.
        let mut bytes = pristine.clone();
        bytes[agblocks * 4096 + 512 + 52] ^= 1;
        std::fs::write(&image, &bytes).unwrap();
        let probe = FreeSpace::probe(device(&image));
        assert!(probe.not_used.iter().any(|r| r.contains("the AGF of group 1") && r.contains("fails its checksum")), "{:?}", probe.not_used);
        // The superblock.
        let mut bytes = pristine.clone();
        bytes[8] ^= 1;
        std::fs::write(&image, &bytes).unwrap();
        assert!(FreeSpace::probe(device(&image)).not_used.iter().any(|r| r.contains("the superblock") && r.contains("checksum")));
        // A free-space tree block: its group's blocks are read, the others' are not.
        let mut bytes = pristine.clone();
        let root = u32::from_be_bytes(bytes[agblocks * 4096 + 512 + 16..][..4].try_into().unwrap()) as usize;
        bytes[(agblocks + root) * 4096 + 100] ^= 0xff;
        std::fs::write(&image, &bytes).unwrap();
        let free = FreeSpace::probe(device(&image)).free.expect("the other groups are trusted");
        let group = (agblocks * 4096) as u64;
        assert!(free.free_in(group, group as usize).is_empty(), "group 1 is read whole");
        assert!(!free.free_in(2 * group, group as usize).is_empty(), "group 2 is skipped");
        assert!(free.unusable_groups() > 0);
        // A log with no unmount record after its last changes.
        let mut bytes = pristine.clone();
        let logstart = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
        let agblklog = bytes[124];
        let log = (((logstart >> agblklog) as usize) * agblocks + (logstart & ((1 << agblklog) - 1)) as usize) * 4096;
        bytes[log..log + (1 << 20)].fill(0);
        std::fs::write(&image, &bytes).unwrap();
        let probe = FreeSpace::probe(device(&image));
        eprintln!("{}", probe.not_used.join("\n"));
        assert!(probe.free.is_none() && probe.not_used.iter().any(|r| r.contains("the log")), "a zeroed log is not trusted");
    }

    #[test]
    fn any_xfs_metadata_is_probed_without_panic() {
        // A small XFS (one group), its metadata overwritten at seeded random
        // places: superblock, group headers, trees, log.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("small.img");
        std::fs::write(&image, vec![0u8; 16 << 20]).unwrap();
        run(Command::new("mkfs.xfs").args(["-q", "-f", "-K", "--unsupported", "-m", "crc=0"]).arg(&image));
        let pristine = std::fs::read(&image).unwrap();
        assert!(probe_bytes(pristine.clone(), 1 << 20) > 0, "the pristine image has free ranges");
        let logstart = u64::from_be_bytes(pristine[48..56].try_into().unwrap()) as usize * 4096;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut bytes = pristine.clone();
            for _ in 0..1 + next() % 6 {
                let at = match next() % 3 {
                    0 => (next() % 2048) as usize,
                    1 => 4096 + (next() % 16384) as usize,
                    _ => logstart + (next() % 4096) as usize,
                };
                bytes[at] = next() as u8;
            }
            let _ = probe_bytes(bytes, 1 << 20);
        }
    }


    /// Runs the LVM tool `args[0]` on metadata only: nothing activated
    /// (this kernel may have no device-mapper), no backup copies kept.
    fn lvm(args: &[&str]) -> String {
        run(Command::new(args[0]).args(["--config", "global{activation=0} backup{backup=0 archive=0}"]).args(&args[1..]))
    }

    #[test]
    fn a_filesystem_in_a_linear_logical_volume_skips_its_free_space() {
        // A disk that is one LVM physical volume, made by the real tools on a
        // loop device: `data` is linear, `split` has two segments.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("pv.img");
        garbage_image(&image, 96);
        let vg = format!("drmeshfs{}", std::process::id());
        let loop_dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image)).trim().to_string();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let detach = Detach(loop_dev.clone());
        lvm(&["pvcreate", "-q", "-ff", "-y", &loop_dev]);
        lvm(&["vgcreate", "-q", "-s", "4m", &vg, &loop_dev]);
        for (lv, size) in [("data", "32m"), ("split", "8m"), ("gap", "4m")] {
            lvm(&["lvcreate", "-q", "-y", "-an", "-Wn", "-Zn", "-n", lv, "-L", size, &vg]);
        }
        lvm(&["lvextend", "-q", "-L", "+8m", &format!("{vg}/split")]);
        let pe_start: u64 = lvm(&["pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", &loop_dev]).trim().parse().unwrap();
        drop(detach);
        // ext4 in `data` (extents 0-7) and in the first segment of `split` (8-9).
        let files = dir.path().join("files");
        some_files(&files);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E"]).arg(format!("nodiscard,offset={pe_start}")).arg("-d").arg(&files).arg(&image).arg("32M"));
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E"]).arg(format!("nodiscard,offset={}", pe_start + (32 << 20))).arg(&image).arg("8M"));

        let probe = FreeSpace::probe(device(&image));
        let free = probe.free.as_ref().unwrap_or_else(|| panic!("no free space found: {:?}", probe.not_used));
        assert!(free.describe().contains(&format!("ext4 on logical volume {vg}/data (")), "{}", free.describe());
        assert!(probe.not_used.iter().any(|r| r.starts_with(&format!("logical volume {vg}/split: ")) && r.contains("segments")), "{:?}", probe.not_used);
        eprintln!("{}; {}", free.describe(), probe.not_used.join("; "));
        // Extents 0-12 are held (data 0-7, split 8-9 and 11-12, gap 10); the
        // physical volume's other extents are unallocated: not read.
        let ext = 4u64 << 20;
        let unallocated_from = pe_start + 13 * ext;
        let unallocated = free.free_in(unallocated_from, (96 << 20) - unallocated_from as usize);
        assert_eq!(unallocated.first().map(|r| r.start), Some(0), "{unallocated:?}");
        assert!(unallocated[0].end as u64 >= 9 * ext, "{unallocated:?}");
        assert!(free.describe().contains(&format!("unallocated extents of the LVM physical volume on the whole disk ({} of", unallocated[0].end >> 20)), "{}", free.describe());
        // Nothing else is free but `data`'s free blocks: the PV's label and
        // metadata, the other LVs, the end of the disk past the last extent.
        assert!(free.free_in(0, pe_start as usize).is_empty());
        assert!(free.free_in(pe_start + (32 << 20), 5 * ext as usize).is_empty());
        let after = unallocated_from + unallocated[0].end as u64;
        assert!(free.free_in(after, ((96 << 20) - after) as usize).is_empty());
        let n = check_against_dumpe2fs(&image, pe_start, 4096, 32 << 20);
        eprintln!("{n} free blocks in {vg}/data");
    }


    #[test]
    fn a_swap_area_is_skipped_past_its_header_unless_it_holds_a_hibernation_image() {
        let dir = tempfile::tempdir().unwrap();
        let swap = dir.path().join("swap.img");
        garbage_image(&swap, 16);
        run(Command::new("mkswap").arg("-q").arg(&swap));
        let area = std::fs::read(&swap).unwrap();
        // Partition 2 of a GPT disk holds the swap area.
        let disk = dir.path().join("disk.img");
        garbage_image(&disk, 64);
        let mut sfdisk = Command::new("sfdisk");
        sfdisk.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(&disk).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
        let mut child = sfdisk.spawn().expect("sfdisk (scripts/install-deps installs it)");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"label: gpt\nstart=2048, size=32768, type=L\nstart=34816, size=32768, type=S\n").unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "sfdisk failed");
        let mut bytes = std::fs::read(&disk).unwrap();
        let at = 34816 * 512;
        bytes[at..at + area.len()].copy_from_slice(&area);
        std::fs::write(&disk, &bytes).unwrap();
        let probe = FreeSpace::probe(device(&disk));
        let free = probe.free.unwrap_or_else(|| panic!("no swap found: {:?}", probe.not_used));
        assert_eq!(free.describe(), "swap on partition 2 (GPT type Linux swap) (15 MiB)");
        // All of it but the header page; nothing before or after.
        assert_eq!(free.free_in(at as u64, 16 << 20), vec![4096..16 << 20]);
        assert!(free.free_in(0, at).is_empty());
        assert!(free.free_in((at + (16 << 20)) as u64, (64 << 20) - at - (16 << 20)).is_empty());
        // What is read of it is still a swap area: its header, as mkswap wrote it.
        let source = FileSource::on(device(&disk), 1 << 20).with_free_space(Arc::new(free));
        let read: Vec<u8> = source.read_run(0, source.block_count() as usize).unwrap().iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(&read[at..at + 4096], &area[..4096]);
        assert!(read[at + 4096..at + (16 << 20)].iter().all(|&b| b == 0));
        let back = dir.path().join("back.img");
        std::fs::write(&back, &read[at..at + (16 << 20)]).unwrap();
        let said = run(Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(&back));
        assert_eq!(said.trim(), "swap");

        // A swap area holding a hibernation image has another signature: read.
        let mut hibernated = area.clone();
        hibernated[4086..4096].copy_from_slice(b"S1SUSPEND\0");
        std::fs::write(&swap, &hibernated).unwrap();
        let probe = FreeSpace::probe(device(&swap));
        assert!(probe.free.is_none(), "a hibernation image is never skipped");
        // The whole disk a swap area.
        std::fs::write(&swap, &area).unwrap();
        let free = FreeSpace::probe(device(&swap)).free.unwrap();
        assert_eq!(free.describe(), "swap on the whole disk (15 MiB)");
    }

}
