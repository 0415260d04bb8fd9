//! The typed topology: what a valid file means, with units resolved.
//!
//! Every value here has passed validation: names are unique, references
//! resolve, sizes are in bytes, durations are [`Duration`]s and rates are in
//! bits per second. The parser ([`crate::parse`]) and the checks
//! ([`crate::validate`]) are the only producers of these types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::node_id::NodeId;
use crate::volume_name::VolumeName;

/// The `[mesh]` table: which mesh this file describes and which edit it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// Human name of the mesh, shown in status output.
    pub name: String,
    /// Edit number, at least 1; ops bump it on every edit so nodes can tell
    /// which of two files is newer.
    pub version: u64,
}

/// A `[[site]]` table: a place (office, data centre, cloud region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Unique site name that nodes refer to.
    pub name: String,
    /// Bandwidth of the site's WAN uplink in bits per second, if given.
    pub uplink_bps: Option<u64>,
}

/// A `[[link]]` table: a rate cap on the transfers between two nodes, in each
/// direction, on top of policy caps and site shares (the least of them applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The two node names, as written (distinct, both `[[node]]` names).
    pub nodes: [String; 2],
    /// The cap and its time windows, as in a policy's `bandwidth` table.
    pub bandwidth: Bandwidth,
}

impl Link {
    /// Whether this link joins `a` and `b` (in either order).
    pub fn joins(&self, a: &str, b: &str) -> bool {
        (self.nodes[0] == a && self.nodes[1] == b) || (self.nodes[0] == b && self.nodes[1] == a)
    }
}

/// A `[[group]]` table: a consistency group, volumes of one source node whose
/// views are taken together each cycle (their filesystems held still at one
/// instant where drmesh can), so their RPs restore together as one group RP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Unique group name.
    pub name: String,
    /// Its member volumes, at least two, in the order written; all have the
    /// same source node and the same targets, none has `[volume.hooks]`.
    pub volumes: Vec<VolumeName>,
    /// `[group.hooks]`: commands run once around each group cycle's views
    /// (before anything is frozen, and after all is thawed).
    pub hooks: Option<VolumeHooks>,
}

/// A `[[platform]]`: a hypervisor host whose VMs' disks several proxy nodes
/// can reach. Each of its volumes (a `qemu` volume whose `source` names the
/// platform) is read by one live proxy at a time, chosen by rendezvous
/// hashing over the proxies gossip reports alive; a proxy runs a volume's
/// cycles only under a lease from the volume's first target (docs/agentless.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Unique name, not a node's name (volumes name it as their `source`).
    pub name: String,
    /// Its proxy nodes, at least one, in the order written.
    pub proxies: Vec<String>,
    /// How long a proxy's lease on a volume lasts without renewal (2 s to
    /// 10 min, default 30 s): a dead proxy's volumes move after at most this
    /// long, and a proxy cut off from the lease's target stops reading them
    /// before it runs out.
    pub lease: std::time::Duration,
}

/// Default `lease` of a `[[platform]]`.
pub const DEFAULT_PLATFORM_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// A `[[node]]` table: one `drmesh` process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Unique name, `[a-z0-9][a-z0-9-_.]*`.
    pub name: String,
    /// The node's identity (hash of its public key).
    pub id: NodeId,
    /// `host:port` strings others dial, as written (trimmed). Empty: the node
    /// is behind NAT and only dials out.
    pub addresses: Vec<String>,
    /// Socket address the node binds.
    pub listen: SocketAddr,
    /// Name of the site the node is in.
    pub site: String,
    /// Free-form labels for ops and placement.
    pub labels: BTreeMap<String, String>,
    /// Most drills the node runs at once (`max_drills`, default 1).
    pub max_drills: u32,
    /// Most replication cycles the node runs at once (`max_cycles`, default
    /// [`DEFAULT_MAX_CYCLES`]): a proxy's capacity in disks read at once;
    /// the others wait their turn, oldest due first.
    pub max_cycles: u32,
    /// How often the node scrubs its store (`scrub_every`, default 7 days;
    /// `"off"`: never on its own, `drmesh ctl scrub` still works).
    pub scrub_every: Option<std::time::Duration>,
    /// Percent of the blobs a scheduled scrub reads (`scrub_sample`, "1%" to
    /// "100%", default all); successive sampled scrubs cover the store in turn.
    pub scrub_sample_percent: u32,
    /// How often the node collects the garbage of its store: blobs no kept
    /// RP needs (`gc_every`, default 1 day; `"off"`: only `drmesh ctl gc`).
    pub gc_every: Option<std::time::Duration>,
    /// Where the node serves Prometheus metrics over HTTP at `/metrics`
    /// (`metrics`, off when absent).
    pub metrics: Option<SocketAddr>,
    /// Where the node serves its read-only status page over HTTP (`status_page`,
    /// off when absent); always a loopback address (the page has no login).
    pub status_page: Option<SocketAddr>,
}

/// `max_cycles` of a `[[node]]` that does not say.
pub const DEFAULT_MAX_CYCLES: u32 = 50;

/// How often a node scrubs its store when the topology does not say.
pub const DEFAULT_SCRUB_EVERY: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// How often a node collects its store's garbage when the topology does not say.
pub const DEFAULT_GC_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A `[[volume]]` table: one protected disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Unique volume name; recovery points are named `NAME@SEQ`.
    pub name: VolumeName,
    /// Name of the node that reads the volume, or of the `[[platform]]`
    /// whose proxies read it (see [`crate::Topology::may_read`]).
    pub source: String,
    /// How blocks and changes are read, with the kind's settings.
    pub kind: SourceKind,
    /// Names of the nodes that keep recovery points; never empty, never the source.
    pub targets: Vec<String>,
    /// Name of the policy in `[policy.NAME]`.
    pub policy: String,
    /// `[volume.hooks]`: commands run around each cycle's point-in-time view.
    pub hooks: Option<VolumeHooks>,
    /// `free_space`: whether reads skip the free blocks of the filesystem in
    /// the volume (default) or read them like any other.
    pub free_space: FreeSpace,
}

/// `free_space` of a `[[volume]]`: what a cycle does with the blocks the
/// filesystem in the volume does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreeSpace {
    /// `"skip"` (default): not read, zeros in the RP, where the filesystem's
    /// allocation bitmaps can be trusted (see docs/consistency.md).
    #[default]
    Skip,
    /// `"read"`: every block is read, free or not.
    Read,
}

/// `[volume.hooks]`: commands the source node runs around each cycle's
/// point-in-time view to quiesce an application (see docs/consistency.md).
/// At least one of `pre` and `post` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHooks {
    /// Program (an absolute path) and arguments, no shell: run before the view
    /// is taken; exit status 0 says the application is quiet.
    pub pre: Option<Vec<String>>,
    /// Program and arguments: run once the view no longer needs the
    /// application quiet, also after a `pre` that failed.
    pub post: Option<Vec<String>>,
    /// Time limit of each command (1 s to 1 h, default 60 s); at the limit
    /// its process group is killed.
    pub timeout: std::time::Duration,
}

/// How a volume's blocks and changes are read (the `kind` key and its settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `kind = "file"`: an image file or block device, full scan + hash compare.
    File {
        /// Absolute path of the image file or block device.
        path: PathBuf,
    },
    /// `kind = "kmod"`: the drmesh kernel module's change tracking and snapshots.
    Kmod {
        /// Absolute `/dev/...` path of the block device.
        device: PathBuf,
        /// Absolute `/dev/...` path of the block device that holds the
        /// copy-on-write store of each cycle's snapshot (not on `device`'s disk;
        /// its size bounds how much may be overwritten while a cycle reads).
        cow_store: PathBuf,
        /// Absolute `/dev/...` path of the block device that keeps the
        /// change tracking across reboots and crashes (not on `device`'s disk,
        /// not the COW store); `None`: tracking is kept in memory, and the
        /// first cycle after a reboot reads the whole device.
        state_store: Option<PathBuf>,
    },
    /// `kind = "qemu"`: a VM disk that a running qemu (or
    /// qemu-storage-daemon) has open, read without an agent in the VM:
    /// a point-in-time view per cycle, its changes from a dirty bitmap.
    Qemu {
        /// The QMP monitor drmesh talks to: a Unix socket on this machine,
        /// or `tcp:HOST:PORT` reached with TLS.
        monitor: QemuSocket,
        /// The disk's block node name (`query-named-block-nodes`).
        node: String,
        /// Absolute path of the folder where qemu writes the cycle's
        /// copy-before-write data (the fleece file): on this machine for a
        /// monitor on a Unix socket, on the monitor's machine for one over TCP.
        fleece_dir: PathBuf,
        /// qemu's NBD server; started there when qemu runs none. Default:
        /// `nbd.sock` in `fleece_dir` (Unix monitor), port 10809 on the
        /// monitor's host (TCP monitor).
        nbd: QemuSocket,
        /// The VM's qemu-guest-agent channel: the guest's filesystems are
        /// frozen at each instant.
        guest_agent: Option<QemuSocket>,
        /// How the fleece is kept from filling its folder.
        fleece_guard: FleeceGuard,
        /// TLS for sockets over TCP (`None` for Unix sockets).
        tls: Option<QemuTls>,
    },
    /// `kind = "ebs"`: AWS EBS direct APIs.
    Ebs {
        /// EBS volume id, `vol-` followed by hex digits.
        volume_id: String,
        /// AWS region, e.g. `eu-west-1`.
        region: String,
        /// Endpoint URL override (for S3/EBS-compatible test services).
        endpoint: Option<String>,
    },
}

impl SourceKind {
    /// The `kind` string of this source kind.
    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::File { .. } => "file",
            SourceKind::Kmod { .. } => "kmod",
            SourceKind::Qemu { .. } => "qemu",
            SourceKind::Ebs { .. } => "ebs",
        }
    }
}

/// A `[policy.NAME]` table: how often, how long and how a volume is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The NAME in `[policy.NAME]`.
    pub name: String,
    /// Recovery point objective: the longest acceptable gap between recovery points.
    pub rpo: Duration,
    /// Which recovery points are kept.
    pub retention: Retention,
    /// Block size in bytes: a power of two from 64 KiB to 16 MiB (default 1 MiB).
    pub block_bytes: u64,
    /// Compression of blocks on the wire and in the store.
    pub compression: Compression,
    /// Absolute path of the 32-byte key file; `None`: blocks are not encrypted.
    /// Read the key with [`crate::keyfile::read_key_file`].
    pub encryption_key_file: Option<PathBuf>,
    /// Bandwidth limits for this policy's transfers.
    pub bandwidth: Option<Bandwidth>,
    /// Scheduled disaster-recovery drills.
    pub drill: Option<Drill>,
}

/// Where one of qemu's sockets is (a `qemu` volume's `monitor`, `nbd`,
/// `guest_agent`): `/abs/path` or `tcp:HOST:PORT` (`tcp:[v6]:PORT`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QemuSocket {
    /// A Unix socket on this machine.
    Unix(PathBuf),
    /// A TCP address on another machine, always reached with TLS.
    Tcp {
        /// Host name or IP address (without brackets); the server's
        /// certificate must name it.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl QemuSocket {
    /// Whether it is reached over TCP (with TLS).
    pub fn is_tcp(&self) -> bool {
        matches!(self, QemuSocket::Tcp { .. })
    }
}

impl std::fmt::Display for QemuSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QemuSocket::Unix(path) => write!(f, "{}", path.display()),
            QemuSocket::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            QemuSocket::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// How a `qemu` volume's fleece is kept from filling its folder (qemu
/// would otherwise fail the VM's writes): the view is dropped first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleeceGuard {
    /// `fleece_reserve` (monitor on this machine): free bytes kept in the
    /// folder's filesystem, which the node watches itself.
    Reserve(u64),
    /// `fleece_max` (monitor over TCP, whose folder this node cannot see):
    /// the most bytes one view's fleece may take, as qemu reports it.
    Max(u64),
}

/// TLS for a `qemu` volume's sockets over TCP (`tls`, `tls_object`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuTls {
    /// Absolute path of the folder of this node's client credentials, in
    /// qemu's layout: `ca-cert.pem` (the CA the server's certificate is
    /// checked against), `client-cert.pem`, `client-key.pem` (0600).
    pub dir: PathBuf,
    /// The id of qemu's `tls-creds-x509` object its NBD server is started
    /// with; `None`: the one server-side object qemu has.
    pub object: Option<String>,
}

/// Default `fleece_max` of a `qemu` volume whose monitor is over TCP: 4 GiB.
pub const DEFAULT_FLEECE_MAX_BYTES: u64 = 4 << 30;
/// Default TCP port of qemu's NBD server for a monitor over TCP.
pub const DEFAULT_NBD_PORT: u16 = 10809;

/// Default `fleece_reserve` of a `qemu` volume: 1 GiB.
pub const DEFAULT_FLEECE_RESERVE_BYTES: u64 = 1 << 30;

/// Default `block_size`: 1 MiB.
pub const DEFAULT_BLOCK_BYTES: u64 = 1 << 20;
/// Smallest allowed `block_size`: 64 KiB.
pub const MIN_BLOCK_BYTES: u64 = 64 << 10;
/// Largest allowed `block_size`: 16 MiB.
pub const MAX_BLOCK_BYTES: u64 = 16 << 20;
/// Default `retention.keep_last`.
pub const DEFAULT_KEEP_LAST: u32 = 24;

/// The `retention` table of a policy. A recovery point is kept if any rule keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N recovery points (at least 1, default 24).
    pub keep_last: u32,
    /// Keep the newest point of each of the last N hours.
    pub hourly: u32,
    /// Keep the newest point of each of the last N days.
    pub daily: u32,
    /// Keep the newest point of each of the last N weeks.
    pub weekly: u32,
    /// Drop an RP when the next one holds the same volume (nothing changed
    /// between them), so the rules above count distinct states
    /// (`coalesce_unchanged`, default false).
    pub coalesce_unchanged: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_last: DEFAULT_KEEP_LAST, hourly: 0, daily: 0, weekly: 0, coalesce_unchanged: false }
    }
}

/// Block compression (`compression` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `"off"`: blocks are sent and stored raw.
    Off,
    /// `"zstd"` (level 3) or `"zstd:N"` with N in -7..=19.
    Zstd {
        /// zstd level; negative levels are faster, higher levels compress more.
        level: i32,
    },
}

/// Lowest accepted zstd level.
pub const ZSTD_LEVEL_MIN: i32 = -7;
/// Highest accepted zstd level.
pub const ZSTD_LEVEL_MAX: i32 = 19;
/// Level used for plain `"zstd"` (zstd's own default).
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The `bandwidth` table of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bandwidth {
    /// Limit outside any window, in bits per second; `None`: unlimited.
    pub limit_bps: Option<u64>,
    /// Time windows with their own limit; the first matching window wins.
    pub windows: Vec<BandwidthWindow>,
}

/// One entry of `bandwidth.windows`: a limit that applies on some days at some hours
/// (node local time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandwidthWindow {
    /// Days the window starts on.
    pub days: DaySet,
    /// Start of the window.
    pub from: TimeOfDay,
    /// End of the window; if not after `from`, the window runs past midnight.
    pub to: TimeOfDay,
    /// Limit in bits per second while the window is open; `None`: unlimited.
    pub limit_bps: Option<u64>,
}

/// A time of day, minute precision, `00:00` to `24:00`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    /// Minutes since midnight, 0..=1440.
    pub minutes: u16,
}

impl TimeOfDay {
    /// The hour, 0..=24.
    pub fn hour(&self) -> u16 {
        self.minutes / 60
    }
    /// The minute, 0..=59.
    pub fn minute(&self) -> u16 {
        self.minutes % 60
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour(), self.minute())
    }
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// All days, Monday first.
    pub const ALL: [Weekday; 7] =
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];

    /// Three-letter lower-case name, as written in topology files.
    pub fn name(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][self as usize]
    }
}

/// A set of weekdays (`days = "mon-fri"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DaySet {
    /// Bit `d` set when `Weekday as usize == d` is in the set.
    pub bits: u8,
}

impl DaySet {
    /// Whether `day` is in the set.
    pub fn contains(&self, day: Weekday) -> bool {
        self.bits & (1 << day as u8) != 0
    }
    /// Adds `day` to the set.
    pub fn insert(&mut self, day: Weekday) {
        self.bits |= 1 << day as u8;
    }
}

/// The `drill` table of a policy: what proves its recovery points recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drill {
    /// When drills run.
    pub schedule: DrillSchedule,
    /// What a drill checks on the recovery point (default: `["fsck"]`).
    pub checks: Vec<DrillCheck>,
    /// Nodes that run the drills of volumes with this policy (each drills the
    /// RPs it holds); empty: every target of the volume.
    pub nodes: Vec<String>,
    /// A volume whose newest verified RP is older than this is flagged
    /// (dead-man's switch); default twice the schedule's interval.
    pub max_unverified_age: Duration,
    /// Time limit of one drill, all checks together (default 1h).
    pub time_limit: Duration,
    /// Settings of the `boot` check.
    pub boot: DrillBoot,
    /// Settings of the `postgres` check (required when it is listed).
    pub postgres: Option<DrillPostgres>,
    /// Settings of the `script` check (required when it is listed).
    pub script: Option<DrillScript>,
}

/// `[policy.NAME.drill.boot]`: how the `boot` check boots the recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillBoot {
    /// Adapt the image to the VM first (on the overlay), as `recover --adapt`.
    pub adapt: bool,
    /// Console text that means "booted" (default `["login:"]`).
    pub markers: Vec<String>,
    /// How long to wait for a marker (default 10m).
    pub timeout: Duration,
    /// Guest memory in MiB (default 1024).
    pub memory_mib: u32,
    /// What the source server called the disk, for fstab entries naming devices
    /// (default `/dev/sda`).
    pub source_disk: String,
}

impl Default for DrillBoot {
    fn default() -> Self {
        DrillBoot {
            adapt: false,
            markers: vec!["login:".to_string()],
            timeout: Duration::from_secs(600),
            memory_mib: 1024,
            source_disk: "/dev/sda".to_string(),
        }
    }
}

/// `[policy.NAME.drill.postgres]`: the PostgreSQL cluster on the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillPostgres {
    /// The data directory as the source server sees it (an absolute path such
    /// as `/var/lib/postgresql/15/main`), found on whichever of the RP's
    /// filesystems holds it.
    pub path: String,
    /// Database the query runs in (default `postgres`).
    pub database: String,
    /// SQL whose result is recorded (and compared with `expect`).
    pub query: Option<String>,
    /// The expected result of `query` (psql unaligned, tuples only, rows
    /// joined by newlines); absent: any result that runs passes.
    pub expect: Option<String>,
}

/// `[policy.NAME.drill.script]`: a user command run against the RP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillScript {
    /// Program and arguments (no shell); run with the RP's filesystems mounted
    /// under the folder in `DRMESH_DRILL_ROOT` (also its working directory).
    pub command: Vec<String>,
    /// Mount the filesystems writable on the overlay instead of read-only.
    pub writable: bool,
}

/// When drills run (`drill.schedule`), in node local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillSchedule {
    /// `"daily HH:MM"`.
    Daily {
        /// Time of day.
        at: TimeOfDay,
    },
    /// `"weekly DAY HH:MM"`.
    Weekly {
        /// Day of the week.
        day: Weekday,
        /// Time of day.
        at: TimeOfDay,
    },
    /// `"every DURATION"`, counted from the node's start.
    Every(Duration),
}

/// One drill check (`drill.checks` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DrillCheck {
    /// `"fsck"`: filesystem check of the restored image.
    Fsck,
    /// `"boot"`: boot the image in qemu and wait for the marker.
    Boot,
    /// `"postgres"`: start PostgreSQL on the restored data and query it.
    Postgres,
    /// `"script"`: a user command against the mounted filesystems.
    Script,
}

impl DrillCheck {
    /// The name as written in topology files.
    pub fn name(self) -> &'static str {
        match self {
            DrillCheck::Fsck => "fsck",
            DrillCheck::Boot => "boot",
            DrillCheck::Postgres => "postgres",
            DrillCheck::Script => "script",
        }
    }

    /// Every check, in the order a drill runs them.
    pub const ALL: [DrillCheck; 4] = [DrillCheck::Fsck, DrillCheck::Postgres, DrillCheck::Script, DrillCheck::Boot];

    /// The check named `name` (as in topology files).
    pub fn parse(name: &str) -> Option<DrillCheck> {
        DrillCheck::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl DrillSchedule {
    /// The longest time between two scheduled drills.
    pub fn interval(&self) -> Duration {
        match self {
            DrillSchedule::Daily { .. } => Duration::from_secs(86_400),
            DrillSchedule::Weekly { .. } => Duration::from_secs(7 * 86_400),
            DrillSchedule::Every(d) => *d,
        }
    }
}
