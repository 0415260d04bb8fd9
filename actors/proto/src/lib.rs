//! drmesh's protocol cores and the value types they share, as plain state
//! machines (sans-IO): inputs and `now` go in, actions come out. Nothing in
//! this crate reads a clock, touches a socket or a file, or spawns a task;
//! the actors of `drmesh-actors` drive these cores with real time and real
//! connections, `simnet` drives them under virtual time. The crate's
//! dependencies keep it so: no async runtime, actor system, transport or
//! database (checked by `tests/layering.rs`).
//!
//! - [`content`], [`blob`]: ids, hashes and the blob and RP value types;
//! - [`codec`]: how a block becomes a blob (zstd, AES-256-GCM, deltas);
//! - [`session`]: a replication session's source and target sides; [`fetch`]:
//!   the messages of a fetch stream;
//! - [`lease`]: which proxy reads a platform's volume, and its lease;
//! - [`gossip`], [`peers`], [`bandwidth`], [`drill`], [`nbd`], [`qmp`]: the other cores;
//! - [`drill_report`]: what a drill proved, as stored and gossiped;
//! - [`version`]: the versions of the data streams' message sets.

pub mod bandwidth;
pub mod blob;
pub mod codec;
pub mod content;
pub mod drill;
pub mod drill_report;
pub mod fetch;
pub mod gossip;
pub mod lease;
pub mod nbd;
pub mod peers;
pub mod qmp;
pub mod session;
pub mod time;
pub mod version;
