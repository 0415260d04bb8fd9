//! `drmesh recover --adapt`: boot adaptation on the export's overlay. The export
//! is made a file with `nbdfuse` (libnbd; the host needs no nbd kernel driver),
//! its root filesystem is found (partition table, LVM linear volumes) and
//! loop-mounted from that file, [`drmesh_actors::adapt::adapt`] edits it, and
//! everything is unmounted again, which flushes the writes into the overlay.
//! The recovery point itself is never written.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context as _};
use drmesh_actors::adapt::{adapt, list_volumes, name_volumes, AdaptError, AdaptOptions, FsKind};
use serde_json::Value;

use crate::mounts::{attach, find_volume, fuse_file, is_root, mount};

/// Whether a mounted filesystem looks like a Linux root.
fn looks_like_root(dir: &Path) -> bool {
    dir.join("etc/fstab").is_file() && ["sbin/init", "usr/sbin/init", "lib/systemd/systemd", "usr/lib/systemd/systemd"].iter().any(|p| dir.join(p).exists() || std::fs::symlink_metadata(dir.join(p)).is_ok())
}

/// Adapts the export at `uri` (its info from the export) for a VM whose first
/// NIC is `vm_nic`, the source server having called the disk `source_disk`.
/// Works in `work` (a private folder). Returns the report as JSON and as text.
pub fn adapt_export(uri: &str, work: &Path, source_disk: &str, vm_nic: &str) -> anyhow::Result<(Value, String)> {
    if !is_root() {
        bail!("--adapt mounts the image's filesystems and needs root");
    }
    let (fuse, disk) = fuse_file(uri, &work.join("fuse"))?;
    let file = File::open(&disk).with_context(|| format!("opening {}", disk.display()))?;
    let layout = list_volumes(&file)?;
    drop(file);
    let named = name_volumes(source_disk, &layout);
    let mut found = None;
    let root_point = work.join("root");
    for n in &named {
        let Some(fs) = &n.volume.filesystem else { continue };
        if !matches!(fs.kind, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs) {
            continue;
        }
        let dev = attach(&disk, n.volume.start_bytes, n.volume.size_bytes)?;
        let probe = match mount(&dev.0, &root_point, fs.kind, true) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(volume = %n.volume.describe(), error = %e, "adapt: cannot mount; not the root");
                continue;
            }
        };
        let is_root = looks_like_root(&root_point);
        drop(probe);
        if is_root {
            let mounted = mount(&dev.0, &root_point, fs.kind, false)?;
            found = Some((n, dev, mounted));
            break;
        }
    }
    let Some((root_volume, _root_dev, root_mount)) = found else {
        let what: Vec<String> = layout.volumes.iter().map(|v| v.describe()).collect();
        bail!("no Linux root filesystem (with /etc/fstab and an init) on the recovery point; its volumes: {}", what.join("; "));
    };
    // A separate /boot holds the kernels and initramfs images: mount it too.
    let mut boot = None;
    let fstab = std::fs::read_to_string(root_point.join("etc/fstab")).unwrap_or_default();
    for line in fstab.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"/boot") {
            match fields.first().and_then(|spec| find_volume(spec, &named)) {
                Some(n) if n.volume.start_bytes != root_volume.volume.start_bytes => {
                    if let Some(fs) = &n.volume.filesystem {
                        let dev = attach(&disk, n.volume.start_bytes, n.volume.size_bytes)?;
                        let m = mount(&dev.0, &root_point.join("boot"), fs.kind, false)?;
                        // Unmounted before detached: tuple fields drop in order.
                        boot = Some((m, dev));
                    }
                }
                _ => tracing::warn!(entry = line, "adapt: /boot is on a volume not found on this disk; its initramfs is not checked"),
            }
        }
    }
    let options = AdaptOptions { volumes: named.clone(), vm_nic: vm_nic.to_string(), ..AdaptOptions::default() };
    let result = adapt(&root_point, &options);
    drop(boot);
    drop(root_mount);
    drop(_root_dev);
    drop(fuse);
    match result {
        Ok(report) => Ok((serde_json::to_value(&report)?, report.to_string())),
        Err(AdaptError::Incomplete { failures, report, .. }) => bail!("boot adaptation is incomplete: {}\n{}", failures.join("; "), report),
        Err(e) => Err(e.into()),
    }
}
