//! Two real endpoints on loopback that list each other, for the tests here.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;

use drmesh_transport::{AllowedPeers, Identity, MeshEndpoint, NodeId};

/// A server endpoint ("a") and a client endpoint ("b"), each allowing both.
pub struct Pair {
    pub server: MeshEndpoint,
    pub client: MeshEndpoint,
    /// The server's node id, which the client dials.
    pub server_id: NodeId,
    /// The server's address.
    pub addr: SocketAddr,
}

/// Binds the two endpoints on ephemeral loopback ports.
pub fn pair() -> Pair {
    let a = Arc::new(Identity::generate("a").unwrap());
    let b = Arc::new(Identity::generate("b").unwrap());
    let allowed = AllowedPeers::new([a.node_id(), b.node_id()]);
    let server = MeshEndpoint::bind(a.clone(), "127.0.0.1:0".parse().unwrap(), allowed.clone()).unwrap();
    let client = MeshEndpoint::bind(b, "127.0.0.1:0".parse().unwrap(), allowed).unwrap();
    let addr = server.local_addr().unwrap();
    Pair { server, client, server_id: a.node_id(), addr }
}
