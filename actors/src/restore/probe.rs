//! What a destination device already holds: the signatures of partition tables,
//! filesystems and volume managers, read from its first bytes.
//!
//! Restore refuses (without `--force`) to overwrite a device on which one of
//! these is found, and says which. The probe only compares magic numbers at
//! their documented offsets; it never trusts a length or an offset read from
//! the device, so any input is safe to probe.

/// Bytes from the start of a device that [`probe`] looks at (the btrfs
/// superblock at 64 KiB is the farthest signature).
pub const PROBE_BYTES: usize = 68 << 10;

/// A signature found on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// A GUID partition table (header at LBA 1, 512- or 4096-byte sectors).
    Gpt,
    /// An MBR partition table with at least one partition entry.
    Mbr,
    /// ext2, ext3 or ext4.
    Ext,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// An LVM2 physical volume.
    LvmPhysicalVolume,
    /// Linux swap.
    Swap,
    /// NTFS.
    Ntfs,
    /// FAT12/16/32.
    Fat,
    /// A LUKS encrypted volume.
    Luks,
    /// Linux software RAID (md superblock 1.1 or 1.2).
    MdRaid,
    /// An ISO 9660 image.
    Iso9660,
}

impl Signature {
    /// How people call it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Signature::Gpt => "a GPT partition table",
            Signature::Mbr => "an MBR partition table",
            Signature::Ext => "an ext2/3/4 filesystem",
            Signature::Xfs => "an XFS filesystem",
            Signature::Btrfs => "a btrfs filesystem",
            Signature::LvmPhysicalVolume => "an LVM physical volume",
            Signature::Swap => "Linux swap",
            Signature::Ntfs => "an NTFS filesystem",
            Signature::Fat => "a FAT filesystem",
            Signature::Luks => "a LUKS encrypted volume",
            Signature::MdRaid => "a Linux RAID (md) member",
            Signature::Iso9660 => "an ISO 9660 filesystem",
        }
    }
}

fn at(data: &[u8], offset: usize, magic: &[u8]) -> bool {
    data.get(offset..offset + magic.len()) == Some(magic)
}

/// The first signature found in `data`, the first bytes of a device (at most
/// [`PROBE_BYTES`] are looked at; shorter input is probed as far as it goes).
/// Filesystems are looked for before partition tables, since a FAT or NTFS boot
/// sector carries the same 0x55AA mark as an MBR.
pub fn probe(data: &[u8]) -> Option<Signature> {
    let checks: [(Signature, bool); 12] = [
        (Signature::Luks, at(data, 0, b"LUKS\xba\xbe")),
        (Signature::Xfs, at(data, 0, b"XFSB")),
        (Signature::Ntfs, at(data, 3, b"NTFS    ")),
        (Signature::Fat, at(data, 510, &[0x55, 0xaa]) && (at(data, 54, b"FAT1") || at(data, 82, b"FAT32   "))),
        (Signature::LvmPhysicalVolume, at(data, 512, b"LABELONE") && at(data, 536, b"LVM2 001")),
        (Signature::Gpt, at(data, 512, b"EFI PART") || at(data, 4096, b"EFI PART")),
        (Signature::Ext, at(data, 1080, &[0x53, 0xef])),
        (Signature::MdRaid, at(data, 0, &[0xfc, 0x4e, 0x2b, 0xa9]) || at(data, 4096, &[0xfc, 0x4e, 0x2b, 0xa9])),
        (Signature::Swap, at(data, 4086, b"SWAPSPACE2") || at(data, 4086, b"SWAP-SPACE")),
        (Signature::Iso9660, at(data, 32769, b"CD001")),
        (Signature::Btrfs, at(data, 65600, b"_BHRfS_M")),
        (Signature::Mbr, at(data, 510, &[0x55, 0xaa]) && mbr_has_partition(data)),
    ];
    checks.into_iter().find_map(|(sig, found)| found.then_some(sig))
}

/// Whether one of the four MBR entries (16 bytes each from offset 446) has a
/// partition type and a length.
fn mbr_has_partition(data: &[u8]) -> bool {
    (0..4).any(|i| {
        let entry = 446 + 16 * i;
        match data.get(entry..entry + 16) {
            Some(e) => e[4] != 0 && e[12..16] != [0, 0, 0, 0],
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; PROBE_BYTES];
        d[offset..offset + magic.len()].copy_from_slice(magic);
        d
    }

    #[test]
    fn zeros_and_short_input_hold_nothing() {
        assert_eq!(probe(&vec![0u8; PROBE_BYTES]), None);
        assert_eq!(probe(&[]), None);
        assert_eq!(probe(&[0x55; 100]), None);
    }

    #[test]
    fn each_signature_is_found_at_its_offset() {
        assert_eq!(probe(&with(1080, &[0x53, 0xef])), Some(Signature::Ext));
        assert_eq!(probe(&with(0, b"XFSB")), Some(Signature::Xfs));
        assert_eq!(probe(&with(65600, b"_BHRfS_M")), Some(Signature::Btrfs));
        assert_eq!(probe(&with(512, b"EFI PART")), Some(Signature::Gpt));
        assert_eq!(probe(&with(4096, b"EFI PART")), Some(Signature::Gpt));
        assert_eq!(probe(&with(4086, b"SWAPSPACE2")), Some(Signature::Swap));
        assert_eq!(probe(&with(0, b"LUKS\xba\xbe")), Some(Signature::Luks));
        assert_eq!(probe(&with(32769, b"CD001")), Some(Signature::Iso9660));
        let mut lvm = with(512, b"LABELONE");
        lvm[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(probe(&lvm), Some(Signature::LvmPhysicalVolume));
        let mut ntfs = with(3, b"NTFS    ");
        ntfs[510] = 0x55;
        ntfs[511] = 0xaa;
        assert_eq!(probe(&ntfs), Some(Signature::Ntfs));
        let mut fat = with(82, b"FAT32   ");
        fat[510] = 0x55;
        fat[511] = 0xaa;
        assert_eq!(probe(&fat), Some(Signature::Fat));
    }

    #[test]
    fn mbr_needs_a_partition_entry() {
        let mut mbr = with(510, &[0x55, 0xaa]);
        assert_eq!(probe(&mbr), None, "a boot mark alone is no partition table");
        mbr[446 + 4] = 0x83;
        mbr[446 + 12] = 0x10;
        assert_eq!(probe(&mbr), Some(Signature::Mbr));
    }

    proptest! {
        #[test]
        fn any_bytes_probe_without_panic(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            let _ = probe(&data);
        }
    }
}
