//! Story: a branch office protects three Debian servers (real bootable disks
//! built by scripts/recovery-image) to its DR node `dst`; a third node `obs`
//! holds nothing and only follows the mesh's catalog. The policy drills every
//! minute with `fsck` and `boot`. Two of the servers are broken in ways a
//! plain copy never shows: one had its root filesystem's superblock zeroed,
//! the other lost /sbin/init. The scheduled drills tell them apart (fsck
//! fails on the first, boot fails on the second with the console tail) and
//! verify the healthy one, and `obs` sees all three verdicts by gossip. A
//! fourth volume's policy adapts the image to the VM (virtio) before booting
//! it; an on-demand drill verifies it.
//! Then drills are killed with SIGKILL half-way (the node with them), once
//! while a script runs on the mounted filesystems and once while qemu boots:
//! after the node restarts nothing is left (no qemu, no mount, no loop
//! device, no process, no folder). Last, with no node running, `drmesh drill`
//! checks the store itself and records nothing.
//!
//! Needs root (loop devices, mounts) and qemu; the image is built once and
//! cached outside the repository (scripts/test builds it). Every boot runs
//! under TCG; the drills print their durations.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{debian_image, manifest_get as get, run_ok, wait_until, LoopDevice, Mount, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

/// The three disks: healthy, superblock zeroed, /sbin/init removed.
fn make_disks(image: &Path, dir: &Path, manifest: &[(String, String)]) -> [PathBuf; 3] {
    let start: u64 = get(manifest, "partition_start_bytes").parse().expect("partition start");
    let size: u64 = get(manifest, "partition_size_bytes").parse().expect("partition size");
    let disks = [dir.join("server.img"), dir.join("nofs.img"), dir.join("noinit.img")];
    for d in &disks {
        run_ok(Command::new("cp").arg("--sparse=always").arg(image).arg(d));
    }
    // The ext4 superblock lives 1024 bytes into the partition.
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&disks[1]).expect("open nofs");
        f.write_all_at(&[0u8; 1024], start + 1024).expect("zero the superblock");
        f.sync_all().expect("sync");
    }
    {
        let out = run_ok(Command::new("losetup").args(["--find", "--show", "--offset", &start.to_string(), "--sizelimit", &size.to_string()]).arg(&disks[2]));
        let dev = LoopDevice { path: PathBuf::from(out.trim()), backing: disks[2].clone() };
        let root = Mount::new(&[dev.path.to_str().expect("utf8")], &dir.join("noinit-root"));
        let init = root.point.join("usr/sbin/init");
        assert!(std::fs::symlink_metadata(&init).is_ok(), "the image has /sbin/init");
        std::fs::remove_file(&init).expect("remove /sbin/init");
        drop(root);
        drop(dev);
    }
    disks
}

/// The newest drill report of `volume` kept on dst, if any.
fn newest_report(mesh: &TestMesh, volume: &str) -> Option<Value> {
    let data = mesh.ctl_data("dst", &["drills", volume]).ok()?;
    data["reports"].as_array()?.last().cloned()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"].as_array().and_then(|c| c.iter().find(|c| c["check"] == name)).unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

fn print_durations(volume: &str, report: &Value) {
    for c in report["checks"].as_array().into_iter().flatten() {
        eprintln!("drill of {volume}: {} {} in {:.1} s: {}", c["check"].as_str().unwrap_or("?"), if c["passed"] == true { "passed" } else { "FAILED" }, c["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0, c["summary"].as_str().unwrap_or(""));
    }
}

/// Everything under `dir` that a drill could leave: mounts, loop devices, qemu processes.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for p in mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| Path::new(p).starts_with(dir)) {
        found.push(format!("mount {p}"));
    }
    for l in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let back = std::fs::read_to_string(l.path().join("loop/backing_file")).unwrap_or_default();
        if Path::new(back.trim_end()).starts_with(dir) {
            found.push(format!("loop device {} on {}", l.file_name().to_string_lossy(), back.trim_end()));
        }
    }
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or_default();
        let cwd_inside = std::fs::read_link(p.path().join("cwd")).is_ok_and(|c| c.starts_with(dir));
        if (cmdline.contains(dir.to_str().unwrap_or("?")) || cwd_inside) && !program.ends_with("drmesh") {
            found.push(format!("process {}: {cmdline}", p.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn scheduled_drills_verify_a_good_server_and_tell_broken_ones_apart() {
    let Some((image, manifest)) = debian_image() else { return };
    let mut mesh = TestMesh::new(&["src", "dst", "obs"]);
    let dir = mesh.dir.path().to_path_buf();
    let disks = make_disks(&image, &dir, &manifest);
    let mut policy = PolicySpec::new("p", "1MiB");
    policy.compression = Some("zstd:1".into());
    let names = ["server", "nofs", "noinit"];
    let mut volumes: Vec<VolumeSpec> = names.iter().zip(&disks).map(|(n, d)| VolumeSpec::new(n, "src", &["dst"], d, "p")).collect();
    // The same server under a policy that adapts the image before booting it (virtio disk).
    volumes.push(VolumeSpec::new("virtio", "src", &["dst"], &disks[0], "q"));
    let mut adapted = policy.clone();
    adapted.name = "q".into();
    let mut text = mesh.replication_topology(1, &["src", "dst", "obs"], &volumes, &[policy, adapted]);
    text.push_str("\n[policy.q.drill]\nschedule = \"weekly sun 03:00\"\nchecks = [\"boot\"]\n[policy.q.drill.boot]\nadapt = true\nmarkers = [\"DRMESH-BOOT-OK\"]\ntimeout = \"5m\"\n");
    text.push_str("\n[policy.p.drill]\nschedule = \"every 1m\"\nchecks = [\"fsck\", \"boot\"]\ntime_limit = \"10m\"\nmax_unverified_age = \"1h\"\n[policy.p.drill.boot]\nmarkers = [\"DRMESH-BOOT-OK\"]\ntimeout = \"5m\"\n[policy.p.drill.script]\ncommand = [\"/bin/sleep\", \"600\"]\n");
    mesh.write_file("topology.toml", &text);
    let started = Instant::now();
    for n in ["dst", "obs", "src"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("src", &["dst", "obs"]);
    for n in names.iter().chain(&["virtio"]) {
        mesh.sync_ok("src", n);
    }
    eprintln!("replicated four 2 GiB Debian disks in {:.1} s", started.elapsed().as_secs_f64());

    // The schedule drills each volume's newest RP, one at a time.
    wait_until("a scheduled drill of each volume", Duration::from_secs(900), || names.iter().all(|n| newest_report(&mesh, n).is_some()));
    let server = newest_report(&mesh, "server").expect("report");
    print_durations("server", &server);
    assert_eq!((&server["trigger"], &server["verified"]), (&Value::from("schedule"), &Value::Bool(true)), "the healthy server is verified:\n{server:#}\n--- dst log:\n{}", mesh.node("dst").log_text());
    assert!(check(&server, "boot")["summary"].as_str().unwrap_or("").contains("DRMESH-BOOT-OK"), "{server:#}");

    let nofs = newest_report(&mesh, "nofs").expect("report");
    print_durations("nofs", &nofs);
    let fsck = check(&nofs, "fsck");
    assert_eq!((&nofs["passed"], &fsck["passed"]), (&Value::Bool(false), &Value::Bool(false)), "{nofs:#}");
    let why = format!("{} {}", fsck["summary"], fsck["output"]);
    assert!(why.contains("partition 1") && why.to_lowercase().contains("superblock"), "fsck says which partition and why:\n{why}");

    let noinit = newest_report(&mesh, "noinit").expect("report");
    print_durations("noinit", &noinit);
    assert_eq!(check(&noinit, "fsck")["passed"], true, "its filesystem is fine:\n{noinit:#}");
    let boot = check(&noinit, "boot");
    assert_eq!((&noinit["passed"], &boot["passed"]), (&Value::Bool(false), &Value::Bool(false)), "{noinit:#}");
    assert!(boot["output"].as_str().unwrap_or("").lines().count() >= 5, "the console tail comes with the failure:\n{boot:#}");

    // obs holds nothing, yet its catalog carries every verdict.
    wait_until("obs learns the three verdicts", Duration::from_secs(60), || {
        let Ok(cat) = mesh.ctl_data("obs", &["catalog"]) else { return false };
        let drilled = |v: &str| cat["rps"].as_array().into_iter().flatten().any(|r| r["volume"] == v && !r["drill"].is_null());
        names.iter().all(|n| drilled(n))
    });
    let cat = mesh.ctl_data("obs", &["catalog"]).expect("catalog");
    let drill_of = |v: &str| cat["rps"].as_array().into_iter().flatten().find(|r| r["volume"] == v && !r["drill"].is_null()).map(|r| r["drill"].clone()).expect("drill");
    assert_eq!(drill_of("server")["verified"], true);
    let failed: Vec<String> = ["nofs", "noinit"].iter().map(|v| drill_of(v)["checks"].as_array().into_iter().flatten().filter(|c| c["passed"] == false).map(|c| c["check"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>().join(",")).collect();
    assert!(failed[0].starts_with("fsck") && failed[1] == "boot", "obs tells the failures apart: {failed:?}");
    let server_ver = cat["volumes"].as_array().into_iter().flatten().find(|v| v["volume"] == "server").expect("server")["verification"].clone();
    assert_eq!((server_ver["overdue"].clone(), server_ver["verified_seq"].is_u64()), (Value::Bool(false), true), "{server_ver:#}");
    let table = String::from_utf8_lossy(&mesh.ctl("obs", &["catalog"]).stdout).to_string();
    eprintln!("{table}");
    assert!(table.contains("VERIFIED") && table.contains("FAILED (fsck") && table.contains("FAILED (boot)"), "{table}");

    // On demand, with boot adaptation (fstab, DHCP, virtio in the initramfs) on the overlay first.
    let state = mesh.node("dst").state_dir.clone();
    let out = drmesh_tests::drmesh(&["drill", "virtio", "--state-dir", state.to_str().expect("utf8"), "--json"]);
    let virtio = drmesh_tests::restore_result(&out).unwrap_or_else(|e| panic!("drill virtio: {e}\n{}\n--- dst log:\n{}", String::from_utf8_lossy(&out.stderr), mesh.node("dst").log_text()));
    print_durations("virtio (adapted)", &virtio);
    assert_eq!((&virtio["trigger"], &virtio["verified"]), (&Value::from("request"), &Value::Bool(true)), "{virtio:#}");

    // Drills killed half-way (the node with them, SIGKILL): while a script runs on the
    // mounted filesystems (FUSE export, loop devices, mounts, the script's process), and
    // while qemu boots. After a restart nothing is left.
    let runs = state.join("drills");
    let state_str = state.to_str().expect("utf8").to_string();
    for (checks, sign) in [("script", "mount"), ("boot", "qemu")] {
        let mut drill = Command::new(drmesh_tests::drmesh_bin()).args(["drill", "server", "--state-dir", &state_str, "--checks", checks, "--json"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("drmesh drill");
        wait_until(&format!("the {checks} drill's {sign} is there"), Duration::from_secs(120), || leftovers(&runs).iter().any(|l| l.contains(sign)));
        let during = leftovers(&runs);
        eprintln!("while the {checks} drill runs: {during:#?}");
        mesh.kill9("dst");
        let _ = drill.wait();
        mesh.start("dst", "topology.toml");
        wait_until("nothing left of the killed drill", Duration::from_secs(30), || leftovers(&runs).is_empty() && std::fs::read_dir(&runs).map(|d| d.count() == 0).unwrap_or(true));
        let log = mesh.node("dst").log_text();
        assert!(log.matches("cleaned up after an interrupted drill").count() >= 1, "the restarted node says what it cleaned:\n{log}");
    }

    // With no node running, `drmesh drill` runs the checks on the store itself and records nothing.
    let kept = mesh.ctl_data("dst", &["drills", "server"]).expect("drills")["reports"].as_array().map(Vec::len).unwrap_or(0);
    mesh.stop("dst");
    let out = drmesh_tests::drmesh(&["drill", "server", "--state-dir", &state_str, "--checks", "fsck"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fsck") && stdout.contains("passed") && stdout.contains("not recorded"), "{stdout}\n{stderr}");
    mesh.start("dst", "topology.toml");
    let after = mesh.ctl_data("dst", &["drills", "server"]).expect("drills")["reports"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(after, kept, "the offline drill was not recorded");
}
