//! The Windows agent: mapping partitions to volumes, reading the NTFS allocation
//! bitmap so free space is never read or sent, and orchestrating VSS snapshots.
//!
//! Nothing lives here yet: the agent arrives with the Windows work. The crate
//! exists so the workspace has its final shape.
