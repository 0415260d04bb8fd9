//! Reading and writing files of a mounted image root without ever leaving it.
//!
//! Every path is resolved by `openat2(2)` with `RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS` against a descriptor of the root: an absolute
//! symlink in the image (`/etc/fstab -> /etc/shadow`) resolves to the image's
//! own `/etc/shadow`, `..` stops at the image's `/`, and `/proc/self/...`-style
//! magic links are refused, so no path from the image reaches a host file.
//! Files that are edited must be regular files reached without a symlink at the
//! last component; they are replaced by writing a temporary file in the same
//! (root-resolved) folder and renaming it over the old name, so a symlink
//! planted at the name is replaced, never followed.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat2, readlinkat, renameat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};

/// Most entries read from one folder of the image (a hostile image may hold
/// folders of millions of entries; none of the folders we read needs more).
const DIR_ENTRIES_MAX: usize = 100_000;

/// Suffix of the copy of an edited file, beside it.
pub const BACKUP_SUFFIX: &str = ".drmesh-orig";

/// The kind of an entry in a folder of the image (symlinks are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// One entry of a folder of the image.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name (not a path).
    pub name: String,
    /// What it is, without following a symlink.
    pub kind: EntryKind,
}

/// What was found at a path to be edited.
pub enum Editable {
    /// Nothing there.
    Missing,
    /// A symbolic link (its target, as written); left alone.
    Symlink(String),
    /// Not a regular file.
    NotRegular,
    /// Larger than the limit.
    TooLarge(u64),
    /// A regular file: its bytes and its owner and mode.
    File(Vec<u8>, FileStat),
}

/// An open image root.
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The path relative to the root, without leading slashes ("" for the root).
fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Splits "etc/fstab" into ("etc", "fstab"); the name must be a plain component.
fn split(path: &str) -> io::Result<(&str, &str)> {
    let path = relative(path).trim_end_matches('/');
    let (parent, name) = match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("'{path}' does not name a file")));
    }
    Ok((parent, name))
}

impl RootDir {
    /// Opens the root folder `path` (the mounted root filesystem of the image).
    pub fn open(path: &Path) -> io::Result<RootDir> {
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(errno)?;
        Ok(RootDir { fd, path: path.to_path_buf() })
    }

    /// The root's path on the host (for messages and the rebuild sandbox).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `path` (relative to the root, or absolute inside the image),
    /// resolving every symlink inside the root.
    fn open_in_root(&self, path: &str, flags: OFlag) -> io::Result<OwnedFd> {
        let path = match relative(path) {
            "" => ".",
            p => p,
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.fd.as_fd(), path, how).map_err(errno)
    }

    /// Opens a folder for `*at` calls (resolved inside the root).
    fn open_dir(&self, path: &str) -> io::Result<OwnedFd> {
        self.open_in_root(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
    }

    /// Opens a file for reading, following symlinks inside the root. `None`
    /// when it does not exist.
    pub fn open_file(&self, path: &str) -> io::Result<Option<File>> {
        match self.open_in_root(path, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK) {
            Ok(fd) => {
                let file = File::from(fd);
                if !file.metadata()?.is_file() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
                }
                Ok(Some(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a whole file of at most `max_bytes`, following symlinks inside the
    /// root. `None` when it does not exist.
    pub fn read(&self, path: &str, max_bytes: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(file) = self.open_file(path)? else { return Ok(None) };
        let mut data = Vec::new();
        file.take(max_bytes.saturating_add(1)).read_to_end(&mut data)?;
        if data.len() as u64 > max_bytes {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max_bytes} bytes")));
        }
        Ok(Some(data))
    }

    /// Whether something exists at `path` (following symlinks inside the root).
    pub fn exists(&self, path: &str) -> bool {
        self.open_in_root(path, OFlag::O_PATH).is_ok()
    }

    /// Whether `path` is a folder (following symlinks inside the root).
    pub fn is_dir(&self, path: &str) -> bool {
        self.open_in_root(path, OFlag::O_PATH | OFlag::O_DIRECTORY).is_ok()
    }

    /// Reads a file to be edited: only a regular file reached without a
    /// symlink at its last component is returned with its bytes.
    pub fn read_editable(&self, path: &str, max_bytes: u64) -> io::Result<Editable> {
        let (parent, name) = split(path)?;
        let dir = match self.open_in_root(parent, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Editable::Missing),
            Err(e) => return Err(e),
        };
        let stat = match fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            Err(Errno::ENOENT) => return Ok(Editable::Missing),
            Err(e) => return Err(errno(e)),
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            let target = readlinkat(dir.as_fd(), name).map_err(errno)?;
            return Ok(Editable::Symlink(target.to_string_lossy().into_owned()));
        }
        if kind != SFlag::S_IFREG {
            return Ok(Editable::NotRegular);
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let file = File::from(openat2(dir.as_fd(), name, how).map_err(errno)?);
        let stat = nix::sys::stat::fstat(file.as_fd()).map_err(errno)?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Ok(Editable::NotRegular);
        }
        let size = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
        if size > max_bytes {
            return Ok(Editable::TooLarge(size));
        }
        let mut data = Vec::new();
        file.take(max_bytes.saturating_add(1)).read_to_end(&mut data)?;
        if data.len() as u64 > max_bytes {
            return Ok(Editable::TooLarge(data.len() as u64));
        }
        Ok(Editable::File(data, stat))
    }

    /// The entries of a folder, sorted by name; `None` when it does not exist.
    /// Names that are not UTF-8 are skipped.
    pub fn list(&self, path: &str) -> io::Result<Option<Vec<Entry>>> {
        let fd = match self.open_dir(path) {
            Ok(fd) => fd,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Ok(None),
            Err(e) => return Err(e),
        };
        let lookup = fd.try_clone()?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(errno)?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(errno)?;
            let Ok(name) = entry.file_name().to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            if entries.len() >= DIR_ENTRIES_MAX {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {DIR_ENTRIES_MAX} entries")));
            }
            use nix::dir::Type;
            let kind = match entry.file_type() {
                Some(Type::File) => EntryKind::File,
                Some(Type::Directory) => EntryKind::Dir,
                Some(Type::Symlink) => EntryKind::Symlink,
                Some(_) => EntryKind::Other,
                None => match fstatat(lookup.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                        SFlag::S_IFREG => EntryKind::File,
                        SFlag::S_IFDIR => EntryKind::Dir,
                        SFlag::S_IFLNK => EntryKind::Symlink,
                        _ => EntryKind::Other,
                    },
                    Err(_) => continue,
                },
            };
            entries.push(Entry { name: name.to_string(), kind });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(entries))
    }

    /// The target of the symlink at `path` (its folder resolved inside the root).
    pub fn read_link(&self, path: &str) -> io::Result<String> {
        let (parent, name) = split(path)?;
        let dir = self.open_in_root(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok(readlinkat(dir.as_fd(), name).map_err(errno)?.to_string_lossy().into_owned())
    }

    /// Removes the entry (file or symlink, never followed) at `path`.
    pub fn unlink(&self, path: &str) -> io::Result<()> {
        let (parent, name) = split(path)?;
        let dir = self.open_dir(parent)?;
        unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(errno)?;
        fsync(dir.as_fd()).map_err(errno)
    }

    /// Creates the folder `path` (one level; its parent must exist) unless it
    /// exists.
    pub fn create_dir(&self, path: &str, mode: u32) -> io::Result<()> {
        let (parent, name) = split(path)?;
        let dir = self.open_dir(parent)?;
        match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    /// Writes a new file with `data` in the folder of `path` under a temporary
    /// name and renames it to `path` (replacing whatever entry is there, a
    /// symlink included, without following it). Owner and mode come from
    /// `like`, else root and `mode`.
    pub fn replace(&self, path: &str, data: &[u8], like: Option<&FileStat>, mode: u32) -> io::Result<()> {
        let (parent, name) = split(path)?;
        let dir = self.open_dir(parent)?;
        let temp = format!(".{name}.drmesh-tmp-{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
        let written = (|| {
            let mut file = self.create_in(&dir, &temp, like, mode)?;
            file.write_all(data)?;
            file.sync_all()?;
            renameat(dir.as_fd(), temp.as_str(), dir.as_fd(), name).map_err(errno)?;
            fsync(dir.as_fd()).map_err(errno)
        })();
        if written.is_err() {
            let _ = unlinkat(dir.as_fd(), temp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Saves `data` beside `path` as `NAME.drmesh-orig`, or `.NAME.drmesh-orig`
    /// when `hidden` (in folders whose every file is read as configuration,
    /// such as interfaces.d/, where a backup must not count), unless that
    /// exists: a backup from an earlier run is the true original and is kept.
    /// Returns the backup's path and whether it was written now.
    pub fn backup(&self, path: &str, data: &[u8], like: &FileStat, hidden: bool) -> io::Result<(String, bool)> {
        let (parent, name) = split(path)?;
        let dir = self.open_dir(parent)?;
        let backup = if hidden { format!(".{name}{BACKUP_SUFFIX}") } else { format!("{name}{BACKUP_SUFFIX}") };
        let shown = if parent.is_empty() { format!("/{backup}") } else { format!("/{parent}/{backup}") };
        let mut file = match self.create_in(&dir, &backup, Some(like), 0o600) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok((shown, false)),
            Err(e) => return Err(e),
        };
        let written = file.write_all(data).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = unlinkat(dir.as_fd(), backup.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        fsync(dir.as_fd()).map_err(errno)?;
        Ok((shown, true))
    }

    /// Creates a new file `name` in `dir` (`O_EXCL`: never an existing entry,
    /// never through a symlink) with the owner and mode of `like`.
    fn create_in(&self, dir: &OwnedFd, name: &str, like: Option<&FileStat>, mode: u32) -> io::Result<File> {
        let how = OpenHow::new()
            .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(0o600))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let file = File::from(openat2(dir.as_fd(), OsStr::from_bytes(name.as_bytes()), how).map_err(errno)?);
        let (uid, gid, mode) = match like {
            Some(st) => (st.st_uid, st.st_gid, st.st_mode & 0o7777),
            None => (0, 0, mode),
        };
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        fchmod(file.as_fd(), Mode::from_bits_truncate(mode)).map_err(errno)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_never_leave_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        symlink(&secret, root.path().join("etc/abs")).unwrap();
        symlink("../../../../../../..".to_string() + secret.to_str().unwrap(), root.path().join("etc/rel")).unwrap();
        std::fs::write(root.path().join("etc/plain"), "image").unwrap();
        let r = RootDir::open(root.path()).unwrap();
        for link in ["etc/abs", "etc/rel"] {
            assert!(r.read(link, 1000).unwrap().is_none(), "{link} must resolve inside the root, where nothing is");
            assert!(matches!(r.read_editable(link, 1000).unwrap(), Editable::Symlink(_)));
        }
        assert_eq!(r.read("/etc/plain", 1000).unwrap().unwrap(), b"image");
        r.replace("etc/abs", b"new", None, 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");
        assert_eq!(std::fs::read_to_string(root.path().join("etc/abs")).unwrap(), "new");
        assert!(!root.path().join("etc/abs").is_symlink());
    }

    #[test]
    fn backup_keeps_the_first_original() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("f"), "one").unwrap();
        let r = RootDir::open(root.path()).unwrap();
        let Editable::File(data, st) = r.read_editable("f", 100).unwrap() else { panic!("a file") };
        assert_eq!(r.backup("f", &data, &st, false).unwrap(), ("/f.drmesh-orig".to_string(), true));
        assert!(!r.backup("f", b"two", &st, false).unwrap().1);
        assert_eq!(std::fs::read_to_string(root.path().join("f.drmesh-orig")).unwrap(), "one");
    }
}
