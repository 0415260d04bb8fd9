//! Story: retention drops old recovery points, and their blocks must not
//! fill the target's disk. `drmesh ctl gc --dry-run` says what a collection
//! would free and frees nothing; with `gc_every` the target collects on its
//! own (after the grace window that protects blobs of running cycles), and
//! the RP it keeps still restores bit for bit.

use std::time::Duration;

use drmesh_tests::{hash_hex, parse_ctl_json, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;

#[test]
fn gc_dry_run_frees_nothing_and_the_schedule_collects_old_blocks() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x6c5c_0001);
    let mut image = vec![0u8; 8 * MIB];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.keep_last = Some(1);
    let base = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("vol", "src", &["dst"], &image_path, "p")], &[policy]);
    // `gc_every` of dst, written into its [[node]] table.
    let dst_id = mesh.node("dst").id.clone();
    let topology = |version: u64, gc_every: &str| {
        base.replacen("version = 1", &format!("version = {version}"), 1)
            .replacen(&format!("id = \"{dst_id}\"\n"), &format!("id = \"{dst_id}\"\ngc_every = \"{gc_every}\"\n"), 1)
    };
    let text = topology(1, "off");
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    wait_until("the first RP", Duration::from_secs(60), || !mesh.rp_seqs("dst", "vol").is_empty());

    // Every block changes: the next RP shares nothing, retention drops the first.
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    mesh.sync_ok("src", "vol");
    let seqs = mesh.rp_seqs("dst", "vol");
    assert_eq!(seqs.len(), 1, "keep_last = 1: {seqs:?}");
    let before = mesh.store_stats("dst")["blob_count"].as_u64().expect("blob_count");
    assert!(before >= 16, "both RPs' blobs are still there: {before}");

    let dry = parse_ctl_json(&mesh.ctl("dst", &["gc", "--dry-run", "--grace-secs", "0", "--json"])).expect("gc --dry-run");
    assert_eq!(dry["dry_run"], true, "{dry}");
    let would = dry["blobs_deleted"].as_u64().expect("blobs_deleted");
    assert!(would >= 8, "the dropped RP's 8 blocks would go: {dry}");
    assert!(dry["bytes_freed"].as_u64().unwrap_or(0) >= 8 * MIB as u64, "{dry}");
    assert_eq!(mesh.store_stats("dst")["blob_count"].as_u64(), Some(before), "a dry run deleted something");
    let out = mesh.ctl("dst", &["gc", "--dry-run", "--grace-secs", "0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.starts_with("gc: marking 0 of ")), "no progress line: {stderr}");
    assert!(text.contains(&format!("would delete (dry run, nothing deleted) {would} (")), "{text}");

    // On its own schedule (a 60 s grace window first: the blobs are younger).
    mesh.write_file("topology.toml", &topology(2, "5s"));
    let out = mesh.ctl("dst", &["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("a scheduled collection deletes the dropped RP's blobs", Duration::from_secs(150), || {
        mesh.store_stats("dst")["blob_count"].as_u64().is_some_and(|n| n <= before - would)
    });
    assert!(mesh.node("dst").log_text().contains("scheduled garbage collection done"));
    let seq = seqs[0];
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{seq}"), None), hash_hex(&image));
}
