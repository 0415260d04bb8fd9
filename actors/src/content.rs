//! Content ids, blob ids and the per-policy secrets that key them.
//!
//! A block's content id is blake3 of its plaintext; when the policy encrypts,
//! it is keyed blake3 with a key derived from the policy's secret, so a target
//! that stores the blobs learns nothing from the ids. The all-zero block has a
//! reserved id and is never stored or sent.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a block's plaintext (see the module doc for how it is computed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentId(pub [u8; 32]);

/// Names a stored blob: blake3 (keyed when encrypted) of the blob's plaintext
/// payload. For a full block it equals the block's [`ContentId`]; for a delta it
/// is the id of the delta's encoding.
pub type BlobId = ContentId;

impl ContentId {
    /// The reserved id of an all-zero block (of any size): never stored, restored as zeros.
    pub const ZERO: ContentId = ContentId([0u8; 32]);

    /// Whether this is the all-zero block.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// Lower-case hex, for file names and messages.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`ContentId::to_hex`] output.
    pub fn from_hex(text: &str) -> Option<ContentId> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ContentId(out))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How content ids are computed for one policy: plain or keyed blake3.
#[derive(Clone)]
pub struct IdScheme {
    key: Option<[u8; 32]>,
}

impl fmt::Debug for IdScheme {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdScheme").field("keyed", &self.key.is_some()).finish()
    }
}

impl IdScheme {
    /// Plain blake3 (policies without encryption).
    pub fn plain() -> Self {
        IdScheme { key: None }
    }

    /// Keyed blake3 with a key derived from the policy's secret (never the secret itself).
    pub fn keyed(secret: &[u8; 32]) -> Self {
        IdScheme { key: Some(blake3::derive_key("drmesh 2026 content id", secret)) }
    }

    /// Whether ids are keyed.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The content id of `data`; [`ContentId::ZERO`] when every byte is zero.
    pub fn content_id(&self, data: &[u8]) -> ContentId {
        if is_all_zero(data) {
            return ContentId::ZERO;
        }
        self.hash(data)
    }

    /// The id of `data` without the zero shortcut (for delta encodings and the like).
    pub fn hash(&self, data: &[u8]) -> ContentId {
        let hash = match &self.key {
            Some(key) => blake3::keyed_hash(key, data),
            None => blake3::hash(data),
        };
        let mut id = *hash.as_bytes();
        // Keep ZERO reserved: a real hash of all zero bits is astronomically unlikely, but cheap to exclude.
        if id == [0u8; 32] {
            id[31] = 1;
        }
        ContentId(id)
    }
}

/// Whether every byte of `data` is zero (fast path over u64 words).
pub fn is_all_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    // chunks_exact(8) yields 8-byte slices, so the conversion cannot fail.
    words.into_iter().all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0) && tail.iter().all(|b| *b == 0)
}

/// Bytes per page: the granularity of deltas and of the source's page hashes.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of one page hash (truncated blake3: collisions are out of reach, and
/// the hashes only ever compare two versions of the same page).
pub const PAGE_HASH_BYTES: usize = 16;

/// Hashes every 4 KiB page of `block` into `out` (PAGE_HASH_BYTES each).
pub fn page_hashes(block: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for page in block.chunks(PAGE_BYTES) {
        out.extend_from_slice(&blake3::hash(page).as_bytes()[..PAGE_HASH_BYTES]);
    }
}

/// Merkle root of an RP: blake3 over the content ids of all its blocks in index order.
#[derive(Default)]
pub struct MerkleBuilder {
    hasher: blake3::Hasher,
    blocks: u64,
}

impl MerkleBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next block's id.
    pub fn push(&mut self, id: &ContentId) {
        self.hasher.update(&id.0);
        self.blocks += 1;
    }

    /// The root over everything pushed (block count included, so truncation changes it).
    pub fn finish(&self) -> [u8; 32] {
        let mut h = self.hasher.clone();
        h.update(&self.blocks.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_have_the_reserved_id() {
        assert_eq!(IdScheme::plain().content_id(&vec![0u8; 1 << 20]), ContentId::ZERO);
        let mut data = vec![0u8; 4099];
        data[4098] = 1;
        assert!(!is_all_zero(&data));
        assert_ne!(IdScheme::plain().content_id(&data), ContentId::ZERO);
    }

    #[test]
    fn keyed_ids_differ_from_plain_and_between_keys() {
        let data = b"some block".to_vec();
        let plain = IdScheme::plain().content_id(&data);
        let a = IdScheme::keyed(&[1; 32]).content_id(&data);
        let b = IdScheme::keyed(&[2; 32]).content_id(&data);
        assert_eq!(plain.0, *blake3::hash(&data).as_bytes());
        assert_ne!(plain, a);
        assert_ne!(a, b);
        assert!(!format!("{:?}", IdScheme::keyed(&[1; 32])).contains("[1"));
    }

    #[test]
    fn hex_round_trip_and_merkle_depends_on_order_and_count() {
        let id = IdScheme::plain().content_id(b"x");
        assert_eq!(ContentId::from_hex(&id.to_hex()), Some(id));
        let (x, y) = (IdScheme::plain().content_id(b"x"), IdScheme::plain().content_id(b"y"));
        let mut m1 = MerkleBuilder::new();
        m1.push(&x);
        m1.push(&y);
        let mut m2 = MerkleBuilder::new();
        m2.push(&y);
        m2.push(&x);
        assert_ne!(m1.finish(), m2.finish());
        let mut m3 = MerkleBuilder::new();
        m3.push(&x);
        assert_ne!(m1.finish(), m3.finish());
    }
}
