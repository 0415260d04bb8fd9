//! Change sources: how a source node reads a volume and finds what changed.
//!
//! - [`baseline`]: what the source knows the target holds (per volume and target):
//!   the content id and page hashes of every block of the last committed RP,
//!   kept in the source node's own redb. It advances only after the target
//!   acknowledged a commit (promise 2).
//! - [`file`]: the `file` source kind: an image file or block device, read in
//!   full at cycle time and compared block by block with the baseline.
//! - [`kmod`]: the `kmod` source kind: a block device tracked by drmesh's kernel
//!   module; each cycle reads only the changed blocks, from a snapshot.
//! - [`change`]: the seam a cycle sees every kind through ([`change::ChangeSource`],
//!   [`change::PointInTime`]), and [`device`]: where a view's blocks are read
//!   ([`device::BlockDevice`]).
//! - [`group`]: the views of a consistency group's volumes taken together,
//!   their writes held at one instant where drmesh can.
//! - [`hooks`]: the operator's commands run around any kind's view
//!   (`[volume.hooks]`), for application-consistent RPs.
//! - [`lvm`]: the `file` kind's point-in-time view of an LVM logical volume.
//! - [`qemu`]: the `qemu` source kind: a VM disk read through qemu without
//!   an agent in the VM (a fleece per cycle, its dirty bitmap, over [`nbd`]).
//! - [`reflink`]: the `file` kind's point-in-time view of an image file on a
//!   filesystem that clones files.
//! - [`free_space`]: the free blocks of the filesystem in a view, which a
//!   read skips (zeros in the RP).

pub mod baseline;
pub mod change;
pub mod device;
pub mod fence;
pub mod file;
pub mod free_space;
pub mod freeze;
pub mod group;
pub mod hooks;
pub mod kmod;
pub mod lvm;
pub mod nbd;
pub mod qemu;
pub mod qemu_socket;
pub mod reflink;

/// A set of block indices of a volume (the blocks a cycle reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMask {
    words: Vec<u64>,
    len: u64,
}

impl BlockMask {
    /// An empty set over `len` blocks.
    pub fn new(len: u64) -> BlockMask {
        BlockMask { words: vec![0; usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX)], len }
    }

    /// Blocks the set is over.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is over no blocks at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds block `index` (ignored past the end).
    pub fn insert(&mut self, index: u64) {
        if index < self.len {
            self.words[(index / 64) as usize] |= 1 << (index % 64);
        }
    }

    /// Whether block `index` is in the set (false past the end).
    pub fn contains(&self, index: u64) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Blocks in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Why reading a source or its baseline failed. The cycle fails; the baseline is untouched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The volume's image or device could not be read.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or device.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The baseline database failed.
    #[error("source baseline database {path}: {reason}")]
    Baseline {
        /// The redb file.
        path: String,
        /// redb's message.
        reason: String,
    },
    /// The kernel module refused or failed a call; the cycle fails, the
    /// changes it handed over stay pending for the next cycle.
    #[error("volume {volume}: {op} of {device} through the drmesh kernel module: {source}")]
    Kmod {
        /// Volume name.
        volume: String,
        /// The tracked device (or the snapshot device).
        device: String,
        /// What was being done (open, attach, status, snapshot, release).
        op: &'static str,
        /// The module's answer.
        source: drmesh_kmod::KmodError,
    },
    /// The snapshot a cycle read was invalidated; the cycle fails and the
    /// module marks every block changed, so the next cycle reads everything.
    #[error("volume {volume}: the snapshot became invalid while the cycle read it: {reason}")]
    SnapshotInvalid {
        /// Volume name.
        volume: String,
        /// Why.
        reason: String,
    },
    /// A snapshot could not be released (it stays until the volume's next cycle).
    #[error("volume {volume}: {reason}")]
    Snapshot {
        /// Volume name.
        volume: String,
        /// What failed.
        reason: String,
    },
    /// qemu refused or failed a step of a `qemu` volume's view; what was
    /// recorded stays for the next cycle.
    #[error("volume {volume}: {source}")]
    Qemu {
        /// Volume name.
        volume: String,
        /// What failed.
        source: qemu::QemuError,
    },
    /// The volume's block size changed since the baseline; a full offer follows.
    #[error("volume {volume}: block size changed from {old} to {new} bytes; the baseline is reset")]
    BlockSizeChanged {
        /// Volume name.
        volume: String,
        /// Baseline block size.
        old: u32,
        /// Policy block size now.
        new: u32,
    },
}
