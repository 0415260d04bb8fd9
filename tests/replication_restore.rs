//! Story: a file volume is replicated from node "src" to node "dst": a full
//! first cycle, then incremental cycles that send only deltas of the changed
//! pages, a cycle that zeroes a region and one that grows the file. Every
//! recovery point restores bit-identical to the image at its cycle, and
//! `drmesh verify` passes for each (promise 1). With an encrypted policy the
//! target's blob files never contain the plaintext, and block ids are keyed.

use std::collections::BTreeMap;

use drmesh_tests::{
    blob_files, build_image, churn_pages, hash_hex, report_seq, report_stat, write_image_atomic, write_key_file, PolicySpec, Rng, TestMesh,
    VolumeSpec,
};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;

/// Starts dst then src on `topology.toml` and waits until they see each other.
fn start_pair(mesh: &mut TestMesh) {
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    mesh.wait_connected("dst", &["src"]);
}

/// Runs sync-now and records every newly listed RP as holding `image` (the image is
/// only changed between cycles, so any RP that appeared meanwhile has this content).
fn sync_and_record(mesh: &TestMesh, volume: &str, image: &[u8], expected: &mut BTreeMap<u64, String>) -> serde_json::Value {
    let data = mesh.sync_ok("src", volume);
    let hash = hash_hex(image);
    for seq in mesh.rp_seqs("dst", volume) {
        expected.entry(seq).or_insert_with(|| hash.clone());
    }
    let seq = report_seq(&data);
    assert_eq!(expected.get(&seq), Some(&hash), "the RP of this cycle ({seq}) must be listed on the target: {data}");
    data
}

/// Restores and verifies every listed RP and compares it with the image of its cycle.
fn check_every_rp(mesh: &TestMesh, volume: &str, expected: &BTreeMap<u64, String>) {
    let listed = mesh.rp_seqs("dst", volume);
    assert_eq!(listed, expected.keys().copied().collect::<Vec<_>>(), "RPs listed on the target");
    for (seq, hash) in expected {
        let rp = format!("{volume}@{seq}");
        let got = mesh.restore_hash("dst", &rp, None);
        assert_eq!(&got, hash, "{rp} does not restore to the image of its cycle");
        let out = mesh.verify("dst", &rp, None);
        assert!(out.status.success(), "verify {rp}: {}", String::from_utf8_lossy(&out.stderr));
        let report = drmesh_tests::restore_result(&out).expect("verify --json");
        assert_eq!(report["rp"]["seq"], *seq);
    }
}

#[test]
fn every_recovery_point_restores_bit_identical() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x5eed_0001);
    let mut image = build_image(&mut rng, 24 * MIB);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("disk", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    start_pair(&mut mesh);

    let mut expected = BTreeMap::new();
    // 1. Initial full copy.
    let first = sync_and_record(&mesh, "disk", &image, &mut expected);
    let r = &first["reports"][0];
    assert_eq!(r["volume_bytes"], image.len() as u64, "{first}");
    assert!(report_stat(&first, "offered_blocks") >= 1, "{first}");
    // The image has compressible text and zero regions: less goes over the wire than its size.
    assert!(report_stat(&first, "sent_payload_bytes") < image.len() as u64, "{first}");

    // 2-4. Incremental cycles: 12 random 4 KiB pages each, sent as deltas.
    for round in 0..3 {
        let pages = churn_pages(&mut rng, &mut image, 12);
        write_image_atomic(&image_path, &image);
        let data = sync_and_record(&mesh, "disk", &image, &mut expected);
        let r = &data["reports"][0];
        assert_eq!(r["full_offer"], false, "round {round}: an incremental cycle must not offer every block: {data}");
        let changed_blocks: std::collections::BTreeSet<usize> = pages.iter().map(|o| o / BLOCK).collect();
        assert!(
            report_stat(&data, "offered_blocks") <= changed_blocks.len() as u64,
            "round {round}: offered more blocks than changed ({changed_blocks:?}): {data}"
        );
        assert!(report_stat(&data, "delta_blocks") > 0, "round {round}: page changes must travel as deltas: {data}");
        let sent = report_stat(&data, "sent_payload_bytes");
        assert!(sent > 0, "round {round}: {data}");
        assert!(
            sent < image.len() as u64 / 10,
            "round {round}: {sent} payload bytes sent for 12 changed pages of a {} byte image: {data}",
            image.len()
        );
    }

    // 5. Zero a region (unaligned start, spanning whole blocks).
    let start = 5 * BLOCK + 12_345;
    image[start..start + 3 * MIB].fill(0);
    write_image_atomic(&image_path, &image);
    let data = sync_and_record(&mesh, "disk", &image, &mut expected);
    assert!(report_stat(&data, "offered_blocks") >= 1, "{data}");

    // 6. Grow the file by 3 MiB and a bit (the last block is short).
    let old_len = image.len();
    image.resize(old_len + 3 * MIB + 5_000, 0);
    rng.fill(&mut image[old_len..]);
    write_image_atomic(&image_path, &image);
    let data = sync_and_record(&mesh, "disk", &image, &mut expected);
    assert_eq!(data["reports"][0]["volume_bytes"], image.len() as u64, "{data}");
    assert!(report_stat(&data, "full_blocks") >= 12, "the new blocks are sent whole: {data}");

    assert!(expected.len() >= 6, "{expected:?}");
    check_every_rp(&mesh, "disk", &expected);

    // The newest RP is also what `VOLUME` (no @SEQ) restores.
    let newest = *expected.keys().last().unwrap();
    let got = mesh.restore_hash("dst", "disk", None);
    assert_eq!(got, expected[&newest]);
}

#[test]
fn encrypted_policy_restores_and_target_never_sees_plaintext() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("secret.img");
    let key_path = mesh.dir.path().join("secret.key");
    let mut rng = Rng::new(0x5eed_0002);
    write_key_file(&key_path, &mut rng);
    let marker = b"DRMESH-PLAINTEXT-MARKER-7f3a9c-do-not-leak";
    let mut image = build_image(&mut rng, 8 * MIB);
    // The marker, many times, in text, in random data and at block starts.
    for i in 0..32 {
        let at = i * (image.len() / 32) + (i * 977) % 4000;
        image[at..at + marker.len()].copy_from_slice(marker);
    }
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("secret", "src", &["dst"], &image_path, "enc");
    let mut policy = PolicySpec::new("enc", "256KiB");
    policy.encryption_key_file = Some(key_path.clone());
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    start_pair(&mut mesh);

    let mut expected = BTreeMap::new();
    sync_and_record(&mesh, "secret", &image, &mut expected);
    let pages = churn_pages(&mut rng, &mut image, 6);
    // The marker also lands in a changed page (a delta).
    image[pages[0]..pages[0] + marker.len()].copy_from_slice(marker);
    write_image_atomic(&image_path, &image);
    sync_and_record(&mesh, "secret", &image, &mut expected);

    for rp in mesh.rps("dst", "secret") {
        assert_eq!(rp["encrypted"], true, "{rp}");
    }
    check_every_rp(&mesh, "secret", &expected);

    // Nothing on the target's disk holds the plaintext marker.
    let files = blob_files(&mesh.node("dst").state_dir);
    assert!(!files.is_empty(), "no blob files on the target");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker), "plaintext marker found in blob {}", f.display());
    }
    // Block ids are keyed: no blob is named after the plain blake3 of a block.
    let names: std::collections::HashSet<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().to_string()).collect();
    for block in image.chunks(BLOCK) {
        assert!(!names.contains(&hash_hex(block)), "a blob is named after the plain hash of a block");
    }
}

/// A source whose change-tracking baseline is gone (its state was lost and restored
/// from an old backup, or a fresh agent install) offers every block again. The RP
/// must still be the source's bytes: blocks that are zero now, but were not in the
/// target's newest RP, must be recorded as zero.
#[test]
fn full_copy_without_baseline_records_zeroed_blocks() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x5eed_0003);
    let mut image = vec![0u8; 4 * MIB];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("disk", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    start_pair(&mut mesh);
    let mut expected = BTreeMap::new();
    sync_and_record(&mesh, "disk", &image, &mut expected);

    // The source loses its baseline; meanwhile block 3 was zeroed.
    assert!(mesh.stop("src"));
    let baseline = mesh.node("src").state_dir.join("source.redb");
    assert!(baseline.exists(), "no baseline file at {}", baseline.display());
    std::fs::remove_file(&baseline).unwrap();
    image[3 * BLOCK..4 * BLOCK].fill(0);
    write_image_atomic(&image_path, &image);
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let data = sync_and_record(&mesh, "disk", &image, &mut expected);
    assert_eq!(data["reports"][0]["full_offer"], true, "{data}");
    assert_eq!(report_stat(&data, "full_blocks") + report_stat(&data, "delta_blocks"), 0, "the target held every non-zero block: {data}");
    check_every_rp(&mesh, "disk", &expected);
}

/// Changing a policy's block size makes the next cycle a full copy (docs/topology.md);
/// its RP restores bit-identical, zero blocks included.
#[test]
fn block_size_change_full_copy_restores_bit_identical() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x5eed_0004);
    let mut image = build_image(&mut rng, 6 * MIB);
    // A 1 MiB zero region aligned to both block sizes, and data right before it.
    image[2 * MIB..3 * MIB].fill(0);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("disk", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], std::slice::from_ref(&vol), &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    start_pair(&mut mesh);
    let mut expected = BTreeMap::new();
    sync_and_record(&mesh, "disk", &image, &mut expected);

    let text = mesh.replication_topology(2, &["src", "dst"], &[vol], &[PolicySpec::new("p", "512KiB")]);
    mesh.write_file("topology.toml", &text);
    for n in ["src", "dst"] {
        let out = mesh.ctl(n, &["reload"]);
        assert!(out.status.success(), "reload {n}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let data = sync_and_record(&mesh, "disk", &image, &mut expected);
    assert_eq!(data["reports"][0]["full_offer"], true, "{data}");
    let newest = mesh.rps("dst", "disk").last().cloned().unwrap();
    assert_eq!(newest["block_bytes"], 512 << 10, "{newest}");
    check_every_rp(&mesh, "disk", &expected);
}
