//! The value types of blobs and recovery points that protocol cores, codec
//! and store all speak of: plain data, below every one of them (no I/O).

use serde::{Deserialize, Serialize};

use crate::content::{BlobId, ContentId};
pub use drmesh_topology::VolumeName;

/// Flag bits of a blob (how the source encoded the payload).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobFlags(pub u8);

impl BlobFlags {
    /// The payload is zstd-compressed.
    pub const COMPRESSED: u8 = 1;
    /// The payload is encrypted.
    pub const ENCRYPTED: u8 = 2;
    /// The payload is a delta against `base`.
    pub const DELTA: u8 = 4;

    /// Whether every bit of `bits` is set.
    pub fn has(&self, bits: u8) -> bool {
        self.0 & bits == bits
    }
}

/// One blob as the source encoded it. For a full block `id == content`; for a delta
/// `id` is the delta's own id, `content` the block it produces, `base` the blob it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBlob {
    /// The blob's id (its file name).
    pub id: BlobId,
    /// The block content it materializes.
    pub content: ContentId,
    /// How the payload is encoded.
    pub flags: BlobFlags,
    /// Length of the block it produces.
    pub plain_len: u32,
    /// The blob a delta applies to.
    pub base: Option<BlobId>,
    /// 0 for a full block, base depth + 1 for a delta.
    pub depth: u8,
    /// Opaque encoded bytes.
    pub payload: Vec<u8>,
}

/// Where a content can be materialized from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLoc {
    /// The blob to read (a full block or the head of a delta chain).
    pub blob: BlobId,
    /// Its delta depth (0 = full block).
    pub depth: u8,
}

/// The sequence number of one of a volume's recovery points: 1 for the
/// volume's first, one more for each after it on the same target; a number is
/// never given to two RPs of a volume there. Travels and is stored as its
/// number (catalogs, gossip, the wire and JSON reports are the same as a bare
/// `u64`); shown as the number (`vol@7`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RpSeq(pub u64);

impl RpSeq {
    /// The seq of a volume's first RP.
    pub const FIRST: RpSeq = RpSeq(1);

    /// The seq that follows this one.
    pub fn next(self) -> RpSeq {
        RpSeq(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for RpSeq {
    /// The number, with the formatter's width and fill (`{seq:020}` pads it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for RpSeq {
    type Err = std::num::ParseIntError;

    /// A seq as people write it: its number (`7` of `vol@7`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(RpSeq)
    }
}

/// A committed recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpMeta {
    /// Volume name.
    pub volume: VolumeName,
    /// Sequence number, increasing per volume.
    pub seq: RpSeq,
    /// Snapshot instant.
    pub time_unix_ms: u64,
    /// Source node id (printable).
    pub source_node: String,
    /// Volume size.
    pub volume_bytes: u64,
    /// Block size.
    pub block_bytes: u32,
    /// Number of blocks.
    pub block_count: u64,
    /// Blocks changed since the previous RP.
    pub changed_blocks: u64,
    /// Blob bytes this RP added on the target.
    pub bytes_stored: u64,
    /// blake3 over the block ids in index order (see `content::MerkleBuilder`).
    pub merkle_root: crate::content::MerkleRoot,
    /// Whether the blobs are encrypted.
    pub encrypted: bool,
    /// Consistency level: a [`crate::gossip::catalog::Consistency`] label ("inconsistent", "crash", "fs-frozen", "app").
    pub consistency: String,
    /// The consistency group the RP was taken with, if its volume is in one.
    pub group: Option<RpGroup>,
}

/// The consistency group of an RP: the RPs of a group's members that share
/// the group's name and snapshot instant (`time_unix_ms`) form one group RP,
/// complete on a target once every member's RP is there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpGroup {
    /// The group's name (`[[group]]` in the topology).
    pub name: String,
    /// Every member volume of the group when the RP was taken, in name order.
    pub members: Vec<VolumeName>,
    /// Whether every member's writes were held at the instant (their
    /// filesystems frozen together), so the members' views are of one
    /// instant; false: the views were taken one after another.
    pub one_instant: bool,
}

impl RpMeta {
    /// `volume@seq`, for messages.
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.seq)
    }
}
