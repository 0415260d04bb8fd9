//! The actors of a drmesh node and the protocol cores they drive.
//!
//! - [`proto`] holds protocol logic as plain state machines (sans-IO): inputs and
//!   `now` go in, actions come out. They never read a clock, touch a socket or
//!   spawn a task, so they are tested without sockets and, later, driven by
//!   `simnet` under virtual time.
//! - [`actor`] holds the actix actors that feed those cores real time, real
//!   QUIC connections and topology updates, and carry out their actions.
//!
//! The data actors (block-reader, compressor, sender, applier), the change
//! sources and the store arrive with the data-plane work; this crate's
//! foundation is the mesh: which peers to keep connected and how.

pub mod actor;
pub mod proto;
pub mod content;
pub mod store;
pub mod source;
pub mod codec;
pub mod cpu_pool;
pub mod restore;
pub mod adapt;
pub mod export;
pub mod vm;
pub mod drill;
