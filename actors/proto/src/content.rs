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
        self.hash_parts(&[data])
    }

    /// The id of the concatenation of `parts` (no zero shortcut), without copying them.
    pub fn hash_parts(&self, parts: &[&[u8]]) -> ContentId {
        let mut hasher = match &self.key {
            Some(key) => blake3::Hasher::new_keyed(key),
            None => blake3::Hasher::new(),
        };
        for part in parts {
            hasher.update(part);
        }
        let hash = hasher.finalize();
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
    // OR whole 256-byte chunks without a branch per word, so the compiler turns
    // the inner loop into vector instructions; stop at the first chunk with a
    // set bit. The read-ahead thread runs this over every block of a full scan.
    const CHUNK: usize = 256;
    let chunks = data.chunks_exact(CHUNK);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut acc = 0u64;
        for w in chunk.chunks_exact(8) {
            // chunks_exact(8) yields 8-byte slices, so the conversion cannot fail.
            acc |= u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]));
        }
        if acc != 0 {
            return false;
        }
    }
    tail.iter().all(|b| *b == 0)
}

/// Bytes per page: the granularity of deltas and of the source's page hashes.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of one page hash (truncated blake3: collisions are out of reach, and
/// the hashes only ever compare two versions of the same page).
pub const PAGE_HASH_BYTES: usize = 16;

/// Hashes every 4 KiB page of `block` into `out` (PAGE_HASH_BYTES each), unkeyed.
pub fn page_hashes(block: &[u8], out: &mut Vec<u8>) {
    IdScheme::plain().hash_block(block, out);
}

impl IdScheme {
    /// The content id of `block` (exactly [`IdScheme::hash`]) and its page hashes,
    /// in one pass over the data: each 4 KiB page is hashed as a blake3 subtree
    /// (its chaining value, truncated, is the page hash) and the subtrees are
    /// merged into the root hash, which is the block's blake3 hash.
    pub fn hash_block(&self, block: &[u8], pages_out: &mut Vec<u8>) -> ContentId {
        use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
        pages_out.clear();
        if block.len() <= PAGE_BYTES {
            let id = self.hash(block);
            pages_out.extend_from_slice(&id.0[..PAGE_HASH_BYTES]);
            return id;
        }
        let mode = match &self.key {
            Some(key) => Mode::KeyedHash(key),
            None => Mode::Hash,
        };
        let cvs: Vec<ChainingValue> = block
            .chunks(PAGE_BYTES)
            .enumerate()
            .map(|(i, page)| {
                let mut hasher = match &self.key {
                    Some(key) => blake3::Hasher::new_keyed(key),
                    None => blake3::Hasher::new(),
                };
                hasher.set_input_offset((i * PAGE_BYTES) as u64);
                hasher.update(page);
                hasher.finalize_non_root()
            })
            .collect();
        for cv in &cvs {
            pages_out.extend_from_slice(&cv[..PAGE_HASH_BYTES]);
        }
        // Merge along blake3's own tree shape: the left subtree of `len` bytes is
        // the largest power-of-two number of chunks below it, always whole pages here.
        fn merge(cvs: &[ChainingValue], len: u64, mode: Mode<'_>) -> ChainingValue {
            if cvs.len() == 1 {
                return cvs[0];
            }
            let left_len = blake3::hazmat::left_subtree_len(len);
            let split = (left_len / PAGE_BYTES as u64) as usize;
            let left = merge(&cvs[..split], left_len, mode);
            let right = merge(&cvs[split..], len - left_len, mode);
            merge_subtrees_non_root(&left, &right, mode)
        }
        let len = block.len() as u64;
        let left_len = blake3::hazmat::left_subtree_len(len);
        let split = (left_len / PAGE_BYTES as u64) as usize;
        let left = merge(&cvs[..split], left_len, mode);
        let right = merge(&cvs[split..], len - left_len, mode);
        let mut id = *merge_subtrees_root(&left, &right, mode).as_bytes();
        if id == [0u8; 32] {
            id[31] = 1;
        }
        ContentId(id)
    }
}

/// The Merkle root of an RP: blake3 over the content ids of all its blocks in
/// index order and their count ([`MerkleBuilder`]). Two RPs with the same root
/// hold the same data; a source and a target agree on a baseline by it.
///
/// Encoded as its 32 bytes in binary formats (the wire, replicas: unchanged
/// from a plain `[u8; 32]`) and as lower-case hex in text formats (JSON of the
/// admin socket and `--json`), which also accept the 32 numbers older
/// versions printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MerkleRoot(pub [u8; 32]);

impl MerkleRoot {
    /// Lowercase hex, as shown to people.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`MerkleRoot::to_hex`] output.
    pub fn from_hex(text: &str) -> Option<MerkleRoot> {
        ContentId::from_hex(text).map(|c| MerkleRoot(c.0))
    }
}

impl Serialize for MerkleRoot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for MerkleRoot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<MerkleRoot, D::Error> {
        if !deserializer.is_human_readable() {
            return <[u8; 32]>::deserialize(deserializer).map(MerkleRoot);
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Hex(String),
            Bytes([u8; 32]),
        }
        match Text::deserialize(deserializer)? {
            Text::Hex(hex) => MerkleRoot::from_hex(&hex).ok_or_else(|| serde::de::Error::custom(format!("a Merkle root is 64 hex digits, not \"{}\"", hex.escape_debug()))),
            Text::Bytes(bytes) => Ok(MerkleRoot(bytes)),
        }
    }
}

impl fmt::Debug for MerkleRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MerkleRoot({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for MerkleRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Builds the [`MerkleRoot`] of an RP, block by block in index order.
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
    pub fn finish(&self) -> MerkleRoot {
        let mut h = self.hasher.clone();
        h.update(&self.blocks.to_le_bytes());
        MerkleRoot(*h.finalize().as_bytes())
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
    fn any_set_bit_anywhere_makes_data_non_zero() {
        for len in [0usize, 1, 7, 255, 256, 257, 1000, 4096] {
            assert!(is_all_zero(&vec![0u8; len]), "{len} zero bytes");
            for at in 0..len {
                let mut data = vec![0u8; len];
                data[at] = 0x80;
                assert!(!is_all_zero(&data), "byte {at} of {len} set");
            }
        }
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
    fn one_pass_block_hash_equals_plain_blake3() {
        let mut data = vec![0u8; (1 << 20) + 5000];
        let mut x: u32 = 1;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for scheme in [IdScheme::plain(), IdScheme::keyed(&[3; 32])] {
            for len in [1usize, 4096, 4097, 5000, 8192, 65536, 65536 + 100, 1 << 20, (1 << 20) + 5000, 12288, 300_000] {
                let mut pages = Vec::new();
                let id = scheme.hash_block(&data[..len], &mut pages);
                assert_eq!(id, scheme.hash(&data[..len]), "len {len}");
                assert_eq!(pages.len(), len.div_ceil(PAGE_BYTES) * PAGE_HASH_BYTES);
            }
        }
        // Page hashes change only where the data changes.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        IdScheme::plain().hash_block(&data[..65536], &mut a);
        data[3 * PAGE_BYTES + 7] ^= 1;
        IdScheme::plain().hash_block(&data[..65536], &mut b);
        let differing: Vec<usize> = (0..16).filter(|p| a[p * 16..p * 16 + 16] != b[p * 16..p * 16 + 16]).collect();
        assert_eq!(differing, vec![3]);
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

    #[test]
    fn merkle_roots_are_bytes_on_the_wire_and_hex_in_json() {
        let root = MerkleRoot(std::array::from_fn(|i| i as u8 * 7));
        assert_eq!(postcard::to_allocvec(&root).unwrap(), postcard::to_allocvec(&root.0).unwrap(), "the wire is unchanged");
        assert_eq!(postcard::from_bytes::<MerkleRoot>(&postcard::to_allocvec(&root.0).unwrap()).unwrap(), root);
        let json = serde_json::to_string(&root).unwrap();
        assert_eq!(json, format!("\"{}\"", root.to_hex()));
        assert_eq!(serde_json::from_str::<MerkleRoot>(&json).unwrap(), root);
        let numbers = serde_json::to_string(&root.0).unwrap();
        assert_eq!(serde_json::from_str::<MerkleRoot>(&numbers).unwrap(), root, "what older versions printed");
        assert!(serde_json::from_str::<MerkleRoot>("\"abc\"").is_err());
    }
}
