//! Story: the target's disk is not to be trusted, and its store is garbage
//! collected while cycles run.
//! - A flipped byte in a blob file makes `drmesh verify` fail naming the blob,
//!   and `drmesh restore` fail loudly leaving no image (nothing at PATH, no temporary file).
//! - GC run again and again during a large cycle never eats a blob that cycle
//!   relies on (promise 6): the new RP restores bit-identical and verifies.
//! - Retention prunes to `keep_last`, GC then frees bytes, and the kept RPs
//!   still restore bit-identical.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::Duration;

use drmesh_tests::{blob_files, hash_hex, parse_ctl_json, report_seq, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;
const BLOCK: usize = 256 << 10;

fn mesh_with(policy: PolicySpec, image: &[u8]) -> (TestMesh, std::path::PathBuf) {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    write_image_atomic(&image_path, image);
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, &policy.name);
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    mesh.wait_connected("dst", &["src"]);
    (mesh, image_path)
}

#[test]
fn tampered_blob_fails_verify_and_restore_leaves_no_image() {
    let mut rng = Rng::new(0x7a3e_0001);
    let mut image = vec![0u8; 4 * MIB];
    rng.fill(&mut image);
    let (mesh, _) = mesh_with(PolicySpec::new("p", "256KiB"), &image);
    let seq = report_seq(&mesh.sync_ok("src", "vol"));
    let rp = format!("vol@{seq}");
    assert_eq!(mesh.restore_hash("dst", &rp, None), hash_hex(&image));

    // Flip one payload byte of one blob.
    let files = blob_files(&mesh.node("dst").state_dir);
    let victim = &files[files.len() / 2];
    let blob = victim.file_name().unwrap().to_string_lossy().to_string();
    let mut bytes = std::fs::read(victim).unwrap();
    assert!(bytes.len() > 1000, "{}", bytes.len());
    bytes[300] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();

    let out = mesh.verify("dst", &rp, None);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "verify passed over a tampered blob: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(&blob), "verify must name the damaged blob {blob}: {err}");
    assert!(err.contains("block "), "verify must name the block: {err}");

    let to = mesh.dir.path().join("restored.img");
    let before = drmesh_tests::dir_names(mesh.dir.path());
    let out = mesh.restore("dst", &rp, &to, None);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "restore succeeded from a tampered blob");
    assert!(err.contains(&blob), "restore must name the damaged blob {blob}: {err}");
    assert!(!to.exists(), "a failed restore left {}", to.display());
    assert_eq!(drmesh_tests::dir_names(mesh.dir.path()), before, "a failed restore left a file behind");
}

#[test]
fn gc_during_a_running_cycle_keeps_its_blobs() {
    let mut rng = Rng::new(0x7a3e_0002);
    let mut image = vec![0u8; MIB];
    rng.fill(&mut image);
    let (mesh, image_path) = mesh_with(PolicySpec::new("p", "256KiB"), &image);
    mesh.sync_ok("src", "vol");

    // 48 MiB of new incompressible data, and GC with no grace window all along the cycle.
    image.resize(49 * MIB, 0);
    rng.fill(&mut image[MIB..]);
    write_image_atomic(&image_path, &image);
    let mut child = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    let mut gcs = 0;
    let mut deleted = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the cycle did not finish");
        let report = mesh.ctl_data("dst", &["gc", "--grace-secs", "0"]).expect("gc");
        deleted += report["blobs_deleted"].as_u64().unwrap();
        gcs += 1;
    }
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    let data = parse_ctl_json(&std::process::Output { status, stdout, stderr: Vec::new() }).expect("the cycle under GC failed");
    eprintln!("{gcs} GC runs during the cycle deleted {deleted} blobs");
    assert!(gcs >= 2, "GC did not run while the cycle ran");
    let seq = report_seq(&data);
    let rp = format!("vol@{seq}");
    let out = mesh.verify("dst", &rp, None);
    assert!(out.status.success(), "verify {rp} after GC during its cycle: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mesh.restore_hash("dst", &rp, None), hash_hex(&image));
    // And after one more GC with nothing running.
    mesh.ctl_data("dst", &["gc", "--grace-secs", "0"]).expect("gc");
    assert_eq!(mesh.restore_hash("dst", &rp, None), hash_hex(&image));
}

#[test]
fn retention_prunes_and_gc_frees_without_touching_kept_rps() {
    let mut rng = Rng::new(0x7a3e_0003);
    let mut image = vec![0u8; 8 * MIB];
    rng.fill(&mut image);
    let mut policy = PolicySpec::new("p", "256KiB");
    policy.keep_last = Some(2);
    let (mesh, image_path) = mesh_with(policy, &image);
    let mut expected = BTreeMap::new();
    for cycle in 0..4 {
        if cycle > 0 {
            // Rewrite 8 whole blocks: their old contents are only in older RPs.
            for _ in 0..8 {
                let b = rng.below((image.len() / BLOCK) as u64) as usize;
                rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
            }
            write_image_atomic(&image_path, &image);
        }
        let data = mesh.sync_ok("src", "vol");
        expected.insert(report_seq(&data), hash_hex(&image));
    }
    let listed = mesh.rp_seqs("dst", "vol");
    let newest: Vec<u64> = expected.keys().rev().take(2).rev().copied().collect();
    assert_eq!(listed, newest, "keep_last = 2 keeps exactly the 2 newest RPs");

    let blobs_before = mesh.store_stats("dst")["blob_count"].as_u64().unwrap();
    let report = mesh.ctl_data("dst", &["gc", "--grace-secs", "0"]).expect("gc");
    assert!(report["bytes_freed"].as_u64().unwrap() > 0, "GC freed nothing after pruning: {report}");
    assert!(report["blobs_deleted"].as_u64().unwrap() > 0, "{report}");
    let blobs_after = mesh.store_stats("dst")["blob_count"].as_u64().unwrap();
    assert!(blobs_after < blobs_before, "{blobs_before} -> {blobs_after}");
    for seq in &listed {
        let rp = format!("vol@{seq}");
        assert_eq!(&mesh.restore_hash("dst", &rp, None), &expected[seq], "{rp} after prune + GC");
        let out = mesh.verify("dst", &rp, None);
        assert!(out.status.success(), "verify {rp}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A second GC finds nothing more to free.
    let report = mesh.ctl_data("dst", &["gc", "--grace-secs", "0"]).expect("gc");
    assert_eq!(report["blobs_deleted"], 0, "{report}");
}
