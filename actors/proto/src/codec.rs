//! Turning blocks into blobs and back: zstd compression, AES-256-GCM encryption
//! and sub-block deltas.
//!
//! A blob payload is built as: plaintext (a full block, or a delta encoding) →
//! zstd at the policy's level (kept raw when that does not shrink it) → AES-256-GCM
//! with a fresh random 96-bit nonce when the policy has a key. The AEAD's
//! associated data binds the blob id, its flags and plaintext length, so a
//! target cannot swap blobs or flags without restore noticing.
//!
//! Deltas answer write amplification: change tracking sees 4 KiB writes, but the
//! unit of dedupe is a whole block. When the target already holds the previous
//! version of a block, the source sends only the pages that changed (found by
//! comparing per-page hashes it keeps), as a delta blob that names its base. A
//! restore applies the chain base → delta → ...; chains are bounded by
//! [`MAX_DELTA_DEPTH`], after which a full block is sent again.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub use crate::content::{page_hashes, PAGE_BYTES, PAGE_HASH_BYTES};
use crate::content::{BlobId, ContentId, IdScheme};
use crate::blob::{BlobFlags, EncodedBlob};

/// Longest delta chain a target accepts; beyond it the source sends a full block.
pub const MAX_DELTA_DEPTH: u8 = 8;
const DELTA_MAGIC: &[u8; 4] = b"DRD1";
const DELTA_HEADER: usize = 12;

thread_local! {
    /// One zstd context per thread and level: setting one up costs about as much
    /// as compressing a small block, so contexts are reused across blocks.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// One zstd decompression context per thread, reused across blocks (restore's hot path).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Compresses with a reused per-thread context; `None` if zstd fails.
fn compress(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut()?;
        compressor.compress(plain).ok()
    })
}

/// Why a blob could not be decoded. Restore reports it with the block it was restoring.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The policy encrypts but no key was given.
    #[error("blob {0} is encrypted and no key is available (the policy's encryption_key_file is needed)")]
    NoKey(BlobId),
    /// Authentication failed: wrong key, or the blob was altered.
    #[error("blob {0} failed AES-GCM authentication (wrong key or tampered data)")]
    Decrypt(BlobId),
    /// zstd refused the payload.
    #[error("blob {id} does not decompress: {reason}")]
    Decompress {
        /// The blob.
        id: BlobId,
        /// zstd's message.
        reason: String,
    },
    /// The decoded bytes do not hash to the id they claim.
    #[error("blob {id} decodes to data with another content id (expected {expected})")]
    Mismatch {
        /// The blob.
        id: BlobId,
        /// The content it should produce.
        expected: ContentId,
    },
    /// A delta encoding is malformed or does not fit its base.
    #[error("delta blob {id} is malformed: {reason}")]
    BadDelta {
        /// The blob.
        id: BlobId,
        /// What is wrong.
        reason: String,
    },
}

/// Per-policy encoder/decoder of blobs. Cheap to clone; holds the key, never prints it.
#[derive(Clone)]
pub struct BlockCodec {
    ids: IdScheme,
    zstd_level: Option<i32>,
    key: Option<std::sync::Arc<LessSafeKey>>,
}

impl std::fmt::Debug for BlockCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCodec").field("keyed", &self.key.is_some()).field("zstd_level", &self.zstd_level).finish()
    }
}

fn aad(id: &BlobId, flags: BlobFlags, plain_len: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(37);
    a.extend_from_slice(&id.0);
    a.push(flags.0);
    a.extend_from_slice(&plain_len.to_le_bytes());
    a
}

impl BlockCodec {
    /// A codec for a policy: `zstd_level` None means no compression; `secret` None means no encryption.
    pub fn new(zstd_level: Option<i32>, secret: Option<&[u8; 32]>) -> Self {
        let key = secret.map(|s| {
            let k = blake3::derive_key("drmesh 2026 blob encryption", s);
            // A 32-byte key is exactly what AES-256 takes, so this cannot fail.
            std::sync::Arc::new(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("AES-256 key is 32 bytes")))
        });
        let ids = match secret {
            Some(s) => IdScheme::keyed(s),
            None => IdScheme::plain(),
        };
        BlockCodec { ids, zstd_level, key }
    }

    /// How content ids are computed under this policy.
    pub fn ids(&self) -> &IdScheme {
        &self.ids
    }

    /// Whether blobs are encrypted.
    pub fn encrypts(&self) -> bool {
        self.key.is_some()
    }

    fn seal(&self, id: BlobId, content: ContentId, plain: &[u8], base: Option<(BlobId, u8)>, delta: bool) -> EncodedBlob {
        let mut flags = BlobFlags(if delta { BlobFlags::DELTA } else { 0 });
        let mut payload = match self.zstd_level {
            Some(level) => match compress(plain, level) {
                Some(c) if c.len() < plain.len() => {
                    flags.0 |= BlobFlags::COMPRESSED;
                    c
                }
                _ => plain.to_vec(),
            },
            None => plain.to_vec(),
        };
        let plain_len = u32::try_from(plain.len()).unwrap_or(u32::MAX);
        if let Some(key) = &self.key {
            flags.0 |= BlobFlags::ENCRYPTED;
            let mut nonce = [0u8; NONCE_LEN];
            // The system RNG failing is unrecoverable for any crypto; there is nothing sane to fall back to.
            SystemRandom::new().fill(&mut nonce).expect("system random number generator");
            // Sealing only fails for inputs over 64 GiB.
            key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(&id, flags, plain_len)), &mut payload)
                .expect("AES-GCM seals blocks of any realistic size");
            let mut with_nonce = nonce.to_vec();
            with_nonce.extend_from_slice(&payload);
            payload = with_nonce;
        }
        EncodedBlob { id, content, flags, plain_len, base: base.map(|b| b.0), depth: base.map_or(0, |b| b.1.saturating_add(1)), payload }
    }

    /// Encodes a full block whose content id is `content`.
    pub fn encode_full(&self, content: ContentId, block: &[u8]) -> EncodedBlob {
        self.seal(content, content, block, None, false)
    }

    /// Encodes `block` as a delta over `base` (a blob of depth `base_depth`
    /// that materializes the previous version), sending only pages whose hash
    /// differs from `base_page_hashes`. Returns `None` when a delta would not be
    /// smaller than the block (then send it full).
    pub fn encode_delta(
        &self,
        content: ContentId,
        block: &[u8],
        new_page_hashes: &[u8],
        base: BlobId,
        base_depth: u8,
        base_page_hashes: &[u8],
    ) -> Option<EncodedBlob> {
        if new_page_hashes.len() != base_page_hashes.len() || base_depth >= MAX_DELTA_DEPTH {
            return None;
        }
        let pages = block.len().div_ceil(PAGE_BYTES);
        if new_page_hashes.len() != pages * PAGE_HASH_BYTES {
            return None;
        }
        let mut bitmap = vec![0u8; pages.div_ceil(8)];
        let mut data = Vec::new();
        for p in 0..pages {
            let h = p * PAGE_HASH_BYTES..(p + 1) * PAGE_HASH_BYTES;
            if new_page_hashes[h.clone()] != base_page_hashes[h] {
                bitmap[p / 8] |= 1 << (p % 8);
                data.extend_from_slice(&block[p * PAGE_BYTES..((p + 1) * PAGE_BYTES).min(block.len())]);
            }
        }
        if data.len() * 10 >= block.len() * 9 {
            return None;
        }
        let mut plain = Vec::with_capacity(DELTA_HEADER + bitmap.len() + data.len());
        plain.extend_from_slice(DELTA_MAGIC);
        plain.extend_from_slice(&(PAGE_BYTES as u32).to_le_bytes());
        plain.extend_from_slice(&u32::try_from(block.len()).ok()?.to_le_bytes());
        plain.extend_from_slice(&bitmap);
        plain.extend_from_slice(&data);
        // The id binds what the delta applies to and what it makes, not only its
        // bytes: two blocks changed the same way over different bases (the same
        // page written to two disks) are two blobs, never one id with two meanings.
        let id = self.ids.hash_parts(&[&plain, &base.0, &content.0]);
        Some(self.seal(id, content, &plain, Some((base, base_depth)), true))
    }

    /// Decrypts and decompresses a full-block blob straight into `out`, which must be
    /// exactly the block's length (`plain_len`): restore's fast path, with no copy
    /// of the block beyond decompression. Does not check the content id (see [`BlockCodec::check`]).
    /// An encrypted payload is decrypted in place: `blob` is spent afterwards (its
    /// payload buffer may be reused).
    pub fn open_into(&self, blob: &mut EncodedBlob, out: &mut [u8]) -> Result<(), CodecError> {
        if out.len() != blob.plain_len as usize {
            return Err(CodecError::Decompress { id: blob.id, reason: format!("the blob holds {} bytes where the block has {}", blob.plain_len, out.len()) });
        }
        let (id, flags, plain_len) = (blob.id, blob.flags, blob.plain_len);
        let payload = &mut blob.payload;
        let data: &[u8] = if flags.has(BlobFlags::ENCRYPTED) {
            let key = self.key.as_ref().ok_or(CodecError::NoKey(id))?;
            if payload.len() < NONCE_LEN {
                return Err(CodecError::Decrypt(id));
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&payload[..NONCE_LEN]);
            key.open_within(Nonce::assume_unique_for_key(nonce), Aad::from(aad(&id, flags, plain_len)), payload, NONCE_LEN..)
                .map_err(|_| CodecError::Decrypt(id))?
        } else {
            payload
        };
        let n = if flags.has(BlobFlags::COMPRESSED) {
            DECOMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                match slot.as_mut() {
                    Some(d) => d.decompress_to_buffer(data, out).map_err(|e| e.to_string()),
                    None => Err("no zstd context".to_string()),
                }
            })
            .map_err(|reason| CodecError::Decompress { id, reason })?
        } else if data.len() == out.len() {
            out.copy_from_slice(data);
            data.len()
        } else {
            data.len()
        };
        if n != out.len() {
            return Err(CodecError::Decompress { id, reason: format!("{n} bytes, header says {plain_len}") });
        }
        Ok(())
    }

    /// Checks an encrypted blob's AES-GCM tag (its payload and the id, flags and
    /// length it is bound to) without decoding further: what a scrub does where
    /// the node holds the policy's key. The payload is decrypted into `scratch`
    /// (reused between calls); `blob` is left as it was. A blob that is not
    /// encrypted has no tag: [`CodecError::NoKey`] is never returned for it, it
    /// passes. Wrong key or altered bytes: [`CodecError::Decrypt`].
    pub fn authenticate(&self, blob: &EncodedBlob, scratch: &mut Vec<u8>) -> Result<(), CodecError> {
        if !blob.flags.has(BlobFlags::ENCRYPTED) {
            return Ok(());
        }
        let key = self.key.as_ref().ok_or(CodecError::NoKey(blob.id))?;
        if blob.payload.len() < NONCE_LEN {
            return Err(CodecError::Decrypt(blob.id));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&blob.payload[..NONCE_LEN]);
        scratch.clear();
        scratch.extend_from_slice(&blob.payload[NONCE_LEN..]);
        key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad(&blob.id, blob.flags, blob.plain_len)), scratch)
            .map(|_| ())
            .map_err(|_| CodecError::Decrypt(blob.id))
    }

    /// Applies a delta plaintext to `block` (its base) in place. On error `block`
    /// may be partly patched.
    pub fn apply_delta_in_place(&self, blob: &EncodedBlob, delta: &[u8], block: &mut [u8]) -> Result<(), CodecError> {
        let bad = |reason: &str| CodecError::BadDelta { id: blob.id, reason: reason.to_string() };
        if delta.len() < DELTA_HEADER || &delta[..4] != DELTA_MAGIC {
            return Err(bad("no delta header"));
        }
        let word = |at: usize| u32::from_le_bytes([delta[at], delta[at + 1], delta[at + 2], delta[at + 3]]) as usize;
        let (page, len) = (word(4), word(8));
        if page != PAGE_BYTES || len != block.len() {
            return Err(bad("page size or block length does not match the base"));
        }
        let pages = len.div_ceil(PAGE_BYTES);
        let bitmap_end = DELTA_HEADER + pages.div_ceil(8);
        if delta.len() < bitmap_end {
            return Err(bad("short bitmap"));
        }
        let mut at = bitmap_end;
        for p in 0..pages {
            if delta[DELTA_HEADER + p / 8] & (1 << (p % 8)) != 0 {
                let range = p * PAGE_BYTES..((p + 1) * PAGE_BYTES).min(len);
                let n = range.len();
                let src = delta.get(at..at + n).ok_or_else(|| bad("page data ends early"))?;
                block[range].copy_from_slice(src);
                at += n;
            }
        }
        if at != delta.len() {
            return Err(bad("bytes left after the last page"));
        }
        Ok(())
    }

    /// Checks that `block` is the content `expected` (keyed when the policy encrypts).
    pub fn check(&self, id: BlobId, expected: ContentId, block: &[u8]) -> Result<(), CodecError> {
        if self.ids.content_id(block) == expected {
            Ok(())
        } else {
            Err(CodecError::Mismatch { id, expected })
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    impl BlockCodec {
        /// The plaintext of a blob (a block or a delta encoding), for tests.
        fn open(&self, blob: &EncodedBlob) -> Result<Vec<u8>, CodecError> {
            let mut out = vec![0u8; blob.plain_len as usize];
            self.open_into(&mut blob.clone(), &mut out)?;
            Ok(out)
        }

        /// `base` with the delta applied, for tests.
        fn apply_delta(&self, blob: &EncodedBlob, delta: &[u8], base: &[u8]) -> Result<Vec<u8>, CodecError> {
            let mut out = base.to_vec();
            self.apply_delta_in_place(blob, delta, &mut out)?;
            Ok(out)
        }
    }

    fn block(seed: u8) -> Vec<u8> {
        // Compressible but not trivial: text-like bytes.
        (0..1 << 20).map(|i: u32| b"drmesh block data "[(i as usize + seed as usize) % 18] ^ ((i >> 12) as u8 & seed)).collect()
    }

    #[test]
    fn full_blocks_round_trip_under_every_policy() {
        let secret = [7u8; 32];
        for codec in [
            BlockCodec::new(None, None),
            BlockCodec::new(Some(1), None),
            BlockCodec::new(Some(3), Some(&secret)),
            BlockCodec::new(None, Some(&secret)),
        ] {
            let data = block(3);
            let id = codec.ids().content_id(&data);
            let blob = codec.encode_full(id, &data);
            assert_eq!(blob.flags.has(BlobFlags::ENCRYPTED), codec.encrypts());
            let plain = codec.open(&blob).unwrap();
            assert_eq!(plain, data);
            codec.check(blob.id, id, &plain).unwrap();
        }
    }

    #[test]
    fn incompressible_data_is_kept_raw() {
        let codec = BlockCodec::new(Some(1), None);
        let mut data = vec![0u8; 65536];
        SystemRandom::new().fill(&mut data).unwrap();
        let blob = codec.encode_full(codec.ids().content_id(&data), &data);
        assert!(!blob.flags.has(BlobFlags::COMPRESSED));
        assert_eq!(blob.payload.len(), data.len());
    }

    #[test]
    fn authenticate_checks_the_tag_only_with_the_right_key() {
        let secret = [7u8; 32];
        let codec = BlockCodec::new(Some(1), Some(&secret));
        let data = block(4);
        let blob = codec.encode_full(codec.ids().content_id(&data), &data);
        let mut scratch = Vec::new();
        codec.authenticate(&blob, &mut scratch).unwrap();
        // Checked twice with the same scratch: the blob is left as it was.
        codec.authenticate(&blob, &mut scratch).unwrap();
        assert!(matches!(BlockCodec::new(Some(1), Some(&[8; 32])).authenticate(&blob, &mut scratch), Err(CodecError::Decrypt(_))));
        assert!(matches!(BlockCodec::new(Some(1), None).authenticate(&blob, &mut scratch), Err(CodecError::NoKey(_))));
        // Every flipped byte of the payload, and a changed length, fail the tag.
        for at in (0..blob.payload.len()).step_by(97) {
            let mut bad = blob.clone();
            bad.payload[at] ^= 0x40;
            assert!(matches!(codec.authenticate(&bad, &mut scratch), Err(CodecError::Decrypt(_))), "byte {at}");
        }
        let mut bad = blob.clone();
        bad.plain_len += 1;
        assert!(codec.authenticate(&bad, &mut scratch).is_err());
        bad = blob.clone();
        bad.payload.truncate(5);
        assert!(codec.authenticate(&bad, &mut scratch).is_err());
        // A blob that is not encrypted has no tag and passes under any codec.
        let plain_codec = BlockCodec::new(Some(1), None);
        let plain = plain_codec.encode_full(plain_codec.ids().content_id(&data), &data);
        codec.authenticate(&plain, &mut scratch).unwrap();
    }

    #[test]
    fn tampering_wrong_key_and_swapped_ids_are_caught() {
        let codec = BlockCodec::new(Some(1), Some(&[1; 32]));
        let data = block(5);
        let id = codec.ids().content_id(&data);
        let mut blob = codec.encode_full(id, &data);
        let last = blob.payload.len() - 1;
        blob.payload[last] ^= 1;
        assert!(matches!(codec.open(&blob), Err(CodecError::Decrypt(_))));
        let blob = codec.encode_full(id, &data);
        let other = BlockCodec::new(Some(1), Some(&[2; 32]));
        assert!(matches!(other.open(&blob), Err(CodecError::Decrypt(_))));
        let mut swapped = blob.clone();
        swapped.id = ContentId([9; 32]);
        assert!(codec.open(&swapped).is_err());
        assert!(matches!(BlockCodec::new(Some(1), None).open(&blob), Err(CodecError::NoKey(_))));
    }

    #[test]
    fn delta_carries_only_changed_pages_and_applies_exactly() {
        for secret in [None, Some([4u8; 32])] {
            let codec = BlockCodec::new(Some(1), secret.as_ref());
            let old = block(1);
            let mut new = old.clone();
            for page in [0usize, 17, 255] {
                new[page * PAGE_BYTES + 100] ^= 0xff;
            }
            let (mut old_h, mut new_h) = (Vec::new(), Vec::new());
            page_hashes(&old, &mut old_h);
            page_hashes(&new, &mut new_h);
            let old_id = codec.ids().content_id(&old);
            let new_id = codec.ids().content_id(&new);
            let delta = codec.encode_delta(new_id, &new, &new_h, old_id, 0, &old_h).expect("3 pages of 256 is a delta");
            assert_eq!(delta.depth, 1);
            assert_eq!(delta.base, Some(old_id));
            assert!(delta.payload.len() < 3 * PAGE_BYTES + 200, "{}", delta.payload.len());
            let plain = codec.open(&delta).unwrap();
            let rebuilt = codec.apply_delta(&delta, &plain, &old).unwrap();
            assert_eq!(rebuilt, new);
            codec.check(delta.id, new_id, &rebuilt).unwrap();
            // A mostly rewritten block goes full, and so does a too-deep chain.
            assert!(codec.encode_delta(new_id, &new, &new_h, old_id, MAX_DELTA_DEPTH, &old_h).is_none());
            let other = block(2);
            let mut other_h = Vec::new();
            page_hashes(&other, &mut other_h);
            assert!(codec.encode_delta(new_id, &other, &other_h, old_id, 0, &old_h).is_none());
        }
    }

    /// The same pages changed the same way in two different blocks (a
    /// counter written to two disks) make equal delta bytes over different
    /// bases: their ids differ, so a store never takes one for the other.
    #[test]
    fn equal_delta_bytes_over_different_bases_have_different_ids() {
        for secret in [None, Some([4u8; 32])] {
            let codec = BlockCodec::new(Some(1), secret.as_ref());
            let (a_old, b_old) = (block(1), block(2));
            let (mut a_new, mut b_new) = (a_old.clone(), b_old.clone());
            for new in [&mut a_new, &mut b_new] {
                new[..PAGE_BYTES].fill(0);
                new[..8].copy_from_slice(&42u64.to_le_bytes());
            }
            let hashes = |data: &[u8]| {
                let mut h = Vec::new();
                page_hashes(data, &mut h);
                h
            };
            let ids = codec.ids();
            let a = codec.encode_delta(ids.content_id(&a_new), &a_new, &hashes(&a_new), ids.content_id(&a_old), 0, &hashes(&a_old)).expect("a delta");
            let b = codec.encode_delta(ids.content_id(&b_new), &b_new, &hashes(&b_new), ids.content_id(&b_old), 0, &hashes(&b_old)).expect("a delta");
            assert_eq!(codec.open(&a).unwrap(), codec.open(&b).unwrap(), "the same delta bytes");
            assert_ne!(a.id, b.id, "bound to their bases and contents");
            let again = codec.encode_delta(ids.content_id(&a_new), &a_new, &hashes(&a_new), ids.content_id(&a_old), 0, &hashes(&a_old)).expect("a delta");
            assert_eq!(again.id, a.id, "the same delta over the same base is one blob (dedupe)");
        }
    }

    #[test]
    fn malformed_deltas_are_errors_not_panics() {
        let codec = BlockCodec::new(None, None);
        let base = vec![1u8; 8192];
        let blob = EncodedBlob { id: ContentId([1; 32]), content: ContentId([2; 32]), flags: BlobFlags(BlobFlags::DELTA), plain_len: 0, base: None, depth: 1, payload: vec![] };
        for delta in [vec![], b"DRD1".to_vec(), [b"DRD1".as_slice(), &4096u32.to_le_bytes(), &8192u32.to_le_bytes(), &[3u8]].concat()] {
            assert!(codec.apply_delta(&blob, &delta, &base).is_err());
        }
    }
}
