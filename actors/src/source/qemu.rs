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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drmesh_proto::nbd::client::StatusExtent;
use drmesh_proto::qmp::{QmpClient, QmpError, QmpEvent};
use drmesh_topology::{FleeceGuard, QemuSocket, QemuTls};
use serde_json::{json, Value};

use super::baseline::Baselines;
use super::change::{ChangeSource, Changes, PointInTime, ViewQuality};
use super::device::BlockDevice;
use super::fence::Fence;
use super::kmod::device_lock;
use super::nbd::{NbdDevice, NbdDeviceError};
use super::qemu_socket::{socket_key, QemuStream, QemuTlsClient, QemuTlsError};
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
        /// The socket.
        socket: QemuSocket,
        /// The cause.
        source: std::io::Error,
    },
    /// The monitor broke the protocol.
    #[error("{peer} at {socket}: {source}")]
    Protocol {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The socket.
        socket: QemuSocket,
        /// What it sent.
        source: QmpError,
    },
    /// qemu refused a command.
    #[error("{peer} at {socket}: {command} failed: {desc}")]
    Command {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The socket.
        socket: QemuSocket,
        /// The command.
        command: String,
        /// qemu's description.
        desc: String,
    },
    /// qemu does not have what the volume names.
    #[error("qemu monitor at {socket}: {what}")]
    Missing {
        /// The socket.
        socket: QemuSocket,
        /// What is missing ("no block node \"disk0\"").
        what: String,
    },
    /// Something awaited did not come in time.
    #[error("{peer} at {socket}: {what} did not come within {secs} s")]
    Timeout {
        /// Who: "qemu monitor" or "qemu guest agent".
        peer: &'static str,
        /// The socket.
        socket: QemuSocket,
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
    /// The view's NBD export could not be read.
    #[error(transparent)]
    Nbd(#[from] NbdDeviceError),
    /// The TLS credentials for a monitor over TCP cannot be used.
    #[error(transparent)]
    Tls(#[from] QemuTlsError),
    /// qemu has no TLS credentials object to start its NBD server with.
    #[error("qemu monitor at {socket}: {what}")]
    TlsObject {
        /// The monitor.
        socket: QemuSocket,
        /// What is wrong ("no tls-creds-x509 object with endpoint=server").
        what: String,
    },
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
    socket: QemuSocket,
    stream: QemuStream,
    core: QmpClient,
    /// How long a command or awaited event may take.
    timeout: Duration,
    /// Asynchronous events read while waiting for answers.
    events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects to a monitor (over TCP with `tls`) and negotiates.
    pub fn connect(socket: &QemuSocket, tls: Option<&QemuTlsClient>) -> Result<Qmp, QemuError> {
        Qmp::open("qemu monitor", socket, tls, QmpClient::new(), QMP_TIMEOUT)
    }

    /// Connects to qemu-guest-agent (through the VM's virtio-serial channel
    /// that qemu exposes as a socket) and syncs with it.
    pub fn guest_agent(agent: &GuestAgent) -> Result<Qmp, QemuError> {
        let tls = agent.tls.as_ref().map(QemuTlsClient::load).transpose()?;
        // Any id this connection alone is likely to use.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let id = (nanos ^ u64::from(std::process::id()).rotate_left(32)) & ((1 << 53) - 1);
        Qmp::open("qemu guest agent", &agent.socket, tls.as_ref(), QmpClient::guest_agent(id), AGENT_TIMEOUT)
    }

    fn open(peer: &'static str, socket: &QemuSocket, tls: Option<&QemuTlsClient>, core: QmpClient, timeout: Duration) -> Result<Qmp, QemuError> {
        let io = |source| QemuError::Io { peer, socket: socket.clone(), source };
        let stream = QemuStream::connect(socket, tls).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(io)?;
        let mut qmp = Qmp { peer, socket: socket.clone(), stream, core, timeout, events: Vec::new() };
        let greeting = if peer == "qemu guest agent" {
            "its answer to guest-sync-delimited (is qemu-guest-agent running in the guest?)"
        } else if socket.is_tcp() {
            "its greeting (after the TLS handshake qemu closes the connection when its CA did not sign this node's client-cert.pem; and it serves one client at a time: is another one connected?)"
        } else {
            "its greeting (it serves one client at a time: is another one connected to this socket?)"
        };
        qmp.until(greeting, |e| matches!(e, QmpEvent::Ready { .. }).then_some(()))?;
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
    /// The fleece file's own node, when qemu makes the file (a monitor over TCP).
    fleece_file: String,
    /// The job that makes (and empties) the fleece file then.
    create: String,
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
            fleece_file: format!("{id}-ff"),
            create: format!("{id}-c"),
            export: id,
        }
    }
}

/// A VM's qemu-guest-agent channel, as qemu exposes it (a chardev socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAgent {
    /// The socket.
    pub socket: QemuSocket,
    /// TLS when it is over TCP.
    pub tls: Option<QemuTls>,
}

/// Where the VM's disk is and where drmesh may work.
#[derive(Debug, Clone)]
pub struct QemuDisk {
    /// The monitor drmesh uses.
    pub qmp: QemuSocket,
    /// This node's TLS credentials, for sockets over TCP.
    pub tls: Option<QemuTlsClient>,
    /// The block node of the disk (its `node-name`, as `query-named-block-nodes` lists it).
    pub node: String,
    /// The socket qemu's NBD server listens on (started there if it is not running).
    pub nbd: QemuSocket,
    /// The volume's name and the target the cycle copies to: each target
    /// has bitmaps of its own (it names drmesh's bitmaps, job, node and export).
    pub volume: String,
    /// The target node's name.
    pub target: String,
    /// Every target of the volume (bitmaps of other targets are removed).
    pub targets: Vec<String>,
    /// The folder of the fleece file, which qemu can open. For a monitor
    /// on this machine made 0700 when missing (nobody else should write in
    /// it); for one over TCP a folder on the monitor's machine, where qemu
    /// makes the file itself.
    pub work_dir: PathBuf,
    /// The VM's qemu-guest-agent channel, when the guest's filesystems
    /// are to be frozen at the instant.
    pub guest_agent: Option<GuestAgent>,
    /// How the fleece is kept from filling `work_dir`: the view is dropped first.
    pub guard: FleeceGuard,
    /// For a platform's volume: the lease its views change qemu under
    /// (none: the volume has one reader, nothing to fence).
    pub fence: Option<Fence>,
}

impl QemuDisk {
    /// A connection to the disk's monitor.
    pub fn monitor(&self) -> Result<Qmp, QemuError> {
        Qmp::connect(&self.qmp, self.tls.as_ref())
    }
}

/// Bytes free for an unprivileged user in the filesystem of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Watches a view's fleece while it lives. qemu's copy-before-write fails
/// the VM's own write when it cannot copy the old block to the fleece (a
/// full disk would make the VM's writes fail or pause it), so before the
/// fleece can fill its folder the watchdog cancels the view's backup job:
/// the VM writes on untouched, the view is no longer one instant, and the
/// cycle fails ([`Fleece::broken`]) with its changes kept for the next one.
/// With a monitor on this machine it watches `fleece_dir`'s free space
/// (every 200 ms); over TCP, the fleece's size as qemu reports it (every
/// second, on a connection of its own).
struct Watchdog {
    stop: Arc<std::sync::atomic::AtomicBool>,
    broken: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(disk: &QemuDisk, names: &Names) -> Watchdog {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let broken = Arc::new(Mutex::new(None));
        let (s, b, disk) = (stop.clone(), broken.clone(), disk.clone());
        let (job, fleece) = (names.job.clone(), names.fleece.clone());
        let thread = std::thread::Builder::new()
            .name("fleece-watchdog".into())
            .spawn(move || {
                let every = match disk.guard {
                    FleeceGuard::Reserve(_) => Duration::from_millis(200),
                    FleeceGuard::Max(_) => Duration::from_secs(1),
                };
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(every);
                    if s.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Some(mut why) = over_its_bound(&disk, &fleece) else { continue };
                    // A view whose lease is gone leaves the job alone: it may be another proxy's now.
                    let holds = || disk.fence.as_ref().is_none_or(Fence::holds);
                    if holds() {
                        let cancelled = disk.monitor().and_then(|mut q| if holds() { q.execute("block-job-cancel", json!({ "device": job, "force": true })).map(drop) } else { Ok(()) });
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

/// Freezes the guest's filesystems through its agent `guest`; the
/// connection to thaw them with when they are frozen.
pub(crate) fn freeze_guest(guest: &GuestAgent) -> (Option<Qmp>, GuestFreeze) {
    let mut agent = match Qmp::guest_agent(guest) {
        Ok(agent) => agent,
        Err(e) => return (None, GuestFreeze::Failed(format!("the guest agent did not answer ({e})"))),
    };
    // A freeze an earlier cycle left (its node killed between freeze and thaw) goes first.
    if agent.execute("guest-fsfreeze-status", Value::Null).is_ok_and(|v| v == "frozen") {
        tracing::warn!(agent = %guest.socket, "the guest's filesystems were left frozen by an earlier cycle: thawing them");
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
            thaw_guest(guest, Some(agent));
            (None, GuestFreeze::Failed(format!("the guest agent could not freeze the filesystems ({e})")))
        }
    }
}

/// Thaws the guest's filesystems, on `agent` or a new connection, trying
/// three times: a guest left frozen stops writing.
pub(crate) fn thaw_guest(guest: &GuestAgent, agent: Option<Qmp>) {
    let mut agent = agent;
    for attempt in 1..=3 {
        let conn = match agent.take() {
            Some(a) => Ok(a),
            None => Qmp::guest_agent(guest),
        };
        let done = conn.and_then(|mut a| {
            a.timeout = super::freeze::FREEZE_LIMIT;
            a.execute("guest-fsfreeze-thaw", Value::Null)
        });
        match done {
            Ok(_) => return,
            Err(e) => tracing::warn!(agent = %guest.socket, attempt, error = %e, "cannot thaw the guest's filesystems"),
        }
    }
    tracing::error!(agent = %guest.socket, "the guest's filesystems may still be frozen: the next cycle thaws them, or run guest-fsfreeze-thaw through the agent");
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
        if disk.qmp.is_tcp() {
            let _ = qmp.execute("blockdev-del", json!({ "node-name": names.fleece_file }));
        }
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
        let file = disk.work_dir.join(format!("{}.qcow2", names.fleece));
        match disk.guard {
            FleeceGuard::Reserve(reserve) => make_local_fleece(disk, &file, size, reserve)?,
            FleeceGuard::Max(_) => make_remote_fleece(qmp, &names, &file, size)?,
        }
        let file_node = if disk.qmp.is_tcp() { json!(names.fleece_file) } else { json!({ "driver": "file", "filename": file }) };
        if let Err(e) = qmp.execute("blockdev-add", json!({ "driver": "qcow2", "node-name": names.fleece, "file": file_node, "backing": disk.node })) {
            drop_fleece_file(qmp, disk, &names, &file);
            return Err(e);
        }

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
        drop_fleece_file(qmp, &self.disk, &self.names, &self.file);
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
            if let QemuSocket::Unix(path) = &disk.nbd {
                check_nbd_path(path)?;
            }
        }
        let fenced = || -> Result<(), QemuError> {
            for fence in disks.iter().filter_map(|d| d.fence.as_ref()) {
                fence.may_take().map_err(QemuError::Fenced)?;
            }
            Ok(())
        };
        fenced()?;
        let mut qmp = first.monitor()?;
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
        let mut agents: Vec<(GuestAgent, Option<Qmp>, GuestFreeze)> = Vec::new();
        for guest in disks.iter().filter_map(|d| d.guest_agent.as_ref()) {
            if agents.iter().any(|(g, _, _)| g == guest) {
                continue;
            }
            // Frozen already by the consistency group being opened (and thawed by it), or not to be tried again.
            let (agent, frozen) = match super::group::held(&socket_key(&guest.socket)) {
                Some(Ok(n)) => (None, GuestFreeze::Frozen(n)),
                Some(Err(why)) => (None, GuestFreeze::Failed(why)),
                None => freeze_guest(guest),
            };
            agents.push((guest.clone(), agent, frozen));
        }
        let instant = fenced().and_then(|()| qmp.execute("transaction", json!({ "actions": actions })));
        let mut frozen_of = Vec::with_capacity(agents.len());
        for (guest, agent, frozen) in agents {
            if let Some(agent) = agent {
                thaw_guest(&guest, Some(agent));
            }
            frozen_of.push((guest, frozen));
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
            let names = Names::of(&fleece.disk.volume, &fleece.disk.target);
            fleece.watchdog = Some(Watchdog::start(&fleece.disk, &names));
        }
        Ok(fleeces)
    }

    /// Exports the fleece and reads the stopped bitmap's extents.
    fn export(&mut self, qmp: &mut Qmp, names: &Names) -> Result<(), QemuError> {
        let start = match &self.disk.nbd {
            QemuSocket::Unix(path) => json!({ "addr": { "type": "unix", "data": { "path": path } } }),
            QemuSocket::Tcp { host, port } => {
                let object = tls_object(qmp, self.disk.tls.as_ref())?;
                json!({ "addr": { "type": "inet", "data": { "host": host, "port": port.to_string() } }, "tls-creds": object })
            }
        };
        match qmp.execute("nbd-server-start", start) {
            Ok(_) => {}
            Err(QemuError::Command { desc, .. }) if desc.contains("already running") => {}
            Err(e) => return Err(e),
        }
        let bitmaps: Vec<&String> = self.stopped.iter().collect();
        qmp.execute("block-export-add", json!({ "type": "nbd", "id": names.export, "node-name": names.fleece, "name": names.export, "writable": false, "bitmaps": bitmaps }))?;
        let context = self.stopped.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
        let contexts: Vec<&str> = context.iter().map(String::as_str).collect();
        let device = NbdDevice::connect(&self.disk.nbd, self.disk.tls.as_ref(), &names.export, &contexts)?;
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
        let mut qmp = self.disk.monitor()?;
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
        let mut qmp = self.disk.monitor()?;
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
        drop_fleece_file(qmp, &self.disk, &names, &self.file);
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
            if let Ok(mut qmp) = self.disk.monitor() {
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

/// Why the fleece of `disk` (its node `fleece`) must go now, if it must:
/// its folder below its reserve, or the fleece above its maximum.
fn over_its_bound(disk: &QemuDisk, fleece: &str) -> Option<String> {
    match disk.guard {
        FleeceGuard::Reserve(reserve) => {
            let free = free_bytes(&disk.work_dir).ok()?;
            (free < reserve).then(|| {
                format!(
                    "fleece_dir {} fell to {} MiB free, under its fleece_reserve of {} MiB: the view was dropped so that the VM's writes never fail (the VM wrote more during the cycle than the folder holds: give it more space)",
                    disk.work_dir.display(),
                    free >> 20,
                    reserve >> 20
                )
            })
        }
        FleeceGuard::Max(max) => {
            // A monitor busy with another client answers late; the next look catches up.
            let taken = disk.monitor().and_then(|mut q| fleece_bytes(&mut q, fleece)).ok()??;
            (taken > max).then(|| {
                format!(
                    "the fleece of block node {} took {} MiB in {} on the monitor's machine, over its fleece_max of {} MiB: the view was dropped so that the fleece never fills that folder (the VM wrote more during the cycle: raise fleece_max where the folder has room)",
                    disk.node,
                    taken >> 20,
                    disk.work_dir.display(),
                    max >> 20
                )
            })
        }
    }
}

/// The bytes the fleece node `fleece`'s file takes, as qemu reports it.
fn fleece_bytes(qmp: &mut Qmp, fleece: &str) -> Result<Option<u64>, QemuError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    Ok(nodes.as_array().and_then(|l| l.iter().find(|n| n["node-name"] == fleece)).and_then(|n| n["image"]["actual-size"].as_u64()))
}

/// The fleece file on this machine: made here exclusively (whatever was
/// planted at the name goes first), owned by qemu's user, filled by qemu-img.
fn make_local_fleece(disk: &QemuDisk, file: &Path, size: u64, reserve: u64) -> Result<(), QemuError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&disk.work_dir).map_err(|source| QemuError::FleeceDir { path: disk.work_dir.clone(), source })?;
    check_work_dir(&disk.work_dir)?;
    let free = free_bytes(&disk.work_dir).map_err(|source| QemuError::FleeceDir { path: disk.work_dir.clone(), source })?;
    if free < reserve {
        return Err(QemuError::FleeceFull { path: disk.work_dir.clone(), free_mib: free >> 20, reserve_mib: reserve >> 20 });
    }
    // A leftover (or anything planted at the name, a symlink too) goes;
    // the file is then made here, exclusively, before qemu-img fills it.
    let _ = std::fs::remove_file(file);
    let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file).map_err(|source| QemuError::Fleece { path: file.to_path_buf(), source })?;
    // qemu opens it as the user it runs as (the monitor socket's owner, as qemu made it).
    if let QemuSocket::Unix(monitor) = &disk.qmp {
        if let Ok(monitor) = std::fs::metadata(monitor) {
            std::os::unix::fs::fchown(&made, Some(monitor.uid()), Some(monitor.gid())).map_err(|source| QemuError::Fleece { path: file.to_path_buf(), source })?;
        }
    }
    drop(made);
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(file)
        .arg(size.to_string())
        .output()
        .map_err(|source| QemuError::Fleece { path: file.to_path_buf(), source })?;
    if !made.status.success() {
        let _ = std::fs::remove_file(file);
        return Err(QemuError::Fleece { path: file.to_path_buf(), source: std::io::Error::other(String::from_utf8_lossy(&made.stderr).trim().to_string()) });
    }
    Ok(())
}

/// The fleece file on the monitor's machine, which this node cannot
/// reach: qemu makes it (`blockdev-create`, which empties a leftover of the
/// same name), its file node added as `names.fleece_file`.
fn make_remote_fleece(qmp: &mut Qmp, names: &Names, file: &Path, size: u64) -> Result<(), QemuError> {
    create_blockdev(qmp, &names.create, json!({ "driver": "file", "filename": file, "size": 0 }))?;
    qmp.execute("blockdev-add", json!({ "driver": "file", "node-name": names.fleece_file, "filename": file }))?;
    if let Err(e) = create_blockdev(qmp, &names.create, json!({ "driver": "qcow2", "file": names.fleece_file, "size": size })) {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": names.fleece_file }));
        return Err(e);
    }
    Ok(())
}

/// The fleece file goes once its qcow2 node is gone: removed here, or on
/// the monitor's machine (where qemu can make files but not remove them)
/// its node deleted and the file emptied to 0 bytes, to be made again by
/// the next view.
fn drop_fleece_file(qmp: &mut Qmp, disk: &QemuDisk, names: &Names, file: &Path) {
    if !disk.qmp.is_tcp() {
        let _ = std::fs::remove_file(file);
        return;
    }
    let _ = qmp.execute("blockdev-del", json!({ "node-name": names.fleece_file }));
    if let Err(e) = create_blockdev(qmp, &names.create, json!({ "driver": "file", "filename": file, "size": 0 })) {
        tracing::warn!(volume = %disk.volume, file = %file.display(), error = %e, "the fleece file on the monitor's machine could not be emptied; the next view empties it");
    }
}

/// Runs `blockdev-create` of `options` as job `job` and waits for its end.
fn create_blockdev(qmp: &mut Qmp, job: &str, options: Value) -> Result<(), QemuError> {
    // A job of that name a killed cycle left concluded goes first.
    let _ = qmp.execute("job-dismiss", json!({ "id": job }));
    qmp.execute("blockdev-create", json!({ "job-id": job, "options": options }))?;
    qmp.wait_event("JOB_STATUS_CHANGE", |d| d["id"] == job && d["status"] == "concluded")?;
    let jobs = qmp.execute("query-jobs", Value::Null)?;
    let error = jobs.as_array().and_then(|l| l.iter().find(|j| j["id"] == job)).and_then(|j| j["error"].as_str().map(str::to_string));
    qmp.execute("job-dismiss", json!({ "id": job }))?;
    match error {
        Some(desc) => Err(QemuError::Command { peer: qmp.peer, socket: qmp.socket.clone(), command: "blockdev-create".into(), desc }),
        None => Ok(()),
    }
}

/// The id of qemu's TLS credentials object for its NBD server: the one
/// the topology names, else the one server-side `tls-creds-x509` object.
fn tls_object(qmp: &mut Qmp, tls: Option<&QemuTlsClient>) -> Result<String, QemuError> {
    if let Some(object) = tls.and_then(QemuTlsClient::object) {
        return Ok(object.to_string());
    }
    let listed = qmp.execute("qom-list", json!({ "path": "/objects" }))?;
    let mut servers = Vec::new();
    for o in listed.as_array().into_iter().flatten().filter(|o| o["type"] == "child<tls-creds-x509>") {
        let Some(id) = o["name"].as_str() else { continue };
        if qmp.execute("qom-get", json!({ "path": format!("/objects/{id}"), "property": "endpoint" }))? == "server" {
            servers.push(id.to_string());
        }
    }
    match servers.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(QemuError::TlsObject { socket: qmp.socket.clone(), what: "qemu has no tls-creds-x509 object with endpoint=server to start its NBD server with TLS (add one with object-add, or start qemu with -object tls-creds-x509,id=...,endpoint=server,dir=...)".into() }),
        many => Err(QemuError::TlsObject { socket: qmp.socket.clone(), what: format!("qemu has {} server-side tls-creds-x509 objects ({}): name the one for its NBD server with the volume's `tls_object`", many.len(), many.join(", ")) }),
    }
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
    /// The monitor.
    pub monitor: QemuSocket,
    /// The monitor as a path (itself, or `/tcp:HOST:PORT`), for locks and
    /// for what names the volume ([`ChangeSource::volume_path`]).
    pub monitor_key: PathBuf,
    /// The disk's block node.
    pub node: String,
    /// Where qemu writes the fleece file.
    pub fleece_dir: PathBuf,
    /// qemu's NBD server.
    pub nbd: QemuSocket,
    /// The guest agent's socket, if the guest's filesystems are frozen.
    pub guest_agent: Option<QemuSocket>,
    /// How the fleece is kept from filling `fleece_dir`.
    pub fleece_guard: FleeceGuard,
    /// TLS for sockets over TCP.
    pub tls: Option<QemuTls>,
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
        &self.monitor_key
    }
    fn turn(&self) -> Option<Arc<tokio::sync::Mutex<()>>> {
        // One view of a disk at a time, whatever the target: a second
        // copy-before-write filter on the node would see the first's writes.
        Some(device_lock(&self.monitor_key.join(&self.node)))
    }
    fn hold_points(&self) -> Vec<super::group::HoldPoint> {
        self.guest_agent().into_iter().map(super::group::HoldPoint::Guest).collect()
    }
    fn as_qemu(&self) -> Option<&QemuKind> {
        Some(self)
    }
    fn open(&self, _baselines: &Baselines, volume: &str, target: &str, block_bytes: u32) -> Result<Box<dyn PointInTime>, SourceError> {
        let fleece = self.disk(volume, target).and_then(|disk| Fleece::take(&disk)).map_err(|source| SourceError::Qemu { volume: volume.to_string(), source })?;
        Ok(self.view_of(fleece, volume, target, block_bytes))
    }
}

impl QemuKind {
    /// The disk of `volume`'s cycle towards `target` (the TLS credentials
    /// read anew each cycle: renewed certificates are taken up).
    fn disk(&self, volume: &str, target: &str) -> Result<QemuDisk, QemuError> {
        Ok(QemuDisk {
            qmp: self.monitor.clone(),
            tls: self.tls.as_ref().map(QemuTlsClient::load).transpose()?,
            node: self.node.clone(),
            nbd: self.nbd.clone(),
            volume: volume.to_string(),
            target: target.to_string(),
            targets: self.targets.clone(),
            work_dir: self.fleece_dir.clone(),
            guest_agent: self.guest_agent(),
            guard: self.fleece_guard,
            fence: self.fence.clone(),
        })
    }

    /// The guest agent, if the guest's filesystems are frozen.
    fn guest_agent(&self) -> Option<GuestAgent> {
        self.guest_agent.clone().map(|socket| GuestAgent { socket, tls: self.tls.clone() })
    }

    /// The cycle's view of `volume` through `fleece`.
    fn view_of(&self, fleece: Fleece, volume: &str, target: &str, block_bytes: u32) -> Box<dyn PointInTime> {
        let device = fleece.device();
        let blocks = device.size().div_ceil(u64::from(block_bytes));
        let changes = match fleece.dirty() {
            Some(dirty) => Changes::Blocks(Arc::new(blocks_of(dirty, block_bytes, blocks))),
            None => Changes::Everything(fleece.why_everything().unwrap_or("no bitmap to trust").to_string()),
        };
        let view = format!("qemu fleece of block node {} (monitor {})", self.node, self.monitor);
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
    let names: Vec<&str> = members.iter().map(|(_, v)| *v).collect();
    let disks: Result<Vec<QemuDisk>, QemuError> = members.iter().map(|(kind, volume)| kind.disk(volume, target)).collect();
    let fleeces = disks.and_then(|disks| Fleece::take_together(&disks)).map_err(|source| SourceError::Qemu { volume: names.join(", "), source })?;
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
        let mut mon = connect(&qmp);
        mon.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": nbd } } })).unwrap();
        mon.execute("block-export-add", json!({ "type": "nbd", "id": "disk", "node-name": "disk0", "name": "disk", "writable": true })).unwrap();
        let disk = QemuDisk { fence: None, qmp: QemuSocket::Unix(qmp), tls: None, node: "disk0".into(), nbd: QemuSocket::Unix(nbd), volume: "vm1".into(), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.join("work"), guest_agent: None, guard: FleeceGuard::Reserve(0) };
        (daemon, disk)
    }

    /// A monitor on a Unix socket.
    fn connect(qmp: &Path) -> Qmp {
        Qmp::connect(&QemuSocket::Unix(qmp.to_path_buf()), None).unwrap()
    }

    /// The path of a Unix socket.
    fn path(socket: &QemuSocket) -> PathBuf {
        match socket {
            QemuSocket::Unix(path) => path.clone(),
            tcp => panic!("{tcp} is not a Unix socket"),
        }
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
        let (qmp, nbd) = (path(&disk.qmp), path(&disk.nbd));
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
        let mut mon = connect(&qmp);
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
        write(&path(&disk.nbd), 0x51, 2 << 20, 64 << 10);
        // The lease runs out while the view lives: releasing it touches nothing in qemu.
        fence.set(Some(Instant::now() + Duration::from_millis(500)), ttl);
        view.abandon().unwrap();
        let mut mon = disk.monitor().unwrap();
        let exports = mon.execute("query-block-exports", json!({})).unwrap();
        let names = Names::of("vm1", "dst");
        assert!(exports.as_array().unwrap().iter().any(|e| e["id"] == names.export.as_str()), "the view's export was removed: {exports}");
        drop(mon);
        // The next reader's view cleans up and still sees the write made under the old one.
        let next = Fleece::take(&disk).unwrap();
        assert_eq!(spans(next.dirty()), vec![(2 << 20, 64 << 10)]);
        next.commit().unwrap();
        let mut mon = disk.monitor().unwrap();
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
            let mut mon = connect(&qmp);
            mon.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": nbd } } })).unwrap();
            for i in 0..2 {
                mon.execute("block-export-add", json!({ "type": "nbd", "id": format!("w{i}"), "node-name": format!("disk{i}"), "name": format!("w{i}"), "writable": true })).unwrap();
            }
        }
        let disks: Vec<QemuDisk> = (0..2)
            .map(|i| QemuDisk { fence: None, qmp: QemuSocket::Unix(qmp.clone()), tls: None, node: format!("disk{i}"), nbd: QemuSocket::Unix(nbd.clone()), volume: format!("vm1-d{i}"), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.path().join("work"), guest_agent: None, guard: FleeceGuard::Reserve(0) })
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
        let mut mon = connect(&qmp);
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
        let (qmp, nbd) = (path(&disk.qmp), path(&disk.nbd));
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
        let mut mon = disk.monitor().unwrap();
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
        let after = names(&mut disk.monitor().unwrap());
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
        let disk = QemuDisk { fence: None, qmp: QemuSocket::Unix(dir.path().join("none.sock")), tls: None, node: "disk0".into(), nbd: QemuSocket::Unix(dir.path().join("nbd.sock")), volume: "vm1".into(), target: "dst".into(), targets: vec!["dst".into()], work_dir: dir.path().join("work"), guest_agent: None, guard: FleeceGuard::Reserve(0) };
        let e = Fleece::take(&disk).err().unwrap().to_string();
        assert!(e.starts_with(&format!("qemu monitor at {}: ", disk.qmp)), "{e}");
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        let qmp = dir.path().join("qmp.sock");
        let _daemon = storage_daemon(&image, &qmp);
        let disk = QemuDisk { fence: None, qmp: QemuSocket::Unix(qmp), node: "vda".into(), ..disk };
        let e = Fleece::take(&disk).err().unwrap().to_string();
        assert!(e.ends_with("no block node \"vda\" (query-named-block-nodes lists the node names)"), "{e}");
    }

    /// x509 credentials in qemu's layout, made by scripts/qemu-tls-creds
    /// for 127.0.0.1: `dir/server` for qemu, `dir/client` for drmesh.
    fn tls_creds(dir: &Path) -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-tls-creds");
        run(Command::new(script).arg(dir).arg("127.0.0.1"));
        dir.to_path_buf()
    }

    /// A TCP port free on 127.0.0.1 now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// qemu-storage-daemon with the qcow2 `image` as block node "disk0", its
    /// monitor on 127.0.0.1:`port` with TLS (credentials `creds/server`,
    /// client certificates checked against its CA).
    fn storage_daemon_tls(image: &Path, creds: &Path, port: u16) -> Daemon {
        let daemon = Daemon(
            Command::new("qemu-storage-daemon")
                .arg("--object")
                .arg(format!("tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}", creds.join("server").display()))
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
                .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
                .arg("--chardev")
                .arg(format!("socket,id=mon,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0"))
                .args(["--monitor", "chardev=mon"])
                .spawn()
                .expect("qemu-storage-daemon (scripts/install-deps installs qemu-utils)"),
        );
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("qemu-storage-daemon did not listen on port {port}");
    }

    /// The VM's writes through the TLS NBD server at `port` (export "disk"),
    /// with qemu's own client (the credentials in `creds/client`).
    fn write_tls(creds: &Path, port: u16, pattern: u8, offset: u64, len: u64) {
        run(Command::new("qemu-io")
            .arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.join("client").display()))
            .arg("--image-opts")
            .arg(format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"))
            .args(["-c", &format!("write -P {pattern} {offset} {len}")]));
    }

    #[test]
    fn a_disk_on_another_machine_is_read_over_tcp_with_mutual_tls_and_its_fleece_made_and_bounded_by_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let creds = tls_creds(&dir.path().join("pki"));
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("64M"));
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 64M"]).arg(&image));
        let (qmp_port, nbd_port) = (free_port(), free_port());
        let _daemon = storage_daemon_tls(&image, &creds, qmp_port);
        let tls = QemuTls { dir: creds.join("client"), object: None };
        // "The hypervisor's" folder: only qemu writes in it (this node never touches it).
        let remote_dir = dir.path().join("hypervisor-fleece");
        std::fs::create_dir(&remote_dir).unwrap();
        let disk = QemuDisk {
            fence: None,
            qmp: QemuSocket::Tcp { host: "127.0.0.1".into(), port: qmp_port },
            tls: Some(QemuTlsClient::load(&tls).unwrap()),
            node: "disk0".into(),
            nbd: QemuSocket::Tcp { host: "127.0.0.1".into(), port: nbd_port },
            volume: "vm1".into(),
            target: "dst".into(),
            targets: vec!["dst".into()],
            work_dir: remote_dir.clone(),
            guest_agent: None,
            guard: FleeceGuard::Max(8 << 20),
        };
        // The NBD server starts with qemu's one server-side TLS object; the VM writes through it.
        let first = Fleece::take(&disk).unwrap();
        assert!(first.dirty().is_none(), "no bitmap yet: everything is read");
        let fleece_file = remote_dir.join(format!("{}.qcow2", Names::of("vm1", "dst").fleece));
        assert!(fleece_file.exists(), "qemu made the fleece file on its own machine");
        assert_eq!(read(&first.device(), 0, 4096), vec![0x11; 4096]);
        first.commit().unwrap();
        assert_eq!(std::fs::metadata(&fleece_file).unwrap().len(), 0, "emptied by qemu once the view was released");
        mon_export(&disk);

        // The next view reads what the bitmap marks, over TLS, at its instant.
        write_tls(&creds, nbd_port, 0x42, 4 << 20, 64 << 10);
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(4 << 20, 64 << 10)]);
        write_tls(&creds, nbd_port, 0x43, 4 << 20, 64 << 10);
        assert_eq!(read(&view.device(), 4 << 20, 4096), vec![0x42; 4096], "the view is the instant, not the VM's later write");
        view.commit().unwrap();

        // A fleece that grows past fleece_max is dropped before it can fill the hypervisor's folder.
        let view = Fleece::take(&disk).unwrap();
        write_tls(&creds, nbd_port, 0x44, 16 << 20, 16 << 20);
        let mut broken = None;
        for _ in 0..100 {
            broken = view.broken();
            if broken.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let why = broken.expect("the watchdog dropped the view");
        assert!(why.contains("over its fleece_max of 8 MiB: the view was dropped"), "{why}");
        view.abandon().unwrap();
        // Nothing recorded was lost: the next view reads both writes since the last commit.
        let view = Fleece::take(&disk).unwrap();
        assert_eq!(spans(view.dirty()), vec![(4 << 20, 64 << 10), (16 << 20, 16 << 20)]);
        view.abandon().unwrap();

        // Credentials that do not fit say what is wrong, and nothing is sent in the clear.
        let other = tls_creds(&dir.path().join("other-pki"));
        let stranger = QemuTls { dir: other.join("client"), object: None };
        let e = Qmp::connect(&disk.qmp, Some(&QemuTlsClient::load(&stranger).unwrap())).err().unwrap().to_string();
        assert!(e.starts_with(&format!("qemu monitor at tcp:127.0.0.1:{qmp_port}: TLS with 127.0.0.1: the server's certificate is not trusted: it is not signed by the CA this node trusts")), "{e}");
        // This node's CA, but a certificate qemu's CA did not sign.
        std::fs::copy(creds.join("client/ca-cert.pem"), other.join("client/ca-cert.pem")).unwrap();
        let e = Qmp::connect(&disk.qmp, Some(&QemuTlsClient::load(&stranger).unwrap())).err().unwrap().to_string();
        assert!(e.contains(&format!("qemu monitor at tcp:127.0.0.1:{qmp_port}: ")) && e.contains("client-cert.pem"), "{e}");
        // A key others may read is refused before any connection.
        std::fs::set_permissions(creds.join("client/client-key.pem"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let e = QemuTlsClient::load(&tls).err().unwrap().to_string();
        assert!(e.ends_with("client-key.pem: is readable by other users (mode 644); make it 0600 (chmod 600)"), "{e}");
        std::fs::remove_file(creds.join("client/ca-cert.pem")).unwrap();
        let e = QemuTlsClient::load(&tls).err().unwrap().to_string();
        assert!(e.contains("ca-cert.pem: No such file"), "{e}");
    }

    /// A writable export "disk" of the VM's disk on the NBD server the views started.
    fn mon_export(disk: &QemuDisk) {
        let mut mon = disk.monitor().unwrap();
        mon.execute("block-export-add", json!({ "type": "nbd", "id": "disk", "node-name": "disk0", "name": "disk", "writable": true })).unwrap();
    }

    #[test]
    fn a_monitor_over_tcp_without_tls_is_never_spoken_to_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let creds = tls_creds(&dir.path().join("pki"));
        let port = free_port();
        // A plain TCP monitor: it greets in the clear, which a TLS client takes for a broken handshake.
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        let _daemon = Daemon(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
                .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
                .arg("--chardev")
                .arg(format!("socket,id=mon,host=127.0.0.1,port={port},server=on,wait=off"))
                .args(["--monitor", "chardev=mon"])
                .spawn()
                .unwrap(),
        );
        let socket = QemuSocket::Tcp { host: "127.0.0.1".into(), port };
        let mut e = String::new();
        for _ in 0..200 {
            match Qmp::connect(&socket, Some(&QemuTlsClient::load(&QemuTls { dir: creds.join("client"), object: None }).unwrap())) {
                Err(QemuError::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionRefused => std::thread::sleep(Duration::from_millis(25)),
                Err(other) => {
                    e = other.to_string();
                    break;
                }
                Ok(_) => panic!("a plain monitor was spoken to"),
            }
        }
        assert!(e.starts_with(&format!("qemu monitor at tcp:127.0.0.1:{port}: TLS with 127.0.0.1: the server does not speak TLS here (it sent plain text)")), "{e}");
    }

    /// The guest agent's channel of a VM over TCP with TLS: a qemu whose
    /// guest never runs (`-S`) has the channel but no agent behind it. The
    /// proxy gets through TLS to the channel and, with no answer in its
    /// time, freezes nothing and says so (the RP is crash consistent), as
    /// with a guest whose agent is not running yet.
    #[test]
    fn a_guest_agent_channel_over_tls_without_an_agent_freezes_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let creds = tls_creds(&dir.path().join("pki"));
        let port = free_port();
        let _vm = Daemon(
            Command::new("qemu-system-x86_64")
                .args(["-S", "-accel", "tcg", "-nodefaults", "-display", "none", "-no-user-config", "-m", "64"])
                .arg("-object")
                .arg(format!("tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}", creds.join("server").display()))
                .args(["-device", "virtio-serial-pci", "-chardev"])
                .arg(format!("socket,id=qga0,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0"))
                .args(["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64"),
        );
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let guest = GuestAgent { socket: QemuSocket::Tcp { host: "127.0.0.1".into(), port }, tls: Some(QemuTls { dir: creds.join("client"), object: None }) };
        let (agent, frozen) = freeze_guest(&guest);
        assert!(agent.is_none());
        let GuestFreeze::Failed(why) = frozen else { panic!("{frozen:?}") };
        // Through TLS (no handshake error), then no answer from the agent.
        assert!(why.starts_with(&format!("the guest agent did not answer (qemu guest agent at tcp:127.0.0.1:{port}: ")) && !why.contains("TLS"), "{why}");
        assert!(why.contains("did not come within 10 s"), "{why}");
    }
}
