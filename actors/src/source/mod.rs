//! Change sources: how a source node reads a volume and finds what changed.
//!
//! - [`baseline`]: what the source knows the target holds (per volume and target):
//!   the content id and page hashes of every block of the last committed RP,
//!   kept in the source node's own redb. It advances only after the target
//!   acknowledged a commit (promise 2).
//! - [`file`]: the `file` source kind: an image file or block device, read in
//!   full at cycle time and compared block by block with the baseline.

pub mod baseline;
pub mod file;

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
