//! Every message of a replication session, as it travels (postcard in
//! transport frames).

use serde::{Deserialize, Serialize};

use crate::blob::{BlobFlags, EncodedBlob, RpMeta, RpSeq, VolumeName};
use crate::content::{BlobId, ContentId};

/// A changed block offered to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferEntry {
    /// Block index in the volume.
    pub index: u64,
    /// Content id of the block now.
    pub content: ContentId,
    /// Content id of the block in the source's baseline, a candidate delta base.
    pub base: Option<ContentId>,
}

/// What the target wants for one offered block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// Already stored: send nothing.
    Present,
    /// Send the whole block.
    Full,
    /// Send a delta over this blob (which materializes the offered base).
    Delta {
        /// The base blob.
        base: BlobId,
        /// Its chain depth.
        depth: u8,
    },
}

/// A blob on the wire (same fields as the stored form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBlob {
    /// Blob id.
    pub id: BlobId,
    /// Content it materializes.
    pub content: ContentId,
    /// Flags bits.
    pub flags: u8,
    /// Plaintext length.
    pub plain_len: u32,
    /// Delta base.
    pub base: Option<BlobId>,
    /// Chain depth.
    pub depth: u8,
    /// Payload as stored.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

mod serde_bytes_compat {
    //! Vec<u8> as one byte string (postcard writes it as length + bytes either way).
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        <&[u8]>::deserialize(d).map(<[u8]>::to_vec).map_err(|_| serde::de::Error::custom("expected bytes"))
    }
}

impl From<EncodedBlob> for WireBlob {
    fn from(b: EncodedBlob) -> Self {
        WireBlob { id: b.id, content: b.content, flags: b.flags.0, plain_len: b.plain_len, base: b.base, depth: b.depth, payload: b.payload }
    }
}

impl From<WireBlob> for EncodedBlob {
    fn from(b: WireBlob) -> Self {
        EncodedBlob { id: b.id, content: b.content, flags: BlobFlags(b.flags), plain_len: b.plain_len, base: b.base, depth: b.depth, payload: b.payload }
    }
}

/// Source → target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceMsg {
    /// Starts a cycle.
    Open {
        /// Volume name.
        volume: VolumeName,
        /// The RP the source's change set is relative to, with its Merkle root.
        base: Option<(RpSeq, crate::content::MerkleRoot)>,
        /// Whether the policy encrypts (recorded on the RP).
        encrypted: bool,
    },
    /// Changed blocks.
    Offer {
        /// In index order.
        entries: Vec<OfferEntry>,
    },
    /// One wanted blob.
    Blob(WireBlob),
    /// Everything is sent; commit the RP.
    Commit {
        /// The RP's metadata (seq as assigned in `Opened`).
        meta: RpMeta,
    },
}

/// Target → source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetMsg {
    /// The cycle may start.
    Opened {
        /// Sequence number of the RP this cycle will commit.
        seq: RpSeq,
        /// Whether the target's newest RP is the source's base; if not, the
        /// source must offer every block, not only the changed ones.
        base_ok: bool,
    },
    /// Answers to one `Offer`, in order.
    Answer {
        /// One per entry.
        wants: Vec<Want>,
    },
    /// These blobs are durable.
    Stored {
        /// Blob ids.
        blobs: Vec<BlobId>,
    },
    /// The RP is committed.
    Committed {
        /// Its sequence number.
        seq: RpSeq,
    },
    /// The cycle failed on the target; nothing was committed.
    Failed {
        /// Why, for the source's log and status.
        reason: String,
    },
}
