//! The `kmod` source kind: a block device tracked by drmesh's kernel module.
//!
//! Each cycle takes a copy-on-write snapshot of the device (`/dev/drmesh-snapN`,
//! its COW store on `cow_store`); at the same instant the module hands over the
//! bitmap of every block written since the previous hand-over. The block-reader
//! then reads only the policy blocks that hold a set bit, from the snapshot
//! device, and takes the content ids of all other blocks from the baseline (so
//! the RP's Merkle root covers the whole volume). The snapshot is released when
//! the cycle ends: after the target acknowledged the commit, or when it failed.
//!
//! # No change is lost (promise 2)
//!
//! The module has no call to give a handed-over bitmap back, and a bitmap is
//! handed over once for every target of the volume. So the bits live in the
//! source's redb ([`Baselines::source_state`]): one *pending* change set per
//! target. Right after a snapshot, before a block is read, the handed-over
//! bitmap is OR-ed into the pending set of every target of the volume in one
//! durable transaction. A cycle to target T reads T's pending set; only after
//! T acknowledged the commit (and the baseline moved) is T's pending set
//! cleared, and only if no later hand-over was merged into it meanwhile. A
//! failed or interrupted cycle leaves the set as it is: its bits are merged
//! with the next hand-over and read again (the merge-back of the issue).
//!
//! # When everything is read
//!
//! The bitmap only covers writes since the module attached the device, and
//! since the last hand-over this node persisted. The source records the
//! module's tracking id, hand-over count and the device number after each
//! merge. A cycle reads the whole snapshot (and marks every target's pending
//! set "everything") when:
//! - it attached the device itself and the module restored nothing (no
//!   `state_store`, or one whose state could not be used, e.g. the device was
//!   written after boot before the attach): writes before were not tracked;
//! - the tracking id, the device number or the granularity is not the
//!   recorded one, or the hand-over count is past the recorded one (someone
//!   else took a bitmap, the device was re-attached, or this node crashed
//!   between a hand-over and its merge);
//!
//! With a `state_store` the module restores its bitmap after a reboot or a
//! crash under the same tracking id, at the hand-over count of its last
//! checkpoint (never past the one this node recorded), so the first cycle
//! after a reboot reads only what changed (after a crash, also the extents
//! the module's activity log named).
//! - the target has no pending set yet (a new target), the target's session
//!   asks for a full offer, or the volume's size changed.
//!
//! Reading everything is never a silent gap: unchanged blocks are recognised by
//! their page hashes, as in the `file` kind, and not sent again.
//!
//! Cycles of one device run one at a time (the module keeps one snapshot per
//! disk): cycles of a volume to several targets take turns, each with its own
//! snapshot. A snapshot left behind by a crashed process is released before
//! the next one is taken.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use drmesh_kmod::{ChangeBitmap, Control, DevId, DeviceStatus, KmodError, SnapshotTaken};
use serde::{Deserialize, Serialize};

use super::baseline::Baselines;
use super::{BlockMask, SourceError};

/// A `kmod` volume's settings, as the topology gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmodSpec {
    /// The tracked block device.
    pub device: PathBuf,
    /// The block device that holds the COW store of each snapshot.
    pub cow_store: PathBuf,
    /// The block device that keeps the tracking across reboots, if any.
    pub state_store: Option<PathBuf>,
    /// Every target of the volume (each gets the handed-over bits).
    pub targets: Vec<String>,
}

impl KmodSpec {
    /// The settings of `volume` when it is of kind `kmod`.
    pub fn of(volume: &drmesh_topology::Volume) -> Option<KmodSpec> {
        match &volume.kind {
            drmesh_topology::SourceKind::Kmod { device, cow_store, state_store } => Some(KmodSpec {
                device: device.clone(),
                cow_store: cow_store.clone(),
                state_store: state_store.clone(),
                targets: volume.targets.clone(),
            }),
            _ => None,
        }
    }
}

/// The module's smallest snapshot chunk (a chunk is the granularity, at least this).
const SNAPSHOT_CHUNK_BYTES_MIN: u32 = 4096;

/// Bytes one extent of the module's activity log covers (`DRMESH_TRK_EXTENT_BYTES`).
const LOG_EXTENT_BYTES: u64 = 4 << 20;

/// Key of the tracking record in the volume's source state.
const TRACK_KEY: &str = "kmod-track";

/// Key of a target's pending change set in the volume's source state.
fn pending_key(target: &str) -> String {
    format!("kmod-pending:{target}")
}

/// What this node knows about the module's state after its last merged hand-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TrackRecord {
    /// The module's tracking id then: a new one means tracking restarted
    /// (re-attach, module reload, or a reboot without a usable state store).
    tracking_id: [u8; 16],
    /// Device number then.
    dev_major: u32,
    /// Device number then.
    dev_minor: u32,
    /// Bytes per bit.
    granularity_bytes: u32,
    /// Device size at attach.
    device_bytes: u64,
    /// The module's hand-over count right after the last merged hand-over.
    handovers: u64,
    /// Merges so far (one per snapshot this node took).
    generation: u64,
    /// The module reported a failed state store then: a later restore of this
    /// tracking id (after a reboot) may lack the writes after the failure.
    store_failed: bool,
}

/// The changes a target has not committed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    /// Every block must be read (and why).
    everything: Option<String>,
    /// Bytes per bit of `bits`.
    granularity_bytes: u32,
    /// Device size `bits` covers.
    device_bytes: u64,
    /// The OR of the hand-overs merged since the target's last commit.
    bits: Vec<u8>,
    /// Generation of the last merge into this set.
    generation: u64,
}

impl Pending {
    fn everything(reason: &str, bitmap: &ChangeBitmap, generation: u64) -> Pending {
        Pending {
            everything: Some(reason.to_string()),
            granularity_bytes: bitmap.granularity_bytes,
            device_bytes: bitmap.device_bytes,
            bits: vec![0; bitmap.bytes.len()],
            generation,
        }
    }

    fn as_bitmap(&self) -> ChangeBitmap {
        ChangeBitmap { bytes: self.bits.clone(), granularity_bytes: self.granularity_bytes, device_bytes: self.device_bytes }
    }

    /// ORs `bitmap` in; a set of another geometry becomes "everything".
    fn merge(&mut self, bitmap: &ChangeBitmap, generation: u64) {
        self.generation = generation;
        if self.everything.is_some() {
            return;
        }
        let mut mine = self.as_bitmap();
        match mine.merge(bitmap) {
            Ok(()) => self.bits = mine.bytes,
            Err(_) => *self = Pending::everything("the device's geometry changed", bitmap, generation),
        }
    }
}

/// Policy blocks of `block_bytes` that hold a set bit of `bitmap`.
pub fn blocks_of(bitmap: &ChangeBitmap, block_bytes: u32) -> BlockMask {
    let block = u64::from(block_bytes.max(1));
    let mut mask = BlockMask::new(bitmap.device_bytes.div_ceil(block));
    for (offset, len) in bitmap.ranges() {
        for index in offset / block..=(offset + len - 1) / block {
            mask.insert(index);
        }
    }
    mask
}

/// What a cycle reads from its snapshot.
#[derive(Debug, Clone)]
pub enum ReadPlan {
    /// Every block, and why.
    Everything(String),
    /// Only these blocks.
    Changed(Arc<BlockMask>),
}

/// One cycle's snapshot of a `kmod` volume. Released by [`KmodCycle::committed`],
/// [`KmodCycle::release`] or, as a fallback, on drop.
pub struct KmodCycle {
    ctl: Control,
    dev: DevId,
    volume: String,
    target: String,
    snapshot: SnapshotTaken,
    generation: u64,
    plan: ReadPlan,
    released: AtomicBool,
    device: PathBuf,
    frozen: Option<crate::mounts::Mount>,
}

impl std::fmt::Debug for KmodCycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KmodCycle({} of {}, {})", self.snapshot.device_path.display(), self.dev, self.volume)
    }
}

fn kmod_err(volume: &str, device: &Path, op: &'static str) -> impl FnOnce(KmodError) -> SourceError {
    let (volume, device) = (volume.to_string(), device.display().to_string());
    move |source| SourceError::Kmod { volume, device, op, source }
}

/// The block device number of `path`.
fn device_number(volume: &str, path: &Path) -> Result<DevId, SourceError> {
    let meta = std::fs::metadata(path).map_err(|source| SourceError::Io { op: "finding the device", path: path.display().to_string(), source })?;
    if !drmesh_kmod::is_block_device(path) {
        return Err(SourceError::Kmod {
            volume: volume.to_string(),
            device: path.display().to_string(),
            op: "attach",
            source: KmodError::InvalidArgument { op: "attach", what: "not a block device".into() },
        });
    }
    let rdev = meta.rdev();
    Ok(DevId { major: libc::major(rdev), minor: libc::minor(rdev) })
}


/// Cycles of one device take turns: the module keeps one snapshot per disk.
pub fn device_lock(device: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: Mutex<Option<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = Mutex::new(None);
    // A poisoned map only means a panic elsewhere while inserting; the map is still whole.
    let mut locks = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    locks.get_or_insert_with(HashMap::new).entry(device.to_path_buf()).or_default().clone()
}

fn decode<T: for<'de> Deserialize<'de>>(baselines: &Baselines, volume: &str, key: &str) -> Result<Option<T>, SourceError> {
    match baselines.source_state(volume, key)? {
        // A record we cannot read is treated as absent: that only makes the next read a full one.
        Some(bytes) => Ok(postcard::from_bytes(&bytes).ok()),
        None => Ok(None),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard encodes these plain structs into a Vec without fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

impl KmodCycle {
    /// Attaches `spec.device` if it is not attached, takes a snapshot, merges
    /// the handed-over bitmap into every target's pending set (durably) and
    /// works out what the cycle to `target` must read. Blocking.
    pub fn prepare(baselines: &Baselines, volume: &str, target: &str, spec: &KmodSpec, block_bytes: u32) -> Result<KmodCycle, SourceError> {
        let device = spec.device.as_path();
        let ctl = Control::open().map_err(kmod_err(volume, device, "open"))?;
        let dev = device_number(volume, device)?;
        let status = ctl.status(dev).map_err(kmod_err(volume, device, "status"))?;
        let mut status = if status.attached {
            status
        } else {
            let attached = ctl.attach(device, None, spec.state_store.as_deref()).map_err(kmod_err(volume, device, "attach"))?;
            tracing::info!(
                %volume, device = %device.display(), dev = %attached.dev, granularity = attached.granularity_bytes,
                state_store = %spec.state_store.as_ref().map_or("none".to_string(), |p| p.display().to_string()),
                restore = attached.restore.name(), restored_bits = attached.bits_set, log_extents = attached.al_extents,
                "attached the device to the kernel module"
            );
            let mut st = ctl.status(dev).map_err(kmod_err(volume, device, "status"))?;
            if !attached.restore.restored() {
                // Nothing before this attach was tracked.
                st.handovers = u64::MAX;
            }
            st
        };
        if status.snapshot {
            // Cycles of a device take turns in this process, so this one was left by a crash.
            tracing::warn!(%volume, device = %device.display(), "releasing a snapshot an earlier run left behind");
            ctl.release(dev).map_err(kmod_err(volume, device, "release"))?;
        }
        let record: Option<TrackRecord> = decode(baselines, volume, TRACK_KEY)?;
        let lost = continuity_lost(record.as_ref(), dev, &status);
        // The module freezes a filesystem mounted on the device while it takes the snapshot.
        let frozen = crate::mounts::mounted(&[nix::sys::stat::makedev(dev.major.into(), dev.minor.into())]);
        let snapshot = ctl.snapshot(dev, &spec.cow_store).map_err(kmod_err(volume, device, "snapshot"))?;
        let taken = Self::after_snapshot(&ctl, dev, volume, device);
        let after = match taken {
            Ok(st) => st,
            Err(e) => {
                let _ = ctl.release(dev);
                return Err(e);
            }
        };
        // Another hand-over between our status and our snapshot took bits we never saw.
        let lost = lost.or_else(|| {
            (status.handovers != u64::MAX && after.handovers != status.handovers + 1)
                .then(|| "another client took a change bitmap of the device".to_string())
        });
        status.handovers = after.handovers;
        let generation = record.as_ref().map_or(0, |r| r.generation) + 1;
        let mut entries = Vec::new();
        let mut mine = None;
        let mut targets = spec.targets.clone();
        if !targets.iter().any(|t| t == target) {
            targets.push(target.to_string());
        }
        for t in &targets {
            let old: Option<Pending> = decode(baselines, volume, &pending_key(t))?;
            let pending = merge_pending(old, &snapshot.bitmap, lost.as_deref(), generation);
            if t == target {
                mine = Some(pending.clone());
            }
            entries.push((pending_key(t), Some(encode(&pending))));
        }
        let new_record = TrackRecord {
            tracking_id: after.tracking_id,
            dev_major: dev.major,
            dev_minor: dev.minor,
            granularity_bytes: snapshot.bitmap.granularity_bytes,
            device_bytes: snapshot.bitmap.device_bytes,
            handovers: status.handovers,
            generation,
            store_failed: after.persist_error.is_some(),
        };
        if let Some(errno) = after.persist_error {
            tracing::warn!(
                %volume, device = %device.display(), error = %std::io::Error::from_raw_os_error(errno),
                "the state store failed: tracking goes on in memory; after a reboot this volume is read in full"
            );
        }
        entries.push((TRACK_KEY.to_string(), Some(encode(&new_record))));
        if let Err(e) = baselines.set_source_state(volume, &entries) {
            // The hand-over is not recorded; the next cycle sees the count moved and reads everything.
            let _ = ctl.release(dev);
            return Err(e);
        }
        let plan = match mine {
            Some(Pending { everything: Some(reason), .. }) => ReadPlan::Everything(reason),
            Some(p) => ReadPlan::Changed(Arc::new(blocks_of(&p.as_bitmap(), block_bytes))),
            None => ReadPlan::Everything("no pending change set".into()),
        };
        tracing::info!(
            %volume, %target, snapshot = %snapshot.device_path.display(), handed_over_bits = snapshot.bitmap.count_set(),
            plan = %match &plan { ReadPlan::Everything(r) => format!("read everything: {r}"), ReadPlan::Changed(m) => format!("read {} changed blocks", m.count()) },
            "took a snapshot"
        );
        Ok(KmodCycle {
            ctl,
            dev,
            volume: volume.to_string(),
            target: target.to_string(),
            snapshot,
            generation,
            plan,
            released: AtomicBool::new(false),
            device: device.to_path_buf(),
            frozen,
        })
    }

    fn after_snapshot(ctl: &Control, dev: DevId, volume: &str, device: &Path) -> Result<DeviceStatus, SourceError> {
        ctl.status(dev).map_err(kmod_err(volume, device, "status"))
    }

    /// The tracked device.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The filesystem that was mounted on the device, and so frozen while
    /// the snapshot was taken, if one was.
    pub fn frozen(&self) -> Option<&crate::mounts::Mount> {
        self.frozen.as_ref()
    }

    /// The snapshot device to read.
    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot.device_path
    }

    /// What to read.
    pub fn plan(&self) -> &ReadPlan {
        &self.plan
    }

    /// Fails if the module invalidated the snapshot (COW store full, I/O
    /// error): what was read may not be the snapshot's content.
    pub fn check_snapshot(&self) -> Result<(), SourceError> {
        let st = self.ctl.status(self.dev).map_err(kmod_err(&self.volume, Path::new(&self.snapshot.device_path), "status"))?;
        match (st.snapshot, st.snapshot_error) {
            (true, None) => Ok(()),
            (_, errno) => Err(SourceError::SnapshotInvalid {
                volume: self.volume.clone(),
                reason: match errno {
                    Some(e) => format!("{} (the COW store may be too small for the writes during a cycle)", std::io::Error::from_raw_os_error(e)),
                    None => "the snapshot is gone".into(),
                },
            }),
        }
    }

    /// The target acknowledged the commit (and the baseline moved): clears the
    /// target's pending set, unless a later hand-over was merged into it, and
    /// releases the snapshot. Blocking.
    pub fn committed(&self, baselines: &Baselines) -> Result<(), SourceError> {
        let key = pending_key(&self.target);
        let pending: Option<Pending> = decode(baselines, &self.volume, &key)?;
        if let Some(p) = pending.filter(|p| p.generation == self.generation) {
            let cleared = Pending { everything: None, bits: vec![0; p.bits.len()], ..p };
            baselines.set_source_state(&self.volume, &[(key, Some(encode(&cleared)))])?;
        }
        self.release()
    }

    /// Releases the snapshot (once). The pending sets stay: a failed cycle's
    /// changes are read again by the next one.
    pub fn release(&self) -> Result<(), SourceError> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.ctl.release(self.dev).map_err(kmod_err(&self.volume, Path::new(&self.snapshot.device_path), "release"))
    }
}

impl Drop for KmodCycle {
    fn drop(&mut self) {
        // A cycle that ended early (an error on the way) still lets go of the snapshot.
        if let Err(e) = self.release() {
            tracing::warn!(volume = %self.volume, error = %e, "cannot release the snapshot");
        }
    }
}

/// Why the recorded tracking state does not continue into `status`, if it does not.
///
/// The same tracking id means one unbroken line of tracking (a state store
/// carries it across reboots). The module's count may then be lower than the
/// recorded one: a bitmap restored from a state store starts at the count of
/// its last checkpoint, and holds every write since, which is more than
/// needed, never less. A higher count means a hand-over this node never saw.
fn continuity_lost(record: Option<&TrackRecord>, dev: DevId, status: &DeviceStatus) -> Option<String> {
    if status.handovers == u64::MAX {
        return Some("first cycle after attach".into());
    }
    let Some(r) = record else {
        return Some("the device was attached before this node tracked it".into());
    };
    if r.tracking_id != status.tracking_id {
        Some("tracking restarted (device re-attached, module reloaded, or a reboot without a usable state store)".into())
    } else if (r.dev_major, r.dev_minor) != (dev.major, dev.minor) {
        Some("the device number changed".into())
    } else if r.granularity_bytes != status.granularity_bytes || r.device_bytes != status.device_bytes {
        Some("the device was re-attached with another geometry".into())
    } else if r.store_failed && status.persist_error.is_none() {
        // Same id, store working again: restored from a store that missed writes.
        Some("the state store failed before a restart, so the tracking it restored may lack writes".into())
    } else if status.handovers > r.handovers {
        Some(format!("the module's hand-over count is {}, past the {} recorded (another client took a change bitmap, or a crash mid-cycle)", status.handovers, r.handovers))
    } else {
        None
    }
}

/// A target's pending set after a hand-over of `bitmap`.
fn merge_pending(old: Option<Pending>, bitmap: &ChangeBitmap, lost: Option<&str>, generation: u64) -> Pending {
    match (old, lost) {
        (_, Some(reason)) => Pending::everything(reason, bitmap, generation),
        (None, None) => Pending::everything("first cycle to this target", bitmap, generation),
        (Some(mut p), None) => {
            p.merge(bitmap, generation);
            p
        }
    }
}

/// What [`attach_at_boot`] did for one volume.
#[derive(Debug, Clone, Serialize)]
pub struct BootAttach {
    /// Volume name.
    pub volume: String,
    /// The tracked device.
    pub device: String,
    /// It was attached already (nothing done).
    pub already_attached: bool,
    /// What the module did with the state store's content: `none` (no state
    /// store), `fresh`, `clean`, `crash`, `written_before_attach`,
    /// `geometry`, `detached`, `no_iostat`.
    pub restore: String,
    /// Bits set in the restored bitmap.
    pub restored_bits: u64,
    /// Bytes those bits cover.
    pub restored_bytes: u64,
    /// Activity-log extents a crash left (reread whole).
    pub log_extents: u32,
}

/// Attaches `spec.device` now, with its state store, unless it is attached:
/// for early boot, before anything mounts or writes the device, so the
/// tracking saved at shutdown (or after a crash) carries on and the next
/// cycle reads only what changed. A cycle attaches by itself too, but a
/// filesystem mounted before that has written the device, so the module
/// would not restore. Blocking.
pub fn attach_at_boot(volume: &str, spec: &KmodSpec) -> Result<BootAttach, SourceError> {
    let device = spec.device.as_path();
    let ctl = Control::open().map_err(kmod_err(volume, device, "open"))?;
    let dev = device_number(volume, device)?;
    let status = ctl.status(dev).map_err(kmod_err(volume, device, "status"))?;
    let mut report = BootAttach {
        volume: volume.to_string(),
        device: device.display().to_string(),
        already_attached: status.attached,
        restore: String::new(),
        restored_bits: 0,
        restored_bytes: 0,
        log_extents: 0,
    };
    if status.attached {
        return Ok(report);
    }
    let attached = ctl.attach(device, None, spec.state_store.as_deref()).map_err(kmod_err(volume, device, "attach"))?;
    report.restore = attached.restore.name().to_string();
    report.restored_bits = attached.bits_set;
    report.restored_bytes = attached.bits_set * u64::from(attached.granularity_bytes);
    report.log_extents = attached.al_extents;
    Ok(report)
}

/// One tracked device, for `drmesh ctl agent-status`.
#[derive(Debug, Clone, Serialize)]
pub struct KmodDeviceReport {
    /// Volume name.
    pub volume: String,
    /// The tracked device.
    pub device: String,
    /// The COW store.
    pub cow_store: String,
    /// Tracked by the module now.
    pub attached: bool,
    /// The device was removed while attached.
    pub device_gone: bool,
    /// Bytes per bitmap bit.
    pub granularity_bytes: u32,
    /// Device size at attach.
    pub device_bytes: u64,
    /// Bytes one change bitmap takes in the kernel (two per device).
    pub bitmap_bytes: u64,
    /// Bits set in the live bitmap (blocks written since the last hand-over).
    pub bits_set: u64,
    /// Write-class requests seen since attach.
    pub writes_seen: u64,
    /// Hand-overs since attach.
    pub handovers: u64,
    /// `/dev/drmesh-snapN` while a cycle holds a snapshot.
    pub snapshot: Option<String>,
    /// The errno text that invalidated the snapshot.
    pub snapshot_error: Option<String>,
    /// COW store bytes used by the snapshot.
    pub cow_used_bytes: u64,
    /// COW store bytes for data.
    pub cow_total_bytes: u64,
    /// The state store that keeps the tracking across reboots, if any.
    pub state_store: Option<String>,
    /// The module keeps this device's tracking on the state store now.
    pub persistent: bool,
    /// The errno text of the state store's failure (tracking in memory only).
    pub persist_error: Option<String>,
    /// Extents in the state store's activity log (each one reread after a crash).
    pub log_extents: u32,
    /// Extents the activity log holds.
    pub log_slots: u32,
    /// Bytes one activity-log extent covers.
    pub log_extent_bytes: u64,
    /// The module's tracking id (hex): a new one means tracking restarted.
    pub tracking_id: String,
    /// Bits pending per target (changes not committed there yet); `None`: everything.
    pub pending_bits: Vec<(String, Option<u64>)>,
    /// Why the state could not be read, if it could not.
    pub error: Option<String>,
}

/// The module's view of `spec.device` and the pending change sets of `volume`. Blocking.
pub fn device_report(baselines: &Baselines, volume: &str, spec: &KmodSpec) -> KmodDeviceReport {
    let mut report = KmodDeviceReport {
        volume: volume.to_string(),
        device: spec.device.display().to_string(),
        cow_store: spec.cow_store.display().to_string(),
        attached: false,
        device_gone: false,
        granularity_bytes: 0,
        device_bytes: 0,
        bitmap_bytes: 0,
        bits_set: 0,
        writes_seen: 0,
        handovers: 0,
        snapshot: None,
        snapshot_error: None,
        cow_used_bytes: 0,
        cow_total_bytes: 0,
        state_store: spec.state_store.as_ref().map(|p| p.display().to_string()),
        persistent: false,
        persist_error: None,
        log_extents: 0,
        log_slots: 0,
        log_extent_bytes: LOG_EXTENT_BYTES,
        tracking_id: String::new(),
        pending_bits: Vec::new(),
        error: None,
    };
    for t in &spec.targets {
        if let Ok(Some(p)) = decode::<Pending>(baselines, volume, &pending_key(t)) {
            let bits = p.everything.is_none().then(|| p.as_bitmap().count_set());
            report.pending_bits.push((t.clone(), bits));
        }
    }
    let status = Control::open()
        .map_err(kmod_err(volume, &spec.device, "open"))
        .and_then(|ctl| Ok((ctl, device_number(volume, &spec.device)?)))
        .and_then(|(ctl, dev)| ctl.status(dev).map_err(kmod_err(volume, &spec.device, "status")));
    match status {
        Ok(st) => {
            let chunk = u64::from(st.granularity_bytes.max(SNAPSHOT_CHUNK_BYTES_MIN));
            report.attached = st.attached;
            report.device_gone = st.device_gone;
            report.granularity_bytes = st.granularity_bytes;
            report.device_bytes = st.device_bytes;
            report.bitmap_bytes = st.bitmap_bytes;
            report.bits_set = st.bits_set;
            report.writes_seen = st.writes_seen;
            report.handovers = st.handovers;
            report.snapshot = st.snapshot.then(|| format!("/dev/drmesh-snap{}", st.snap_index));
            report.snapshot_error = st.snapshot_error.map(|e| std::io::Error::from_raw_os_error(e).to_string());
            report.cow_used_bytes = st.cow_chunks_used * chunk;
            report.cow_total_bytes = st.cow_chunks_total * chunk;
            report.persistent = st.persistent;
            report.persist_error = st.persist_error.map(|e| std::io::Error::from_raw_os_error(e).to_string());
            report.log_extents = st.al_used;
            report.log_slots = st.al_slots;
            if st.attached {
                report.tracking_id = st.tracking_id.iter().map(|b| format!("{b:02x}")).collect();
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(bits: &[u64], gran: u32, device_bytes: u64) -> ChangeBitmap {
        let nbits = device_bytes.div_ceil(u64::from(gran));
        let mut bytes = vec![0u8; usize::try_from(nbits.div_ceil(8)).unwrap()];
        for &b in bits {
            bytes[usize::try_from(b / 8).unwrap()] |= 1 << (b % 8);
        }
        ChangeBitmap { bytes, granularity_bytes: gran, device_bytes }
    }

    #[test]
    fn changed_granules_map_to_the_blocks_that_hold_them() {
        // 4 KiB granules, 64 KiB blocks: 16 granules a block; a 1 MiB + 8 KiB device.
        let m = bitmap(&[0, 15, 16, 40, 41, 257], 4096, (1 << 20) + 8192);
        let blocks = blocks_of(&m, 65536);
        assert_eq!(blocks.len(), 17);
        assert_eq!((0..17).filter(|&i| blocks.contains(i)).collect::<Vec<_>>(), vec![0, 1, 2, 16]);
        // Granules larger than blocks mark every block they cover.
        let coarse = bitmap(&[1], 1 << 20, 4 << 20);
        let blocks = blocks_of(&coarse, 65536);
        assert_eq!((0..64).filter(|&i| blocks.contains(i)).collect::<Vec<_>>(), (16..32).collect::<Vec<_>>());
        assert_eq!(blocks_of(&bitmap(&[], 4096, 1 << 20), 65536).count(), 0);
    }

    #[test]
    fn pending_sets_accumulate_until_cleared_and_start_as_everything() {
        let first = merge_pending(None, &bitmap(&[1], 4096, 65536), None, 1);
        assert_eq!(first.everything.as_deref(), Some("first cycle to this target"));
        let cleared = Pending { everything: None, bits: vec![0; first.bits.len()], ..first };
        // Two hand-overs (a failed cycle, then the next one) both stay pending.
        let p = merge_pending(Some(cleared), &bitmap(&[1, 2], 4096, 65536), None, 2);
        let p = merge_pending(Some(p), &bitmap(&[9], 4096, 65536), None, 3);
        assert_eq!(p.everything, None);
        assert_eq!(p.as_bitmap().ranges(), vec![(4096, 8192), (36864, 4096)]);
        assert_eq!(p.generation, 3);
        // Lost continuity or another geometry means reading everything.
        let lost = merge_pending(Some(p.clone()), &bitmap(&[], 4096, 65536), Some("rebooted"), 4);
        assert_eq!(lost.everything.as_deref(), Some("rebooted"));
        let other = merge_pending(Some(p), &bitmap(&[], 8192, 65536), None, 4);
        assert!(other.everything.is_some());
    }

    fn status(handovers: u64) -> DeviceStatus {
        DeviceStatus {
            attached: true,
            device_gone: false,
            snapshot: false,
            snapshot_error: None,
            snap_index: 0,
            granularity_bytes: 4096,
            device_bytes: 1 << 20,
            bitmap_bytes: 32,
            bits_set: 0,
            writes_seen: 0,
            handovers,
            attached_count: 1,
            cow_chunks_used: 0,
            cow_chunks_total: 0,
            tracking_id: [7; 16],
            persistent: true,
            persist_error: None,
            al_used: 0,
            al_slots: 500,
            al_flushes: 0,
        }
    }

    #[test]
    fn continuity_needs_the_tracking_id_device_and_no_unseen_handover() {
        let dev = DevId { major: 254, minor: 16 };
        let r = TrackRecord { tracking_id: [7; 16], dev_major: 254, dev_minor: 16, granularity_bytes: 4096, device_bytes: 1 << 20, handovers: 5, generation: 3, store_failed: false };
        assert_eq!(continuity_lost(Some(&r), dev, &status(5)), None);
        // Restored from a state store's checkpoint before the last hand-over: more bits, none missing.
        assert_eq!(continuity_lost(Some(&r), dev, &status(4)), None);
        assert!(continuity_lost(Some(&r), dev, &status(6)).unwrap().contains("hand-over count"));
        let restarted = DeviceStatus { tracking_id: [8; 16], ..status(5) };
        assert!(continuity_lost(Some(&r), dev, &restarted).unwrap().contains("tracking restarted"));
        assert!(continuity_lost(Some(&r), DevId { major: 254, minor: 0 }, &status(5)).is_some());
        let regrown = DeviceStatus { device_bytes: 2 << 20, ..status(5) };
        assert!(continuity_lost(Some(&r), dev, &regrown).unwrap().contains("geometry"));
        assert!(continuity_lost(None, dev, &status(5)).is_some());
        assert_eq!(continuity_lost(Some(&r), dev, &status(u64::MAX)).as_deref(), Some("first cycle after attach"));
        // A state store that failed: fine while the module still tracks in
        // memory (the failure still reported), not once it was restored from.
        let failed = TrackRecord { store_failed: true, ..r.clone() };
        let still_failing = DeviceStatus { persist_error: Some(5), ..status(5) };
        assert_eq!(continuity_lost(Some(&failed), dev, &still_failing), None);
        assert!(continuity_lost(Some(&failed), dev, &status(5)).unwrap().contains("state store failed"));
    }

    #[test]
    fn state_round_trips_through_the_source_database() {
        let dir = tempfile::tempdir().unwrap();
        let b = Baselines::open(&dir.path().join("s.redb")).unwrap();
        let p = merge_pending(None, &bitmap(&[3], 4096, 65536), None, 7);
        b.set_source_state("v", &[(pending_key("t"), Some(encode(&p)))]).unwrap();
        assert_eq!(decode::<Pending>(&b, "v", &pending_key("t")).unwrap(), Some(p));
        assert_eq!(decode::<Pending>(&b, "v", &pending_key("u")).unwrap(), None);
        // An unreadable record counts as absent (a full read follows), not as an error.
        b.set_source_state("v", &[(TRACK_KEY.into(), Some(vec![0xff; 3]))]).unwrap();
        assert_eq!(decode::<TrackRecord>(&b, "v", TRACK_KEY).unwrap(), None);
    }
}
