//! The Linux agent's kernel side: drmesh's own kernel module (C sources and Kbuild
//! in this folder) that tracks written blocks and offers copy-on-write snapshots,
//! and the Rust interface to it (ioctls, snapshot device) used by the `kmod`
//! source kind.
//!
//! The module's change tracking is in place (see `kmod/README.md`); its Rust
//! wrapper and the `kmod` source kind are still to come.
