//! Story: only listed peers get in (promise 4), and a peer that breaks the wire
//! protocol loses its connection, never the node (promise 5).

use std::sync::Arc;
use std::time::Duration;

use drmesh_tests::{wait_until, Entry, TestMesh};
use drmesh_proto::fetch::FetchReply;
use drmesh_proto::session::TargetMsg;
use drmesh_proto::version;
use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamHeader, StreamKind};
use drmesh_transport::{AllowedPeers, Identity, MeshEndpoint, NodeId};

#[test]
fn node_not_in_the_topology_is_refused_at_the_handshake() {
    let mut mesh = TestMesh::new(&["a", "b", "stranger"]);
    let listed = mesh.standard_topology(1, &["a", "b"]);
    mesh.write_file("topology.toml", &listed);
    // The stranger's own file lists a (and itself, without addresses, so it dials a).
    let strangers = mesh.topology_text(1, &[
        Entry { name: "a", address: Some(mesh.node("a").address()) },
        Entry { name: "stranger", address: None },
    ]);
    mesh.write_file("stranger.toml", &strangers);
    mesh.start("a", "topology.toml");
    mesh.start("b", "topology.toml");
    mesh.start("stranger", "stranger.toml");
    mesh.wait_connected("a", &["b"]);

    let stranger_id = mesh.node("stranger").id.clone();
    wait_until("a logs the refusal", Duration::from_secs(20), || {
        mesh.node("a").log_text().contains("not in the topology") && mesh.node("a").log_text().contains(&stranger_id)
    });
    // The stranger keeps failing and says why; a never lists it.
    wait_until("stranger records the refusal", Duration::from_secs(20), || {
        mesh.peer("stranger", "a").is_some_and(|p| p["last_error"].as_str().is_some_and(|e| !e.is_empty()))
    });
    assert_ne!(mesh.peer_state("stranger", "a").as_deref(), Some("connected"));
    // People read the refusal in words, not as Rust debug text.
    let a_log = mesh.node("a").log_text();
    let refusal = a_log.lines().find(|l| l.contains("refused incoming connection")).unwrap_or_default();
    assert!(!refusal.contains("Other(") && !refusal.contains("PeerRefused"), "{refusal}");
    let seen = mesh.peer("stranger", "a").map(|p| p["last_error"].to_string()).unwrap_or_default();
    assert!(!seen.contains("Other(") && !seen.contains("PeerRefused"), "{seen}");
    let peers = mesh.ctl_json("a", "peers").unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 1, "{peers}");
    assert!(mesh.node_mut("a").is_running());
}

#[test]
fn listed_node_answering_at_another_nodes_address_is_refused() {
    let mut mesh = TestMesh::new(&["a", "b", "c"]);
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &["a", "b", "c"]));
    // a's copy of the file is wrong: it says b lives where c listens. a has no
    // addresses there, so a dials everyone, including "b" at c's address.
    let wrong = mesh.topology_text(1, &[
        Entry { name: "a", address: None },
        // Same socket as c, spelled differently so the file passes the duplicate check.
        Entry { name: "b", address: Some(format!("localhost:{}", mesh.node("c").port)) },
        Entry { name: "c", address: Some(mesh.node("c").address()) },
    ]);
    mesh.write_file("wrong.toml", &wrong);
    mesh.start("c", "topology.toml");
    mesh.start("a", "wrong.toml");
    mesh.wait_connected("a", &["c"]);
    wait_until("a refuses c posing as b", Duration::from_secs(20), || {
        mesh.peer("a", "b").is_some_and(|p| p["last_error"].as_str().is_some_and(|e| e.contains("was dialed")))
    });
    let b = mesh.peer("a", "b").unwrap();
    assert_ne!(b["state"], "connected", "{b}");
    assert!(b["last_error"].as_str().unwrap().contains(&mesh.node("c").id), "{b}");
}

/// A listed peer that this test process plays, with its identity and a's address.
struct Rogue {
    identity: Arc<Identity>,
    a_id: NodeId,
    a_addr: std::net::SocketAddr,
}

/// Nodes a and b running and connected, and node "rogue" listed in their
/// topology but not started: the test process speaks as it.
fn a_b_and_a_rogue() -> (TestMesh, Rogue) {
    let mut mesh = TestMesh::new(&["a", "b", "rogue"]);
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &["a", "b", "rogue"]));
    mesh.start("a", "topology.toml");
    mesh.start("b", "topology.toml");
    mesh.wait_connected("a", &["b"]);
    let identity = Arc::new(Identity::load(&mesh.node("rogue").state_dir).unwrap());
    let a_id = mesh.node("a").id.parse().unwrap();
    let a_addr = mesh.node("a").address().parse().unwrap();
    (mesh, Rogue { identity, a_id, a_addr })
}

/// A listed peer (this test process, with a listed identity) sends an oversized
/// frame and then garbage: the node closes that connection with the reason and
/// keeps serving everyone else.
#[test]
fn malformed_frames_close_the_connection_not_the_node() {
    let (mut mesh, Rogue { identity: rogue, a_id, a_addr }) = a_b_and_a_rogue();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (label, payload) in [
        // The first byte of a stream names its kind; 0 is the control stream.
        ("oversized", [&[0u8][..], &u32::MAX.to_be_bytes()].concat()),
        ("garbage", vec![0, 0, 0, 0, 3, 0xff, 0xfe, 0xfd]),
        ("unknown stream kind", vec![0x7f, 1, 2, 3]),
    ] {
        let reason = runtime.block_on(async {
            let allowed = AllowedPeers::new([a_id, rogue.node_id()]);
            let endpoint = MeshEndpoint::bind(rogue.clone(), "127.0.0.1:0".parse().unwrap(), allowed).unwrap();
            let conn = endpoint.connect(a_addr, a_id).await.expect("listed peer connects");
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&payload).await.unwrap();
            let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("node closes the connection");
            reason.to_string()
        });
        let expected = if label == "unknown stream kind" { "stream kind" } else { "frame" };
        assert!(reason.contains(expected), "{label}: closed with {reason}");
    }
    wait_until("a logs the reasons", Duration::from_secs(5), || {
        let log = mesh.node("a").log_text();
        log.contains("exceeds the limit") && log.contains("stream kind")
    });
    assert!(mesh.node_mut("a").is_running());
    assert_eq!(mesh.peer_state("a", "b").as_deref(), Some("connected"));
    assert!(mesh.ctl_json("a", "status").is_some());
}

/// A listed peer of another release opens replication and fetch streams whose
/// headers name message versions this node does not speak: each is refused
/// with the refusal message of its kind, naming both versions, before any
/// message is read; the connection and the node carry on.
#[test]
fn data_streams_of_another_version_are_refused_in_words() {
    let (mut mesh, Rogue { identity: rogue, a_id, a_addr }) = a_b_and_a_rogue();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let newer = version::REPLICATION + 1;
    let (replication, fetch, open) = runtime.block_on(async {
        let allowed = AllowedPeers::new([a_id, rogue.node_id()]);
        let endpoint = MeshEndpoint::bind(rogue.clone(), "127.0.0.1:0".parse().unwrap(), allowed).unwrap();
        let conn = endpoint.connect(a_addr, a_id).await.expect("listed peer connects");
        let read = |kind, v| {
            let conn = conn.clone();
            async move {
                let (_send, recv) = endpoint::open_stream(&conn, StreamHeader::data(kind, v)).await.unwrap();
                (MessageReader::new(recv), conn)
            }
        };
        let (mut r, _c) = read(StreamKind::Replication, newer).await;
        let replication = tokio::time::timeout(Duration::from_secs(10), r.next_frame::<TargetMsg>()).await.expect("an answer");
        let (mut f, _c) = read(StreamKind::Fetch, 0).await;
        let fetch = tokio::time::timeout(Duration::from_secs(10), f.next_frame::<FetchReply>()).await.expect("an answer");
        (replication, fetch, conn.close_reason().is_none())
    });
    match replication {
        Ok(Some(TargetMsg::Failed { reason })) => {
            assert!(reason.contains(&format!("replication messages of version {newer}")), "{reason}");
            assert!(reason.contains(&format!("speaks version {}", version::REPLICATION)), "{reason}");
        }
        other => panic!("replication stream answered {other:?}"),
    }
    match fetch {
        Ok(Some(FetchReply::Error(reason))) => {
            assert!(reason.contains("fetch messages of version 0") && reason.contains(&format!("speaks version {}", version::FETCH)), "{reason}");
        }
        other => panic!("fetch stream answered {other:?}"),
    }
    assert!(open, "a refused stream does not close the connection");
    wait_until("a logs the refusals", Duration::from_secs(5), || {
        let log = mesh.node("a").log_text();
        log.contains("refusing a replication stream") && log.contains("refusing a fetch stream")
    });
    assert!(mesh.node_mut("a").is_running());
    assert_eq!(mesh.peer_state("a", "b").as_deref(), Some("connected"));
}
