//! The mesh transport of drmesh.
//!
//! This crate owns how nodes reach each other and prove who they are:
//! - [`identity`]: a node's key pair and self-signed certificate (made with
//!   rcgen, stored with mode 0600) and the [`NodeId`] derived from its public key;
//! - [`tls`]: mutual TLS in which a peer is accepted only when the node id of its
//!   certificate is listed in the topology (and, when dialing, is the very node
//!   the address was dialed for);
//! - [`wire`]: versioned wire messages (serde + postcard) and length-prefixed
//!   framing with a size limit, decoded without ever panicking on bad input;
//! - [`endpoint`]: the QUIC endpoint (quinn) configured with the above, with
//!   windows sized to a declared bandwidth-delay product and the congestion
//!   controller of [`congestion`].

#![deny(unsafe_code)]

pub mod congestion;
pub mod endpoint;
pub mod error;
pub mod identity;
pub mod tls;
pub mod wire;

pub use drmesh_topology::NodeId;
pub use endpoint::MeshEndpoint;
pub use error::TransportError;
pub use identity::Identity;
pub use tls::AllowedPeers;
