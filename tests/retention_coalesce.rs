//! Story: a volume that rarely changes is replicated every few seconds with
//! `keep_last = 2`. Without coalescing, two unchanged cycles would push every
//! real change out of the history; with `coalesce_unchanged = true` an RP
//! followed by an identical one is dropped, so the two kept RPs are two
//! distinct states of the volume, and each restores to what it was.

use drmesh_tests::{hash_hex, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

#[test]
fn unchanged_rps_are_coalesced_and_history_keeps_distinct_states() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0xc0a1_e5ce);
    let mut image = vec![0u8; 4 << 20];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let first = hash_hex(&image);
    let policy = PolicySpec::new("p", "1MiB");
    let mut text = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("vol", "src", &["dst"], &image_path, "p")], &[policy]);
    text.push_str("retention = { keep_last = 2, coalesce_unchanged = true }\n");
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // Unchanged cycles: each new RP replaces the identical one before it.
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let sync = mesh.sync_ok("src", "vol");
        seqs.push(sync["reports"][0]["seq"].as_u64().expect("seq"));
        assert_eq!(mesh.rp_seqs("dst", "vol"), vec![*seqs.last().unwrap()], "an unchanged RP is kept beside its identical successor");
    }
    let old_state = *seqs.last().unwrap();

    // A change, then unchanged cycles again: the old state stays.
    rng.fill(&mut image[..1 << 20]);
    write_image_atomic(&image_path, &image);
    let second = hash_hex(&image);
    let changed = mesh.sync_ok("src", "vol")["reports"][0]["seq"].as_u64().expect("seq");
    assert_eq!(mesh.rp_seqs("dst", "vol"), vec![old_state, changed]);
    let mut newest = changed;
    for _ in 0..2 {
        newest = mesh.sync_ok("src", "vol")["reports"][0]["seq"].as_u64().expect("seq");
        assert_eq!(mesh.rp_seqs("dst", "vol"), vec![old_state, newest], "keep_last = 2 counts distinct states");
    }
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{old_state}"), None), first);
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{newest}"), None), second);
}
