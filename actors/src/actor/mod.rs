//! Actix actors that drive the protocol cores with real time and real sockets.

pub mod applier;
pub mod fetch;
pub mod gossip;
pub mod mesh;
pub mod replicate;
pub mod volumes;
