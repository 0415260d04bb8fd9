//! The Linux agent's kernel side: drmesh's own kernel module (C sources and Kbuild
//! in this folder) that tracks written blocks and offers copy-on-write snapshots,
//! and the Rust interface to it (ioctls, snapshot device) used by the `kmod`
//! source kind.
//!
//! Nothing lives here yet: the module and its wrapper arrive with the Linux agent
//! work. The crate exists so the workspace has its final shape.
