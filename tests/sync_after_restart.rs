//! Story: the DR node is restarted (killed with SIGKILL, or now and then
//! stopped cleanly, and started again) and, as soon as it is up, ops ask the
//! source for a cycle with `drmesh ctl sync-now`. The source may still hold
//! the connection to the target's previous incarnation; the cycle must not
//! fail on it ("connection lost: reset by peer") but use, or wait for, the new
//! connection. Every sync-now of every round succeeds, whichever side dials.

use drmesh_tests::{build_image, churn_pages, report_seq, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
/// Restarts per test: every fifth is a clean stop, the others SIGKILL.
const ROUNDS: usize = 10;

/// A topology where `dialer` has no `addresses` (so it is the side that dials,
/// as a node behind NAT does) but a fixed `listen`, and the other node is
/// reachable at its address. Both keep their port across restarts, so a
/// restarted node answers its old connection's packets with a stateless reset.
fn topology(mesh: &TestMesh, dialer: &str, volume: &VolumeSpec, policy: &PolicySpec) -> String {
    let mut text = "[mesh]\nname = \"test\"\nversion = 1\n".to_string();
    for name in ["src", "dst"] {
        let n = mesh.node(name);
        text.push_str(&format!("\n[[node]]\nname = \"{name}\"\nid = \"{}\"\nsite = \"lab\"\n", n.id));
        if name == dialer {
            text.push_str(&format!("listen = \"{}\"\n", n.address()));
        } else {
            text.push_str(&format!("addresses = [\"{}\"]\n", n.address()));
        }
    }
    text.push_str(&volume.text());
    text.push_str(&policy.text());
    text
}

/// Restarts the target ROUNDS times and runs sync-now on the source right
/// after each start; every one must commit.
fn sync_now_right_after_target_restarts(dialer: &str, seed: u64) {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(seed);
    let mut image = build_image(&mut rng, 4 * MIB);
    write_image_atomic(&image_path, &image);
    let volume = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = topology(&mesh, dialer, &volume, &PolicySpec::new("p", "64KiB"));
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    mesh.wait_connected("dst", &["src"]);
    // The first cycle sets the baseline; later ones open with a round trip.
    let mut last = report_seq(&mesh.sync_ok("src", "vol"));

    for round in 1..=ROUNDS {
        churn_pages(&mut rng, &mut image, 8);
        write_image_atomic(&image_path, &image);
        if round % 5 == 0 {
            assert!(mesh.stop("dst"), "{dialer} dials; round {round}: dst did not stop cleanly");
        } else {
            mesh.kill9("dst");
        }
        // Up: its admin socket answers (the harness waits for that, no more).
        mesh.start("dst", "topology.toml");
        let answer = mesh.sync_now("src", "vol");
        let data = answer.unwrap_or_else(|e| {
            panic!(
                "{dialer} dials; round {round}: sync-now right after the target restarted failed: {e}\n--- src log:\n{}",
                mesh.node("src").log_text()
            )
        });
        assert!(data["errors"].as_array().is_none_or(|e| e.is_empty()), "{dialer} dials; round {round}: {data}");
        let seq = report_seq(&data);
        assert!(seq > last, "{dialer} dials; round {round}: committed vol@{seq} after vol@{last}");
        last = seq;
    }
    let retried = mesh.node("src").log_text().matches("starting the cycle again on a new connection").count();
    eprintln!("{dialer} dials: {ROUNDS} rounds committed; {retried} cycle(s) met the old connection and started again on the new one");
    let seqs = mesh.rp_seqs("dst", "vol");
    assert_eq!(seqs.last(), Some(&last), "the target lists {seqs:?}");
}

/// The source dials: after the restart it still holds its outbound connection
/// to the target's previous incarnation until a packet on it is answered with
/// a reset, and the target does not dial back.
#[test]
fn sync_now_after_target_restart_when_the_source_dials() {
    sync_now_right_after_target_restarts("src", 0x5a7e_0001);
}

/// The target dials: its new incarnation dials the source at start-up, and the
/// source may still hold the old inbound connection when sync-now comes.
#[test]
fn sync_now_after_target_restart_when_the_target_dials() {
    sync_now_right_after_target_restarts("dst", 0x5a7e_0002);
}
