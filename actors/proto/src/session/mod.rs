//! The replication session: one cycle of one volume from a source to one target.
//!
//! ```text
//! source                                   target
//!   Open {volume, base seq + root}  ───▶
//!                                   ◀───   Opened {seq, base_ok}
//!   Offer {index, content, base}*   ───▶   (lookup + pin; stage block map changes)
//!                                   ◀───   Answer {Present | Full | Delta(base blob)}*
//!   Blob (only what was wanted)     ───▶   (written durably in batches)
//!                                   ◀───   Stored {blob ids}
//!   Commit {RP metadata, root}      ───▶   (the last blobs made durable, then
//!                                   ◀───   Stored {blob ids}   one redb transaction)
//!                                   ◀───   Committed {seq}
//! ```
//!
//! Each round trip of a cycle is a round trip the link sits idle (150 ms on a
//! long path), so the source does not wait where it need not: a source with no
//! base (an initial sync, which offers every block whatever the answer) sends
//! its first offers right behind `Open`, and `Commit` follows the last blob at
//! once; the target makes every blob durable before it commits, and
//! acknowledges them (`Stored`) before `Committed`.
//!
//! [`SourceSession`] and [`TargetSession`] are sans-IO: the driver feeds them
//! messages, work results and the time (`handle_*`) and drains their outputs
//! (`poll_transmit`, `poll_event`, `poll_timeout`). The source session also
//! hands out credit: a driver reads a new block only while
//! [`SourceSession::wants_block`] says so, which bounds memory by the window,
//! not by the volume size or the link speed.
//!
//! - [`msg`]: the messages, as they travel;
//! - [`source`]: the source side (block reader, compressor and sender drive it);
//! - [`target`]: the target side (the applier drives it against the store).

pub mod msg;
pub mod source;
pub mod target;
#[cfg(test)]
mod pair;
#[cfg(test)]
mod tests;

pub use msg::{OfferEntry, SourceMsg, TargetMsg, Want, WireBlob};
pub use source::{CycleStats, SourceEvent, SourceSession};
pub use target::{Announcement, Found, SessionError, TargetEvent, TargetSession, BATCH_BLOBS, BATCH_BYTES, BATCH_IDLE};

/// Offer entries per message: small, so answers (and compression) start while
/// the reader is still filling the window.
pub const OFFER_BATCH: usize = 16;
/// Bytes of changed blocks a source holds at once (read, offered, or being
/// encoded); the window in blocks is this divided by the block size.
pub const MAX_PENDING_BYTES: u64 = 64 << 20;
/// The window never shrinks below this many blocks, whatever the block size.
pub const MIN_PENDING_BLOCKS: usize = 4;
/// Encoded bytes sent but not yet durably stored by the target.
pub const MAX_INFLIGHT_BYTES: u64 = 160 << 20;
