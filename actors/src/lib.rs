//! The I/O side of a drmesh node: the store, the change sources, restore,
//! export and recovery, and the actix actors that drive the protocol cores.
//!
//! - [`proto`], [`codec`], [`content`], [`blob`], [`drill`] are the crate
//!   `drmesh-proto` (actors/proto/), re-exported under the paths this crate's
//!   code uses: plain state machines and value types (sans-IO) that never read
//!   a clock, touch a socket or spawn a task, so they are tested without
//!   sockets and driven by `simnet` under virtual time.
//! - [`actor`] holds the actors that feed those cores real time, real QUIC
//!   connections and topology updates, and carry out their actions; [`store`],
//!   [`source`], [`restore`], [`export`], [`adapt`], [`vm`] do the I/O.
//!
//! See docs/development.md, "Layers".

pub mod actor;
pub mod store;
pub mod source;
pub mod cpu_pool;
pub mod memory;
pub mod mounts;
pub mod restore;
pub mod adapt;
pub mod export;
pub mod vm;
#[cfg(test)]
mod test_util;

/// The sans-IO protocol cores (crate `drmesh-proto`), under the paths the
/// actors have always used.
pub mod proto {
    pub use drmesh_proto::{bandwidth, drill, fetch, gossip, lease, nbd, peers, qmp, session, time, version};
}
pub use drmesh_proto::{blob, codec, content, drill_report as drill};
