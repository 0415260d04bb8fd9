//! Freezing a mounted filesystem (`FIFREEZE`) for the instant a point-in-time
//! view is taken, so the view holds a clean filesystem (`fs-frozen`), not one
//! a power cut would leave. The kernel flushes the filesystem's dirty data and
//! journal, then blocks its writers until the thaw. A watchdog thread thaws it
//! after a time limit whatever the caller does (a view that hangs must not
//! leave a server's filesystem frozen), and dropping the guard thaws it.
//!
//! Also finds the filesystem an image file holds when that image is attached
//! to a loop device and mounted on this machine: the case where drmesh can
//! freeze what is inside a `file` volume.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::mounts::Mount;

/// `FIFREEZE`, `_IOWR('X', 119, int)` (linux/fs.h; not in the libc crate).
const FIFREEZE: u64 = 0xC004_5877;
/// `FITHAW`, `_IOWR('X', 120, int)`.
const FITHAW: u64 = 0xC004_5878;

/// The longest a filesystem stays frozen: the watchdog thaws it then.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// A frozen filesystem; thawed when dropped (or by the watchdog at the limit).
pub struct Frozen {
    /// `None`: held frozen by the consistency group being opened, which thaws it.
    dir: Option<Arc<File>>,
    point: PathBuf,
    done: Option<mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

fn ioctl(dir: &File, request: u64) -> std::io::Result<()> {
    let arg: libc::c_int = 0;
    #[allow(unsafe_code)]
    // SAFETY: FIFREEZE and FITHAW take an int argument the kernel ignores; the
    // descriptor is open for the whole call and the pointer is to a local.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, &arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at `mount.point` for at most `limit`.
/// The error says why in words (not root, a filesystem without freeze
/// support, already frozen by someone else). A filesystem the consistency
/// group being opened on this thread holds frozen is not frozen again: the
/// guard then leaves the thaw to the group.
pub fn freeze(mount: &Mount, limit: Duration) -> Result<Frozen, String> {
    let point = mount.point.clone();
    match super::group::held(&point) {
        Some(Ok(_)) => return Ok(Frozen { dir: None, point, done: None, watchdog: None }),
        Some(Err(why)) => return Err(why),
        None => {}
    }
    let dir = File::open(&point).map_err(|e| format!("cannot open {}: {e}", point.display()))?;
    ioctl(&dir, FIFREEZE).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => format!("freezing {} needs CAP_SYS_ADMIN (run the node as root): {e}", point.display()),
        Some(libc::EBUSY) => format!("the filesystem at {} is already frozen by someone else", point.display()),
        Some(libc::EOPNOTSUPP) => format!("the {} filesystem at {} cannot be frozen", mount.fs_type, point.display()),
        _ => format!("cannot freeze {}: {e}", point.display()),
    })?;
    let dir = Arc::new(dir);
    let (done, wait) = mpsc::channel::<()>();
    let (watched, shown) = (dir.clone(), point.display().to_string());
    let watchdog = std::thread::Builder::new().name("drmesh-thaw".into()).spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            tracing::warn!(mount = %shown, secs = limit.as_secs(), "thawed the filesystem at the freeze time limit: taking the view took too long");
            let _ = ioctl(&watched, FITHAW);
        }
    });
    let watchdog = match watchdog {
        Ok(handle) => handle,
        Err(e) => {
            // No watchdog, no freeze: thaw now.
            let _ = ioctl(&dir, FITHAW);
            return Err(format!("cannot start the thaw watchdog for {}: {e}", point.display()));
        }
    };
    Ok(Frozen { dir: Some(dir), point, done: Some(done), watchdog: Some(watchdog) })
}

impl Frozen {
    /// Where the frozen filesystem is mounted.
    pub fn point(&self) -> &Path {
        &self.point
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let Some(dir) = &self.dir else { return };
        // EINVAL: the watchdog thawed it already.
        if let Err(e) = ioctl(dir, FITHAW) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                tracing::warn!(mount = %self.point.display(), error = %e, "cannot thaw the filesystem");
            }
        }
    }
}

/// The filesystem mounted from a loop device whose backing file is `image`
/// (the same inode), if one is: what a clone of the image can be made with
/// frozen. Reads `/sys/block/loop*/loop/backing_file`.
pub fn loop_mounted(image: &Path) -> Option<Mount> {
    let want = std::fs::metadata(image).ok()?;
    let mut devs = Vec::new();
    for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else { continue };
        let backing = backing.trim_end_matches('\n');
        let same = std::fs::metadata(backing).is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino());
        if let (true, Ok(dev)) = (same, std::fs::read_to_string(entry.path().join("dev"))) {
            devs.extend(crate::mounts::parse_dev(dev.trim()));
        }
    }
    if devs.is_empty() {
        return None;
    }
    crate::mounts::mounted(&devs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_no_loop_device_backs_has_no_loop_mount() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        assert_eq!(loop_mounted(&img), None);
        assert_eq!(loop_mounted(Path::new("/nonexistent/disk.img")), None);
    }

    #[test]
    fn freezing_a_missing_mount_point_says_which() {
        let m = Mount { point: PathBuf::from("/nonexistent/mnt"), fs_type: "ext4".into() };
        let e = freeze(&m, FREEZE_LIMIT).err().expect("no such mount point");
        assert!(e.contains("/nonexistent/mnt"), "{e}");
    }
}
