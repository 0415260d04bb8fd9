//! The NTFS allocation bitmap, read from the volume's bytes: which clusters
//! the filesystem uses, so a reader can skip the free ones.
//!
//! Portable (no Windows API): it reads the boot sector, the MFT records of
//! `$LogFile`, `$Volume` and `$Bitmap` (with their update-sequence fixups),
//! and the data runs of `$Bitmap`. Trust first: the bitmap is used only when
//! the volume says it is complete: no dirty flag in `$Volume`, and a
//! `$LogFile` that is empty or whose restart areas say the volume is clean
//! (a snapshot of a volume Windows has mounted may hold metadata changes only
//! its log knows). Anything else is an error that says why.
//!
//! Robust against any bytes: every offset and length read from the volume is
//! checked before use, and reads are bounded.

/// Random-access reads of the disk that holds the volume.
pub trait Disk {
    /// Fills `buf` with the bytes at `offset`; an error if they are not all there.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// Why an NTFS volume's bitmap is not used. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum NtfsError {
    /// The bytes are not an NTFS boot sector.
    #[error("not an NTFS volume")]
    NotNtfs,
    /// An NTFS volume whose bitmap may not say what is in use, or whose
    /// structures this reader does not follow.
    #[error("{0}")]
    Untrusted(String),
    /// The volume could not be read.
    #[error("reading the NTFS volume at byte {offset}: {source}")]
    Io {
        /// Where the read started, on the disk.
        offset: u64,
        /// The cause.
        source: std::io::Error,
    },
}

/// MFT records the reader needs.
const MFT_LOGFILE: u64 = 2;
const MFT_VOLUME: u64 = 3;
const MFT_BITMAP: u64 = 6;
const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_END: u32 = 0xFFFF_FFFF;
const VOLUME_IS_DIRTY: u16 = 0x0001;
const RESTART_VOLUME_IS_CLEAN: u16 = 0x0002;
const LOGFILE_NO_CLIENT: u16 = 0xFFFF;
/// Stride of the update-sequence fixups, whatever the sector size.
const FIXUP_STRIDE: usize = 512;

/// An NTFS volume's layout and its bitmap's place on the disk.
#[derive(Debug, Clone)]
pub struct NtfsVolume {
    /// Where the volume starts on the disk.
    start: u64,
    cluster_bytes: u64,
    clusters: u64,
    /// `$Bitmap`'s data runs: (first VCN, LCN or `None` for sparse, length in clusters).
    bitmap_runs: Vec<(u64, Option<u64>, u64)>,
    /// `$Bitmap`'s initialized bytes (past them it reads as zeros).
    bitmap_bytes: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn untrusted(why: impl Into<String>) -> NtfsError {
    NtfsError::Untrusted(why.into())
}

fn read(disk: &dyn Disk, offset: u64, len: usize) -> Result<Vec<u8>, NtfsError> {
    let mut buf = vec![0u8; len];
    disk.read_exact_at(&mut buf, offset).map_err(|source| NtfsError::Io { offset, source })?;
    Ok(buf)
}

/// Applies the update-sequence fixups of a multi-sector record in place.
fn fixup(record: &mut [u8], what: &str) -> Result<(), NtfsError> {
    let bad = || untrusted(format!("the {what} record's update sequence is damaged"));
    let (ofs, count) = (usize::from(u16_at(record, 4).ok_or_else(bad)?), usize::from(u16_at(record, 6).ok_or_else(bad)?));
    if count < 2 || (count - 1) * FIXUP_STRIDE > record.len() || ofs + count * 2 > record.len() {
        return Err(bad());
    }
    let usn = [record[ofs], record[ofs + 1]];
    for i in 1..count {
        let end = i * FIXUP_STRIDE;
        if record[end - 2..end] != usn {
            return Err(bad());
        }
        let (a, b) = (record[ofs + 2 * i], record[ofs + 2 * i + 1]);
        record[end - 2] = a;
        record[end - 1] = b;
    }
    Ok(())
}

/// The attribute of type `kind` without a name in an MFT record (fixed up):
/// its header's offset and length.
fn attribute(record: &[u8], kind: u32, what: &str) -> Result<(usize, usize), NtfsError> {
    let mut at = usize::from(u16_at(record, 0x14).ok_or_else(|| untrusted(format!("the {what} record is cut short")))?);
    for _ in 0..64 {
        let ty = u32_at(record, at).ok_or_else(|| untrusted(format!("the {what} record's attributes run past its end")))?;
        if ty == ATTR_END {
            break;
        }
        let len = u32_at(record, at + 4).unwrap_or(0) as usize;
        if len < 0x18 || at + len > record.len() {
            return Err(untrusted(format!("an attribute of the {what} record has length {len}")));
        }
        let name_len = record[at + 9];
        if ty == kind && name_len == 0 {
            return Ok((at, len));
        }
        at += len;
    }
    Err(untrusted(format!("the {what} record has no attribute 0x{kind:x}")))
}

/// Decodes non-resident data runs: (first VCN, LCN or None when sparse, clusters).
fn data_runs(runs: &[u8], clusters: u64) -> Result<Vec<(u64, Option<u64>, u64)>, NtfsError> {
    let bad = |why: &str| untrusted(format!("the data runs of $Bitmap are damaged: {why}"));
    let (mut out, mut at, mut vcn, mut lcn) = (Vec::new(), 0usize, 0u64, 0i64);
    while let Some(&head) = runs.get(at) {
        if head == 0 {
            return Ok(out);
        }
        let (len_bytes, ofs_bytes) = (usize::from(head & 0x0F), usize::from(head >> 4));
        if len_bytes == 0 || len_bytes > 8 || ofs_bytes > 8 || out.len() > 4096 {
            return Err(bad("a run header is out of range"));
        }
        let field = runs.get(at + 1..at + 1 + len_bytes + ofs_bytes).ok_or_else(|| bad("a run is cut short"))?;
        let mut length = 0u64;
        for (i, b) in field[..len_bytes].iter().enumerate() {
            length |= u64::from(*b) << (8 * i);
        }
        let start = if ofs_bytes == 0 {
            None
        } else {
            let mut delta = 0i64;
            for (i, b) in field[len_bytes..].iter().enumerate() {
                delta |= i64::from(*b) << (8 * i);
            }
            let shift = 64 - 8 * ofs_bytes as u32;
            if shift < 64 {
                delta = (delta << shift) >> shift;
            }
            lcn = lcn.checked_add(delta).ok_or_else(|| bad("a run's cluster is out of range"))?;
            let first = u64::try_from(lcn).map_err(|_| bad("a run starts before the volume"))?;
            if first.checked_add(length).is_none_or(|end| end > clusters) {
                return Err(bad("a run ends past the volume"));
            }
            Some(first)
        };
        out.push((vcn, start, length));
        vcn = vcn.checked_add(length).ok_or_else(|| bad("runs longer than the volume"))?;
        at += 1 + len_bytes + ofs_bytes;
    }
    Err(bad("no end marker"))
}

impl NtfsVolume {
    /// Reads and checks the NTFS volume at `start` of `disk`, at most `size`
    /// bytes long. `Err(NotNtfs)`: no NTFS boot sector there.
    pub fn open(disk: &dyn Disk, start: u64, size: u64) -> Result<NtfsVolume, NtfsError> {
        if size < 8192 {
            return Err(NtfsError::NotNtfs);
        }
        let boot = read(disk, start, 512)?;
        if &boot[3..11] != b"NTFS    " || boot[510..512] != [0x55, 0xAA] {
            return Err(NtfsError::NotNtfs);
        }
        let sector = u64::from(u16_at(&boot, 0x0B).unwrap_or(0));
        if !(256..=4096).contains(&sector) || !sector.is_power_of_two() {
            return Err(untrusted(format!("its sector size {sector} is out of range")));
        }
        let spc = boot[0x0D];
        let cluster_bytes = if spc <= 0x80 { sector * u64::from(spc) } else { sector << (256 - u32::from(spc)).min(31) };
        if cluster_bytes == 0 || !cluster_bytes.is_power_of_two() || cluster_bytes > 2 << 20 {
            return Err(untrusted(format!("its cluster size {cluster_bytes} is out of range")));
        }
        let total = u64_at(&boot, 0x28).unwrap_or(0).saturating_mul(sector);
        if total == 0 || total > size {
            return Err(untrusted(format!("it says {total} bytes, its place holds {size}")));
        }
        let clusters = total / cluster_bytes;
        let per_record = boot[0x40] as i8;
        let record_bytes: u64 = if per_record > 0 { u64::from(per_record as u8) * cluster_bytes } else { 1u64 << (-i32::from(per_record)).clamp(0, 20) };
        if !(512..=65536).contains(&record_bytes) {
            return Err(untrusted(format!("its MFT record size {record_bytes} is out of range")));
        }
        let mft = u64_at(&boot, 0x30).unwrap_or(u64::MAX);
        if mft >= clusters {
            return Err(untrusted("its MFT starts past its end"));
        }
        let record = |n: u64, what: &str| -> Result<Vec<u8>, NtfsError> {
            // The first records of the MFT are contiguous from its start.
            let mut r = read(disk, start + mft * cluster_bytes + n * record_bytes, record_bytes as usize)?;
            if &r[0..4] != b"FILE" {
                return Err(untrusted(format!("the {what} record is not a FILE record")));
            }
            fixup(&mut r, what)?;
            Ok(r)
        };

        // $Volume: no dirty flag.
        let vol = record(MFT_VOLUME, "$Volume")?;
        let (at, _) = attribute(&vol, ATTR_VOLUME_INFORMATION, "$Volume")?;
        let value = at + usize::from(u16_at(&vol, at + 0x14).unwrap_or(0));
        let flags = u16_at(&vol, value + 0x0A).ok_or_else(|| untrusted("the volume information is cut short"))?;
        if flags & VOLUME_IS_DIRTY != 0 {
            return Err(untrusted("the volume is marked dirty (run chkdsk)"));
        }

        // $LogFile: empty, or its restart areas say the volume is clean.
        let log = record(MFT_LOGFILE, "$LogFile")?;
        let (at, _) = attribute(&log, ATTR_DATA, "$LogFile")?;
        if log[at + 8] == 0 {
            return Err(untrusted("$LogFile's data is resident"));
        }
        let runs_at = at + usize::from(u16_at(&log, at + 0x20).unwrap_or(0));
        let log_runs = data_runs(log.get(runs_at..).unwrap_or_default(), clusters)?;
        let Some(&(_, Some(first), _)) = log_runs.first() else { return Err(untrusted("$LogFile has no data")) };
        let page = read(disk, start + first * cluster_bytes, 8192.min(log_runs[0].2 * cluster_bytes) as usize)?;
        check_log(&page)?;

        // $Bitmap: its data runs.
        let bm = record(MFT_BITMAP, "$Bitmap")?;
        let (at, _) = attribute(&bm, ATTR_DATA, "$Bitmap")?;
        if bm[at + 8] == 0 {
            return Err(untrusted("$Bitmap's data is resident"));
        }
        if u16_at(&bm, at + 0x0C).unwrap_or(0) & 0xC001 != 0 {
            return Err(untrusted("$Bitmap is compressed, encrypted or sparse"));
        }
        if u64_at(&bm, at + 0x10) != Some(0) {
            return Err(untrusted("$Bitmap's data starts in another record"));
        }
        let runs_at = at + usize::from(u16_at(&bm, at + 0x20).unwrap_or(0));
        let bitmap_runs = data_runs(bm.get(runs_at..).unwrap_or_default(), clusters)?;
        let bitmap_bytes = u64_at(&bm, at + 0x38).unwrap_or(0);
        let mapped: u64 = bitmap_runs.iter().map(|r| r.2).sum::<u64>().saturating_mul(cluster_bytes);
        if bitmap_bytes < clusters.div_ceil(8) || bitmap_bytes > mapped {
            return Err(untrusted(format!("$Bitmap holds {bitmap_bytes} bytes for {clusters} clusters")));
        }
        Ok(NtfsVolume { start, cluster_bytes, clusters, bitmap_runs, bitmap_bytes })
    }

    /// Bytes per cluster.
    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_bytes
    }

    /// Clusters of the volume.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// The bitmap's bytes `[offset, offset + len)` (bit `i` of byte `j`:
    /// cluster `8 * (offset + j) + i` in use), read through its data runs.
    /// Past its initialized bytes it reads zeros; a sparse run is an error
    /// (a bitmap with holes is not one this reader trusts).
    pub fn bitmap(&self, disk: &dyn Disk, offset: u64, len: usize) -> Result<Vec<u8>, NtfsError> {
        let mut out = vec![0u8; len];
        let end = (offset + len as u64).min(self.bitmap_bytes);
        let mut at = offset;
        while at < end {
            let vcn = at / self.cluster_bytes;
            let &(first_vcn, lcn, run_len) = self.bitmap_runs.iter().find(|r| r.0 <= vcn && vcn < r.0 + r.2).ok_or_else(|| untrusted("$Bitmap's runs do not cover it"))?;
            let lcn = lcn.ok_or_else(|| untrusted("$Bitmap has a sparse run"))?;
            let run_end = ((first_vcn + run_len) * self.cluster_bytes).min(end);
            let disk_at = self.start + (lcn + vcn - first_vcn) * self.cluster_bytes + at % self.cluster_bytes;
            let n = (run_end - at) as usize;
            let dst = (at - offset) as usize;
            disk.read_exact_at(&mut out[dst..dst + n], disk_at).map_err(|source| NtfsError::Io { offset: disk_at, source })?;
            at += n as u64;
        }
        Ok(out)
    }
}

/// Checks the first page(s) of `$LogFile`: empty (all 0xFF, as formatting
/// and a clean unmount by ntfs-3g leave it) or restart pages saying clean.
fn check_log(page: &[u8]) -> Result<(), NtfsError> {
    if page.iter().take(4096).all(|&b| b == 0xFF) {
        return Ok(());
    }
    let mut seen = 0;
    for half in page.chunks(4096).take(2) {
        if &half[0..4] != b"RSTR" {
            continue;
        }
        let mut rp = half.to_vec();
        fixup(&mut rp, "$LogFile restart")?;
        let area = usize::from(u16_at(&rp, 0x18).unwrap_or(0));
        let (clients, flags) = (u16_at(&rp, area + 0x0C), u16_at(&rp, area + 0x0E));
        match (clients, flags) {
            (Some(c), Some(f)) if c == LOGFILE_NO_CLIENT || f & RESTART_VOLUME_IS_CLEAN != 0 => seen += 1,
            (Some(_), Some(_)) => return Err(untrusted("its $LogFile holds changes to replay (mounted, or not shut down cleanly)")),
            _ => return Err(untrusted("its $LogFile restart area is cut short")),
        }
    }
    if seen == 0 {
        return Err(untrusted("its $LogFile has no valid restart page"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_runs_decode_signed_deltas_sparse_runs_and_refuse_damage() {
        // 0x21: 1 length byte, 2 offset bytes. Run 1: 0x18 clusters at 0x5634;
        // run 2: sparse 0x10; run 3: 8 clusters at 0x5634 - 0x34 (negative delta).
        let runs = [0x21, 0x18, 0x34, 0x56, 0x01, 0x10, 0x21, 0x08, 0xCC, 0xFF, 0x00];
        let got = data_runs(&runs, 1 << 20).unwrap();
        assert_eq!(got, vec![(0, Some(0x5634), 0x18), (0x18, None, 0x10), (0x28, Some(0x5600), 8)]);
        assert!(data_runs(&runs[..5], 1 << 20).is_err(), "no end marker");
        assert!(data_runs(&runs, 0x5640).is_err(), "a run past the volume");
        assert!(data_runs(&[0x21, 0x08, 0x00, 0x80, 0x00], 1 << 20).is_err(), "a run before the volume");
    }

    #[test]
    fn fixups_are_applied_and_a_torn_record_refused() {
        let mut r = vec![0u8; 1024];
        r[4..6].copy_from_slice(&0x30u16.to_le_bytes());
        r[6..8].copy_from_slice(&3u16.to_le_bytes());
        r[0x30..0x36].copy_from_slice(&[0xAB, 0xCD, 1, 2, 3, 4]);
        r[510..512].copy_from_slice(&[0xAB, 0xCD]);
        r[1022..1024].copy_from_slice(&[0xAB, 0xCD]);
        let mut good = r.clone();
        fixup(&mut good, "test").unwrap();
        assert_eq!((&good[510..512], &good[1022..1024]), (&[1u8, 2][..], &[3u8, 4][..]));
        r[1023] = 0;
        assert!(fixup(&mut r, "test").is_err());
    }

    /// A volume file read as the disk.
    struct Image(Vec<u8>);

    impl Disk for Image {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let at = usize::try_from(offset).map_err(std::io::Error::other)?;
            let src = self.0.get(at..at + buf.len()).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn run(cmd: &mut std::process::Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps installs ntfs-3g)"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A 32 MiB NTFS made over a nonzero pattern, with two files in it.
    fn ntfs_image(dir: &std::path::Path) -> std::path::PathBuf {
        let image = dir.join("ntfs.img");
        let pattern: Vec<u8> = (0..32u32 << 20).map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) as u8) | 1).collect();
        std::fs::write(&image, pattern).unwrap();
        run(std::process::Command::new("mkntfs").args(["-F", "-Q", "-q", "-c", "4096"]).arg(&image));
        for (name, len) in [("a.bin", 3 << 20), ("b.bin", 5 << 20)] {
            let src = dir.join(name);
            std::fs::write(&src, vec![name.as_bytes()[0]; len]).unwrap();
            run(std::process::Command::new("ntfscp").arg(&image).arg(&src).arg(format!("/{name}")));
        }
        image
    }

    fn is_free(v: &NtfsVolume, disk: &dyn Disk, cluster: u64) -> bool {
        let bits = v.bitmap(disk, cluster / 8, 1).unwrap();
        bits[0] & (1 << (cluster % 8)) == 0
    }

    #[test]
    fn free_clusters_are_the_ones_ntfswipe_wipes() {
        let dir = tempfile::tempdir().unwrap();
        let image = ntfs_image(dir.path());
        let before = std::fs::read(&image).unwrap();
        let v = NtfsVolume::open(&Image(before.clone()), 0, before.len() as u64).unwrap();
        assert_eq!(v.cluster_bytes(), 4096);
        run(std::process::Command::new("ntfswipe").args(["-u", "-b", "0", "-f", "-q"]).arg(&image));
        let wiped = std::fs::read(&image).unwrap();
        let disk = Image(before.clone());
        let (mut free, mut differ) = (0, Vec::new());
        for c in 0..v.clusters() {
            let r = (c * 4096) as usize..((c + 1) * 4096) as usize;
            let was_wiped = before[r.clone()] != wiped[r];
            if is_free(&v, &disk, c) {
                free += 1;
            }
            if is_free(&v, &disk, c) != was_wiped {
                differ.push(c);
            }
        }
        assert!(free > 1000, "most of the volume is free: {free}");
        assert!(differ.is_empty(), "clusters where the bitmap and ntfswipe disagree: {:?}", &differ[..differ.len().min(10)]);
    }

    /// The MFT record `n` of `image` (offset of its first byte).
    fn record_at(image: &[u8], n: u64) -> usize {
        let mft = u64_at(image, 0x30).unwrap();
        (mft * 4096 + n * 1024) as usize
    }

    #[test]
    fn a_dirty_volume_or_a_log_with_changes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = std::fs::read(ntfs_image(dir.path())).unwrap();
        // $Volume's flags: the dirty bit set.
        let mut dirty = image.clone();
        let at = record_at(&dirty, MFT_VOLUME);
        let mut rec = dirty[at..at + 1024].to_vec();
        fixup(&mut rec, "$Volume").unwrap();
        let (attr, _) = attribute(&rec, ATTR_VOLUME_INFORMATION, "$Volume").unwrap();
        let flags = at + attr + usize::from(u16_at(&rec, attr + 0x14).unwrap()) + 0x0A;
        assert!(flags % 512 < 510, "the flags are not under a fixup");
        dirty[flags] |= VOLUME_IS_DIRTY as u8;
        let e = NtfsVolume::open(&Image(dirty.clone()), 0, dirty.len() as u64).unwrap_err().to_string();
        assert!(e.contains("marked dirty"), "{e}");
        // $LogFile: a restart page with a client in use and no clean flag.
        let at = record_at(&image, MFT_LOGFILE);
        let mut rec = image[at..at + 1024].to_vec();
        fixup(&mut rec, "$LogFile").unwrap();
        let (attr, _) = attribute(&rec, ATTR_DATA, "$LogFile").unwrap();
        let runs = data_runs(&rec[attr + usize::from(u16_at(&rec, attr + 0x20).unwrap())..], 1 << 20).unwrap();
        let log = (runs[0].1.unwrap() * 4096) as usize;
        for (clean, want) in [(false, Some("changes to replay")), (true, None)] {
            let mut page = vec![0u8; 4096];
            page[0..4].copy_from_slice(b"RSTR");
            page[4..6].copy_from_slice(&0x1Eu16.to_le_bytes());
            page[6..8].copy_from_slice(&9u16.to_le_bytes());
            page[0x18..0x1A].copy_from_slice(&0x40u16.to_le_bytes());
            page[0x1E..0x20].copy_from_slice(&7u16.to_le_bytes());
            page[0x40 + 0x0C..0x40 + 0x0E].copy_from_slice(&0u16.to_le_bytes());
            page[0x40 + 0x0E..0x40 + 0x10].copy_from_slice(&(if clean { RESTART_VOLUME_IS_CLEAN } else { 0 }).to_le_bytes());
            for i in 1..9 {
                let end = i * 512;
                let (a, b) = (page[end - 2], page[end - 1]);
                page[0x1E + 2 * i] = a;
                page[0x1E + 2 * i + 1] = b;
                page[end - 2..end].copy_from_slice(&7u16.to_le_bytes());
            }
            let mut logged = image.clone();
            logged[log..log + 4096].copy_from_slice(&page);
            let got = NtfsVolume::open(&Image(logged.clone()), 0, logged.len() as u64);
            match want {
                Some(w) => assert!(got.unwrap_err().to_string().contains(w)),
                None => assert!(got.is_ok(), "a clean restart area is trusted"),
            }
        }
        // Any bytes: no panic (the boot sector and the first MFT records overwritten at seeded places).
        let mut disk = Image(image.clone());
        let len = image.len() as u64;
        for seed in 0..500u64 {
            let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut touched = Vec::new();
            for _ in 0..1 + seed % 6 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let at = (s % (64 << 10)) as usize;
                touched.push(at);
                disk.0[at] = (s >> 40) as u8;
            }
            if let Ok(v) = NtfsVolume::open(&disk, 0, len) {
                let _ = v.bitmap(&disk, 0, 4096);
            }
            for at in touched {
                disk.0[at] = image[at];
            }
        }
    }
}
