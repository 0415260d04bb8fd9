//! Loop devices, mounts and `nbdfuse` files for the commands that look inside
//! a recovery point (`recover --adapt`, drill checks): each is undone when its
//! guard drops, and every helper process dies with the process that started it.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drmesh_actors::adapt::{FsKind, NamedVolume};

/// A mount, unmounted (lazily if busy) on drop.
pub(crate) struct Mounted(pub(crate) PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = die_with_parent(Command::new("umount").arg(&self.0)).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = die_with_parent(Command::new("umount").arg("-l").arg(&self.0)).status();
        }
    }
}

/// A loop device, detached on drop.
pub(crate) struct Looped(pub(crate) String);

impl Drop for Looped {
    fn drop(&mut self) {
        let _ = die_with_parent(Command::new("losetup").arg("-d").arg(&self.0)).status();
    }
}

/// The nbdfuse process and its mount point; unmounting ends it.
pub(crate) struct Fuse {
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

/// Makes the child `cmd` starts receive SIGKILL when the thread that started
/// it ends (`PR_SET_PDEATHSIG`), so a killed drmesh takes its helpers with
/// it. The child refuses to start if that thread's process is already gone.
/// Only for children waited for by the thread that starts them: the signal
/// follows the starting *thread*, not the process.
pub(crate) fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the async-signal-safe prctl and getppid system calls; it allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}

/// Runs `cmd` to its end; its trimmed stdout, or an error with its stderr.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = die_with_parent(cmd).output().with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        bail!("{} failed: {}", cmd.get_program().to_string_lossy(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Makes the export a file: `nbdfuse POINT/disk URI`, until dropped.
pub(crate) fn fuse_file(uri: &str, point: &Path) -> anyhow::Result<(Fuse, PathBuf)> {
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
pub(crate) fn attach(file: &Path, start: u64, size: u64) -> anyhow::Result<Looped> {
    let dev = run(Command::new("losetup").args(["--find", "--show", "--offset", &start.to_string(), "--sizelimit", &size.to_string()]).arg(file))?;
    Ok(Looped(dev))
}

/// Mount options for a filesystem of the image: XFS needs `nouuid` (a clone
/// shares its source's UUID); `ro` probes without writing (no journal replay).
pub(crate) fn mount_options(kind: FsKind, read_only: bool) -> String {
    let mut o = vec![if read_only { "ro" } else { "rw" }];
    match (kind, read_only) {
        (FsKind::Xfs, true) => o.extend(["nouuid", "norecovery"]),
        (FsKind::Xfs, false) => o.push("nouuid"),
        (FsKind::Ext3 | FsKind::Ext4, true) => o.push("noload"),
        _ => {}
    }
    o.join(",")
}

/// Mounts `dev` (a filesystem of kind `kind`) on `point`, made if missing.
pub(crate) fn mount(dev: &str, point: &Path, kind: FsKind, read_only: bool) -> anyhow::Result<Mounted> {
    std::fs::create_dir_all(point)?;
    run(Command::new("mount").args(["-t", kind.name(), "-o", &mount_options(kind, read_only), dev]).arg(point))?;
    Ok(Mounted(point.to_path_buf()))
}

/// The volume an fstab device spec (UUID=, LABEL=, /dev/...) names.
pub(crate) fn find_volume<'a>(spec: &str, named: &'a [NamedVolume]) -> Option<&'a NamedVolume> {
    named.iter().find(|n| {
        let fs = n.volume.filesystem.as_ref();
        match spec.split_once('=') {
            Some(("UUID", u)) => fs.and_then(|f| f.uuid.as_deref()).is_some_and(|id| id.eq_ignore_ascii_case(u.trim_matches('"'))),
            Some(("LABEL", l)) => fs.is_some_and(|f| f.label.as_deref() == Some(l.trim_matches('"'))),
            _ => n.device == spec,
        }
    })
}
