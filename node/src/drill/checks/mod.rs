//! The checks of a drill: given the disk of a recovery point, prove that it
//! recovers. Each check is a plain blocking function that runs real tools
//! (e2fsck, PostgreSQL, the user's script, qemu) and returns an [`Outcome`];
//! none panics, and every failure, including a missing tool and the time
//! limit, is a failed outcome whose summary says why.
//!
//! The disk is only ever written through a throwaway copy-on-write overlay
//! (an nbdfuse file of an export, or a scratch copy in tests): journal
//! replays, PostgreSQL's crash recovery and writable script mounts change
//! that overlay, never the recovery point.
//!
//! Every process a check starts gets `PR_SET_PDEATHSIG = SIGKILL` (it dies
//! with the calling thread, also when drmesh is SIGKILLed), runs in its own
//! process group (killed whole at the deadline), and the long-lived ones
//! (PostgreSQL, the script, qemu) leave a `NAME.pid` file in `work` while they
//! run, for the caller's clean-up after a crash. Every mount point is under
//! `work`. Call a check on the thread that will wait for it (the death signal
//! follows the starting thread).

mod boot;
mod fsck;
mod postgres;
mod script;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use drmesh_actors::adapt::{list_volumes, name_volumes, FsKind, Layout, NamedVolume, Place, Volume};
use drmesh_actors::drill::{tail, OUTPUT_TAIL_BYTES};

use crate::mounts::{attach, die_with_parent, find_volume, mount, Looped, Mounted};

pub use self::boot::boot;
pub use self::fsck::fsck;
pub use self::postgres::postgres;
pub use self::script::script;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the check passed.
    pub passed: bool,
    /// One line: what was found or why it failed, naming the check's object
    /// (which filesystem, which file).
    pub summary: String,
    /// The end of the tool output or console, at most
    /// [`OUTPUT_TAIL_BYTES`] bytes.
    pub output: String,
}

impl Outcome {
    /// A passed check.
    pub(crate) fn pass(summary: impl Into<String>, output: &str) -> Outcome {
        Outcome { passed: true, summary: summary.into(), output: tail(output, OUTPUT_TAIL_BYTES) }
    }

    /// A failed check.
    pub(crate) fn fail(summary: impl Into<String>, output: &str) -> Outcome {
        Outcome { passed: false, summary: summary.into(), output: tail(output, OUTPUT_TAIL_BYTES) }
    }
}

/// The disk a check runs on.
pub struct Disk<'a> {
    /// A file holding the whole disk image of the RP; WRITABLE, but writes go
    /// to a throwaway copy-on-write overlay (in a real drill an nbdfuse file of
    /// an export; in tests a scratch copy of an image). Never the RP.
    pub file: &'a Path,
    /// A private (0700) folder for mount points, sockets, logs, pid files. The
    /// caller removes it afterwards and, after a crash, cleans it up: it
    /// unmounts every mount under it, detaches loop devices whose backing file
    /// is under it, and kills the pids written in any `*.pid` file under it.
    pub work: &'a Path,
}

/// The text of `error` with its causes, on one line.
pub(crate) fn chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

/// How a tool run ended.
pub(crate) struct Ran {
    /// Its exit status; `None` when it was killed at the deadline.
    pub status: Option<ExitStatus>,
    /// The end of its stdout and stderr together (or stdout alone when the
    /// run was split).
    pub output: String,
    /// The end of its stderr, when the run was split.
    pub errors: String,
}

impl Ran {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit 4", "killed by signal 9", "killed at the time limit".
    pub fn how(&self) -> String {
        status_text(self.status)
    }
}

/// How a process ended, for messages.
pub(crate) fn status_text(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        None => "killed at the time limit".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "ended".into(),
        },
    }
}

/// Longest tail of a tool's log read back, in bytes.
const LOG_READ_BYTES: u64 = 64 << 10;

/// The last [`LOG_READ_BYTES`] of a log file, as text.
pub(crate) fn read_log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(LOG_READ_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(LOG_READ_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0 {
        // Drop the partial first line.
        match text.find('\n') {
            Some(i) => format!("[... {} bytes before]\n{}", from + i as u64 + 1, &text[i + 1..]),
            None => text,
        }
    } else {
        text
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Why a tool could not be started.
pub(crate) enum SpawnError {
    /// The program is not installed.
    NotFound,
    /// Anything else.
    Other(String),
}

/// Sleeps until `deadline` or `step`, whichever is sooner.
pub(crate) fn nap(deadline: Instant, step: Duration) {
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep(left.min(step));
}

/// Kills the process group `pgid` (a child started in a group of its own).
pub(crate) fn kill_group(pgid: u32) {
    if let Ok(pid) = i32::try_from(pgid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs `cmd` to its end or to `deadline` (then it and its process group are
/// killed), its output in `log` (and, if `split`, its stderr in `log.err`).
/// The child dies with the calling thread and runs in its own process group,
/// whose leftovers are killed when it ends; stdin is /dev/null. With
/// `pid_file`, its pid is written there while it runs.
pub(crate) fn run_tool(cmd: &mut Command, log: &Path, split: bool, pid_file: Option<&Path>, deadline: Instant) -> Result<Ran, SpawnError> {
    let err_log = log.with_extension("err");
    let open = |p: &Path| File::create(p).map_err(|e| SpawnError::Other(format!("cannot create {}: {e}", p.display())));
    let out = open(log)?;
    let err = if split { open(&err_log)? } else { out.try_clone().map_err(|e| SpawnError::Other(e.to_string()))? };
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    die_with_parent(cmd);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound,
        _ => SpawnError::Other(format!("cannot run {}: {e}", cmd.get_program().to_string_lossy())),
    })?;
    let pgid = child.id();
    if let Some(p) = pid_file {
        let _ = std::fs::write(p, format!("{pgid}\n"));
    }
    let mut step = Duration::from_millis(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => {
                // Cannot happen for a child of ours; end it as at the deadline.
                kill_group(pgid);
                let _ = child.kill();
                break child.wait().ok();
            }
        }
        if Instant::now() >= deadline {
            kill_group(pgid);
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        nap(deadline, step);
        step = (step * 2).min(Duration::from_millis(100));
    };
    // Whatever it left running in its group goes too.
    kill_group(pgid);
    if let Some(p) = pid_file {
        let _ = std::fs::remove_file(p);
    }
    let output = read_log_tail(log);
    let errors = if split { read_log_tail(&err_log) } else { String::new() };
    Ok(Ran { status, output, errors })
}

/// Makes the child `cmd` starts enter a new, empty network namespace (only
/// a loopback interface, down): no network at all. Its spawn fails where
/// the host does not allow that; see [`netns_available`].
pub(crate) fn isolate_network(cmd: &mut Command) -> &mut Command {
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the async-signal-safe unshare system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Whether children can be put in a network namespace of their own here
/// (root, and no seccomp or container policy against it); tried once.
pub(crate) fn netns_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let Some(t) = which("true") else { return false };
        let mut cmd = Command::new(t);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        isolate_network(&mut cmd);
        die_with_parent(&mut cmd).status().is_ok_and(|s| s.success())
    })
}

/// The path of `tool`: from `PATH`, else the sbin and bin folders (a service
/// may run with a short `PATH`).
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// "partition 1 (MBR type Linux)", "logical volume vg0/root", "the whole disk".
pub(crate) fn place_text(v: &Volume) -> String {
    v.place_text()
}

/// A short name for a volume, usable as a folder name: `part1`, `lv-vg0-root`, `disk`.
pub(crate) fn slug(v: &Volume) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect::<String>();
    match &v.place {
        Place::WholeDisk => "disk".into(),
        Place::Partition { number, .. } => format!("part{number}"),
        Place::LogicalVolume { vg, lv } => format!("lv-{}-{}", clean(vg), clean(lv)),
    }
}

/// "ext4 on partition 1 (MBR type Linux)".
pub(crate) fn fs_text(kind: &str, v: &Volume) -> String {
    format!("{kind} on {}", place_text(v))
}

/// The volumes of the disk file.
pub(crate) fn layout(file: &Path) -> Result<Layout, String> {
    let f = File::open(file).map_err(|e| format!("cannot open the disk {}: {e}", file.display()))?;
    list_volumes(&f).map_err(|e| format!("cannot read the disk's partition table: {e}"))
}

/// Filesystems the Linux kernel mounts for a check.
pub(crate) fn mountable(kind: FsKind) -> bool {
    matches!(kind, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs | FsKind::Vfat)
}

/// Most symlinks followed while resolving one path (as the kernel's 40).
const SYMLINK_HOPS_MAX: usize = 40;

/// Resolves `path` (absolute or relative: both from the image's `/`) inside
/// the mounted image at `root` as if `root` were `/`: an absolute symlink in
/// the image points into the image, `..` stops at its root, so the result
/// never leaves `root`. Returns the host path of what it names (no symlink
/// in it), `Ok(None)` when it does not exist, or why it cannot be resolved.
pub(crate) fn resolve_in(root: &Path, path: &str) -> Result<Option<PathBuf>, String> {
    let mut todo: Vec<String> = path.split('/').rev().filter(|c| !c.is_empty()).map(str::to_string).collect();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here: PathBuf = done.iter().fold(root.to_path_buf(), |p, d| p.join(d)).join(&c);
        let meta = match std::fs::symlink_metadata(&here) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => return Err(format!("cannot look at {}: {e}", here.display())),
        };
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > SYMLINK_HOPS_MAX {
                return Err(format!("too many symbolic links resolving {path} in the image"));
            }
            let target = std::fs::read_link(&here).map_err(|e| format!("cannot read the link {}: {e}", here.display()))?;
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                done.clear();
            }
            todo.extend(target.split('/').rev().filter(|c| !c.is_empty()).map(str::to_string));
        } else {
            if !todo.is_empty() && !meta.is_dir() {
                return Ok(None);
            }
            done.push(c);
        }
    }
    Ok(Some(done.iter().fold(root.to_path_buf(), |p, d| p.join(d))))
}

/// `path` without `.`, `..` (not above `/`) or repeated slashes, absolute.
pub(crate) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or("_")),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether `rel` (from the image's `/`) exists in the image at `root`,
/// without following a symlink at its last component.
fn lexists_in(root: &Path, rel: &str) -> bool {
    let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    matches!(resolve_in(root, parent), Ok(Some(dir)) if std::fs::symlink_metadata(dir.join(name)).is_ok())
}

/// Reads a regular file of the image (symlinks resolved inside it), at most `max` bytes.
pub(crate) fn read_in(root: &Path, rel: &str, max: u64) -> Option<String> {
    let path = resolve_in(root, rel).ok()??;
    let f = File::open(&path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Whether the image at `root` looks like a Linux root: `/etc/fstab` and an init.
fn looks_like_root(root: &Path) -> bool {
    matches!(resolve_in(root, "etc/fstab"), Ok(Some(p)) if p.is_file()) && ["sbin/init", "usr/sbin/init", "lib/systemd/systemd", "usr/lib/systemd/systemd"].iter().any(|p| lexists_in(root, p))
}

/// Names the source server may have used for its disk: fstab entries naming
/// devices are matched against each.
const SOURCE_DISK_NAMES: [&str; 6] = ["/dev/sda", "/dev/vda", "/dev/xvda", "/dev/hda", "/dev/nvme0n1", "/dev/sdb"];

/// Filesystem types of fstab entries that are not volumes of a disk.
const VIRTUAL_FS: [&str; 14] = ["tmpfs", "proc", "sysfs", "devpts", "devtmpfs", "cgroup", "cgroup2", "nfs", "nfs4", "cifs", "smbfs", "fuse", "none", "bind"];

/// One filesystem of a [`MountTree`].
pub(crate) struct TreeMount {
    /// Where it is mounted (a host path under `work`).
    pub point: PathBuf,
    /// Its mount point on the source server, when known from its fstab.
    pub source_point: Option<String>,
    /// What it is: "ext4 on partition 1 (MBR type Linux)".
    pub what: String,
}

/// The filesystems of a disk mounted under `work/root`: a Linux root there
/// and the others at their fstab mount points, or (no root found) each at
/// `work/root/<slug>`; filesystems the root's fstab does not place go to
/// `work/more/<slug>`. Unmounted, deepest first, and detached on drop.
pub(crate) struct MountTree {
    /// `work/root`.
    pub root: PathBuf,
    /// Whether a Linux root filesystem is mounted at `root`.
    pub has_root_fs: bool,
    /// The filesystems, in mount order.
    pub mounts: Vec<TreeMount>,
    /// What was not mounted, and why; for the check's output.
    pub notes: Vec<String>,
    guards: Vec<Mounted>,
    loops: Vec<Looped>,
}

impl Drop for MountTree {
    fn drop(&mut self) {
        while let Some(m) = self.guards.pop() {
            drop(m);
        }
        self.loops.clear();
    }
}

impl MountTree {
    /// Lines describing the mounts and notes, for the check's output.
    pub fn describe(&self, read_only: bool) -> String {
        let mode = if read_only { "read-only" } else { "writable (overlay)" };
        let mut s = String::new();
        for m in &self.mounts {
            let at = m.point.strip_prefix(&self.root).map(|p| format!("/{}", p.display())).unwrap_or_else(|_| m.point.display().to_string());
            let source = m.source_point.as_deref().map(|p| format!(" (source mount point {p})")).unwrap_or_default();
            s.push_str(&format!("mounted {mode}: {} at {at}{source}\n", m.what));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}

/// An fstab entry: device spec, mount point, type.
fn fstab_entries(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        // fstab escapes spaces in paths as \040.
        let unescape = |s: &str| s.replace("\\040", " ").replace("\\011", "\t");
        out.push((unescape(f[0]), unescape(f[1]), f[2].to_string()));
    }
    out
}

/// Mounts every filesystem of `disk` as a [`MountTree`] under `work/root`,
/// read-only (no journal replay) or `writable` (on the overlay).
pub(crate) fn mount_tree(disk: &Disk, writable: bool, deadline: Instant) -> Result<MountTree, String> {
    let layout = layout(disk.file)?;
    let root = disk.work.join("root");
    let mut tree = MountTree { root: root.clone(), has_root_fs: false, mounts: Vec::new(), notes: Vec::new(), guards: Vec::new(), loops: Vec::new() };
    // Attach every mountable filesystem and find the root among them.
    let mut attached: Vec<(usize, &Volume, FsKind)> = Vec::new();
    for v in &layout.volumes {
        let Some(fs) = &v.filesystem else { continue };
        if !mountable(fs.kind) {
            continue;
        }
        if Instant::now() >= deadline {
            return Err("time limit reached while attaching the disk's filesystems".into());
        }
        match attach(disk.file, v.start_bytes, v.size_bytes) {
            Ok(l) => {
                tree.loops.push(l);
                attached.push((tree.loops.len() - 1, v, fs.kind));
            }
            Err(e) => tree.notes.push(format!("cannot attach {}: {}", fs_text(fs.kind.name(), v), chain(&e))),
        }
    }
    if attached.is_empty() {
        let what: Vec<String> = layout.volumes.iter().map(Volume::describe).collect();
        return Err(format!("no mountable filesystem on the recovery point; volumes: {}", if what.is_empty() { "none".into() } else { what.join("; ") }));
    }
    let probe = disk.work.join("probe");
    let mut root_at = None;
    let mut fstab = String::new();
    for (i, (loop_index, _, kind)) in attached.iter().enumerate() {
        if Instant::now() >= deadline {
            return Err("time limit reached while looking for the root filesystem".into());
        }
        let dev = &tree.loops[*loop_index].0;
        // Probed read-only: a filesystem that does not mount here is mounted
        // (and its failure noted) below.
        let Ok(probed) = mount(dev, &probe, *kind, true) else { continue };
        let is_root = looks_like_root(&probe);
        if is_root {
            fstab = read_in(&probe, "etc/fstab", 1 << 20).unwrap_or_default();
        }
        drop(probed);
        if is_root {
            root_at = Some(i);
            break;
        }
    }
    let _ = std::fs::remove_dir(&probe);
    let mut placed = vec![false; attached.len()];
    let mount_one = |tree: &mut MountTree, i: usize, point: &Path, source_point: Option<String>| -> bool {
        let (loop_index, v, kind) = attached[i];
        let what = fs_text(kind.name(), v);
        match mount(&tree.loops[loop_index].0.clone(), point, kind, !writable) {
            Ok(m) => {
                tree.guards.push(m);
                tree.mounts.push(TreeMount { point: point.to_path_buf(), source_point, what });
                true
            }
            Err(e) => {
                tree.notes.push(format!("cannot mount {what}: {}", chain(&e)));
                false
            }
        }
    };
    if let Some(r) = root_at {
        if !mount_one(&mut tree, r, &root, Some("/".into())) {
            return Err(tree.notes.last().cloned().unwrap_or_else(|| "cannot mount the root filesystem".into()));
        }
        tree.has_root_fs = true;
        placed[r] = true;
        let named: Vec<NamedVolume> = SOURCE_DISK_NAMES.iter().flat_map(|d| name_volumes(d, &layout)).collect();
        let mut entries = fstab_entries(&fstab);
        entries.sort_by_key(|(_, mp, _)| Path::new(mp).components().count());
        for (spec, mp, fstype) in entries {
            if !mp.starts_with('/') || normalize(&mp) == "/" || fstype == "swap" {
                continue;
            }
            let Some(n) = find_volume(&spec, &named) else {
                if !VIRTUAL_FS.contains(&fstype.as_str()) && !spec.starts_with("//") && !spec.contains(":/") {
                    tree.notes.push(format!("fstab mounts {spec} on {mp}, which is not a volume of this disk"));
                }
                continue;
            };
            let Some(i) = attached.iter().position(|(_, v, _)| v.start_bytes == n.volume.start_bytes && v.size_bytes == n.volume.size_bytes) else { continue };
            if placed[i] {
                continue;
            }
            if Instant::now() >= deadline {
                return Err("time limit reached while mounting the disk's filesystems".into());
            }
            match resolve_in(&root, &mp) {
                Ok(Some(point)) if point.is_dir() => {
                    placed[i] = mount_one(&mut tree, i, &point, Some(normalize(&mp)));
                }
                _ => tree.notes.push(format!("the mount point {mp} of {} is not a folder on the root filesystem", fs_text(attached[i].2.name(), attached[i].1))),
            }
        }
    }
    let others = if tree.has_root_fs { disk.work.join("more") } else { root.clone() };
    for i in 0..attached.len() {
        if placed[i] {
            continue;
        }
        if Instant::now() >= deadline {
            return Err("time limit reached while mounting the disk's filesystems".into());
        }
        let point = others.join(slug(attached[i].1));
        if tree.has_root_fs {
            tree.notes.push(format!("{} is not in the root's fstab; mounted at {}", fs_text(attached[i].2.name(), attached[i].1), point.display()));
        }
        mount_one(&mut tree, i, &point, None);
    }
    if tree.mounts.is_empty() {
        return Err(format!("none of the disk's filesystems could be mounted: {}", tree.notes.join("; ")));
    }
    Ok(tree)
}
