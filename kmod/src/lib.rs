//! The Linux agent's kernel side: drmesh's own kernel module (C sources and Kbuild
//! in this folder) that tracks written blocks and offers copy-on-write snapshots,
//! and the Rust interface to it used by the `kmod` source kind.
//!
//! [`Control`] wraps `/dev/drmesh-ctl`: attach and detach devices, hand over
//! change bitmaps ([`ChangeBitmap`]), take and release snapshots
//! ([`SnapshotTaken`]), read a device's [`DeviceStatus`]. Every argument is
//! checked here before the kernel sees it (the kernel checks again); kernel
//! errors come back as [`KmodError`]. `kmod/README.md` describes the module;
//! the `kmod` source kind (`drmesh_actors::source::kmod`) uses this crate.

mod abi;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// What can go wrong talking to the module. Each variant says what state the
/// call left behind.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// The control device could not be opened (module not loaded, not root).
    /// Nothing changed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The control device path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An argument was rejected before the kernel saw it. Nothing changed.
    #[error("invalid argument for {op}: {what}")]
    InvalidArgument {
        /// The operation (`attach`, `snapshot`, ...).
        op: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// The device is not attached, or (release) has no snapshot. Nothing changed.
    #[error("{op}: device {dev} is not attached or has no snapshot")]
    NotAttached {
        /// The operation.
        op: &'static str,
        /// The device.
        dev: DevId,
    },
    /// Busy: already attached, already has a snapshot, has a snapshot (detach),
    /// or the COW store is in use. Nothing changed.
    #[error("{op}: device {dev} is busy")]
    Busy {
        /// The operation.
        op: &'static str,
        /// The device.
        dev: DevId,
    },
    /// The module speaks another interface version. Nothing changed.
    #[error("{op}: the kernel module speaks another interface version")]
    VersionMismatch {
        /// The operation.
        op: &'static str,
    },
    /// Any other kernel error (errno). The module leaves nothing half done:
    /// a failed hand-over keeps its bits, a failed snapshot leaves none.
    #[error("{op} on {dev}: {source}")]
    Kernel {
        /// The operation.
        op: &'static str,
        /// The device (0:0 for attach by path).
        dev: DevId,
        /// The errno.
        source: io::Error,
    },
}

/// Result of this crate's calls.
pub type Result<T> = std::result::Result<T, KmodError>;

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevId {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// What attaching with a state store did with the state it found there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// No state store: tracking is kept in memory only.
    None,
    /// No usable state (a blank or foreign store): a fresh start.
    Fresh,
    /// Restored after a clean shutdown: the bitmap is exact.
    Clean,
    /// Restored after a crash: the logged extents were added whole.
    Crash,
    /// State found, but the device was written after boot before attach.
    Written,
    /// State of another device size or granularity.
    Geometry,
    /// State left by a detach (writes after it were not seen).
    Detached,
    /// The device keeps no I/O counters, so earlier writes cannot be ruled out.
    NoIoStat,
    /// A value this build does not know.
    Unknown(u32),
}

impl Restore {
    fn from_raw(v: u32) -> Restore {
        match v {
            abi::RESTORE_NONE => Restore::None,
            abi::RESTORE_FRESH => Restore::Fresh,
            abi::RESTORE_CLEAN => Restore::Clean,
            abi::RESTORE_CRASH => Restore::Crash,
            abi::RESTORE_WRITTEN => Restore::Written,
            abi::RESTORE_GEOMETRY => Restore::Geometry,
            abi::RESTORE_DETACHED => Restore::Detached,
            abi::RESTORE_NO_IOSTAT => Restore::NoIoStat,
            v => Restore::Unknown(v),
        }
    }

    /// A short name for reports: `none`, `fresh`, `clean`, `crash`,
    /// `written_before_attach`, `geometry`, `detached`, `no_iostat`, `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            Restore::None => "none",
            Restore::Fresh => "fresh",
            Restore::Clean => "clean",
            Restore::Crash => "crash",
            Restore::Written => "written_before_attach",
            Restore::Geometry => "geometry",
            Restore::Detached => "detached",
            Restore::NoIoStat => "no_iostat",
            Restore::Unknown(_) => "unknown",
        }
    }

    /// True when the tracking continues from before (clean or crash restore).
    pub fn restored(self) -> bool {
        matches!(self, Restore::Clean | Restore::Crash)
    }
}

/// A device attached for tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Its device number, used by every later call.
    pub dev: DevId,
    /// Bytes per bitmap bit.
    pub granularity_bytes: u32,
    /// What became of the state store's content.
    pub restore: Restore,
    /// Activity-log extents a crash left, marked changed whole.
    pub al_extents: u32,
    /// The hand-over count the bitmap continues from.
    pub handovers: u64,
    /// Bits set in the restored bitmap.
    pub bits_set: u64,
    /// Names this line of tracking (kept by a restore, new otherwise).
    pub tracking_id: [u8; 16],
}

/// One attached device's state ([`Control::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Tracked right now.
    pub attached: bool,
    /// The device was removed while attached.
    pub device_gone: bool,
    /// A snapshot exists.
    pub snapshot: bool,
    /// The snapshot was invalidated (COW store full or I/O error); its errno.
    pub snapshot_error: Option<i32>,
    /// N of `/dev/drmesh-snapN` when a snapshot exists.
    pub snap_index: u32,
    /// Bytes per bitmap bit.
    pub granularity_bytes: u32,
    /// Size of the device at attach.
    pub device_bytes: u64,
    /// Bytes a bitmap of this device takes.
    pub bitmap_bytes: u64,
    /// Bits set in the live bitmap (a racy snapshot).
    pub bits_set: u64,
    /// Write-class bios recorded since attach.
    pub writes_seen: u64,
    /// Successful hand-overs since attach.
    pub handovers: u64,
    /// Devices attached in total.
    pub attached_count: u32,
    /// Chunks copied into the COW store.
    pub cow_chunks_used: u64,
    /// Chunks the COW store holds.
    pub cow_chunks_total: u64,
    /// Names this line of tracking: the same id and hand-over counts that
    /// follow on mean no write was missed in between.
    pub tracking_id: [u8; 16],
    /// The tracking state is kept on a state store.
    pub persistent: bool,
    /// The state store failed (errno): tracking goes on in memory only.
    pub persist_error: Option<i32>,
    /// Extents in the state store's activity log.
    pub al_used: u32,
    /// Extents the activity log holds (0 without a state store).
    pub al_slots: u32,
    /// Times a full activity log made extents leave it.
    pub al_flushes: u32,
}

/// A handed-over change bitmap: bit i covers bytes
/// `[i * granularity_bytes, (i + 1) * granularity_bytes)` of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBitmap {
    /// Bit i is bit i % 8 of byte i / 8.
    pub bytes: Vec<u8>,
    /// Bytes per bit.
    pub granularity_bytes: u32,
    /// Device size; the last bit may cover less than a granule.
    pub device_bytes: u64,
}

impl ChangeBitmap {
    /// Whether bit `i` is set (false past the end).
    pub fn is_set(&self, i: u64) -> bool {
        usize::try_from(i / 8)
            .ok()
            .and_then(|byte| self.bytes.get(byte))
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Bits set.
    pub fn count_set(&self) -> u64 {
        self.bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// ORs `other` into `self` (a failed cycle merges its bitmap back into
    /// the next one). Fails when the geometries differ.
    pub fn merge(&mut self, other: &ChangeBitmap) -> Result<()> {
        if other.granularity_bytes != self.granularity_bytes
            || other.device_bytes != self.device_bytes
            || other.bytes.len() != self.bytes.len()
        {
            return Err(KmodError::InvalidArgument {
                op: "merge",
                what: "bitmaps of different geometry".into(),
            });
        }
        for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
            *a |= b;
        }
        Ok(())
    }

    /// Changed byte ranges `(offset, length)`, runs of set bits joined, the
    /// last clipped to the device size.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let gran = u64::from(self.granularity_bytes);
        let nbits = self.device_bytes.div_ceil(gran.max(1));
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in (0..nbits).filter(|&i| self.is_set(i)) {
            let start = i * gran;
            let len = gran.min(self.device_bytes - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }
}

/// A snapshot just taken ([`Control::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTaken {
    /// The change bitmap handed over at the snapshot instant: every write
    /// since the previous hand-over.
    pub bitmap: ChangeBitmap,
    /// The read-only snapshot device, `/dev/drmesh-snapN`.
    pub device_path: PathBuf,
    /// Its device number.
    pub device: DevId,
    /// Room in the COW store for overwritten data.
    pub cow_bytes: u64,
}

/// Puts `path` into a NUL-terminated C path field.
fn path_field(op: &'static str, path: &Path) -> Result<[u8; abi::PATH_BYTES]> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let bad = |what: &str| KmodError::InvalidArgument {
        op,
        what: format!("path {}: {what}", path.display()),
    };
    if bytes.is_empty() {
        return Err(bad("empty"));
    }
    if bytes.len() >= abi::PATH_BYTES {
        return Err(bad("too long"));
    }
    if bytes.contains(&0) {
        return Err(bad("contains NUL"));
    }
    let mut field = [0u8; abi::PATH_BYTES];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

/// Checks a requested granularity (`None` = the module's default).
pub fn check_granularity(granularity_bytes: Option<u32>) -> Result<u32> {
    match granularity_bytes {
        None => Ok(0),
        Some(g)
            if g.is_power_of_two()
                && (abi::GRANULARITY_BYTES_MIN..=abi::GRANULARITY_BYTES_MAX).contains(&g) =>
        {
            Ok(g)
        }
        Some(g) => Err(KmodError::InvalidArgument {
            op: "attach",
            what: format!("granularity {g}: want a power of two from 512 to 1 MiB"),
        }),
    }
}

/// The open control device.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens `/dev/drmesh-ctl` (needs root and the loaded module).
    pub fn open() -> Result<Control> {
        Self::open_path(Path::new(abi::CTL_PATH))
    }

    /// Opens the control device at `path`.
    pub fn open_path(path: &Path) -> Result<Control> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(|file| Control { file })
            .map_err(|source| KmodError::Open {
                path: path.to_owned(),
                source,
            })
    }

    /// Issues ioctl `req` with `arg`; maps errno to [`KmodError`].
    #[allow(unsafe_code)]
    fn ioctl<T>(&self, op: &'static str, dev: DevId, req: u32, arg: &mut T) -> Result<()> {
        // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct
        // whose size is the one encoded in `req` (checked by abi's tests), so
        // the kernel reads and writes only inside it; the fd stays open for
        // the call's duration because `self` is borrowed.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req as libc::Ioctl, arg as *mut T) };
        if rc == 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        Err(match source.raw_os_error() {
            // For attach and snapshot ENOENT may also be a missing path.
            Some(libc::ENOENT) if matches!(op, "detach" | "release" | "bitmap") => {
                KmodError::NotAttached { op, dev }
            }
            Some(libc::EBUSY) => KmodError::Busy { op, dev },
            Some(libc::EPROTO) => KmodError::VersionMismatch { op },
            _ => KmodError::Kernel { op, dev, source },
        })
    }

    /// Starts tracking the block device at `path`; with `state_store` (a
    /// block device, see kmod/README.md) the tracking survives reboots and
    /// crashes, and whatever that store holds is restored when it can be.
    pub fn attach(&self, path: &Path, granularity_bytes: Option<u32>, state_store: Option<&Path>) -> Result<Attached> {
        let granularity_bytes = check_granularity(granularity_bytes)?;
        let mut a = abi::Attach {
            version: abi::IOCTL_VERSION,
            flags: 0,
            dev_major: 0,
            dev_minor: 0,
            granularity_bytes,
            reserved: 0,
            path: path_field("attach", path)?,
            state_path: match state_store {
                Some(p) => path_field("attach", p)?,
                None => [0; abi::PATH_BYTES],
            },
            restore: 0,
            al_extents: 0,
            handovers: 0,
            bits_set: 0,
            tracking_id: [0; 16],
        };
        self.ioctl(
            "attach",
            DevId { major: 0, minor: 0 },
            abi::IOC_ATTACH,
            &mut a,
        )?;
        Ok(Attached {
            dev: DevId {
                major: a.dev_major,
                minor: a.dev_minor,
            },
            granularity_bytes: a.granularity_bytes,
            restore: Restore::from_raw(a.restore),
            al_extents: a.al_extents,
            handovers: a.handovers,
            bits_set: a.bits_set,
            tracking_id: a.tracking_id,
        })
    }

    fn dev_arg(dev: DevId) -> abi::Dev {
        abi::Dev {
            version: abi::IOCTL_VERSION,
            flags: 0,
            dev_major: dev.major,
            dev_minor: dev.minor,
        }
    }

    /// Stops tracking `dev` (fails with [`KmodError::Busy`] while it has a snapshot).
    pub fn detach(&self, dev: DevId) -> Result<()> {
        self.ioctl("detach", dev, abi::IOC_DETACH, &mut Self::dev_arg(dev))
    }

    /// Drops `dev`'s snapshot.
    pub fn release(&self, dev: DevId) -> Result<()> {
        self.ioctl("release", dev, abi::IOC_RELEASE, &mut Self::dev_arg(dev))
    }

    /// `dev`'s state; `attached` is false when it is not attached.
    pub fn status(&self, dev: DevId) -> Result<DeviceStatus> {
        let mut s = abi::Status {
            version: abi::IOCTL_VERSION,
            dev_major: dev.major,
            dev_minor: dev.minor,
            ..Default::default()
        };
        self.ioctl("status", dev, abi::IOC_STATUS, &mut s)?;
        Ok(DeviceStatus {
            attached: s.state & abi::STATE_ATTACHED != 0,
            device_gone: s.state & abi::STATE_DEVICE_GONE != 0,
            snapshot: s.state & abi::STATE_SNAPSHOT != 0,
            snapshot_error: (s.state & abi::STATE_SNAP_INVALID != 0)
                .then(|| i32::try_from(s.snap_error).unwrap_or(i32::MAX)),
            snap_index: s.snap_index,
            granularity_bytes: s.granularity_bytes,
            device_bytes: s.device_bytes,
            bitmap_bytes: s.bitmap_bytes,
            bits_set: s.bits_set,
            writes_seen: s.writes_seen,
            handovers: s.handovers,
            attached_count: s.attached_count,
            cow_chunks_used: s.cow_chunks_used,
            cow_chunks_total: s.cow_chunks_total,
            tracking_id: s.tracking_id,
            persistent: s.state & abi::STATE_PERSISTENT != 0,
            persist_error: (s.state & abi::STATE_PERSIST_FAILED != 0)
                .then(|| i32::try_from(s.persist_error).unwrap_or(i32::MAX)),
            al_used: s.al_used,
            al_slots: s.al_slots,
            al_flushes: s.al_flushes,
        })
    }

    /// A zeroed buffer big enough for `dev`'s bitmap.
    fn bitmap_buf(&self, dev: DevId) -> Result<Vec<u8>> {
        let st = self.status(dev)?;
        if !st.attached {
            return Err(KmodError::NotAttached { op: "status", dev });
        }
        let bytes = usize::try_from(st.bitmap_bytes).map_err(|_| KmodError::InvalidArgument {
            op: "bitmap",
            what: format!("bitmap of {} bytes does not fit in memory", st.bitmap_bytes),
        })?;
        Ok(vec![0u8; bytes])
    }

    /// Hands over `dev`'s change bitmap and starts a new one.
    pub fn take_bitmap(&self, dev: DevId) -> Result<ChangeBitmap> {
        let mut buf = self.bitmap_buf(dev)?;
        let mut b = abi::Bitmap {
            version: abi::IOCTL_VERSION,
            dev_major: dev.major,
            dev_minor: dev.minor,
            buf: buf.as_mut_ptr() as u64,
            buf_bytes: buf.len() as u64,
            ..Default::default()
        };
        self.ioctl("bitmap", dev, abi::IOC_GET_BITMAP, &mut b)?;
        buf.truncate(usize::try_from(b.bitmap_bytes).unwrap_or(buf.len()));
        Ok(ChangeBitmap {
            bytes: buf,
            granularity_bytes: b.granularity_bytes,
            device_bytes: b.device_bytes,
        })
    }

    /// Takes a snapshot of `dev` with the block device at `cow_path` as its
    /// COW store, handing the change bitmap over at the same instant.
    pub fn snapshot(&self, dev: DevId, cow_path: &Path) -> Result<SnapshotTaken> {
        let cow_path = path_field("snapshot", cow_path)?;
        let st = self.status(dev)?;
        if st.attached && st.granularity_bytes < abi::SNAPSHOT_GRANULARITY_BYTES_MIN {
            return Err(KmodError::InvalidArgument {
                op: "snapshot",
                what: format!(
                    "granularity {} is below the 4096-byte snapshot chunk",
                    st.granularity_bytes
                ),
            });
        }
        let mut buf = self.bitmap_buf(dev)?;
        let mut a = abi::Snapshot {
            version: abi::IOCTL_VERSION,
            flags: 0,
            dev_major: dev.major,
            dev_minor: dev.minor,
            buf: buf.as_mut_ptr() as u64,
            buf_bytes: buf.len() as u64,
            bitmap_bytes: 0,
            bits_set: 0,
            device_bytes: 0,
            cow_bytes: 0,
            granularity_bytes: 0,
            snap_index: 0,
            snap_major: 0,
            snap_minor: 0,
            cow_path,
        };
        self.ioctl("snapshot", dev, abi::IOC_SNAPSHOT, &mut a)?;
        buf.truncate(usize::try_from(a.bitmap_bytes).unwrap_or(buf.len()));
        Ok(SnapshotTaken {
            bitmap: ChangeBitmap {
                bytes: buf,
                granularity_bytes: a.granularity_bytes,
                device_bytes: a.device_bytes,
            },
            device_path: PathBuf::from(format!("/dev/{}{}", abi::SNAP_NAME, a.snap_index)),
            device: DevId {
                major: a.snap_major,
                minor: a.snap_minor,
            },
            cow_bytes: a.cow_bytes,
        })
    }
}

/// Whether `path` is a block device (a COW store or a device to attach must be).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(bits: &[u64], gran: u32, device_bytes: u64) -> ChangeBitmap {
        let nbits = device_bytes.div_ceil(u64::from(gran));
        let mut bytes = vec![0u8; usize::try_from(nbits.div_ceil(8)).expect("small")];
        for &b in bits {
            bytes[usize::try_from(b / 8).expect("small")] |= 1 << (b % 8);
        }
        ChangeBitmap {
            bytes,
            granularity_bytes: gran,
            device_bytes,
        }
    }

    #[test]
    fn ranges_join_runs_and_clip_the_last_granule() {
        // 10 granules of 4096, the last one 1000 bytes short.
        let m = map(&[0, 1, 3, 8, 9], 4096, 10 * 4096 - 1000);
        assert_eq!(
            m.ranges(),
            vec![(0, 8192), (12288, 4096), (32768, 8192 - 1000)]
        );
        assert_eq!(m.count_set(), 5);
        assert!(m.is_set(3) && !m.is_set(2) && !m.is_set(1000));
    }

    #[test]
    fn merge_ors_and_refuses_other_geometry() {
        let mut a = map(&[1], 4096, 65536);
        a.merge(&map(&[2, 15], 4096, 65536)).expect("same geometry");
        assert_eq!(a.ranges(), vec![(4096, 8192), (61440, 4096)]);
        assert!(a.merge(&map(&[1], 8192, 65536)).is_err());
        assert!(a.merge(&map(&[1], 4096, 131072)).is_err());
    }

    #[test]
    fn granularity_is_checked_before_the_kernel() {
        assert_eq!(check_granularity(None).expect("default"), 0);
        assert_eq!(check_granularity(Some(4096)).expect("valid"), 4096);
        assert_eq!(check_granularity(Some(512)).expect("valid"), 512);
        assert_eq!(check_granularity(Some(1 << 20)).expect("valid"), 1 << 20);
        for bad in [0, 256, 3000, 2 << 20, u32::MAX] {
            assert!(matches!(
                check_granularity(Some(bad)),
                Err(KmodError::InvalidArgument { .. })
            ));
        }
    }

    #[test]
    fn paths_must_fit_the_c_field() {
        let f = path_field("attach", Path::new("/dev/vdb")).expect("fits");
        assert_eq!(&f[..9], b"/dev/vdb\0");
        assert!(path_field("attach", Path::new("")).is_err());
        assert!(path_field("attach", Path::new(&"x".repeat(abi::PATH_BYTES))).is_err());
        assert!(path_field("attach", Path::new(&"x".repeat(abi::PATH_BYTES - 1))).is_ok());
        use std::os::unix::ffi::OsStrExt;
        assert!(path_field("attach", Path::new(std::ffi::OsStr::from_bytes(b"a\0b"))).is_err());
    }

    #[test]
    fn a_missing_control_device_is_an_open_error() {
        let err = Control::open_path(Path::new("/nonexistent/drmesh-ctl")).expect_err("absent");
        assert!(matches!(err, KmodError::Open { .. }), "{err}");
    }
}
