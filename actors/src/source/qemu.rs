//! Point-in-time views of a VM's disk through qemu, without an agent in the
//! VM: what a proxy node does each cycle of a `qemu` volume. Talks QMP to
//! the qemu (or qemu-storage-daemon) that has the disk open, over a monitor
//! socket of its own (`-qmp unix:PATH,server=on,wait=off`).
//!
//! [`Fleece::take`], in one QMP transaction: a new persistent dirty bitmap
//! starts recording, the current one (the changes since the last committed
//! RP) stops, and a `blockdev-backup sync=none` job puts a copy-before-write
//! filter in front of the disk whose old blocks go to a temporary qcow2 (the
//! fleece) backed by the disk. The fleece, exported read-only over NBD with
//! the stopped bitmap as the meta context `qemu:dirty-bitmap:NAME`, is the
//! disk at that instant while the VM writes on. [`Fleece::commit`] (after the
//! target committed: promise 2) drops the stopped bitmap; [`Fleece::abandon`]
//! merges the new one into it and lets it record again, so a failed cycle
//! loses no change. Either way the export, the job, the fleece node and its
//! file go.
//!
//! A bitmap qemu marks inconsistent (qemu crashed while it was recording),
//! or none at all (a new volume, a raw disk after qemu restarted), gives
//! [`Fleece::dirty`] `None`: the cycle reads everything.
//!
//! Around the instant, qemu-guest-agent may freeze the guest's filesystems
//! ([`GuestFreeze`]); while the view lives, a watchdog keeps the fleece
//! from filling its folder (qemu would fail the VM's writes). [`QemuKind`]
//! is the `qemu` source kind built on all this (docs/agentless.md).

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drmesh_proto::nbd::client::StatusExtent;
use drmesh_proto::qmp::{QmpClient, QmpError, QmpEvent};
use serde_json::{json, Value};

use super::baseline::Baselines;
use super::change::{ChangeSource, Changes, PointInTime, ViewQuality};
use super::device::BlockDevice;
use super::fence::Fence;
use super::kmod::device_lock;
use super::nbd::{NbdDevice, NbdDeviceError};
use super::{BlockMask, SourceError};
use crate::proto::gossip::catalog::Consistency;

/// How long a QMP command or awaited event may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest agent may take to answer (it is not running while
/// the guest boots: the cycle then goes on crash consistent).
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a qemu view could not be taken or released.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The monitor socket could not be reached or read.
    #[error("{peer} at {socket}: {source}")]
    Io {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The monitor socket.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The monitor broke the protocol.
    #[error("{peer} at {socket}: {source}")]
    Protocol {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The monitor socket.
        socket: PathBuf,
        /// What it sent.
        source: QmpError,
    },
    /// qemu refused a command.
    #[error("{peer} at {socket}: {command} failed: {desc}")]
    Command {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The monitor socket.
        socket: PathBuf,
        /// The command.
        command: String,
        /// qemu's description.
        desc: String,
    },
    /// qemu does not have what the volume names.
    #[error("qemu monitor at {socket}: {what}")]
    Missing {
        /// The monitor socket.
        socket: PathBuf,
        /// What is missing ("no block node \"disk0\"").
        what: String,
    },
    /// Something awaited did not come in time.
    #[error("{peer} at {socket}: {what} did not come within {secs} s")]
    Timeout {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The monitor socket.
        socket: PathBuf,
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
    /// The view's NBD export could not be read.
    #[error(transparent)]
    Nbd(#[from] NbdDeviceError),
    /// A platform's volume whose lease this proxy does not hold (enough of).
    #[error("{0}")]
    Fenced(String),
    /// The folder of the fleece files (`fleece_dir`) cannot be used.
    #[error("fleece_dir {path}: {source}")]
    FleeceDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The `nbd` path holds something that is not a socket: qemu would
    /// delete it to listen there, so nothing is asked of qemu.
    #[error("nbd {path}: is {what}, not a socket; qemu deletes what is at that path to listen there, so it is left alone: name a socket path of its own (default: nbd.sock in fleece_dir)")]
    NbdPath {
        /// The path.
        path: PathBuf,
        /// What is there ("a regular file").
        what: &'static str,
    },
    /// `fleece_dir` has less free space than its reserve: no view is taken.
    #[error("fleece_dir {path} has {free_mib} MiB free, under its fleece_reserve of {reserve_mib} MiB: no view is taken, so that the VM's writes never fail for want of space (free space there, or lower fleece_reserve)")]
    FleeceFull {
        /// The folder.
        path: PathBuf,
        /// MiB free.
        free_mib: u64,
        /// The reserve, in MiB.
        reserve_mib: u64,
    },
    /// The fleece file could not be made or removed.
    #[error("the fleece file {path}: {source}")]
    Fleece {
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// One monitor (or guest agent) connection (blocking).
pub struct Qmp {
    peer: &'static str,
    socket: PathBuf,
    stream: UnixStream,
    core: QmpClient,
    /// How long a command or awaited event may take.
    timeout: Duration,
    /// Asynchronous events read while waiting for answers.
    events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects to a monitor and negotiates.
    pub fn connect(socket: &Path) -> Result<Qmp, QemuError> {
        Qmp::open("qemu monitor", socket, QmpClient::new(), QMP_TIMEOUT)
    }

    /// Connects to qemu-guest-agent (through the VM's virtio-serial channel
    /// that qemu exposes as a Unix socket) and syncs with it.
    pub fn guest_agent(socket: &Path) -> Result<Qmp, QemuError> {
        // Any id this connection alone is likely to use.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let id = (nanos ^ u64::from(std::process::id()).rotate_left(32)) & ((1 << 53) - 1);
        Qmp::open("qemu guest agent", socket, QmpClient::guest_agent(id), AGENT_TIMEOUT)
    }

    fn open(peer: &'static str, socket: &Path, core: QmpClient, timeout: Duration) -> Result<Qmp, QemuError> {
        let io = |source| QemuError::Io { peer, socket: socket.to_path_buf(), source };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(io)?;
        let mut qmp = Qmp { peer, socket: socket.to_path_buf(), stream, core, timeout, events: Vec::new() };
        qmp.until("its greeting (it serves one client at a time: is another one connected to this socket?)", |e| matches!(e, QmpEvent::Ready { .. }).then_some(()))?;
        Ok(qmp)
    }

    /// Runs the connection until `want` picks an event.
    fn until<T>(&mut self, what: &str, mut want: impl FnMut(&QmpEvent) -> Option<T>) -> Result<T, QemuError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if let Some(bytes) = self.core.poll_transmit() {
                self.stream.write_all(&bytes).map_err(|source| QemuError::Io { peer: self.peer, socket: self.socket.clone(), source })?;
            }
            while let Some(e) = self.core.poll_event() {
                if let Some(found) = want(&e) {
                    return Ok(found);
                }
                if let QmpEvent::Async { name, data } = e {
                    self.events.push((name, data));
                }
            }
            if let Some(e) = self.core.error() {
                return Err(QemuError::Protocol { peer: self.peer, socket: self.socket.clone(), source: e.clone() });
            }
            if Instant::now() > deadline {
                return Err(QemuError::Timeout { peer: self.peer, socket: self.socket.clone(), what: what.to_string(), secs: self.timeout.as_secs() });
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(QemuError::Io { peer: self.peer, socket: self.socket.clone(), source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed while waiting for {what}")) }),
                Ok(n) => self.core.handle_input(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
                Err(source) => return Err(QemuError::Io { peer: self.peer, socket: self.socket.clone(), source }),
            }
        }
    }

    /// Runs command `name` and returns what it returned.
    pub fn execute(&mut self, name: &str, arguments: Value) -> Result<Value, QemuError> {
        let id = self.core.execute(name, arguments);
        let answer = self.until(&format!("the answer to {name}"), |e| match e {
            QmpEvent::Return { id: got, value } if *got == id => Some(Ok(value.clone())),
            QmpEvent::Failed { id: got, desc, .. } if *got == id => Some(Err(desc.clone())),
            _ => None,
        })?;
        answer.map_err(|desc| QemuError::Command { peer: self.peer, socket: self.socket.clone(), command: name.to_string(), desc })
    }

    /// Waits for the asynchronous event `name` whose data `matches`.
    pub fn wait_event(&mut self, name: &str, matches: impl Fn(&Value) -> bool) -> Result<Value, QemuError> {
        if let Some(i) = self.events.iter().position(|(n, d)| n == name && matches(d)) {
            return Ok(self.events.remove(i).1);
        }
        self.until(&format!("the {name} event"), |e| match e {
            QmpEvent::Async { name: n, data } if n == name && matches(data) => Some(data.clone()),
            _ => None,
        })
    }
}

/// A dirty bitmap of drmesh's on the disk's node, as qemu reports it.
#[derive(Debug, Clone)]
struct Bitmap {
    name: String,
    recording: bool,
    inconsistent: bool,
}

/// The names drmesh gives its objects in qemu for one volume and target:
/// its two bitmaps readable (`drmesh:VOLUME:TARGET:a`), the job, fleece node
/// and export short (qemu allows node names of at most 31 bytes) and
/// distinct per volume and target (a hash of both).
struct Names {
    bitmaps: [String; 2],
    job: String,
    fleece: String,
    export: String,
}

impl Names {
    fn of(volume: &str, target: &str) -> Names {
        let hash = blake3::hash(format!("{volume}\0{target}").as_bytes()).to_hex();
        let id = format!("drmesh-{}", &hash[..16]);
        Names {
            bitmaps: [format!("drmesh:{volume}:{target}:a"), format!("drmesh:{volume}:{target}:b")],
            job: format!("{id}-j"),
            fleece: format!("{id}-f"),
            export: id,
        }
    }
}

/// Where the VM's disk is and where drmesh may work.
#[derive(Debug, Clone)]
pub struct QemuDisk {
    /// The monitor socket drmesh uses.
    pub qmp: PathBuf,
    /// The block node of the disk (its `node-name`, as `query-named-block-nodes` lists it).
    pub node: String,
    /// The Unix socket qemu's NBD server listens on (started there if it is not running).
    pub nbd: PathBuf,
    /// The volume's name and the target the cycle copies to: each target
    /// has bitmaps of its own (it names drmesh's bitmaps, job, node and export).
    pub volume: String,
    /// The target node's name.
    pub target: String,
    /// Every target of the volume (bitmaps of other targets are removed).
    pub targets: Vec<String>,
    /// A folder on this machine for the fleece file, which qemu can open;
    /// made 0700 when missing, and nobody else should write in it.
    pub work_dir: PathBuf,
    /// The Unix socket of the VM's qemu-guest-agent channel, when the
    /// guest's filesystems are to be frozen at the instant.
    pub guest_agent: Option<PathBuf>,
    /// Free bytes kept in `work_dir`'s filesystem: the view is dropped before the fleece takes them.
    pub reserve_bytes: u64,
    /// For a platform's volume: the lease its views change qemu under
    /// (none: the volume has one reader, nothing to fence).
    pub fence: Option<Fence>,
}

/// Bytes free for an unprivileged user in the filesystem of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Watches the free space of `fleece_dir` while a view lives. qemu's
/// copy-before-write fails the VM's own write when it cannot copy the old
/// block to the fleece (a full disk would make the VM's writes fail or
/// pause it), so before the fleece can take the filesystem below its
/// reserve, the watchdog cancels the view's backup job: the VM writes on
/// untouched, the view is no longer one instant, and the cycle fails
/// ([`Fleece::broken`]) with its changes kept for the next one.
struct Watchdog {
    stop: Arc<std::sync::atomic::AtomicBool>,
    broken: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(disk: &QemuDisk, job: String) -> Watchdog {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let broken = Arc::new(Mutex::new(None));
        let (s, b, disk) = (stop.clone(), broken.clone(), disk.clone());
        let thread = std::thread::Builder::new()
            .name("fleece-watchdog".into())
            .spawn(move || {
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let Ok(free) = free_bytes(&disk.work_dir) else { continue };
                    if free >= disk.reserve_bytes {
                        continue;
                    }
                    let mut why = format!(
                        "fleece_dir {} fell to {} MiB free, under its fleece_reserve of {} MiB: the view was dropped so that the VM's writes never fail (the VM wrote more during the cycle than the folder holds: give it more space)",
                        disk.work_dir.display(),
                        free >> 20,
                        disk.reserve_bytes >> 20
                    );
                    // A view whose lease is gone leaves the job alone: it may be another proxy's now.
                    let holds = || disk.fence.as_ref().is_none_or(Fence::holds);
                    if holds() {
                        let cancelled = Qmp::connect(&disk.qmp).and_then(|mut q| if holds() { q.execute("block-job-cancel", json!({ "device": job, "force": true })).map(drop) } else { Ok(()) });
                        if let Err(e) = cancelled {
                            why.push_str(&format!("; cancelling its job failed: {e}"));
                        }
                    }
                    tracing::warn!(volume = %disk.volume, target = %disk.target, reason = %why, "dropping the qemu view");
                    *b.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
                    return;
                }
            })
            .ok();
        Watchdog { stop, broken, thread }
    }

    /// Why the view was dropped, if it was.
    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the guest agent did around a view's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFreeze {
    /// No guest agent is set for the volume.
    NotAsked,
    /// The agent froze this many filesystems for the instant, then thawed them.
    Frozen(u64),
    /// Nothing was frozen, and why: the view is crash consistent.
    Failed(String),
}

/// Freezes the guest's filesystems through its agent at `socket`; the
/// connection to thaw them with when they are frozen.
pub(crate) fn freeze_guest(socket: &Path) -> (Option<Qmp>, GuestFreeze) {
    let mut agent = match Qmp::guest_agent(socket) {
        Ok(agent) => agent,
        Err(e) => return (None, GuestFreeze::Failed(format!("the guest agent did not answer ({e})"))),
    };
    // A freeze an earlier cycle left (its node killed between freeze and thaw) goes first.
    if agent.execute("guest-fsfreeze-status", Value::Null).is_ok_and(|v| v == "frozen") {
        tracing::warn!(agent = %socket.display(), "the guest's filesystems were left frozen by an earlier cycle: thawing them");
        let _ = agent.execute("guest-fsfreeze-thaw", Value::Null);
    }
    agent.timeout = super::freeze::FREEZE_LIMIT;
    match agent.execute("guest-fsfreeze-freeze", Value::Null) {
        Ok(count) => match count.as_u64() {
            Some(n) if n > 0 => (Some(agent), GuestFreeze::Frozen(n)),
            _ => (Some(agent), GuestFreeze::Failed("the guest agent froze no filesystem".into())),
        },
        Err(e) => {
            // Half-frozen or still freezing: thawed all the same.
            thaw_guest(socket, Some(agent));
            (None, GuestFreeze::Failed(format!("the guest agent could not freeze the filesystems ({e})")))
        }
    }
}

/// Thaws the guest's filesystems, on `agent` or a new connection, trying
/// three times: a guest left frozen stops writing.
pub(crate) fn thaw_guest(socket: &Path, agent: Option<Qmp>) {
    let mut agent = agent;
    for attempt in 1..=3 {
        let conn = match agent.take() {
            Some(a) => Ok(a),
            None => Qmp::guest_agent(socket),
        };
        let done = conn.and_then(|mut a| {
            a.timeout = super::freeze::FREEZE_LIMIT;
            a.execute("guest-fsfreeze-thaw", Value::Null)
        });
        match done {
            Ok(_) => return,
            Err(e) => tracing::warn!(agent = %socket.display(), attempt, error = %e, "cannot thaw the guest's filesystems"),
        }
    }
    tracing::error!(agent = %socket.display(), "the guest's filesystems may still be frozen: the next cycle thaws them, or run guest-fsfreeze-thaw through the agent");
}

/// One cycle's point-in-time view of a VM's disk.
pub struct Fleece {
    disk: QemuDisk,
    /// The bitmap that stopped at the view's instant (`None`: there was none to trust).
    stopped: Option<String>,
    /// The bitmap recording since the instant.
    recording: String,
    file: PathBuf,
    device: Option<std::sync::Arc<NbdDevice>>,
    dirty: Option<Vec<StatusExtent>>,
    why_everything: Option<String>,
    frozen: GuestFreeze,
    watchdog: Option<Watchdog>,
    released: bool,
}

/// A disk made ready for its instant: leftovers cleared, the bitmaps
/// chosen, the fleece node added; what remains is the transaction.
struct Prepared {
    disk: QemuDisk,
    names: Names,
    current: Option<String>,
    recording: String,
    file: PathBuf,
    why_everything: Option<String>,
    /// The transaction's actions for this disk.
    actions: Vec<Value>,
}

impl Prepared {
    /// Everything before the instant, on `qmp` (the disk's monitor).
    fn of(qmp: &mut Qmp, disk: &QemuDisk) -> Result<Prepared, QemuError> {
        let names = Names::of(&disk.volume, &disk.target);
        let NodeState { size, mut ours, persistent, stale } = node_state(qmp, &disk.node, &names, &disk.volume, &disk.targets)?;
        // A target the volume no longer has: its bitmaps would record forever.
        for name in stale {
            tracing::info!(volume = %disk.volume, bitmap = %name, "removing the dirty bitmap of a target the volume no longer has");
            qmp.execute("block-dirty-bitmap-remove", json!({ "node": disk.node, "name": name }))?;
        }
        // Leftovers of a cycle that was killed: its objects go; a stopped bitmap
        // takes back what its successor recorded (nothing is lost).
        let _ = qmp.execute("block-export-del", json!({ "id": names.export, "mode": "hard" }));
        if qmp.execute("block-job-cancel", json!({ "device": names.job, "force": true })).is_ok() {
            qmp.wait_event("BLOCK_JOB_CANCELLED", |d| d["device"] == names.job.as_str())?;
        }
        let _ = qmp.execute("blockdev-del", json!({ "node-name": names.fleece }));
        if let [a, b] = ours.clone().as_slice() {
            let (stopped, recording) = if a.recording { (b.clone(), a.clone()) } else { (a.clone(), b.clone()) };
            merge_back(qmp, &disk.node, &stopped.name, &recording.name)?;
            ours = vec![Bitmap { recording: true, ..stopped }];
        }
        let mut why_everything = None;
        let current = match ours.first() {
            Some(b) if b.inconsistent => {
                qmp.execute("block-dirty-bitmap-remove", json!({ "node": disk.node, "name": b.name }))?;
                why_everything = Some(format!("qemu marks dirty bitmap {} inconsistent (it stopped without saving it)", b.name));
                None
            }
            Some(b) => Some(b.name.clone()),
            None => {
                why_everything = Some("no dirty bitmap of drmesh's on the disk (a new volume; or qemu stopped before it ever closed the disk cleanly, which is when it stores bitmaps; or the disk is raw, whose bitmaps do not outlive qemu)".into());
                None
            }
        };
        let recording = names.bitmaps.iter().find(|n| Some(*n) != current.as_ref()).expect("two names").clone();

        // The fleece file: a qcow2 as large as the disk, backed by it in qemu.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&disk.work_dir).map_err(|source| QemuError::FleeceDir { path: disk.work_dir.clone(), source })?;
        check_work_dir(&disk.work_dir)?;
        let free = free_bytes(&disk.work_dir).map_err(|source| QemuError::FleeceDir { path: disk.work_dir.clone(), source })?;
        if free < disk.reserve_bytes {
            return Err(QemuError::FleeceFull { path: disk.work_dir.clone(), free_mib: free >> 20, reserve_mib: disk.reserve_bytes >> 20 });
        }
        let file = disk.work_dir.join(format!("{}.qcow2", names.fleece));
        // A leftover (or anything planted at the name, a symlink too) goes;
        // the file is then made here, exclusively, before qemu-img fills it.
        let _ = std::fs::remove_file(&file);
        let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file).map_err(|source| QemuError::Fleece { path: file.clone(), source })?;
        // qemu opens it as the user it runs as (the monitor socket's owner, as qemu made it).
        if let Ok(monitor) = std::fs::metadata(&disk.qmp) {
            std::os::unix::fs::fchown(&made, Some(monitor.uid()), Some(monitor.gid())).map_err(|source| QemuError::Fleece { path: file.clone(), source })?;
        }
        drop(made);
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg(size.to_string())
            .output()
            .map_err(|source| QemuError::Fleece { path: file.clone(), source })?;
        if !made.status.success() {
            return Err(QemuError::Fleece { path: file, source: std::io::Error::other(String::from_utf8_lossy(&made.stderr).trim().to_string()) });
        }
        qmp.execute("blockdev-add", json!({ "driver": "qcow2", "node-name": names.fleece, "file": { "driver": "file", "filename": file }, "backing": disk.node }))?;

        let mut actions = vec![json!({ "type": "block-dirty-bitmap-add", "data": { "node": disk.node, "name": recording, "persistent": persistent } })];
        if let Some(current) = &current {
            actions.push(json!({ "type": "block-dirty-bitmap-disable", "data": { "node": disk.node, "name": current } }));
        }
        actions.push(json!({ "type": "blockdev-backup", "data": { "job-id": names.job, "device": disk.node, "target": names.fleece, "sync": "none" } }));
        Ok(Prepared { disk: disk.clone(), names, current, recording, file, why_everything, actions })
    }

    /// Undoes [`Prepared::of`] when the instant failed: the fleece node and file go.
    fn undo(self, qmp: &mut Qmp) {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": self.names.fleece }));
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Fleece {
    /// Takes the view (see the module's doc). Blocking.
    pub fn take(disk: &QemuDisk) -> Result<Fleece, QemuError> {
        let mut taken = Fleece::take_together(std::slice::from_ref(disk))?;
        Ok(taken.pop().expect("one view per disk"))
    }

    /// Takes the views of `disks`, which share one monitor (one VM, or one
    /// qemu-storage-daemon), in one transaction: one instant for all of them
    /// (a consistency group of a VM's disks). Each guest agent named is asked
    /// to freeze its guest once, around the transaction. Blocking. An error
    /// leaves no view; what was recorded stays for the next cycle.
    pub fn take_together(disks: &[QemuDisk]) -> Result<Vec<Fleece>, QemuError> {
        let Some(first) = disks.first() else { return Ok(Vec::new()) };
        for disk in disks {
            check_nbd_path(&disk.nbd)?;
        }
        let fenced = || -> Result<(), QemuError> {
            for fence in disks.iter().filter_map(|d| d.fence.as_ref()) {
                fence.may_take().map_err(QemuError::Fenced)?;
            }
            Ok(())
        };
        fenced()?;
        let mut qmp = Qmp::connect(&first.qmp)?;
        // The monitor may have kept this waiting (it serves one client at a time).
        fenced()?;
        let mut prepared: Vec<Prepared> = Vec::with_capacity(disks.len());
        for disk in disks {
            match Prepared::of(&mut qmp, disk) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    for p in prepared {
                        p.undo(&mut qmp);
                    }
                    return Err(e);
                }
            }
        }

        // The instant, with each guest frozen around it (once per agent).
        let actions: Vec<Value> = prepared.iter().flat_map(|p| p.actions.iter().cloned()).collect();
        let mut agents: Vec<(PathBuf, Option<Qmp>, GuestFreeze)> = Vec::new();
        for socket in disks.iter().filter_map(|d| d.guest_agent.as_ref()) {
            if agents.iter().any(|(s, _, _)| s == socket) {
                continue;
            }
            // Frozen already by the consistency group being opened (and thawed by it), or not to be tried again.
            let (agent, frozen) = match super::group::held(socket) {
                Some(Ok(n)) => (None, GuestFreeze::Frozen(n)),
                Some(Err(why)) => (None, GuestFreeze::Failed(why)),
                None => freeze_guest(socket),
            };
            agents.push((socket.clone(), agent, frozen));
        }
        let instant = fenced().and_then(|()| qmp.execute("transaction", json!({ "actions": actions })));
        let mut frozen_of = Vec::with_capacity(agents.len());
        for (socket, agent, frozen) in agents {
            if let Some(agent) = agent {
                thaw_guest(&socket, Some(agent));
            }
            frozen_of.push((socket, frozen));
        }
        if let Err(e) = instant {
            for p in prepared {
                p.undo(&mut qmp);
            }
            return Err(e);
        }
        let mut fleeces: Vec<Fleece> = Vec::with_capacity(prepared.len());
        let mut failed = None;
        for p in prepared {
            let frozen = match &p.disk.guest_agent {
                Some(socket) => frozen_of.iter().find(|(s, _)| s == socket).map_or(GuestFreeze::NotAsked, |(_, f)| f.clone()),
                None => GuestFreeze::NotAsked,
            };
            let mut fleece = Fleece { disk: p.disk, stopped: p.current, recording: p.recording, file: p.file, device: None, dirty: None, why_everything: p.why_everything, frozen, watchdog: None, released: false };
            if failed.is_none() {
                if let Err(e) = fleece.export(&mut qmp, &p.names) {
                    failed = Some(e);
                }
            }
            // A fleece that is not exported is released below with the others.
            fleeces.push(fleece);
        }
        if let Some(e) = failed {
            for mut fleece in fleeces {
                let _ = fleece.release(&mut qmp, false);
            }
            return Err(e);
        }
        drop(qmp);
        // Started once this thread is done with the monitor (the watchdog takes the monitor to cancel).
        for fleece in &mut fleeces {
            let job = Names::of(&fleece.disk.volume, &fleece.disk.target).job;
            fleece.watchdog = Some(Watchdog::start(&fleece.disk, job));
        }
        Ok(fleeces)
    }

    /// Exports the fleece and reads the stopped bitmap's extents.
    fn export(&mut self, qmp: &mut Qmp, names: &Names) -> Result<(), QemuError> {
        match qmp.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": self.disk.nbd } } })) {
            Ok(_) => {}
            Err(QemuError::Command { desc, .. }) if desc.contains("already running") => {}
            Err(e) => return Err(e),
        }
        let bitmaps: Vec<&String> = self.stopped.iter().collect();
        qmp.execute("block-export-add", json!({ "type": "nbd", "id": names.export, "node-name": names.fleece, "name": names.export, "writable": false, "bitmaps": bitmaps }))?;
        let context = self.stopped.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
        let contexts: Vec<&str> = context.iter().map(String::as_str).collect();
        let device = NbdDevice::connect(&self.disk.nbd, &names.export, &contexts)?;
        if let Some(context) = &context {
            let size = super::device::BlockDevice::size(&device);
            let extents = device.block_status(0, size, context)?;
            self.dirty = Some(extents.into_iter().filter(|x| x.flags & 1 != 0).collect());
        }
        self.device = Some(std::sync::Arc::new(device));
        Ok(())
    }

    /// The disk at the view's instant.
    pub fn device(&self) -> std::sync::Arc<NbdDevice> {
        self.device.clone().expect("exported by take")
    }

    /// The byte ranges written since the last committed RP, when a bitmap
    /// says so; `None`: read everything ([`Fleece::why_everything`] says why).
    pub fn dirty(&self) -> Option<&[StatusExtent]> {
        self.dirty.as_deref()
    }

    /// Why the view is no longer its instant, if it is not (its
    /// copy-before-write was dropped to keep `fleece_dir` from filling).
    pub fn broken(&self) -> Option<String> {
        self.watchdog.as_ref().and_then(Watchdog::broken)
    }

    /// What the guest agent did at the instant.
    pub fn frozen(&self) -> &GuestFreeze {
        &self.frozen
    }

    /// Why everything must be read, when it must.
    pub fn why_everything(&self) -> Option<&str> {
        self.why_everything.as_deref()
    }

    /// The target committed the RP of this view: the changes up to its
    /// instant are consumed. Releases the view.
    pub fn commit(mut self) -> Result<(), QemuError> {
        self.stop_watchdog();
        if self.forget_if_fenced() {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&self.disk.qmp)?;
        // The monitor may have kept this waiting (one client at a time).
        if self.forget_if_fenced() {
            return Ok(());
        }
        self.release(&mut qmp, true)
    }

    /// The cycle failed: the changes since the last committed RP stay
    /// recorded. Releases the view.
    pub fn abandon(mut self) -> Result<(), QemuError> {
        self.stop_watchdog();
        if self.forget_if_fenced() {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&self.disk.qmp)?;
        // The monitor may have kept this waiting (one client at a time).
        if self.forget_if_fenced() {
            return Ok(());
        }
        self.release(&mut qmp, false)
    }

    /// A platform's view whose lease is (nearly) gone is left in qemu as
    /// it is: another proxy may hold the lease now and have objects of the
    /// same names there, and its next view cleans up what this one left
    /// (as after a crash: nothing recorded is lost). Returns whether it was.
    fn forget_if_fenced(&mut self) -> bool {
        if self.disk.fence.as_ref().is_none_or(Fence::holds) {
            return false;
        }
        tracing::warn!(volume = %self.disk.volume, target = %self.disk.target, "the volume's lease is gone: its qemu view is left for the next reader to clean up, not released from here");
        self.device = None;
        self.released = true;
        true
    }

    /// Stops the watchdog, before this thread takes the monitor: a monitor
    /// serves one client at a time, and a watchdog waiting for it while
    /// this thread holds it and waits for the watchdog would stall both.
    fn stop_watchdog(&mut self) {
        if let Some(w) = self.watchdog.as_mut() {
            w.stop();
        }
    }

    fn release(&mut self, qmp: &mut Qmp, committed: bool) -> Result<(), QemuError> {
        let names = Names::of(&self.disk.volume, &self.disk.target);
        self.stop_watchdog();
        self.device = None;
        if qmp.execute("block-export-del", json!({ "id": names.export, "mode": "hard" })).is_ok() {
            qmp.wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == names.export.as_str())?;
        }
        if qmp.execute("block-job-cancel", json!({ "device": names.job, "force": true })).is_ok() {
            qmp.wait_event("BLOCK_JOB_CANCELLED", |d| d["device"] == names.job.as_str())?;
        }
        qmp.execute("blockdev-del", json!({ "node-name": names.fleece }))?;
        let _ = std::fs::remove_file(&self.file);
        if let Some(stopped) = &self.stopped {
            if committed {
                qmp.execute("block-dirty-bitmap-remove", json!({ "node": self.disk.node, "name": stopped }))?;
            } else {
                merge_back(qmp, &self.disk.node, stopped, &self.recording)?;
            }
        } else if !committed {
            // Nothing to fall back on: the next cycle reads everything again.
            qmp.execute("block-dirty-bitmap-remove", json!({ "node": self.disk.node, "name": self.recording }))?;
        }
        self.released = true;
        Ok(())
    }
}

impl Drop for Fleece {
    fn drop(&mut self) {
        if !self.released {
            // Neither committed nor abandoned (a panic, a lost thread): keep the changes.
            self.stop_watchdog();
            if self.forget_if_fenced() {
                return;
            }
            if let Ok(mut qmp) = Qmp::connect(&self.disk.qmp) {
                if self.forget_if_fenced() {
                    return;
                }
                let _ = self.release(&mut qmp, false);
            }
        }
    }
}

/// The fleece folder must be a folder that only its owner may change: a
/// file planted in it could otherwise take the fleece's place.
fn check_work_dir(dir: &Path) -> Result<(), QemuError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| QemuError::FleeceDir { path: dir.to_path_buf(), source })?;
    let refuse = |why: &str| Err(QemuError::FleeceDir { path: dir.to_path_buf(), source: std::io::Error::other(why.to_string()) });
    if !meta.is_dir() {
        return refuse("is not a folder (fleece_dir names a folder of its own, not a symlink or a file)");
    }
    if meta.mode() & 0o022 != 0 {
        return refuse("is writable by other users; make it 0700 (chmod 700), or name a folder of drmesh's own");
    }
    Ok(())
}

/// qemu's NBD server replaces whatever is at its socket path (it unlinks it
/// first): only a socket, or nothing, may be there.
fn check_nbd_path(path: &Path) -> Result<(), QemuError> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let t = meta.file_type();
    let what = if t.is_socket() {
        return Ok(());
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    };
    Err(QemuError::NbdPath { path: path.to_path_buf(), what })
}

/// The stopped bitmap takes back what `recording` recorded and records
/// again; `recording` goes.
fn merge_back(qmp: &mut Qmp, node: &str, stopped: &str, recording: &str) -> Result<(), QemuError> {
    qmp.execute(
        "transaction",
        json!({ "actions": [
            { "type": "block-dirty-bitmap-enable", "data": { "node": node, "name": stopped } },
            { "type": "block-dirty-bitmap-merge", "data": { "node": node, "target": stopped, "bitmaps": [recording] } },
            { "type": "block-dirty-bitmap-remove", "data": { "node": node, "name": recording } },
        ] }),
    )?;
    Ok(())
}

/// What a disk node holds of drmesh's.
struct NodeState {
    /// The disk's size in bytes.
    size: u64,
    /// The bitmaps of this volume and target.
    ours: Vec<Bitmap>,
    /// Whether its format stores bitmaps (qcow2; a raw disk's live only as long as qemu).
    persistent: bool,
    /// Bitmaps of this volume for targets it no longer has.
    stale: Vec<String>,
}

/// The state of `node` for the volume and target `names` are of, the
/// volume's targets being `targets`.
fn node_state(qmp: &mut Qmp, node: &str, names: &Names, volume: &str, targets: &[String]) -> Result<NodeState, QemuError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let found = nodes.as_array().and_then(|a| a.iter().find(|n| n["node-name"] == node));
    let Some(found) = found else {
        return Err(QemuError::Missing { socket: qmp.socket.clone(), what: format!("no block node {node:?} (query-named-block-nodes lists the node names)") });
    };
    let size = found["image"]["virtual-size"].as_u64().unwrap_or(0);
    if size == 0 {
        return Err(QemuError::Missing { socket: qmp.socket.clone(), what: format!("block node {node:?} has no size") });
    }
    let all: Vec<&Value> = found["dirty-bitmaps"].as_array().map(|l| l.iter().collect()).unwrap_or_default();
    let ours = all
        .iter()
        .filter(|b| names.bitmaps.iter().any(|n| b["name"] == n.as_str()))
        .map(|b| Bitmap {
            name: b["name"].as_str().unwrap_or_default().to_string(),
            recording: b["recording"].as_bool().unwrap_or(false),
            inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
        })
        .collect();
    // Volume and node names hold no ':', so "drmesh:VOLUME:TARGET:x" splits one way only.
    let prefix = format!("drmesh:{volume}:");
    let stale = all
        .iter()
        .filter_map(|b| b["name"].as_str())
        .filter(|n| n.strip_prefix(&prefix).and_then(|rest| rest.rsplit_once(':')).is_some_and(|(t, _)| !targets.iter().any(|k| k == t)))
        .map(str::to_string)
        .collect();
    Ok(NodeState { size, ours, persistent: found["drv"] == "qcow2", stale })
}

/// Kind `qemu`: a VM disk a running qemu (or qemu-storage-daemon) has
/// open, on a proxy node: each cycle reads a [`Fleece`] of it, only the
/// blocks its dirty bitmap marks when it has one to trust.
#[derive(Debug, Clone)]
pub struct QemuKind {
    /// The monitor socket.
    pub monitor: PathBuf,
    /// The disk's block node.
    pub node: String,
    /// Where qemu writes the fleece file.
    pub fleece_dir: PathBuf,
    /// qemu's NBD server socket.
    pub nbd: PathBuf,
    /// The guest agent's socket, if the guest's filesystems are frozen.
    pub guest_agent: Option<PathBuf>,
    /// Free bytes kept in `fleece_dir`'s filesystem.
    pub fleece_reserve_bytes: u64,
    /// The volume's targets.
    pub targets: Vec<String>,
    /// For a platform's volume: the lease its views change qemu under.
    pub fence: Option<Fence>,
}

impl ChangeSource for QemuKind {
    fn kind(&self) -> &'static str {
        "qemu"
    }
    fn volume_path(&self) -> &Path {
        &self.monitor
    }
    fn turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        // One view of a disk at a time, whatever the target: a second
        // copy-before-write filter on the node would see the first's writes.
        Some(device_lock(&self.monitor.join(&self.node)))
    }
    fn hold_points(&self) -> Vec<super::group::HoldPoint> {
        self.guest_agent.iter().cloned().map(super::group::HoldPoint::Guest).collect()
    }
    fn as_qemu(&self) -> Option<&QemuKind> {
        Some(self)
    }
    fn open(&self, _baselines: &Baselines, volume: &str, target: &str, block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError> {
        let fleece = Fleece::take(&self.disk(volume, target)).map_err(|source| SourceError::Qemu { volume: volume.to_string(), source })?;
        Ok(self.view_of(fleece, volume, target, block_bytes))
    }
}

impl QemuKind {
    /// The disk of `volume`'s cycle towards `target`.
    fn disk(&self, volume: &str, target: &str) -> QemuDisk {
        QemuDisk {
            qmp: self.monitor.clone(),
            node: self.node.clone(),
            nbd: self.nbd.clone(),
            volume: volume.to_string(),
            target: target.to_string(),
            targets: self.targets.clone(),
            work_dir: self.fleece_dir.clone(),
            guest_agent: self.guest_agent.clone(),
            reserve_bytes: self.fleece_reserve_bytes,
            fence: self.fence.clone(),
        }
    }

    /// The cycle's view of `volume` through `fleece`.
    fn view_of(&self, fleece: Fleece, volume: &str, target: &str, block_bytes: u32) -> Box<dyn PointInTime> {
        let device = fleece.device();
        let blocks = device.size().div_ceil(u64::from(block_bytes));
        let changes = match fleece.dirty() {
            Some(dirty) => Changes::Blocks(Arc::new(blocks_of(dirty, block_bytes, blocks))),
            None => Changes::Everything(fleece.why_everything().unwrap_or("no bitmap to trust").to_string()),
        };
        let view = format!("qemu fleece of block node {} (monitor {})", self.node, self.monitor.display());
        let (consistency, how) = match fleece.frozen() {
            GuestFreeze::Frozen(n) => (Consistency::FileSystem, format!("{view}, the guest's {n} filesystem(s) frozen at the instant by its agent")),
            GuestFreeze::NotAsked => (Consistency::Crash, format!("{view} at the instant (no guest agent set: its filesystems were not frozen)")),
            GuestFreeze::Failed(why) => {
                tracing::warn!(%volume, reason = %why, "the guest's filesystems were not frozen: the RP is crash consistent");
                (Consistency::Crash, format!("{view} at the instant; the guest's filesystems were not frozen: {why}"))
            }
        };
        match &changes {
            Changes::Blocks(mask) => tracing::info!(%volume, %target, node = %self.node, dirty_blocks = mask.count(), "took a qemu view: its bitmap marks the changed blocks"),
            _ => tracing::info!(%volume, %target, node = %self.node, reason = fleece.why_everything().unwrap_or_default(), "took a qemu view: everything is read"),
        }
        Box::new(QemuView { volume: volume.to_string(), device, changes, quality: ViewQuality { consistency, how }, fleece: Mutex::new(Some(fleece)) })
    }
}

/// The views of several `qemu` volumes that share one monitor (`members`:
/// each kind with its volume name), towards `target`, taken in one qemu
/// transaction: one instant for all of them. Blocking. The error names the
/// members; no view is left.
pub fn open_together(members: &[(&QemuKind, &str)], target: &str, block_bytes: u32) -> Result<Vec<Box<dyn PointInTime>>, SourceError> {
    let disks: Vec<QemuDisk> = members.iter().map(|(kind, volume)| kind.disk(volume, target)).collect();
    let names: Vec<&str> = members.iter().map(|(_, v)| *v).collect();
    let fleeces = Fleece::take_together(&disks).map_err(|source| SourceError::Qemu { volume: names.join(", "), source })?;
    Ok(members.iter().zip(fleeces).map(|((kind, volume), fleece)| kind.view_of(fleece, volume, target, block_bytes)).collect())
}

/// The blocks of `block_bytes` that the byte ranges `dirty` touch.
fn blocks_of(dirty: &[StatusExtent], block_bytes: u32, blocks: u64) -> BlockMask {
    let bs = u64::from(block_bytes);
    let mut mask = BlockMask::new(blocks);
    for x in dirty.iter().filter(|x| x.len > 0 && blocks > 0) {
        // Clamped to the disk: a server's answer never makes the loop longer than it.
        let last = (x.offset.saturating_add(x.len - 1) / bs).min(blocks - 1);
        for index in x.offset / bs..=last {
            mask.insert(index);
        }
    }
    mask
}

/// One cycle's view of a `qemu` volume.
struct QemuView {
    volume: String,
    device: Arc<NbdDevice>,
    changes: Changes,
    quality: ViewQuality,
    /// Until committed or released.
    fleece: Mutex<Option<Fleece>>,
}

impl QemuView {
    fn finish(&self, commit: bool) -> Result<(), SourceError> {
        let fleece = self.fleece.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(fleece) = fleece else { return Ok(()) };
        let done = if commit { fleece.commit() } else { fleece.abandon() };
        done.map_err(|source| SourceError::Qemu { volume: self.volume.clone(), source })
    }
}

impl PointInTime for QemuView {
    fn quality(&self) -> ViewQuality {
        self.quality.clone()
    }
    fn device(&self) -> Result<Arc<dyn BlockDevice>, SourceError> {
        Ok(self.device.clone())
    }
    fn changes(&self) -> Changes {
        self.changes.clone()
    }
    fn check(&self) -> Result<(), SourceError> {
        let fleece = self.fleece.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match fleece.as_ref().and_then(Fleece::broken) {
            Some(reason) => Err(SourceError::SnapshotInvalid { volume: self.volume.clone(), reason }),
            None => Ok(()),
        }
    }
    fn committed(&self, _baselines: &Baselines) -> Result<(), SourceError> {
        self.finish(true)
    }
    fn release(&self) -> Result<(), SourceError> {
        self.finish(false)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::source::device::BlockDevice;
    use crate::test_util::{run, wait_for, Daemon};

    /// qemu-storage-daemon with the qcow2 `image` (raw if named `*.raw`) as block node "disk0",
    /// its monitor at `qmp`.
    fn storage_daemon(image: &Path, qmp: &Path) -> Daemon {
        let daemon = Daemon(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
                .arg("--blockdev")
                .arg(format!("driver={},node-name=disk0,file=file0", if image.extension().is_some_and(|e| e == "raw") { "raw" } else { "qcow2" }))
                .arg("--chardev")
                .arg(format!("socket,id=mon,path={},server=on,wait=off", qmp.display()))
                .args(["--monitor", "chardev=mon"])
                .spawn()
                .expect("qemu-storage-daemon (scripts/install-deps installs qemu-utils)"),
        );
        wait_for(qmp);
        daemon
    }

    /// qemu-storage-daemon on `image` in `dir`, with "the VM": a writable
    /// NBD export of the disk node; and volume vm1's disk to target dst.
    fn running_disk(dir: &Path, image: &Path) -> (Daemon, QemuDisk) {
        let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
        let daemon = storage_daemon(image, &qmp);
        let mut mon = Qmp::connect(&qmp).unwrap();
        mon.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": nbd } } })).unwrap();
        mon.execute("block-export-add", json!({ "type": "nbd", "id": "disk", "node-name": "disk0", "name": "disk", "writable": true })).unwrap();
        let disk = QemuDisk { fence: None, qmp, node: "disk0".into(), nbd, volume: "vm1".into(), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.join("work"), guest_agent: None, reserve_bytes: 0 };
        (daemon, disk)
    }

    /// The VM's writes: through a writable NBD export of the disk node, as a
    /// guest's would go through its virtual disk.
    fn write(nbd: &Path, pattern: u8, offset: u64, len: u64) {
        let uri = format!("nbd+unix:///disk?socket={}", nbd.display());
        run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {pattern} {offset} {len}"), &uri]));
    }

    fn read(device: &NbdDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            done += device.read_at(&mut buf[done..], offset + done as u64).unwrap();
        }
        buf
    }

    fn spans(dirty: Option<&[StatusExtent]>) -> Vec<(u64, u64)> {
        dirty.expect("a bitmap").iter().map(|x| (x.offset, x.len)).collect()
    }

    #[test]
    fn views_of_a_running_disk_are_instants_and_its_bitmap_follows_commits_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("64M"));
        let (daemon, disk) = running_disk(dir.path(), &image);
        let (qmp, nbd) = (disk.qmp.clone(), disk.nbd.clone());
        write(&nbd, 0x41, 0, 1 << 20);
        // A symlink planted at the fleece file's name is not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::fs::create_dir(&disk.work_dir).unwrap();
        std::os::unix::fs::symlink(&victim, disk.work_dir.join(format!("{}.qcow2", Names::of("vm1", "dst").fleece))).unwrap();

        // 1: no bitmap yet, everything is read; the view stays the instant while the VM writes.
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(view.dirty().is_none());
        assert!(view.why_everything().unwrap().contains("no dirty bitmap"), "{:?}", view.why_everything());
        write(&nbd, 0x42, 0, 64 << 10);
        write(&nbd, 0x43, 4 << 20, 64 << 10);
        let device = view.device();
        assert_eq!(device.size(), 64 << 20);
        assert!(read(&device, 0, 1 << 20).iter().all(|&b| b == 0x41), "the view changed under the VM's writes");
        assert!(read(&device, 4 << 20, 64 << 10).iter().all(|&b| b == 0));
        drop(device);
        view.commit().unwrap();

        // 2: the bitmap holds exactly what the VM wrote since the first instant.
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(0, 64 << 10), (4 << 20, 64 << 10)]);
        assert!(read(&view.device(), 0, 64 << 10).iter().all(|&b| b == 0x42));
        write(&nbd, 0x44, 8 << 20, 64 << 10);
        // The cycle fails: nothing recorded is lost.
        view.abandon().unwrap();

        // 3: the abandoned changes and the new ones.
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(0, 64 << 10), (4 << 20, 64 << 10), (8 << 20, 64 << 10)]);
        assert!(read(&view.device(), 8 << 20, 64 << 10).iter().all(|&b| b == 0x44));
        view.commit().unwrap();

        // 4: a view dropped without commit or abandon (a panicking cycle) keeps the changes too.
        write(&nbd, 0x45, 12 << 20, 64 << 10);
        drop(Fleece::take(&disk).unwrap());
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(12 << 20, 64 << 10)]);
        view.commit().unwrap();

        // Nothing of drmesh's is left in qemu but one recording bitmap; the fleece file is gone.
        let mut mon = Qmp::connect(&qmp).unwrap();
        assert_eq!(mon.execute("query-block-jobs", Value::Null).unwrap(), json!([]));
        let nodes = mon.execute("query-named-block-nodes", json!({ "flat": true })).unwrap();
        assert!(!nodes.to_string().contains(&Names::of("vm1", "dst").fleece), "the fleece node is left");
        let ours = node_state(&mut mon, "disk0", &Names::of("vm1", "dst"), "vm1", &["dst".into()]).unwrap().ours;
        assert!(matches!(&ours[..], [b] if b.recording), "{ours:?}");
        assert!(std::fs::read_dir(dir.path().join("work")).unwrap().next().is_none(), "the fleece file is left");
        drop(mon);
        drop(daemon);
    }

    /// A platform's view changes qemu only under its lease: none is taken
    /// without it, and one whose lease ran out is left in qemu as it is;
    /// the next view (the next reader's) cleans it up and loses no change.
    #[test]
    fn a_fenced_view_is_taken_under_the_lease_and_left_alone_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        let (_daemon, disk) = running_disk(dir.path(), &image);
        Fleece::take(&disk).unwrap().commit().unwrap();
        let fence = Fence::new();
        let fenced = QemuDisk { fence: Some(fence.clone()), ..disk.clone() };
        let ttl = Duration::from_secs(8);
        let refused = Fleece::take(&fenced).err().expect("no view without the lease");
        assert!(refused.to_string().contains("no view is taken"), "{refused}");
        fence.set(Some(Instant::now() + ttl), ttl);
        let view = Fleece::take(&fenced).unwrap();
        write(&disk.nbd, 0x51, 2 << 20, 64 << 10);
        // The lease runs out while the view lives: releasing it touches nothing in qemu.
        fence.set(Some(Instant::now() + Duration::from_millis(500)), ttl);
        view.abandon().unwrap();
        let mut mon = Qmp::connect(&disk.qmp).unwrap();
        let exports = mon.execute("query-block-exports", json!({})).unwrap();
        let names = Names::of("vm1", "dst");
        assert!(exports.as_array().unwrap().iter().any(|e| e["id"] == names.export.as_str()), "the view's export was removed: {exports}");
        drop(mon);
        // The next reader's view cleans up and still sees the write made under the old one.
        let next = Fleece::take(&disk).unwrap();
        assert_eq!(spans(next.dirty()), vec![(2 << 20, 64 << 10)]);
        next.commit().unwrap();
        let mut mon = Qmp::connect(&disk.qmp).unwrap();
        let exports = mon.execute("query-block-exports", json!({})).unwrap();
        assert!(!exports.as_array().unwrap().iter().any(|e| e["id"] == names.export.as_str()), "{exports}");
    }

    #[test]
    fn dirty_ranges_mark_every_block_they_touch() {
        let x = |offset, len| StatusExtent { offset, len, flags: 1 };
        let mask = blocks_of(&[x(0, 1), x(3 << 20, 2 << 20), x((8 << 20) - 1, 2), x(9 << 20, 0)], 1 << 20, 10);
        let marked: Vec<u64> = (0..10).filter(|&i| mask.contains(i)).collect();
        assert_eq!(marked, [0, 3, 4, 7, 8]);
        // A range past the end (a disk that grew) marks nothing outside the mask.
        assert_eq!(blocks_of(&[x(20 << 20, 1 << 20)], 1 << 20, 10).count(), 0);
        assert_eq!(blocks_of(&[x(0, u64::MAX)], 1 << 20, 10).count(), 10);
    }

    /// Two disks of one "VM" (one qemu-storage-daemon) while a writer puts
    /// each number first on disk 0, then on disk 1: every pair of views
    /// taken in one transaction holds the same number on both disks, or on
    /// disk 0 the one after; each disk's bitmap then follows its own writes.
    #[test]
    fn the_disks_of_one_monitor_are_taken_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (qmp, nbd) = (dir.path().join("qmp.sock"), dir.path().join("nbd.sock"));
        let mut args = Vec::new();
        for i in 0..2 {
            let image = dir.path().join(format!("d{i}.qcow2"));
            run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
            args.extend([
                "--blockdev".to_string(),
                format!("driver=file,node-name=file{i},filename={}", image.display()),
                "--blockdev".to_string(),
                format!("driver=qcow2,node-name=disk{i},file=file{i}"),
            ]);
        }
        let daemon = Daemon(
            Command::new("qemu-storage-daemon")
                .args(&args)
                .arg("--chardev")
                .arg(format!("socket,id=mon,path={},server=on,wait=off", qmp.display()))
                .args(["--monitor", "chardev=mon"])
                .spawn()
                .expect("qemu-storage-daemon (scripts/install-deps installs qemu-utils)"),
        );
        wait_for(&qmp);
        {
            let mut mon = Qmp::connect(&qmp).unwrap();
            mon.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": nbd } } })).unwrap();
            for i in 0..2 {
                mon.execute("block-export-add", json!({ "type": "nbd", "id": format!("w{i}"), "node-name": format!("disk{i}"), "name": format!("w{i}"), "writable": true })).unwrap();
            }
        }
        let disks: Vec<QemuDisk> = (0..2)
            .map(|i| QemuDisk { fence: None, qmp: qmp.clone(), node: format!("disk{i}"), nbd: nbd.clone(), volume: format!("vm1-d{i}"), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.path().join("work"), guest_agent: None, reserve_bytes: 0 })
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, socket) = (stop.clone(), nbd.clone());
        let writer = std::thread::spawn(move || {
            let mut n = 0u8;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                n = n.wrapping_add(1).max(1);
                for i in 0..2 {
                    let uri = format!("nbd+unix:///w{i}?socket={}", socket.display());
                    run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {n} 0 4096"), &uri]));
                }
            }
            n
        });
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(150));
            let views = Fleece::take_together(&disks).unwrap();
            assert_eq!(views.len(), 2);
            let (a, b) = (read(&views[0].device(), 0, 1)[0], read(&views[1].device(), 0, 1)[0]);
            eprintln!("round {round}: disk 0 holds {a}, disk 1 holds {b}");
            assert!(a == b || a == b.wrapping_add(1).max(1), "not one instant: disk 0 holds {a}, disk 1 holds {b}");
            if round > 0 {
                for v in &views {
                    // The bitmap's granularity is 64 KiB.
                    assert_eq!(spans(v.dirty()), vec![(0, 65536)], "each disk's bitmap holds its own writes");
                }
            }
            for v in views {
                v.commit().unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
        // One disk that cannot be prepared leaves no view of the other.
        let mut bad = disks.clone();
        bad[1].node = "missing".into();
        assert!(Fleece::take_together(&bad).is_err());
        let mut mon = Qmp::connect(&qmp).unwrap();
        let nodes = mon.execute("query-named-block-nodes", json!({ "flat": true })).unwrap();
        assert!(!nodes.to_string().contains(&Names::of("vm1-d0", "dst").fleece), "the first disk's fleece is left");
        drop(mon);
        drop(daemon);
    }

    #[test]
    fn a_raw_disk_has_bitmaps_while_qemu_runs_and_none_after() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.raw");
        std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
        let (daemon, disk) = running_disk(dir.path(), &image);
        let (qmp, nbd) = (disk.qmp.clone(), disk.nbd.clone());
        Fleece::take(&disk).unwrap().commit().unwrap();
        write(&nbd, 0x41, 1 << 20, 64 << 10);
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(1 << 20, 64 << 10)]);
        view.commit().unwrap();
        drop(daemon);
        let _ = std::fs::remove_file(&qmp);
        let _daemon = storage_daemon(&image, &qmp);
        let view = Fleece::take(&disk).unwrap();
        assert!(view.dirty().is_none() && view.why_everything().unwrap().contains("no dirty bitmap"), "{:?}", view.why_everything());
        view.commit().unwrap();
    }

    #[test]
    fn bitmaps_of_a_target_the_volume_no_longer_has_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        let (_daemon, disk) = running_disk(dir.path(), &image);
        let both = vec!["dst".to_string(), "old".to_string()];
        let old = QemuDisk { fence: None, target: "old".into(), targets: both.clone(), ..disk.clone() };
        Fleece::take(&old).unwrap().commit().unwrap();
        Fleece::take(&QemuDisk { fence: None, targets: both, ..disk.clone() }).unwrap().commit().unwrap();
        let names = |mon: &mut Qmp| -> Vec<String> {
            let nodes = mon.execute("query-named-block-nodes", json!({ "flat": true })).unwrap();
            let node = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap().clone();
            node["dirty-bitmaps"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect()
        };
        let mut mon = Qmp::connect(&disk.qmp).unwrap();
        let mut before = names(&mut mon);
        before.sort();
        assert_eq!(before.len(), 2, "{before:?}");
        assert!(before[0].starts_with("drmesh:vm1:dst:") && before[1].starts_with("drmesh:vm1:old:"), "{before:?}");
        // "old" left the volume's targets: its bitmap goes at dst's next cycle; others' stay.
        mon.execute("block-dirty-bitmap-add", json!({ "node": "disk0", "name": "drmesh:vm10:old:a" })).unwrap();
        mon.execute("block-dirty-bitmap-add", json!({ "node": "disk0", "name": "backup-tool" })).unwrap();
        // (A monitor serves one client at a time.)
        drop(mon);
        Fleece::take(&disk).unwrap().commit().unwrap();
        let after = names(&mut Qmp::connect(&disk.qmp).unwrap());
        assert!(after.iter().all(|n| !n.starts_with("drmesh:vm1:old:")), "{after:?}");
        assert!(after.iter().any(|n| n == "drmesh:vm10:old:a") && after.iter().any(|n| n == "backup-tool"), "{after:?}");
        assert!(after.iter().any(|n| n.starts_with("drmesh:vm1:dst:")), "{after:?}");
    }

    #[test]
    fn a_fleece_dir_others_may_write_or_that_is_not_a_folder_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_work_dir(&open).unwrap_err().to_string();
        assert_eq!(e, format!("fleece_dir {}: is writable by other users; make it 0700 (chmod 700), or name a folder of drmesh's own", open.display()));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_work_dir(&file).unwrap_err().to_string().contains("is not a folder"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(check_work_dir(&link).unwrap_err().to_string().contains("is not a folder"));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_work_dir(&open).unwrap();
    }

    #[test]
    fn a_missing_node_or_monitor_says_what() {
        let dir = tempfile::tempdir().unwrap();
        let disk = QemuDisk { fence: None, qmp: dir.path().join("none.sock"), node: "disk0".into(), nbd: dir.path().join("nbd.sock"), volume: "vm1".into(), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.path().join("work"), guest_agent: None, reserve_bytes: 0 };
        let e = Fleece::take(&disk).err().unwrap().to_string();
        assert!(e.starts_with(&format!("qemu monitor at {}: ", disk.qmp.display())), "{e}");
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        let qmp = dir.path().join("qmp.sock");
        let _daemon = storage_daemon(&image, &qmp);
        let disk = QemuDisk { fence: None, qmp, node: "vda".into(), ..disk };
        let e = Fleece::take(&disk).err().unwrap().to_string();
        assert!(e.ends_with("no block node \"vda\" (query-named-block-nodes lists the node names)"), "{e}");
    }
}
