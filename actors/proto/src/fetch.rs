//! The messages of a fetch stream: a client (a restore, an export, a repair
//! on another node) asks a holder for an RP's metadata, its block ids and the
//! blobs that materialize a content; the holder answers each in order.

use serde::{Deserialize, Serialize};

use crate::blob::{RpMeta, RpSeq, VolumeName};
use crate::content::ContentId;
use crate::session::WireBlob;

/// Block ids per `Blocks` request.
pub const IDS_PER_REQUEST: u64 = 4096;

/// Client → server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FetchRequest {
    /// The metadata of `volume@seq` (the newest RP when `seq` is None).
    Rp {
        /// Volume name.
        volume: VolumeName,
        /// Sequence number.
        seq: Option<RpSeq>,
    },
    /// Block ids of the RP named in the last `Rp` request.
    Blocks {
        /// First block index.
        start: u64,
        /// How many.
        count: u64,
    },
    /// The blobs that materialize `content`: the head blob, then its delta bases down to a full block.
    Content(ContentId),
}

/// Server → client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FetchReply {
    /// RP metadata.
    Rp(RpMeta),
    /// Block ids.
    Blocks(Vec<ContentId>),
    /// A blob chain, head first.
    Chain(Vec<WireBlob>),
    /// The request failed; the stream goes on.
    Error(String),
}
