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

use std::time::Duration;

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
/// Encoded bytes sent but not yet durably stored by the target, on a path
/// with no delay: the target's batches on their way to disk (one filling, one
/// being written, one queued). Where the source's window would otherwise be
/// sitting in the target's memory while its disk falls behind, this is all
/// it can hold there.
pub const MIN_INFLIGHT_BYTES: u64 = 32 << 20;
/// The most encoded bytes sent and not yet durable, whatever the round trip.
pub const MAX_INFLIGHT_BYTES: u64 = 160 << 20;
/// The path rate the window is sized for: 1 Gbit/s, as the transport's
/// flow-control windows (`BDP_BYTES_MAX`).
pub const WINDOW_RATE_BYTES_PER_SEC: u64 = 125_000_000;

/// The encoded bytes a source may have sent and not yet durable on a path
/// whose round trip is `rtt`: [`MIN_INFLIGHT_BYTES`] plus three bandwidth-delay
/// products at [`WINDOW_RATE_BYTES_PER_SEC`] (one on the wire, and about one
/// and a half waiting behind a lost packet at the target until its
/// retransmission arrives), at most [`MAX_INFLIGHT_BYTES`]. On loopback or a
/// LAN that is the minimum, so a target whose disk is slower than the link
/// holds little of the window; at 150 ms about 88 MB, at 250 ms about 126 MB.
pub fn inflight_window(rtt: Duration) -> u64 {
    let bdp = u64::try_from(u128::from(WINDOW_RATE_BYTES_PER_SEC) * rtt.as_micros() / 1_000_000).unwrap_or(u64::MAX);
    MIN_INFLIGHT_BYTES.saturating_add(bdp.saturating_mul(3)).min(MAX_INFLIGHT_BYTES)
}
