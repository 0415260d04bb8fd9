//! The volumes of a whole-disk image: MBR partitions (primary, extended and
//! logical), GPT partitions, a filesystem on the whole disk, and the linear
//! logical volumes of LVM2 physical volumes; for each, the filesystem found
//! in its superblock.
//!
//! Robust against any bytes: every offset and length read from the disk is
//! checked against the disk's size before use, extended-partition chains and
//! GPT entry arrays are bounded, and a malformed structure is reported in
//! [`Layout::skipped`] instead of failing the whole listing. Only an I/O error
//! of the image itself is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use super::lvm::{self, LvPlace};
use super::superblock::{identify, Filesystem, FsKind, SUPERBLOCK_BYTES};
use super::AdaptError;

/// Random-access reads of a whole-disk image.
pub trait ReadAt {
    /// Fills `buf` with the bytes at `offset`; an error if they are not all there.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The image's size in bytes.
    fn len(&self) -> u64;
    /// Whether the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn len(&self) -> u64 {
        match self.metadata() {
            Ok(m) if m.is_file() => m.len(),
            // A block device: its size is where a seek to the end lands.
            _ => (&*self).seek(SeekFrom::End(0)).unwrap_or(0),
        }
    }
}

/// An image in memory (tests, small images).
impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = usize::try_from(offset).ok().and_then(|s| Some(s..s.checked_add(buf.len())?));
        match range.and_then(|r| self.get(r)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the image")),
        }
    }

    fn len(&self) -> u64 {
        Vec::len(self) as u64
    }
}

/// Most logical partitions followed in an extended partition (Linux stops at
/// a few dozen; a looping chain ends here at the latest).
const LOGICAL_MAX: usize = 128;
/// Most GPT entries read (the usual array has 128).
const GPT_ENTRIES_MAX: u32 = 4096;

/// A partition table kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// MS-DOS / MBR.
    Mbr,
    /// GUID partition table.
    Gpt,
}

/// Where a volume is on the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Place {
    /// The whole disk (no partition table).
    WholeDisk,
    /// A partition.
    Partition {
        /// MBR or GPT.
        table: TableKind,
        /// The number Linux gives it (the suffix of /dev/sda1): MBR primaries
        /// 1-4, logicals from 5; GPT its slot in the entry array plus one.
        number: u32,
        /// Its type: an MBR type byte in hex ("0x83") or a GPT type GUID.
        type_id: String,
        /// The usual name of that type, when known.
        type_name: Option<String>,
    },
    /// A linear LVM2 logical volume.
    LogicalVolume {
        /// Its volume group.
        vg: String,
        /// Its name.
        lv: String,
    },
}

/// A volume on the disk: a byte range and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Where it is.
    pub place: Place,
    /// Its first byte on the disk.
    pub start_bytes: u64,
    /// Its length.
    pub size_bytes: u64,
    /// The filesystem found in its superblock, if any.
    pub filesystem: Option<Filesystem>,
}

impl Volume {
    /// Where it is, for messages: "partition 1 (MBR type Linux)",
    /// "logical volume vg0/root", "the whole disk".
    pub fn place_text(&self) -> String {
        match &self.place {
            Place::WholeDisk => "the whole disk".to_string(),
            Place::Partition { table, number, type_id, type_name } => {
                let table = match table {
                    TableKind::Mbr => "MBR",
                    TableKind::Gpt => "GPT",
                };
                format!("partition {number} ({table} type {})", type_name.as_deref().unwrap_or(type_id))
            }
            Place::LogicalVolume { vg, lv } => format!("logical volume {vg}/{lv}"),
        }
    }

    /// How people call it, for messages: "partition 1 (MBR type 0x83, ext4)".
    pub fn describe(&self) -> String {
        let place = self.place_text();
        match &self.filesystem {
            Some(fs) => format!("{place}, {}", fs.kind.name()),
            None => format!("{place}, no known filesystem"),
        }
    }
}

/// Something on the disk that is not listed as a volume, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// What it is.
    pub what: String,
    /// Why it is not listed.
    pub reason: String,
}

/// The volumes of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// The disk's size.
    pub disk_bytes: u64,
    /// Its partition table, if any.
    pub table: Option<TableKind>,
    /// Its volumes, in disk order (logical volumes after partitions).
    pub volumes: Vec<Volume>,
    /// What was found but not listed.
    pub skipped: Vec<Skipped>,
}

/// A volume with the device name the source server used for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedVolume {
    /// The device name on the source server: "/dev/sda1", "/dev/mapper/vg0-root".
    pub device: String,
    /// The volume.
    pub volume: Volume,
}

/// Reads `len` bytes at `offset`, or `None` if they are not all on the disk.
fn read(disk: &dyn ReadAt, offset: u64, len: usize) -> Result<Option<Vec<u8>>, AdaptError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= disk.len() => {}
        _ => return Ok(None),
    }
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset).map_err(|source| AdaptError::Read { offset, source })?;
    Ok(Some(buf))
}

fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4).map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).and_then(|x| x.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// CRC-32 (IEEE, as GPT uses it).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A GUID in its usual text form (the first three fields little-endian).
fn guid(b: &[u8]) -> String {
    let g = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default().iter().map(|x| format!("{x:02x}")).collect::<String>();
    let rev = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default().iter().rev().map(|x| format!("{x:02x}")).collect::<String>();
    format!("{}-{}-{}-{}-{}", rev(0..4), rev(4..6), rev(6..8), g(8..10), g(10..16))
}

fn gpt_type_name(id: &str) -> Option<&'static str> {
    Some(match id {
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "Linux filesystem",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "Linux root (x86-64)",
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "EFI system",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "Linux swap",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "Linux LVM",
        "21686148-6449-6e6f-744e-656564454649" => "BIOS boot",
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => "Linux RAID",
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "Linux extended boot",
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915" => "Linux home",
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "Microsoft basic data",
        "e3c9e316-0b5c-4db8-817d-f92df00215ae" => "Microsoft reserved",
        _ => return None,
    })
}

fn mbr_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0x83 => "Linux",
        0x82 => "Linux swap",
        0x8e => "Linux LVM",
        0xfd => "Linux RAID",
        0x05 | 0x0f | 0x85 => "extended",
        0x07 => "NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x06 | 0x0e => "FAT16",
        0xef => "EFI system",
        0xee => "GPT protective",
        _ => return None,
    })
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// A partition before its filesystem is probed.
struct Part {
    number: u32,
    table: TableKind,
    type_id: String,
    type_name: Option<String>,
    start: u64,
    size: u64,
}

/// Lists the volumes of the whole-disk image `disk`.
pub fn list_volumes(disk: &dyn ReadAt) -> Result<Layout, AdaptError> {
    let disk_bytes = disk.len();
    let mut skipped = Vec::new();
    let (table, parts) = match read_gpt(disk, &mut skipped)? {
        Some(parts) => (Some(TableKind::Gpt), parts),
        None => match read_mbr(disk, &mut skipped)? {
            Some(parts) => (Some(TableKind::Mbr), parts),
            None => (None, Vec::new()),
        },
    };
    let mut volumes = Vec::new();
    if table.is_none() {
        volumes.push(probe(disk, Place::WholeDisk, 0, disk_bytes)?);
    }
    for p in parts {
        let place = Place::Partition { table: p.table, number: p.number, type_id: p.type_id, type_name: p.type_name };
        volumes.push(probe(disk, place, p.start, p.size)?);
    }
    let lvs = logical_volumes(disk, &volumes, &mut skipped)?;
    volumes.extend(lvs);
    Ok(Layout { disk_bytes, table, volumes, skipped })
}

fn probe(disk: &dyn ReadAt, place: Place, start: u64, size: u64) -> Result<Volume, AdaptError> {
    let len = usize::try_from(size.min(SUPERBLOCK_BYTES as u64)).unwrap_or(SUPERBLOCK_BYTES);
    let filesystem = match read(disk, start, len)? {
        Some(head) => identify(&head),
        None => None,
    };
    Ok(Volume { place, start_bytes: start, size_bytes: size, filesystem })
}

/// The LVs of every LVM2 PV among `volumes`.
fn logical_volumes(disk: &dyn ReadAt, volumes: &[Volume], skipped: &mut Vec<Skipped>) -> Result<Vec<Volume>, AdaptError> {
    // (vg, lv) -> listed volume, or the reasons it was not.
    let mut found: BTreeMap<(String, String), Result<Volume, BTreeSet<String>>> = BTreeMap::new();
    for pv_volume in volumes.iter().filter(|v| v.filesystem.as_ref().is_some_and(|f| f.kind == FsKind::LvmPv)) {
        let pv = match lvm::read_pv(disk, pv_volume.start_bytes, pv_volume.size_bytes) {
            Ok(pv) => pv,
            Err(reason) => {
                skipped.push(Skipped { what: format!("LVM physical volume on {}", pv_volume.describe()), reason });
                continue;
            }
        };
        for (lv, place) in lvm::place_lvs(&pv) {
            let key = (pv.vg.name.clone(), lv.clone());
            let outcome = match place {
                LvPlace::Here { offset, bytes } => {
                    let start = pv_volume.start_bytes.checked_add(offset);
                    match start {
                        Some(start) if offset.checked_add(bytes).is_some_and(|end| end <= pv_volume.size_bytes) => {
                            let place = Place::LogicalVolume { vg: pv.vg.name.clone(), lv: lv.clone() };
                            Ok(probe(disk, place, start, bytes)?)
                        }
                        _ => Err(format!("its extents ({bytes} bytes at {offset}) run past the end of its physical volume")),
                    }
                }
                LvPlace::OnOtherPv(name) => Err(format!("its extents are on physical volume {name}, which is not on this disk")),
                LvPlace::Unsupported(reason) => Err(reason),
            };
            let entry = found.entry(key).or_insert_with(|| Err(BTreeSet::new()));
            match (outcome, &mut *entry) {
                (Ok(v), Err(_)) => *entry = Ok(v),
                (Err(reason), Err(reasons)) => {
                    reasons.insert(reason);
                }
                (_, Ok(_)) => {}
            }
        }
    }
    let mut lvs = Vec::new();
    for ((vg, lv), outcome) in found {
        match outcome {
            Ok(v) => lvs.push(v),
            Err(reasons) => {
                // An LV on another PV is listed when that PV is read; only if
                // none of its PVs was found does that reason stand.
                let reason = reasons.into_iter().collect::<Vec<_>>().join("; ");
                skipped.push(Skipped { what: format!("logical volume {vg}/{lv}"), reason });
            }
        }
    }
    Ok(lvs)
}

/// The partitions of a GPT, or `None` if the disk has no valid GPT (primary or
/// backup, 512- or 4096-byte sectors).
fn read_gpt(disk: &dyn ReadAt, skipped: &mut Vec<Skipped>) -> Result<Option<Vec<Part>>, AdaptError> {
    for sector in [512u64, 4096] {
        let Some(primary) = read(disk, sector, sector as usize)? else { continue };
        if &primary[0..8] != b"EFI PART" {
            continue;
        }
        match gpt_partitions(disk, sector, &primary)? {
            Ok(parts) => return Ok(Some(parts)),
            Err(reason) => {
                let backup_lba = le64(&primary, 32);
                let last_lba = (disk.len() / sector).saturating_sub(1);
                let mut tried = Vec::new();
                for lba in [backup_lba, last_lba] {
                    if tried.contains(&lba) || lba <= 1 {
                        continue;
                    }
                    tried.push(lba);
                    let Some(offset) = lba.checked_mul(sector) else { continue };
                    let Some(backup) = read(disk, offset, sector as usize)? else { continue };
                    if &backup[0..8] == b"EFI PART" {
                        if let Ok(parts) = gpt_partitions(disk, sector, &backup)? {
                            skipped.push(Skipped { what: "primary GPT header".into(), reason: format!("{reason}; the backup GPT was used") });
                            return Ok(Some(parts));
                        }
                    }
                }
                skipped.push(Skipped { what: "GPT".into(), reason: format!("{reason}, and no valid backup GPT") });
            }
        }
    }
    Ok(None)
}

/// The partitions listed by the GPT header `header` (sector size `sector`).
fn gpt_partitions(disk: &dyn ReadAt, sector: u64, header: &[u8]) -> Result<Result<Vec<Part>, String>, AdaptError> {
    let header_size = le32(header, 12) as usize;
    if !(92..=header.len()).contains(&header_size) {
        return Ok(Err(format!("GPT header size {header_size} is invalid")));
    }
    let mut h = header[..header_size].to_vec();
    h[16..20].fill(0);
    if crc32(&h) != le32(header, 16) {
        return Ok(Err("GPT header checksum mismatch".into()));
    }
    let entries_lba = le64(header, 72);
    let count = le32(header, 80);
    let entry_size = le32(header, 84);
    if count > GPT_ENTRIES_MAX || !(128..=4096).contains(&entry_size) || entry_size & 7 != 0 {
        return Ok(Err(format!("GPT entry array of {count} entries of {entry_size} bytes is not supported")));
    }
    let bytes = count as usize * entry_size as usize;
    let Some(array) = entries_lba.checked_mul(sector).map(|o| read(disk, o, bytes)).transpose()?.flatten() else {
        return Ok(Err("GPT entry array lies outside the disk".into()));
    };
    if crc32(&array) != le32(header, 88) {
        return Ok(Err("GPT entry array checksum mismatch".into()));
    }
    let disk_sectors = disk.len() / sector;
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first || last >= disk_sectors {
            return Ok(Err(format!("GPT partition {} (sectors {first}-{last}) lies outside the disk", i + 1)));
        }
        let type_id = guid(&e[0..16]);
        let type_name = gpt_type_name(&type_id).map(str::to_string);
        parts.push(Part {
            number: i as u32 + 1,
            table: TableKind::Gpt,
            type_id,
            type_name,
            start: first * sector,
            size: (last - first + 1) * sector,
        });
    }
    Ok(Ok(parts))
}

/// The partitions of an MBR, or `None` when the first sector holds no
/// partition table (or a FAT/NTFS boot sector, which carries the same mark).
fn read_mbr(disk: &dyn ReadAt, skipped: &mut Vec<Skipped>) -> Result<Option<Vec<Part>>, AdaptError> {
    let Some(mbr) = read(disk, 0, 512)? else { return Ok(None) };
    if mbr[510..512] != [0x55, 0xaa] || identify(&mbr).is_some_and(|f| f.kind == FsKind::Vfat) || &mbr[3..11] == b"NTFS    " {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..446 + 16 * (i + 1)]).collect();
    // Boot indicators other than 0x00/0x80 mean this is no partition table.
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) || entries.iter().all(|e| e[4] == 0 || le32(e, 12) == 0) {
        return Ok(None);
    }
    let disk_sectors = disk.len() / 512;
    let fits = |start: u64, size: u64| start > 0 && start.checked_add(size).is_some_and(|end| end <= disk_sectors);
    let mut parts = Vec::new();
    let mut next_logical = 5u32;
    for (i, e) in entries.iter().enumerate() {
        let (kind, start, size) = (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        let number = i as u32 + 1;
        if kind == 0 || size == 0 {
            continue;
        }
        if kind == 0xee {
            skipped.push(Skipped { what: format!("MBR partition {number}"), reason: "a GPT protective partition, but the disk has no valid GPT".into() });
            continue;
        }
        if !fits(start, size) {
            skipped.push(Skipped { what: format!("MBR partition {number}"), reason: format!("sectors {start}+{size} lie outside the disk") });
            continue;
        }
        if is_extended(kind) {
            logical_partitions(disk, start, size, &mut next_logical, &mut parts, skipped)?;
            continue;
        }
        parts.push(Part {
            number,
            table: TableKind::Mbr,
            type_id: format!("0x{kind:02x}"),
            type_name: mbr_type_name(kind).map(str::to_string),
            start: start * 512,
            size: size * 512,
        });
    }
    parts.sort_by_key(|p| p.number);
    Ok(Some(parts))
}

/// Follows the chain of extended boot records of the extended partition at
/// sector `ext_start` (`ext_size` sectors), as Linux does: data entries are
/// relative to their EBR, the link to the next EBR relative to the extended
/// partition's start.
fn logical_partitions(disk: &dyn ReadAt, ext_start: u64, ext_size: u64, next: &mut u32, parts: &mut Vec<Part>, skipped: &mut Vec<Skipped>) -> Result<(), AdaptError> {
    let ext_end = ext_start + ext_size;
    let mut ebr_sector = ext_start;
    let mut this_size = ext_size;
    let mut seen = BTreeSet::new();
    for _ in 0..LOGICAL_MAX {
        if !seen.insert(ebr_sector) {
            skipped.push(Skipped { what: "extended partition".into(), reason: "its chain of logical partitions loops; the rest were not read".into() });
            return Ok(());
        }
        let Some(ebr) = read(disk, ebr_sector * 512, 512)? else {
            skipped.push(Skipped { what: "extended partition".into(), reason: format!("an extended boot record at sector {ebr_sector} lies outside the disk") });
            return Ok(());
        };
        if ebr[510..512] != [0x55, 0xaa] {
            skipped.push(Skipped { what: "extended partition".into(), reason: format!("the extended boot record at sector {ebr_sector} has no 0x55AA mark") });
            return Ok(());
        }
        let entries: Vec<&[u8]> = (0..4).map(|i| &ebr[446 + 16 * i..446 + 16 * (i + 1)]).collect();
        for (i, e) in entries.iter().enumerate() {
            let (kind, offset, size) = (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)));
            if kind == 0 || size == 0 || is_extended(kind) {
                continue;
            }
            let start = ebr_sector + offset;
            // Entries 3 and 4 often hold garbage: Linux checks them against
            // the EBR's span; all entries must lie in the extended partition.
            if (i >= 2 && offset + size > this_size) || start + size > ext_end || start < ext_start {
                if i < 2 {
                    skipped.push(Skipped { what: format!("logical partition {next}"), reason: format!("sectors {start}+{size} lie outside its extended partition") });
                }
                continue;
            }
            parts.push(Part {
                number: *next,
                table: TableKind::Mbr,
                type_id: format!("0x{kind:02x}"),
                type_name: mbr_type_name(kind).map(str::to_string),
                start: start * 512,
                size: size * 512,
            });
            *next += 1;
        }
        let Some(link) = entries.iter().find(|e| is_extended(e[4]) && le32(e, 12) != 0) else { return Ok(()) };
        let (offset, size) = (u64::from(le32(link, 8)), u64::from(le32(link, 12)));
        ebr_sector = ext_start + offset;
        this_size = size;
        if ebr_sector >= ext_end {
            skipped.push(Skipped { what: "extended partition".into(), reason: format!("the link to the next extended boot record (sector {ebr_sector}) leaves the extended partition") });
            return Ok(());
        }
    }
    skipped.push(Skipped { what: "extended partition".into(), reason: format!("more than {LOGICAL_MAX} logical partitions; the rest were not read") });
    Ok(())
}

/// The device names the source server used for the volumes of its disk
/// `disk` ("/dev/sda", "/dev/nvme0n1", "/dev/cciss/c0d0"): partitions get the
/// kernel's suffix ("1", or "p1" after a name ending in a digit), the whole
/// disk its own name, and LVs both "/dev/mapper/VG-LV" and "/dev/VG/LV".
pub fn name_volumes(disk: &str, layout: &Layout) -> Vec<NamedVolume> {
    let digit_end = disk.ends_with(|c: char| c.is_ascii_digit());
    let mut out = Vec::new();
    for v in &layout.volumes {
        let names = match &v.place {
            Place::WholeDisk => vec![disk.to_string()],
            Place::Partition { number, .. } if digit_end => vec![format!("{disk}p{number}")],
            Place::Partition { number, .. } => vec![format!("{disk}{number}")],
            Place::LogicalVolume { vg, lv } => {
                vec![format!("/dev/mapper/{}-{}", vg.replace('-', "--"), lv.replace('-', "--")), format!("/dev/{vg}/{lv}")]
            }
        };
        out.extend(names.into_iter().map(|device| NamedVolume { device, volume: v.clone() }));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) const MIB: u64 = 1 << 20;

    fn mbr_entry(disk: &mut [u8], sector: u64, slot: usize, kind: u8, start: u32, size: u32) {
        let o = sector as usize * 512 + 446 + 16 * slot;
        disk[o + 4] = kind;
        disk[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
        disk[o + 12..o + 16].copy_from_slice(&size.to_le_bytes());
        disk[sector as usize * 512 + 510] = 0x55;
        disk[sector as usize * 512 + 511] = 0xaa;
    }

    pub(crate) fn ext4_at(disk: &mut [u8], start: usize, uuid_byte: u8) {
        disk[start + 1080..start + 1082].copy_from_slice(&[0x53, 0xef]);
        disk[start + 1024 + 96] = 0x40;
        disk[start + 1024 + 104..start + 1024 + 120].fill(uuid_byte);
    }

    fn swap_at(disk: &mut [u8], start: usize) {
        disk[start + 4086..start + 4096].copy_from_slice(b"SWAPSPACE2");
        disk[start + 1036..start + 1052].fill(0x22);
    }

    #[test]
    fn mbr_primary_and_logical() {
        let mut d = vec![0u8; (16 * MIB) as usize];
        mbr_entry(&mut d, 0, 0, 0x83, 2048, 4096);
        mbr_entry(&mut d, 0, 1, 0x05, 8192, 16384);
        // First EBR at 8192: logical 5 at +2048, link to the next EBR at ext+8192.
        mbr_entry(&mut d, 8192, 0, 0x82, 2048, 2048);
        mbr_entry(&mut d, 8192, 1, 0x05, 8192, 4096);
        mbr_entry(&mut d, 16384, 0, 0x83, 2048, 2048);
        ext4_at(&mut d, 2048 * 512, 0x11);
        swap_at(&mut d, (8192 + 2048) * 512);
        ext4_at(&mut d, (16384 + 2048) * 512, 0x33);
        let l = list_volumes(&d).unwrap();
        assert_eq!(l.table, Some(TableKind::Mbr));
        let got: Vec<(u32, u64, Option<FsKind>)> = l
            .volumes
            .iter()
            .map(|v| match &v.place {
                Place::Partition { number, .. } => (*number, v.start_bytes / 512, v.filesystem.as_ref().map(|f| f.kind)),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(1, 2048, Some(FsKind::Ext4)), (5, 10240, Some(FsKind::Swap)), (6, 18432, Some(FsKind::Ext4))]);
        assert!(l.skipped.is_empty(), "{:?}", l.skipped);
        let names = name_volumes("/dev/sda", &l);
        assert_eq!(names.iter().map(|n| n.device.as_str()).collect::<Vec<_>>(), ["/dev/sda1", "/dev/sda5", "/dev/sda6"]);
        assert_eq!(name_volumes("/dev/nvme0n1", &l)[1].device, "/dev/nvme0n1p5");
        assert_eq!(names[0].volume.filesystem.as_ref().unwrap().uuid.as_deref(), Some("11111111-1111-1111-1111-111111111111"));
    }

    #[test]
    fn looping_ebr_chain_ends() {
        let mut d = vec![0u8; (8 * MIB) as usize];
        mbr_entry(&mut d, 0, 0, 0x0f, 2048, 8192);
        mbr_entry(&mut d, 2048, 0, 0x83, 64, 64);
        mbr_entry(&mut d, 2048, 1, 0x05, 0, 100); // links back to itself
        let l = list_volumes(&d).unwrap();
        assert_eq!(l.volumes.len(), 1);
        assert!(l.skipped.iter().any(|s| s.reason.contains("loops")), "{:?}", l.skipped);
    }

    /// A GPT disk with the given partitions (type GUID bytes, first, last LBA).
    pub(crate) fn gpt_disk(bytes: u64, parts: &[([u8; 16], u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; bytes as usize];
        mbr_entry(&mut d, 0, 0, 0xee, 1, u32::try_from(bytes / 512 - 1).unwrap_or(u32::MAX));
        let mut array = vec![0u8; 128 * 128];
        for (i, (t, first, last)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(t);
            e[16..32].fill(i as u8 + 1);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        d[1024..1024 + array.len()].copy_from_slice(&array);
        let h = &mut d[512..512 + 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(bytes / 512 - 1).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(bytes / 512 - 34).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
        let c = crc32(h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        d
    }

    pub(crate) const LINUX_FS: [u8; 16] = [0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4];

    #[test]
    fn gpt_partitions_and_checksums() {
        let esp = [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];
        let mut d = gpt_disk(8 * MIB, &[(esp, 2048, 4095), (LINUX_FS, 4096, 16000)]);
        ext4_at(&mut d, 4096 * 512, 0x44);
        let l = list_volumes(&d).unwrap();
        assert_eq!(l.table, Some(TableKind::Gpt));
        assert_eq!(l.volumes.len(), 2);
        match &l.volumes[1].place {
            Place::Partition { number, type_id, type_name, .. } => {
                assert_eq!(*number, 2);
                assert_eq!(type_id, "0fc63daf-8483-4772-8e79-3d69d8477de4");
                assert_eq!(type_name.as_deref(), Some("Linux filesystem"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.volumes[1].size_bytes, (16000 - 4096 + 1) * 512);
        assert_eq!(l.volumes[1].filesystem.as_ref().unwrap().kind, FsKind::Ext4);
        // A damaged header without a backup: no GPT, and the protective MBR says so.
        d[512 + 40] ^= 1;
        let l = list_volumes(&d).unwrap();
        assert!(l.volumes.is_empty() || l.table != Some(TableKind::Gpt));
        assert!(l.skipped.iter().any(|s| s.reason.contains("checksum")), "{:?}", l.skipped);
    }

    #[test]
    fn whole_disk_filesystem() {
        let mut d = vec![0u8; MIB as usize];
        ext4_at(&mut d, 0, 0x55);
        let l = list_volumes(&d).unwrap();
        assert_eq!(l.table, None);
        assert_eq!(l.volumes[0].place, Place::WholeDisk);
        assert_eq!(name_volumes("/dev/sdb", &l)[0].device, "/dev/sdb");
    }

    /// Writes an LVM2 PV (label, one metadata area with `text`) at `start`.
    pub(crate) fn lvm_pv_at(d: &mut [u8], start: usize, text: &str) {
        let label = start + 512;
        d[label..label + 8].copy_from_slice(b"LABELONE");
        d[label + 8..label + 16].copy_from_slice(&1u64.to_le_bytes());
        d[label + 20..label + 24].copy_from_slice(&32u32.to_le_bytes());
        d[label + 24..label + 32].copy_from_slice(b"LVM2 001");
        d[label + 32..label + 64].copy_from_slice(b"AbCdEf0123456789abcdefghijklmnop");
        // Data area at 1 MiB, then end; metadata area at 4096, 1 MiB - 4096, then end.
        let lists = [MIB, 0, 0, 0, 4096, MIB - 4096, 0, 0];
        for (i, v) in lists.iter().enumerate() {
            d[label + 72 + 8 * i..label + 80 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let mda = start + 4096;
        d[mda + 4..mda + 20].copy_from_slice(b" LVM2 x[5A%r0N*>");
        d[mda + 40..mda + 48].copy_from_slice(&512u64.to_le_bytes());
        d[mda + 48..mda + 56].copy_from_slice(&(text.len() as u64).to_le_bytes());
        d[mda + 512..mda + 512 + text.len()].copy_from_slice(text.as_bytes());
    }

    #[test]
    fn lvm_linear_lvs_are_volumes() {
        // pe_start 2048 sectors = 1 MiB; extent 8192 sectors = 4 MiB; root: 2560 extents.
        let text = lvm::tests::TEXT.replace("extent_size = 8192", "extent_size = 8").replace("extent_count = 2560", "extent_count = 16");
        let mut d = vec![0u8; (8 * MIB) as usize];
        mbr_entry(&mut d, 0, 0, 0x8e, 2048, 14000);
        let pv = 2048 * 512;
        lvm_pv_at(&mut d, pv, &text);
        ext4_at(&mut d, pv + MIB as usize, 0x66);
        let l = list_volumes(&d).unwrap();
        let lv = l.volumes.iter().find(|v| matches!(&v.place, Place::LogicalVolume { lv, .. } if lv == "root")).expect("root LV");
        assert_eq!(lv.start_bytes, pv as u64 + MIB);
        assert_eq!(lv.size_bytes, 16 * 8 * 512);
        assert_eq!(lv.filesystem.as_ref().unwrap().kind, FsKind::Ext4);
        assert!(l.skipped.iter().any(|s| s.what == "logical volume vg0/home" && s.reason.contains("2 segments")), "{:?}", l.skipped);
        let names: Vec<String> = name_volumes("/dev/sda", &l).into_iter().map(|n| n.device).collect();
        assert!(names.contains(&"/dev/mapper/vg0-root".to_string()) && names.contains(&"/dev/vg0/root".to_string()), "{names:?}");
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn any_disk_lists_without_panic(seed in proptest::collection::vec(any::<u8>(), 0..2048), table in 0u8..4, patches in proptest::collection::vec((0usize..70_000, any::<u8>()), 0..64)) {
            // Start from a plausible structure so that mutations reach deep code.
            let mut d = match table {
                0 => gpt_disk(MIB, &[(LINUX_FS, 40, 1000)]),
                1 => { let mut d = vec![0u8; MIB as usize]; mbr_entry(&mut d, 0, 0, 0x05, 1, 1500); mbr_entry(&mut d, 1, 0, 0x83, 10, 10); mbr_entry(&mut d, 1, 1, 0x05, 50, 50); d }
                2 => { let mut d = vec![0u8; MIB as usize]; mbr_entry(&mut d, 0, 0, 0x8e, 1, 2000); lvm_pv_at(&mut d, 512, lvm::tests::TEXT); d }
                _ => vec![0u8; 70_000],
            };
            if table == 3 {
                let n = seed.len().min(d.len());
                d[..n].copy_from_slice(&seed[..n]);
            }
            if table == 1 { d[510] = 0x55; d[511] = 0xaa; }
            for (at, b) in patches { if at < d.len() { d[at] = b; } }
            let _ = list_volumes(&d);
        }
    }
}
