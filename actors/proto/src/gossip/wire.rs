//! Datagram formats of gossip. Every datagram is at most [`DATAGRAM_BYTES_MAX`].
//!
//! The first byte says who reads the rest:
//! - [`TAG_FOCA`]: a foca (SWIM) packet, encoded by foca's postcard codec; its
//!   tail may carry catalog [`Delta`]s as foca custom broadcasts.
//! - [`TAG_SYNC`]: an anti-entropy [`SyncMsg`], postcard.

use drmesh_topology::NodeId;
use serde::{Deserialize, Serialize};

use super::catalog::{Item, ItemKey};

/// Largest datagram gossip produces or accepts (fits a QUIC datagram).
pub const DATAGRAM_BYTES_MAX: usize = 1200;
/// First byte of a foca packet.
pub const TAG_FOCA: u8 = 0x01;
/// First byte of an anti-entropy message.
pub const TAG_SYNC: u8 = 0x02;

/// One catalog write, gossiped epidemically inside foca packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The node that wrote it (and that it is about).
    pub holder: NodeId,
    /// The write.
    pub item: Item,
}

/// Identity of a delta in foca's broadcast queue: a newer write of the same
/// key replaces an older one still waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaKey {
    pub(crate) holder: NodeId,
    pub(crate) key: ItemKey,
    pub(crate) version: u64,
}

impl foca::Invalidates for DeltaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.holder == other.holder && self.key == other.key && self.version >= other.version
    }
}

/// One `(holder prefix, contig)` pair of a digest detail.
pub type DetailEntry = ([u8; 8], u64);

/// Anti-entropy messages (push-pull over per-holder `contig` versions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMsg {
    /// Round opener: one 32-bit hash per holder bucket (little-endian, 256 × 4 bytes).
    Digest {
        /// Concatenated bucket hashes.
        buckets: Vec<u8>,
    },
    /// The sender's `(prefix, contig)` for every holder whose prefix is in `lo..=hi`.
    Detail {
        /// Whether the receiver should answer with its own detail of the range.
        reply: bool,
        /// First prefix covered.
        lo: [u8; 8],
        /// Last prefix covered.
        hi: [u8; 8],
        /// Sorted by prefix.
        entries: Vec<DetailEntry>,
    },
    /// Items of one holder with versions in `(from, upto]` as far as the sender has them.
    Items {
        /// The holder.
        holder: NodeId,
        /// The receiver is complete through `upto` if it was complete through `from`.
        from: u64,
        /// See `from`.
        upto: u64,
        /// Oldest first.
        items: Vec<Item>,
    },
}

/// Encodes a sync message behind its tag.
pub(crate) fn encode_sync(msg: &SyncMsg) -> Vec<u8> {
    let mut out = vec![TAG_SYNC];
    // Encoding into a Vec cannot fail for these plain types.
    out.extend(postcard::to_allocvec(msg).unwrap_or_default());
    out
}
