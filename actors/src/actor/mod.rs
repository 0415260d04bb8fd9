//! Actix actors that drive the protocol cores with real time and real sockets.

pub mod mesh;
