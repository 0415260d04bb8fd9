//! Where a restore writes: a new image file, a replaced one (`--force`), or a
//! block device written in place; and every check that comes before the first
//! byte is written (promise 8: recovery writes only where it was told).
//!
//! - **Image files** are written to an unnamed temporary file (`O_TMPFILE`) in
//!   the destination's folder, mode 0600, and linked to their name only when
//!   every block and the Merkle root have been verified and the data is
//!   durable. The link never replaces anything: a file that appeared at the name
//!   meanwhile (a planted symlink included) makes the restore fail. With
//!   `--force` an existing file is replaced by one atomic rename. A killed
//!   restore leaves nothing behind: the kernel frees an unnamed file. Where the
//!   filesystem has no `O_TMPFILE`, the temporary file gets a name of its own
//!   (`.NAME.drmesh-restore-RANDOM`, created with `O_EXCL`, which never follows
//!   a symlink), recorded in the state dir's journal first so that the next
//!   restore or node start removes it if this one is killed.
//! - **Block devices** are opened `O_EXCL` (the kernel refuses while the
//!   device or one of its partitions is mounted or held by device-mapper, md or
//!   another program) and written in place with `O_DIRECT`; zero blocks are
//!   discarded where the device guarantees to read them back as zeros, else
//!   written as zeros. Never renamed, never replaced.
//! - **Refused**, with nothing written: a directory, a symlink to anything but
//!   a block device, other special files, a missing folder; an existing file or
//!   a device that holds a partition table or filesystem unless `--force`; a
//!   mounted or otherwise held device, a device smaller than the volume, and
//!   the source (file, device, a partition or whole disk of it, or a loop
//!   device backed by it) of any volume this node protects, even with `--force`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::fcntl::{fallocate, FallocateFlags};

use super::journal::{Journal, JournalEntry, TEMP_MARK};
use super::probe::{probe, PROBE_BYTES};
use super::RestoreError;
use crate::store::VolumeName;

/// Alignment of buffers, offsets and lengths for `O_DIRECT`: a multiple of every
/// logical block size in use (512 and 4096).
pub const DIRECT_ALIGN: usize = 4096;

/// A volume this node protects: its source may never be a restore's destination.
#[derive(Debug, Clone)]
pub struct Protected {
    /// The volume's name (for the message).
    pub volume: VolumeName,
    /// Its source path: an image file or a block device.
    pub path: PathBuf,
}

/// What a restore may overwrite.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Replace an existing file, or overwrite a device that holds a filesystem or
    /// partition table.
    pub force: bool,
    /// Sources of the volumes this node protects; never written, even with `force`.
    pub protected: Vec<Protected>,
}

impl Rules {
    /// The rules on node `node` of `topology`: the sources of every volume it
    /// protects (image files and devices, and a `kmod` volume's COW and state
    /// stores) are never written.
    pub fn for_node(topology: &drmesh_topology::Topology, node: &str, force: bool) -> Rules {
        use drmesh_topology::SourceKind;
        let mut protected = Vec::new();
        for v in topology.volumes.iter().filter(|v| v.source == node) {
            let paths: Vec<&PathBuf> = match &v.kind {
                SourceKind::File { path } => vec![path],
                SourceKind::Kmod { device, cow_store, state_store } => [Some(device), Some(cow_store), state_store.as_ref()].into_iter().flatten().collect(),
                _ => vec![],
            };
            protected.extend(paths.into_iter().map(|p| Protected { volume: v.name.clone(), path: p.clone() }));
        }
        Rules { force, protected }
    }
}

/// Where temporary files live while being written.
enum Temp {
    /// An `O_TMPFILE`: nameless until linked.
    Unnamed,
    /// A named temporary file, removed on drop unless linked; its journal entry
    /// lets the next start remove it after a kill.
    Named { path: PathBuf, _entry: Option<JournalEntry> },
}

enum Target {
    /// An image file written beside `path` and linked (or renamed, `replace`) there.
    File { path: PathBuf, replace: bool, temp: Temp },
    /// A block device written in place.
    Device { logical_block: u64, zeroing: AtomicU8 },
}

/// How zero blocks are written to a device; found by trying, remembered.
const ZERO_UNKNOWN: u8 = 0;
const ZERO_DISCARD: u8 = 1;
const ZERO_RANGE: u8 = 2;
const ZERO_WRITE: u8 = 3;

/// An opened, checked destination. Dropping it without [`Destination::finish`]
/// leaves no file behind (a device keeps what was written).
pub struct Destination {
    shown: PathBuf,
    /// The main descriptor, buffered: the file that gets linked, or the device held `O_EXCL`.
    file: File,
    /// An `O_DIRECT` descriptor of the same file or device, where the filesystem
    /// takes it; aligned blocks go through it, bypassing the page cache.
    direct: Option<File>,
    direct_ok: std::sync::atomic::AtomicBool,
    target: Target,
    volume_bytes: u64,
    journal: Option<Journal>,
    finished: bool,
}

fn refused(path: &Path, reason: impl Into<String>) -> RestoreError {
    RestoreError::Refused { path: path.to_path_buf(), reason: reason.into() }
}

fn write_error(path: &Path, source: io::Error) -> RestoreError {
    RestoreError::Write { path: path.to_path_buf(), source }
}

/// `path` made absolute and free of `.` and `..` without touching the filesystem.
fn lexical(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Splits a dev_t into "MAJOR:MINOR" as sysfs and mountinfo write it.
fn dev_name(rdev: u64) -> String {
    format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// The sysfs folder of a block device (`/sys/dev/block/M:m` resolved), if any.
fn sysfs_dir(rdev: u64) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{}", dev_name(rdev))).ok()
}

/// A block device and the dev_t of each of its partitions.
fn with_partitions(rdev: u64) -> Vec<u64> {
    let mut out = vec![rdev];
    let Some(dir) = sysfs_dir(rdev) else { return out };
    let Ok(entries) = fs::read_dir(&dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.join("partition").exists() {
            if let Some(dev) = fs::read_to_string(p.join("dev")).ok().and_then(|t| crate::mounts::parse_dev(t.trim())) {
                out.push(dev);
            }
        }
    }
    out
}

/// Why the device (or a partition of it) is in use, if it is: mounted, swap,
/// or held by another block device (device-mapper, md, ...).
fn device_in_use(rdev: u64) -> Option<String> {
    let devs = with_partitions(rdev);
    let same = |path: &str| fs::metadata(path).map(|m| m.file_type().is_block_device() && devs.contains(&m.rdev())).unwrap_or(false);
    if let Some(m) = crate::mounts::mounted(&devs) {
        return Some(format!("it is mounted at {} (unmount it first)", m.point.display()));
    }
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            if let Some(path) = line.split_whitespace().next() {
                if same(path) {
                    return Some("it is in use as swap (swapoff it first)".into());
                }
            }
        }
    }
    for dev in devs {
        let Some(dir) = sysfs_dir(dev) else { continue };
        let holders: Vec<String> = fs::read_dir(dir.join("holders"))
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if !holders.is_empty() {
            return Some(format!("it is held by {} (device-mapper, md or another block device sits on it)", holders.join(", ")));
        }
    }
    None
}

/// Whether two block devices overlap: the same, or one a partition of the other.
fn devices_overlap(a: u64, b: u64) -> bool {
    if a == b {
        return true;
    }
    match (sysfs_dir(a), sysfs_dir(b)) {
        (Some(da), Some(db)) => da.starts_with(&db) || db.starts_with(&da),
        _ => false,
    }
}

/// The file a loop device reads, if `rdev` is a loop device (or a partition of one).
fn loop_backing_file(rdev: u64) -> Option<PathBuf> {
    let dir = sysfs_dir(rdev)?;
    for d in [dir.clone(), dir.parent()?.to_path_buf()] {
        if let Ok(text) = fs::read_to_string(d.join("loop").join("backing_file")) {
            return Some(PathBuf::from(text.trim_end_matches('\n')));
        }
    }
    None
}

/// The volume whose source `dest` (with metadata `meta` when it exists) is or overlaps.
fn protected_volume<'a>(dest: &Path, meta: Option<&fs::Metadata>, rules: &'a Rules) -> Option<&'a Protected> {
    let dest_lexical = lexical(dest);
    rules.protected.iter().find(|p| {
        if lexical(&p.path) == dest_lexical || fs::canonicalize(&p.path).ok().is_some_and(|c| Some(c) == fs::canonicalize(dest).ok()) {
            return true;
        }
        let (Some(dm), Ok(pm)) = (meta, fs::metadata(&p.path)) else { return false };
        let dest_block = dm.file_type().is_block_device();
        if pm.file_type().is_block_device() {
            dest_block && devices_overlap(dm.rdev(), pm.rdev())
        } else if dest_block {
            loop_backing_file(dm.rdev()).and_then(|f| fs::metadata(f).ok()).is_some_and(|bm| bm.dev() == pm.dev() && bm.ino() == pm.ino())
        } else {
            dm.dev() == pm.dev() && dm.ino() == pm.ino()
        }
    })
}

/// Logical block size of a block device (sysfs; 512 when unknown).
fn logical_block_bytes(rdev: u64) -> u64 {
    let Some(dir) = sysfs_dir(rdev) else { return 512 };
    [dir.join("queue/logical_block_size"), dir.join("../queue/logical_block_size")]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok()?.trim().parse().ok())
        .unwrap_or(512)
}

/// Whether two descriptors are the same file or the same block device.
fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) if x.file_type().is_block_device() => y.file_type().is_block_device() && x.rdev() == y.rdev(),
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn random_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // A failing system RNG only makes a name collision (EEXIST, retried) likelier.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether an `O_TMPFILE` open failed because the filesystem (or kernel) lacks it.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL))
}

/// What a destination path is, once every refusal that does not depend on the
/// volume was checked.
enum Kind {
    /// Nothing there: a new image file.
    NewFile,
    /// A regular file, to be replaced (only with `--force`).
    ExistingFile,
    /// A block device (a symlink to one was followed).
    Device(fs::Metadata),
}

fn classify(path: &Path, rules: &Rules) -> Result<Kind, RestoreError> {
    let lmeta = match fs::symlink_metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(refused(path, format!("cannot look at it: {e}"))),
    };
    // A symlink is followed only to a block device (/dev/disk/by-id/... names).
    let meta = match &lmeta {
        Some(m) if m.file_type().is_symlink() => match fs::metadata(path) {
            Ok(t) if t.file_type().is_block_device() => Some(t),
            Ok(_) => {
                let to = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
                return Err(refused(path, format!("it is a symbolic link (to {to}); give the file's own path")));
            }
            Err(_) => return Err(refused(path, "it is a symbolic link that points nowhere")),
        },
        other => other.clone(),
    };
    if let Some(p) = protected_volume(path, meta.as_ref(), rules) {
        return Err(refused(
            path,
            format!(
                "it is (or overlaps) {}, the source of volume {} on this node; drmesh never writes a protected volume's source, not even with --force",
                p.path.display(),
                p.volume
            ),
        ));
    }
    match meta {
        None => Ok(Kind::NewFile),
        Some(m) if m.is_dir() => Err(refused(path, "it is a directory; give the path of the image file to write, e.g. DIR/volume.img")),
        Some(m) if m.is_file() => {
            if rules.force {
                Ok(Kind::ExistingFile)
            } else {
                Err(refused(path, "the file exists; give --force to replace it"))
            }
        }
        Some(m) if m.file_type().is_block_device() => Ok(Kind::Device(m)),
        Some(m) => {
            let kind = if m.file_type().is_char_device() {
                "a character device"
            } else if m.file_type().is_fifo() {
                "a named pipe"
            } else if m.file_type().is_socket() {
                "a socket"
            } else {
                "a special file"
            };
            Err(refused(path, format!("it is {kind}; restore writes image files and block devices")))
        }
    }
}

/// A private folder beside an image file's destination, for a tool that writes
/// the file itself (qemu-img for qcow2): made exclusively with mode 0700 and
/// journaled, so nobody can plant anything in it and a kill leaves nothing for
/// good. [`StagedFile::finish`] gives the file mode 0600 and its name (never
/// replacing anything without `--force`); dropping it removes the folder.
pub struct StagedFile {
    path: PathBuf,
    replace: bool,
    dir: PathBuf,
    _entry: Option<JournalEntry>,
}

impl StagedFile {
    /// Checks `path` as an image file destination under `rules` (a block device
    /// is refused: this is for file formats) and makes the private folder.
    pub fn new(path: &Path, rules: &Rules, journal: Option<&Journal>) -> Result<StagedFile, RestoreError> {
        let replace = match classify(path, rules)? {
            Kind::NewFile => false,
            Kind::ExistingFile => true,
            Kind::Device(_) => return Err(refused(path, "it is a block device; this format is written to files (restore raw to a device)")),
        };
        let name = path.file_name().ok_or_else(|| refused(path, "it names no file"))?.to_string_lossy().into_owned();
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        for _ in 0..8 {
            let dir = parent.join(format!(".{name}{TEMP_MARK}{}", random_suffix()));
            let entry = match journal {
                Some(j) => Some(j.record(&dir).map_err(|e| write_error(&dir, e))?),
                None => None,
            };
            use std::os::unix::fs::DirBuilderExt;
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(StagedFile { path: path.to_path_buf(), replace, dir, _entry: entry }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(write_error(&parent, e)),
            }
        }
        Err(write_error(&parent, io::Error::other("no free temporary name after 8 tries")))
    }

    /// Where the tool writes the file.
    pub fn inner_path(&self) -> PathBuf {
        self.dir.join("image")
    }

    /// Makes the written file durable, mode 0600, and gives it its name.
    pub fn finish(self) -> Result<PathBuf, RestoreError> {
        let inner = self.inner_path();
        let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&inner).map_err(|e| write_error(&inner, e))?;
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| write_error(&inner, e))?;
        f.sync_all().map_err(|e| write_error(&inner, e))?;
        if self.replace {
            fs::rename(&inner, &self.path).map_err(|e| write_error(&self.path, e))?;
        } else {
            use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
            match renameat2(AT_FDCWD, inner.as_path(), AT_FDCWD, self.path.as_path(), RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS | nix::errno::Errno::EOPNOTSUPP) => {
                    fs::hard_link(&inner, &self.path).map_err(|e| write_error(&self.path, e))?;
                    fs::remove_file(&inner).map_err(|e| write_error(&inner, e))?;
                }
                Err(nix::errno::Errno::EEXIST) => {
                    return Err(refused(&self.path, "something was created at this name while the restore ran; it was left as it is and the restored image discarded"))
                }
                Err(e) => return Err(write_error(&self.path, io::Error::from(e))),
            }
        }
        let parent = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent).and_then(|d| d.sync_all()).map_err(|e| write_error(parent, e))?;
        Ok(self.path.clone())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // Only this restore's own folder (made exclusively; empty once finished).
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Destination {
    /// Checks `path` as the destination of a `volume_bytes` image and opens what
    /// will be written, writing nothing: see the module doc for the rules.
    /// `journal` records named temporary files (when the filesystem has no
    /// `O_TMPFILE`) so that a later start can remove them after a kill.
    pub fn prepare(path: &Path, volume_bytes: u64, rules: &Rules, journal: Option<&Journal>) -> Result<Destination, RestoreError> {
        let shown = path.to_path_buf();
        match classify(path, rules)? {
            Kind::NewFile => Self::new_file(shown, path, volume_bytes, false, journal),
            Kind::ExistingFile => Self::new_file(shown, path, volume_bytes, true, journal),
            Kind::Device(m) => Self::device(shown, path, &m, volume_bytes, rules),
        }
    }

    fn new_file(shown: PathBuf, path: &Path, volume_bytes: u64, replace: bool, journal: Option<&Journal>) -> Result<Destination, RestoreError> {
        let name = path.file_name().ok_or_else(|| refused(path, "it names no file"))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match fs::metadata(&parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused(path, format!("{} is not a folder", parent.display()))),
            Err(e) => return Err(refused(path, format!("its folder {} cannot be used: {e}", parent.display()))),
        }
        let unnamed = OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC).open(&parent);
        let (file, temp) = match unnamed {
            Ok(f) => (f, Temp::Unnamed),
            Err(e) if tmpfile_unsupported(&e) => {
                let temp_path = parent.join(format!(".{}{TEMP_MARK}{}", name.to_string_lossy(), random_suffix()));
                // Recorded before it exists, so a kill right after creating it is covered.
                let entry = match journal {
                    Some(j) => Some(j.record(&temp_path).map_err(|e| write_error(&temp_path, e))?),
                    None => None,
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&temp_path)
                    .map_err(|e| write_error(&temp_path, e))?;
                (f, Temp::Named { path: temp_path, _entry: entry })
            }
            Err(e) => return Err(write_error(&parent, e)),
        };
        // A second descriptor of the same inode with O_DIRECT (a reopen through
        // /proc for the unnamed file); filesystems without O_DIRECT (tmpfs) have none.
        let reopen = match &temp {
            Temp::Unnamed => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            Temp::Named { path, .. } => path.clone(),
        };
        let nofollow = if matches!(temp, Temp::Named { .. }) { libc::O_NOFOLLOW } else { 0 };
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | nofollow)
            .open(&reopen)
            .ok()
            .filter(|d| same_file(d, &file));
        let dest = Destination {
            shown,
            file,
            direct_ok: std::sync::atomic::AtomicBool::new(direct.is_some()),
            direct,
            target: Target::File { path: path.to_path_buf(), replace, temp },
            volume_bytes,
            journal: journal.cloned(),
            finished: false,
        };
        // Explicit, whatever the umask: restored images hold whole disks.
        dest.file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| write_error(path, e))?;
        dest.file.set_len(volume_bytes).map_err(|e| write_error(path, e))?;
        Ok(dest)
    }

    fn device(shown: PathBuf, path: &Path, meta: &fs::Metadata, volume_bytes: u64, rules: &Rules) -> Result<Destination, RestoreError> {
        if let Some(why) = device_in_use(meta.rdev()) {
            return Err(refused(path, why));
        }
        let file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(refused(path, "the kernel says it is busy: mounted, or held by device-mapper, md, a loop device or another program"))
            }
            Err(e) => return Err(write_error(path, e)),
        };
        // What was opened must be the device that was checked: a name swapped for
        // something else meanwhile (a symlink to a file, say) is refused.
        let opened = file.metadata().map_err(|e| write_error(path, e))?;
        if !opened.file_type().is_block_device() || opened.rdev() != meta.rdev() {
            return Err(refused(path, "it changed while it was being checked (it no longer names the same block device)"));
        }
        // Exclusively ours from here (O_EXCL); a second descriptor writes with O_DIRECT.
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path).ok().filter(|d| same_file(d, &file));
        let mut buffered = &file;
        let size = buffered.seek(SeekFrom::End(0)).map_err(|e| write_error(path, e))?;
        if size < volume_bytes {
            return Err(refused(path, format!("the device holds {size} bytes but the recovery point needs {volume_bytes}")));
        }
        if !rules.force {
            let mut head = vec![0u8; PROBE_BYTES.min(size as usize)];
            buffered.seek(SeekFrom::Start(0)).map_err(|e| write_error(path, e))?;
            buffered.read_exact(&mut head).map_err(|e| write_error(path, e))?;
            if let Some(sig) = probe(&head) {
                return Err(refused(path, format!("it holds {}; give --force to overwrite it", sig.describe())));
            }
        }
        let logical_block = logical_block_bytes(meta.rdev());
        Ok(Destination {
            shown,
            file,
            direct_ok: std::sync::atomic::AtomicBool::new(direct.is_some()),
            direct,
            target: Target::Device { logical_block, zeroing: AtomicU8::new(ZERO_UNKNOWN) },
            volume_bytes,
            journal: None,
            finished: false,
        })
    }

    /// The destination as the user named it.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Whether this is a block device written in place (a failure leaves it partly written).
    pub fn is_device(&self) -> bool {
        matches!(self.target, Target::Device { .. })
    }

    /// Writes `data` at `offset`: with `O_DIRECT` when `data` starts at a
    /// [`DIRECT_ALIGN`]-aligned address and offset and length are aligned (and the
    /// filesystem or device takes it), through the page cache otherwise.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), RestoreError> {
        let end = offset + data.len() as u64;
        if end > self.volume_bytes {
            return Err(write_error(&self.shown, io::Error::other(format!("write of {}..{end} beyond the volume's {} bytes", offset, self.volume_bytes))));
        }
        let align = match &self.target {
            Target::Device { logical_block, .. } => (*logical_block).max(DIRECT_ALIGN as u64),
            Target::File { .. } => DIRECT_ALIGN as u64,
        };
        let aligned = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) && offset.is_multiple_of(align) && (data.len() as u64).is_multiple_of(align);
        if let (Some(direct), true) = (&self.direct, aligned && self.direct_ok.load(Ordering::Relaxed)) {
            match direct.write_all_at(data, offset) {
                // Not for this filesystem after all: the page cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct_ok.store(false, Ordering::Relaxed),
                other => return other.map_err(|e| write_error(&self.shown, e)),
            }
        }
        self.file.write_all_at(data, offset).map_err(|e| write_error(&self.shown, e))
    }

    /// Writes one decoded block at `offset`. A new image file is sparse: runs of
    /// all-zero 4 KiB pages inside the block are left as holes (as qemu-img
    /// does), so a restored thin disk stays thin; a device gets every byte.
    pub fn write_block(&self, data: &[u8], offset: u64) -> Result<(), RestoreError> {
        if !matches!(self.target, Target::File { .. }) {
            return self.write_at(data, offset);
        }
        const PAGE: usize = 4096;
        let mut at = 0;
        while at < data.len() {
            // Skip a run of zero pages, then write the run of pages up to the next zero page.
            while at < data.len() && crate::content::is_all_zero(&data[at..(at + PAGE).min(data.len())]) {
                at += PAGE;
            }
            let start = at;
            while at < data.len() && !crate::content::is_all_zero(&data[at..(at + PAGE).min(data.len())]) {
                at += PAGE;
            }
            if start < data.len() {
                self.write_at(&data[start..at.min(data.len())], offset + start as u64)?;
            }
        }
        Ok(())
    }

    /// Makes `offset .. offset + len` read as zeros. An image file is new and
    /// sparse, so this writes nothing there; a device gets a discard that
    /// guarantees zeros, a write-zeroes, or written zeros, whichever it supports.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), RestoreError> {
        let Target::Device { zeroing, logical_block } = &self.target else { return Ok(()) };
        let aligned = offset.is_multiple_of(*logical_block) && len.is_multiple_of(*logical_block);
        let mut mode = zeroing.load(Ordering::Relaxed);
        while aligned && mode != ZERO_WRITE {
            let (flags, this) = match mode {
                ZERO_UNKNOWN | ZERO_DISCARD => (FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, ZERO_DISCARD),
                _ => (FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE, ZERO_RANGE),
            };
            match fallocate(&self.file, flags, offset as i64, len as i64) {
                Ok(()) => {
                    zeroing.store(this, Ordering::Relaxed);
                    return Ok(());
                }
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL | nix::errno::Errno::ENODEV) => {
                    mode = this + 1;
                    zeroing.store(mode, Ordering::Relaxed);
                }
                Err(e) => return Err(write_error(&self.shown, io::Error::from(e))),
            }
        }
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at).map_err(|e| write_error(&self.shown, e))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the written data durable and, for an image file, gives it its name.
    /// Returns the path written.
    pub fn finish(mut self) -> Result<PathBuf, RestoreError> {
        let shown = self.shown.clone();
        if let Some(direct) = &self.direct {
            direct.sync_all().map_err(|e| write_error(&shown, e))?;
        }
        self.file.sync_all().map_err(|e| write_error(&shown, e))?;
        match &self.target {
            Target::Device { .. } => {}
            Target::File { path, replace, temp } => {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                match temp {
                    Temp::Unnamed => {
                        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                        let link = |to: &Path| {
                            nix::unistd::linkat(nix::fcntl::AT_FDCWD, proc_path.as_str(), nix::fcntl::AT_FDCWD, to, nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW)
                                .map_err(io::Error::from)
                        };
                        if *replace {
                            let (staged, _entry) = self.link_staged(parent, path, link)?;
                            self.replace_with(&staged, path)?;
                        } else {
                            link(path).map_err(|e| self.link_error(path, e))?;
                        }
                    }
                    Temp::Named { path: temp_path, .. } => {
                        if *replace {
                            self.replace_with(temp_path, path)?;
                        } else {
                            self.rename_no_replace(temp_path, path)?;
                        }
                    }
                }
                File::open(parent).and_then(|d| d.sync_all()).map_err(|e| write_error(parent, e))?;
            }
        }
        self.finished = true;
        Ok(shown)
    }

    /// Links the unnamed file at a fresh hidden name beside `path` (for a replacing
    /// rename), journaled first so that a kill before the rename leaves nothing for good.
    fn link_staged(&self, parent: &Path, path: &Path, link: impl Fn(&Path) -> io::Result<()>) -> Result<(PathBuf, Option<JournalEntry>), RestoreError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for _ in 0..8 {
            let staged = parent.join(format!(".{name}{TEMP_MARK}{}", random_suffix()));
            let entry = match &self.journal {
                Some(j) => Some(j.record(&staged).map_err(|e| write_error(&staged, e))?),
                None => None,
            };
            match link(&staged) {
                Ok(()) => return Ok((staged, entry)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(write_error(&staged, e)),
            }
        }
        Err(write_error(parent, io::Error::other("no free temporary name after 8 tries")))
    }

    /// Gives the named temporary file its final name without ever replacing
    /// anything there: `renameat2(RENAME_NOREPLACE)`, or where the filesystem lacks
    /// it (FUSE, NFS), a hard link (which fails if the name exists) and an unlink.
    fn rename_no_replace(&self, temp: &Path, path: &Path) -> Result<(), RestoreError> {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, temp, AT_FDCWD, path, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS | nix::errno::Errno::EOPNOTSUPP) => {
                fs::hard_link(temp, path).map_err(|e| self.link_error(path, e))?;
                fs::remove_file(temp).map_err(|e| write_error(temp, e))
            }
            Err(e) => Err(self.link_error(path, io::Error::from(e))),
        }
    }

    fn replace_with(&self, temp: &Path, path: &Path) -> Result<(), RestoreError> {
        fs::rename(temp, path).map_err(|e| {
            let _ = fs::remove_file(temp);
            write_error(path, e)
        })
    }

    fn link_error(&self, path: &Path, e: io::Error) -> RestoreError {
        if e.kind() == io::ErrorKind::AlreadyExists {
            refused(path, "something was created at this name while the restore ran; it was left as it is and the restored image discarded")
        } else {
            write_error(path, e)
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let (false, Target::File { temp: Temp::Named { path, .. }, .. }) = (self.finished, &self.target) {
            // Only what this restore created: O_EXCL made it, nobody else could have.
            let _ = fs::remove_file(path);
        }
    }
}
