//! Where a point-in-time view's blocks are read: [`BlockDevice`]. The cycle's
//! reader ([`super::file::FileSource`]: batches, vectored reads, read-ahead,
//! the tail prober, pooled buffers) reads any of them; a change-source kind
//! hands one over from its view ([`super::change::PointInTime::device`]).
//! Today every kind reads a device of this machine ([`LocalDevice`]: an image
//! file, a block device, a snapshot device); a kind whose blocks come from an
//! API (EBS direct APIs, RBD) implements the trait over that API instead.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::SourceError;

/// Alignment of buffers, offsets and lengths for a device that reads straight
/// into them ([`BlockDevice::aligned`]).
pub const DIRECT_ALIGN: usize = 4096;

/// A volume's bytes at one point in time, readable at any offset from any
/// thread (`&self`: reads do not move a cursor).
pub trait BlockDevice: Send + Sync {
    /// What it is, for messages: a path, a snapshot's name.
    fn describe(&self) -> &str;
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Whether reads go straight into the buffers (O_DIRECT): then buffers,
    /// offsets and lengths are multiples of [`DIRECT_ALIGN`], and a read may
    /// fill a whole aligned page past the last byte asked for.
    fn aligned(&self) -> bool;
    /// Reads into `buf` from `offset`, like `pread`: may read less than asked;
    /// 0 at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads into `bufs` one after the other from `offset`, like `preadv`.
    /// The default reads them one by one and stops at the first short read.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        for buf in bufs.iter_mut() {
            let n = self.read_at(buf, offset + done as u64)?;
            done += n;
            if n < buf.len() {
                break;
            }
        }
        Ok(done)
    }
}

/// An image file or block device of this machine, read with O_DIRECT where
/// its filesystem allows (far less CPU than buffered reads, and the page cache
/// stays the workload's).
#[derive(Debug)]
pub struct LocalDevice {
    shown: String,
    file: File,
    direct: bool,
    size: u64,
}

impl LocalDevice {
    /// Opens `path` for reading; sizes it (a block device's metadata says 0,
    /// seeking to its end does not).
    pub fn open(path: &Path) -> Result<LocalDevice, SourceError> {
        let io = |op: &'static str| move |source| SourceError::Io { op, path: path.display().to_string(), source };
        let direct = OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path);
        let (mut file, direct) = match direct {
            Ok(f) => (f, true),
            Err(_) => (File::open(path).map_err(io("opening"))?, false),
        };
        let size = file.seek(SeekFrom::End(0)).map_err(io("sizing"))?;
        Ok(LocalDevice { shown: path.display().to_string(), file, direct, size })
    }

    /// Reads an open file (one without a name, such as a clone made with
    /// `O_TMPFILE`), shown as `shown`; `direct` says it was opened with
    /// O_DIRECT.
    pub fn from_file(mut file: File, shown: String, direct: bool) -> Result<LocalDevice, SourceError> {
        let size = file.seek(SeekFrom::End(0)).map_err(|source| SourceError::Io { op: "sizing", path: shown.clone(), source })?;
        Ok(LocalDevice { shown, file, direct, size })
    }
}

impl BlockDevice for LocalDevice {
    fn describe(&self) -> &str {
        &self.shown
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn aligned(&self) -> bool {
        self.direct
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past the largest file offset"))?;
        nix::sys::uio::preadv(&self.file, bufs, offset).map_err(io::Error::from)
    }
}
