//! Boot adaptation of a real Debian 12 server disk (scripts/recovery-image):
//! the layout is read, the root partition attached and mounted, and after
//! `adapt` the image names its root by UUID, asks for DHCP on ens3, no longer
//! starts open-vm-tools, and has virtio drivers in its rebuilt initramfs.
//!
//! Needs root and the cached image; skipped (with a message) otherwise. The
//! cached image is never modified: the test works on a sparse copy.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use drmesh_actors::adapt::initramfs::{self, Limits};
use drmesh_actors::adapt::{network, sandbox};
use drmesh_actors::adapt::{adapt, list_volumes, name_volumes, Action, AdaptOptions, Area, FsKind, Place};

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let ok = Command::new("losetup").args(["-d", &self.0]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("adapt_debian: could not detach {}", self.0);
        }
    }
}

/// A mount, unmounted (lazily if need be) on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success())
            || Command::new("umount").arg("-l").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("adapt_debian: could not unmount {}", self.0.display());
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a command");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The manifest's key=value lines.
fn manifest(path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn get<'a>(m: &'a [(String, String)], key: &str) -> &'a str {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_default()
}

fn virtio_in(initrd: &Path) -> Vec<String> {
    let contents = initramfs::scan(File::open(initrd).unwrap(), &Limits::default()).unwrap();
    initramfs::VIRTIO_REQUIRED.iter().filter(|m| contents.modules.contains(**m)).map(|m| m.to_string()).collect()
}

#[test]
fn adapts_the_debian_recovery_image() {
    if run(Command::new("id").arg("-u")) != "0" {
        eprintln!("adapt_debian: skipped, needs root (losetup, mount, namespaces)");
        return;
    }
    let cache = std::env::var("DRMESH_RECOVERY_CACHE").unwrap_or_else(|_| "/var/tmp/drmesh-recovery".into());
    let manifest_path = Path::new(&cache).join("bookworm-bios.manifest");
    if !manifest_path.exists() {
        eprintln!("adapt_debian: skipped, no cached image (run scripts/recovery-image as root to build it)");
        return;
    }
    let cached = PathBuf::from(run(Command::new(workspace().join("scripts/recovery-image")).arg("--print-path")));
    let m = manifest(&manifest_path);
    let cached_mtime = fs::metadata(&cached).unwrap().modified().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    let t = Instant::now();
    run(Command::new("cp").arg("--sparse=always").arg(&cached).arg(&disk));
    eprintln!("adapt_debian: sparse copy of the image in {:.1} s", t.elapsed().as_secs_f64());

    // Layout: partition 1, ext4, the manifest's UUID.
    let layout = list_volumes(&File::open(&disk).unwrap()).unwrap();
    let root_volume = layout
        .volumes
        .iter()
        .find(|v| matches!(v.place, Place::Partition { number: 1, .. }))
        .expect("partition 1");
    let fs_found = root_volume.filesystem.as_ref().expect("a filesystem on partition 1");
    assert_eq!(fs_found.kind, FsKind::Ext4);
    let uuid = fs_found.uuid.clone().expect("a UUID");
    assert_eq!(uuid, get(&m, "root_uuid"));
    assert_eq!(root_volume.start_bytes.to_string(), get(&m, "partition_start_bytes"));
    assert_eq!(root_volume.size_bytes.to_string(), get(&m, "partition_size_bytes"));
    eprintln!("adapt_debian: {} at byte {}, UUID {uuid}", root_volume.describe(), root_volume.start_bytes);

    // Attach and mount the root partition (this host makes no loopNp1 devices).
    let device = run(Command::new("losetup").args(["--find", "--show", "--offset", &root_volume.start_bytes.to_string(), "--sizelimit", &root_volume.size_bytes.to_string()]).arg(&disk));
    let _loop = Loop(device.clone());
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    run(Command::new("mount").arg(&device).arg(&root));
    let _mount = Mount(root.clone());

    let kernel = get(&m, "kernel");
    let initrd = root.join(format!("boot/initrd.img-{kernel}"));
    assert!(virtio_in(&initrd).is_empty(), "the image's initramfs should have no virtio drivers yet");
    let vmtools_enabled = root.join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service").is_symlink();

    let options = AdaptOptions { volumes: name_volumes("/dev/sda", &layout), vm_nic: "ens3".into(), ..AdaptOptions::default() };
    let t = Instant::now();
    let report = match adapt(&root, &options) {
        Ok(r) => r,
        Err(e) => panic!("adapt failed: {e}"),
    };
    let adapt_seconds = t.elapsed().as_secs_f64();
    eprintln!("{report}");

    // Nothing the rebuild mounted is left on the host.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let under_root: Vec<&str> = mounts.lines().filter(|l| l.contains(&format!("{}/", root.display()))).collect();
    assert!(under_root.is_empty(), "mounts leaked to the host: {under_root:?}");

    // fstab by UUID, with a backup.
    let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
    assert!(fstab.lines().any(|l| l.starts_with(&format!("UUID={uuid} / ext4"))), "{fstab}");
    assert!(!fstab.lines().any(|l| l.starts_with("/dev/sda")), "{fstab}");
    assert!(root.join("etc/fstab.drmesh-orig").exists());

    // DHCP on ens3, no active static stanza, with a backup.
    let interfaces = fs::read_to_string(root.join("etc/network/interfaces")).unwrap();
    let ifaces = network::ifupdown_ifaces(&interfaces);
    assert!(ifaces.iter().any(|i| i.name == "ens3" && i.family == "inet" && i.method == "dhcp"), "{interfaces}");
    assert!(!ifaces.iter().any(|i| i.method == "static"), "{interfaces}");
    assert!(network::ifupdown_brings_up(&interfaces, "ens3"), "{interfaces}");
    assert!(root.join("etc/network/interfaces.drmesh-orig").exists());

    // open-vm-tools no longer enabled (still installed).
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service").exists());
    if vmtools_enabled {
        assert!(report.find(Area::HypervisorTools, Action::Changed).any(|i| i.path.as_deref().is_some_and(|p| p.ends_with("open-vm-tools.service"))), "{report}");
        assert!(root.join("lib/systemd/system/open-vm-tools.service").exists(), "uninstalled?");
    } else {
        eprintln!("adapt_debian: this image was built without open-vm-tools (DRMESH_RECOVERY_VMTOOLS)");
    }

    // The rebuilt initramfs holds virtio; the modules file has a backup.
    assert_eq!(virtio_in(&initrd), ["virtio_blk", "virtio_pci", "virtio_net"]);
    assert!(root.join("etc/initramfs-tools/modules.drmesh-orig").exists());
    assert_eq!(report.kernels.len(), 1);
    let k = &report.kernels[0];
    assert!(k.ready(), "{k}");
    let rebuild_seconds = k.rebuild_seconds.expect("the initramfs was rebuilt");

    // The report lists it all, and is in the image.
    for (area, path) in [(Area::Fstab, "/etc/fstab"), (Area::Network, "/etc/network/interfaces"), (Area::Initramfs, "/etc/initramfs-tools/modules")] {
        assert!(report.find(area, Action::Changed).any(|i| i.path.as_deref() == Some(path)), "{path} not reported as changed:\n{report}");
    }
    assert!(report.find(Area::Initramfs, Action::Changed).any(|i| i.detail.contains("rebuilt")), "{report}");
    assert_eq!(report.failures().count(), 0, "{report}");
    let in_image = fs::read_to_string(root.join("root/drmesh-adaptation.txt")).unwrap();
    assert!(in_image.contains(&format!("UUID={uuid}")) && in_image.contains("ens3"), "{in_image}");

    // The sandbox the rebuild ran in: no host path, no device nodes, no devtmpfs,
    // no sysctls, no network.
    let host_marker = tmp.path().join("host-marker");
    fs::write(&host_marker, "on the host only").unwrap();
    let probe = format!(
        "test ! -e '{}' || echo HOST-VISIBLE; mknod /tmp/drmesh-sdz b 8 0 2>/dev/null && echo MKNOD; \
         mount -t devtmpfs x /mnt 2>/dev/null && echo DEVTMPFS; (echo x > /proc/sys/kernel/hostname) 2>/dev/null && echo SYSCTL; \
         umount /proc/sys 2>/dev/null && echo UMOUNT; ls /dev | tr '\\n' ' '; echo; tail -n +3 /proc/net/dev | grep -v 'lo:' | grep -q . && echo NIC; echo done",
        host_marker.display()
    );
    let run = sandbox::run_in_image(&root, &["/bin/sh", "-c", &probe], false, std::time::Duration::from_secs(60)).unwrap();
    assert!(run.success(), "{run:?}");
    assert_eq!(run.output.trim(), "null random urandom zero \ndone", "the sandbox let something through");
    assert!(!root.join("tmp/drmesh-sdz").exists());

    eprintln!("adapt_debian: adapt took {adapt_seconds:.1} s, of which the contained initramfs rebuild {rebuild_seconds:.1} s");
    assert_eq!(fs::metadata(&cached).unwrap().modified().unwrap(), cached_mtime, "the cached image was modified");
}
