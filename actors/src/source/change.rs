//! The change-source seam: how a cycle gets a point-in-time view of a volume
//! and learns what changed since the target's last commit, whatever the
//! volume is. A kind implements [`ChangeSource`] (open a view for one cycle)
//! and its view [`PointInTime`] (the [`BlockDevice`] its blocks are read from,
//! what changed, commit or release); the cycle driver knows nothing else of it. Kinds today: `file`
//! ([`FileKind`]: an image or device read whole, compared with the baseline)
//! and `kmod` ([`KmodKind`]: a snapshot of a device the kernel module tracks,
//! only its changed blocks read) and `qemu` (`super::qemu::QemuKind`: a VM
//! disk through qemu, its dirty bitmap). EBS and RBD are the next kinds; each
//! is one implementation of these two traits.

use std::fmt;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drmesh_topology::{SourceKind, Volume};

use super::baseline::Baselines;
use super::device::{BlockDevice, LocalDevice};
use super::lvm::{is_logical_volume, LvmSnapshot};
use super::freeze::{freeze, loop_mounted, FREEZE_LIMIT};
use super::reflink::clone_image;
use crate::proto::gossip::catalog::Consistency;
use super::kmod::{device_lock, KmodCycle, KmodSpec, ReadPlan};
use super::{BlockMask, SourceError};

/// What a view knows of the changes since the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Nothing: the cycle reads every block and compares it with the baseline.
    Unknown,
    /// Every block must be read, and why.
    Everything(String),
    /// Exactly these blocks may have changed; the others did not.
    Blocks(Arc<BlockMask>),
}

/// A kind of change source, for one volume.
pub trait ChangeSource: Send + Sync + 'static {
    /// The kind's name, as in topology files (`file`, `kmod`).
    fn kind(&self) -> &'static str;
    /// The image or device the volume is, outside any cycle.
    fn volume_path(&self) -> &Path;
    /// A lock the cycles of this volume's views take turns on, when two views
    /// may not exist at once (one snapshot per device).
    fn turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        None
    }
    /// Opens a point-in-time view for one cycle towards `target`. Blocking (a
    /// snapshot may take a moment); an error fails the cycle, nothing changed.
    fn open(&self, baselines: &Baselines, volume: &str, target: &str, block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError>;
    /// What a consistency group can hold this volume's writes through while
    /// the group's views are taken (see [`super::group`]); empty when drmesh
    /// cannot hold them. Blocking (reads the mount table).
    fn hold_points(&self) -> Vec<super::group::HoldPoint> {
        Vec::new()
    }
    /// The `qemu` kind behind this source, if it is one: a consistency
    /// group takes the views of one VM's disks in one qemu transaction.
    fn as_qemu(&self) -> Option<&super::qemu::QemuKind> {
        None
    }
}

impl fmt::Debug for dyn ChangeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} source of {}", self.kind(), self.volume_path().display())
    }
}

/// How consistent a view's blocks are with one instant, and how the view was
/// taken: the RP's label, and what `ctl volumes` says of the last cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewQuality {
    /// The level the RP is labelled with.
    pub consistency: Consistency,
    /// How the view was taken, or why there was none, for people.
    pub how: String,
}

/// One cycle's view of a volume, from `open` until `release`.
pub trait PointInTime: Send + Sync {
    /// How consistent the view is and how it was taken.
    fn quality(&self) -> ViewQuality;
    /// Where this view's blocks are read (the image, the snapshot device; a
    /// kind reading through an API hands over its own [`BlockDevice`]).
    /// Blocking; an error fails the cycle.
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError>;
    /// What changed since the baseline.
    fn changes(&self) -> Changes;
    /// Whether what was read is still the point in time (a snapshot can be
    /// invalidated while it is read); an error fails the cycle.
    fn check(&self) -> Result<(), SourceError> {
        Ok(())
    }
    /// The target committed the cycle and the baseline moved: the changes the
    /// view handed over are consumed (promise 2: not before). Blocking.
    fn committed(&self, _baselines: &Baselines) -> Result<(), SourceError> {
        Ok(())
    }
    /// Lets the view go (called once the cycle ended, committed or not).
    /// Changes not committed stay for the next cycle. Blocking.
    fn release(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// The change source of `volume`, or why this build has none for its kind.
pub fn of_volume(volume: &Volume) -> Result<Arc<dyn ChangeSource>, String> {
    of_volume_fenced(volume, None)
}

/// As [`of_volume`], for a platform's volume: its views change qemu only
/// while `fence` holds the volume's lease.
pub fn of_volume_fenced(volume: &Volume, fence: Option<super::fence::Fence>) -> Result<Arc<dyn ChangeSource>, String> {
    let kind = kind_of(volume, fence)?;
    Ok(match &volume.hooks {
        Some(hooks) => Arc::new(super::hooks::Hooked::new(kind, hooks.clone())),
        None => kind,
    })
}

/// The change source of `volume`'s kind, without its hooks.
fn kind_of(volume: &Volume, fence: Option<super::fence::Fence>) -> Result<Arc<dyn ChangeSource>, String> {
    match &volume.kind {
        SourceKind::File { path } => Ok(Arc::new(FileKind { path: path.clone() })),
        SourceKind::Kmod { device, cow_store, state_store } => Ok(Arc::new(KmodKind {
            spec: KmodSpec { device: device.clone(), cow_store: cow_store.clone(), state_store: state_store.clone(), targets: volume.targets.clone() },
        })),
        SourceKind::Qemu { monitor, node, fleece_dir, nbd, guest_agent, fleece_guard, tls } => Ok(Arc::new(super::qemu::QemuKind {
            monitor: monitor.clone(),
            monitor_key: super::qemu_socket::socket_key(monitor),
            node: node.clone(),
            fleece_dir: fleece_dir.clone(),
            nbd: nbd.clone(),
            guest_agent: guest_agent.clone(),
            fleece_guard: *fleece_guard,
            tls: tls.clone(),
            targets: volume.targets.clone(),
            fence,
        })),
        other => Err(format!("volume \"{}\": source kind {} is not supported by this build yet", volume.name, other.name())),
    }
}

/// Kind `file`: an image file or block device read whole at cycle time. An
/// image on a filesystem that clones files (XFS, btrfs) is read from a
/// reflink clone taken when the cycle starts (crash consistent), an LVM
/// logical volume from an LVM snapshot (crash consistent, its mounted
/// filesystem frozen at the instant); anything else is read live, block after
/// block, and its RPs are labelled `inconsistent` (see docs/consistency.md).
#[derive(Debug, Clone)]
pub struct FileKind {
    /// The image or device.
    pub path: PathBuf,
}

/// A `file` volume's view: its reflink clone, or the live image.
struct FileView {
    device: Arc<LocalDevice>,
    quality: ViewQuality,
}

impl PointInTime for FileView {
    fn quality(&self) -> ViewQuality {
        self.quality.clone()
    }
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError> {
        Ok(self.device.clone())
    }
    fn changes(&self) -> Changes {
        Changes::Unknown
    }
}

impl ChangeSource for FileKind {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn volume_path(&self) -> &Path {
        &self.path
    }
    fn hold_points(&self) -> Vec<super::group::HoldPoint> {
        // The filesystem in a loop-mounted image; its view is a reflink clone
        // taken with that filesystem frozen.
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.is_file() => loop_mounted(&self.path).map(super::group::HoldPoint::Filesystem).into_iter().collect(),
            _ => Vec::new(),
        }
    }
    fn open(&self, _baselines: &Baselines, volume: &str, target: &str, _block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError> {
        let shown = self.path.display();
        let io = |source| SourceError::Io { op: "opening", path: shown.to_string(), source };
        let meta = std::fs::metadata(&self.path).map_err(io)?;
        let why_live = if meta.is_file() {
            // An image whose filesystem is loop-mounted here: frozen for the clone's instant.
            let inner = loop_mounted(&self.path);
            let frozen = inner.as_ref().map(|m| freeze(m, FREEZE_LIMIT));
            let cloned = clone_image(&self.path);
            let frozen = frozen.map(|f| f.map(drop));
            match cloned {
                Ok(clone) => {
                    let quality = match (inner, frozen) {
                        (Some(m), Some(Ok(()))) => ViewQuality {
                            consistency: Consistency::FileSystem,
                            how: format!("reflink clone of {shown}, its {} filesystem (loop-mounted at {}) frozen at the instant", m.fs_type, m.point.display()),
                        },
                        (Some(m), Some(Err(why))) => {
                            tracing::warn!(volume, reason = %why, "the filesystem in the image could not be frozen: the RP is crash consistent");
                            ViewQuality { consistency: Consistency::Crash, how: format!("reflink clone of {shown}; its {} filesystem (loop-mounted at {}) was not frozen: {why}", m.fs_type, m.point.display()) }
                        }
                        _ => ViewQuality { consistency: Consistency::Crash, how: format!("reflink clone of {shown}") },
                    };
                    return Ok(Box::new(FileView { device: Arc::new(clone), quality }));
                }
                Err(e) => e.reason,
            }
        } else if meta.file_type().is_block_device() && is_logical_volume(meta.rdev()) {
            match LvmSnapshot::take(&self.path, volume, target) {
                Ok(snapshot) => return Ok(Box::new(LvmView { volume: volume.to_string(), snapshot })),
                Err(e) => e.reason,
            }
        } else if meta.file_type().is_block_device() {
            format!("{shown} is a block device but not an LVM logical volume; this build snapshots logical volumes only (kind kmod snapshots any block device)")
        } else {
            format!("{shown} is neither a regular file nor a block device")
        };
        tracing::info!(volume, reason = %why_live, "reading the live volume: its RP will be labelled inconsistent");
        let quality = ViewQuality { consistency: Consistency::Inconsistent, how: format!("live read, no point-in-time view: {why_live}") };
        Ok(Box::new(FileView { device: Arc::new(LocalDevice::open(&self.path)?), quality }))
    }
}

/// A `file` volume's view when it is an LVM logical volume: its snapshot.
struct LvmView {
    volume: String,
    snapshot: LvmSnapshot,
}

impl PointInTime for LvmView {
    fn quality(&self) -> ViewQuality {
        let consistency = if self.snapshot.frozen().is_some() { Consistency::FileSystem } else { Consistency::Crash };
        ViewQuality { consistency, how: self.snapshot.describe() }
    }
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError> {
        match self.snapshot.device() {
            Some(d) => Ok(d),
            None => Err(SourceError::Snapshot { volume: self.volume.clone(), reason: format!("{} was released", self.snapshot.describe()) }),
        }
    }
    fn changes(&self) -> Changes {
        Changes::Unknown
    }
    fn check(&self) -> Result<(), SourceError> {
        self.snapshot.check().map_err(|reason| SourceError::SnapshotInvalid { volume: self.volume.clone(), reason })
    }
    fn release(&self) -> Result<(), SourceError> {
        self.snapshot.remove().map_err(|reason| SourceError::Snapshot { volume: self.volume.clone(), reason })
    }
}

/// Kind `kmod`: a block device tracked by drmesh's kernel module; each cycle
/// reads a snapshot, only the blocks changed since the target's last commit.
#[derive(Debug, Clone)]
pub struct KmodKind {
    /// The device, its COW store, the volume's targets.
    pub spec: KmodSpec,
}

impl ChangeSource for KmodKind {
    fn kind(&self) -> &'static str {
        "kmod"
    }
    fn volume_path(&self) -> &Path {
        &self.spec.device
    }
    fn turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        Some(device_lock(&self.spec.device))
    }
    fn open(&self, baselines: &Baselines, volume: &str, target: &str, block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError> {
        Ok(Box::new(KmodCycle::prepare(baselines, volume, target, &self.spec, block_bytes)?))
    }
}

impl PointInTime for KmodCycle {
    fn quality(&self) -> ViewQuality {
        match self.frozen() {
            Some(m) => ViewQuality {
                consistency: Consistency::FileSystem,
                how: format!("kmod snapshot of {}, its {} filesystem (mounted at {}) frozen at the instant", self.device().display(), m.fs_type, m.point.display()),
            },
            None => ViewQuality { consistency: Consistency::Crash, how: format!("kmod snapshot of {} (no filesystem mounted on it to freeze)", self.device().display()) },
        }
    }
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError> {
        Ok(Arc::new(LocalDevice::open(self.snapshot_path())?))
    }
    fn changes(&self) -> Changes {
        match self.plan() {
            ReadPlan::Everything(reason) => Changes::Everything(reason.clone()),
            ReadPlan::Changed(mask) => Changes::Blocks(mask.clone()),
        }
    }
    fn check(&self) -> Result<(), SourceError> {
        self.check_snapshot()
    }
    fn committed(&self, baselines: &Baselines) -> Result<(), SourceError> {
        KmodCycle::committed(self, baselines)
    }
    fn release(&self) -> Result<(), SourceError> {
        KmodCycle::release(self)
    }
}
