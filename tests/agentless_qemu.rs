//! Story: a Debian VM (the bootable image of the recovery tests, run by qemu
//! from a qcow2 overlay) is protected without an agent in it. The proxy node
//! `proxy` names the VM's qemu monitor and disk node in a `qemu` volume; each
//! cycle takes a fleece of the disk at one instant, reads it over NBD, and
//! only the blocks the dirty bitmap marks after the first.
//!
//! - While the VM boots (and so writes), RPs are taken one after the other:
//!   the first reads everything (no bitmap yet), the others exactly the
//!   blocks their bitmap marks (figures printed against a full read); every
//!   one restores to a disk whose root filesystem e2fsck finds clean once
//!   its journal is replayed, as after a power cut.
//! - The VM stopped cleanly: its disk, opened by qemu-storage-daemon, is
//!   still read by its bitmap (qemu stored it with the disk).
//! - The VM booting again, qemu killed (kill -9) leaves the bitmap it
//!   loaded inconsistent: the next cycle reads everything and says why; its RP
//!   (free space read too: the journal is not replayed) is the disk byte for
//!   byte; the bitmap made anew is trusted afterwards.
//!
//! And with a careless topology (a monitor path that is a file, a block node
//! qemu does not have, a fleece folder anyone may write to, an NBD socket
//! path where a disk image is): each cycle fails
//! saying what and where, nothing is written, nothing of drmesh's is left in
//! qemu, and a good volume next to them replicates.
//!
//! And a proxy on another machine: the monitor and NBD server over TCP with
//! mutual TLS, the fleece made by qemu in its own folder.
//!
//! Needs root (loop devices for e2fsck) and qemu; the image is built once
//! and cached outside the repository (scripts/test builds it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{debian_image, file_hash, run_ok, wait_until, PolicySpec, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Kills the child on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The VM: qemu (TCG) on the qcow2 `overlay` as block node "disk0" (IDE),
/// its monitor at `qmp`, its serial console in `log`, the channel of its
/// qemu-guest-agent at `qmp` with the extension `qga`.
fn start_vm(overlay: &Path, qmp: &Path, log: &Path) -> Proc {
    let _ = std::fs::remove_file(qmp);
    let qga = qmp.with_extension("qga");
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none", "-no-user-config"])
        .arg("-blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", overlay.display()))
        .args(["-blockdev", "driver=qcow2,node-name=disk0,file=file0", "-device", "ide-hd,drive=disk0,bus=ide.0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!("socket,id=qga0,path={},server=on,wait=off", qga.display()))
        .args(["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    wait_until("the VM's monitor socket", Duration::from_secs(60), || qmp.exists());
    Proc(child)
}

/// The stopped VM's disk opened by qemu-storage-daemon, as a proxy opens it
/// to protect a VM that is not running: the same node name and monitor.
fn start_storage_daemon(overlay: &Path, qmp: &Path) -> Proc {
    storage_daemon(&[overlay], qmp, &[])
}

/// qemu-storage-daemon with the qcow2 `disks` as block nodes disk0, disk1...,
/// its monitor at `qmp`, and `extra` arguments.
fn storage_daemon(disks: &[&Path], qmp: &Path, extra: &[String]) -> Proc {
    let _ = std::fs::remove_file(qmp);
    let mut cmd = Command::new("qemu-storage-daemon");
    for (i, disk) in disks.iter().enumerate() {
        cmd.arg("--blockdev").arg(format!("driver=file,node-name=file{i},filename={}", disk.display()));
        cmd.arg("--blockdev").arg(format!("driver=qcow2,node-name=disk{i},file=file{i}"));
    }
    let child = cmd
        .args(extra)
        .arg("--chardev")
        .arg(format!("socket,id=mon,path={},server=on,wait=off", qmp.display()))
        .args(["--monitor", "chardev=mon"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (scripts/install-deps installs qemu-utils)");
    wait_until("qemu-storage-daemon's monitor socket", Duration::from_secs(60), || qmp.exists());
    Proc(child)
}

/// The one report of a sync-now answer.
fn report(sync: &Value) -> &Value {
    &sync["reports"][0]
}

/// "changed blocks (qemu): N of M" -> N.
fn changed_blocks(plan: &str) -> u64 {
    let rest = plan.strip_prefix("changed blocks (qemu): ").unwrap_or_else(|| panic!("not a changed-blocks read: {plan}"));
    rest.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in {plan}"))
}

/// Restores `rp` to a file and checks the root filesystem (1 MiB into the
/// disk) as after a power cut: e2fsck replays the journal and repairs what
/// it must (`-fy`, exit 0 or 1), then must find it clean (`-fn`, exit 0).
/// A filesystem that was frozen must be clean at once.
fn restore_and_fsck(mesh: &TestMesh, rp: &str, start: u64, bytes: u64) -> PathBuf {
    restore_and_fsck_as(mesh, rp, start, bytes, false)
}

fn restore_and_fsck_as(mesh: &TestMesh, rp: &str, start: u64, bytes: u64, clean: bool) -> PathBuf {
    let to = mesh.dir.path().join(format!("{}.raw", rp.replace('@', "-")));
    let out = mesh.restore("dst", rp, &to, None);
    assert!(out.status.success(), "restore {rp}: {}", String::from_utf8_lossy(&out.stderr));
    let copy = mesh.dir.path().join("fsck.img");
    run_ok(Command::new("dd").arg(format!("if={}", to.display())).arg(format!("of={}", copy.display())).args(["bs=1M", "conv=sparse", "status=none"]).arg(format!("skip={}", start / MIB)).arg(format!("count={}", bytes / MIB)));
    let as_is = Command::new("e2fsck").args(["-fn"]).arg(&copy).output().expect("e2fsck");
    assert!(!clean || as_is.status.success(), "{rp}: e2fsck -fn of a frozen filesystem: {}", String::from_utf8_lossy(&as_is.stdout));
    let fix = Command::new("e2fsck").args(["-fy"]).arg(&copy).output().expect("e2fsck");
    assert!(matches!(fix.status.code(), Some(0 | 1)), "{rp}: e2fsck -fy: {}", String::from_utf8_lossy(&fix.stdout));
    let check = Command::new("e2fsck").args(["-fn"]).arg(&copy).output().expect("e2fsck");
    assert_eq!(check.status.code(), Some(0), "{rp}: e2fsck -fn after the replay: {}", String::from_utf8_lossy(&check.stdout));
    std::fs::remove_file(&copy).unwrap();
    to
}

#[test]
fn a_running_vm_is_protected_without_an_agent() {
    let Some((image, manifest)) = debian_image() else { return };
    let get = |key: &str| drmesh_tests::manifest_get(&manifest, key).parse::<u64>().unwrap_or_else(|_| panic!("manifest {key}"));
    let (part_start, part_bytes) = (get("partition_start_sector") * 512, get("partition_sectors") * 512);
    let mut mesh = TestMesh::new(&["proxy", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    let overlay = dir.join("vm.qcow2");
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&image).arg(&overlay));
    let (qmp, log, fleece) = (dir.join("vm.qmp"), dir.join("serial.log"), dir.join("fleece"));

    let policy = PolicySpec::new("p", "1MiB");
    let vol = VolumeSpec::new("vm", "proxy", &["dst"], Path::new("/placeholder"), "p");
    let text = mesh.replication_topology(1, &["proxy", "dst"], &[vol], &[policy]);
    let qemu = format!(
        "kind = \"qemu\"\nmonitor = \"{}\"\nnode = \"disk0\"\nfleece_dir = \"{}\"\nguest_agent = \"{}\"",
        qmp.display(),
        fleece.display(),
        qmp.with_extension("qga").display()
    );
    let text = text.replace("kind = \"file\"\npath = \"/placeholder\"", &qemu);
    let file = mesh.write_file("topology.toml", &text);
    let check = drmesh_tests::drmesh(&["topology", "check", file.to_str().unwrap()]);
    assert!(check.status.success() && !String::from_utf8_lossy(&check.stdout).contains("NOT BUILT"), "{}", String::from_utf8_lossy(&check.stdout));

    // The VM boots while the proxy protects it.
    let vm = start_vm(&overlay, &qmp, &log);
    let booted_at = Instant::now();
    mesh.start("dst", "topology.toml");
    mesh.start("proxy", "topology.toml");
    mesh.wait_connected("proxy", &["dst"]);
    let console = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).to_string();
    let started = Instant::now();
    let first = mesh.sync_ok("proxy", "vm");
    let first = report(&first).clone();
    let full_read = first["scanned_bytes"].as_u64().unwrap();
    eprintln!("first RP (full read, VM booting): {} MiB read in {:.1} s; {}; free space {}", full_read / MIB, started.elapsed().as_secs_f64(), first["read_plan"], first["free_space"]);
    assert!(first["read_plan"].as_str().unwrap().contains("no dirty bitmap of drmesh's"), "{first}");
    assert_eq!(first["consistency"], "crash", "{first}");
    let mut seqs = vec![first["seq"].as_u64().unwrap()];
    let mut incrementals = Vec::new();
    loop {
        let booted = console().contains("DRMESH-BOOT-OK");
        let failed = ["Kernel panic", "emergency mode", "Dropping to a shell"].iter().any(|m| console().contains(m));
        assert!(!failed && booted_at.elapsed() < Duration::from_secs(600), "the VM did not boot:\n{}", console());
        std::thread::sleep(Duration::from_secs(3));
        let sync = mesh.sync_ok("proxy", "vm");
        let r = report(&sync).clone();
        let plan = r["read_plan"].as_str().unwrap().to_string();
        let blocks = changed_blocks(&plan);
        let read = r["scanned_bytes"].as_u64().unwrap();
        // Only what the bitmap marks is read: at most its blocks, never the disk.
        assert!(read <= blocks * MIB, "read {read} bytes for {blocks} changed blocks: {r}");
        eprintln!("RP {}: {plan}: {:.1} MiB read ({:.2}% of the full read)", r["seq"], read as f64 / MIB as f64, read as f64 * 100.0 / full_read as f64);
        seqs.push(r["seq"].as_u64().unwrap());
        incrementals.push(read);
        if booted {
            break;
        }
    }
    assert!(incrementals.iter().any(|&r| r > 0), "the booting VM wrote nothing the bitmap saw");
    // Once the guest agent runs (it starts late in the boot), the guest's
    // filesystems are frozen at each instant: the RP is filesystem
    // consistent, its ext4 needs no journal replay (so its free space is
    // skipped) and e2fsck finds it clean as it is.
    let mut frozen = None;
    wait_until("an RP with the guest's filesystems frozen", Duration::from_secs(300), || {
        let r = report(&mesh.sync_ok("proxy", "vm")).clone();
        eprintln!("RP {}: {} ({})", r["seq"], r["consistency"], r["view"]);
        seqs.push(r["seq"].as_u64().unwrap());
        let done = r["consistency"] == "fs-frozen";
        std::thread::sleep(Duration::from_secs(1));
        if done {
            frozen = Some(r);
        }
        done
    });
    let frozen = frozen.unwrap();
    assert!(frozen["view"].as_str().unwrap().contains("frozen at the instant by its agent"), "{frozen}");
    assert!(frozen["free_space"].as_str().unwrap().starts_with("skipped: ext4 on partition 1"), "{frozen}");
    let restored = restore_and_fsck_as(&mesh, &format!("vm@{}", frozen["seq"]), part_start, part_bytes, true);
    std::fs::remove_file(restored).unwrap();
    // What an operator sees (docs/agentless.md shows it).
    for (node, args) in [("proxy", &["volumes"][..]), ("dst", &["rps", "vm"][..])] {
        let out = mesh.ctl(node, args);
        assert!(out.status.success(), "ctl {args:?} on {node}: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!("$ drmesh ctl {} (on {node})\n{}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    }
    eprintln!(
        "bench: {} incremental RPs while the VM booted read {:.1} MiB in all, {:.3}x the one full read ({} MiB)",
        incrementals.len(),
        incrementals.iter().sum::<u64>() as f64 / MIB as f64,
        incrementals.iter().sum::<u64>() as f64 / full_read as f64,
        full_read / MIB
    );
    // Every RP taken so far is a disk e2fsck accepts after a power cut.
    for &seq in &seqs {
        let restored = restore_and_fsck(&mesh, &format!("vm@{seq}"), part_start, part_bytes);
        std::fs::remove_file(restored).unwrap();
    }

    // The VM stops cleanly (qemu stores its bitmaps as it closes the disk);
    // the stopped VM's disk is protected through qemu-storage-daemon: the
    // stored bitmap is trusted, and the RP passes e2fsck.
    stop(vm);
    let daemon = start_storage_daemon(&overlay, &qmp);
    let r = report(&mesh.sync_ok("proxy", "vm")).clone();
    eprintln!("stopped VM through qemu-storage-daemon: {}", r["read_plan"]);
    changed_blocks(r["read_plan"].as_str().unwrap());
    let restored = restore_and_fsck(&mesh, &format!("vm@{}", r["seq"]), part_start, part_bytes);
    std::fs::remove_file(restored).unwrap();
    stop(daemon);

    // The VM runs again and qemu dies (kill -9) with the bitmap it loaded
    // marked in use: the next cycle reads everything and says why.
    // (A bitmap drmesh made since qemu started is not stored yet: a crash
    // then leaves none at all, which reads everything as well.)
    let vm = start_vm(&overlay, &qmp, &log);
    std::thread::sleep(Duration::from_secs(15));
    drop(vm);
    let daemon = start_storage_daemon(&overlay, &qmp);
    let r = report(&mesh.sync_ok("proxy", "vm")).clone();
    eprintln!("after kill -9 of qemu: {}", r["read_plan"]);
    let plan = r["read_plan"].as_str().unwrap();
    assert!(plan.starts_with("everything (qemu): ") && plan.contains("inconsistent"), "{r}");
    // The filesystem has a journal to replay, so its free space is read too:
    // the RP is the whole disk (earlier RPs may hold zeros for free blocks).
    assert!(r["free_space"].as_str().unwrap().starts_with("read: "), "{r}");
    let want = dir.join("disk.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&overlay).arg(&want));
    let restored = restore_and_fsck(&mesh, &format!("vm@{}", r["seq"]), part_start, part_bytes);
    assert_eq!(file_hash(&restored), file_hash(&want), "the RP after the crash is the disk byte for byte");
    std::fs::remove_file(restored).unwrap();
    // The bitmap drmesh made anew is trusted from then on.
    let next = report(&mesh.sync_ok("proxy", "vm")).clone();
    assert_eq!(changed_blocks(next["read_plan"].as_str().unwrap()), 0, "{next}");
    drop(daemon);
    // Nothing of the cycles is left in the fleece folder.
    let left: Vec<_> = std::fs::read_dir(&fleece).unwrap().flatten().map(|e| e.file_name()).filter(|n| n != "nbd.sock").collect();
    assert!(left.is_empty(), "left in the fleece folder: {left:?}");
}

/// SIGTERM: qemu (and qemu-storage-daemon) stop cleanly, closing the disk
/// and storing its persistent bitmaps.
fn stop(mut p: Proc) {
    run_ok(Command::new("kill").arg("-TERM").arg(p.0.id().to_string()));
    let status = p.0.wait().expect("wait");
    assert!(status.success() || status.code().is_none(), "{status}");
}

/// The answer to one QMP command on the monitor at `socket`.
fn qmp(socket: &Path, command: &str) -> Value {
    use std::io::{BufRead as _, BufReader, Write as _};
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("monitor");
    let mut lines = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let send = |text: &str| {
        (&stream).write_all(text.as_bytes()).unwrap();
    };
    lines.read_line(&mut line).unwrap();
    send("{\"execute\":\"qmp_capabilities\"}\n");
    send(&format!("{{\"execute\":\"{command}\",\"id\":1}}\n"));
    loop {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "the monitor closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 1 {
            return v["return"].clone();
        }
    }
}

/// The error text of a sync-now that must fail.
fn sync_error(mesh: &TestMesh, volume: &str) -> String {
    match mesh.sync_now("proxy", volume) {
        Err(e) => e,
        Ok(data) => {
            let errors = data["errors"].as_array().cloned().unwrap_or_default();
            assert!(!errors.is_empty(), "sync-now {volume} did not fail: {data}");
            errors.iter().map(Value::to_string).collect::<Vec<_>>().join("; ")
        }
    }
}

#[test]
fn wrong_settings_fail_the_cycle_saying_what_and_leave_nothing_behind() {
    if !drmesh_tests::is_root() {
        eprintln!("skipped: needs root (the proxy hands the fleece file to qemu's user)");
        return;
    }
    let mut mesh = TestMesh::new(&["proxy", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    // One qemu-storage-daemon with two disks: disk0 is the good volume's.
    let (good, other) = (dir.join("good.qcow2"), dir.join("other.qcow2"));
    for image in [&good, &other] {
        run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(image).arg("32M"));
    }
    // Something the VM wrote on the good disk.
    run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 1M 3M"]).arg(&good));
    let (qmp_sock, nbd) = (dir.join("qsd.qmp"), dir.join("work/nbd.sock"));
    let _daemon = storage_daemon(&[&good, &other], &qmp_sock, &[]);

    let not_socket = dir.join("monitor-is-a-file");
    std::fs::write(&not_socket, b"not a socket").unwrap();
    let open = dir.join("open-fleece");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let work = dir.join("work");
    let volume = |name: &str, monitor: &Path, node: &str, fleece: &Path| {
        format!(
            "\n[[volume]]\nname = \"{name}\"\nsource = \"proxy\"\nkind = \"qemu\"\nmonitor = \"{}\"\nnode = \"{node}\"\nfleece_dir = \"{}\"\nnbd = \"{}\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
            monitor.display(),
            fleece.display(),
            nbd.display()
        )
    };
    let mut text = mesh.replication_topology(1, &["proxy", "dst"], &[], &[PolicySpec::new("p", "1MiB")]);
    text.push_str(&volume("no-monitor", &not_socket, "disk0", &work));
    text.push_str(&volume("no-node", &qmp_sock, "vda", &work));
    text.push_str(&volume("open-dir", &qmp_sock, "disk1", &open));
    text.push_str(&volume("good", &qmp_sock, "disk0", &work));
    // `nbd` naming an existing file (here the other disk's image): qemu would
    // delete it to listen there. (A monitor of its own: the volumes of one
    // monitor name one NBD socket, which topology check sees to.)
    let nbd_file = volume("nbd-file", &dir.join("vm2.qmp"), "disk2", &work).replace(&format!("nbd = \"{}\"", nbd.display()), &format!("nbd = \"{}\"", other.display()));
    text.push_str(&nbd_file);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("proxy", "topology.toml");
    mesh.wait_connected("proxy", &["dst"]);

    let e = sync_error(&mesh, "no-monitor");
    assert!(e.contains(&format!("qemu monitor at {}: ", not_socket.display())) && e.contains("refused"), "{e}");
    let e = sync_error(&mesh, "no-node");
    assert!(e.contains("no block node \\\"vda\\\"") || e.contains("no block node \"vda\""), "{e}");
    let e = sync_error(&mesh, "open-dir");
    assert!(e.contains("is writable by other users; make it 0700"), "{e}");
    assert!(std::fs::read_dir(&open).unwrap().next().is_none(), "something was written in the refused folder");
    let other_before = file_hash(&other);
    let e = sync_error(&mesh, "nbd-file");
    assert!(e.contains(&format!("nbd {}: is a regular file, not a socket", other.display())), "{e}");
    assert!(other.is_file() && file_hash(&other) == other_before, "the file at the nbd path was touched");
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"not a socket");
    // The failures left nothing of drmesh's in qemu; the good volume replicates.
    let nodes = qmp(&qmp_sock, "query-named-block-nodes");
    for n in nodes.as_array().unwrap() {
        assert!(!n["node-name"].as_str().unwrap().starts_with("drmesh"), "{n}");
        assert!(n["dirty-bitmaps"].as_array().is_none_or(|b| b.is_empty()), "{n}");
    }
    let r = report(&mesh.sync_ok("proxy", "good")).clone();
    assert!(r["read_plan"].as_str().unwrap().starts_with("everything (qemu): no dirty bitmap"), "{r}");
    let want = dir.join("good.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&good).arg(&want));
    assert_eq!(mesh.restore_hash("dst", &format!("good@{}", r["seq"]), None), file_hash(&want));
    assert!(mesh.node_mut("proxy").is_running(), "the proxy node stopped");
}

#[test]
fn a_vm_writing_more_than_the_fleece_folder_holds_never_sees_a_failed_write() {
    if !drmesh_tests::is_root() {
        eprintln!("skipped: needs root (a small loop-mounted filesystem as fleece_dir)");
        return;
    }
    let fleece_fs = drmesh_tests::LoopFs::new(64);
    let fleece = fleece_fs.path().join("fleece");
    let mut mesh = TestMesh::new(&["proxy", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    // The VM's disk: 64 MiB of random data (so that every overwritten block is copied).
    let (raw, disk) = (dir.join("seed.raw"), dir.join("vm.qcow2"));
    let mut rng = drmesh_tests::Rng::new(7);
    let mut random = vec![0u8; 64 << 20];
    rng.fill(&mut random);
    std::fs::write(&raw, &random).unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&disk));
    let (qmp_sock, nbd) = (dir.join("qsd.qmp"), dir.join("qsd.nbd"));
    // qemu-storage-daemon with its own NBD server, the "VM" writing through a writable export.
    let serve = ["--nbd-server".to_string(), format!("addr.type=unix,addr.path={}", nbd.display())];
    let export = ["--export".to_string(), "type=nbd,id=vm,node-name=disk0,name=vm,writable=on".to_string()];
    let _daemon = storage_daemon(&[&disk], &qmp_sock, &[serve, export].concat());
    // Right after the first view is taken (the post hook, while a marker file
    // is there), the VM overwrites 48 MiB, 1 MiB every 50 ms: far more than
    // the 64 MiB folder holds above its reserve.
    let (status, marker) = (dir.join("vm-writes.status"), dir.join("write-now"));
    std::fs::write(&marker, b"").unwrap();
    let writes: Vec<String> = (0..48).map(|i| format!("-c 'write -P 0x77 {i}M 1M' -c 'sleep 50'")).collect();
    let script = format!(
        "[ -e {m} ] || exit 0; rm {m}; qemu-io -f raw {} 'nbd+unix:///vm?socket={}' >/dev/null; echo $? > {}",
        writes.join(" "),
        nbd.display(),
        status.display(),
        m = marker.display()
    );
    let text = mesh.replication_topology(1, &["proxy", "dst"], &[], &[PolicySpec::new("p", "1MiB")]);
    let text = format!(
        "{text}\n[[volume]]\nname = \"vm\"\nsource = \"proxy\"\nkind = \"qemu\"\nmonitor = \"{}\"\nnode = \"disk0\"\nfleece_dir = \"{}\"\nfleece_reserve = \"32MiB\"\nnbd = \"{}\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
        qmp_sock.display(),
        fleece.display(),
        nbd.display()
    );
    let text = format!("{text}\n[volume.hooks]\npost = [\"/bin/sh\", \"-c\", {:?}]\ntimeout = \"120s\"\n", script);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("proxy", "topology.toml");
    mesh.wait_connected("proxy", &["dst"]);

    let e = sync_error(&mesh, "vm");
    assert!(e.contains(&format!("fleece_dir {} fell to", fleece.display())) && e.contains("under its fleece_reserve of 32 MiB: the view was dropped"), "{e}");
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "0", "a write of the VM failed");
    assert!(std::fs::read_dir(&fleece).unwrap().flatten().all(|e| e.file_name() == "nbd.sock"), "the fleece file is left");
    for n in qmp(&qmp_sock, "query-named-block-nodes").as_array().unwrap() {
        assert!(!n["node-name"].as_str().unwrap().starts_with("drmesh"), "{n}");
    }
    assert!(qmp(&qmp_sock, "query-block-jobs").as_array().unwrap().is_empty());

    // A folder already under its reserve: no view is taken at all.
    let filler = fleece_fs.path().join("filler");
    let free = nix::sys::statvfs::statvfs(fleece_fs.path()).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    std::fs::File::create(&filler).unwrap().set_len(0).unwrap();
    run_ok(Command::new("fallocate").arg("-l").arg((free - (16 << 20)).to_string()).arg(&filler));
    let e = sync_error(&mesh, "vm");
    assert!(e.contains("MiB free, under its fleece_reserve of 32 MiB: no view is taken"), "{e}");
    std::fs::remove_file(&filler).unwrap();

    // With room again and the VM quiet, the cycle goes through: the RP is the disk.
    let r = report(&mesh.sync_ok("proxy", "vm")).clone();
    let want = dir.join("vm.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&disk).arg(&want));
    assert_eq!(mesh.restore_hash("dst", &format!("vm@{}", r["seq"]), None), file_hash(&want));
    let head = std::fs::read(&want).unwrap();
    assert!(head[..48 << 20].iter().all(|&b| b == 0x77), "the VM's writes are on its disk");
}

/// Story: a VM with two disks (qemu-storage-daemon serving both, "the VM"
/// writing through writable exports) is one consistency group. A writer
/// puts each number on disk 0 and then on disk 1; no guest agent freezes
/// anything, yet each group cycle takes both fleeces in one qemu
/// transaction: the group RP is of one instant (crash consistent as a VM),
/// and `restore-group` brings back two disks holding the same number, or
/// on disk 0 the one after.
#[test]
fn the_disks_of_one_vm_are_one_group_taken_in_one_transaction() {
    let mut mesh = TestMesh::new(&["proxy", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    let disks: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("d{i}.qcow2"))).collect();
    for d in &disks {
        run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(d).arg("16M"));
    }
    let (qmp_sock, nbd, fleece) = (dir.join("qsd.qmp"), dir.join("qsd.nbd"), dir.join("fleece"));
    let mut extra = vec!["--nbd-server".to_string(), format!("addr.type=unix,addr.path={}", nbd.display())];
    for i in 0..2 {
        extra.extend(["--export".to_string(), format!("type=nbd,id=w{i},node-name=disk{i},name=w{i},writable=on")]);
    }
    let _daemon = storage_daemon(&[&disks[0], &disks[1]], &qmp_sock, &extra);
    let mut text = mesh.replication_topology(1, &["proxy", "dst"], &[], &[PolicySpec::new("p", "1MiB")]);
    for i in 0..2 {
        text.push_str(&format!(
            "\n[[volume]]\nname = \"vm-d{i}\"\nsource = \"proxy\"\nkind = \"qemu\"\nmonitor = \"{}\"\nnode = \"disk{i}\"\nfleece_dir = \"{}\"\nnbd = \"{}\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
            qmp_sock.display(),
            fleece.display(),
            // qemu runs one NBD server: the one "the VM" writes through.
            nbd.display()
        ));
    }
    text.push_str("\n[[group]]\nname = \"vm\"\nvolumes = [\"vm-d0\", \"vm-d1\"]\n");
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("proxy", "topology.toml");
    mesh.wait_connected("proxy", &["dst"]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, socket) = (stop.clone(), nbd.clone());
    let writer = std::thread::spawn(move || {
        let mut n = 0u8;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            n = n.wrapping_add(1).max(1);
            for i in 0..2 {
                let uri = format!("nbd+unix:///w{i}?socket={}", socket.display());
                run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {n} 0 4096"), &uri]));
            }
        }
    });
    let mut instants = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let sync = mesh.sync_ok("proxy", "vm-d1");
        let reports = sync["reports"].as_array().cloned().unwrap_or_default();
        assert_eq!(reports.len(), 2, "{sync}");
        for r in &reports {
            assert_eq!(r["group"]["one_instant"], true, "{r}");
            assert_eq!(r["group"]["how"], "one instant: the views of vm-d0, vm-d1 in one qemu transaction", "{r}");
            assert_eq!(r["consistency"], "crash", "{r}");
        }
        eprintln!("round {round}: {}", reports[0]["group"]["how"]);
        instants.push(reports[0]["snapshot_unix_ms"].as_u64().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("the writer");

    let state_dir = mesh.node("dst").state_dir.to_str().unwrap().to_string();
    for time in instants {
        let to = dir.join(format!("restored-{time}"));
        let out = drmesh_tests::drmesh(&["restore-group", &format!("vm@{time}"), "--to", to.to_str().unwrap(), "--state-dir", &state_dir]);
        assert!(out.status.success(), "{}", drmesh_tests::output_text(&out));
        let first = |i: usize| std::fs::read(to.join(format!("vm-d{i}.img"))).unwrap()[..4096].to_vec();
        let (a, b) = (first(0), first(1));
        assert!(a.iter().all(|&x| x == a[0]) && b.iter().all(|&x| x == b[0]), "whole writes");
        eprintln!("group RP vm@{time}: disk 0 holds {}, disk 1 holds {}", a[0], b[0]);
        assert!(a[0] > 0 && (a[0] == b[0] || a[0] == b[0].wrapping_add(1).max(1)), "not one instant: disk 0 holds {}, disk 1 holds {}", a[0], b[0]);
    }
}

/// Story: the proxy is on another machine than the hypervisor. qemu (here
/// qemu-storage-daemon, "the VM" writing through a writable export) serves
/// its monitor and its NBD server on TCP with mutual TLS (credentials made
/// by scripts/qemu-tls-creds); the topology names `tcp:HOST:PORT` sockets
/// and the proxy's client credentials. The first cycle reads everything,
/// the next only what the bitmap marks; every RP is the disk byte for byte;
/// qemu made the fleece file in its own folder, which drmesh never touches,
/// and left it empty. A proxy whose certificate qemu's CA did not sign gets
/// nothing: the cycle fails saying so.
#[test]
fn a_proxy_on_another_machine_reads_the_disk_over_tcp_with_mutual_tls() {
    let mut mesh = TestMesh::new(&["proxy", "dst"]);
    let dir = mesh.dir.path().to_path_buf();
    let pki = dir.join("pki");
    run_ok(Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-tls-creds")).arg(&pki).arg("127.0.0.1"));
    let (raw, disk) = (dir.join("seed.raw"), dir.join("vm.qcow2"));
    let mut random = vec![0u8; 32 << 20];
    drmesh_tests::Rng::new(11).fill(&mut random);
    std::fs::write(&raw, &random).unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&disk));
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (qmp_port, nbd_port) = (port(), port());
    let hypervisor_dir = dir.join("hypervisor-fleece");
    std::fs::create_dir(&hypervisor_dir).unwrap();
    let mut daemon = Command::new("qemu-storage-daemon");
    daemon
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}", pki.join("server").display()))
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", disk.display()))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=inet,addr.host=127.0.0.1,addr.port={nbd_port},tls-creds=tls0"))
        .args(["--export", "type=nbd,id=vm,node-name=disk0,name=vm,writable=on"])
        .arg("--chardev")
        .arg(format!("socket,id=mon,host=127.0.0.1,port={qmp_port},server=on,wait=off,tls-creds=tls0"))
        .args(["--monitor", "chardev=mon"])
        .stdin(Stdio::null());
    let _daemon = Proc(daemon.spawn().expect("qemu-storage-daemon"));
    wait_until("qemu-storage-daemon's monitor port", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", qmp_port)).is_ok());
    // The VM's writes, through qemu's own TLS client.
    let vm_write = |pattern: u8, at_mib: u64, mib: u64| {
        run_ok(Command::new("qemu-io")
            .arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.join("client").display()))
            .arg("--image-opts")
            .arg(format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={nbd_port},export=vm,tls-creds=tls0"))
            .args(["-c", &format!("write -P {pattern} {at_mib}M {mib}M")]));
    };

    let text = mesh.replication_topology(1, &["proxy", "dst"], &[], &[PolicySpec::new("p", "1MiB")]);
    let volume = |tls: &Path| -> String {
        format!(
            "\n[[volume]]\nname = \"vm\"\nsource = \"proxy\"\nkind = \"qemu\"\nmonitor = \"tcp:127.0.0.1:{qmp_port}\"\nnode = \"disk0\"\nfleece_dir = \"{}\"\nnbd = \"tcp:127.0.0.1:{nbd_port}\"\ntls = \"{}\"\nfleece_max = \"256MiB\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
            hypervisor_dir.display(),
            tls.display()
        )
    };
    let topology = format!("{text}{}", volume(&pki.join("client")));
    let file = mesh.write_file("topology.toml", &topology);
    let check = drmesh_tests::drmesh(&["topology", "check", file.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}{}", String::from_utf8_lossy(&check.stderr));
    assert!(
        said.contains(&format!("through the qemu monitor tcp:127.0.0.1:{qmp_port}, over TCP with TLS (credentials in {}), NBD at tcp:127.0.0.1:{nbd_port}, fleece in {} on the monitor's machine (at most 256 MiB per view)", pki.join("client").display(), hypervisor_dir.display())),
        "{said}"
    );
    mesh.start("dst", "topology.toml");
    mesh.start("proxy", "topology.toml");
    mesh.wait_connected("proxy", &["dst"]);

    let want = dir.join("want.raw");
    let first = report(&mesh.sync_ok("proxy", "vm")).clone();
    assert!(first["read_plan"].as_str().unwrap().contains("no dirty bitmap of drmesh's"), "{first}");
    run_ok(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&disk).arg(&want));
    assert_eq!(mesh.restore_hash("dst", &format!("vm@{}", first["seq"]), None), file_hash(&want));

    vm_write(0x5a, 3, 2);
    vm_write(0xa5, 20, 1);
    let next = report(&mesh.sync_ok("proxy", "vm")).clone();
    assert_eq!(changed_blocks(next["read_plan"].as_str().unwrap()), 3, "{next}");
    run_ok(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&disk).arg(&want));
    assert_eq!(mesh.restore_hash("dst", &format!("vm@{}", next["seq"]), None), file_hash(&want));
    eprintln!("over TCP with TLS: the first cycle read {} MiB, the next {} MiB ({})", first["scanned_bytes"].as_u64().unwrap() / MIB, next["scanned_bytes"].as_u64().unwrap() / MIB, next["read_plan"]);
    // qemu made the fleece in its own folder and emptied it.
    for entry in std::fs::read_dir(&hypervisor_dir).unwrap().flatten() {
        assert_eq!(entry.metadata().unwrap().len(), 0, "{} is not empty", entry.path().display());
    }

    // The proxy's certificate replaced by one another CA signed (the
    // credentials are read anew each cycle): qemu refuses it; nothing is read.
    let other = dir.join("other-pki");
    run_ok(Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-tls-creds")).arg(&other).arg("127.0.0.1"));
    for file in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join("client").join(file), pki.join("client").join(file)).unwrap();
    }
    let e = sync_error(&mesh, "vm");
    assert!(e.contains(&format!("qemu monitor at tcp:127.0.0.1:{qmp_port}")) && e.contains("client-cert.pem"), "{e}");
}
