//! Story: systemd starts a node as a `Type=notify` service. The node tells it
//! `READY=1` with a `STATUS=` line once its admin socket answers, and
//! `STOPPING=1` when SIGTERM starts the graceful stop; a node started without
//! `NOTIFY_SOCKET` sends nothing and runs as before. The service manager is
//! played by a Unix datagram socket, as sd_notify(3) describes it.
//! (tests/package_deb.rs checks the same under real systemd, as root.)

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use drmesh_tests::TestMesh;

/// The datagrams received so far, as text.
fn received(socket: &UnixDatagram) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn the_node_notifies_ready_after_its_socket_answers_and_stopping_on_sigterm() {
    let mut mesh = TestMesh::new(&["a"]);
    let text = mesh.standard_topology(1, &["a"]);
    mesh.write_file("topology.toml", &text);
    let path = mesh.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");

    // start_with_env returns once the admin socket answers: READY=1 was sent before.
    mesh.start_with_env("a", "topology.toml", &[("NOTIFY_SOCKET", path.to_str().expect("utf8"))]);
    let at_start = received(&socket);
    eprintln!("at start: {at_start:?}");
    assert_eq!(at_start.len(), 1, "one message at start: {at_start:?}");
    let lines: Vec<&str> = at_start[0].lines().collect();
    assert!(lines.contains(&"READY=1"), "{lines:?}");
    let status = lines.iter().find_map(|l| l.strip_prefix("STATUS=")).expect("a STATUS= line");
    assert!(status.starts_with("node a serving; admin socket ") && status.ends_with("admin.sock"), "{status}");

    assert!(mesh.stop("a"), "exit code 0 after SIGTERM");
    let at_stop = received(&socket);
    eprintln!("at stop: {at_stop:?}");
    assert!(at_stop.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")), "STOPPING=1 on SIGTERM: {at_stop:?}");

    // Without NOTIFY_SOCKET: nothing sent, nothing logged about it.
    mesh.start("a", "topology.toml");
    assert!(mesh.stop("a"));
    assert!(received(&socket).is_empty());
    assert!(!mesh.node("a").log_text().contains("cannot notify the service manager"), "no notify warnings:\n{}", mesh.node("a").log_text());
}
