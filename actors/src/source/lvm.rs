//! The `file` kind's point-in-time view of a block device that is an LVM
//! logical volume: an LVM snapshot taken when the cycle starts, read by the
//! cycle, removed when it ends. Taking it suspends the origin for an instant
//! with its filesystem frozen (device-mapper's lockfs), so the RP of a mounted
//! logical volume is `fs-frozen`, of an unmounted one `crash`.
//!
//! Each (volume, target) has one snapshot name, `drmesh-VOLUME-TARGET` in the
//! origin's volume group; one a killed node left behind is removed at the next
//! cycle's start, once `lvs` says it is a snapshot of the same origin (a
//! logical volume of that name that is anything else is never touched).
//! A thick snapshot gets 10% of the origin's size (at least 64 MiB, at most
//! the group's free space): when the origin is overwritten more than that
//! during one cycle, the snapshot becomes invalid and the cycle fails, saying
//! so. A thin logical volume gets a thin snapshot, which needs no size.
//! Commands go through `lvm` (the `lvm2` package), each with a time limit.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::device::LocalDevice;
use crate::mounts::Mount;

/// Time limit of one `lvm` command.
const LVM_TIMEOUT: Duration = Duration::from_secs(120);
/// Smallest copy-on-write space of a thick snapshot.
const COW_MIN_BYTES: u64 = 64 << 20;

/// Why no snapshot was taken, for people (the view falls back to a live read).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct NoSnapshot {
    /// What failed, naming the logical volume.
    pub reason: String,
}

fn no(reason: impl Into<String>) -> NoSnapshot {
    NoSnapshot { reason: reason.into() }
}

/// Whether the block device `rdev` is an LVM logical volume (device-mapper
/// says its uuid starts with `LVM-`).
pub fn is_logical_volume(rdev: u64) -> bool {
    let dir = format!("/sys/dev/block/{}:{}/dm/uuid", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    std::fs::read_to_string(dir).is_ok_and(|u| u.starts_with("LVM-"))
}

/// Runs `lvm ARGS` within [`LVM_TIMEOUT`]; its stdout, or why not (with its
/// last line of stderr).
fn lvm(args: &[&str]) -> Result<String, String> {
    let shown = format!("lvm {}", args.join(" "));
    let child = Command::new("lvm")
        .args(args)
        // lvm warns on stderr about every descriptor a parent left open.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{shown}`: {e} (is the lvm2 package installed?)"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(LVM_TIMEOUT) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("`{shown}`: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(format!("`{shown}` did not finish within {} s and was killed", LVM_TIMEOUT.as_secs()));
        }
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message");
    Err(format!("`{shown}` failed ({}): {last}", out.status))
}

/// The fields `lvs --nameprefixes` prints for one logical volume.
fn fields(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim_start_matches("LVM2_").to_ascii_lowercase(), v.trim_matches('\'').to_string()))
        .collect()
}

fn field<'a>(all: &'a [(String, String)], name: &str) -> &'a str {
    all.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

/// What `lvs` says of one logical volume (by path or `vg/lv`), or `None` when
/// it does not exist.
fn lvs(which: &str, columns: &str) -> Result<Option<Vec<(String, String)>>, String> {
    match lvm(&["lvs", "--noheadings", "--nameprefixes", "--units", "b", "--nosuffix", "-o", columns, which]) {
        Ok(out) => Ok(out.lines().find(|l| !l.trim().is_empty()).map(fields)),
        Err(e) if e.contains("Failed to find logical volume") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The snapshot's name for `volume` towards `target`: readable, within LVM's
/// 127 bytes, without the `_` of LVM's reserved suffixes.
fn snapshot_name(volume: &str, target: &str) -> String {
    let name = format!("drmesh-{}-{}", volume.replace('_', "-"), target.replace('_', "-"));
    if name.len() <= 120 {
        return name;
    }
    let hash = blake3::hash(format!("{volume}\0{target}").as_bytes());
    format!("drmesh-{}", &hash.to_hex()[..24])
}

/// An LVM snapshot of a logical volume, for one cycle.
#[derive(Debug)]
pub struct LvmSnapshot {
    /// `vg/name` of the snapshot.
    full_name: String,
    /// `vg/lv` of the origin.
    origin: String,
    thin: bool,
    device: Mutex<Option<Arc<LocalDevice>>>,
    frozen: Option<Mount>,
    removed: std::sync::atomic::AtomicBool,
}

impl LvmSnapshot {
    /// Snapshots the logical volume at `path` for `volume`'s cycle towards
    /// `target` and opens the snapshot for reading. Blocking.
    pub fn take(path: &Path, volume: &str, target: &str) -> Result<LvmSnapshot, NoSnapshot> {
        let shown = path.display();
        let rdev = std::fs::metadata(path).map_err(|e| no(format!("cannot stat {shown}: {e}")))?.rdev();
        let path_text = path.to_str().ok_or_else(|| no(format!("{shown} is not UTF-8")))?;
        let origin = lvs(path_text, "vg_name,lv_name,lv_size,segtype,vg_free,vg_extent_size")
            .map_err(no)?
            .ok_or_else(|| no(format!("lvs does not know {shown} as a logical volume")))?;
        let (vg, lv) = (field(&origin, "vg_name").to_string(), field(&origin, "lv_name").to_string());
        let number = |name: &str| field(&origin, name).parse::<u64>().unwrap_or(0);
        let (size, free, extent) = (number("lv_size"), number("vg_free"), number("vg_extent_size").max(1));
        let thin = field(&origin, "segtype") == "thin";
        let name = snapshot_name(volume, target);
        let full_name = format!("{vg}/{name}");
        let origin_name = format!("{vg}/{lv}");
        // One a killed node left behind: ours only if it is a snapshot of this origin.
        if let Some(old) = lvs(&full_name, "origin").map_err(no)? {
            if field(&old, "origin") != lv {
                return Err(no(format!("a logical volume {full_name} exists and is not drmesh's snapshot of {origin_name}; rename or remove it")));
            }
            tracing::warn!(volume, snapshot = %full_name, "removing a snapshot an earlier run left behind");
            lvm(&["lvremove", "-q", "-f", &full_name]).map_err(no)?;
        }
        // The filesystem on it, frozen by the suspend while the snapshot is made.
        let frozen = crate::mounts::mounted(&[rdev]);
        if thin {
            lvm(&["lvcreate", "-q", "-s", "-kn", "-ay", "-n", &name, &origin_name]).map_err(no)?;
        } else {
            let cow = (size / 10).max(COW_MIN_BYTES).min(free) / extent * extent;
            if cow == 0 {
                return Err(no(format!("volume group {vg} has no free space for a snapshot of {lv} (it needs at least one extent, {extent} bytes; 10% of the origin is best)")));
            }
            lvm(&["lvcreate", "-q", "-s", "-n", &name, "-L", &format!("{cow}b"), &origin_name]).map_err(no)?;
        }
        let snapshot = LvmSnapshot { full_name, origin: origin_name, thin, device: Mutex::new(None), frozen, removed: Default::default() };
        // From here on, dropping `snapshot` on an error removes it.
        let dev_path = snapshot.path()?;
        let device = LocalDevice::open(&dev_path).map_err(|e| no(e.to_string()))?;
        *snapshot.device.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(device));
        Ok(snapshot)
    }

    /// The snapshot's device node.
    fn path(&self) -> Result<PathBuf, NoSnapshot> {
        let info = lvs(&self.full_name, "lv_path,lv_dm_path").map_err(no)?.ok_or_else(|| no(format!("the new snapshot {} is gone", self.full_name)))?;
        // Without udev, lvm makes the /dev/mapper node; the /dev/VG link may be missing.
        let found = [field(&info, "lv_path"), field(&info, "lv_dm_path")].into_iter().map(PathBuf::from).find(|p| p.exists());
        found.ok_or_else(|| no(format!("the snapshot {} has no device node", self.full_name)))
    }

    /// The device to read.
    pub fn device(&self) -> Option<Arc<LocalDevice>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The filesystem that was mounted on the origin, and so frozen while the
    /// snapshot was taken, if one was.
    pub fn frozen(&self) -> Option<&Mount> {
        self.frozen.as_ref()
    }

    /// How it was taken, for people.
    pub fn describe(&self) -> String {
        let kind = if self.thin { "thin LVM snapshot" } else { "LVM snapshot" };
        match &self.frozen {
            Some(m) => format!("{kind} {} of {}, its {} filesystem (mounted at {}) frozen at the instant", self.full_name, self.origin, m.fs_type, m.point.display()),
            None => format!("{kind} {} of {} (no filesystem mounted on it to freeze)", self.full_name, self.origin),
        }
    }

    /// Whether the snapshot still holds the instant: a thick snapshot whose
    /// copy-on-write space ran out is invalid (`lvs` attribute `I`).
    pub fn check(&self) -> Result<(), String> {
        let attr = lvs(&self.full_name, "lv_attr")?.map(|f| field(&f, "lv_attr").to_string()).unwrap_or_default();
        match attr.chars().nth(4) {
            Some('I') => Err(format!(
                "the LVM snapshot {} ran out of copy-on-write space (more of {} was overwritten during the cycle than the snapshot holds); free space in the volume group for a larger one",
                self.full_name, self.origin
            )),
            _ if attr.is_empty() => Err(format!("the LVM snapshot {} is gone", self.full_name)),
            _ => Ok(()),
        }
    }

    /// Closes the snapshot and removes it; the reader may still hold the
    /// device for a moment, so a busy removal is tried again for a while.
    pub fn remove(&self) -> Result<(), String> {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).take();
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..20 {
            match lvm(&["lvremove", "-q", "-f", &self.full_name]) {
                Ok(_) => {
                    self.removed.store(true, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
                Err(e) if e.contains("Failed to find logical volume") => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last)
    }
}

impl Drop for LvmSnapshot {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(snapshot = %self.full_name, error = %e, "cannot remove the LVM snapshot; the next cycle of the volume removes it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvs_fields_are_parsed() {
        let f = fields("  LVM2_VG_NAME='vg0' LVM2_LV_NAME='data' LVM2_LV_SIZE='104857600' LVM2_SEGTYPE='linear' LVM2_VG_FREE=''");
        assert_eq!(field(&f, "vg_name"), "vg0");
        assert_eq!(field(&f, "lv_size"), "104857600");
        assert_eq!(field(&f, "vg_free"), "");
        assert_eq!(field(&f, "missing"), "");
    }

    #[test]
    fn snapshot_names_are_lvm_names() {
        assert_eq!(snapshot_name("db_main", "hq"), "drmesh-db-main-hq");
        let long = snapshot_name(&"v".repeat(128), "hq");
        assert!(long.starts_with("drmesh-") && long.len() <= 127, "{long}");
        assert_ne!(long, snapshot_name(&"v".repeat(128), "dr"));
    }

    #[test]
    fn a_device_without_device_mapper_is_not_a_logical_volume() {
        assert!(!is_logical_volume(nix::sys::stat::makedev(4095, 1048575)));
        assert!(!is_logical_volume(nix::sys::stat::makedev(7, 0)));
    }
}
