//! Filesystem type, UUID and label from the first bytes of a volume.
//!
//! Only fixed offsets of documented superblocks are read; nothing read from
//! the bytes is used as an offset, so any input is safe.

use serde::Serialize;

/// Bytes from the start of a volume that [`identify`] looks at (the btrfs
/// superblock at 64 KiB is the farthest; swap headers of 64 KiB pages end there
/// too).
pub const SUPERBLOCK_BYTES: usize = 68 << 10;

/// A filesystem (or volume manager) type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// ext2.
    Ext2,
    /// ext3 (ext2 with a journal).
    Ext3,
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// FAT12/16/32.
    Vfat,
    /// Linux swap (version 1).
    Swap,
    /// An LVM2 physical volume.
    LvmPv,
}

impl FsKind {
    /// The name fstab and blkid use.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Vfat => "vfat",
            FsKind::Swap => "swap",
            FsKind::LvmPv => "LVM2_member",
        }
    }
}

/// What a volume holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    /// Its type.
    pub kind: FsKind,
    /// Its UUID as blkid shows it (`UUID=` in fstab), if it has one.
    pub uuid: Option<String>,
    /// Its label, if it has one.
    pub label: Option<String>,
}

fn at(data: &[u8], offset: usize, magic: &[u8]) -> bool {
    data.get(offset..offset + magic.len()) == Some(magic)
}

fn le32(data: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(offset..offset + 4)?.try_into().ok()?))
}

fn le16(data: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(offset..offset + 2)?.try_into().ok()?))
}

/// A 16-byte UUID as 8-4-4-4-12 lowercase hex; `None` when all zero.
pub(crate) fn uuid(data: &[u8], offset: usize) -> Option<String> {
    let b = data.get(offset..offset + 16)?;
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]))
}

/// A label: bytes up to the first NUL, trailing spaces removed, control
/// characters replaced; `None` when empty.
pub(crate) fn label(data: &[u8], offset: usize, len: usize) -> Option<String> {
    let b = data.get(offset..offset + len)?;
    let b = b.split(|&x| x == 0).next().unwrap_or_default();
    let s: String = String::from_utf8_lossy(b).chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    let s = s.trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// Where the LVM2 label is, if `data` (from a volume's start) has one: the
/// label is in one of the first four 512-byte sectors.
pub(crate) fn lvm_label_sector(data: &[u8]) -> Option<usize> {
    (0..4).find(|s| at(data, s * 512, b"LABELONE") && at(data, s * 512 + 24, b"LVM2 001"))
}

/// The filesystem whose superblock starts `data` (the first bytes of a
/// volume, up to [`SUPERBLOCK_BYTES`]).
pub fn identify(data: &[u8]) -> Option<Filesystem> {
    if let Some(sector) = lvm_label_sector(data) {
        let pv_header = le32(data, sector * 512 + 20).map(|o| sector * 512 + o as usize);
        let uuid = pv_header.and_then(|o| data.get(o..o + 32)).and_then(|id| {
            id.iter().all(|c| c.is_ascii_alphanumeric()).then(|| {
                let s = String::from_utf8_lossy(id);
                format!("{}-{}-{}-{}-{}-{}-{}", &s[0..6], &s[6..10], &s[10..14], &s[14..18], &s[18..22], &s[22..26], &s[26..32])
            })
        });
        return Some(Filesystem { kind: FsKind::LvmPv, uuid, label: None });
    }
    if at(data, 0, b"XFSB") {
        return Some(Filesystem { kind: FsKind::Xfs, uuid: uuid(data, 32), label: label(data, 108, 12) });
    }
    if at(data, 65536 + 64, b"_BHRfS_M") {
        return Some(Filesystem { kind: FsKind::Btrfs, uuid: uuid(data, 65536 + 32), label: label(data, 65536 + 299, 256) });
    }
    if at(data, 1024 + 56, &[0x53, 0xef]) {
        let compat = le32(data, 1024 + 92).unwrap_or(0);
        let incompat = le32(data, 1024 + 96).unwrap_or(0);
        let ro_compat = le32(data, 1024 + 100).unwrap_or(0);
        // extents, 64bit, flex_bg, inline data / huge_file, gdt_csum, dir_nlink,
        // extra_isize, metadata_csum: features ext2/3 never had.
        let ext4 = incompat & (0x40 | 0x80 | 0x200 | 0x8000) != 0 || ro_compat & (0x8 | 0x10 | 0x20 | 0x40 | 0x400) != 0;
        let kind = if ext4 {
            FsKind::Ext4
        } else if compat & 0x4 != 0 {
            FsKind::Ext3
        } else {
            FsKind::Ext2
        };
        return Some(Filesystem { kind, uuid: uuid(data, 1024 + 104), label: label(data, 1024 + 120, 16) });
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if at(data, page - 10, b"SWAPSPACE2") {
            return Some(Filesystem { kind: FsKind::Swap, uuid: uuid(data, 1024 + 12), label: label(data, 1024 + 28, 16) });
        }
    }
    let boot_mark = at(data, 510, &[0x55, 0xaa]);
    let sector_ok = matches!(le16(data, 11), Some(512 | 1024 | 2048 | 4096));
    if boot_mark && sector_ok {
        let (id_at, label_at) = if at(data, 82, b"FAT32   ") {
            (67, 71)
        } else if at(data, 54, b"FAT12   ") || at(data, 54, b"FAT16   ") || at(data, 54, b"FAT     ") {
            (39, 43)
        } else {
            return None;
        };
        let id = le32(data, id_at).unwrap_or(0);
        let uuid = (id != 0).then(|| format!("{:04X}-{:04X}", id >> 16, id & 0xffff));
        let label = label(data, label_at, 11).filter(|l| l != "NO NAME");
        return Some(Filesystem { kind: FsKind::Vfat, uuid, label });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [0xb1, 0x84, 0xcb, 0x03, 0x35, 0xe7, 0x44, 0x47, 0x9b, 0xc2, 0xaa, 0xcd, 0x6c, 0xef, 0x90, 0x2f];

    #[test]
    fn ext4_superblock() {
        let mut d = vec![0u8; SUPERBLOCK_BYTES];
        d[1080..1082].copy_from_slice(&[0x53, 0xef]);
        d[1024 + 96..1024 + 100].copy_from_slice(&0x2c2u32.to_le_bytes()); // filetype, extents, 64bit, flex_bg
        d[1024 + 104..1024 + 120].copy_from_slice(&UUID);
        d[1024 + 120..1024 + 124].copy_from_slice(b"root");
        let fs = identify(&d).unwrap();
        assert_eq!(fs.kind, FsKind::Ext4);
        assert_eq!(fs.uuid.as_deref(), Some("b184cb03-35e7-4447-9bc2-aacd6cef902f"));
        assert_eq!(fs.label.as_deref(), Some("root"));
        d[1024 + 96..1024 + 100].copy_from_slice(&0x2u32.to_le_bytes());
        d[1024 + 92..1024 + 96].copy_from_slice(&0x4u32.to_le_bytes());
        assert_eq!(identify(&d).unwrap().kind, FsKind::Ext3);
        d[1024 + 92..1024 + 96].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(identify(&d).unwrap().kind, FsKind::Ext2);
    }

    #[test]
    fn xfs_btrfs_swap_fat_lvm() {
        let mut xfs = vec![0u8; 4096];
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&UUID);
        xfs[108..112].copy_from_slice(b"data");
        let fs = identify(&xfs).unwrap();
        assert_eq!((fs.kind, fs.uuid.as_deref(), fs.label.as_deref()), (FsKind::Xfs, Some("b184cb03-35e7-4447-9bc2-aacd6cef902f"), Some("data")));

        let mut btrfs = vec![0u8; SUPERBLOCK_BYTES];
        btrfs[65600..65608].copy_from_slice(b"_BHRfS_M");
        btrfs[65568..65584].copy_from_slice(&UUID);
        assert_eq!(identify(&btrfs).unwrap().kind, FsKind::Btrfs);

        let mut swap = vec![0u8; 4096];
        swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
        swap[1036..1052].copy_from_slice(&UUID);
        let fs = identify(&swap).unwrap();
        assert_eq!((fs.kind, fs.uuid.as_deref(), fs.label), (FsKind::Swap, Some("b184cb03-35e7-4447-9bc2-aacd6cef902f"), None));

        let mut fat = vec![0u8; 512];
        fat[11..13].copy_from_slice(&512u16.to_le_bytes());
        fat[82..90].copy_from_slice(b"FAT32   ");
        fat[67..71].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        fat[71..82].copy_from_slice(b"EFI        ");
        fat[510] = 0x55;
        fat[511] = 0xaa;
        let fs = identify(&fat).unwrap();
        assert_eq!((fs.kind, fs.uuid.as_deref(), fs.label.as_deref()), (FsKind::Vfat, Some("1234-ABCD"), Some("EFI")));

        let mut lvm = vec![0u8; 2048];
        lvm[512..520].copy_from_slice(b"LABELONE");
        lvm[532..536].copy_from_slice(&32u32.to_le_bytes());
        lvm[536..544].copy_from_slice(b"LVM2 001");
        lvm[544..576].copy_from_slice(b"AbCdEf0123456789abcdefghijklmnop");
        let fs = identify(&lvm).unwrap();
        assert_eq!(fs.kind, FsKind::LvmPv);
        assert_eq!(fs.uuid.as_deref(), Some("AbCdEf-0123-4567-89ab-cdef-ghij-klmnop"));
    }

    #[test]
    fn nothing_in_zeros() {
        assert_eq!(identify(&[0u8; 70_000]), None);
        assert_eq!(identify(&[]), None);
    }

    proptest! {
        #[test]
        fn any_bytes_identify_without_panic(data in proptest::collection::vec(any::<u8>(), 0..5000), magic in 0usize..6) {
            let mut data = data;
            // Plant a magic now and then so the parsers behind it run too.
            let plant: &[(usize, &[u8])] = &[(1080, &[0x53, 0xef]), (0, b"XFSB"), (512, b"LABELONE"), (510, &[0x55, 0xaa]), (4086, b"SWAPSPACE2"), (82, b"FAT32   ")];
            if let Some((at, m)) = plant.get(magic) {
                if data.len() >= at + m.len() { data[*at..at + m.len()].copy_from_slice(m); }
            }
            let _ = identify(&data);
        }
    }
}
