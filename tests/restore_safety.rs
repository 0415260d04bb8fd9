//! Story: an operator restores a recovery point the careless and the hostile
//! way. `drmesh restore` writes only where it was told (promise 8): a new image
//! file of mode 0600, a replaced one only with `--force`, a block device in
//! place (compared byte for byte); it refuses, writing nothing and leaving
//! nothing behind, a directory, a symlink, a character device, a volume's own
//! source (by any name, and through a loop device backed by it), a device too
//! small, holding a filesystem (unless `--force`) or mounted (even with
//! `--force`). A restore with no node running reads the state dir's store
//! directly and gives the same bytes; a killed restore's temporary file is
//! removed by the next one; a full disk fails cleanly.
//!
//! The device, mount and full-disk parts need root (loop devices, tmpfs, vfat);
//! they are skipped otherwise.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_tests::{
    build_image, dir_names, drmesh, drmesh_bin, file_hash, hash_hex, is_root, report_seq, restore_progress, restore_result, run_ok, write_image_atomic,
    write_key_file, LoopDevice, Mount, PolicySpec, Rng, TestMesh, VolumeSpec,
};

const MIB: usize = 1 << 20;

/// A replicated mesh: src protects `disk` (24 MiB, encrypted policy) to dst, one RP.
struct Fixture {
    mesh: TestMesh,
    image: Vec<u8>,
    image_path: PathBuf,
    rp: String,
    key: PathBuf,
}

fn fixture(size: usize) -> Fixture {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x5afe_0016);
    let image = build_image(&mut rng, size);
    write_image_atomic(&image_path, &image);
    let key = mesh.dir.path().join("policy.key");
    write_key_file(&key, &mut rng);
    let mut policy = PolicySpec::new("p", "256KiB");
    policy.compression = Some("zstd:1".into());
    policy.encryption_key_file = Some(key.clone());
    let vol = VolumeSpec::new("disk", "src", &["dst"], &image_path, "p");
    let text = mesh.replication_topology(1, &["src", "dst"], &[vol], &[policy]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    let seq = report_seq(&mesh.sync_ok("src", "disk"));
    Fixture { mesh, image, image_path, rp: format!("disk@{seq}"), key }
}

/// `drmesh restore RP --to PATH --state-dir <node> --json EXTRA...`.
fn restore(mesh: &TestMesh, node: &str, rp: &str, to: &Path, extra: &[&str]) -> std::process::Output {
    let state = mesh.node(node).state_dir.to_str().unwrap().to_string();
    let to = to.to_str().unwrap().to_string();
    let mut args = vec!["restore", rp, "--to", to.as_str(), "--state-dir", state.as_str(), "--json"];
    args.extend_from_slice(extra);
    drmesh(&args)
}

fn refused(out: &std::process::Output, needle: &str) -> String {
    let err = restore_result(out).expect_err("the restore must be refused");
    assert!(!out.status.success(), "exit status of a refused restore: {:?}", out.status);
    assert!(err.contains("refusing") && err.contains(needle), "the refusal must say why ({needle}): {err}");
    assert!(err.contains("nothing was written"), "the refusal must say nothing was written: {err}");
    err
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The first `len` bytes of a file or device.
fn head(path: &Path, len: usize) -> Vec<u8> {
    let mut data = std::fs::read(path).unwrap_or_default();
    if data.is_empty() {
        // A block device: read it with dd-like I/O.
        use std::io::Read as _;
        let mut f = std::fs::File::open(path).unwrap();
        data = vec![0u8; len];
        f.read_exact(&mut data).unwrap();
    }
    data.truncate(len);
    data
}

#[test]
fn restore_to_files_refuses_what_it_must_and_leaves_nothing() {
    let f = fixture(24 * MIB);
    let mesh = &f.mesh;
    let dir = mesh.dir.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let want = hash_hex(&f.image);

    // A new file: the image, mode 0600, with progress events and one result.
    let to = dir.join("web.img");
    let out = restore(mesh, "dst", &f.rp, &to, &[]);
    let report = restore_result(&out).unwrap_or_else(|e| panic!("restore: {e}"));
    assert_eq!(report["output_kind"], "file", "{report}");
    assert_eq!(file_hash(&to), want);
    assert_eq!(mode(&to), 0o600, "restored images are private");
    let progress = restore_progress(&out);
    assert!(!progress.is_empty(), "--json prints progress events");
    assert!(progress.iter().all(|p| p["total_bytes"].is_u64() && p["phase"].is_string()), "{progress:?}");
    assert_eq!(dir_names(&dir), vec!["web.img"], "nothing but the image in its folder");
    // Without --json and with stderr not a terminal: plain progress lines, no bar.
    let plain = drmesh(&["verify", &f.rp, "--state-dir", mesh.node("dst").state_dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(plain.status.success(), "{stderr}");
    // The phases seen depend on how fast the verify runs against the 0.5 s
    // progress tick: any of them gives a plain line in the same form.
    let plain_line = |l: &str| ["verify: ", "checking block map: "].iter().any(|p| l.starts_with(p)) && l.contains(" of 24.0 MiB (") && l.contains("/s");
    assert!(stderr.lines().any(plain_line), "no plain progress line: {stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains("\u{1b}["), "terminal control codes into a pipe: {stderr:?}");

    // An existing file is kept without --force (the bytes stay), replaced with it.
    std::fs::write(&to, b"precious").unwrap();
    refused(&restore(mesh, "dst", &f.rp, &to, &[]), "--force");
    assert_eq!(std::fs::read(&to).unwrap(), b"precious");
    restore_result(&restore(mesh, "dst", &f.rp, &to, &["--force"])).unwrap();
    assert_eq!(file_hash(&to), want);
    assert_eq!(mode(&to), 0o600);
    assert_eq!(dir_names(&dir), vec!["web.img"]);

    // A directory, a symlink to a file, a dangling symlink, a character device.
    refused(&restore(mesh, "dst", &f.rp, &dir, &["--force"]), "directory");
    let victim = mesh.dir.path().join("victim");
    std::fs::write(&victim, b"do not touch").unwrap();
    let link = dir.join("link.img");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    refused(&restore(mesh, "dst", &f.rp, &link, &["--force"]), "symbolic link");
    let dangling = dir.join("dangling.img");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    refused(&restore(mesh, "dst", &f.rp, &dangling, &[]), "symbolic link");
    refused(&restore(mesh, "dst", &f.rp, Path::new("/dev/null"), &["--force"]), "character device");
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    assert!(!dir.join("nowhere").exists());

    // The old temporary name planted as a symlink to a victim: never followed.
    let fresh = dir.join("fresh.img");
    std::os::unix::fs::symlink(&victim, dir.join("fresh.img.partial")).unwrap();
    restore_result(&restore(mesh, "dst", &f.rp, &fresh, &[])).unwrap();
    assert_eq!(file_hash(&fresh), want);
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");

    // A missing folder.
    refused(&restore(mesh, "dst", &f.rp, &dir.join("no/such/dir.img"), &[]), "folder");

    // qcow2 (written by qemu-img from a read-only export): the same bytes, mode 0600, the same refusals.
    if Command::new("qemu-img").arg("--version").stdout(Stdio::null()).status().is_ok() {
        let qcow = dir.join("web.qcow2");
        let report = restore_result(&restore(mesh, "dst", &f.rp, &qcow, &[])).unwrap_or_else(|e| panic!("qcow2 restore: {e}"));
        assert_eq!(report["output_kind"], "qcow2", "{report}");
        assert_eq!(mode(&qcow), 0o600);
        let info = run_ok(Command::new("qemu-img").args(["info", "--output=json"]).arg(&qcow));
        assert!(info.contains("\"format\": \"qcow2\""), "{info}");
        let raw = mesh.dir.path().join("from-qcow2.raw");
        run_ok(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&qcow).arg(&raw));
        assert_eq!(file_hash(&raw), want, "the qcow2 image holds the RP's bytes");
        refused(&restore(mesh, "dst", &f.rp, &qcow, &[]), "--force");
        restore_result(&restore(mesh, "dst", &f.rp, &qcow, &["--force"])).unwrap();
        assert!(dir_names(&dir).iter().all(|n| !n.contains(".drmesh-restore-")), "no staging folder left: {:?}", dir_names(&dir));
    } else {
        eprintln!("qcow2 part skipped: qemu-img is not installed");
    }

    // The volume's own source on its node, by any spelling, even with --force
    // (src holds no RPs: it reads them from dst, so this also goes over QUIC).
    let before = file_hash(&f.image_path);
    let dotted = mesh.dir.path().join(".").join("disk.img");
    let hardlink = mesh.dir.path().join("disk-hardlink.img");
    std::fs::hard_link(&f.image_path, &hardlink).unwrap();
    for path in [&f.image_path, &dotted, &hardlink] {
        refused(&restore(mesh, "src", &f.rp, path, &["--force"]), "source of volume disk");
    }
    assert_eq!(file_hash(&f.image_path), before, "the source image is untouched");
    // Other names on src are fine: src restores from dst.
    let remote = dir.join("remote.img");
    restore_result(&restore(mesh, "src", &f.rp, &remote, &[])).unwrap();
    assert_eq!(file_hash(&remote), want);
}

#[test]
fn restore_writes_block_devices_in_place_and_refuses_unsafe_ones() {
    if !is_root() {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let f = fixture(24 * MIB);
    let mesh = &f.mesh;
    let work = mesh.dir.path();
    let len = f.image.len();

    // A device larger than the volume, full of 0xAA: the volume's bytes land in
    // place (zero blocks read back as zeros), the rest stays as it was.
    let backing = work.join("dev.raw");
    std::fs::write(&backing, vec![0xAAu8; 32 * MIB]).unwrap();
    let dev = LoopDevice::attach(&backing);
    let out = restore(mesh, "dst", &f.rp, &dev.path, &[]);
    let report = restore_result(&out).unwrap_or_else(|e| panic!("restore to {}: {e}", dev.path.display()));
    assert_eq!(report["output_kind"], "device", "{report}");
    assert!(report["zero_blocks"].as_u64().unwrap() > 0, "the image has zero blocks: {report}");
    let written = std::fs::read(&backing).unwrap();
    assert_eq!(hash_hex(&written[..len]), hash_hex(&f.image), "the device holds the image byte for byte");
    assert!(written[len..].iter().all(|b| *b == 0xAA), "bytes beyond the volume are untouched");
    assert!(dev.path.exists() && std::fs::metadata(&dev.path).unwrap().file_type().is_block_device(), "the device node is still a device");

    // It now holds whatever the image holds; a second restore over it is refused
    // only if that is a filesystem. Put ext4 on it: refused, then --force.
    run_ok(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&dev.path));
    let fs_head = head(&dev.path, 1 << 20);
    refused(&restore(mesh, "dst", &f.rp, &dev.path, &[]), "ext2/3/4 filesystem");
    assert_eq!(head(&dev.path, 1 << 20), fs_head, "a refused restore wrote nothing");
    // Mounted: refused even with --force.
    let mount = Mount::new(&[dev.path.to_str().unwrap()], &work.join("mnt"));
    refused(&restore(mesh, "dst", &f.rp, &dev.path, &["--force"]), "mounted");
    drop(mount);
    restore_result(&restore(mesh, "dst", &f.rp, &dev.path, &["--force"])).unwrap();
    assert_eq!(hash_hex(&std::fs::read(&backing).unwrap()[..len]), hash_hex(&f.image));

    // Too small: refused before anything is written.
    let small_backing = work.join("small.raw");
    std::fs::write(&small_backing, vec![0x55u8; 16 * MIB]).unwrap();
    let small = LoopDevice::attach(&small_backing);
    refused(&restore(mesh, "dst", &f.rp, &small.path, &["--force"]), "needs");
    assert!(std::fs::read(&small_backing).unwrap().iter().all(|b| *b == 0x55));

    // A loop device over the volume's source image, on the source node: refused.
    let over_source = LoopDevice::attach(&f.image_path);
    let before = file_hash(&f.image_path);
    refused(&restore(mesh, "src", &f.rp, &over_source.path, &["--force"]), "source of volume disk");
    assert_eq!(file_hash(&f.image_path), before);
}

#[test]
fn restore_without_a_node_reads_the_store_directly() {
    let mut f = fixture(24 * MIB);
    let want = hash_hex(&f.image);
    let dir = f.mesh.dir.path().join("offline");
    std::fs::create_dir(&dir).unwrap();

    // Beside the running node (--offline), the same bytes as through it.
    let through = dir.join("through-node.img");
    restore_result(&restore(&f.mesh, "dst", &f.rp, &through, &[])).unwrap();
    let beside = dir.join("beside.img");
    restore_result(&restore(&f.mesh, "dst", &f.rp, &beside, &["--offline"])).unwrap_or_else(|e| panic!("offline beside a running node: {e}"));
    assert_eq!(file_hash(&through), want);
    assert_eq!(file_hash(&beside), want);

    // The node killed (no clean close, stale socket): the store is read as it is.
    f.mesh.kill9("dst");
    let after_kill = dir.join("after-kill.img");
    let out = restore(&f.mesh, "dst", &f.rp, &after_kill, &[]);
    restore_result(&out).unwrap_or_else(|e| panic!("restore with no node after kill -9: {e}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(file_hash(&after_kill), want);

    // The encrypted RP needs its key: found through the topology the node ran
    // with; --key-file works too; without either it says what to give.
    let note = f.mesh.node("dst").state_dir.join("topology.path");
    std::fs::remove_file(&note).unwrap();
    let err = restore_result(&restore(&f.mesh, "dst", &f.rp, &dir.join("nokey.img"), &[])).expect_err("no key, no restore");
    assert!(err.contains("--key-file"), "{err}");
    assert!(!dir.join("nokey.img").exists());
    let keyed = dir.join("keyed.img");
    restore_result(&restore(&f.mesh, "dst", &f.rp, &keyed, &["--key-file", f.key.to_str().unwrap()])).unwrap();
    assert_eq!(file_hash(&keyed), want);
    let wrong_key = f.mesh.dir.path().join("wrong.key");
    write_key_file(&wrong_key, &mut Rng::new(99));
    let err = restore_result(&restore(&f.mesh, "dst", &f.rp, &dir.join("wrong.img"), &["--key-file", wrong_key.to_str().unwrap()])).expect_err("wrong key");
    assert!(err.contains("block "), "a wrong key fails on the first block, named: {err}");
    assert!(!dir.join("wrong.img").exists());

    // verify works offline too; --from needs a node.
    let state = f.mesh.node("dst").state_dir.to_str().unwrap().to_string();
    let out = drmesh(&["verify", &f.rp, "--state-dir", &state, "--key-file", f.key.to_str().unwrap(), "--json"]);
    restore_result(&out).unwrap_or_else(|e| panic!("offline verify: {e}"));
    let out = drmesh(&["verify", &f.rp, "--state-dir", &state, "--from", "src", "--json"]);
    assert!(restore_result(&out).expect_err("--from without a node").contains("needs a node"));

    // A state dir that holds no store says so.
    let empty = f.mesh.dir.path().join("empty-state");
    std::fs::create_dir(&empty).unwrap();
    let out = drmesh(&["restore", &f.rp, "--to", dir.join("x.img").to_str().unwrap(), "--state-dir", empty.to_str().unwrap(), "--json"]);
    assert!(restore_result(&out).expect_err("no store").contains("no drmesh store"), "{}", String::from_utf8_lossy(&out.stdout));
    let _ = f.image_path;
}

/// A bindfs (FUSE) view of a folder, unmounted on drop.
struct FuseMount {
    point: PathBuf,
}

impl FuseMount {
    fn new(under: &Path, point: &Path) -> FuseMount {
        std::fs::create_dir_all(point).unwrap();
        run_ok(Command::new("bindfs").arg(under).arg(point));
        FuseMount { point: point.to_path_buf() }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
    }
}

#[test]
fn killed_restore_leaves_nothing_for_good_and_a_full_disk_fails_cleanly() {
    if !is_root() {
        eprintln!("skipped: FUSE and tmpfs mounts need root");
        return;
    }
    if Command::new("bindfs").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        panic!("bindfs is missing: scripts/install-deps installs it");
    }
    let mut f = fixture(64 * MIB);
    let want = hash_hex(&f.image);
    let work = f.mesh.dir.path().to_path_buf();
    // The node stopped: the restore runs in the drmesh process we kill.
    assert!(f.mesh.stop("dst"));
    let state = f.mesh.node("dst").state_dir.clone();

    // A FUSE filesystem (bindfs) has no O_TMPFILE: the temporary file gets a journaled name.
    let under = work.join("fuse-under");
    std::fs::create_dir(&under).unwrap();
    let fuse = FuseMount::new(&under, &work.join("fuse"));
    let to = fuse.point.join("disk.img");
    let mut child = Command::new(drmesh_bin())
        .args(["restore", &f.rp, "--to", to.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as its temporary file exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    let temp = loop {
        if let Some(name) = dir_names(&fuse.point).into_iter().find(|n| n.contains(".drmesh-restore-")) {
            break name;
        }
        assert!(child.try_wait().unwrap().is_none(), "the restore ended before its temporary file was seen");
        assert!(Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(dir_names(&fuse.point).contains(&temp), "the killed restore left {temp} (as expected)");
    assert!(!to.exists());
    // The next restore removes it, then writes the image.
    restore_result(&restore(&f.mesh, "dst", &f.rp, &to, &[])).unwrap();
    assert_eq!(dir_names(&fuse.point), vec!["disk.img"], "the leftover is gone");
    assert_eq!(file_hash(&to), want);

    // A full disk: the restore fails saying so, and leaves nothing there.
    let small = Mount::new(&["-t", "tmpfs", "-o", "size=8m", "tmpfs"], &work.join("full"));
    let out = restore(&f.mesh, "dst", &f.rp, &small.point.join("disk.img"), &[]);
    let err = restore_result(&out).expect_err("64 MiB do not fit in 8 MiB");
    assert!(err.contains("No space left") || err.contains("disk full"), "{err}");
    assert!(dir_names(&small.point).is_empty(), "a failed restore left {:?}", dir_names(&small.point));
    // The node starts again and cleans nothing it should not.
    f.mesh.start("dst", "topology.toml");
    assert_eq!(f.mesh.rp_seqs("dst", "disk").len(), 1);
}
