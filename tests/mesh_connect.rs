//! Story: ops start the same binary on two or three machines with one topology
//! file; the nodes find each other, show each other in `drmesh ctl peers`,
//! survive a peer restart (clean or kill -9) and stop cleanly on SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use drmesh_tests::{wait_until, TestMesh};

#[test]
fn three_nodes_connect_and_show_each_other() {
    let mut mesh = TestMesh::new(&["a", "b", "c"]);
    let text = mesh.standard_topology(1, &["a", "b", "c"]);
    mesh.write_file("topology.toml", &text);
    for n in ["a", "b", "c"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("a", &["b", "c"]);
    mesh.wait_connected("b", &["a", "c"]);
    mesh.wait_connected("c", &["a", "b"]);

    // Exactly one connection per pair: one side dialed, the other accepted.
    let ab = mesh.peer("a", "b").unwrap();
    let ba = mesh.peer("b", "a").unwrap();
    assert_ne!(ab["direction"], ba["direction"], "{ab} / {ba}");
    assert!(ab["rtt_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(ab["topology_matches"], true);
    assert_eq!(ab["id"], mesh.node("b").id.as_str());

    // The human table names every peer and its state.
    let out = mesh.ctl("a", &["peers"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in ["b", "c", "connected", "RTT"] {
        assert!(table.contains(needle), "missing {needle:?} in:\n{table}");
    }
    let out = mesh.ctl("b", &["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains(&mesh.node("b").id), "{status}");
    assert!(status.contains("2 of 2 connected"), "{status}");
    assert!(status.contains("version 1"), "{status}");

    let json = mesh.ctl_json("c", "status").unwrap();
    assert_eq!(json["name"], "c");
    assert_eq!(json["node_id"], mesh.node("c").id.as_str());
    assert_eq!(json["topology_version"], 1);
    assert!(json["uptime_secs"].is_u64());

    // The admin socket is private.
    let mode = std::fs::metadata(mesh.node("a").socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // SIGTERM: clean exit, socket removed, peers notice at once (orderly close, not a timeout).
    assert!(mesh.stop("c"), "c did not exit cleanly:\n{}", mesh.node("c").log_text());
    assert!(!mesh.node("c").socket().exists(), "admin socket left behind");
    wait_until("a sees c gone", Duration::from_secs(5), || mesh.peer_state("a", "c").as_deref() != Some("connected"));
    assert_eq!(mesh.peer_state("a", "b").as_deref(), Some("connected"));
}

#[test]
fn peers_reconnect_after_restart_and_kill() {
    let mut mesh = TestMesh::new(&["a", "b"]);
    let text = mesh.standard_topology(1, &["a", "b"]);
    mesh.write_file("topology.toml", &text);
    mesh.start("a", "topology.toml");
    mesh.start("b", "topology.toml");
    mesh.wait_connected("a", &["b"]);
    mesh.wait_connected("b", &["a"]);

    // Clean restart of each side in turn.
    for name in ["b", "a"] {
        let other = if name == "a" { "b" } else { "a" };
        assert!(mesh.stop(name));
        wait_until("peer noticed the stop", Duration::from_secs(5), || mesh.peer_state(other, name).as_deref() != Some("connected"));
        mesh.start(name, "topology.toml");
        mesh.wait_connected(name, &[other]);
        mesh.wait_connected(other, &[name]);
    }
    // b outlived a's restart, so it has connected to a twice.
    assert!(mesh.peer("b", "a").unwrap()["connect_count"].as_u64().unwrap() >= 2);

    // kill -9: no goodbye, a stale admin socket left behind; the restarted node
    // removes it, and the survivor reconnects.
    mesh.kill9("b");
    assert!(mesh.node("b").socket().exists(), "kill -9 cannot remove the socket");
    let out = mesh.ctl("b", &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale"), "{}", String::from_utf8_lossy(&out.stderr));
    mesh.start("b", "topology.toml");
    mesh.wait_connected("b", &["a"]);
    mesh.wait_connected("a", &["b"]);
    assert!(mesh.node_mut("a").is_running());
}
