//! Actix actors that drive the protocol cores with real time and real sockets.

pub mod applier;
pub mod block_reader;
pub mod compressor;
pub mod fetch;
pub mod gossip;
pub mod mesh;
pub mod pacing;
pub mod platform;
pub mod replicate;
pub mod sender;
pub mod takeover;
pub mod volumes;
