//! Handshakes between real QUIC endpoints on loopback: listed peers get in,
//! unlisted ones and impostors are refused during the handshake.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;

use drmesh_transport::endpoint::peer_id;
use drmesh_transport::{AllowedPeers, Identity, MeshEndpoint};

fn endpoint(identity: &Arc<Identity>, allowed: &AllowedPeers) -> MeshEndpoint {
    MeshEndpoint::bind(identity.clone(), "127.0.0.1:0".parse().unwrap(), allowed.clone()).unwrap()
}

async fn accept_one(server: &MeshEndpoint) -> Result<quinn::Connection, String> {
    let incoming = server.quinn().accept().await.ok_or("endpoint closed")?;
    incoming.await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn listed_peer_connects_and_ids_match() {
    let a = Arc::new(Identity::generate("a").unwrap());
    let b = Arc::new(Identity::generate("b").unwrap());
    let allowed = AllowedPeers::new([a.node_id(), b.node_id()]);
    let server = endpoint(&a, &allowed);
    let client = endpoint(&b, &allowed);
    let addr = server.local_addr().unwrap();
    let (accepted, dialed) = tokio::join!(accept_one(&server), client.connect(addr, a.node_id()));
    let accepted = accepted.unwrap();
    let dialed = dialed.unwrap();
    assert_eq!(peer_id(&accepted), Some(b.node_id()));
    assert_eq!(peer_id(&dialed), Some(a.node_id()));
}

#[tokio::test]
async fn unlisted_client_is_refused() {
    let a = Arc::new(Identity::generate("a").unwrap());
    let stranger = Arc::new(Identity::generate("stranger").unwrap());
    let server = endpoint(&a, &AllowedPeers::new([a.node_id()]));
    let client = endpoint(&stranger, &AllowedPeers::new([a.node_id()]));
    let addr = server.local_addr().unwrap();
    let (accepted, dialed) = tokio::join!(accept_one(&server), client.connect(addr, a.node_id()));
    assert!(accepted.is_err(), "server accepted an unlisted node");
    // The client may see the refusal during the handshake or right after it.
    if let Ok(conn) = dialed {
        let reason = conn.closed().await;
        assert!(reason.to_string().contains("certificate") || reason.to_string().contains("TLS"), "{reason}");
    }
}

#[tokio::test]
async fn impostor_at_dialed_address_is_refused() {
    let a = Arc::new(Identity::generate("a").unwrap());
    let b = Arc::new(Identity::generate("b").unwrap());
    let c = Arc::new(Identity::generate("c").unwrap());
    let allowed = AllowedPeers::new([a.node_id(), b.node_id(), c.node_id()]);
    // c listens where the dialer expects a: listed, valid certificate, wrong node.
    let server = endpoint(&c, &allowed);
    let client = endpoint(&b, &allowed);
    let addr = server.local_addr().unwrap();
    let (_accepted, dialed) = tokio::join!(accept_one(&server), client.connect(addr, a.node_id()));
    let err = dialed.expect_err("dialer accepted the wrong node");
    assert!(err.to_string().contains("was dialed") || err.to_string().contains("certificate"), "{err}");
}
