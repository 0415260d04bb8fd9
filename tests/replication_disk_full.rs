//! Story: the target's disk fills up. The cycle that does not fit fails with an
//! error that says "disk full"; the catalog is untouched, so earlier recovery
//! points stay listed and restore bit-identical (promise 5); once space is freed
//! the next cycle succeeds.
//!
//! Needs root (loop-mounted ext4 as the target's state dir); skipped otherwise.

use std::io::Read as _;
use std::process::Command;
use std::time::{Duration, Instant};

use drmesh_tests::{hash_hex, is_root, run_ok, LoopFs, parse_ctl_json, report_seq, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};

const MIB: usize = 1 << 20;

/// `sync-now vol` on src that must answer within `timeout`: a cycle must fail, not hang.
fn sync_bounded(mesh: &TestMesh, timeout: Duration) -> Result<serde_json::Value, String> {
    let mut child = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let volumes = mesh.ctl_data("src", &["volumes"]);
            panic!(
                "sync-now did not answer within {timeout:?}: the cycle hangs instead of failing on the full disk\nsrc volumes: {volumes:?}\n--- dst log tail:\n{}",
                mesh.node("dst").log_text().lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    parse_ctl_json(&std::process::Output { status, stdout, stderr: Vec::new() })
}

#[test]
fn full_target_disk_fails_the_cycle_not_the_catalog() {
    if !is_root() {
        eprintln!("SKIPPED full_target_disk_fails_the_cycle_not_the_catalog: needs root to loop-mount a small ext4 file system (CI runs it as root)");
        return;
    }
    // Declared before the mesh so it is unmounted after the nodes are gone.
    let fs = LoopFs::new(40);
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // Move dst's state dir (identity made by `drmesh init`) onto the small file system.
    let old = mesh.node("dst").state_dir.clone();
    let new = fs.path().join("dst");
    run_ok(Command::new("cp").arg("-a").arg(&old).arg(&new));
    std::fs::remove_dir_all(&old).unwrap();
    mesh.node_mut("dst").state_dir = new.clone();
    // A filler file to delete later to make room.
    let filler = fs.path().join("filler");
    let mut rng = Rng::new(0xd15c_0001);
    let mut fill = vec![0u8; 8 * MIB];
    rng.fill(&mut fill);
    std::fs::write(&filler, &fill).unwrap();
    run_ok(&mut Command::new("sync"));

    let image_path = mesh.dir.path().join("disk.img");
    let mut image = vec![0u8; 10 * MIB];
    rng.fill(&mut image);
    write_image_atomic(&image_path, &image);
    let first_hash = hash_hex(&image);
    let vol = VolumeSpec::new("vol", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);

    // 1. Fits.
    let data = mesh.sync_ok("src", "vol");
    let first = report_seq(&data);
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{first}"), None), first_hash);
    let listed_before = mesh.rps("dst", "vol");

    // 2. Grow the image by 24 MiB of incompressible data: more than the free space.
    let old_len = image.len();
    image.resize(old_len + 24 * MIB, 0);
    rng.fill(&mut image[old_len..]);
    write_image_atomic(&image_path, &image);
    let err = sync_bounded(&mesh, Duration::from_secs(30)).expect_err("a cycle larger than the target's free space must fail");
    assert!(err.contains("disk full"), "the error must say the target disk is full: {err}");
    assert!(mesh.node_mut("dst").is_running(), "the target died on a full disk:\n{}", mesh.node("dst").log_text());

    // The catalog is untouched: the same RPs, and they restore bit-identical.
    let listed_after = mesh.rps("dst", "vol");
    assert_eq!(listed_after, listed_before, "a failed cycle changed the RP list");
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{first}"), None), first_hash);
    let out = mesh.verify("dst", &format!("vol@{first}"), None);
    assert!(out.status.success(), "verify after disk full: {}", String::from_utf8_lossy(&out.stderr));
    // The source's status says why.
    let volumes = mesh.ctl_data("src", &["volumes"]).unwrap();
    assert!(volumes.to_string().contains("disk full"), "{volumes}");

    // 3. Free space: drop the filler and shrink the image to 4 MiB of the new data.
    std::fs::remove_file(&filler).unwrap();
    image.truncate(old_len + 4 * MIB);
    write_image_atomic(&image_path, &image);
    let data = mesh.sync_ok("src", "vol");
    let seq = report_seq(&data);
    assert!(seq > first, "{data}");
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{seq}"), None), hash_hex(&image));
    assert_eq!(mesh.restore_hash("dst", &format!("vol@{first}"), None), first_hash);
    drop(mesh);
    drop(fs);
}
