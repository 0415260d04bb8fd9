//! RP manifests: one immutable, self-describing, checksummed file per committed
//! recovery point, beside the blobs. Together with the blob files they hold
//! everything the catalog knows about RPs, so the catalog is an index that
//! [`super::Store::rebuild`] can always make again.
//!
//! A manifest lists the RP's block-map changes against its *base*, the RP
//! before it in the store (none for the first RP of a volume: changes against
//! an all-zero volume). These are exactly the catalog's `blocks` entries at the
//! RP's seq, so a catalog rebuilt from manifests has the same block maps.
//! When retention deletes RPs, the next retained RP inherits their changes and
//! gets a new manifest (written under a temp name and renamed over the old one)
//! before the catalog commit; the deleted RPs' manifests go after it.
//!
//! File: `manifests/<volume>/<seq as 20 digits>.rpm`; layout (little-endian),
//! version 1, or version 2 for an RP of a consistency group (flag bit 2 and
//! the group's fields; an RP without a group is still written as version 1):
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `DRMMANI\0` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | flags: bit 0 encrypted, bit 1 has a base, bit 2 has a group (version 2) |
//! | 12 | 4 | block size |
//! | 16 | 8 | seq |
//! | 24 | 8 | base seq (0 when there is none) |
//! | 32 | 8 | snapshot time, unix ms |
//! | 40 | 8 | volume bytes |
//! | 48 | 8 | block count |
//! | 56 | 8 | changed blocks (as the source counted them) |
//! | 64 | 8 | bytes stored by this RP |
//! | 72 | 32 | Merkle root of the whole block map |
//! | 104 | 8 | number of changes `n` |
//! | 112 | 2+v | volume name (u16 length, UTF-8) |
//! | | 2+s | source node (u16 length, UTF-8) |
//! | | 2+c | consistency (u16 length, UTF-8) |
//! | | 2+g | group name (u16 length, UTF-8); only with flag bit 2 (version 2) |
//! | | 1 | group: 1 when its members were held at one instant, else 0; only with flag bit 2 |
//! | | 2 | group: member count `k` (1 to 1024); only with flag bit 2 |
//! | | k·(2+m) | group: member volume names (u16 length, UTF-8); only with flag bit 2 |
//! | | 40·n | changes: block index (u64), content id (32), indexes strictly ascending and below the block count |
//! | | 32 | blake3 of every byte before it |
//!
//! A reader checks every field and the trailing checksum; a file that is short,
//! long, or changed in any byte is refused with what is wrong, never half-read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{io_error, StoreError};
use super::{RpMeta, RpSeq, VolumeName};
use crate::content::ContentId;

/// Magic at the start of every manifest.
pub const MAGIC: [u8; 8] = *b"DRMMANI\0";
/// Format version of a manifest without a group.
pub const VERSION: u16 = 1;
/// Format version of a manifest of a consistency group's RP.
pub const VERSION_GROUP: u16 = 2;
/// Most members a group in a manifest has.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// File name suffix.
pub const SUFFIX: &str = ".rpm";
/// Prefix of temp file names (hidden; never a manifest name).
const TEMP_PREFIX: &str = ".tmp-";
const FLAG_ENCRYPTED: u16 = 1;
const FLAG_HAS_BASE: u16 = 2;
const FLAG_GROUP: u16 = 4;
const FIXED_BYTES: usize = 112;
const CHANGE_BYTES: usize = 40;
/// Longest name or label a manifest holds (volume, source node, consistency).
pub const MAX_TEXT_BYTES: usize = 1024;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One RP as its manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The RP's catalog row fields.
    pub meta: RpMeta,
    /// The RP the changes are against (`None`: against an all-zero volume).
    pub base_seq: Option<RpSeq>,
    /// Block-map changes against the base: (block index, content), ascending
    /// unique indexes, ZERO meaning the block is zero.
    pub changes: Vec<(u64, ContentId)>,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid manifest.
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(what: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError::Invalid(what.into()))
}

/// The folder of `volume`'s manifests under `manifests_dir`.
pub fn volume_dir(manifests_dir: &Path, volume: &str) -> PathBuf {
    manifests_dir.join(volume)
}

/// The path of `volume@seq`'s manifest under `manifests_dir`.
pub fn path(manifests_dir: &Path, volume: &str, seq: RpSeq) -> PathBuf {
    volume_dir(manifests_dir, volume).join(format!("{seq:020}{SUFFIX}"))
}

/// The seq a manifest file name stands for (`None` for any other name).
pub fn seq_of_name(name: &str) -> Option<RpSeq> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(RpSeq)
}

/// Hashes everything written through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_text(w: &mut impl Write, s: &str) -> io::Result<()> {
    let len = u16::try_from(s.len()).ok().filter(|l| usize::from(*l) <= MAX_TEXT_BYTES);
    let Some(len) = len else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("text of {} bytes is longer than {MAX_TEXT_BYTES}", s.len())));
    };
    w.write_all(&len.to_le_bytes())?;
    w.write_all(s.as_bytes())
}

impl Manifest {
    /// Writes the encoding to `w` (streamed: memory does not grow with the changes).
    pub fn encode_to(&self, w: impl Write) -> io::Result<()> {
        let m = &self.meta;
        let mut w = Hashing { inner: w, hasher: blake3::Hasher::new() };
        let mut flags = 0u16;
        if m.encrypted {
            flags |= FLAG_ENCRYPTED;
        }
        if self.base_seq.is_some() {
            flags |= FLAG_HAS_BASE;
        }
        if let Some(group) = &m.group {
            flags |= FLAG_GROUP;
            if group.members.is_empty() || group.members.len() > MAX_GROUP_MEMBERS {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a group of {} members (1 to {MAX_GROUP_MEMBERS})", group.members.len())));
            }
        }
        w.write_all(&MAGIC)?;
        w.write_all(&if m.group.is_some() { VERSION_GROUP } else { VERSION }.to_le_bytes())?;
        w.write_all(&flags.to_le_bytes())?;
        w.write_all(&m.block_bytes.to_le_bytes())?;
        for v in [
            m.seq.0,
            self.base_seq.map_or(0, |s| s.0),
            m.time_unix_ms,
            m.volume_bytes,
            m.block_count,
            m.changed_blocks,
            m.bytes_stored,
        ] {
            w.write_all(&v.to_le_bytes())?;
        }
        w.write_all(&m.merkle_root.0)?;
        w.write_all(&(self.changes.len() as u64).to_le_bytes())?;
        for s in [m.volume.as_str(), m.source_node.as_str(), m.consistency.as_str()] {
            write_text(&mut w, s)?;
        }
        if let Some(group) = &m.group {
            write_text(&mut w, &group.name)?;
            w.write_all(&[u8::from(group.one_instant)])?;
            w.write_all(&(group.members.len() as u16).to_le_bytes())?;
            for member in &group.members {
                write_text(&mut w, member)?;
            }
        }
        for (index, content) in &self.changes {
            w.write_all(&index.to_le_bytes())?;
            w.write_all(&content.0)?;
        }
        let sum = *w.hasher.finalize().as_bytes();
        w.inner.write_all(&sum)
    }

    /// The encoding as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_BYTES + 64 + self.changes.len() * CHANGE_BYTES);
        self.encode_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes a manifest from `bytes` (all of them: trailing bytes are an error).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Self::decode_from(bytes)
    }

    /// Decodes a manifest from `r`, reading it to its end. Memory grows only with
    /// the bytes actually read, whatever the counts in the header claim.
    pub fn decode_from(r: impl Read) -> Result<Manifest, ManifestError> {
        let mut r = HashingReader { inner: r, hasher: blake3::Hasher::new() };
        let mut fixed = [0u8; FIXED_BYTES];
        read_exact(&mut r, &mut fixed, "header")?;
        if fixed[0..8] != MAGIC {
            return invalid("not a manifest (bad magic)");
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != VERSION && version != VERSION_GROUP {
            return invalid(format!("format version {version} (this drmesh reads versions {VERSION} and {VERSION_GROUP})"));
        }
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        let known = if version == VERSION_GROUP { FLAG_ENCRYPTED | FLAG_HAS_BASE | FLAG_GROUP } else { FLAG_ENCRYPTED | FLAG_HAS_BASE };
        if flags & !known != 0 {
            return invalid(format!("unknown flags {flags:#06x} for format version {version}"));
        }
        if version == VERSION_GROUP && flags & FLAG_GROUP == 0 {
            return invalid("format version 2 without a group");
        }
        let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
        let block_bytes = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
        let (seq, base, time_unix_ms, volume_bytes) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        let (block_count, changed_blocks, bytes_stored) = (u64_at(48), u64_at(56), u64_at(64));
        let merkle_root = crate::content::MerkleRoot(fixed[72..104].try_into().expect("32 bytes"));
        let count = u64_at(104);
        let base_seq = if flags & FLAG_HAS_BASE != 0 {
            if base >= seq {
                return invalid(format!("base seq {base} is not older than seq {seq}"));
            }
            Some(RpSeq(base))
        } else {
            if base != 0 {
                return invalid("base seq set without the has-base flag");
            }
            None
        };
        if count > block_count {
            return invalid(format!("{count} changes for {block_count} blocks"));
        }
        if block_bytes == 0 {
            return invalid("block size 0");
        }
        let volume = read_text(&mut r, "volume name")?;
        let source_node = read_text(&mut r, "source node")?;
        let consistency = read_text(&mut r, "consistency")?;
        let volume = match VolumeName::new(volume) {
            Ok(volume) => volume,
            Err(e) => return invalid(e.to_string()),
        };
        let group = if flags & FLAG_GROUP != 0 { Some(read_group(&mut r)?) } else { None };
        // Grow with what is read, never with what the header claims.
        let mut changes = Vec::with_capacity(count.min(1 << 16) as usize);
        let mut last: Option<u64> = None;
        for _ in 0..count {
            let mut entry = [0u8; CHANGE_BYTES];
            read_exact(&mut r, &mut entry, "changes")?;
            let index = u64::from_le_bytes(entry[0..8].try_into().expect("8 bytes"));
            if index >= block_count {
                return invalid(format!("change of block {index}, beyond the block count {block_count}"));
            }
            if last.is_some_and(|l| l >= index) {
                return invalid(format!("change of block {index} out of order"));
            }
            last = Some(index);
            changes.push((index, ContentId(entry[8..40].try_into().expect("32 bytes"))));
        }
        let expected = *r.hasher.finalize().as_bytes();
        let mut sum = [0u8; 32];
        read_exact(&mut r.inner, &mut sum, "checksum")?;
        if sum != expected {
            return invalid("checksum mismatch (the file was changed after it was written)");
        }
        let mut extra = [0u8; 1];
        if r.inner.read(&mut extra)? != 0 {
            return invalid("bytes after the checksum");
        }
        Ok(Manifest {
            meta: RpMeta {
                volume,
                seq: RpSeq(seq),
                time_unix_ms,
                source_node,
                volume_bytes,
                block_bytes,
                block_count,
                changed_blocks,
                bytes_stored,
                merkle_root,
                encrypted: flags & FLAG_ENCRYPTED != 0,
                consistency,
                group,
            },
            base_seq,
            changes,
        })
    }
}

/// The group fields of a version 2 manifest.
fn read_group(r: &mut impl Read) -> Result<super::RpGroup, ManifestError> {
    let name = read_text(r, "group name")?;
    let mut b = [0u8; 3];
    read_exact(r, &mut b, "group")?;
    let one_instant = match b[0] {
        0 => false,
        1 => true,
        other => return invalid(format!("group one-instant flag {other} (0 or 1)")),
    };
    let count = usize::from(u16::from_le_bytes([b[1], b[2]]));
    if count == 0 || count > MAX_GROUP_MEMBERS {
        return invalid(format!("a group of {count} members (1 to {MAX_GROUP_MEMBERS})"));
    }
    let mut members = Vec::with_capacity(count);
    for _ in 0..count {
        match VolumeName::new(read_text(r, "group member")?) {
            Ok(m) => members.push(m),
            Err(e) => return invalid(format!("group member: {e}")),
        }
    }
    Ok(super::RpGroup { name, members, one_instant })
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), ManifestError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => invalid(format!("file ends inside the {what}")),
        Err(e) => Err(e.into()),
    }
}

fn read_text(r: &mut impl Read, what: &str) -> Result<String, ManifestError> {
    let mut len = [0u8; 2];
    read_exact(r, &mut len, what)?;
    let len = usize::from(u16::from_le_bytes(len));
    if len > MAX_TEXT_BYTES {
        return invalid(format!("{what} of {len} bytes (at most {MAX_TEXT_BYTES})"));
    }
    let mut bytes = vec![0u8; len];
    read_exact(r, &mut bytes, what)?;
    String::from_utf8(bytes).or_else(|_| invalid(format!("{what} is not UTF-8")))
}

/// Reads and checks the manifest at `path`.
pub fn read(path: &Path) -> Result<Manifest, StoreError> {
    let corrupt = |cause: String| StoreError::ManifestCorrupt { path: path.to_path_buf(), cause };
    let file = File::open(path).map_err(|e| io_error("open manifest", path, e))?;
    match Manifest::decode_from(BufReader::with_capacity(1 << 16, file)) {
        Ok(m) => {
            let name = path.file_name().and_then(|n| n.to_str()).and_then(seq_of_name);
            if name != Some(m.meta.seq) {
                return Err(corrupt(format!("it describes {} but is named for another seq", m.meta.name())));
            }
            Ok(m)
        }
        Err(ManifestError::Io(e)) => Err(io_error("read manifest", path, e)),
        Err(ManifestError::Invalid(cause)) => Err(corrupt(cause)),
    }
}

/// Writes `manifest` durably under `manifests_dir`: an exclusively created temp
/// file, fsync, rename over any older manifest of the same RP, fsync of the
/// folder. Afterwards the manifest survives a crash; before, the old one (if
/// any) is intact. Returns the file's path.
pub fn write(manifests_dir: &Path, manifest: &Manifest) -> Result<PathBuf, StoreError> {
    // A volume name is one path component (`VolumeName`'s rule).
    let volume = &manifest.meta.volume;
    let dir = volume_dir(manifests_dir, volume);
    fs::create_dir_all(&dir).map_err(|e| io_error("create manifest folder", &dir, e))?;
    let final_path = path(manifests_dir, volume, manifest.meta.seq);
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}-{}",
        manifest.meta.seq,
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&temp)
        .map_err(|e| io_error("create manifest", &temp, e))?;
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 16, file);
        manifest.encode_to(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_error("write manifest", &temp, e));
    }
    if let Err(e) = fs::rename(&temp, &final_path) {
        let _ = fs::remove_file(&temp);
        return Err(io_error("rename manifest", &final_path, e));
    }
    sync_dir(&dir)?;
    Ok(final_path)
}

/// Removes `volume@seq`'s manifest (a missing one is fine); the caller syncs the folder.
pub fn remove(manifests_dir: &Path, volume: &str, seq: RpSeq) -> Result<(), StoreError> {
    let p = path(manifests_dir, volume, seq);
    match fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove manifest", &p, e)),
    }
}

/// Makes the entries of folder `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync manifest folder", dir, e))
}

/// Every manifest file under `manifests_dir`: (volume, seq, path), by volume then seq.
/// Other files are skipped; temp files of interrupted writes are removed when
/// `remove_temp` is set.
pub fn list(manifests_dir: &Path, remove_temp: bool) -> Result<Vec<(VolumeName, RpSeq, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let volumes = match fs::read_dir(manifests_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_error("list manifests", manifests_dir, e)),
    };
    for entry in volumes {
        let entry = entry.map_err(|e| io_error("list manifests", manifests_dir, e))?;
        let Some(volume) = entry.file_name().to_str().and_then(|name| VolumeName::new(name).ok()) else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        for file in fs::read_dir(&dir).map_err(|e| io_error("list manifests", &dir, e))? {
            let file = file.map_err(|e| io_error("list manifests", &dir, e))?;
            let name = file.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = seq_of_name(name) {
                out.push((volume.clone(), seq, file.path()));
            } else if remove_temp && name.starts_with(TEMP_PREFIX) {
                let p = file.path();
                fs::remove_file(&p).map_err(|e| io_error("remove manifest temp file", &p, e))?;
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(changes: usize) -> Manifest {
        Manifest {
            meta: RpMeta {
                volume: crate::store::VolumeName::from_static("db-1"),
                seq: RpSeq(7),
                time_unix_ms: 1_700_000_000_123,
                source_node: "branch-a".into(),
                volume_bytes: 1 << 30,
                block_bytes: 1 << 20,
                block_count: 1024,
                changed_blocks: changes as u64,
                bytes_stored: 12345,
                merkle_root: crate::content::MerkleRoot([9; 32]),
                encrypted: true,
                consistency: "fs-frozen".into(),
                group: None,
            },
            base_seq: Some(RpSeq(5)),
            changes: (0..changes).map(|i| (i as u64 * 3, ContentId([(i % 250) as u8 + 1; 32]))).collect(),
        }
    }

    fn grouped(changes: usize) -> Manifest {
        let mut m = sample(changes);
        m.meta.group = Some(crate::store::RpGroup {
            name: "db-host".into(),
            members: vec![VolumeName::from_static("db-1"), VolumeName::from_static("db-logs")],
            one_instant: true,
        });
        m
    }

    #[test]
    fn a_group_rp_round_trips_as_version_2_and_others_stay_version_1() {
        let m = grouped(3);
        let bytes = m.encode();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), VERSION_GROUP);
        assert_eq!(Manifest::decode(&bytes).expect("decodes"), m);
        assert_eq!(u16::from_le_bytes([sample(3).encode()[8], sample(3).encode()[9]]), VERSION);
        // A version 1 header claiming a group, or version 2 without one, is refused (checksum fixed up).
        let resum = |mut b: Vec<u8>| {
            let n = b.len() - 32;
            let sum = *blake3::hash(&b[..n]).as_bytes();
            b[n..].copy_from_slice(&sum);
            b
        };
        let mut v1 = bytes.clone();
        v1[8..10].copy_from_slice(&VERSION.to_le_bytes());
        assert!(Manifest::decode(&resum(v1)).unwrap_err().to_string().contains("unknown flags"));
        let mut plain = sample(3).encode();
        plain[8..10].copy_from_slice(&VERSION_GROUP.to_le_bytes());
        assert!(Manifest::decode(&resum(plain)).unwrap_err().to_string().contains("without a group"));
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(Manifest::decode(&bad).is_err(), "byte {at}");
        }
        let mut none = grouped(0);
        none.meta.group.as_mut().expect("group").members.clear();
        assert!(none.encode_to(Vec::new()).is_err(), "a group without members is not written");
        // The fuzz seed of a version 2 manifest decodes to the same bytes again.
        let seed = include_bytes!("../../fuzz/corpus/manifest/group-v2.rpm");
        let decoded = Manifest::decode(seed).expect("the seed decodes");
        assert_eq!(decoded.meta.group.as_ref().map(|g| g.name.as_str()), Some("db-host"));
        assert_eq!(decoded.encode(), seed);
    }

    /// Manifests written by a real node (`drmesh demo`) and kept as fuzz seeds:
    /// version 1 files must always decode, to the same bytes again.
    #[test]
    fn manifests_of_a_real_store_still_decode() {
        for (name, bytes) in [
            ("incremental-v1.rpm", &include_bytes!("../../fuzz/corpus/manifest/incremental-v1.rpm")[..]),
            ("incremental-small-v1.rpm", &include_bytes!("../../fuzz/corpus/manifest/incremental-small-v1.rpm")[..]),
        ] {
            let m = Manifest::decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.meta.volume, "branch-server", "{name}");
            assert!(m.base_seq.is_some() && !m.changes.is_empty(), "{name}");
            assert_eq!(m.encode(), bytes, "{name}");
        }
    }

    #[test]
    fn round_trips() {
        for m in [sample(0), sample(1), sample(300), Manifest { base_seq: None, ..sample(2) }] {
            let bytes = m.encode();
            assert_eq!(bytes.len(), FIXED_BYTES + 6 + 4 + 8 + 9 + m.changes.len() * CHANGE_BYTES + 32);
            assert_eq!(Manifest::decode(&bytes).expect("decodes"), m);
        }
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_refused() {
        let bytes = sample(3).encode();
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Manifest::decode(&longer).is_err());
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                assert!(Manifest::decode(&bad).is_err(), "bit {bit} of byte {at}");
            }
        }
    }

    /// Seeded random mutations (overwrites, inserts, cuts) of real manifests:
    /// refused or decoded, never a panic; what decodes encodes to the same bytes.
    #[test]
    fn seeded_mutations_decode_or_fail_cleanly() {
        let mut seed: u64 = 0x6d61_6e69_6665_7374;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let originals = [sample(0).encode(), sample(5).encode(), Manifest { base_seq: None, ..sample(40) }.encode(), grouped(2).encode()];
        for i in 0..6000 {
            let mut bytes = originals[i % originals.len()].clone();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % bytes.len().max(1);
                match next() % 3 {
                    0 if !bytes.is_empty() => bytes[at] = next() as u8,
                    1 => bytes.insert(at.min(bytes.len()), next() as u8),
                    _ => bytes.truncate(at),
                }
            }
            if let Ok(m) = Manifest::decode(&bytes) {
                assert_eq!(m.encode(), bytes);
            }
        }
    }

    #[test]
    fn a_huge_claimed_count_allocates_nothing_up_front() {
        let mut m = sample(0);
        m.meta.block_count = u64::MAX;
        let mut bytes = m.encode();
        bytes[104..112].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("file ends inside the changes"), "{err}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut m = sample(2);
        m.changes.swap(0, 1);
        assert!(Manifest::decode(&m.encode()).unwrap_err().to_string().contains("out of order"));
        let mut m = sample(2);
        m.changes[1].0 = 5000;
        assert!(Manifest::decode(&m.encode()).unwrap_err().to_string().contains("beyond the block count"));
        let mut m = sample(0);
        m.base_seq = Some(RpSeq(7));
        assert!(Manifest::decode(&m.encode()).unwrap_err().to_string().contains("not older"));
        let mut bytes = sample(0).encode();
        let at = bytes.windows(4).position(|w| w == b"db-1").expect("the name is in the manifest");
        bytes[at..at + 4].copy_from_slice(b"../x");
        assert!(Manifest::decode(&bytes).unwrap_err().to_string().contains("bad volume name \"../x\""));
    }

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample(4);
        let p = write(dir.path(), &m).unwrap();
        assert_eq!(p, path(dir.path(), "db-1", RpSeq(7)));
        assert_eq!(read(&p).unwrap(), m);
        // A planted temp file is removed by a listing that cleans; a symlink at a temp name is never followed.
        let vdir = volume_dir(dir.path(), "db-1");
        std::os::unix::fs::symlink("/etc/passwd", vdir.join(".tmp-8-1-1")).unwrap();
        fs::write(vdir.join("notes.txt"), b"x").unwrap();
        assert_eq!(list(dir.path(), true).unwrap(), vec![(VolumeName::from_static("db-1"), RpSeq(7), p.clone())]);
        assert!(!vdir.join(".tmp-8-1-1").exists());
        // A manifest renamed to another seq is refused.
        fs::copy(&p, path(dir.path(), "db-1", RpSeq(8))).unwrap();
        assert!(read(&path(dir.path(), "db-1", RpSeq(8))).unwrap_err().to_string().contains("named for another seq"));
        remove(dir.path(), "db-1", RpSeq(7)).unwrap();
        remove(dir.path(), "db-1", RpSeq(7)).unwrap();
        assert_eq!(list(dir.path(), false).unwrap().len(), 1);
        assert_eq!(seq_of_name("00000000000000000007.rpm"), Some(RpSeq(7)));
        assert_eq!(seq_of_name("7.rpm"), None);
    }
}
