//! The compressor of a cycle: encodes the blocks the target wants (zstd,
//! AES-256-GCM, or a delta over the block's baseline version) on the encode
//! pool ([`crate::cpu_pool`]), which spans every core, off the async threads.
//!
//! Not an actor: each block is one job on the pool, and its result comes back
//! on the returned channel. The channel needs no bound of its own: the session
//! asks for an encode only for a block it holds, and it holds at most its
//! window of blocks.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::codec::BlockCodec;
use crate::proto::session::Want;
use crate::source::file::ScannedBlock;
use crate::store::EncodedBlob;

/// An encoded block: its index and the blob (or why encoding failed).
pub type Encoded = (u64, Result<EncodedBlob, String>);

/// Hands blocks to the encode pool.
pub struct Compressor {
    codec: BlockCodec,
    done: mpsc::UnboundedSender<Encoded>,
}

impl Compressor {
    /// A compressor with `codec`; results arrive on the returned channel.
    pub fn new(codec: BlockCodec) -> (Compressor, mpsc::UnboundedReceiver<Encoded>) {
        let (done, rx) = mpsc::unbounded_channel();
        (Compressor { codec, done }, rx)
    }

    /// Encodes block `index` as `want` says: a delta over the block's baseline
    /// version when asked and possible, else the whole block.
    pub fn encode(&self, index: u64, block: Arc<ScannedBlock>, want: Want) {
        let (codec, tx) = (self.codec.clone(), self.done.clone());
        crate::cpu_pool::encode_pool().spawn(move || {
            let blob = match (want, &block.base) {
                (Want::Delta { base, depth }, Some(b)) => codec
                    .encode_delta(block.content, &block.data, &block.page_hashes, base, depth, &b.page_hashes)
                    .unwrap_or_else(|| codec.encode_full(block.content, &block.data)),
                _ => codec.encode_full(block.content, &block.data),
            };
            let _ = tx.send((index, Ok(blob)));
        });
    }
}
