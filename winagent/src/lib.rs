//! The Windows agent: mapping partitions to volumes, reading the NTFS allocation
//! bitmap so free space is never read or sent, and orchestrating VSS snapshots.
//!
//! Built today: [`ntfs`], the portable reader of an NTFS volume's allocation
//! bitmap (the source node uses it on any volume that holds NTFS, whatever
//! machine reads it). The agent itself (volume mapping, VSS) arrives with the
//! Windows work.

pub mod ntfs;
