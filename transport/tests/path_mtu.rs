//! Path MTU on loopback: a connection between two real endpoints grows its
//! packets past Ethernet size when the path allows it (loopback's MTU is 64 KiB),
//! so bulk transfers pay QUIC's per-packet costs far less often.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

mod common;

#[tokio::test]
async fn loopback_connection_discovers_large_packets() {
    let common::Pair { server, client, server_id, addr } = common::pair();
    let accept = async {
        let conn = server.quinn().accept().await.unwrap().await.unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        let bytes = recv.read_to_end(64 << 20).await.unwrap();
        (conn, bytes.len())
    };
    let send = async {
        let conn = client.connect(addr, server_id).await.unwrap();
        // Discovery probes run beside the handshake's first round trips.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut stream = conn.open_uni().await.unwrap();
        stream.write_all(&vec![7u8; 32 << 20]).await.unwrap();
        stream.finish().unwrap();
        stream.stopped().await.unwrap();
        conn
    };
    let ((_server_conn, received), dialed) = tokio::join!(accept, send);
    assert_eq!(received, 32 << 20);
    let stats = dialed.stats();
    let mtu = stats.path.current_mtu;
    let datagrams = stats.udp_tx.datagrams;
    eprintln!("{:?}", stats.path);
    assert!(mtu > 1452, "path MTU stayed at {mtu} on loopback");
    assert!(mtu <= drmesh_transport::endpoint::MAX_UDP_PAYLOAD_BYTES);
    // A large packet that was lost makes quinn suspect a black hole and drop
    // back to 1,200 bytes; none may be lost on loopback.
    assert_eq!(stats.path.black_holes_detected, 0, "{:?}", stats.path);
    // 32 MiB in packets of the discovered size (plus handshake, probes and acks).
    assert!(datagrams < (32 << 20) / 1452, "sent {datagrams} datagrams for 32 MiB");
}
