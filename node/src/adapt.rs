//! `drmesh recover --adapt`: boot adaptation on the export's overlay. The export
//! is made a file with `nbdfuse` (libnbd; the host needs no nbd kernel driver),
//! its root filesystem is found (partition table, LVM linear volumes) and
//! loop-mounted from that file, [`drmesh_actors::adapt::adapt`] edits it, and
//! everything is unmounted again, which flushes the writes into the overlay.
//! The recovery point itself is never written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drmesh_actors::adapt::{adapt, list_volumes, name_volumes, AdaptError, AdaptOptions, FsKind, NamedVolume};
use serde_json::Value;

/// A mount, unmounted (lazily if busy) on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A loop device, detached on drop.
struct Looped(String);

impl Drop for Looped {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The nbdfuse process and its mount point; unmounting ends it.
struct Fuse {
    point: PathBuf,
    child: Child,
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.point).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        bail!("{} failed: {}", cmd.get_program().to_string_lossy(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Makes the export a file: `nbdfuse POINT/disk URI`, until dropped.
fn fuse_file(uri: &str, point: &Path) -> anyhow::Result<(Fuse, PathBuf)> {
    std::fs::create_dir_all(point).with_context(|| format!("making {}", point.display()))?;
    let pidfile = point.with_extension("pid");
    let _ = std::fs::remove_file(&pidfile);
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(point.join("disk"))
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { anyhow::anyhow!("nbdfuse is not installed (Debian package libnbd-bin); --adapt needs it") } else { e.into() })?;
    let mut fuse = Fuse { point: point.to_path_buf(), child };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() {
        if let Ok(Some(status)) = fuse.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = fuse.child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            bail!("nbdfuse exited ({status}): {}", err.trim());
        }
        if Instant::now() > deadline {
            bail!("nbdfuse did not serve {uri} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pid file stays: a later `recover` cleans up after a killed one with it.
    Ok((fuse, point.join("disk")))
}

/// Attaches `start .. start + size` of `file` to a loop device.
fn attach(file: &Path, start: u64, size: u64) -> anyhow::Result<Looped> {
    let dev = run(Command::new("losetup").args(["--find", "--show", "--offset", &start.to_string(), "--sizelimit", &size.to_string()]).arg(file))?;
    Ok(Looped(dev))
}

/// Mount options for a filesystem of the image: XFS needs `nouuid` (a clone
/// shares its source's UUID); `ro` probes without writing (no journal replay).
fn mount_options(kind: FsKind, read_only: bool) -> String {
    let mut o = vec![if read_only { "ro" } else { "rw" }];
    match (kind, read_only) {
        (FsKind::Xfs, true) => o.extend(["nouuid", "norecovery"]),
        (FsKind::Xfs, false) => o.push("nouuid"),
        (FsKind::Ext3 | FsKind::Ext4, true) => o.push("noload"),
        _ => {}
    }
    o.join(",")
}

fn mount(dev: &str, point: &Path, kind: FsKind, read_only: bool) -> anyhow::Result<Mounted> {
    std::fs::create_dir_all(point)?;
    run(Command::new("mount").args(["-t", kind.name(), "-o", &mount_options(kind, read_only), dev]).arg(point))?;
    Ok(Mounted(point.to_path_buf()))
}

/// Whether a mounted filesystem looks like a Linux root.
fn looks_like_root(dir: &Path) -> bool {
    dir.join("etc/fstab").is_file() && ["sbin/init", "usr/sbin/init", "lib/systemd/systemd", "usr/lib/systemd/systemd"].iter().any(|p| dir.join(p).exists() || std::fs::symlink_metadata(dir.join(p)).is_ok())
}

/// The volume an fstab device spec (UUID=, LABEL=, /dev/...) names.
fn find_volume<'a>(spec: &str, named: &'a [NamedVolume]) -> Option<&'a NamedVolume> {
    named.iter().find(|n| {
        let fs = n.volume.filesystem.as_ref();
        match spec.split_once('=') {
            Some(("UUID", u)) => fs.and_then(|f| f.uuid.as_deref()).is_some_and(|id| id.eq_ignore_ascii_case(u.trim_matches('"'))),
            Some(("LABEL", l)) => fs.is_some_and(|f| f.label.as_deref() == Some(l.trim_matches('"'))),
            _ => n.device == spec,
        }
    })
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
