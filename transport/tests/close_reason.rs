//! A connection closed in the middle of a bulk transfer still tells its peer
//! why: with the congestion window full, quinn 0.11 alone never sends the
//! CONNECTION_CLOSE and the peer only sees a stateless reset (see
//! `congestion::closing`).
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use drmesh_transport::congestion::closing;

mod common;

/// Closes the sending side while it is window-limited, `rounds` times, and
/// returns how the receiving side saw each close.
async fn close_while_sending(rounds: usize) -> Vec<String> {
    let common::Pair { server, client, server_id, addr } = common::pair();
    let mut seen = Vec::new();
    for round in 0..rounds {
        let accept = async {
            let conn = server.quinn().accept().await.unwrap().await.unwrap();
            let mut recv = conn.accept_uni().await.unwrap();
            // Read until the stream breaks: the close (or a reset) ends it.
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(Some(_)) = recv.read(&mut buf).await {}
            tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("the connection ends").to_string()
        };
        let send = async {
            let conn = client.connect(addr, server_id).await.unwrap();
            let mut stream = conn.open_uni().await.unwrap();
            let writer = {
                let conn = conn.clone();
                async move {
                    let chunk = vec![round as u8; 1 << 20];
                    while stream.write_all(&chunk).await.is_ok() {}
                    drop(conn);
                }
            };
            let closer = async {
                // From at once to a few round trips in: the first windows fill at once.
                tokio::time::sleep(Duration::from_micros(250 * round as u64)).await;
                closing::close(&conn, 7, b"closing mid-transfer");
            };
            tokio::join!(writer, closer);
        };
        let (reason, ()) = tokio::join!(accept, send);
        seen.push(reason);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_in_the_middle_of_a_transfer_reaches_the_peer_with_its_reason() {
    let seen = close_while_sending(16).await;
    for reason in &seen {
        assert!(
            reason.contains("closing mid-transfer") && reason.contains("code 7"),
            "the peer saw {reason:?} instead of the close reason (all rounds: {seen:?})"
        );
    }
}
