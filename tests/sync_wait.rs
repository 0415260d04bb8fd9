//! Story: ops start the branch node and ask for a cycle at once, before the DR
//! node is up. `sync-now` waits for the target's connection (up to
//! `CONNECT_WAIT`, 10 s) instead of failing at once, and the cycle commits as
//! soon as the target comes up. A target that never comes up still fails, with
//! an error that says so.

use std::time::Duration;

use drmesh_tests::{build_image, hash_hex, parse_ctl_json, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;

#[test]
fn sync_now_waits_for_a_target_that_is_starting() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x5c0_0001);
    let image = build_image(&mut rng, 8 * MIB);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "1MiB")]);
    mesh.write_file("topology.toml", &text);

    mesh.start("src", "topology.toml");
    let waiting = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    // The request is in before the target exists.
    std::thread::sleep(Duration::from_secs(2));
    mesh.start("dst", "topology.toml");
    let out = waiting.wait_with_output().expect("wait for ctl");
    let data = parse_ctl_json(&out).unwrap_or_else(|e| panic!("sync-now failed: {e}\n--- src log:\n{}", mesh.node("src").log_text()));
    assert!(data["errors"].as_array().is_none_or(|e| e.is_empty()), "sync-now: {data}");
    let seqs = mesh.rp_seqs("dst", "vol");
    let last = *seqs.last().expect("an RP on the target");
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{last}"), None), hash_hex(&image));

    // With the target gone for good, the cycle fails after the wait, saying why.
    assert!(mesh.stop("dst"));
    let err = mesh.sync_now("src", "vol").expect_err("sync-now to a stopped target succeeded");
    assert!(err.contains("dst is not connected") && err.contains("waited"), "{err}");
}
