//! A point-in-time view of an image file without copying it: a reflink clone
//! (`FICLONE`), on filesystems whose files can share extents (XFS with
//! reflink, btrfs, bcachefs). The clone is made as an unnamed file
//! (`O_TMPFILE`) in the image's own directory, so it never has a name another
//! program could see, plant a symlink at or leave behind: its extents go back
//! to the filesystem when the view is dropped, or when the node dies.
//!
//! The kernel clones under the image's inode locks: writes through the page
//! cache before the call are in the clone, writes after it are not. For a
//! disk image in use by a VM that is the state a power cut would leave (crash
//! consistent). While the cycle reads, blocks the VM overwrites take new space
//! on the filesystem (copy on write); the clone gives it back at the end.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::device::LocalDevice;

/// Why no clone was made: `reason` says it for people (the view falls back to
/// reading the live image).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct NoClone {
    /// What failed, naming the file or directory.
    pub reason: String,
}

/// Clones the regular file `image` into an unnamed file beside it and opens
/// the clone for reading (O_DIRECT when the filesystem allows). Blocking: a
/// file of many extents takes a moment, during which its writers wait.
pub fn clone_image(image: &Path) -> Result<LocalDevice, NoClone> {
    let no = |what: String, e: io::Error| NoClone { reason: format!("{what}: {e}") };
    // Beside the file itself, not beside a symlink to it: a clone cannot cross filesystems.
    let real = std::fs::canonicalize(image).map_err(|e| no(format!("cannot resolve {}", image.display()), e))?;
    let dir = real.parent().unwrap_or(Path::new("/"));
    let src = File::open(&real).map_err(|e| no(format!("cannot open {}", real.display()), e))?;
    let unnamed = |direct: bool| {
        let flags = libc::O_TMPFILE | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 };
        OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(flags).open(dir)
    };
    let (clone, direct) = match unnamed(true) {
        Ok(f) => (f, true),
        Err(_) => (unnamed(false).map_err(|e| no(format!("cannot make an unnamed file in {} for the clone", dir.display()), e))?, false),
    };
    #[allow(unsafe_code)]
    // SAFETY: FICLONE takes the source descriptor as its integer argument (no
    // pointer); both descriptors stay open for the whole call.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EXDEV) => format!("the filesystem of {} cannot clone files (reflink)", dir.display()),
            _ => format!("cannot clone {}", real.display()),
        };
        return Err(no(why, e));
    }
    LocalDevice::from_file(clone, format!("{} (reflink clone)", real.display()), direct).map_err(|e| NoClone { reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::device::BlockDevice as _;

    /// On a filesystem without reflinks (tmpfs, ext4) the reason names the
    /// directory; nothing is left in it.
    #[test]
    fn a_filesystem_without_reflinks_says_so_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        match clone_image(&img) {
            // A test machine whose temporary directory is on XFS or btrfs.
            Ok(dev) => {
                let mut buf = vec![0u8; 8192];
                assert_eq!(dev.read_at(&mut buf, 0).unwrap(), 8192);
                assert!(buf.iter().all(|&b| b == 7));
            }
            Err(e) => assert!(e.reason.contains(&dir.path().display().to_string()), "{e}"),
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("disk.img")]);
    }

    #[test]
    fn a_missing_image_is_named() {
        let e = clone_image(Path::new("/nonexistent/disk.img")).unwrap_err();
        assert!(e.reason.contains("/nonexistent/disk.img"), "{e}");
    }
}
