//! Sans-IO protocol cores. Nothing in here reads a clock or does I/O.

pub mod peers;
pub mod session;
pub mod gossip;
pub mod bandwidth;
pub mod drill;
pub mod nbd;
