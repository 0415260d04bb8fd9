//! Feeds arbitrary bytes to the parsers that read a recovered disk image and
//! its files during boot adaptation and restore: the partition table, LVM and
//! filesystem superblock reader (as a whole disk), the device signature probe,
//! the initramfs (cpio, gzip, zstd) scanner, LVM metadata text, and the
//! fstab and network configuration rewriters (as text). None may panic.
#![no_main]

use std::collections::BTreeSet;

use drmesh_actors::adapt::initramfs::{self, Limits};
use drmesh_actors::adapt::{fstab, list_volumes, lvm, name_volumes, network};
use drmesh_actors::restore::probe::probe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = probe(data);
    let disk = data.to_vec();
    if let Ok(layout) = list_volumes(&disk) {
        let _ = name_volumes("/dev/sda", &layout);
    }
    let limits = Limits { bytes_max: 1 << 20, entries_max: 10_000 };
    let _ = initramfs::scan(data, &limits);
    let text = String::from_utf8_lossy(data);
    if let Ok(tree) = lvm::parse_text(&text) {
        let _ = lvm::volume_group(&tree);
    }
    let _ = fstab::rewrite_fstab(&text, &[]);
    let _ = network::ifupdown_ifaces(&text);
    let _ = network::ifupdown_disable(&text, &BTreeSet::from(["eth0".to_string()]));
    let _ = network::netplan_rewrite(&text, true);
    let _ = network::nm_rewrite(&text);
    let _ = network::networkd_rewrite(&text, true);
});
