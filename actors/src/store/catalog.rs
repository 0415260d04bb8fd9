//! The redb catalog: table definitions and row encodings.
//!
//! | table | key | value | meaning |
//! | --- | --- | --- | --- |
//! | `meta` | name | u64 | counters (`next_volume_id`) |
//! | `volumes` | volume name | u32 volume id | one row per volume that has (had) RPs |
//! | `rps` | (volume id, seq) | [`RpMeta`] bytes | committed RPs |
//! | `blocks` | (volume id, block index, seq) | content id | block `index` changed at RP `seq`; the block at RP `s` is the entry with the greatest seq ≤ `s` |
//! | `rp_changes` | (volume id, seq, block index) | () | the indexes that have a `blocks` entry at `seq` (for pruning) |
//! | `contents` | content id | blob id | how to materialize a content |
//! | `blobs` | blob id | [`BlobMeta`] bytes | stored blobs: content, base, depth, size |
//! | `drills` | (volume id, seq, finished unix ms) | drill report bytes | drills run here on RP `seq` (gone with the RP) |
//! | `scrubs` | (volume id, seq) | scrub verdict bytes | the newest scrub's verdict on RP `seq` (gone with the RP) |
//! | `staged` | (session, volume name, block index) | content id | block-map changes of in-flight RPs (in `staging.redb`, not the catalog) |
//!
//! Invariant: every `blocks` key's seq is the seq of an existing RP of that volume,
//! and `rp_changes` holds exactly the (volume, seq, index) triples of `blocks`.

use redb::TableDefinition;

use super::{RpMeta, RpSeq, VolumeName};
use crate::content::{BlobId, ContentId};

/// Counters.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Volume name → volume id.
pub const VOLUMES: TableDefinition<&str, u32> = TableDefinition::new("volumes");
/// (volume id, seq) → encoded [`RpMeta`].
pub const RPS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("rps");
/// (volume id, block index, seq) → content id.
pub const BLOCKS: TableDefinition<(u32, u64, u64), [u8; 32]> = TableDefinition::new("blocks");
/// (volume id, seq, block index) → ().
pub const RP_CHANGES: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("rp_changes");
/// Content id → blob id.
pub const CONTENTS: TableDefinition<[u8; 32], [u8; 32]> = TableDefinition::new("contents");
/// Blob id → encoded [`BlobMeta`].
pub const BLOBS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("blobs");
/// (volume id, seq, finished unix ms) → encoded drill report (see `drills.rs`).
pub const DRILLS: TableDefinition<(u32, u64, u64), &[u8]> = TableDefinition::new("drills");
/// (volume id, seq) → encoded scrub verdict (see `scrub.rs`).
pub const SCRUBS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("scrubs");
/// (session, volume, block index) → content id.
pub const STAGED: TableDefinition<(u64, &str, u64), [u8; 32]> = TableDefinition::new("staged");

/// Key of the next volume id counter in [`META`].
pub const NEXT_VOLUME_ID: &str = "next_volume_id";

/// Catalog facts about a stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// The content the blob produces.
    pub content: ContentId,
    /// The blob a delta applies to.
    pub base: Option<BlobId>,
    /// 0 for a full block, base depth + 1 for a delta.
    pub depth: u8,
    /// [`super::BlobFlags`] bits.
    pub flags: u8,
    /// Bytes of the blob file (header included).
    pub stored_bytes: u64,
    /// When the blob was last written or verified.
    pub stored_unix_ms: u64,
}

const BLOB_META_VERSION: u8 = 1;
const BLOB_META_BYTES: usize = 1 + 32 + 32 + 1 + 1 + 8 + 8;

impl BlobMeta {
    /// Fixed-size encoding.
    pub fn encode(&self) -> [u8; BLOB_META_BYTES] {
        let mut b = [0u8; BLOB_META_BYTES];
        b[0] = BLOB_META_VERSION;
        b[1..33].copy_from_slice(&self.content.0);
        b[33..65].copy_from_slice(&self.base.unwrap_or(ContentId::ZERO).0);
        b[65] = self.depth;
        b[66] = self.flags;
        b[67..75].copy_from_slice(&self.stored_bytes.to_le_bytes());
        b[75..83].copy_from_slice(&self.stored_unix_ms.to_le_bytes());
        b
    }

    /// Decodes [`BlobMeta::encode`] output.
    pub fn decode(b: &[u8]) -> Option<BlobMeta> {
        if b.len() != BLOB_META_BYTES || b[0] != BLOB_META_VERSION {
            return None;
        }
        let base = ContentId(b.get(33..65)?.try_into().ok()?);
        Some(BlobMeta {
            content: ContentId(b.get(1..33)?.try_into().ok()?),
            base: if base.is_zero() { None } else { Some(base) },
            depth: b[65],
            flags: b[66],
            stored_bytes: u64::from_le_bytes(b.get(67..75)?.try_into().ok()?),
            stored_unix_ms: u64::from_le_bytes(b.get(75..83)?.try_into().ok()?),
        })
    }
}

/// Row version of an RP without a group (what every release reads).
const RP_META_VERSION: u8 = 1;
/// Row version of an RP of a consistency group: version 1's fields, then the
/// group (name, one-instant flag, member count, member names).
const RP_META_VERSION_GROUP: u8 = 2;

/// Encodes an RP row (version byte, fixed fields, then length-prefixed strings).
pub fn encode_rp(meta: &RpMeta) -> Vec<u8> {
    let mut b = Vec::with_capacity(128 + meta.volume.len() + meta.source_node.len() + meta.consistency.len());
    b.push(if meta.group.is_some() { RP_META_VERSION_GROUP } else { RP_META_VERSION });
    for v in [meta.seq.0, meta.time_unix_ms, meta.volume_bytes] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&meta.block_bytes.to_le_bytes());
    for v in [meta.block_count, meta.changed_blocks, meta.bytes_stored] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&meta.merkle_root.0);
    b.push(u8::from(meta.encrypted));
    for s in [meta.volume.as_str(), meta.source_node.as_str(), meta.consistency.as_str()] {
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    if let Some(group) = &meta.group {
        b.extend_from_slice(&(group.name.len() as u32).to_le_bytes());
        b.extend_from_slice(group.name.as_bytes());
        b.push(u8::from(group.one_instant));
        b.extend_from_slice(&(group.members.len() as u32).to_le_bytes());
        for m in &group.members {
            b.extend_from_slice(&(m.len() as u32).to_le_bytes());
            b.extend_from_slice(m.as_bytes());
        }
    }
    b
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// Decodes [`encode_rp`] output.
pub fn decode_rp(b: &[u8]) -> Option<RpMeta> {
    let mut c = Cursor(b);
    let version = c.take(1)?[0];
    if version != RP_META_VERSION && version != RP_META_VERSION_GROUP {
        return None;
    }
    let (seq, time_unix_ms, volume_bytes) = (c.u64()?, c.u64()?, c.u64()?);
    let block_bytes = c.u32()?;
    let (block_count, changed_blocks, bytes_stored) = (c.u64()?, c.u64()?, c.u64()?);
    let merkle_root = crate::content::MerkleRoot(c.take(32)?.try_into().ok()?);
    let encrypted = c.take(1)?[0] != 0;
    let (volume, source_node, consistency) = (c.string()?, c.string()?, c.string()?);
    let group = match version {
        RP_META_VERSION_GROUP => {
            let name = c.string()?;
            let one_instant = c.take(1)?[0] != 0;
            let count = c.u32()? as usize;
            // Every member name takes at least its 4-byte length: a count the row cannot hold is damage.
            if count > c.0.len() / 4 {
                return None;
            }
            let members = (0..count).map(|_| c.string().and_then(|m| VolumeName::new(m).ok())).collect::<Option<Vec<_>>>()?;
            Some(super::RpGroup { name, members, one_instant })
        }
        _ => None,
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(RpMeta {
        volume: VolumeName::new(volume).ok()?,
        seq: RpSeq(seq),
        time_unix_ms,
        source_node,
        volume_bytes,
        block_bytes,
        block_count,
        changed_blocks,
        bytes_stored,
        merkle_root,
        encrypted,
        consistency,
        group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let meta = RpMeta {
            volume: crate::store::VolumeName::from_static("db-1"),
            seq: RpSeq(7),
            time_unix_ms: 1_700_000_000_123,
            source_node: "node-a".into(),
            volume_bytes: 10 << 20,
            block_bytes: 1 << 20,
            block_count: 10,
            changed_blocks: 3,
            bytes_stored: 12345,
            merkle_root: crate::content::MerkleRoot([9; 32]),
            encrypted: true,
            consistency: "crash".into(),
            group: None,
        };
        let decoded = decode_rp(&encode_rp(&meta)).expect("decodes");
        assert_eq!(format!("{decoded:?}"), format!("{meta:?}"));
        assert!(decode_rp(&encode_rp(&meta)[..20]).is_none());
        assert_eq!(encode_rp(&meta)[0], 1, "an RP without a group keeps the first row version");
        let grouped = RpMeta {
            group: Some(crate::store::RpGroup {
                name: "db-host".into(),
                members: vec![crate::store::VolumeName::from_static("db-1"), crate::store::VolumeName::from_static("db-2")],
                one_instant: true,
            }),
            ..meta
        };
        let row = encode_rp(&grouped);
        assert_eq!(decode_rp(&row), Some(grouped));
        for cut in [row.len() - 1, row.len() - 4, 120] {
            assert!(decode_rp(&row[..cut]).is_none(), "a row cut at {cut} is refused");
        }
        let mut long = row.clone();
        long.push(0);
        assert!(decode_rp(&long).is_none(), "trailing bytes are refused");
        let blob = BlobMeta {
            content: ContentId([1; 32]),
            base: Some(ContentId([2; 32])),
            depth: 3,
            flags: 5,
            stored_bytes: 99,
            stored_unix_ms: 1234,
        };
        assert_eq!(BlobMeta::decode(&blob.encode()), Some(blob));
    }
}
