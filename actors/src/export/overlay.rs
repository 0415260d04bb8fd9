//! The copy-on-write overlay of an export: every write a client makes to an
//! exported recovery point lands here, never in the RP.
//!
//! # File format (version 1)
//!
//! ```text
//! 0       4096-byte header (little-endian):
//!           0   8  magic "DRMOVL\0\x01"
//!           8   2  format version (1)
//!          10   2  reserved (0)
//!          12   4  page size in bytes (4096)
//!          16   8  volume size in bytes
//!          24   8  RP sequence number
//!          32  32  RP Merkle root
//!          64   2  length of the volume name (at most 255)
//!          66 255  volume name (UTF-8), zero padded
//!         321   8  offset of the data area
//!         329   8  offset of the page map
//!         337  16  blake3 of bytes 0..337 (first 16 bytes)
//!         353      zero padding to 4096
//! data    the volume's bytes at their own offsets (sparse: only written pages take space)
//! map     one bit per page (set: the page is in the overlay), then blake3 of the map (32 bytes)
//! ```
//!
//! # Durability
//!
//! Written pages are kept in memory in the page map and the map is written on
//! [`Overlay::flush`] (an NBD flush, a FUA write, or the end of the export):
//! data first (fsync), then the map and its checksum (fsync). A crash between
//! flushes loses the writes since the last flush, as a disk's volatile cache
//! would; it never exposes a page whose data was not durable. An overlay is
//! reopened only for the RP it was made for (volume, seq and Merkle root are
//! checked); a damaged header or map is an error that names the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{fallocate, FallocateFlags};

use crate::store::RpMeta;

/// Bytes of one overlay page: the unit of copy-on-write.
pub const PAGE_BYTES: u64 = 4096;
const MAGIC: [u8; 8] = *b"DRMOVL\0\x01";
const VERSION: u16 = 1;
const HEADER_BYTES: u64 = 4096;
const FIELDS_END: usize = 337;
const MAX_NAME_BYTES: usize = 255;
/// The data area starts at 1 MiB, so its offsets keep any alignment up to that.
const DATA_OFFSET: u64 = 1 << 20;
const _: () = assert!(FIELDS_END + 16 <= HEADER_BYTES as usize);

/// Why an overlay could not be made, opened or written. Unless it says
/// otherwise, the overlay file is as it was before the call.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file-system operation failed.
    #[error("overlay {path}: {op}: {source}")]
    Io {
        /// The overlay file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The file is not an overlay, or not one of this RP, or is damaged.
    #[error("overlay {path}: {cause}")]
    Invalid {
        /// The overlay file.
        path: PathBuf,
        /// What is wrong, and what to do.
        cause: String,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> OverlayError + 'a {
    move |source| OverlayError::Io { path: path.to_path_buf(), op, source }
}

/// An overlay file open for reading and writing. `Send + Sync`.
pub struct Overlay {
    path: PathBuf,
    temporary: bool,
    file: File,
    volume_bytes: u64,
    map_offset: u64,
    /// One bit per page; the bool says whether it changed since the last flush.
    map: Mutex<(Vec<u8>, bool)>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("path", &self.path).field("volume_bytes", &self.volume_bytes).finish()
    }
}

fn header(meta: &RpMeta) -> Result<[u8; HEADER_BYTES as usize], String> {
    let name = meta.volume.as_bytes();
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("volume name of {} bytes is longer than {MAX_NAME_BYTES}", name.len()));
    }
    let mut h = [0u8; HEADER_BYTES as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(PAGE_BYTES as u32).to_le_bytes());
    h[16..24].copy_from_slice(&meta.volume_bytes.to_le_bytes());
    h[24..32].copy_from_slice(&meta.seq.0.to_le_bytes());
    h[32..64].copy_from_slice(&meta.merkle_root.0);
    h[64..66].copy_from_slice(&(name.len() as u16).to_le_bytes());
    h[66..66 + name.len()].copy_from_slice(name);
    h[321..329].copy_from_slice(&DATA_OFFSET.to_le_bytes());
    h[329..337].copy_from_slice(&map_offset(meta.volume_bytes).to_le_bytes());
    let check = blake3::hash(&h[..FIELDS_END]);
    h[FIELDS_END..FIELDS_END + 16].copy_from_slice(&check.as_bytes()[..16]);
    Ok(h)
}

fn pages(volume_bytes: u64) -> u64 {
    volume_bytes.div_ceil(PAGE_BYTES)
}

fn map_offset(volume_bytes: u64) -> u64 {
    (DATA_OFFSET + volume_bytes).next_multiple_of(PAGE_BYTES)
}

impl Overlay {
    /// Makes a new overlay for `meta`: at `path` (created exclusively, never
    /// through a symlink, mode 0600), or, when `path` is None, as an unnamed
    /// temporary file in `temp_dir` that vanishes when the export ends.
    pub fn create(path: Option<&Path>, temp_dir: &Path, meta: &RpMeta) -> Result<Overlay, OverlayError> {
        let (file, shown) = match path {
            Some(p) => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(p)
                    .map_err(io_err(p, "create"))?,
                p.to_path_buf(),
            ),
            None => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .mode(0o600)
                    .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                    .open(temp_dir)
                    .map_err(io_err(temp_dir, "create a temporary overlay in"))?,
                temp_dir.to_path_buf(),
            ),
        };
        let temporary = path.is_none();
        let h = header(meta).map_err(|cause| OverlayError::Invalid { path: shown.clone(), cause })?;
        file.write_all_at(&h, 0).map_err(io_err(&shown, "write header"))?;
        let map = vec![0u8; pages(meta.volume_bytes).div_ceil(8) as usize];
        let overlay = Overlay { path: shown, temporary, file, volume_bytes: meta.volume_bytes, map_offset: map_offset(meta.volume_bytes), map: Mutex::new((map, true)) };
        overlay.flush()?;
        Ok(overlay)
    }

    /// Reopens the overlay at `path`, which must have been made for `meta`'s RP.
    pub fn open(path: &Path, meta: &RpMeta) -> Result<Overlay, OverlayError> {
        let invalid = |cause: String| OverlayError::Invalid { path: path.to_path_buf(), cause };
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(io_err(path, "open"))?;
        if !file.metadata().map_err(io_err(path, "look at"))?.is_file() {
            return Err(invalid("not a regular file; an overlay is a file (give a new path to make one)".into()));
        }
        let mut h = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut h, 0).map_err(|_| invalid("too short to be an overlay".into()))?;
        if h[0..8] != MAGIC {
            return Err(invalid("not a drmesh overlay (bad magic)".into()));
        }
        if u16::from_le_bytes([h[8], h[9]]) != VERSION {
            return Err(invalid("written by another overlay format version".into()));
        }
        if blake3::hash(&h[..FIELDS_END]).as_bytes()[..16] != h[FIELDS_END..FIELDS_END + 16] {
            return Err(invalid("header checksum mismatch: the file is damaged".into()));
        }
        let expected = header(meta).map_err(invalid)?;
        if h[..FIELDS_END] != expected[..FIELDS_END] {
            let name_len = usize::from(u16::from_le_bytes([h[64], h[65]])).min(MAX_NAME_BYTES);
            let name = String::from_utf8_lossy(&h[66..66 + name_len]);
            let seq = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
            return Err(invalid(format!("it belongs to {name}@{seq}, not to {} (or to another RP of that number); use another --overlay path", meta.name())));
        }
        let map_len = pages(meta.volume_bytes).div_ceil(8) as usize;
        let mut map = vec![0u8; map_len + 32];
        let map_offset = map_offset(meta.volume_bytes);
        file.read_exact_at(&mut map, map_offset).map_err(|_| invalid("its page map is missing (truncated file)".into()))?;
        if blake3::hash(&map[..map_len]).as_bytes()[..] != map[map_len..] {
            return Err(invalid("page map checksum mismatch: the file is damaged".into()));
        }
        map.truncate(map_len);
        Ok(Overlay { path: path.to_path_buf(), temporary: false, file, volume_bytes: meta.volume_bytes, map_offset, map: Mutex::new((map, false)) })
    }

    /// The overlay file, or for a temporary one the folder it is (unnamed) in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is an unnamed temporary overlay (gone when closed).
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<u8>, bool)> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether page `page` is in the overlay.
    pub fn has_page(&self, page: u64) -> bool {
        let map = self.lock();
        map.0.get((page / 8) as usize).is_some_and(|b| b & (1 << (page % 8)) != 0)
    }

    /// Whether any page of `offset .. offset + len` is in the overlay.
    pub fn has_any(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let map = self.lock();
        (offset / PAGE_BYTES..(offset + len).div_ceil(PAGE_BYTES)).any(|p| map.0.get((p / 8) as usize).is_some_and(|b| b & (1 << (p % 8)) != 0))
    }

    /// Reads `buf.len()` bytes at `offset` of the volume from the overlay's data
    /// (the caller knows these pages are in the overlay).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), OverlayError> {
        self.file.read_exact_at(buf, DATA_OFFSET + offset).map_err(io_err(&self.path, "read"))
    }

    /// Writes `data` at `offset` of the volume and marks every page it touches as
    /// in the overlay. A page it covers only partly must already be in the
    /// overlay (its other bytes are taken from there from now on): the caller
    /// completes such pages first.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), OverlayError> {
        self.check_range(offset, data.len() as u64)?;
        self.file.write_all_at(data, DATA_OFFSET + offset).map_err(io_err(&self.path, "write"))?;
        self.mark(offset, data.len() as u64);
        Ok(())
    }

    /// Makes whole pages `offset .. offset + len` read as zeros in the overlay
    /// (the space is freed where the filesystem can punch holes).
    pub fn zero_pages(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        self.check_range(offset, len)?;
        let punched = fallocate(&self.file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, (DATA_OFFSET + offset) as i64, len as i64);
        if punched.is_err() {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], DATA_OFFSET + at).map_err(io_err(&self.path, "write zeros"))?;
                at += n as u64;
            }
        }
        self.mark(offset, len);
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        if offset.checked_add(len).is_none_or(|end| end > self.volume_bytes) {
            return Err(OverlayError::Invalid { path: self.path.clone(), cause: format!("write of {len} bytes at {offset} beyond the volume's {} bytes", self.volume_bytes) });
        }
        Ok(())
    }

    fn mark(&self, offset: u64, len: u64) {
        let mut map = self.lock();
        for p in offset / PAGE_BYTES..(offset + len).div_ceil(PAGE_BYTES) {
            if let Some(b) = map.0.get_mut((p / 8) as usize) {
                *b |= 1 << (p % 8);
            }
        }
        map.1 = true;
    }

    /// Makes every write so far durable: data, then the page map and its checksum.
    pub fn flush(&self) -> Result<(), OverlayError> {
        self.file.sync_data().map_err(io_err(&self.path, "sync data"))?;
        let (bytes, dirty) = {
            let map = self.lock();
            if !map.1 {
                return Ok(());
            }
            let mut bytes = map.0.clone();
            bytes.extend_from_slice(blake3::hash(&map.0).as_bytes());
            (bytes, map.1)
        };
        if dirty {
            self.file.write_all_at(&bytes, self.map_offset).map_err(io_err(&self.path, "write page map"))?;
            self.file.sync_data().map_err(io_err(&self.path, "sync page map"))?;
            self.lock().1 = false;
        }
        Ok(())
    }

    /// Pages in the overlay.
    pub fn page_count(&self) -> u64 {
        self.lock().0.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RpSeq;

    fn meta(volume_bytes: u64) -> RpMeta {
        RpMeta {
            volume: crate::store::VolumeName::from_static("web"),
            seq: RpSeq(7),
            time_unix_ms: 0,
            source_node: "a".into(),
            volume_bytes,
            block_bytes: 1 << 20,
            block_count: volume_bytes.div_ceil(1 << 20),
            changed_blocks: 0,
            bytes_stored: 0,
            merkle_root: crate::content::MerkleRoot([3; 32]),
            encrypted: false,
            consistency: "crash".into(),
            group: None,
        }
    }

    #[test]
    fn pages_survive_a_flush_and_reopen_and_belong_to_their_rp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.overlay");
        let m = meta(10 << 20);
        let o = Overlay::create(Some(&path), dir.path(), &m).unwrap();
        o.write_at(&[7u8; 8192], 4096).unwrap();
        o.zero_pages(1 << 20, 4096).unwrap();
        assert!(o.has_page(1) && o.has_page(2) && !o.has_page(0) && !o.has_page(3));
        assert!(o.has_any(0, 4097) && !o.has_any(0, 4096));
        o.flush().unwrap();
        drop(o);
        let o = Overlay::open(&path, &m).unwrap();
        assert_eq!(o.page_count(), 3);
        let mut buf = [0u8; 8192];
        o.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        // Another RP's overlay is refused, and so is a damaged one.
        let mut other = m.clone();
        other.seq = RpSeq(8);
        assert!(Overlay::open(&path, &other).unwrap_err().to_string().contains("belongs to web@7"));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], map_offset(m.volume_bytes)).unwrap();
        assert!(Overlay::open(&path, &m).unwrap_err().to_string().contains("page map checksum"));
        // An existing file is never reused by create, nor a symlink followed.
        assert!(Overlay::create(Some(&path), dir.path(), &m).is_err());
        let link = dir.path().join("link.overlay");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(Overlay::create(Some(&link), dir.path(), &m).is_err());
        assert!(!dir.path().join("target").exists());
    }

    #[test]
    fn writes_beyond_the_volume_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::create(None, dir.path(), &meta(1 << 20)).unwrap();
        assert!(o.write_at(&[1u8; 4096], 1 << 20).is_err());
        assert!(o.zero_pages((1 << 20) - 4096, 8192).is_err());
        assert_eq!(o.page_count(), 0);
    }
}
