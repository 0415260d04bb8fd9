//! Story: the target dies (SIGKILL, from a crash point inside its store) at the
//! two moments where a recovery point is partly written: after its blobs are
//! stored and before its manifest, and after its manifest and before the
//! catalog commit; 10 rounds each. After each restart:
//! - nothing is half-listed: the target lists the RPs it listed before, and
//!   the manifest of the RP that never committed is gone;
//! - nothing is lost: every listed RP restores bit-identical, `store check` is clean;
//! - nothing is resent: the next cycle finds every block of the interrupted one
//!   stored and sends no blob, and the target's blob count does not change.

use std::collections::BTreeMap;
use std::time::Duration;

use drmesh_tests::{hash_hex, report_seq, report_stat, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;
const ROUNDS: usize = 10;

fn manifests(mesh: &TestMesh) -> Vec<String> {
    let dir = mesh.node("dst").state_dir.join("store/manifests/vol");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn blob_count(mesh: &TestMesh) -> u64 {
    mesh.store_stats("dst")["blob_count"].as_u64().expect("blob_count")
}

#[test]
fn kill_between_blobs_manifest_and_commit_loses_and_resends_nothing() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0xc7a5_0001);
    let mut image = vec![0u8; 8 * MIB];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let mut expected: BTreeMap<u64, String> = BTreeMap::new();
    expected.insert(report_seq(&mesh.sync_ok("src", "vol")), hash_hex(&image));

    for round in 0..2 * ROUNDS {
        let point = if round < ROUNDS { "store.before-manifest" } else { "store.before-commit" };
        // The target restarts armed to die at the point.
        assert!(mesh.stop("dst"));
        mesh.start_with_env("dst", "topology.toml", &[("DRMESH_CRASH_AT", point)]);
        mesh.wait_connected("src", &["dst"]);
        let listed_before = mesh.rp_seqs("dst", "vol");
        let manifests_before = manifests(&mesh);
        let blobs_before = blob_count(&mesh);
        for _ in 0..4 {
            let b = rng.below((image.len() / BLOCK) as u64) as usize;
            rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
        }
        write_image_atomic(&image_path, &image);

        let answer = mesh.sync_now("src", "vol");
        assert!(answer.is_err(), "round {round}: the cycle committed although the target was to die at {point}: {answer:?}");
        wait_until("the target died at its crash point", Duration::from_secs(20), || !mesh.node_mut("dst").is_running());
        let after_crash = manifests(&mesh);
        if point == "store.before-commit" {
            assert_eq!(after_crash.len(), manifests_before.len() + 1, "round {round}: the manifest was to be durable before the commit: {after_crash:?}");
        } else {
            assert_eq!(after_crash, manifests_before, "round {round}: no manifest was to be written");
        }

        mesh.start("dst", "topology.toml");
        mesh.wait_connected("src", &["dst"]);
        mesh.wait_connected("dst", &["src"]);
        // Nothing half-listed (a cycle the scheduler retried on its own may have committed since: only as a whole RP).
        let listed = mesh.rp_seqs("dst", "vol");
        assert!(listed.starts_with(&listed_before), "round {round}: {listed_before:?} became {listed:?}");
        let blobs_after_restart = blob_count(&mesh);
        assert!(blobs_after_restart > blobs_before, "round {round}: the interrupted cycle's blobs were to be stored durably");

        let data = mesh.sync_ok("src", "vol");
        let sent = report_stat(&data, "full_blocks") + report_stat(&data, "delta_blocks");
        assert_eq!(sent, 0, "round {round}: the cycle after the crash resent blocks the target held: {data}");
        assert_eq!(blob_count(&mesh), blobs_after_restart, "round {round}: blobs were stored again");
        let seq = report_seq(&data);
        expected.insert(seq, hash_hex(&image));
        let listed = mesh.rp_seqs("dst", "vol");
        assert_eq!(listed, expected.keys().copied().collect::<Vec<_>>(), "round {round}: every RP, none twice, none half");
        assert_eq!(manifests(&mesh).len(), listed.len(), "round {round}: one manifest per RP: {:?}", manifests(&mesh));
        assert_eq!(mesh.restore_hash("dst", &format!("vol@{seq}"), None), expected[&seq], "round {round}");
        eprintln!("round {round}: died at {point}; after restart {} RPs listed, the next cycle sent 0 blobs and committed vol@{seq}", listed.len());
    }
    // Nothing lost: every RP restores, and the store is sound.
    assert!(mesh.stop("dst"));
    for (seq, hash) in &expected {
        assert_eq!(&mesh.restore_hash("dst", &format!("vol@{seq}"), None), hash, "vol@{seq}");
    }
    let out = drmesh_tests::drmesh(&["store", "check", "--state-dir", mesh.node("dst").state_dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "store check after the crash rounds: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
