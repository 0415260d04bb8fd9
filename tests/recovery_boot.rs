//! Story: a physical Debian server (a real disk image built by
//! scripts/recovery-image: MBR, GRUB, fstab naming /dev/sda1, a static IP, no
//! virtio drivers in its initramfs) is protected by a `file` volume. Disaster:
//! on the DR node, `drmesh recover server@SEQ --boot --adapt` boots the
//! recovery point in qemu before any restore: the image is adapted on the
//! export's overlay (fstab to UUIDs, DHCP, virtio in a rebuilt initramfs) and
//! boots from a virtio disk to its boot marker. The same RP restored to a loop
//! device boots as the physical disk it was; and a live restore copies the RP
//! to a device while the VM runs and switches the VM to it.
//!
//! Needs root (loop devices, mounts, namespaces) and qemu; the image is built
//! once and cached outside the repository (scripts/test builds it). Each boot
//! runs under TCG and prints how long it took.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{debian_image, drmesh, file_hash, manifest_get as get, restore_result, run_ok, LoopDevice, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// src protects `server` (a sparse copy of the Debian image) to dst; one RP.
fn protect(image: &Path) -> (TestMesh, PathBuf, String) {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let disk = mesh.dir.path().join("server.img");
    run_ok(Command::new("cp").arg("--sparse=always").arg(image).arg(&disk));
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.compression = Some("zstd:1".into());
    let vol = VolumeSpec::new("server", "src", &["dst"], &disk, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let started = Instant::now();
    let sync = mesh.sync_ok("src", "server");
    eprintln!("replicated the 2 GiB Debian disk in {:.1} s", started.elapsed().as_secs_f64());
    let seq = sync["reports"][0]["seq"].as_u64().expect("seq");
    (mesh, disk, format!("server@{seq}"))
}

/// `drmesh recover RP --state-dir <dst> --boot --until-booted --json EXTRA...`: the result.
fn recover(mesh: &TestMesh, rp: &str, extra: &[&str]) -> Value {
    let state = mesh.node("dst").state_dir.to_str().expect("utf8").to_string();
    let mut args = vec!["recover", rp, "--state-dir", state.as_str(), "--boot", "--until-booted", "--marker", "DRMESH-BOOT-OK", "--boot-timeout", "420", "--json"];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let out = drmesh(&args);
    let took = started.elapsed().as_secs_f64();
    let result = restore_result(&out).unwrap_or_else(|e| panic!("drmesh {}: {e}\nstderr:\n{}\n--- dst log:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr), mesh.node("dst").log_text()));
    eprintln!("drmesh {} took {took:.1} s (boot marker {:.1} s after qemu started)", extra.join(" "), result["boot_secs"].as_f64().unwrap_or(0.0));
    result
}

/// Boots a disk directly with qemu (IDE, read-only snapshot) to the boot marker; returns the seconds.
fn boot_device(dev: &Path, log: &Path) -> f64 {
    let started = Instant::now();
    let mut qemu = drmesh_tests::spawn_qemu_ide(dev, true, log);
    let deadline = Instant::now() + Duration::from_secs(420);
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).to_string();
        if text.contains("DRMESH-BOOT-OK") {
            break;
        }
        let failed = ["Kernel panic", "Dropping to a shell", "emergency mode"].iter().any(|m| text.contains(m));
        if failed || Instant::now() > deadline || qemu.try_wait().expect("qemu").is_some() {
            let _ = qemu.kill();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!("{} did not boot; console tail:\n{}", dev.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    started.elapsed().as_secs_f64()
}

#[test]
fn a_physical_debian_server_boots_from_its_recovery_point() {
    let Some((image, manifest)) = debian_image() else { return };
    let (mesh, disk, rp) = protect(&image);
    let work = mesh.dir.path().to_path_buf();
    let uuid = get(&manifest, "root_uuid").to_string();

    // Instant recovery with adaptation: virtio disk, DHCP, UUID in fstab, virtio in the initramfs.
    let boot = recover(&mesh, &rp, &["--adapt"]);
    assert_eq!(boot["booted"], true, "{boot}");
    assert_eq!(boot["disk_bus"], "virtio", "{boot}");
    let report = boot["adaptation"].to_string();
    assert!(report.contains(&format!("UUID={uuid}")), "fstab was rewritten to the root's UUID: {report}");
    assert!(report.contains("dhcp") || report.contains("DHCP"), "the network was switched to DHCP: {report}");
    assert!(report.contains("virtio_blk"), "the initramfs was checked for virtio: {report}");
    // The RP itself is untouched by the adaptation and the boot.
    let before = file_hash(&disk);
    let out = drmesh(&["verify", &rp, "--state-dir", mesh.node("dst").state_dir.to_str().unwrap(), "--json"]);
    restore_result(&out).unwrap_or_else(|e| panic!("verify after the boot: {e}"));
    assert_eq!(file_hash(&disk), before);

    // The same RP restored to a loop device boots as the physical disk it was (IDE, no adaptation).
    let dev = LoopDevice::new_file(&work.join("restored-disk.raw"), 2048 * MIB);
    let out = drmesh(&["restore", &rp, "--to", dev.path.to_str().unwrap(), "--state-dir", mesh.node("dst").state_dir.to_str().unwrap(), "--json"]);
    let restored = restore_result(&out).unwrap_or_else(|e| panic!("restore to {}: {e}", dev.path.display()));
    assert_eq!(restored["output_kind"], "device");
    assert_eq!(file_hash(&dev.backing), file_hash(&disk), "the device holds the server's disk byte for byte");
    let secs = boot_device(&dev.path, &work.join("loop-boot.log"));
    eprintln!("booted the restored loop device in {secs:.1} s (TCG)");

    // A recover killed in the middle of its adaptation leaves mounts, loop devices
    // and nbdfuse behind; the next recover cleans them up.
    let state = mesh.node("dst").state_dir.clone();
    let mounts_under = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| Path::new(p).starts_with(dir)).map(String::from).collect()
    };
    let mut victim = Command::new(drmesh_tests::drmesh_bin())
        .args(["recover", &rp, "--state-dir", state.to_str().unwrap(), "--boot", "--adapt", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runs = state.join("recover");
    drmesh_tests::wait_until("the adaptation mounts the image's root", Duration::from_secs(120), || mounts_under(&runs).iter().any(|m| m.ends_with("/root")));
    victim.kill().unwrap();
    victim.wait().unwrap();
    assert!(!mounts_under(&runs).is_empty(), "the killed recover left its mounts (as expected)");

    // Live restore: boot from the export (IDE, as the physical disk), copy to a
    // device while the VM runs, switch the VM to it.
    let live_dev = LoopDevice::new_file(&work.join("live-disk.raw"), 2048 * MIB);
    let live = recover(&mesh, &rp, &["--then-restore-to", live_dev.path.to_str().unwrap()]);
    assert_eq!(live["live_restore"]["switched"], true, "{live}");
    assert!(mounts_under(&runs).is_empty(), "the next recover released the killed one's mounts: {:?}", mounts_under(&runs));
    assert!(std::fs::read_dir(&runs).map(|d| d.count()).unwrap_or(0) == 0, "and removed its folder");
    let mut head = vec![0u8; MIB as usize];
    use std::io::Read as _;
    std::fs::File::open(&live_dev.backing).unwrap().read_exact(&mut head).unwrap();
    let mut want = vec![0u8; MIB as usize];
    std::fs::File::open(&disk).unwrap().read_exact(&mut want).unwrap();
    assert_eq!(head, want, "the live-restored device starts with the server's MBR and GRUB");
}
