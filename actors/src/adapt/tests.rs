//! `adapt` on a made-up root folder (no rebuild: its initramfs already holds
//! virtio, or rebuilding is off), including planted symlinks.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::adapt::initramfs::tests::cpio;
use crate::adapt::layout::tests::{ext4_at, MIB};

fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A small Debian-like root: fstab by kernel name, static ifupdown, open-vm-tools
/// enabled, one kernel whose initramfs has (or lacks) virtio.
fn debian_root(root: &Path, virtio: bool) {
    write(root, "etc/fstab", "# fstab\n/dev/sda1 / ext4 errors=remount-ro 0 1\n/dev/sda5 none swap sw 0 0\n");
    write(root, "etc/network/interfaces", "auto lo\niface lo inet loopback\n\nallow-hotplug eno1\niface eno1 inet static\n\taddress 192.168.50.10/24\n\tgateway 192.168.50.1\nsource /etc/network/interfaces.d/*\n");
    write(root, "etc/network/interfaces.d/eno2", "auto eno2\niface eno2 inet static\n address 10.0.0.2/24\n");
    fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).unwrap();
    symlink("/lib/systemd/system/open-vm-tools.service", root.join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service")).unwrap();
    write(root, "boot/vmlinuz-6.1.0-test", "kernel");
    let mut files: Vec<(&str, &[u8])> = vec![("usr/lib/modules/6.1.0-test/kernel/drivers/ata/ahci.ko", b"x")];
    if virtio {
        files.push(("usr/lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko", b"x"));
        files.push(("usr/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_pci.ko", b"x"));
        files.push(("usr/lib/modules/6.1.0-test/kernel/drivers/net/virtio_net.ko", b"x"));
    }
    let packed = zstd::encode_all(cpio(&files).as_slice(), 1).unwrap();
    fs::write(root.join("boot/initrd.img-6.1.0-test"), packed).unwrap();
    write(root, "lib/modules/6.1.0-test/modules.builtin", "kernel/fs/ext4/ext4.ko\n");
    write(root, "lib/modules/6.1.0-test/modules.dep", "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/net/virtio_net.ko:\n");
    write(root, "boot/grub/grub.cfg", "linux /boot/vmlinuz-6.1.0-test root=/dev/sda1 ro quiet\n");
    fs::create_dir_all(root.join("root")).unwrap();
}

fn volumes() -> Vec<NamedVolume> {
    let mut d = vec![0u8; (4 * MIB) as usize];
    ext4_at(&mut d, 0, 0xab);
    let Layout { volumes, .. } = list_volumes(&d).unwrap();
    vec![NamedVolume { device: "/dev/sda1".into(), volume: volumes[0].clone() }]
}

#[test]
fn adapts_a_debian_like_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    debian_root(root, true);
    let options = AdaptOptions { volumes: volumes(), ..AdaptOptions::default() };
    let report = adapt(root, &options).unwrap();
    let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
    assert!(fstab.contains("UUID=abababab-abab-abab-abab-abababababab / ext4 errors=remount-ro 0 1"), "{fstab}");
    assert!(fstab.contains("/dev/sda5 none swap"), "unknown device left alone: {fstab}");
    assert!(root.join("etc/fstab.drmesh-orig").exists());
    let interfaces = fs::read_to_string(root.join("etc/network/interfaces")).unwrap();
    assert!(interfaces.contains("allow-hotplug ens3\niface ens3 inet dhcp\n"), "{interfaces}");
    assert!(!network::ifupdown_ifaces(&interfaces).iter().any(|i| i.method == "static"), "{interfaces}");
    let eno2 = fs::read_to_string(root.join("etc/network/interfaces.d/eno2")).unwrap();
    assert!(network::ifupdown_ifaces(&eno2).is_empty(), "{eno2}");
    assert!(root.join("etc/network/interfaces.d/.eno2.drmesh-orig").exists(), "hidden backup in interfaces.d");
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service").is_symlink());
    assert_eq!(report.kernels.len(), 1);
    assert!(report.kernels[0].ready(), "{}", report.kernels[0]);
    assert!(report.items.iter().any(|i| i.area == Area::Boot && i.action == Action::Warning && i.detail.contains("root=/dev/sda1")), "{report}");
    assert_eq!(report.written_to.as_deref(), Some("/root/drmesh-adaptation.txt"));
    let text = fs::read_to_string(root.join("root/drmesh-adaptation.txt")).unwrap();
    assert!(text.contains("/etc/fstab") && text.contains("open-vm-tools.service"), "{text}");
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"area\":\"fstab\""), "{json}");

    // A second run changes nothing and keeps the first backups.
    let again = adapt(root, &options).unwrap();
    assert_eq!(again.items.iter().filter(|i| i.action == Action::Changed).count(), 0, "{again}");
    assert!(fs::read_to_string(root.join("etc/fstab.drmesh-orig")).unwrap().contains("/dev/sda1 /"));
}

#[test]
fn missing_virtio_without_rebuild_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    debian_root(dir.path(), false);
    let options = AdaptOptions { rebuild_initramfs: false, ..AdaptOptions::default() };
    let report = adapt(dir.path(), &options).unwrap();
    let k = &report.kernels[0];
    assert_eq!(k.drivers_in(initramfs::DriverState::Missing), ["virtio_blk", "virtio_net", "virtio_pci"]);
    assert!(report.find(Area::Initramfs, Action::Warning).count() == 1, "{report}");
}

#[test]
fn planted_symlinks_never_reach_the_host() {
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("shadow");
    fs::write(&secret, "root:$6$host-secret:19000:0:99999:7:::\n/dev/sda1 / ext4 defaults 0 1\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    debian_root(root, true);
    // /etc/fstab -> the host's file by an absolute link, interfaces.d entries by
    // relative ones climbing out, and /etc/netplan as a link to a host folder.
    fs::remove_file(root.join("etc/fstab")).unwrap();
    symlink(&secret, root.join("etc/fstab")).unwrap();
    let climb = format!("../../../../../../../../..{}", secret.display());
    symlink(&climb, root.join("etc/network/interfaces.d/evil")).unwrap();
    let host_netplan = host.path().join("netplan");
    fs::create_dir_all(&host_netplan).unwrap();
    fs::write(host_netplan.join("01.yaml"), "network:\n  ethernets:\n    eno1:\n      addresses: [1.2.3.4/24]\n").unwrap();
    symlink(&host_netplan, root.join("etc/netplan")).unwrap();
    // The report's folder as a link to the host folder.
    fs::remove_dir(root.join("root")).unwrap();
    symlink(host.path(), root.join("root")).unwrap();
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = walk(host.path());

    let options = AdaptOptions { volumes: volumes(), ..AdaptOptions::default() };
    let report = adapt(root, &options).unwrap();
    assert_eq!(walk(host.path()), before, "a host file was written");
    assert!(report.items.iter().any(|i| i.path.as_deref() == Some("/etc/fstab") && i.detail.contains("symlink")), "{report}");
    assert!(root.join("etc/fstab").is_symlink(), "left alone");
    assert!(!root.join("etc/fstab.drmesh-orig").exists());
    // The report went to /var/log? No such folder here: it is not written at all
    // rather than through the link ("/root" resolves to the host path's name
    // inside the root, which does not exist).
    assert!(report.written_to.is_none() || !host.path().join("drmesh-adaptation.txt").exists());
}

fn walk(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}
