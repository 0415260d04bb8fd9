//! The on-disk blob file: a fixed 256-byte header followed by the opaque payload.
//!
//! Header layout (little-endian), version 1:
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `DRMBLOB\0` |
//! | 8 | 2 | format version (1) |
//! | 10 | 1 | flags ([`BlobFlags`]) |
//! | 11 | 1 | depth (0 = full block) |
//! | 12 | 4 | plain_len (bytes of the block the blob produces) |
//! | 16 | 8 | payload length |
//! | 24 | 32 | blob id |
//! | 56 | 32 | content id |
//! | 88 | 32 | base blob id (zeros for a full block) |
//! | 120 | 32 | blake3 of the payload bytes |
//! | 152 | 16 | blake3 of bytes 0..152 (first 16 bytes), so a damaged header is caught |
//! | 168 | 88 | zero padding |
//!
//! Files live at `blobs/ab/cd/<64 hex>`; temp files are `blobs/ab/cd/.tmp-<hex>-<pid>-<counter>`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{io_error, StoreError};
use super::{BlobFlags, EncodedBlob};
use crate::content::{BlobId, ContentId};

/// Magic at the start of every blob file.
pub const MAGIC: [u8; 8] = *b"DRMBLOB\0";
/// Current format version.
pub const VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 256;
const FIELDS_END: usize = 152;
const HEADER_CHECK_END: usize = FIELDS_END + 16;
// The fields and the header check must fit in the padded header.
const _: () = assert!(HEADER_CHECK_END <= HEADER_BYTES);
const _: () = assert!(HEADER_BYTES == 256);

/// Prefix of temp file names (hidden, never a valid hex id).
pub const TEMP_PREFIX: &str = ".tmp-";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The fan-out path of a blob under `blobs_dir`.
pub fn blob_path(blobs_dir: &Path, id: &BlobId) -> PathBuf {
    let hex = id.to_hex();
    blobs_dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

/// Encodes the header of `blob`.
pub fn encode_header(blob: &EncodedBlob) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = blob.flags.0;
    h[11] = blob.depth;
    h[12..16].copy_from_slice(&blob.plain_len.to_le_bytes());
    h[16..24].copy_from_slice(&(blob.payload.len() as u64).to_le_bytes());
    h[24..56].copy_from_slice(&blob.id.0);
    h[56..88].copy_from_slice(&blob.content.0);
    h[88..120].copy_from_slice(&blob.base.unwrap_or(ContentId::ZERO).0);
    h[120..152].copy_from_slice(blake3::hash(&blob.payload).as_bytes());
    let check = blake3::hash(&h[0..FIELDS_END]);
    h[FIELDS_END..HEADER_CHECK_END].copy_from_slice(&check.as_bytes()[0..16]);
    h
}

fn id_at(h: &[u8; HEADER_BYTES], at: usize) -> ContentId {
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[at..at + 32]);
    ContentId(id)
}

/// The fields of a blob file's header, checked (magic, version, header checksum,
/// file length, id) but with the payload not yet read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The content the blob produces.
    pub content: ContentId,
    /// The blob a delta applies to.
    pub base: Option<BlobId>,
    /// 0 for a full block.
    pub depth: u8,
    /// [`BlobFlags`] bits.
    pub flags: u8,
    /// Length of the block it produces.
    pub plain_len: u32,
    /// Payload bytes after the header.
    pub payload_len: u64,
    /// blake3 of the payload.
    pub payload_sum: [u8; 32],
}

fn open_checked(blobs_dir: &Path, id: &BlobId) -> Result<(File, Header), StoreError> {
    let path = blob_path(blobs_dir, id);
    let corrupt = |cause: String| StoreError::BlobCorrupt {
        blob: id.to_hex(),
        path: path.clone(),
        cause,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::BlobMissing {
                blob: id.to_hex(),
                path,
            });
        }
        Err(e) => return Err(io_error("open blob", &path, e)),
    };
    let meta = file.metadata().map_err(|e| io_error("read blob", &path, e))?;
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    let file_len = meta.len();
    if file_len < HEADER_BYTES as u64 {
        return Err(corrupt(format!("file is {file_len} bytes, shorter than the {HEADER_BYTES}-byte header")));
    }
    let mut h = [0u8; HEADER_BYTES];
    file.read_exact(&mut h).map_err(|e| io_error("read blob", &path, e))?;
    let header = parse_header(&h, file_len, id).map_err(corrupt)?;
    Ok((file, header))
}

/// Decodes and checks a blob file's header: magic, version, header checksum,
/// that the payload length agrees with `file_len`, and that it names blob
/// `id`. The error says which check failed.
pub fn parse_header(h: &[u8; HEADER_BYTES], file_len: u64, id: &BlobId) -> Result<Header, String> {
    if file_len < HEADER_BYTES as u64 {
        return Err(format!("file is {file_len} bytes, shorter than the {HEADER_BYTES}-byte header"));
    }
    if h[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != VERSION {
        return Err(format!("unknown format version {version}"));
    }
    if blake3::hash(&h[0..FIELDS_END]).as_bytes()[0..16] != h[FIELDS_END..HEADER_CHECK_END] {
        return Err("header checksum mismatch".into());
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&h[16..24]);
    let payload_len = u64::from_le_bytes(len8);
    let actual = file_len - HEADER_BYTES as u64;
    if actual != payload_len {
        return Err(format!("payload is {actual} bytes, header says {payload_len}"));
    }
    if id_at(h, 24) != *id {
        return Err(format!("header names blob {}", id_at(h, 24).to_hex()));
    }
    let base = id_at(h, 88);
    let mut payload_sum = [0u8; 32];
    payload_sum.copy_from_slice(&h[120..152]);
    Ok(Header {
        content: id_at(h, 56),
        base: if base.is_zero() { None } else { Some(base) },
        depth: h[11],
        flags: h[10],
        plain_len: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        payload_len,
        payload_sum,
    })
}

/// Reads and checks only the header of blob `id` (one 256-byte read): what
/// `store rebuild` and `store check` learn a blob from.
pub fn read_header(blobs_dir: &Path, id: &BlobId) -> Result<Header, StoreError> {
    open_checked(blobs_dir, id).map(|(_, h)| h)
}

/// Reads and fully verifies the blob file of `id`.
pub fn read(blobs_dir: &Path, id: &BlobId) -> Result<EncodedBlob, StoreError> {
    read_into(blobs_dir, id, Vec::new())
}

/// [`read`], with the payload read into `buffer` (its capacity is reused: a
/// restore reads thousands of blobs without allocating for each).
pub fn read_into(blobs_dir: &Path, id: &BlobId, mut buffer: Vec<u8>) -> Result<EncodedBlob, StoreError> {
    let (mut file, h) = open_checked(blobs_dir, id)?;
    let path = blob_path(blobs_dir, id);
    let corrupt = |cause: &str| StoreError::BlobCorrupt {
        blob: id.to_hex(),
        path: path.clone(),
        cause: cause.into(),
    };
    // The payload into a buffer of exactly its length (no copy).
    buffer.clear();
    buffer.reserve_exact(h.payload_len as usize);
    let read = (&mut file).take(h.payload_len).read_to_end(&mut buffer).map_err(|e| io_error("read blob", &path, e))?;
    if read as u64 != h.payload_len {
        return Err(corrupt("file shrank while being read"));
    }
    if blake3::hash(&buffer).as_bytes()[..] != h.payload_sum {
        return Err(corrupt("payload checksum mismatch"));
    }
    Ok(EncodedBlob {
        id: *id,
        content: h.content,
        flags: BlobFlags(h.flags),
        plain_len: h.plain_len,
        base: h.base,
        depth: h.depth,
        payload: buffer,
    })
}

/// Writes `blob` to a unique temp file in its fan-out folder and renames it into place.
/// Does not fsync: the caller syncs the whole batch once. Returns the bytes written.
pub fn write(blobs_dir: &Path, blob: &EncodedBlob) -> Result<u64, StoreError> {
    let path = blob_path(blobs_dir, &blob.id);
    let dir = path.parent().unwrap_or(blobs_dir);
    fs::create_dir_all(dir).map_err(|e| io_error("create blob folder", dir, e))?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!("{TEMP_PREFIX}{}-{}-{n}", blob.id.to_hex(), std::process::id()));
    let result = (|| {
        // Created exclusively: a file or symlink planted at the temp name is never followed or truncated.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| io_error("create blob temp file", &temp, e))?;
        file.write_all(&encode_header(blob))
            .map_err(|e| io_error("write blob", &temp, e))?;
        file.write_all(&blob.payload)
            .map_err(|e| io_error("write blob", &temp, e))?;
        drop(file);
        fs::rename(&temp, &path).map_err(|e| io_error("rename blob into place", &path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| (HEADER_BYTES + blob.payload.len()) as u64)
}

/// Removes temp files left by writers interrupted by a crash. Returns how many were removed.
pub fn remove_temp_files(blobs_dir: &Path) -> Result<u64, StoreError> {
    let mut removed = 0;
    for_each_file(blobs_dir, &mut |path, name| {
        if name.starts_with(TEMP_PREFIX) {
            fs::remove_file(path).map_err(|e| io_error("remove temp file", path, e))?;
            removed += 1;
        }
        Ok(())
    })?;
    Ok(removed)
}

/// Calls `f(path, file_name)` for every file in the two fan-out levels under `blobs_dir`.
pub fn for_each_file(
    blobs_dir: &Path,
    f: &mut dyn FnMut(&Path, &str) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let read_dir = |dir: &Path| fs::read_dir(dir).map_err(|e| io_error("list blob folder", dir, e));
    for level1 in read_dir(blobs_dir)? {
        let level1 = level1.map_err(|e| io_error("list blob folder", blobs_dir, e))?.path();
        if !level1.is_dir() {
            continue;
        }
        for level2 in read_dir(&level1)? {
            let level2 = level2.map_err(|e| io_error("list blob folder", &level1, e))?.path();
            if !level2.is_dir() {
                continue;
            }
            for entry in read_dir(&level2)? {
                let path = entry.map_err(|e| io_error("list blob folder", &level2, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
                f(&path, &name)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header written by a real node (`drmesh demo`), kept as the fuzz seed
    /// (header, file length, id): version 1 headers must always parse.
    #[test]
    fn a_header_of_a_real_store_still_parses() {
        let seed = include_bytes!("../../fuzz/corpus/blob_header/small-v1");
        let mut h = [0u8; HEADER_BYTES];
        h.copy_from_slice(&seed[..HEADER_BYTES]);
        let file_len = u64::from_le_bytes(seed[HEADER_BYTES..HEADER_BYTES + 8].try_into().expect("8 bytes"));
        let id = ContentId(seed[HEADER_BYTES + 8..].try_into().expect("32 bytes"));
        let parsed = parse_header(&h, file_len, &id).expect("a real header parses");
        assert_eq!(parsed.payload_len, file_len - HEADER_BYTES as u64);
    }

    /// Every flipped bit and seeded random overwrites of a real header: refused
    /// with a reason or decoded, never a panic; a decoded one is the original.
    #[test]
    fn damaged_headers_are_refused_never_misread() {
        let payload = vec![7u8; 1000];
        let id = ContentId([3; 32]);
        let blob = EncodedBlob { id, content: id, flags: BlobFlags(1), plain_len: 4096, base: None, depth: 0, payload };
        let good = encode_header(&blob);
        let file_len = (HEADER_BYTES + blob.payload.len()) as u64;
        let decoded = parse_header(&good, file_len, &id).expect("a real header");
        assert_eq!((decoded.content, decoded.payload_len, decoded.plain_len), (id, 1000, 4096));
        assert!(parse_header(&good, file_len + 1, &id).unwrap_err().contains("payload is 1001 bytes"));
        assert!(parse_header(&good, 10, &id).is_err());
        // Found by the fuzzer: a header that says "no payload" with a file
        // shorter than the header itself was taken for a valid one.
        let empty = EncodedBlob { payload: Vec::new(), ..blob.clone() };
        let empty_header = encode_header(&empty);
        assert!(parse_header(&empty_header, HEADER_BYTES as u64, &id).is_ok());
        for short in [0, 1, HEADER_BYTES as u64 - 1] {
            assert!(parse_header(&empty_header, short, &id).unwrap_err().contains("shorter than the 256-byte header"), "file of {short} bytes");
        }
        assert!(parse_header(&good, file_len, &ContentId([4; 32])).unwrap_err().contains("header names blob"));
        for at in 0..HEADER_CHECK_END {
            for bit in 0..8 {
                let mut bad = good;
                bad[at] ^= 1 << bit;
                assert!(parse_header(&bad, file_len, &id).is_err(), "bit {bit} of byte {at}");
            }
        }
        let mut seed: u64 = 0x626c_6f62_6865_6164;
        for _ in 0..20_000 {
            let mut bad = good;
            for _ in 0..=(seed % 6) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bad[(seed % HEADER_BYTES as u64) as usize] = (seed >> 32) as u8;
            }
            if let Ok(h) = parse_header(&bad, file_len, &id) {
                // Only the unchecked padding may differ.
                assert_eq!(bad[..HEADER_CHECK_END], good[..HEADER_CHECK_END]);
                assert_eq!(h.payload_len, 1000);
            }
        }
    }
}
